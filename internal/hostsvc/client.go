package hostsvc

import (
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/keystore"
	"vtpm/internal/manufacture"
	"vtpm/internal/seal"
	"vtpm/internal/secret"
	"vtpm/internal/state"
)

// Opened is a TPM's key and generation record as the host service handed
// them over. Close wipes the key and closes the record.
type Opened struct {
	TPM     uuid.UUID
	Key     *keybroker.Key
	Record  *keystore.Pinned // the TPM's generation record, pinned
	By      string           // what opened the key: a guardian, or "imported key"
	Created bool             // the TPM is new: the service made its identity and key protector
	Backup  string           // where the old state went when the TPM was reprovisioned
	Reset   bool             // rollback protection started over (no record for a TPM with state)
}

// Close wipes the key and closes the record. It is safe on nil.
func (o *Opened) Close() {
	if o == nil {
		return
	}
	o.Key.Close()
	if o.Record != nil {
		o.Record.Close()
	}
}

// Client asks the host service at Socket (SocketPath() when empty).
type Client struct {
	Socket string
}

func (c Client) socket() string {
	if c.Socket != "" {
		return c.Socket
	}
	return SocketPath()
}

// Open asks the host service for the key of the TPM in dir (created when
// missing), holding dir's lock while it asks: the service answers only the
// holder of a state directory. The lock is released when Open returns, so
// that the caller can open the state (which takes it again).
func (c Client) Open(dir string, opts keybroker.OpenOptions) (*Opened, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state directory: %w", err)
	}
	l, err := state.Lock(dir)
	if err != nil {
		return nil, err
	}
	defer l.Unlock()
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	a, files, conn, err := c.call(request{Op: opOpen, Dir: dir, AllowRollback: opts.AllowRollback}, d)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	return readOpened(c.socket(), conn, a, files)
}

// readOpened reads what follows an answer with keys: the data key, the
// generation record's key; files holds the record's descriptor.
func readOpened(socket string, conn *net.UnixConn, a *answer, files []*os.File) (*Opened, error) {
	closeFiles := func() {
		for _, f := range files {
			f.Close()
		}
	}
	if len(files) != 1 || !a.Keys || a.TPM == uuid.Nil {
		closeFiles()
		return nil, errdefs.New(errdefs.ErrInternal, "the host service at %s answered with a malformed message", socket)
	}
	o := &Opened{TPM: a.TPM, By: a.By, Created: a.Created, Backup: a.Backup, Reset: a.Reset}
	var err error
	if o.Key, err = keybroker.ReadKey(conn, a.TPM); err != nil {
		closeFiles()
		return nil, &UnavailableError{Socket: socket, Err: fmt.Errorf("answer cut short: %w", err)}
	}
	rk, err := secret.New(recordKeyLen)
	if err != nil {
		closeFiles()
		o.Close()
		return nil, err
	}
	defer rk.Close()
	if _, err := io.ReadFull(conn, rk.Bytes()); err != nil {
		closeFiles()
		o.Close()
		return nil, &UnavailableError{Socket: socket, Err: fmt.Errorf("answer cut short: %w", err)}
	}
	if o.Record, err = keystore.PinShared(files[0], a.TPM, rk.Bytes()); err != nil {
		o.Close()
		return nil, err
	}
	return o, nil
}

// Reserve connects to the host service for one later Adopt: a vTPM that
// runs as another user than root makes it while it may still make sockets
// (its sandbox refuses them once it serves), and asks if a TPM arrives in
// a migration stream before its own is initialised. The service admits the
// caller's user now and checks the rest when asked.
func (c Client) Reserve() (*Reservation, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: c.socket(), Net: "unix"})
	if err != nil {
		return nil, &UnavailableError{Socket: c.socket(), Err: err}
	}
	conn.SetDeadline(time.Now().Add(requestTimeout))
	fail := func(err error) (*Reservation, error) {
		conn.Close()
		return nil, err
	}
	if err := send(conn, request{Op: opHold}); err != nil {
		return fail(&UnavailableError{Socket: c.socket(), Err: err})
	}
	var a answer
	if _, err := recv(conn, &a, 0); err != nil { // no descriptors: recv refuses any
		return fail(&UnavailableError{Socket: c.socket(), Err: fmt.Errorf("no answer: %w", err)})
	}
	if a.Error != nil {
		return fail(a.Error.native())
	}
	conn.SetDeadline(time.Time{})
	return &Reservation{socket: c.socket(), conn: conn}, nil
}

