package hostsvc

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
	"vtpm/internal/seal"
	"vtpm/internal/secret"
	"vtpm/internal/state"
)

// requestTimeout bounds one connection: a caller that stalls cannot hold
// the service (which answers one request at a time).
const requestTimeout = 30 * time.Second

// Server answers vTPM processes on the host service's socket with the keys
// of the TPMs whose state directories they hold.
type Server struct {
	broker *keybroker.Broker
	users  map[uint32]bool
	cfg    Config
	log    *slog.Logger
	// Refused, when set, is told of every request refused or failed (the
	// host service's metrics count them).
	Refused func(error)
	// mu serialises requests: the keystore and new TPMs' identities are
	// changed by at most one at a time.
	mu sync.Mutex
	// held counts connections kept for a later adoption (opHold).
	held atomic.Int32
	// Releaser, when set, gets keys from the key service for TPMs that no
	// guardian of this host opens but whose protector has a fleet row.
	Releaser Releaser
}

// maxHeld bounds the connections kept for a later adoption: one per vTPM
// that started on an empty directory and has not initialised its TPM yet.
const maxHeld = 1024

// NewServer returns a server that opens keys with broker for root and the
// users cfg names.
func NewServer(broker *keybroker.Broker, cfg *Config, log *slog.Logger) *Server {
	if log == nil {
		log = slog.Default()
	}
	return &Server{broker: broker, users: cfg.uids(), cfg: *cfg, log: log}
}

// Serve answers connections on l until ctx is done or l fails; it closes l.
func (s *Server) Serve(ctx context.Context, l *net.UnixListener) error {
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			// A held connection waits without a deadline: closing it
			// ends the wait when the service stops.
			stop := context.AfterFunc(ctx, func() { c.Close() })
			defer stop()
			s.handle(c)
		}()
	}
}

// peer is who is calling.
type peer struct {
	pid      int32
	uid, gid uint32
}

func peerOf(c *net.UnixConn) (peer, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return peer{}, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return peer{}, err
	}
	if cerr != nil {
		return peer{}, cerr
	}
	return peer{pid: cred.Pid, uid: cred.Uid, gid: cred.Gid}, nil
}

