// Package instance runs one vTPM: libtpms, its state store, and the
// swtpm-compatible control and data channels that QEMU and the tools use.
package instance

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"sync"
	"syscall"

	"github.com/google/go-tpm/tpm2"

	"vtpm/internal/libtpms"
	"vtpm/internal/sandbox"
	"vtpm/internal/seal"
	"vtpm/internal/secret"
	"vtpm/internal/state"
	"vtpm/internal/swtpm"
	"vtpm/internal/swtpm/statefile"
	"vtpm/internal/tpmrc"
)

// Instance is one running vTPM.
type Instance struct {
	opts    *swtpm.Options    // swtpm's command line
	ext     *swtpm.Extensions // vtpm's own options
	log     *slog.Logger
	tpm     *libtpms.TPM
	store   state.Storage
	swap    *swapStore  // sealed format: in.store, switched by an adoption
	sealed  *seal.Store // sealed format: the TPM's store
	fileKey *statefile.Key
	migKey  *statefile.Key
	migMem  *secret.Bytes // the migration key derived from the data key, if any
	sealing *sealingKey   // sealed format only
	sandbox *sandbox.Sandbox

	ctrlLn net.Listener // nil when the ctrl channel is a connected fd
	dataLn net.Listener
	unlink []string // socket files to remove on exit

	chardev *os.File // swtpm chardev's data channel

	mu       sync.Mutex
	dataConn net.Conn // the current data connection, if any
	// lastShutdown records whether the last TPM command was TPM2_Shutdown,
	// so that stopping the TPM can send one first (as swtpm >= 0.8 does) and
	// an unclean VM stop does not count against dictionary-attack lockout.
	lastShutdown bool

	idle *idleTrim // gives back the code's pages while no command comes

	done     chan struct{}
	doneOnce sync.Once
	err      error

	// OnReady, if set, runs once the vTPM serves its channels.
	OnReady func()
}