// Reservation is a connection to the host service kept for one adoption.
type Reservation struct {
	socket string
	conn   *net.UnixConn
}

// Close gives the connection up. It is safe on nil.
func (r *Reservation) Close() {
	if r != nil && r.conn != nil {
		r.conn.Close()
		r.conn = nil
	}
}

// Adopt asks the host service to take the TPM that blob (a permanent-state
// migration blob with vtpm's adoption record) carries into dir, whose lock
// this process holds: the service opens the TPM's key from the carried
// protector under this host's rules, checks the record against the
// stream, writes the TPM's identity and protector into dir (files of the
// given mode) and hands over the key and the TPM's generation record. A
// reservation serves one request.
func (r *Reservation) Adopt(dir string, blob []byte, mode os.FileMode, opts keybroker.OpenOptions) (*Opened, error) {
	if r == nil || r.conn == nil {
		return nil, errdefs.New(errdefs.ErrFailedPrecondition, "no connection to the host service is kept for an adoption")
	}
	defer r.Close()
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	conn := r.conn
	conn.SetDeadline(time.Now().Add(requestTimeout + 5*time.Second))
	req := request{Op: opAdopt, Dir: dir, AllowRollback: opts.AllowRollback, BlobLen: len(blob), Mode: uint32(mode.Perm())}
	if err := send(conn, req, int(d.Fd())); err != nil {
		return nil, &UnavailableError{Socket: r.socket, Err: err}
	}
	if _, err := conn.Write(blob); err != nil {
		return nil, &UnavailableError{Socket: r.socket, Err: err}
	}
	var a answer
	files, err := recv(conn, &a, 1)
	if err != nil {
		return nil, &UnavailableError{Socket: r.socket, Err: fmt.Errorf("no answer: %w", err)}
	}
	if a.Error != nil {
		for _, f := range files {
			f.Close()
		}
		return nil, a.Error.native()
	}
	return readOpened(r.socket, conn, &a, files)
}

// call sends req with dir's descriptor and reads the answer's header. An
// error answer is returned as the error; otherwise the caller closes conn
// and the files.
func (c Client) call(req request, dir *os.File) (*answer, []*os.File, *net.UnixConn, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: c.socket(), Net: "unix"})
	if err != nil {
		return nil, nil, nil, &UnavailableError{Socket: c.socket(), Err: err}
	}
	conn.SetDeadline(time.Now().Add(requestTimeout + 5*time.Second))
	if err := send(conn, req, int(dir.Fd())); err != nil {
		conn.Close()
		return nil, nil, nil, &UnavailableError{Socket: c.socket(), Err: err}
	}
	var a answer
	files, err := recv(conn, &a, 1)
	if err != nil {
		conn.Close()
		return nil, nil, nil, &UnavailableError{Socket: c.socket(), Err: fmt.Errorf("no answer: %w", err)}
	}
	if a.Error != nil {
		conn.Close()
		for _, f := range files {
			f.Close()
		}
		return nil, nil, nil, a.Error.native()
	}
	return &a, files, conn, nil
}

// certify asks for a certificate of kind for the EK public key pub of the
// TPM in dir, whose lock this process holds.
func (c Client) certify(dir, kind string, pub crypto.PublicKey, id manufacture.Identity) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, err
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	a, files, conn, err := c.call(request{Op: opCertify, Dir: dir, Cert: kind, Public: der, Identity: &id}, d)
	if err != nil {
		return nil, err
	}
	conn.Close()
	for _, f := range files {
		f.Close()
	}
	return a.Cert, nil
}

// Keys is the host service as state.OpenSealed's key source, for
// swtpm_setup run as a user who cannot open the keystore.
type Keys struct {
	Client Client
	Dir    string // the state directory being manufactured, for certificates
	// KeystoreErr is why this process could not open the keystore itself;
	// an unreachable service is reported together with it (Fallback).
	KeystoreErr error
	opened      []*Opened
}

// CA is the host service's local CA (manufacture.Host): it issues
// certificates for the TPM in k.Dir while this process holds its lock.
func (k *Keys) CA() (manufacture.Issuer, error) { return issuer{k}, nil }

type issuer struct{ k *Keys }

func (i issuer) EKCertificate(ek crypto.PublicKey, id manufacture.Identity, _ time.Time) ([]byte, error) {
	return i.certify(certEK, ek, id)
}

func (i issuer) PlatformCertificate(ek crypto.PublicKey, id manufacture.Identity, _ time.Time) ([]byte, error) {
	return i.certify(certPlatform, ek, id)
}