func (s *Server) handle(c *net.UnixConn) {
	c.SetDeadline(time.Now().Add(requestTimeout))
	p, err := peerOf(c)
	if err != nil {
		s.log.Warn("host service: cannot read the caller's credentials", "err", err)
		return
	}
	var req request
	files, err := recv(c, &req, 1)
	if err == nil && req.Op == opPing {
		for _, f := range files {
			f.Close()
		}
		_, unknown := s.cfg.resolve()
		send(c, answer{Users: s.cfg.Users, Unknown: unknown, Admitted: s.users[p.uid]})
		return
	}
	if err == nil && req.Op == opHold {
		for _, f := range files {
			f.Close()
		}
		files, err = s.hold(c, p, &req)
		if err != nil {
			return
		}
	}
	if err != nil {
		s.log.Warn("host service: bad request", "pid", p.pid, "uid", p.uid, "err", err)
		return
	}
	var blob []byte
	if req.Op == opAdopt {
		if blob, err = readBlob(c, req.BlobLen); err != nil {
			s.log.Warn("host service: bad request", "pid", p.pid, "uid", p.uid, "err", err)
			for _, f := range files {
				f.Close()
			}
			return
		}
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	a, sent, err := s.answer(p, &req, files, blob)
	if err != nil {
		s.log.Warn("host service: refused", "pid", p.pid, "uid", p.uid, "dir", req.Dir, "err", err)
		if s.Refused != nil {
			s.Refused(err)
		}
		// Messages name the directory as the caller does.
		r := strings.NewReplacer()
		if len(files) == 1 && req.Dir != "" {
			r = strings.NewReplacer(fmt.Sprintf("/proc/self/fd/%d", files[0].Fd()), req.Dir)
		}
		send(c, answer{Error: toWire(err, r)})
		return
	}
	defer sent.close()
	if err := sent.send(c, a); err != nil {
		s.log.Warn("host service: answer not delivered", "pid", p.pid, "err", err)
		return
	}
	switch req.Op {
	case opCertify:
		s.log.Info("host service: issued a certificate", "cert", req.Cert, "dir", req.Dir, "pid", p.pid, "uid", p.uid)
		return
	case opAdopt:
		s.log.Info("host service: adopted a TPM from a migration stream", "tpm", a.TPM, "by", a.By, "dir", req.Dir, "pid", p.pid, "uid", p.uid)
		return
	}
	s.log.Info("host service: opened a TPM's key", "tpm", a.TPM, "dir", req.Dir, "pid", p.pid, "uid", p.uid, "created", a.Created)
}

// opened is what an answer hands over besides its header: the TPM's data
// key, its generation record's file and key (none for a certificate).
type opened struct {
	key       *keybroker.Key
	record    *os.File
	recordKey *secret.Bytes
}

func (o *opened) close() {
	if o == nil {
		return
	}
	o.key.Close()
	o.record.Close()
	o.recordKey.Close()
}

// send writes the answer: its header with the record's descriptor, then the
// data key and the record's key.
func (o *opened) send(c *net.UnixConn, a *answer) error {
	if o == nil {
		return send(c, a)
	}
	a.Keys = true
	if err := send(c, a, int(o.record.Fd())); err != nil {
		return err
	}
	if _, err := o.key.WriteTo(c); err != nil {
		return err
	}
	_, err := c.Write(o.recordKey.Bytes())
	return err
}

// hold answers an opHold request: it admits the caller's user now, then
// waits, without a deadline, for the one request the connection is kept
// for (opAdopt), which is checked as any other when it comes.
func (s *Server) hold(c *net.UnixConn, p peer, req *request) ([]*os.File, error) {
	if err := s.admit(p); err != nil {
		s.log.Warn("host service: refused", "pid", p.pid, "uid", p.uid, "err", err)
		send(c, answer{Error: toWire(err, strings.NewReplacer())})
		return nil, err
	}
	if s.held.Add(1) > maxHeld {
		s.held.Add(-1)
		err := errdefs.New(errdefs.ErrUnavailable, "the host service holds %d connections for adoptions already", maxHeld)
		s.log.Warn("host service: refused", "pid", p.pid, "uid", p.uid, "err", err)
		send(c, answer{Error: toWire(err, strings.NewReplacer())})
		return nil, err
	}
	defer s.held.Add(-1)
	if err := send(c, answer{}); err != nil {
		return nil, err
	}
	c.SetDeadline(time.Time{})
	*req = request{}
	files, err := recv(c, req, 1)
	if err != nil {
		return nil, err // the vTPM initialised its TPM, or went away
	}
	c.SetDeadline(time.Now().Add(requestTimeout))
	if req.Op != opAdopt {
		for _, f := range files {
			f.Close()
		}
		err := errdefs.New(errdefs.ErrInvalidArgument, "a held connection serves an adoption, not %q", req.Op)
		send(c, answer{Error: toWire(err, strings.NewReplacer())})
		return nil, err
	}
	return files, nil
}

// readBlob reads an adoption's migration blob, n raw bytes after the
// request's JSON.
func readBlob(c *net.UnixConn, n int) ([]byte, error) {
	if n <= 0 || n > maxBlob {
		return nil, fmt.Errorf("a migration blob of %d bytes", n)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		return nil, err
	}
	return b, nil
}

// admit refuses users the service does not answer.
func (s *Server) admit(p peer) error {
	if !s.users[p.uid] {
		return errdefs.New(errdefs.ErrPermissionDenied, "the host service does not answer uid %d", p.uid).
			With(errdefs.Advise("add the user to \"users\" in %s in the host's data root, and restart the service", ConfigFile))
	}
	return nil
}

func (s *Server) answer(p peer, req *request, files []*os.File, blob []byte) (*answer, *opened, error) {
	if err := s.admit(p); err != nil {
		return nil, nil, err
	}
	if req.Op != opOpen && req.Op != opCertify && req.Op != opAdopt {
		return nil, nil, errdefs.New(errdefs.ErrInvalidArgument, "unknown request %q", req.Op)
	}
	if len(files) != 1 {
		return nil, nil, errdefs.New(errdefs.ErrInvalidArgument, "a request must come with its state directory's descriptor")
	}
	dirfd := int(files[0].Fd())
	owner, cerr := checkHolder(dirfd, p, req.Dir)
	if cerr != nil {
		return nil, nil, cerr
	}
	// The directory is reached through the caller's descriptor only: a
	// path could be swapped for another directory between check and use.
	dir := fmt.Sprintf("/proc/self/fd/%d", dirfd)
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Op == opCertify {
		a, err := s.certify(dir, req)
		return a, nil, err
	}
	var (
		a   *answer
		o   *opened
		err error
	)
	if req.Op == opAdopt {
		a, o, err = s.adopt(dir, req, blob)
	} else {
		a, o, err = s.open(dir, req.AllowRollback)
	}
	handOver(dirfd, owner)
	if err != nil {
		return nil, nil, err
	}
	if a.Backup != "" && req.Dir != "" {
		a.Backup = strings.Replace(a.Backup, dir, req.Dir, 1)
	}
	return a, o, nil
}

// checkHolder proves that the caller holds the state directory dirfd: the
// directory belongs to the caller's user (or the caller is root), and the
// POSIX lock of its .lock file is held by the caller's process. It returns
// the directory's owner.
func checkHolder(dirfd int, p peer, name string) (owner [2]int, err error) {
	var st unix.Stat_t
	if err := unix.Fstat(dirfd, &st); err != nil {
		return owner, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return owner, errdefs.New(errdefs.ErrInvalidArgument, "%s is not a directory", name)
	}
	if p.uid != 0 && st.Uid != p.uid {
		return owner, errdefs.New(errdefs.ErrPermissionDenied, "state directory %s belongs to uid %d, not to the caller (uid %d)", name, st.Uid, p.uid)
	}
	fd, err := unix.Openat(dirfd, seal.LockName, unix.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return owner, errdefs.Wrap(errdefs.ErrPermissionDenied, err, "the caller does not hold the lock of %s", name)
	}
	// Closing fd drops no lock: this process holds none on the file.
	defer unix.Close(fd)
	var lst unix.Stat_t
	if err := unix.Fstat(fd, &lst); err != nil {
		return owner, err
	}
	if lst.Mode&unix.S_IFMT != unix.S_IFREG {
		return owner, errdefs.New(errdefs.ErrInvalidArgument, "%s/%s is not a regular file", name, seal.LockName)
	}
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0}
	if err := unix.FcntlFlock(uintptr(fd), unix.F_GETLK, &lk); err != nil {
		return owner, fmt.Errorf("query the lock of %s: %w", name, err)
	}
	if lk.Type == unix.F_UNLCK || lk.Pid != p.pid {
		return owner, errdefs.New(errdefs.ErrPermissionDenied, "the caller (pid %d) does not hold the lock of state directory %s", p.pid, name)
	}
	// The service reads vtpm's files in the directory as root: a name the
	// caller made a symbolic link (to a file only root may read) is refused.
	for _, f := range []string{state.ProtectorFile, state.PolicyFile, seal.StateFileName} {
		var fst unix.Stat_t
		if unix.Fstatat(dirfd, f, &fst, unix.AT_SYMLINK_NOFOLLOW) == nil && fst.Mode&unix.S_IFMT != unix.S_IFREG {
			return owner, errdefs.New(errdefs.ErrInvalidArgument, "%s/%s is not a regular file", name, f)
		}
	}
	return [2]int{int(st.Uid), int(st.Gid)}, nil
}

