// C side of the libtpms callback table. libtpms stores the table in a
// process global and calls these functions from inside TPMLIB_* calls, on the
// calling thread; each one only forwards to an exported Go function.

#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>

#include "_cgo_export.h"

static TPM_RESULT cb_nvram_init(void)
{
	return vtpmNVRAMInit();
}

static TPM_RESULT cb_nvram_loaddata(unsigned char **data, uint32_t *length,
				    uint32_t tpm_number, const char *name)
{
	(void)tpm_number; /* always 0: libtpms hosts one TPM */
	return vtpmNVRAMLoadData(data, length, (char *)name);
}

static TPM_RESULT cb_nvram_storedata(const unsigned char *data,
				     uint32_t length, uint32_t tpm_number,
				     const char *name)
{
	(void)tpm_number;
	return vtpmNVRAMStoreData((unsigned char *)data, length, (char *)name);
}

static TPM_RESULT cb_nvram_deletename(uint32_t tpm_number, const char *name,
				      TPM_BOOL must_exist)
{
	(void)tpm_number;
	return vtpmNVRAMDeleteName((char *)name, must_exist);
}

static TPM_RESULT cb_io_init(void)
{
	return TPM_SUCCESS;
}

static TPM_RESULT cb_io_getlocality(TPM_MODIFIER_INDICATOR *locality,
				    uint32_t tpm_number)
{
	(void)tpm_number;
	return vtpmIOGetLocality(locality);
}

TPM_RESULT vtpm_register_callbacks(void)
{
	/* Physical presence stays NULL, as in swtpm: TPM 2.0 does not use it. */
	static struct libtpms_callbacks cbs = {
		.sizeOfStruct = sizeof(struct libtpms_callbacks),
		.tpm_nvram_init = cb_nvram_init,
		.tpm_nvram_loaddata = cb_nvram_loaddata,
		.tpm_nvram_storedata = cb_nvram_storedata,
		.tpm_nvram_deletename = cb_nvram_deletename,
		.tpm_io_init = cb_io_init,
		.tpm_io_getlocality = cb_io_getlocality,
	};
	return TPMLIB_RegisterCallbacks(&cbs);
}
