// The libtpms entry points this package calls. libtpms is not linked: the
// engine is loaded by a thread of its own while the Go runtime starts
// (engine.c). Each vtpm_X has the type of libtpms' X, from libtpms' headers.

#ifndef VTPM_ENGINE_H
#define VTPM_ENGINE_H

#include <libtpms/tpm_library.h>
#include <libtpms/tpm_tis.h>
#include <libtpms/tpm_error.h>

// vtpm_engine_load waits for the engine; NULL once it is loaded, else why not.
const char *vtpm_engine_load(void);

__typeof__(TPMLIB_GetVersion) vtpm_TPMLIB_GetVersion;
__typeof__(TPMLIB_ChooseTPMVersion) vtpm_TPMLIB_ChooseTPMVersion;
__typeof__(TPMLIB_RegisterCallbacks) vtpm_TPMLIB_RegisterCallbacks;
__typeof__(TPMLIB_MainInit) vtpm_TPMLIB_MainInit;
__typeof__(TPMLIB_Terminate) vtpm_TPMLIB_Terminate;
__typeof__(TPMLIB_Process) vtpm_TPMLIB_Process;
__typeof__(TPMLIB_CancelCommand) vtpm_TPMLIB_CancelCommand;
__typeof__(TPMLIB_GetState) vtpm_TPMLIB_GetState;
__typeof__(TPMLIB_SetState) vtpm_TPMLIB_SetState;
__typeof__(TPMLIB_ValidateState) vtpm_TPMLIB_ValidateState;
__typeof__(TPMLIB_VolatileAll_Store) vtpm_TPMLIB_VolatileAll_Store;
__typeof__(TPMLIB_SetBufferSize) vtpm_TPMLIB_SetBufferSize;
__typeof__(TPMLIB_GetInfo) vtpm_TPMLIB_GetInfo;
__typeof__(TPMLIB_SetDebugFD) vtpm_TPMLIB_SetDebugFD;
__typeof__(TPMLIB_SetDebugLevel) vtpm_TPMLIB_SetDebugLevel;
__typeof__(TPMLIB_SetDebugPrefix) vtpm_TPMLIB_SetDebugPrefix;
__typeof__(TPM_IO_TpmEstablished_Get) vtpm_TPM_IO_TpmEstablished_Get;
__typeof__(TPM_IO_TpmEstablished_Reset) vtpm_TPM_IO_TpmEstablished_Reset;
__typeof__(TPM_IO_Hash_Start) vtpm_TPM_IO_Hash_Start;
__typeof__(TPM_IO_Hash_Data) vtpm_TPM_IO_Hash_Data;
__typeof__(TPM_IO_Hash_End) vtpm_TPM_IO_Hash_End;

#endif