// open does for the caller what an instance does before it confines
// itself (internal/instance): the key, the generation record prepared and
// shared.
func (s *Server) open(dir string, allowRollback bool) (*answer, *opened, error) {
	host := s.broker
	if _, err := host.Local(); err != nil {
		return nil, nil, err
	}
	var known uuid.UUID
	hadRecord := false
	if seal.Exists(dir) {
		var err error
		if known, err = seal.Identify(dir); err != nil {
			return nil, nil, err
		}
		if hadRecord, err = host.HasGenerations(known); err != nil {
			return nil, nil, err
		}
	}
	o, err := host.OpenTPMHeld(dir, keybroker.OpenOptions{AllowRollback: allowRollback, Releasable: s.releasable})
	var missing *keybroker.MissingKeyError
	if errors.As(err, &missing) {
		// No guardian here: the key service may release the key through
		// the protector's fleet row.
		o, err = s.release(dir, missing, allowRollback)
	}
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if o.Key != nil {
			o.Close()
		}
	}()
	reset, err := host.PrepareGenerations(o.TPM, dir, hadRecord || o.TPM != known)
	if err != nil {
		return nil, nil, fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", o.TPM, err)
	}
	if reset {
		s.log.Warn("rollback protection was reset: no generation record for a TPM that has state", "tpm", o.TPM)
	}
	f, rk, err := host.Keystore().Generations().Share(o.TPM)
	if err != nil {
		return nil, nil, fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", o.TPM, err)
	}
	a := &answer{TPM: o.TPM, By: o.By, Created: o.Created, Backup: o.Backup, Reset: reset}
	out := &opened{key: o.Key, record: f, recordKey: rk}
	o.Key = nil // the answer has it now
	return a, out, nil
}

