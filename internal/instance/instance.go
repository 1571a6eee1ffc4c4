// Package instance runs one vTPM: libtpms, its state store, and the
// swtpm-compatible control and data channels that QEMU and the tools use.
package instance

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"

	"vtpm/internal/libtpms"
	"vtpm/internal/sandbox"
	"vtpm/internal/seal"
	"vtpm/internal/secret"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
)

// Instance is one running vTPM.
type Instance struct {
	cfg     *swtpm.Config
	log     *slog.Logger
	tpm     *libtpms.TPM
	store   store
	format  Format
	fileKey *statefile.Key
	migKey  *statefile.Key
	migMem  *secret.Bytes // the migration key derived from the data key, if any
	sealing *sealingKey   // sealed format only
	sandbox *sandbox.Sandbox

	ctrlLn net.Listener // nil when the ctrl channel is a connected fd
	dataLn net.Listener
	unlink []string // socket files to remove on exit

	mu       sync.Mutex
	dataConn net.Conn // the current data connection, if any
	// lastShutdown records whether the last TPM command was TPM2_Shutdown,
	// so that stopping the TPM can send one first (as swtpm >= 0.8 does) and
	// an unclean VM stop does not count against dictionary-attack lockout.
	lastShutdown bool

	done     chan struct{}
	doneOnce sync.Once
	err      error

	// OnReady, if set, runs once the vTPM serves its channels.
	OnReady func()
}

// New prepares an instance from a parsed command line: keys, the state store
// (verified readable), libtpms, and the listening sockets. Nothing is served
// until Run.
func New(cfg *swtpm.Config, log *slog.Logger) (_ *Instance, err error) {
	in := &Instance{cfg: cfg, log: log, done: make(chan struct{})}
	defer func() {
		if err != nil {
			in.cleanup()
		}
	}()
	// A --runas that would not drop privileges (root, ids that do not
	// parse) is refused before anything is opened or created.
	if cfg.RunAs != "" {
		if _, _, err := sandbox.LookupUser(cfg.RunAs); err != nil {
			return nil, err
		}
	}
	// What the confined process needs of the data root is made to exist
	// first: it may then write only its own generation record there.
	in.format = chooseFormat(cfg)
	var genRecord string
	if in.format == FormatSealed {
		if genRecord, err = prepareSealed(cfg, log); err != nil {
			return nil, err
		}
	}
	// Sandbox, step 1 (internal/sandbox): re-executes this process confined
	// to writing its own state, so it comes before anything is read or bound.
	if in.sandbox, err = sandbox.Enter(sandbox.ForInstance(cfg, genRecord), log); err != nil {
		return nil, err
	}
	if cfg.Key != "" {
		if in.fileKey, err = statefile.ParseKeyOption(cfg.Key); err != nil {
			return nil, fmt.Errorf("--key: %w", err)
		}
	}
	if cfg.MigrationKey != "" {
		if in.migKey, err = statefile.ParseKeyOption(cfg.MigrationKey); err != nil {
			return nil, fmt.Errorf("--migration-key: %w", err)
		}
	}
	// Keys first: a TPM this host cannot open fails before any socket exists.
	if in.format == FormatSealed {
		if in.sealing, err = unlockSealed(cfg, log); err != nil {
			return nil, err
		}
		// The key broker keeps the key in locked memory if the host lets it.
		if err = in.sandbox.KeyMemory(in.sealing.key.LockErr()); err != nil {
			return nil, err
		}
		if in.migKey == nil {
			// Only a host that can open this TPM's key can read its migration stream.
			if in.migMem, err = in.sealing.key.MigrationKey(); err != nil {
				return nil, err
			}
			in.migKey = &statefile.Key{Bytes: in.migMem.Bytes()}
		}
	}
	if err = in.listen(); err != nil {
		return nil, err
	}
	if cfg.RunAs != "" {
		if err = dropPrivileges(cfg.RunAs, cfg.StateDir); err != nil {
			return nil, err
		}
	}
	if in.store, err = openStore(cfg, in.format, in.fileKey, in.sealing, log); err != nil {
		return nil, err
	}
	if in.tpm, err = libtpms.Open(in.store); err != nil {
		return nil, err
	}
	log.Info("vTPM ready", "state", cfg.StateDir, "format", in.format)
	return in, nil
}

// PrintStates lists the stored state blobs as swtpm --print-states does.
// Sealed state is listed without its key.
func PrintStates(cfg *swtpm.Config, log *slog.Logger, w io.Writer) error {
	if cfg.StateDir != "" {
		if _, err := os.Stat(cfg.StateDir); err != nil {
			return fmt.Errorf("TPM state directory: %w", err)
		}
	}
	var st []swtpm.StateInfo
	if chooseFormat(cfg) == FormatSealed {
		list, err := seal.ListStates(cfg.StateDir)
		if err != nil {
			return err
		}
		for _, x := range list {
			st = append(st, swtpm.StateInfo{Name: x.Name, Size: x.Size})
		}
	} else {
		var fileKey *statefile.Key
		if cfg.Key != "" {
			var err error
			if fileKey, err = statefile.ParseKeyOption(cfg.Key); err != nil {
				return fmt.Errorf("--key: %w", err)
			}
		}
		s, err := openStore(cfg, FormatSwtpm, fileKey, nil, log)
		if err != nil {
			return err
		}
		defer s.Close()
		list, err := s.(statefile.Storage).States()
		if err != nil {
			return err
		}
		for _, x := range list {
			st = append(st, swtpm.StateInfo{Name: x.Name, Size: x.Size})
		}
	}
	_, err := fmt.Fprintln(w, swtpm.StatesJSON(st))
	return err
}

