package libtpms

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"sync"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/tpmrc"
)

// memStorage keeps blobs in memory and records what libtpms asked for.
type memStorage struct {
	mu      sync.Mutex
	blobs   map[string][]byte
	loads   map[string]int
	stores  map[string]int
	loadErr map[string]error // injected Load failures
	initErr error            // injected Init failure
	panicOn string           // name whose Load panics
}

func newMemStorage() *memStorage {
	return &memStorage{
		blobs:   map[string][]byte{},
		loads:   map[string]int{},
		stores:  map[string]int{},
		loadErr: map[string]error{},
	}
}

func (m *memStorage) Init() error { return m.initErr }

func (m *memStorage) Load(name string) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.loads[name]++
	if name == m.panicOn {
		panic("storage exploded")
	}
	if err := m.loadErr[name]; err != nil {
		return nil, err
	}
	b, ok := m.blobs[name]
	if !ok {
		return nil, fmt.Errorf("load %s: %w", name, fs.ErrNotExist)
	}
	return bytes.Clone(b), nil
}

func (m *memStorage) Store(name string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.stores[name]++
	m.blobs[name] = bytes.Clone(data)
	return nil
}

func (m *memStorage) Delete(name string, mustExist bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.blobs[name]; !ok && mustExist {
		return fmt.Errorf("delete %s: %w", name, fs.ErrNotExist)
	}
	delete(m.blobs, name)
	return nil
}

func (m *memStorage) blob(name string) []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return bytes.Clone(m.blobs[name])
}

func (m *memStorage) counts(name string) (loads, stores int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.loads[name], m.stores[name]
}

// openTPM opens the process's TPM over s and closes it when the test ends.
func openTPM(t *testing.T, s Storage) *TPM {
	t.Helper()
	tpm, err := Open(s)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(tpm.Close)
	return tpm
}

// startTPM opens a TPM over s, initialises it and runs TPM2_Startup(CLEAR).
func startTPM(t *testing.T, s Storage) *TPM {
	t.Helper()
	tpm := openTPM(t, s)
	if err := tpm.Init(); err != nil {
		t.Fatalf("Init: %v", err)
	}
	startup(t, tpm)
	return tpm
}

func startup(t *testing.T, tpm *TPM) {
	t.Helper()
	if _, err := (tpm2.Startup{StartupType: tpm2.TPMSUClear}).Execute(tpm); err != nil {
		t.Fatalf("TPM2_Startup: %v", err)
	}
}

func readPCR(t *testing.T, tpm *TPM, pcr uint) []byte {
	t.Helper()
	rsp, err := tpm2.PCRRead{
		PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
			Hash:      tpm2.TPMAlgSHA256,
			PCRSelect: tpm2.PCClientCompatible.PCRs(pcr),
		}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_PCR_Read(%d): %v", pcr, err)
	}
	if len(rsp.PCRValues.Digests) != 1 {
		t.Fatalf("TPM2_PCR_Read(%d) returned %d digests, want 1", pcr, len(rsp.PCRValues.Digests))
	}
	return rsp.PCRValues.Digests[0].Buffer
}

func extendPCR(t *testing.T, tpm *TPM, pcr uint, digest []byte) {
	t.Helper()
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{
			HashAlg: tpm2.TPMAlgSHA256,
			Digest:  digest,
		}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_PCR_Extend(%d): %v", pcr, err)
	}
}

// extended is PCR extend over SHA-256: H(old || digest).
func extended(old, digest []byte) []byte {
	h := sha256.Sum256(append(bytes.Clone(old), digest...))
	return h[:]
}

func TestVersion(t *testing.T) {
	if v := Version(); v>>16 != 0 || (v>>8)&0xff < 9 {
		t.Errorf("Version() = %#x, want libtpms 0.9 or later", v)
	}
}

func TestStateTypeName(t *testing.T) {
	for _, tc := range []struct {
		typ  StateType
		want string
	}{
		{Permanent, "permall"},
		{Volatile, "volatilestate"},
		{SaveState, "savestate"},
	} {
		if got := tc.typ.Name(); got != tc.want {
			t.Errorf("StateType(%d).Name() = %q, want %q", tc.typ, got, tc.want)
		}
	}
}