func (i issuer) certify(kind string, ek crypto.PublicKey, id manufacture.Identity) ([]byte, error) {
	der, err := i.k.Client.certify(i.k.Dir, kind, ek, id)
	if err != nil && i.k.KeystoreErr != nil {
		err = Fallback(i.k.KeystoreErr, err)
	}
	return der, err
}

// OpenKey asks the service for dir's key (state.Keys). The record of the
// last TPM opened serves Generations.
func (k *Keys) OpenKey(dir string) (uuid.UUID, state.SealKey, error) {
	o, err := k.Client.Open(dir, keybroker.OpenOptions{})
	if err != nil {
		if k.KeystoreErr != nil {
			err = Fallback(k.KeystoreErr, err)
		}
		return uuid.Nil, nil, err
	}
	k.opened = append(k.opened, o)
	return o.TPM, o.Key, nil
}

// Generations is the generation record of the TPM last opened.
func (k *Keys) Generations() seal.Generations {
	if len(k.opened) == 0 {
		return nil
	}
	return k.opened[len(k.opened)-1].Record
}

// Close closes what was opened.
func (k *Keys) Close() error {
	for _, o := range k.opened {
		o.Close()
	}
	k.opened = nil
	return nil
}

// UnavailableError is a host service that could not be reached.
type UnavailableError struct {
	Socket string
	Err    error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("cannot reach the host service at %s: %v", e.Socket, e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// Is makes the error match errdefs.ErrUnavailable.
func (e *UnavailableError) Is(target error) bool { return target == errdefs.ErrUnavailable }

// Remedies: start the service, socket-activated or in the foreground.
func (e *UnavailableError) Remedies() []errdefs.Remedy {
	serve := errdefs.Do(errdefs.ActionHostServe, "socket", e.Socket).WithNote("or run it in the foreground, as root")
	return []errdefs.Remedy{
		errdefs.Do(errdefs.ActionHostServiceStart).WithNote("start the host service (as root)"),
		serve,
	}
}

// NoKeysError is a process that could open the TPM's key neither itself
// (the host keystore, which only root can open) nor through the host
// service.
type NoKeysError struct {
	Keystore error // why the keystore did not open
	Service  error // why the host service did not answer
}

func (e *NoKeysError) Error() string {
	return fmt.Sprintf("cannot open the TPM's key: this process cannot open the host keystore (%v), and the host service did not answer (%v)", e.Keystore, e.Service)
}

// Unwrap returns both causes; their remedies are the ways out.
func (e *NoKeysError) Unwrap() []error { return []error{e.Service, e.Keystore} }

// Fallback returns what to report when the keystore failed with ksErr and
// the host service with svcErr: an unreachable service gives one error
// naming both attempts; a service that answered gives its own error.
func Fallback(ksErr, svcErr error) error {
	var u *UnavailableError
	if errors.As(svcErr, &u) {
		return &NoKeysError{Keystore: ksErr, Service: svcErr}
	}
	return fmt.Errorf("host service: %w", svcErr)
}

// UseService reports whether a process whose keystore failed to open with
// err should ask the host service: it is not root, or the keystore refused
// it.
func UseService(err error) bool {
	return os.Geteuid() != 0 || errors.Is(err, errdefs.ErrPermissionDenied) || errors.Is(err, os.ErrPermission)
}

// Status is what the host service says of itself (Client.Ping).
type Status struct {
	Socket   string
	Users    []string // the users it answers besides root, as configured
	Unknown  []string // configured names that are no user on this host
	Admitted bool     // it answers this process's user
}

// Ping asks the host service whether it answers, and whom. An unreachable
// service is an *UnavailableError.
func (c Client) Ping() (*Status, error) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: c.socket(), Net: "unix"})
	if err != nil {
		return nil, &UnavailableError{Socket: c.socket(), Err: err}
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := send(conn, request{Op: opPing}); err != nil {
		return nil, &UnavailableError{Socket: c.socket(), Err: err}
	}
	var a answer
	if _, err := recv(conn, &a, 0); err != nil { // no descriptors: recv refuses any
		return nil, &UnavailableError{Socket: c.socket(), Err: fmt.Errorf("no answer: %w", err)}
	}
	if a.Error != nil {
		return nil, a.Error.native()
	}
	return &Status{Socket: c.socket(), Users: a.Users, Unknown: a.Unknown, Admitted: a.Admitted}, nil
}
