package hostd

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"vtpm/internal/atomicfile"
	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
)

// PeersFile, in the data root, lists the hosts this host trusts.
const PeersFile = "peers.json"

// Peer is a host this host trusts: it may call this host's API, and the
// guardian that issues its TLS certificate is the one recorded here.
type Peer struct {
	Name    string `json:"name"`
	Address string `json:"address"`
	// Certificates are the peer guardian's public certificates (PEM), as
	// `guardian export --certs-only` wrote them.
	Certificates string `json:"certificates"`
	// OwnerTrusted records that trusting the peer made its guardian a
	// trusted owner (it was not one before), so untrusting the peer
	// withdraws that too, and only that.
	OwnerTrusted bool `json:"owner_trusted,omitempty"`

	g *guardian.Guardian
}

// Guardian is the peer's guardian (public).
func (p *Peer) Guardian() *guardian.Guardian { return p.g }

type peersJSON struct {
	Peers []*Peer `json:"peers"`
}

// validName reports whether name is a peer's name: 1 to 63 letters,
// digits, '.', '_' and '-', starting with a letter or digit.
func validName(name string) bool {
	if name == "" || len(name) > 63 {
		return false
	}
	for i, c := range name {
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || !strings.ContainsRune("._-", c)) {
			return false
		}
	}
	return true
}

// NewPeer checks a peer's name, address and certificates.
func NewPeer(name, address string, certs []byte) (*Peer, error) {
	if !validName(name) {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "peer name %q: use letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit", name)
	}
	if _, port, err := net.SplitHostPort(address); err != nil || port == "" {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "peer address %q: want HOST:PORT, the address its host service listens on (--listen)", address)
	}
	g, err := guardian.ParseCertificates(certs)
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "the certificates of peer %s", name).
			With(errdefs.Do(errdefs.ActionGuardianExportCerts, "file", name+".pem").WithNote("export them").On("on host " + name))
	}
	return &Peer{Name: name, Address: address, Certificates: string(certs), g: g}, nil
}

// readPeers reads dataRoot's peers.json; an absent file is no peers.
func readPeers(dataRoot string) ([]*Peer, error) {
	path := filepath.Join(dataRoot, PeersFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var pj peersJSON
	if err := json.Unmarshal(b, &pj); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s", path)
	}
	for _, p := range pj.Peers {
		if p.g, err = guardian.ParseCertificates([]byte(p.Certificates)); err != nil {
			return nil, errdefs.Wrap(errdefs.ErrDataLoss, err, "%s: peer %s", path, p.Name)
		}
	}
	return pj.Peers, nil
}

// writePeers replaces dataRoot's peers.json, sorted by name.
func writePeers(dataRoot string, peers []*Peer) error {
	peers = slices.Clone(peers)
	slices.SortFunc(peers, func(a, b *Peer) int { return strings.Compare(a.Name, b.Name) })
	b, err := json.MarshalIndent(peersJSON{Peers: peers}, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(dataRoot, PeersFile), append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", PeersFile, err)
	}
	return nil
}

// findPeer returns the peer named name.
func findPeer(peers []*Peer, name string) (*Peer, error) {
	for _, p := range peers {
		if p.Name == name {
			return p, nil
		}
	}
	return nil, errdefs.New(errdefs.ErrNotFound, "this host trusts no host %q", name).
		With(errdefs.Do(errdefs.ActionHostList).WithNote("the trusted hosts"))
}

// issuer returns the peer whose guardian issued cert, or nil.
func issuer(peers []*Peer, cert *certInfo) *Peer {
	for _, p := range peers {
		if p.g.Issued(cert.leaf) == nil {
			return p
		}
	}
	return nil
}