func TestFreshTPMIsManufacturedAndStored(t *testing.T) {
	s := newMemStorage()
	tpm := openTPM(t, s)
	if tpm.Running() {
		t.Fatal("Running() before Init = true")
	}
	if err := tpm.Init(); err != nil {
		t.Fatalf("Init: %v", err)
	}
	if !tpm.Running() {
		t.Fatal("Running() after Init = false")
	}
	startup(t, tpm)
	loads, stores := s.counts("permall")
	if loads == 0 {
		t.Error("libtpms never tried to load permall")
	}
	if stores == 0 || len(s.blob("permall")) == 0 {
		t.Errorf("permall stored %d times (%d bytes), want a manufactured blob", stores, len(s.blob("permall")))
	}
	tpm.Terminate()
	if tpm.Running() {
		t.Error("Running() after Terminate = true")
	}
}

func TestCommands(t *testing.T) {
	tpm := startTPM(t, newMemStorage())

	rnd, err := tpm2.GetRandom{BytesRequested: 16}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_GetRandom: %v", err)
	}
	if len(rnd.RandomBytes.Buffer) != 16 {
		t.Errorf("TPM2_GetRandom returned %d bytes, want 16", len(rnd.RandomBytes.Buffer))
	}

	before := readPCR(t, tpm, 16)
	if !bytes.Equal(before, make([]byte, sha256.Size)) {
		t.Fatalf("PCR16 after Startup = %x, want zeros", before)
	}
	digest := sha256.Sum256([]byte("measured"))
	extendPCR(t, tpm, 16, digest[:])
	if got, want := readPCR(t, tpm, 16), extended(before, digest[:]); !bytes.Equal(got, want) {
		t.Errorf("PCR16 after extend = %x, want %x", got, want)
	}
}

func TestProcessNeedsRunningTPM(t *testing.T) {
	tpm := openTPM(t, newMemStorage())
	if _, err := tpm.Process([]byte{0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 0x7b}); !errors.Is(err, ErrNotRunning) {
		t.Errorf("Process before Init: err = %v, want ErrNotRunning", err)
	}
	if err := tpm.HashStart(); !errors.Is(err, ErrNotRunning) {
		t.Errorf("HashStart before Init: err = %v, want ErrNotRunning", err)
	}
}

func TestMalformedCommandGetsTPMError(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	rsp, err := tpm.Process([]byte{0x80, 0x01, 0, 0})
	if err != nil {
		t.Fatalf("Process(short command): %v", err)
	}
	if len(rsp) != 10 || bytes.Equal(rsp[6:10], []byte{0, 0, 0, 0}) {
		t.Errorf("Process(short command) = %x, want a 10-byte error response", rsp)
	}
}

func nvIndexDef(index tpm2.TPMHandle, size uint16) tpm2.NVDefineSpace {
	return tpm2.NVDefineSpace{
		AuthHandle: tpm2.TPMRHOwner,
		PublicInfo: tpm2.New2B(tpm2.TPMSNVPublic{
			NVIndex: index,
			NameAlg: tpm2.TPMAlgSHA256,
			Attributes: tpm2.TPMANV{
				OwnerWrite: true,
				OwnerRead:  true,
				NT:         tpm2.TPMNTOrdinary,
				NoDA:       true,
			},
			DataSize: size,
		}),
	}
}

func nvRead(t *testing.T, tpm *TPM, index tpm2.TPMHandle, size uint16) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: index}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_NV_ReadPublic: %v", err)
	}
	rsp, err := tpm2.NVRead{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: index, Name: pub.NVName},
		Size:       size,
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_NV_Read: %v", err)
	}
	return rsp.Data.Buffer
}

func TestNVSurvivesRestartFromStoredPermall(t *testing.T) {
	const index = tpm2.TPMHandle(0x01500001)
	value := []byte("sealed")
	s := newMemStorage()
	tpm := startTPM(t, s)

	def := nvIndexDef(index, uint16(len(value)))
	if _, err := def.Execute(tpm); err != nil {
		t.Fatalf("TPM2_NV_DefineSpace: %v", err)
	}
	pub, err := def.PublicInfo.Contents()
	if err != nil {
		t.Fatal(err)
	}
	name, err := tpm2.NVName(pub)
	if err != nil {
		t.Fatal(err)
	}
	_, err = tpm2.NVWrite{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NVIndex:    tpm2.NamedHandle{Handle: index, Name: *name},
		Data:       tpm2.TPM2BMaxNVBuffer{Buffer: value},
	}.Execute(tpm)
	if err != nil {
		t.Fatalf("TPM2_NV_Write: %v", err)
	}

	// Power cycle: volatile state is gone, NV must come back from "permall".
	tpm.Terminate()
	loadsBefore, _ := s.counts("permall")
	if err := tpm.Init(); err != nil {
		t.Fatalf("Init after Terminate: %v", err)
	}
	if loads, _ := s.counts("permall"); loads == loadsBefore {
		t.Error("Init did not load permall from storage")
	}
	startup(t, tpm)
	if got := nvRead(t, tpm, index, uint16(len(value))); !bytes.Equal(got, value) {
		t.Errorf("NV_Read after restart = %q, want %q", got, value)
	}

	// A new TPM in the process sees only what the storage holds.
	tpm.Close()
	tpm = startTPM(t, s)
	if got := nvRead(t, tpm, index, uint16(len(value))); !bytes.Equal(got, value) {
		t.Errorf("NV_Read after reopen = %q, want %q", got, value)
	}
}

