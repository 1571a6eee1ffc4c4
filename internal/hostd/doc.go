// Package hostd wires the host service together: the local key socket for
// vTPMs that cannot open the keystore (internal/hostsvc), the API
// (api/vtpm/host/v1, Connect over HTTP/2) on a local socket for this host's
// CLI and, with a listen address, over TLS 1.3 with mutual authentication
// for the peers this host trusts, and its Prometheus metrics.
//
// # Identity and trust
//
// A host is its guardian. The service's TLS certificate is a fresh ECDSA
// P-256 key's, issued under the guardian's signing key (kept in the
// keystore, renewed when the guardian, the name or the addresses change,
// and before it ends),
// and each side presents it with the guardian's signing certificate. A
// peer is admitted by `host trust NAME ADDRESS CERTS.pem`, the other host's
// public guardian certificates: <data root>/peers.json records it, and its
// guardian becomes a trusted owner of key protectors (keybroker.Trust).
//
// Both ends verify the other's certificate against the guardians of
// peers.json, not against a CA: the server admits a client whose
// certificate one trusted peer's guardian issued (the handshake fails
// otherwise) and checks again at every call, so an untrusted peer's open
// connection is refused from then on (PermissionDenied). A client dialing
// peer NAME accepts only a certificate issued under NAME's guardian; one
// issued under another guardian is reported as changed (CertChangedError)
// with the guardian it names, never accepted.
//
// # The local API
//
// The CLI (`vtpm host …`, forwarded to vtpm-hostd) reaches the service on
// a unix socket (DefaultAPISocket, $VTPM_API_SOCKET), mode 0600, that
// answers only processes of root or of the service's own user
// (SO_PEERCRED), over HTTP/2 without TLS. It serves HostService and
// PeerService; peers get HostService only. HTTP/1.1 is served there too,
// so a script can post JSON with curl. The CLI never reads another host's
// files: what it learns of a peer, the local service asked.
//
// # Growing the API
//
// Other parts of the host service add their services with
// Server.Register (local, remote or both) before Run; a remote handler
// learns the calling peer with PeerFrom. They call a peer's services
// through Server.PeerClient (pinned to the peer's guardian) and turn a
// failed call into data with Server.PeerError. Metrics.Migration counts
// migrations by role and outcome.
package hostd
