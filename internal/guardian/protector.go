package guardian

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/hkdf"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/google/uuid"

	"vtpm/internal/errdefs"
)

// ProtectorFormat is the version of the key protector format written by
// Marshal. Format 2 added the signed protector version; format 1 files
// (written before it) are still read, as version 0.
const ProtectorFormat = 2

// wrapFormat is the format number bound into every row's wrap: rows are
// the same in both formats, so a format 1 protector's rows stay valid when
// it is next written.
const wrapFormat = 1

// DEKSize is the size of a data key in bytes.
const DEKSize = 32

const (
	wrapLabel     = "vtpm protector wrap v1"
	keyCheckLabel = "vtpm protector key check v1"
	signedLabel   = "vtpm protector v1"
	migrationInfo = "vtpm migration key v1"
)

// Errors, each of one errdefs kind.
var (
	// ErrNotOwner is returned by Grant and Revoke when the guardian given as
	// owner is not the protector's owner or lacks its private key
	// (errdefs.ErrPermissionDenied).
	ErrNotOwner error = errdefs.New(errdefs.ErrPermissionDenied, "guardian: not the protector's owner")

	// ErrWrongDEK is returned by Grant when the data key does not match the
	// protector's key check value (errdefs.ErrInvalidArgument).
	ErrWrongDEK error = errdefs.New(errdefs.ErrInvalidArgument, "guardian: data key does not belong to this protector")

	// ErrTampered is returned by ParseProtector when the protector's
	// signature or structure does not verify (errdefs.ErrDataLoss).
	ErrTampered error = errdefs.New(errdefs.ErrDataLoss, "guardian: key protector was modified outside vtpm")
)

// A Protector holds a TPM's data key (DEK) wrapped with HPKE to each guardian
// allowed to open it, signed by the owner guardian. See the package
// documentation for the format.
//
// A Protector is not safe for concurrent modification.
type Protector struct {
	tpm      uuid.UUID
	version  uint64    // raised by every change; 0 for a format 1 file
	owner    *Guardian // public
	keyCheck []byte
	rows     []row
	sig      []byte
}

type row struct {
	g    *Guardian // public
	wrap []byte    // hpke.Seal output: enc || ciphertext
}

// A Row describes one guardian allowed to open a protector.
type Row struct {
	Name        string
	Subject     string
	Fingerprint string
	KEM         KEM
	Guardian    *Guardian // public only
}

// NoGuardianError is returned by Open when none of the given guardians holds
// a row of the protector. Rows lists who could open it. It matches
// errdefs.ErrPermissionDenied.
type NoGuardianError struct {
	TPM  uuid.UUID
	Rows []Row
}

// Is reports whether target is errdefs.ErrPermissionDenied.
func (e *NoGuardianError) Is(target error) bool { return target == errdefs.ErrPermissionDenied }

func (e *NoGuardianError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "guardian: no guardian held here can open the key protector of TPM %s; it can be opened by", e.TPM)
	for i, r := range e.Rows {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, " %s (%s)", r.Name, r.Fingerprint)
	}
	b.WriteString("; import one of them (its PKCS#12), or have its holder grant a guardian of this host")
	return b.String()
}

// NewProtector wraps dek for owner and the other guardians and signs the
// result with owner's signing key, which it must hold. The others need only
// be public.
func NewProtector(tpm uuid.UUID, dek []byte, owner *Guardian, others ...*Guardian) (*Protector, error) {
	if len(dek) != DEKSize {
		return nil, fmt.Errorf("guardian: data key is %d bytes, want %d", len(dek), DEKSize)
	}
	if !owner.HasPrivate() {
		return nil, fmt.Errorf("%w: %v is public only; create the protector on a host holding its private key", ErrNotOwner, owner)
	}
	p := &Protector{tpm: tpm, version: 1, owner: owner.Public(), keyCheck: keyCheck(tpm, dek)}
	for _, g := range append([]*Guardian{owner}, others...) {
		if p.index(g.fp) >= 0 {
			continue
		}
		if err := p.add(dek, g); err != nil {
			return nil, err
		}
	}
	if err := p.sign(owner); err != nil {
		return nil, err
	}
	return p, nil
}