func TestStateRoundTripResumesPCRs(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	digest := sha256.Sum256([]byte("before migration"))
	extendPCR(t, tpm, 10, digest[:])
	want := readPCR(t, tpm, 10)

	perm, err := tpm.GetState(Permanent)
	if err != nil {
		t.Fatalf("GetState(Permanent): %v", err)
	}
	vol, err := tpm.GetState(Volatile)
	if err != nil {
		t.Fatalf("GetState(Volatile): %v", err)
	}
	if len(perm) == 0 || len(vol) == 0 {
		t.Fatalf("GetState returned %d permanent and %d volatile bytes", len(perm), len(vol))
	}
	if all, err := tpm.VolatileAllStore(); err != nil || len(all) == 0 {
		t.Errorf("VolatileAllStore = %d bytes, %v", len(all), err)
	}
	if err := tpm.SetState(Permanent, perm); !errors.Is(err, tpmrc.TPMInvalidPostInit) {
		t.Errorf("SetState while running: err = %v, want tpmrc.TPMInvalidPostInit", err)
	}
	tpm.Close()

	// The destination has empty storage: everything comes from SetState.
	dst := newMemStorage()
	tpm = openTPM(t, dst)
	if err := tpm.SetState(Permanent, perm); err != nil {
		t.Fatalf("SetState(Permanent): %v", err)
	}
	if err := tpm.SetState(Volatile, vol); err != nil {
		t.Fatalf("SetState(Volatile): %v", err)
	}
	if got, err := tpm.GetState(Permanent); err != nil || !bytes.Equal(got, perm) {
		t.Errorf("GetState(Permanent) while stopped = %d bytes, %v; want the cached blob", len(got), err)
	}
	if err := tpm.Init(); err != nil {
		t.Fatalf("Init from SetState blobs: %v", err)
	}
	// No TPM2_Startup: the volatile state resumes the started TPM.
	if got := readPCR(t, tpm, 10); !bytes.Equal(got, want) {
		t.Errorf("PCR10 after resume = %x, want %x", got, want)
	}
	if len(dst.blob("permall")) == 0 {
		t.Error("Init from a SetState blob did not store permall")
	}
}

func TestSetStateRejects(t *testing.T) {
	tpm := openTPM(t, newMemStorage())
	for _, tc := range []struct {
		name string
		typ  StateType
		data []byte
	}{
		{"garbage permanent", Permanent, []byte("not a TPM state")},
		{"volatile without permanent", Volatile, []byte("whatever")},
		{"savestate on TPM 2", SaveState, []byte{1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r tpmrc.Code
			if err := tpm.SetState(tc.typ, tc.data); !errors.As(err, &r) {
				t.Errorf("SetState: err = %v, want a tpmrc.Code", err)
			}
		})
	}
	if err := tpm.SetState(Permanent, nil); err != nil {
		t.Errorf("SetState(nil) clears the cache: err = %v", err)
	}
}

func TestValidateState(t *testing.T) {
	s := newMemStorage()
	tpm := startTPM(t, s)
	if err := tpm.ValidateState(Permanent); !errors.Is(err, ErrRunning) {
		t.Errorf("ValidateState while running: err = %v, want ErrRunning", err)
	}
	tpm.Terminate()
	if err := tpm.ValidateState(Permanent); err != nil {
		t.Errorf("ValidateState(stored permall): %v", err)
	}
	s.Store("permall", []byte("corrupt"))
	if err := tpm.ValidateState(Permanent); err == nil {
		t.Error("ValidateState(corrupt permall) succeeded")
	}
}

func TestSetBufferSize(t *testing.T) {
	tpm := openTPM(t, newMemStorage())
	t.Cleanup(func() { tpm.SetBufferSize(4096) })
	for _, tc := range []struct {
		wanted, want uint32
	}{
		{100, 2808},
		{3000, 3000},
		{0, 3000}, // query keeps the last setting
		{10000, 4096},
		{4096, 4096},
	} {
		size, lo, hi := tpm.SetBufferSize(tc.wanted)
		if size != tc.want || lo != 2808 || hi != 4096 {
			t.Errorf("SetBufferSize(%d) = %d, %d, %d; want %d, 2808, 4096", tc.wanted, size, lo, hi, tc.want)
		}
	}
}

