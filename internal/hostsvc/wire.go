package hostsvc

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"vtpm/internal/errdefs"
	"vtpm/internal/keybroker"
	"vtpm/internal/manufacture"
)

// maxHeader bounds a message's JSON: requests and answers are small.
const maxHeader = 64 << 10

// request asks for the key of the TPM in the directory whose descriptor
// comes with it.
type request struct {
	Op            string `json:"op"`  // opOpen, opCertify, opHold, opAdopt
	Dir           string `json:"dir"` // the caller's name of the directory, for messages
	AllowRollback bool   `json:"allow_rollback,omitempty"`
	// opAdopt: the permanent-state migration blob (with the TPM's
	// adoption record) follows the JSON, BlobLen raw bytes; Mode is the
	// state files' mode.
	BlobLen int    `json:"blob_len,omitempty"`
	Mode    uint32 `json:"mode,omitempty"`
	// A certificate to issue (opCertify): certEK or certPlatform, for the
	// EK whose public key (PKIX, DER) is Public.
	Cert     string                `json:"cert,omitempty"`
	Public   []byte                `json:"public,omitempty"`
	Identity *manufacture.Identity `json:"identity,omitempty"`
}

// Requests.
const (
	opOpen    = "open"    // the TPM's key and generation record
	opCertify = "certify" // an EK or platform certificate from the local CA
	// opHold keeps the connection for one later request, opAdopt: a vTPM
	// connects while it may still make sockets, and asks once a TPM
	// arrives in a migration stream.
	opHold  = "hold"
	opAdopt = "adopt" // take the TPM of a migration stream into the directory
	// opPing asks whether the service answers, and whom (no descriptor;
	// any caller gets the answer: it holds no secret).
	opPing = "ping"
)

// maxBlob bounds an adoption's migration blob (libtpms' permanent state is
// tens of kilobytes).
const maxBlob = 4 << 20

// Certificates.
const (
	certEK       = "ek"
	certPlatform = "platform"
)

// answer is the service's reply. With Keys set, the data key and then the
// generation record's key (recordKeyLen bytes) follow the JSON, and the
// record's file comes as a descriptor.
type answer struct {
	Error   *wireError `json:"error,omitempty"`
	TPM     uuid.UUID  `json:"tpm"`
	By      string     `json:"by,omitempty"`
	Created bool       `json:"created,omitempty"`
	Backup  string     `json:"backup,omitempty"`
	Reset   bool       `json:"reset,omitempty"` // rollback protection started over
	Keys    bool       `json:"keys,omitempty"`
	Cert    []byte     `json:"cert,omitempty"` // DER, for opCertify
	// For opPing: the users the service answers (besides root), the
	// configured names that are no user here, and whether it answers the
	// caller.
	Users    []string `json:"users,omitempty"`
	Unknown  []string `json:"unknown_users,omitempty"`
	Admitted bool     `json:"admitted,omitempty"`
}

// wireError is an error as data.
type wireError struct {
	Kind     string           `json:"kind,omitempty"`
	Message  string           `json:"message"`
	Remedies []errdefs.Remedy `json:"remedies,omitempty"`
	// Guardians that could open the TPM, when this host cannot
	// (keybroker.MissingKeyError): "name (fingerprint)".
	Guardians []string `json:"guardians,omitempty"`
}

var kindsByName = map[string]error{}

func init() {
	for _, k := range []error{errdefs.ErrInvalidArgument, errdefs.ErrNotFound, errdefs.ErrAlreadyExists,
		errdefs.ErrPermissionDenied, errdefs.ErrFailedPrecondition, errdefs.ErrConflict,
		errdefs.ErrUnavailable, errdefs.ErrDataLoss, errdefs.ErrInternal} {
		kindsByName[k.Error()] = k
	}
}

func toWire(err error, r *strings.Replacer) *wireError {
	w := &wireError{Message: r.Replace(err.Error())}
	for _, x := range errdefs.Remedies(err) {
		x.Note = r.Replace(x.Note)
		if x.Args != nil {
			args := make(map[string]string, len(x.Args))
			for k, v := range x.Args {
				args[k] = r.Replace(v)
			}
			x.Args = args
		}
		w.Remedies = append(w.Remedies, x)
	}
	if k := errdefs.KindOf(err); k != nil {
		w.Kind = k.Error()
	}
	var mk *keybroker.MissingKeyError
	if errors.As(err, &mk) {
		for _, r := range mk.Rows {
			w.Guardians = append(w.Guardians, fmt.Sprintf("%s (%s)", r.Name, r.Fingerprint))
		}
	}
	return w
}

// ServiceError is an error the host service answered with: its kind and
// remedies as the service's error had them.
type ServiceError struct {
	Kind      error // an errdefs kind, or nil
	Message   string
	Fix       []errdefs.Remedy
	Guardians []string // that could open the TPM, when the service cannot
}

func (e *ServiceError) Error() string              { return e.Message }
func (e *ServiceError) Is(target error) bool       { return e.Kind != nil && target == e.Kind }
func (e *ServiceError) Remedies() []errdefs.Remedy { return e.Fix }

func (w *wireError) native() error {
	return &ServiceError{Kind: kindsByName[w.Kind], Message: w.Message, Fix: w.Remedies, Guardians: w.Guardians}
}

// recordKeyLen is the size of a generation record's key.
const recordKeyLen = 32

// send writes one message's header, with fds.
func send(c *net.UnixConn, header any, fds ...int) error {
	js, err := json.Marshal(header)
	if err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(len(js)))
	msg = append(msg, js...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	_, _, err = c.WriteMsgUnix(msg, oob, nil)
	return err
}

// recv reads one message's header into header and returns the descriptors
// that came with it (at most maxFDs; more are closed and refused).
func recv(c *net.UnixConn, header any, maxFDs int) ([]*os.File, error) {
	var lenb [4]byte
	oob := make([]byte, unix.CmsgSpace(4*(maxFDs+1)))
	n, oobn, flags, _, err := c.ReadMsgUnix(lenb[:], oob)
	if err != nil {
		return nil, err
	}
	files, ferr := parseRights(oob[:oobn])
	fail := func(err error) ([]*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, err
	}
	switch {
	case ferr != nil:
		return fail(ferr)
	case flags&unix.MSG_CTRUNC != 0 || len(files) > maxFDs:
		return fail(errors.New("too many descriptors"))
	}
	if n < 4 {
		if _, err := io.ReadFull(c, lenb[n:]); err != nil {
			return fail(err)
		}
	}
	size := binary.BigEndian.Uint32(lenb[:])
	if size > maxHeader {
		return fail(fmt.Errorf("message of %d bytes is too long", size))
	}
	js := make([]byte, size)
	if _, err := io.ReadFull(c, js); err != nil {
		return fail(err)
	}
	if err := json.Unmarshal(js, header); err != nil {
		return fail(fmt.Errorf("malformed message: %w", err))
	}
	return files, nil
}

func parseRights(oob []byte) ([]*os.File, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "received"))
		}
	}
	return files, nil
}