// Run serves the channels until CMD_SHUTDOWN, --terminate, a fatal error, or
// ctx is cancelled. It writes the pid file once the TPM is ready.
func (in *Instance) Run(ctx context.Context) error {
	defer in.cleanup()
	if in.cfg.NotNeedInit {
		if err := in.tpm.Init(); err != nil {
			return fmt.Errorf("start TPM: %w", err)
		}
		if err := in.startup(); err != nil {
			return err
		}
	}
	if err := in.writePid(); err != nil {
		return err
	}
	// Sandbox, step 2: the seccomp allow-list, before any client is served.
	if err := in.sandbox.Seal(); err != nil {
		return err
	}
	if in.cfg.Ctrl != nil {
		if err := in.startCtrl(); err != nil {
			return err
		}
	}
	if err := in.startData(); err != nil {
		return err
	}
	if in.OnReady != nil {
		in.OnReady()
	}
	select {
	case <-ctx.Done():
		in.log.Info("stopping on signal")
	case <-in.done:
	}
	return in.err
}

// finish ends Run with err (nil for a clean exit).
func (in *Instance) finish(err error) {
	in.doneOnce.Do(func() {
		in.err = err
		close(in.done)
	})
}

func (in *Instance) cleanup() {
	if in.tpm != nil {
		in.stopTPM()
		in.tpm.Close()
	}
	if in.store != nil {
		in.store.Close()
	}
	in.sealing.close()
	in.migMem.Close()
	for _, ln := range []net.Listener{in.ctrlLn, in.dataLn} {
		if ln != nil {
			ln.Close()
		}
	}
	for _, p := range in.unlink {
		os.Remove(p)
	}
	if in.cfg.PidFile != "" {
		os.Remove(in.cfg.PidFile)
	}
	in.sandbox.Close() // wipes the locked key material
}

// stopTPM shuts the TPM down orderly (unless the OS already did) and terminates it.
func (in *Instance) stopTPM() {
	if !in.tpm.Running() {
		return
	}
	in.mu.Lock()
	orderly := in.lastShutdown
	in.mu.Unlock()
	if !orderly {
		for _, su := range []uint16{1, 0} { // TPM_SU_STATE, then TPM_SU_CLEAR
			rsp, err := in.tpm.Process(shutdownCmd(su))
			if err == nil && len(rsp) >= 10 && binary.BigEndian.Uint32(rsp[6:]) == 0 {
				break
			}
		}
	}
	in.tpm.Terminate()
}

func shutdownCmd(su uint16) []byte {
	b := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x45, 0, 0}
	binary.BigEndian.PutUint16(b[10:], su)
	return b
}

// startup sends TPM2_Startup as --flags startup-* asks.
func (in *Instance) startup() error {
	var su uint16
	switch in.cfg.Startup {
	case "clear":
		su = 0
	case "state":
		su = 1
	default:
		return nil
	}
	cmd := []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}
	binary.BigEndian.PutUint16(cmd[10:], su)
	rsp, err := in.tpm.Process(cmd)
	if err != nil {
		return fmt.Errorf("TPM2_Startup: %w", err)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:]); rc != 0 && rc != 0x100 { // 0x100: already started
		return fmt.Errorf("TPM2_Startup(%s) failed with TPM response code 0x%x", in.cfg.Startup, rc)
	}
	return nil
}

func (in *Instance) writePid() error {
	pid := []byte(strconv.Itoa(os.Getpid()))
	if in.cfg.PidFile != "" {
		tmp := in.cfg.PidFile + ".tmp"
		if err := os.WriteFile(tmp, pid, 0o644); err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
		if err := os.Rename(tmp, in.cfg.PidFile); err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
	}
	if in.cfg.PidFD >= 0 {
		f := os.NewFile(uintptr(in.cfg.PidFD), "pid")
		_, err := f.Write(pid)
		f.Close()
		if err != nil {
			return fmt.Errorf("write pid to fd %d: %w", in.cfg.PidFD, err)
		}
	}
	return nil
}

// process runs one TPM command from the data channel.
func (in *Instance) process(req *swtpm.DataRequest) []byte {
	if req.Prefixed {
		in.tpm.SetLocality(req.Locality)
	}
	if !in.tpm.Running() {
		return swtpm.NotInitialized
	}
	cmd := req.Cmd
	if len(cmd) >= 10 && binary.BigEndian.Uint32(cmd[6:]) == swtpm.CCSetLocality && in.cfg.AllowSetLoc {
		if len(cmd) < 11 || cmd[10] > 4 {
			return swtpm.TPMResponse(0x1C4) // TPM_RC_VALUE | parameter 1
		}
		in.tpm.SetLocality(cmd[10])
		return swtpm.TPMResponse(0)
	}
	rsp, err := in.tpm.Process(cmd)
	if err != nil {
		in.log.Error("TPM command failed", "err", err)
		return swtpm.TPMResponse(0x101)
	}
	in.mu.Lock()
	in.lastShutdown = len(cmd) >= 10 && binary.BigEndian.Uint32(cmd[6:]) == 0x145 &&
		len(rsp) >= 10 && binary.BigEndian.Uint32(rsp[6:]) == 0
	in.mu.Unlock()
	return rsp
}