func TestGetInfo(t *testing.T) {
	tpm := openTPM(t, newMemStorage())
	for _, tc := range []struct {
		flags uint32
		key   string
	}{
		{1, "TPMSpecification"},
		{2, "TPMAttributes"},
		{4, "TPMFeatures"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			s, err := tpm.GetInfo(tc.flags)
			if err != nil {
				t.Fatalf("GetInfo(%d): %v", tc.flags, err)
			}
			var v map[string]json.RawMessage
			if err := json.Unmarshal([]byte(s), &v); err != nil {
				t.Fatalf("GetInfo(%d) = %q: %v", tc.flags, s, err)
			}
			if _, ok := v[tc.key]; !ok {
				t.Errorf("GetInfo(%d) = %s, want key %q", tc.flags, s, tc.key)
			}
		})
	}
}

func TestLocalityAndEstablished(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	if err := tpm.HashStart(); err != nil {
		t.Fatalf("HashStart: %v", err)
	}
	if err := tpm.HashEnd(); err != nil {
		t.Fatalf("HashEnd: %v", err)
	}
	if est, err := tpm.Established(); err != nil || !est {
		t.Fatalf("Established after HashStart = %v, %v; want true", est, err)
	}

	tpm.SetLocality(0)
	if err := tpm.ResetEstablished(); !errors.Is(err, tpmrc.TPMBadLocality) {
		t.Errorf("ResetEstablished at locality 0: err = %v, want tpmrc.TPMBadLocality", err)
	}
	if est, _ := tpm.Established(); !est {
		t.Error("failed ResetEstablished cleared the flag")
	}
	tpm.SetLocality(3)
	if got := tpm.Locality(); got != 3 {
		t.Errorf("Locality() = %d, want 3", got)
	}
	if err := tpm.ResetEstablished(); err != nil {
		t.Errorf("ResetEstablished at locality 3: %v", err)
	}
	if est, err := tpm.Established(); err != nil || est {
		t.Errorf("Established after reset = %v, %v; want false", est, err)
	}
}

func TestDRTMHashSequenceExtendsPCR17(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	before := readPCR(t, tpm, 17)
	data := []byte("dynamic launch")
	if err := tpm.HashStart(); err != nil {
		t.Fatalf("HashStart: %v", err)
	}
	if err := tpm.HashData(data); err != nil {
		t.Fatalf("HashData: %v", err)
	}
	if err := tpm.HashEnd(); err != nil {
		t.Fatalf("HashEnd: %v", err)
	}
	after := readPCR(t, tpm, 17)
	if bytes.Equal(before, after) {
		t.Fatalf("PCR17 unchanged by the hash sequence: %x", after)
	}
	h := sha256.Sum256(data)
	if want := extended(make([]byte, sha256.Size), h[:]); !bytes.Equal(after, want) {
		t.Errorf("PCR17 = %x, want reset-and-extend %x", after, want)
	}
	if est, err := tpm.Established(); err != nil || !est {
		t.Errorf("Established = %v, %v; want true", est, err)
	}
}

func TestLoadFailureFailsInit(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"decrypt error", fmt.Errorf("unsealing permall: %w", tpmrc.TPMDecryptError)},
		{"io error", errors.New("disk on fire")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newMemStorage()
			s.loadErr["permall"] = tc.err
			tpm := openTPM(t, s)
			var r tpmrc.Code
			if err := tpm.Init(); !errors.As(err, &r) {
				t.Fatalf("Init: err = %v, want a tpmrc.Code", err)
			}
			if tpm.Running() {
				t.Error("Running() after failed Init = true")
			}
			// Unreadable state must never be replaced by a fresh TPM.
			if _, stores := s.counts("permall"); stores != 0 {
				t.Errorf("permall stored %d times after a failed load", stores)
			}
			tpm.Close()
		})
	}
}

func TestStorageInitFailureFailsInit(t *testing.T) {
	s := newMemStorage()
	s.initErr = fmt.Errorf("locking state: %w", tpmrc.TPMIOError)
	tpm := openTPM(t, s)
	if err := tpm.Init(); !errors.Is(err, tpmrc.TPMIOError) {
		t.Errorf("Init: err = %v, want tpmrc.TPMIOError", err)
	}
}