// New prepares an instance from a parsed command line (swtpm's options and
// vtpm's extensions): keys, the state store (verified readable), libtpms,
// and the listening sockets. Nothing is served until Run.
func New(opts *swtpm.Options, ext *swtpm.Extensions, log *slog.Logger) (_ *Instance, err error) {
	in := &Instance{opts: opts, ext: ext, log: log, done: make(chan struct{})}
	defer func() {
		if err != nil {
			in.cleanup()
		}
	}()
	// A --runas that would not drop privileges (root, ids that do not
	// parse) is refused before anything is opened or created.
	if opts.RunAs != "" {
		if _, _, err := sandbox.LookupUser(opts.RunAs); err != nil {
			return nil, err
		}
	}
	// The sockets come first, before the keys (a keystore sealed to the
	// host's TPM, or the host service's round trip, may take a while):
	// clients that wait for the control socket to appear find it, and
	// their requests wait in its backlog until Run serves them. A socket
	// that cannot be made yet (its directory is the state directory, made
	// with the TPM) is made after the keys, as before.
	if lerr := in.listen(); lerr != nil {
		log.Debug("sockets made after the keys", "err", lerr)
	}
	// What the confined process needs of the data root is made to exist
	// first: it may then write only its own generation record there.
	format, err := state.ChooseExplicit(opts.StateDir, opts.Key != "", state.Format(ext.StateFormat))
	if err != nil {
		return nil, err
	}
	var genRecord string
	if format == state.Sealed {
		// Only a TPM whose migration key is derived from its data key can
		// be adopted from a migration stream.
		adoptable := ext.DataKey == "" && opts.MigrationKey == ""
		if in.sealing, genRecord, err = openSealed(opts.StateDir, ext.DataKey, opts.RunAs, ext.AllowRollback, adoptable, log); err != nil {
			return nil, err
		}
	}
	// Sandbox, step 1 (internal/sandbox): confines this process to writing
	// its own state, re-executing it where the threads cannot be confined in
	// place (the re-executed image makes its sockets again, inside the
	// sandbox, which allows exactly those), so it comes before anything
	// else is read.
	if in.sandbox, err = sandbox.Enter(SandboxPolicy(opts, ext.Isolation, genRecord), log); err != nil {
		return nil, err
	}
	if opts.Key != "" {
		if in.fileKey, err = statefile.ParseKeyOption(opts.Key); err != nil {
			return nil, fmt.Errorf("--key: %w", err)
		}
	}
	if opts.MigrationKey != "" {
		if in.migKey, err = statefile.ParseKeyOption(opts.MigrationKey); err != nil {
			return nil, fmt.Errorf("--migration-key: %w", err)
		}
	}
	if format == state.Sealed {
		if ext.DataKey != "" {
			if err = in.sealing.readDataKey(ext.DataKey); err != nil {
				return nil, err
			}
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
	var opened *state.Opened
	if opts.StateFile != "" {
		// swtpm's file backend may be a block device only root can open
		// (a loop device, a Proxmox tpmstate volume): it is opened and
		// locked before privileges are dropped.
		if opened, err = openStore(opts, format, in.fileKey, in.sealing, ext.AllowRollback, log); err != nil {
			return nil, err
		}
		in.store = opened.Storage
	}
	if opts.RunAs != "" {
		if err = dropPrivileges(opts.RunAs, opts.StateDir, opts.StateFile); err != nil {
			return nil, err
		}
	}
	if opened == nil {
		if opened, err = openStore(opts, format, in.fileKey, in.sealing, ext.AllowRollback, log); err != nil {
			return nil, err
		}
		in.store = opened.Storage
	}
	if format == state.Sealed && opened.Store != nil {
		in.sealed = opened.Store
		in.swap = &swapStore{s: opened.Storage}
		in.store = in.swap
	}
	if in.tpm, err = libtpms.Open(in.store); err != nil {
		return nil, err
	}
	log.Info("vTPM ready", "state", opts.StateDir, "format", format)
	return in, nil
}

// PrintStates lists the stored state blobs as swtpm --print-states does.
// Sealed state is listed without its key.
func PrintStates(opts *swtpm.Options, ext *swtpm.Extensions, log *slog.Logger, w io.Writer) error {
	if opts.StateDir != "" {
		if _, err := os.Stat(opts.StateDir); err != nil {
			return fmt.Errorf("TPM state directory: %w", err)
		}
	}
	var (
		list []state.StateInfo
		err  error
	)
	format, err := state.ChooseExplicit(opts.StateDir, opts.Key != "", state.Format(ext.StateFormat))
	if err != nil {
		return err
	}
	if format == state.Sealed {
		list, err = state.ListSealed(opts.StateDir)
	} else {
		var fileKey *statefile.Key
		if opts.Key != "" {
			if fileKey, err = statefile.ParseKeyOption(opts.Key); err != nil {
				return fmt.Errorf("--key: %w", err)
			}
		}
		var s *state.Opened
		if s, err = openStore(opts, state.Swtpm, fileKey, nil, false, log); err != nil {
			return err
		}
		defer s.Close()
		list, err = s.States()
	}
	if err != nil {
		return err
	}
	var st []swtpm.StateInfo
	for _, x := range list {
		st = append(st, swtpm.StateInfo{Name: x.Name, Size: x.Size})
	}
	_, err = fmt.Fprintln(w, swtpm.StatesJSON(st))
	return err
}

// Run serves the channels until CMD_SHUTDOWN, --terminate, a fatal error, or
// ctx is cancelled. It writes the pid file once the TPM is ready.
func (in *Instance) Run(ctx context.Context) error {
	defer in.cleanup()
	if in.opts.NotNeedInit {
		in.sealing.dropAdopter()
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
	in.idle = newIdleTrim(in.log)
	if in.opts.Ctrl != nil {
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
	in.idle.stop()
	if in.tpm != nil {
		in.stopTPM()
		in.tpm.Close()
	}
	if in.store != nil {
		in.store.Close()
	}
	in.sealing.close()
	in.migMem.Close()
	if in.chardev != nil {
		in.chardev.Close()
	}
	for _, ln := range []net.Listener{in.ctrlLn, in.dataLn} {
		if ln != nil {
			ln.Close()
		}
	}
	for _, p := range in.unlink {
		os.Remove(p)
	}
	if in.opts.PidFile != "" {
		os.Remove(in.opts.PidFile)
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
		// Save the state if the TPM can; else an orderly CLEAR shutdown.
		for _, su := range []tpm2.TPMSU{tpm2.TPMSUState, tpm2.TPMSUClear} {
			if _, err := (tpm2.Shutdown{ShutdownType: su}).Execute(in.tpm); err == nil {
				break
			}
		}
	}
	in.tpm.Terminate()
}

// startup sends TPM2_Startup as --flags startup-* asks.
func (in *Instance) startup() error {
	var su tpm2.TPMSU
	switch in.opts.Startup {
	case "clear":
		su = tpm2.TPMSUClear
	case "state":
		su = tpm2.TPMSUState
	default:
		return nil
	}
	_, err := (tpm2.Startup{StartupType: su}).Execute(in.tpm)
	if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) { // TPM_RC_INITIALIZE: already started
		var rc tpm2.TPMRC
		if errors.As(err, &rc) {
			return fmt.Errorf("TPM2_Startup(%s) failed with TPM response code 0x%x: %w", in.opts.Startup, uint32(rc), err)
		}
		return fmt.Errorf("TPM2_Startup: %w", err)
	}
	return nil
}

func (in *Instance) writePid() error {
	pid := []byte(strconv.Itoa(os.Getpid()))
	if in.opts.PidFile != "" {
		// Written into the file, not renamed over it, as swtpm does:
		// swtpm_setup makes the file itself and watches its size through
		// the descriptor it holds. Never through a link.
		f, err := os.OpenFile(in.opts.PidFile, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
		if err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
		_, err = f.Write(pid)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("write pid file: %w", err)
		}
	}
	if in.opts.PidFD >= 0 {
		f := os.NewFile(uintptr(in.opts.PidFD), "pid")
		_, err := f.Write(pid)
		f.Close()
		if err != nil {
			return fmt.Errorf("write pid to fd %d: %w", in.opts.PidFD, err)
		}
	}
	return nil
}

// tpmHeaderSize is a TPM 2.0 command's or response's header: tag (u16),
// size (u32), command or response code (u32).
const tpmHeaderSize = 10

// commandCode returns cmd's command code, or false when cmd is shorter than
// a header.
func commandCode(cmd []byte) (tpm2.TPMCC, bool) {
	if len(cmd) < tpmHeaderSize {
		return 0, false
	}
	return tpm2.TPMCC(binary.BigEndian.Uint32(cmd[6:tpmHeaderSize])), true
}

// responseCode returns rsp's response code, or false when rsp is shorter
// than a header.
func responseCode(rsp []byte) (tpmrc.Code, bool) {
	if len(rsp) < tpmHeaderSize {
		return 0, false
	}
	return tpmrc.Code(binary.BigEndian.Uint32(rsp[6:tpmHeaderSize])), true
}

// process runs one TPM command from the data channel.
func (in *Instance) process(req *swtpm.DataRequest) []byte {
	in.idle.command()
	if req.Prefixed {
		in.tpm.SetLocality(req.Locality)
	}
	if !in.tpm.Running() {
		return swtpm.NotInitialized
	}
	cmd := req.Cmd
	cc, whole := commandCode(cmd)
	if whole && cc == swtpm.CCSetLocality && in.opts.AllowSetLoc {
		// The locality is the command's one-byte parameter.
		if len(cmd) < tpmHeaderSize+1 || cmd[tpmHeaderSize] > 4 {
			return swtpm.TPMResponse(tpmrc.TPMRCValue | tpmrc.TPMRCP | tpmrc.TPMRC1)
		}
		in.tpm.SetLocality(cmd[tpmHeaderSize])
		return swtpm.TPMResponse(tpmrc.TPMRCSuccess)
	}
	rsp, err := in.tpm.Process(cmd)
	if err != nil {
		in.log.Error("TPM command failed", "err", err)
		return swtpm.TPMResponse(tpmrc.TPMRCFailure)
	}
	rc, ok := responseCode(rsp)
	in.mu.Lock()
	in.lastShutdown = whole && cc == tpm2.TPMCCShutdown && ok && rc == tpmrc.TPMRCSuccess
	in.mu.Unlock()
	return rsp
}