// adopt takes the TPM that a migration stream carries into the caller's
// state directory, as an instance that can read the keystore does itself
// (internal/instance, adopt.go): the key opens from the stream's protector
// under this host's rules (a guardian admitted, its owner held or trusted,
// or an imported key; never an older protector than one seen here), the
// record must verify under the migration key derived from that key (so the
// caller holds a real stream, not only a protector), and the directory must
// hold no sealed state. The TPM's identity and protector are written
// through the descriptor, its generation record prepared, and the key and
// record handed over as open does.
func (s *Server) adopt(dir string, req *request, blob []byte) (*answer, *opened, error) {
	host := s.broker
	if _, err := host.Local(); err != nil {
		return nil, nil, err
	}
	_, rec, err := keybroker.ParseAdoptRecord(blob)
	if err != nil {
		return nil, nil, err
	}
	if rec == nil {
		return nil, nil, errdefs.New(errdefs.ErrInvalidArgument, "the migration blob carries no TPM to adopt")
	}
	if seal.HasBlobs(dir) {
		return nil, nil, errdefs.New(errdefs.ErrFailedPrecondition, "%s already holds sealed state: a TPM arriving from elsewhere is adopted only into a directory without any", dir)
	}
	o, p, err := host.OpenAdopted(dir, rec, keybroker.OpenOptions{AllowRollback: req.AllowRollback})
	var missing *keybroker.MissingKeyError
	if errors.As(err, &missing) {
		// No guardian here: the key service may release the key through
		// the protector's fleet row.
		o, p, err = s.adoptReleased(rec, missing, req.AllowRollback)
	}
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if o.Key != nil {
			o.Close()
		}
	}()
	if err := seal.Adopt(dir, rec.TPM, os.FileMode(req.Mode)&0o777); err != nil { // 0: seal.Adopt's default
		return nil, nil, err
	}
	if err := keybroker.WriteProtector(dir, p); err != nil {
		return nil, nil, err
	}
	// No blob is here yet: nothing to reset, whether or not the TPM had
	// a record on this host.
	if _, err := host.PrepareGenerations(rec.TPM, dir, true); err != nil {
		return nil, nil, fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", rec.TPM, err)
	}
	f, rk, err := host.Keystore().Generations().Share(rec.TPM)
	if err != nil {
		return nil, nil, fmt.Errorf("open the generation record of TPM %s (it detects rollback of the TPM's state): %w", rec.TPM, err)
	}
	out := &opened{key: o.Key, record: f, recordKey: rk}
	o.Key = nil // the answer has it now
	return &answer{TPM: rec.TPM, By: o.By}, out, nil
}

// certify issues an EK or platform certificate from the local CA for the
// holder of a state directory (swtpm_setup --create-ek-cert run as a user
// who cannot open the keystore). The certificate names the directory's TPM
// when it has an identity, whatever the caller says.
func (s *Server) certify(dir string, req *request) (*answer, error) {
	if req.Identity == nil {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "a certificate request names no identity")
	}
	id := *req.Identity
	if seal.Exists(dir) {
		tpm, err := seal.Identify(dir)
		if err != nil {
			return nil, err
		}
		id.TPM = tpm
	}
	pub, err := x509.ParsePKIXPublicKey(req.Public)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "EK public key")
	}
	ca, err := manufacture.LoadCA(s.broker.Keystore())
	if err != nil {
		return nil, err
	}
	var der []byte
	switch req.Cert {
	case certEK:
		der, err = ca.EKCertificate(pub, id, time.Now())
	case certPlatform:
		der, err = ca.PlatformCertificate(pub, id, time.Now())
	default:
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "unknown certificate %q", req.Cert)
	}
	if err != nil {
		return nil, err
	}
	return &answer{TPM: id.TPM, Cert: der}, nil
}

// handOver gives the files the service made in the state directory to the
// directory's owner, who serves the TPM. Only vtpm's own files, and only
// when they are root's regular files with one link: a name the caller
// planted (a link to a file elsewhere) is left alone.
func handOver(dirfd int, owner [2]int) {
	if owner[0] == 0 {
		return
	}
	for _, name := range []string{state.ProtectorFile, seal.StateFileName} {
		var st unix.Stat_t
		if unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) != nil {
			continue
		}
		if st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink == 1 && st.Uid == 0 {
			unix.Fchownat(dirfd, name, owner[0], owner[1], unix.AT_SYMLINK_NOFOLLOW)
		}
	}
}