func keyCheck(tpm uuid.UUID, dek []byte) []byte {
	k, err := hkdf.Key(sha256.New, dek, tpm[:], keyCheckLabel, 32)
	if err != nil {
		panic(err) // only for invalid lengths
	}
	return k
}

// wrapInfo is the HPKE info of a row: it binds the wrap to the format
// version, the TPM, the owner and the row's guardian.
func (p *Protector) wrapInfo(fp string) []byte {
	b := append([]byte(wrapLabel), 0)
	b = binary.BigEndian.AppendUint16(b, wrapFormat)
	b = append(b, p.tpm[:]...)
	b = appendFingerprint(b, p.owner.fp)
	return appendFingerprint(b, fp)
}

func appendFingerprint(b []byte, fp string) []byte {
	raw, err := hex.DecodeString(fp)
	if err != nil || len(raw) != sha256.Size {
		panic("guardian: malformed fingerprint " + fp)
	}
	return append(b, raw...)
}

// suite returns the HPKE KDF and AEAD of every row; the KEM is the
// guardian's.
func suite() (hpke.KDF, hpke.AEAD) { return hpke.HKDFSHA256(), hpke.AES256GCM() }

func (p *Protector) add(dek []byte, g *Guardian) error {
	kdf, aead := suite()
	wrap, err := hpke.Seal(g.encPub, kdf, aead, p.wrapInfo(g.fp), dek)
	if err != nil {
		return fmt.Errorf("guardian: wrapping data key to %v: %w", g, err)
	}
	p.rows = append(p.rows, row{g: g.Public(), wrap: wrap})
	return nil
}

func (p *Protector) index(fp string) int {
	return slices.IndexFunc(p.rows, func(r row) bool { return r.g.fp == fp })
}

func (p *Protector) checkOwner(owner *Guardian) error {
	if owner == nil || owner.fp != p.owner.fp {
		name := "<nil>"
		if owner != nil {
			name = owner.String()
		}
		return fmt.Errorf("%w: the owner is %v, not %s; run this on a host holding the owner guardian", ErrNotOwner, p.owner, name)
	}
	if !owner.HasPrivate() {
		return fmt.Errorf("%w: %v is public only here; run this on a host holding its private key", ErrNotOwner, owner)
	}
	return nil
}

// Grant adds a row wrapping dek to g and re-signs the protector. g may be
// public (e.g. from ParseCertificates); owner must be the protector's owner
// with its private key. dek must be the protector's data key (open it first).
func (p *Protector) Grant(dek []byte, g *Guardian, owner *Guardian) error {
	if err := p.checkOwner(owner); err != nil {
		return err
	}
	if len(dek) != DEKSize || subtle.ConstantTimeCompare(keyCheck(p.tpm, dek), p.keyCheck) != 1 {
		return fmt.Errorf("%w (TPM %s); open the protector and pass the key it returns", ErrWrongDEK, p.tpm)
	}
	if p.index(g.fp) >= 0 {
		return fmt.Errorf("guardian: %v already holds a row in the protector of TPM %s", g, p.tpm)
	}
	saved := p.rows
	p.rows = slices.Clip(p.rows)
	if err := p.add(dek, g); err != nil {
		p.rows = saved
		return err
	}
	p.version++
	if err := p.sign(owner); err != nil {
		p.rows, p.version = saved, p.version-1
		return err
	}
	return nil
}

