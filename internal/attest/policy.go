package attest

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strconv"

	"vtpm/internal/errdefs"
)

// Digest is a PCR value, hex in JSON.
type Digest []byte

// MarshalText encodes d as hex.
func (d Digest) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(d)), nil }

// UnmarshalText decodes hex.
func (d *Digest) UnmarshalText(b []byte) error {
	v, err := hex.DecodeString(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}

// PCRValues is one accepted boot: a value for each of PCRs 0–7.
type PCRValues map[int]Digest

// Policy is a named attestation policy: the boots accepted per hardware
// class (a set of PCR 0–7 values each, captured from reference hosts), and
// whether Secure Boot must be on.
type Policy struct {
	Name       string                 `json:"name"`
	SecureBoot bool                   `json:"secure_boot"`
	Classes    map[string][]PCRValues `json:"classes"`
}

// Capture makes a policy named name that accepts the boot a reference host
// of a hardware class proved (verified evidence). The reference host must
// boot with Secure Boot on, and the policy requires it.
func Capture(name, class string, r *Result) (*Policy, error) {
	if name == "" || class == "" {
		return nil, errdefs.New(errdefs.ErrInvalidArgument, "a policy needs a name and a hardware class")
	}
	if !r.SecureBoot {
		return nil, &errdefs.Error{
			Kind: errdefs.ErrFailedPrecondition,
			Msg:  fmt.Sprintf("the reference host for policy %s booted with Secure Boot off", name),
			Fix:  []errdefs.Remedy{errdefs.Advise("turn Secure Boot on in the reference host's firmware, boot it, and capture again")},
		}
	}
	p := &Policy{Name: name, SecureBoot: true}
	p.Add(class, r.PCRs)
	return p, nil
}

// Add accepts one more boot for a class (a no-op if it is accepted already).
func (p *Policy) Add(class string, pcrs [][]byte) {
	v := make(PCRValues, len(PCRs))
	for i, idx := range PCRs {
		v[idx] = bytes.Clone(pcrs[i])
	}
	if p.Classes == nil {
		p.Classes = map[string][]PCRValues{}
	}
	if slices.ContainsFunc(p.Classes[class], func(o PCRValues) bool { return len(diff(o, pcrs)) == 0 }) {
		return
	}
	p.Classes[class] = append(p.Classes[class], v)
}

// Merge adds every boot q accepts to p (a second reference host, a new
// firmware version).
func (p *Policy) Merge(q *Policy) {
	for _, class := range slices.Sorted(maps.Keys(q.Classes)) {
		for _, v := range q.Classes[class] {
			pcrs := make([][]byte, len(PCRs))
			for i, idx := range PCRs {
				pcrs[i] = v[idx]
			}
			p.Add(class, pcrs)
		}
	}
	p.SecureBoot = p.SecureBoot || q.SecureBoot
}

// Validate checks that every accepted boot gives all of PCRs 0–7 as SHA-256
// digests.
func (p *Policy) Validate() error {
	if p.Name == "" {
		return errdefs.New(errdefs.ErrInvalidArgument, "the policy has no name")
	}
	for class, sets := range p.Classes {
		for i, v := range sets {
			for _, idx := range PCRs {
				if len(v[idx]) != 32 {
					return errdefs.New(errdefs.ErrInvalidArgument, "policy %s, class %s, boot %d: PCR %d is not a SHA-256 digest", p.Name, class, i+1, idx)
				}
			}
			if len(v) != len(PCRs) {
				return errdefs.New(errdefs.ErrInvalidArgument, "policy %s, class %s, boot %d: only PCRs 0-7 may be given", p.Name, class, i+1)
			}
		}
	}
	return nil
}

// ParsePolicy reads a policy from JSON and validates it.
func ParsePolicy(b []byte) (*Policy, error) {
	var p Policy
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInvalidArgument, err, "parse attestation policy")
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// Evaluate judges a verified boot of a host of the given hardware class: its
// PCR values must be one of the boots accepted for the class, and Secure
// Boot on if the policy requires it. An empty class accepts the boots of
// every class (a host registered without one). A refusal is a *PolicyError
// naming the PCRs that differ from the closest accepted boot.
func (p *Policy) Evaluate(class string, r *Result) error {
	_, err := p.Match(class, r)
	return err
}

// Match is Evaluate that also returns the class whose boot matched.
func (p *Policy) Match(class string, r *Result) (string, error) {
	e := &PolicyError{Policy: p.Name, Class: class}
	classes := []string{class}
	if class == "" {
		classes = slices.Sorted(maps.Keys(p.Classes))
	}
	found := false
	for _, c := range classes {
		for _, v := range p.Classes[c] {
			d := diff(v, r.PCRs)
			if !found || len(d) < len(e.Mismatches) {
				e.Class, e.Mismatches = c, d
			}
			found = true
		}
	}
	e.NoClass = !found
	e.SecureBootOff = p.SecureBoot && !r.SecureBoot
	if e.NoClass || len(e.Mismatches) > 0 || e.SecureBootOff {
		return "", e
	}
	return e.Class, nil
}

// diff lists the PCRs whose value in got differs from want.
func diff(want PCRValues, got [][]byte) []Mismatch {
	var out []Mismatch
	for i, idx := range PCRs {
		var g []byte
		if i < len(got) {
			g = got[i]
		}
		if !bytes.Equal(want[idx], g) {
			out = append(out, Mismatch{PCR: idx, Got: g, Want: want[idx]})
		}
	}
	return out
}

// String is a one-line summary.
func (p *Policy) String() string {
	n := 0
	for _, s := range p.Classes {
		n += len(s)
	}
	sb := "Secure Boot required"
	if !p.SecureBoot {
		sb = "Secure Boot not required"
	}
	return p.Name + ": " + strconv.Itoa(len(p.Classes)) + " hardware classes, " + strconv.Itoa(n) + " accepted boots, " + sb
}
