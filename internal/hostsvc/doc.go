// Package hostsvc is the host service's local socket: it opens the keys of
// vTPMs that cannot open the host keystore themselves (an instance or
// swtpm_setup that libvirt starts as tss, a swtpm_setup --runas nobody).
//
// The service runs as root and holds the keystore. A caller is admitted by
// its peer credentials (SO_PEERCRED): root, or a user named in
// <data root>/hostsvc.json ({"users": ["tss"]}; tss when the file is
// absent). Every vTPM libvirt starts runs as that same user, so the user
// alone opens nothing: a caller gets only the key of the TPM whose state
// directory it holds. It sends an open descriptor of the directory
// (SCM_RIGHTS) and must, at that moment, hold the directory's lock: the
// POSIX record lock on its .lock file that every TPM process serving the
// directory holds, vtpm's and swtpm's alike. The service opens .lock
// through the descriptor (never by path, so the directory cannot be swapped
// under it) and asks the kernel (F_GETLK) which process holds the lock; it
// must be the peer's pid. The directory must belong to the caller's user.
// A running vTPM holds its own directory's lock for as long as it runs, so
// another process of the same user can neither take it nor pass for its
// holder: one compromised vTPM cannot ask for another running VM's key. (A
// directory no TPM is serving can be locked by any process of its owner,
// which can equally start a vTPM on it: holding the directory is the right
// being checked.) The service reads vtpm's files there as root, so a
// protector, policy or identity file that is not a regular file (a link the
// caller planted) is refused.
//
// What the service does is what an instance does itself when it can open
// the keystore (internal/instance): it opens the TPM's data key (a new
// directory gets its identity and a key protector owned by this host's
// guardian, written through the descriptor and handed to the directory's
// owner), prepares the TPM's generation record, and hands the caller that
// record's open file and its key (keystore.Generations.Share), so the
// caller records generations itself as a vTPM pins its record
// (keystore.PinShared). The data key is sent on the socket to the
// authorized local peer and lands in locked memory there (secret).
//
// A vTPM that starts on an empty directory may be the destination of a live
// migration: the TPM then arrives in the stream, sealed under a key only a
// host its protector admits can open (internal/instance, adopt.go). A vTPM
// that cannot read the keystore (it runs as tss) asks the service to adopt
// it. Its sandbox refuses new connections once it serves, so it connects
// before (a "hold" request, admitted by user only) and keeps the
// connection, without a deadline, until its TPM is first initialised. The
// "adopt" request that may follow carries the state directory's descriptor
// (checked as for any request: the caller holds the lock) and the
// permanent-state migration blob with the TPM's adoption record. The
// service opens the key from the record's protector under this host's
// rules (a guardian admitted and the owner held or trusted, or an imported
// key; never an older protector than one seen here), checks the record's
// MAC under the migration key derived from that key (so the caller holds a
// stream of that TPM, not only its protector), refuses a directory that
// holds sealed state, writes the TPM's identity and protector through the
// descriptor, hands them to the directory's owner, and answers as "open"
// does: the key and the TPM's generation record. A refusal is an error as
// data: a host the protector does not admit answers the broker's
// MissingKeyError (the TPM, the guardians that could open it, the ways out).
//
// A TPM that no guardian of this host opens, but whose protector has a row
// for the fleet guardian of the key service this host belongs to, opens
// through the service's Releaser (set by the host service's executable,
// which links the key service's client; see internal/keyrelease): the key
// service releases the data key to this attested host, sealed to a
// one-time key, and the service checks it against the protector and the
// state (keybroker.AcceptReleased) and answers as for any open; an
// adoption likewise, the key checked against the stream's protector and
// record (keybroker.AdoptReleased). The fleet
// guardian's certificates are kept in <data root>/fleet-guardian.pem
// (FleetFile), so a vTPM that opens the keystore itself and finds no row
// it holds asks the service only when the fleet's row is there. A release
// that fails is answered as data: ReleaseError, wrapping the key
// service's denial and its reason, or the nodes tried and their state.
//
// "ping" answers anyone, with no descriptor: the users the service
// answers, and whether it answers the caller (`doctor` asks).
//
// # Protocol
//
// One request and one answer per connection, on a SOCK_STREAM socket
// ("hold" is answered, then one more request).
// Each message is a 4-byte big-endian length, that many bytes of JSON, and
// then, in an answer with keys, the data key and the generation record's
// key as raw bytes, so key bytes never pass through a JSON encoder; an
// "adopt" request is followed by its migration blob, "blob_len" raw bytes. Descriptors ride as SCM_RIGHTS on the message's first
// write: the state directory with a request, the generation record with an
// answer. Errors come back as data (kind, message, remedies), and the
// client rebuilds an errdefs error from them.
package hostsvc