// Revoke removes the row of the guardian with the given fingerprint and
// re-signs the protector. The owner's own row cannot be revoked.
//
// Revoking stops the guardian from opening this protector. It does not
// change the data key: a revoked guardian that opened it before may know it,
// and a copy of the protector saved before still opens. Use Rekey, and
// re-seal the TPM state, to shut it out entirely.
func (p *Protector) Revoke(fingerprint string, owner *Guardian) error {
	if err := p.checkOwner(owner); err != nil {
		return err
	}
	i := p.index(strings.ToLower(fingerprint))
	if i < 0 {
		return fmt.Errorf("guardian: no row for guardian %s in the protector of TPM %s; see Rows for who holds one", fingerprint, p.tpm)
	}
	if p.rows[i].g.fp == p.owner.fp {
		return fmt.Errorf("guardian: cannot revoke the owner %v from its own protector", p.owner)
	}
	saved := p.rows
	p.rows = slices.Delete(slices.Clone(p.rows), i, i+1)
	p.version++
	if err := p.sign(owner); err != nil {
		p.rows, p.version = saved, p.version-1
		return err
	}
	return nil
}

// Rekey returns the protector that replaces p when the TPM's data key
// changes to newDEK: the same TPM and owner, the same guardians except
// those whose fingerprints are in drop, every row wrapping newDEK, and the
// next version. owner must be p's owner with its private key; the owner's
// own row cannot be dropped. p is not changed.
func (p *Protector) Rekey(newDEK []byte, owner *Guardian, drop ...string) (*Protector, error) {
	if err := p.checkOwner(owner); err != nil {
		return nil, err
	}
	if len(newDEK) != DEKSize {
		return nil, fmt.Errorf("guardian: data key is %d bytes, want %d", len(newDEK), DEKSize)
	}
	for _, fp := range drop {
		switch i := p.index(strings.ToLower(fp)); {
		case i < 0:
			return nil, fmt.Errorf("guardian: no row for guardian %s in the protector of TPM %s; see Rows for who holds one", fp, p.tpm)
		case p.rows[i].g.fp == p.owner.fp:
			return nil, fmt.Errorf("guardian: cannot revoke the owner %v from its own protector", p.owner)
		}
	}
	q := &Protector{tpm: p.tpm, version: p.version + 1, owner: p.owner, keyCheck: keyCheck(p.tpm, newDEK)}
	for _, r := range p.rows {
		if slices.ContainsFunc(drop, func(fp string) bool { return strings.EqualFold(fp, r.g.fp) }) {
			continue
		}
		if err := q.add(newDEK, r.g); err != nil {
			return nil, err
		}
	}
	if err := q.sign(owner); err != nil {
		return nil, err
	}
	return q, nil
}

// Open unwraps the data key with the first of gs (private guardians) that
// holds a row, and returns it with that guardian. If none holds a row it
// returns a *NoGuardianError listing the rows.
func (p *Protector) Open(gs []*Guardian) (dek []byte, by *Guardian, err error) {
	var errs []error
	for _, r := range p.rows {
		for _, g := range gs {
			if g == nil || g.fp != r.g.fp || !g.HasPrivate() {
				continue
			}
			kdf, aead := suite()
			dek, err := hpke.Open(g.encKey, kdf, aead, p.wrapInfo(g.fp), r.wrap)
			if err != nil {
				errs = append(errs, fmt.Errorf("the row of %v does not open: %w", g, err))
				continue
			}
			if len(dek) != DEKSize || subtle.ConstantTimeCompare(keyCheck(p.tpm, dek), p.keyCheck) != 1 {
				errs = append(errs, fmt.Errorf("the row of %v holds a key that fails the protector's key check", g))
				continue
			}
			return dek, g, nil
		}
	}
	if len(errs) > 0 {
		return nil, nil, fmt.Errorf("guardian: opening the key protector of TPM %s: %w", p.tpm, errors.Join(errs...))
	}
	return nil, nil, &NoGuardianError{TPM: p.tpm, Rows: p.Rows()}
}

// Holds reports whether dek is the data key p protects (it passes p's key
// check), for a key obtained some other way, such as an imported key file.
func (p *Protector) Holds(dek []byte) bool {
	return len(dek) == DEKSize && subtle.ConstantTimeCompare(keyCheck(p.tpm, dek), p.keyCheck) == 1
}

// TPM returns the UUID of the TPM whose data key p protects.
func (p *Protector) TPM() uuid.UUID { return p.tpm }

