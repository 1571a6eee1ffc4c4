// Loading libtpms. Linked the usual way, the dynamic loader would map and
// relocate libtpms and libcrypto before the program's first instruction,
// a third of a vTPM's start on hosts where page faults are dear (see
// BENCHMARKS.md). Instead a constructor starts a thread that dlopens them
// while the Go runtime initialises on the main thread; the first call into
// the engine waits for that thread (vtpm_engine_load).

#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

#include "engine.h"

// libtpms' soname: the major version of the headers built against.
#define LIBTPMS_SONAME "libtpms.so.0"

#define ENGINE_FUNCS(X)                                                        \
	X(TPMLIB_GetVersion)                                                   \
	X(TPMLIB_ChooseTPMVersion)                                             \
	X(TPMLIB_RegisterCallbacks)                                            \
	X(TPMLIB_MainInit)                                                     \
	X(TPMLIB_Terminate)                                                    \
	X(TPMLIB_Process)                                                      \
	X(TPMLIB_CancelCommand)                                                \
	X(TPMLIB_GetState)                                                     \
	X(TPMLIB_SetState)                                                     \
	X(TPMLIB_ValidateState)                                                \
	X(TPMLIB_VolatileAll_Store)                                            \
	X(TPMLIB_SetBufferSize)                                                \
	X(TPMLIB_GetInfo)                                                      \
	X(TPMLIB_SetDebugFD)                                                   \
	X(TPMLIB_SetDebugLevel)                                                \
	X(TPMLIB_SetDebugPrefix)                                               \
	X(TPM_IO_TpmEstablished_Get)                                           \
	X(TPM_IO_TpmEstablished_Reset)                                         \
	X(TPM_IO_Hash_Start)                                                   \
	X(TPM_IO_Hash_Data)                                                    \
	X(TPM_IO_Hash_End)

static struct {
#define FIELD(name) __typeof__(name) *name;
	ENGINE_FUNCS(FIELD)
#undef FIELD
} lib;

static char load_error[512];
static pthread_t loader;
static int loading; // the loader thread was started
static pthread_once_t loaded = PTHREAD_ONCE_INIT;

static void *load(void *arg)
{
	(void)arg;
	void *h = dlopen(LIBTPMS_SONAME, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		snprintf(load_error, sizeof load_error, "%s", dlerror());
		return NULL;
	}
#define RESOLVE(name)                                                          \
	if ((lib.name = (__typeof__(name) *)dlsym(h, #name)) == NULL) {        \
		snprintf(load_error, sizeof load_error,                        \
			 LIBTPMS_SONAME " has no %s (too old a libtpms?)", #name); \
		return NULL;                                                   \
	}
	ENGINE_FUNCS(RESOLVE)
#undef RESOLVE
	return NULL;
}

__attribute__((constructor)) static void start_loading(void)
{
	loading = pthread_create(&loader, NULL, load, NULL) == 0;
}

static void finish_loading(void)
{
	if (loading)
		pthread_join(loader, NULL);
	else
		load(NULL);
}

const char *vtpm_engine_load(void)
{
	pthread_once(&loaded, finish_loading);
	return load_error[0] != '\0' ? load_error : NULL;
}

// The calls; the Go side calls vtpm_engine_load successfully first.

uint32_t vtpm_TPMLIB_GetVersion(void) { return lib.TPMLIB_GetVersion(); }

TPM_RESULT vtpm_TPMLIB_ChooseTPMVersion(TPMLIB_TPMVersion ver)
{
	return lib.TPMLIB_ChooseTPMVersion(ver);
}

TPM_RESULT vtpm_TPMLIB_RegisterCallbacks(struct libtpms_callbacks *cbs)
{
	return lib.TPMLIB_RegisterCallbacks(cbs);
}

TPM_RESULT vtpm_TPMLIB_MainInit(void) { return lib.TPMLIB_MainInit(); }

void vtpm_TPMLIB_Terminate(void) { lib.TPMLIB_Terminate(); }

TPM_RESULT vtpm_TPMLIB_Process(unsigned char **respbuffer, uint32_t *resp_size,
			       uint32_t *respbufsize, unsigned char *command,
			       uint32_t command_size)
{
	return lib.TPMLIB_Process(respbuffer, resp_size, respbufsize, command,
				  command_size);
}

TPM_RESULT vtpm_TPMLIB_CancelCommand(void) { return lib.TPMLIB_CancelCommand(); }

TPM_RESULT vtpm_TPMLIB_GetState(enum TPMLIB_StateType st, unsigned char **buffer,
				uint32_t *buflen)
{
	return lib.TPMLIB_GetState(st, buffer, buflen);
}

TPM_RESULT vtpm_TPMLIB_SetState(enum TPMLIB_StateType st,
				const unsigned char *buffer, uint32_t buflen)
{
	return lib.TPMLIB_SetState(st, buffer, buflen);
}

TPM_RESULT vtpm_TPMLIB_ValidateState(enum TPMLIB_StateType st, unsigned int flags)
{
	return lib.TPMLIB_ValidateState(st, flags);
}

TPM_RESULT vtpm_TPMLIB_VolatileAll_Store(unsigned char **buffer, uint32_t *buflen)
{
	return lib.TPMLIB_VolatileAll_Store(buffer, buflen);
}

uint32_t vtpm_TPMLIB_SetBufferSize(uint32_t wanted_size, uint32_t *min_size,
				   uint32_t *max_size)
{
	return lib.TPMLIB_SetBufferSize(wanted_size, min_size, max_size);
}

char *vtpm_TPMLIB_GetInfo(enum TPMLIB_InfoFlags flags) { return lib.TPMLIB_GetInfo(flags); }

void vtpm_TPMLIB_SetDebugFD(int fd) { lib.TPMLIB_SetDebugFD(fd); }

void vtpm_TPMLIB_SetDebugLevel(unsigned int level) { lib.TPMLIB_SetDebugLevel(level); }

TPM_RESULT vtpm_TPMLIB_SetDebugPrefix(const char *prefix)
{
	return lib.TPMLIB_SetDebugPrefix(prefix);
}

TPM_RESULT vtpm_TPM_IO_TpmEstablished_Get(TPM_BOOL *tpmEstablished)
{
	return lib.TPM_IO_TpmEstablished_Get(tpmEstablished);
}

TPM_RESULT vtpm_TPM_IO_TpmEstablished_Reset(void)
{
	return lib.TPM_IO_TpmEstablished_Reset();
}

TPM_RESULT vtpm_TPM_IO_Hash_Start(void) { return lib.TPM_IO_Hash_Start(); }

TPM_RESULT vtpm_TPM_IO_Hash_Data(const unsigned char *data, uint32_t data_length)
{
	return lib.TPM_IO_Hash_Data(data, data_length);
}

TPM_RESULT vtpm_TPM_IO_Hash_End(void) { return lib.TPM_IO_Hash_End(); }