func TestGetStateWhileStoppedReadsStorage(t *testing.T) {
	s := newMemStorage()
	tpm := openTPM(t, s)
	if _, err := tpm.GetState(Permanent); !errors.Is(err, tpmrc.TPMRetry) {
		t.Errorf("GetState with nothing stored: err = %v, want tpmrc.TPMRetry", err)
	}
	if err := tpm.Init(); err != nil {
		t.Fatalf("Init: %v", err)
	}
	startup(t, tpm)
	tpm.Terminate()
	got, err := tpm.GetState(Permanent)
	if err != nil {
		t.Fatalf("GetState(Permanent) while stopped: %v", err)
	}
	if want := s.blob("permall"); !bytes.Equal(got, want) {
		t.Errorf("GetState(Permanent) = %d bytes, want the stored %d bytes", len(got), len(want))
	}
}

// withNVIndex returns a permanent state blob holding one NV index.
func withNVIndex(t *testing.T, index tpm2.TPMHandle) []byte {
	t.Helper()
	tpm := startTPM(t, newMemStorage())
	if _, err := nvIndexDef(index, 4).Execute(tpm); err != nil {
		t.Fatalf("TPM2_NV_DefineSpace: %v", err)
	}
	perm, err := tpm.GetState(Permanent)
	if err != nil {
		t.Fatalf("GetState(Permanent): %v", err)
	}
	tpm.Close()
	return perm
}

func TestClearingCachedStateManufacturesFresh(t *testing.T) {
	const index = tpm2.TPMHandle(0x01500002)
	perm := withNVIndex(t, index)
	for _, tc := range []struct {
		name  string
		clear func(*TPM) *TPM
	}{
		{"SetState nil", func(tpm *TPM) *TPM {
			if err := tpm.SetState(Permanent, nil); err != nil {
				t.Fatalf("SetState(Permanent, nil): %v", err)
			}
			return tpm
		}},
		{"Close", func(tpm *TPM) *TPM {
			tpm.Close()
			return openTPM(t, newMemStorage())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newMemStorage()
			tpm := openTPM(t, s)
			if err := tpm.SetState(Permanent, perm); err != nil {
				t.Fatalf("SetState(Permanent): %v", err)
			}
			tpm = tc.clear(tpm)
			if err := tpm.Init(); err != nil {
				t.Fatalf("Init: %v", err)
			}
			startup(t, tpm)
			if _, err := (tpm2.NVReadPublic{NVIndex: index}).Execute(tpm); err == nil {
				t.Error("NV index from the dropped blob exists: the cached state was used")
			}
			if _, err := (tpm2.GetRandom{BytesRequested: 4}).Execute(tpm); err != nil {
				t.Errorf("fresh TPM does not work: %v", err)
			}
			tpm.Close()
		})
	}
}

func TestPanickingStorageFailsInit(t *testing.T) {
	s := newMemStorage()
	s.panicOn = "permall"
	tpm := openTPM(t, s)
	if err := tpm.Init(); err == nil {
		t.Error("Init with a panicking Load succeeded")
	}
}

func TestOneTPMPerProcess(t *testing.T) {
	tpm, err := Open(newMemStorage())
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if second, err := Open(newMemStorage()); err == nil {
		second.Close()
		t.Fatal("second Open succeeded while the first is open")
	}
	tpm.Close()
	tpm.Close() // idempotent
	if err := tpm.Init(); !errors.Is(err, ErrClosed) {
		t.Errorf("Init after Close: err = %v, want ErrClosed", err)
	}
	again, err := Open(newMemStorage())
	if err != nil {
		t.Fatalf("Open after Close: %v", err)
	}
	again.Close()
}

func TestCancelDoesNotAffectLaterCommands(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	tpm.Cancel()
	if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
		t.Errorf("TPM2_GetRandom after Cancel: %v", err)
	}
}

func TestConcurrentCommands(t *testing.T) {
	tpm := startTPM(t, newMemStorage())
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for g := range 4 {
		wg.Go(func() {
			for range 10 {
				tpm.SetLocality(uint8(g % 2))
				tpm.Cancel()
				if _, err := (tpm2.GetRandom{BytesRequested: 8}).Execute(tpm); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("concurrent TPM2_GetRandom: %v", err)
	}
}

// TestCodesMatchLibtpms: tpmrc's TPM 1.2 codes are libtpms' own values.
func TestCodesMatchLibtpms(t *testing.T) {
	for c, want := range cCodes {
		if uint32(c) != want {
			t.Errorf("%v = 0x%x, libtpms defines 0x%x", c, uint32(c), want)
		}
	}
}