// Version returns p's version: 1 for a new protector, raised by every
// Grant, Revoke and Rekey, and signed by the owner, so that a host that saw
// a newer version can refuse an older copy. A format 1 protector, written
// before versions existed, is version 0.
func (p *Protector) Version() uint64 { return p.version }

// Owner returns the (public) owner guardian. ParseProtector only proves that
// the owner signed the protector; a caller that knows which owner to expect
// compares its fingerprint.
func (p *Protector) Owner() *Guardian { return p.owner }

// Rows returns the guardians allowed to open p, in order.
func (p *Protector) Rows() []Row {
	rs := make([]Row, len(p.rows))
	for i, r := range p.rows {
		rs[i] = Row{Name: r.g.name, Subject: r.g.Subject(), Fingerprint: r.g.fp, KEM: r.g.kem, Guardian: r.g}
	}
	return rs
}

// signedBytes is the canonical encoding covered by the owner's signature.
func (p *Protector) signedBytes() []byte {
	b := append([]byte(signedLabel), 0)
	b = binary.BigEndian.AppendUint16(b, p.format())
	b = append(b, p.tpm[:]...)
	if p.format() >= 2 {
		b = binary.BigEndian.AppendUint64(b, p.version)
	}
	b = appendBytes(b, p.owner.signCert.Raw)
	b = appendBytes(b, p.keyCheck)
	b = binary.BigEndian.AppendUint32(b, uint32(len(p.rows)))
	for _, r := range p.rows {
		b = appendBytes(b, r.g.signCert.Raw)
		b = appendBytes(b, r.g.encCert.Raw)
		b = appendBytes(b, r.wrap)
	}
	return b
}

// format is the format p is signed and stored in: version 0 exists only
// as a format 1 file read from disk, and stays in that format so that its
// signature still verifies; every change raises the version and so
// writes format 2.
func (p *Protector) format() uint16 {
	if p.version == 0 {
		return 1
	}
	return ProtectorFormat
}

func appendBytes(b, v []byte) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
	return append(b, v...)
}

func (p *Protector) sign(owner *Guardian) error {
	h := sha256.Sum256(p.signedBytes())
	sig, err := owner.signer.Sign(rand.Reader, h[:], crypto.SHA256)
	if err != nil {
		return fmt.Errorf("guardian: signing key protector with %v: %w", owner, err)
	}
	p.sig = sig
	return nil
}

// protectorJSON is the stored form of a Protector.
type protectorJSON struct {
	Format    int       `json:"format"`
	Version   uint64    `json:"version,omitempty"` // format 2
	TPM       uuid.UUID `json:"tpm"`
	Owner     ownerJSON `json:"owner"`
	KeyCheck  []byte    `json:"key_check"`
	Rows      []rowJSON `json:"rows"`
	Signature []byte    `json:"signature"`
}

type ownerJSON struct {
	Name        string `json:"name"`
	Fingerprint string `json:"fingerprint"`
	Cert        []byte `json:"cert"`
}

type rowJSON struct {
	Name        string `json:"name"`
	Subject     string `json:"subject"`
	Fingerprint string `json:"fingerprint"`
	KEM         uint16 `json:"kem"`
	SignCert    []byte `json:"sign_cert"`
	EncCert     []byte `json:"enc_cert"`
	Wrap        []byte `json:"wrap"`
}

// Marshal encodes p as indented JSON.
func (p *Protector) Marshal() []byte {
	j := protectorJSON{
		Format:    int(p.format()),
		Version:   p.version,
		TPM:       p.tpm,
		Owner:     ownerJSON{Name: p.owner.name, Fingerprint: p.owner.fp, Cert: p.owner.signCert.Raw},
		KeyCheck:  p.keyCheck,
		Signature: p.sig,
	}
	for _, r := range p.rows {
		j.Rows = append(j.Rows, rowJSON{
			Name:        r.g.name,
			Subject:     r.g.Subject(),
			Fingerprint: r.g.fp,
			KEM:         uint16(r.g.kem),
			SignCert:    r.g.signCert.Raw,
			EncCert:     r.g.encCert.Raw,
			Wrap:        r.wrap,
		})
	}
	b, err := json.MarshalIndent(j, "", "\t")
	if err != nil {
		panic(err) // all fields are plain data
	}
	return append(b, '\n')
}

// ParseProtector decodes a protector written by Marshal and verifies it: the
// certificates of every row, the consistency of the descriptive fields with
// them, and the owner's signature over the whole. Any change made outside
// vtpm yields an error wrapping ErrTampered.
func ParseProtector(b []byte) (*Protector, error) {
	var j protectorJSON
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(&j); err != nil {
		return nil, fmt.Errorf("guardian: key protector is not valid JSON (truncated or edited?): %w", err)
	}
	if d.More() {
		return nil, errors.New("guardian: trailing data after the key protector")
	}
	if j.Format < 1 || j.Format > ProtectorFormat {
		return nil, fmt.Errorf("guardian: key protector format %d is not supported (this vtpm reads formats 1 to %d); upgrade vtpm", j.Format, ProtectorFormat)
	}
	tampered := func(format string, args ...any) error {
		return fmt.Errorf("%w (TPM %s): %s", ErrTampered, j.TPM, fmt.Sprintf(format, args...))
	}
	// Format 1 has no version; format 2 always has one. A version removed
	// or added changes the signed bytes too, but say what is wrong.
	if (j.Format == 1) != (j.Version == 0) {
		return nil, tampered("format %d with version %d", j.Format, j.Version)
	}
	p := &Protector{tpm: j.TPM, version: j.Version, keyCheck: j.KeyCheck, sig: j.Signature}
	if len(j.KeyCheck) != 32 {
		return nil, tampered("key check is %d bytes, want 32", len(j.KeyCheck))
	}
	if len(j.Rows) == 0 {
		return nil, tampered("no rows")
	}
	for i, rj := range j.Rows {
		g, err := fromDER(rj.SignCert, rj.EncCert)
		if err != nil {
			return nil, tampered("row %d: %v", i+1, err)
		}
		if g.name != rj.Name || g.Subject() != rj.Subject || g.fp != rj.Fingerprint || uint16(g.kem) != rj.KEM {
			return nil, tampered("row %d names %s (%s) but its certificates are those of %v", i+1, rj.Name, rj.Fingerprint, g)
		}
		if p.index(g.fp) >= 0 {
			return nil, tampered("guardian %v has two rows", g)
		}
		if bytes.Equal(rj.SignCert, j.Owner.Cert) {
			p.owner = g
		}
		p.rows = append(p.rows, row{g: g, wrap: rj.Wrap})
	}
	if p.owner == nil {
		// The owner always holds a row: NewProtector adds it and Revoke
		// refuses to remove it.
		return nil, tampered("the owner %s (%s) has no row", j.Owner.Name, j.Owner.Fingerprint)
	}
	if p.owner.fp != j.Owner.Fingerprint || p.owner.name != j.Owner.Name {
		return nil, tampered("owner %s (%s) does not match the owner certificate, which is that of %v", j.Owner.Name, j.Owner.Fingerprint, p.owner)
	}
	h := sha256.Sum256(p.signedBytes())
	if !ecdsa.VerifyASN1(p.owner.signCert.PublicKey.(*ecdsa.PublicKey), h[:], j.Signature) {
		return nil, tampered("the owner's signature (%v) does not verify; restore the protector from a copy, or have the owner re-grant", p.owner)
	}
	return p, nil
}

// MigrationKey derives the key that protects a TPM's state in a migration
// stream from its data key: HKDF-SHA256 with info "vtpm migration key v1",
// 32 bytes.
func MigrationKey(dek []byte) []byte {
	k, err := hkdf.Key(sha256.New, dek, nil, migrationInfo, 32)
	if err != nil {
		panic(err) // only for invalid lengths
	}
	return k
}
