package attest_test

import (
	"bytes"
	"crypto"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vtpm/internal/attest"
	"vtpm/internal/attest/attesttest"
	"vtpm/internal/errdefs"
	"vtpm/internal/testutil"
)

var now = time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)

// host is a booted host TPM stand-in opened for attestation.
func host(t *testing.T, boot attesttest.Boot, ek attest.EKType) (*attesttest.HostTPM, *attest.Host) {
	t.Helper()
	tpm := attesttest.Start(t, boot)
	h, err := attest.OpenHost(attest.HostOptions{TPM: tpm.Spec, EventLog: tpm.EventLog, EK: ek})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return tpm, h
}

func registered(t *testing.T, h *attest.Host) crypto.PublicKey {
	t.Helper()
	ek, err := h.EK()
	if err != nil {
		t.Fatal(err)
	}
	return ek
}

// attestOnce runs one whole exchange and returns the verified result.
func attestOnce(t *testing.T, h *attest.Host, ek crypto.PublicKey) (*attest.Result, error) {
	t.Helper()
	s, c, err := attest.NewSession(ek, h.EKPublic(), h.AKPublic(), now, 0, nil)
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	ev, err := h.Answer(*c)
	if err != nil {
		t.Fatalf("Answer: %v", err)
	}
	return s.Verify(ev, now.Add(time.Second))
}

func evidenceReason(t *testing.T, err error, want attest.Reason) *attest.EvidenceError {
	t.Helper()
	var ee *attest.EvidenceError
	if !errors.As(err, &ee) {
		t.Fatalf("got %v, want an EvidenceError (%s)", err, want)
	}
	if ee.Reason != want {
		t.Fatalf("reason %s (%v), want %s", ee.Reason, err, want)
	}
	if !errors.Is(err, errdefs.ErrPermissionDenied) {
		t.Errorf("%v is not PermissionDenied", err)
	}
	return ee
}

func TestRoundTrip(t *testing.T) {
	for _, ekType := range []attest.EKType{attest.EKRSA, attest.EKECC} {
		t.Run(string(ekType), func(t *testing.T) {
			_, h := host(t, attesttest.Reference, ekType)
			ek := registered(t, h)
			r, err := attestOnce(t, h, ek)
			if err != nil {
				t.Fatal(err)
			}
			if !r.SecureBoot {
				t.Error("Secure Boot not seen on")
			}
			if !slices.EqualFunc(r.PCRs, attesttest.Reference.PCRs(), bytes.Equal) {
				t.Errorf("PCRs %x, want the reference boot's %x", r.PCRs, attesttest.Reference.PCRs())
			}
			if r.EKFingerprint != attest.EKFingerprint(ek) || len(r.EKFingerprint) != 64 {
				t.Errorf("EK fingerprint %q", r.EKFingerprint)
			}
			p, err := attest.Capture("fleet", "x86-ovmf", r)
			if err != nil {
				t.Fatal(err)
			}
			if err := p.Evaluate("x86-ovmf", r); err != nil {
				t.Fatalf("the reference boot is refused by its own policy: %v", err)
			}
			// The policy survives JSON.
			b, err := json.Marshal(p)
			if err != nil {
				t.Fatal(err)
			}
			q, err := attest.ParsePolicy(b)
			if err != nil {
				t.Fatal(err)
			}
			if err := q.Evaluate("x86-ovmf", r); err != nil {
				t.Fatalf("after JSON: %v", err)
			}
		})
	}
}

// TestSecondHostSameBoot: another TPM (another EK) that booted the same
// firmware passes the policy captured on the reference host.
func TestSecondHostSameBoot(t *testing.T) {
	_, ref := host(t, attesttest.Reference, "")
	r, err := attestOnce(t, ref, registered(t, ref))
	if err != nil {
		t.Fatal(err)
	}
	p, err := attest.Capture("fleet", "x86-ovmf", r)
	if err != nil {
		t.Fatal(err)
	}
	_, other := host(t, attesttest.Reference, "")
	r2, err := attestOnce(t, other, registered(t, other))
	if err != nil {
		t.Fatal(err)
	}
	if r2.EKFingerprint == r.EKFingerprint {
		t.Fatal("two stand-ins share an EK")
	}
	if err := p.Evaluate("x86-ovmf", r2); err != nil {
		t.Fatal(err)
	}
}

func TestPolicyRefusesOtherBoot(t *testing.T) {
	_, ref := host(t, attesttest.Reference, "")
	r, err := attestOnce(t, ref, registered(t, ref))
	if err != nil {
		t.Fatal(err)
	}
	p, err := attest.Capture("fleet", "x86-ovmf", r)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name          string
		boot          attesttest.Boot
		class         string
		pcrs          []int
		secureBootOff bool
		noClass       bool
		msg           string
	}{
		{"other db", attesttest.OtherDB, "x86-ovmf", []int{7}, false, false, "PCR 7 differs from policy fleet (class x86-ovmf)"},
		{"Secure Boot off", attesttest.SecureBootOff, "x86-ovmf", []int{7}, true, false, "Secure Boot is off and policy fleet requires it"},
		{"other firmware and db", attesttest.Boot{Firmware: "2.0", DB: "Other DB"}, "x86-ovmf", []int{0, 7}, false, false, "PCRs 0, 7 differ from policy fleet"},
		{"unknown class", attesttest.Reference, "arm-edk2", nil, false, true, `policy fleet accepts no hardware class "arm-edk2"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, h := host(t, tc.boot, "")
			r, err := attestOnce(t, h, registered(t, h))
			if err != nil {
				t.Fatalf("the evidence itself must verify: %v", err)
			}
			err = p.Evaluate(tc.class, r)
			var pe *attest.PolicyError
			if !errors.As(err, &pe) {
				t.Fatalf("got %v, want a PolicyError", err)
			}
			var got []int
			for _, m := range pe.Mismatches {
				got = append(got, m.PCR)
			}
			if !slices.Equal(got, tc.pcrs) || pe.SecureBootOff != tc.secureBootOff || pe.NoClass != tc.noClass {
				t.Errorf("mismatches %v, Secure Boot off %v, no class %v; want %v, %v, %v", got, pe.SecureBootOff, pe.NoClass, tc.pcrs, tc.secureBootOff, tc.noClass)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("message %q lacks %q", err, tc.msg)
			}
			if pe.Policy != "fleet" || !errors.Is(err, errdefs.ErrPermissionDenied) || len(errdefs.Remedies(err)) == 0 {
				t.Errorf("policy %q, kind PermissionDenied %v, remedies %v", pe.Policy, errors.Is(err, errdefs.ErrPermissionDenied), errdefs.Remedies(err))
			}
			if tc.secureBootOff {
				if _, err := attest.Capture("off", "x86-ovmf", r); !errors.Is(err, errdefs.ErrFailedPrecondition) {
					t.Errorf("capture from a host with Secure Boot off: %v", err)
				}
			}
		})
	}
}

// TestAKFromAnotherTPM: a host claiming another host's registered EK cannot
// activate the credential with its own TPM, nor guess the secret.
func TestAKFromAnotherTPM(t *testing.T) {
	_, a := host(t, attesttest.Reference, "")
	_, b := host(t, attesttest.Reference, "")
	ekA := registered(t, a)

	// B presents its own EK where A's is registered.
	if _, _, err := attest.NewSession(ekA, b.EKPublic(), b.AKPublic(), now, 0, nil); err == nil {
		t.Fatal("another EK than the registered one was accepted")
	} else {
		evidenceReason(t, err, attest.ReasonEKNotRegistered)
	}

	// B presents A's EK with its own AK: the credential is encrypted to A's
	// EK, which B's TPM does not hold.
	s, c, err := attest.NewSession(ekA, a.EKPublic(), b.AKPublic(), now, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Activate(*c); err == nil {
		t.Fatal("a TPM activated a credential made for another TPM's EK")
	} else {
		evidenceReason(t, err, attest.ReasonActivation)
	}
	ev, err := b.Quote(c.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	ev.Secret = bytes.Repeat([]byte{1}, 32)
	_, err = s.Verify(ev, now)
	evidenceReason(t, err, attest.ReasonActivation)

	// A's TPM activates only for the AK the credential names: B's AK name.
	if _, err := a.Activate(*c); err == nil {
		t.Fatal("the credential was activated for another AK than the one it names")
	}
}

func TestLogDoesNotReplay(t *testing.T) {
	tpm, h := host(t, attesttest.Reference, "")
	ek := registered(t, h)

	// The log of another boot than the one measured.
	if err := os.WriteFile(tpm.EventLog, attesttest.OtherDB.Log(), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := attestOnce(t, h, ek)
	ee := evidenceReason(t, err, attest.ReasonReplay)
	if !slices.Equal(ee.PCRs, []int{7}) || !strings.Contains(err.Error(), "does not replay to the quoted PCR 7") {
		t.Errorf("PCRs %v, message %q", ee.PCRs, err)
	}

	// A log that leaves out PCR 4's events.
	var events []attesttest.Event
	for _, e := range attesttest.Reference.Events() {
		if e.PCR != 4 {
			events = append(events, e)
		}
	}
	if err := os.WriteFile(tpm.EventLog, attesttest.EncodeLog(events), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = attestOnce(t, h, ek)
	if ee := evidenceReason(t, err, attest.ReasonReplay); !slices.Equal(ee.PCRs, []int{4}) {
		t.Errorf("PCRs %v, want [4]", ee.PCRs)
	}

	// PCR values that are not the quoted ones.
	if err := os.WriteFile(tpm.EventLog, attesttest.Reference.Log(), 0o644); err != nil {
		t.Fatal(err)
	}
	s, c, err := attest.NewSession(ek, h.EKPublic(), h.AKPublic(), now, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := h.Answer(*c)
	if err != nil {
		t.Fatal(err)
	}
	ev.PCRs[7] = attesttest.OtherDB.PCRs()[7]
	_, err = s.Verify(ev, now)
	evidenceReason(t, err, attest.ReasonQuote)
}

func TestStaleNonce(t *testing.T) {
	_, h := host(t, attesttest.Reference, "")
	ek := registered(t, h)
	_, old, err := attest.NewSession(ek, h.EKPublic(), h.AKPublic(), now, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	oldEv, err := h.Answer(*old)
	if err != nil {
		t.Fatal(err)
	}

	s, c, err := attest.NewSession(ek, h.EKPublic(), h.AKPublic(), now, time.Minute, nil)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(c.Nonce, old.Nonce) {
		t.Fatal("two sessions share a nonce")
	}
	// The credential answered, but the quote is the old one.
	secret, err := h.Activate(*c)
	if err != nil {
		t.Fatal(err)
	}
	replayed := *oldEv
	replayed.Secret = secret
	_, err = s.Verify(&replayed, now)
	evidenceReason(t, err, attest.ReasonNonce)

	// A fresh answer, too late.
	ev, err := h.Answer(*c)
	if err != nil {
		t.Fatal(err)
	}
	_, err = s.Verify(ev, now.Add(time.Minute+time.Second))
	evidenceReason(t, err, attest.ReasonExpired)

	// In time, it verifies.
	if _, err := s.Verify(ev, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
}

func TestEventLogMissing(t *testing.T) {
	tpm, h := host(t, attesttest.Reference, "")
	if err := os.Remove(tpm.EventLog); err != nil {
		t.Fatal(err)
	}
	_, err := h.Quote(make([]byte, 32))
	if !errors.Is(err, errdefs.ErrNotFound) || !strings.Contains(err.Error(), tpm.EventLog) || len(errdefs.Remedies(err)) == 0 {
		t.Fatalf("got %v", err)
	}
}

// TestCaptureHost: a reference host captures its own boot; a host of the
// same boot passes it without naming a class (a host registered with a
// policy only), another db does not.
func TestCaptureHost(t *testing.T) {
	ref := attesttest.Start(t, attesttest.Reference)
	p, err := attest.CaptureHost(attest.HostOptions{TPM: ref.Spec, EventLog: ref.EventLog}, "fleet", "x86-ovmf")
	if err != nil {
		t.Fatal(err)
	}
	if !p.SecureBoot || len(p.Classes["x86-ovmf"]) != 1 {
		t.Fatalf("policy %s", p)
	}
	_, h := host(t, attesttest.Reference, "")
	r, err := attestOnce(t, h, registered(t, h))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Evaluate("", r); err != nil {
		t.Fatal(err)
	}
	_, other := host(t, attesttest.OtherDB, "")
	r2, err := attestOnce(t, other, registered(t, other))
	if err != nil {
		t.Fatal(err)
	}
	err = p.Evaluate("", r2)
	if err == nil || !strings.Contains(err.Error(), "PCR 7 differs from policy fleet (class x86-ovmf)") {
		t.Fatalf("got %v", err)
	}

	// Capturing again from another reference adds its boot once.
	p.Merge(mustCapture(t, "fleet", "x86-ovmf", r2))
	p.Merge(mustCapture(t, "fleet", "x86-ovmf", r2))
	if len(p.Classes["x86-ovmf"]) != 2 {
		t.Fatalf("after merging: %s", p)
	}
	if err := p.Evaluate("", r2); err != nil {
		t.Fatal(err)
	}

	off := attesttest.Start(t, attesttest.SecureBootOff)
	if _, err := attest.CaptureHost(attest.HostOptions{TPM: off.Spec, EventLog: off.EventLog}, "fleet", "x86-ovmf"); !errors.Is(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("capture with Secure Boot off: %v", err)
	}
}

func mustCapture(t *testing.T, name, class string, r *attest.Result) *attest.Policy {
	t.Helper()
	p, err := attest.Capture(name, class, r)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestPublicAreaForms: the EK and AK may come as TPMT_PUBLIC or
// TPM2B_PUBLIC, the EK also as a PEM public key.
func TestPublicAreaForms(t *testing.T) {
	_, h := host(t, attesttest.Reference, attest.EKECC)
	ek := registered(t, h)
	sized := func(b []byte) []byte { return append([]byte{byte(len(b) >> 8), byte(len(b))}, b...) }
	pemEK, err := attest.MarshalEK(ek)
	if err != nil {
		t.Fatal(err)
	}
	for name, form := range map[string][]byte{"TPMT_PUBLIC": h.EKPublic(), "TPM2B_PUBLIC": sized(h.EKPublic()), "PEM": pemEK} {
		got, err := attest.ParseEK(form)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if attest.EKFingerprint(got) != attest.EKFingerprint(ek) {
			t.Errorf("%s: another key", name)
		}
	}
	s, c, err := attest.NewSession(ek, sized(h.EKPublic()), sized(h.AKPublic()), now, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := h.Answer(*c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Verify(ev, now); err != nil {
		t.Fatal(err)
	}
	// The EK is not an AK.
	if _, _, err := attest.CheckAK(h.EKPublic()); err == nil {
		t.Fatal("the EK passed as an AK")
	} else {
		evidenceReason(t, err, attest.ReasonBadAK)
	}
}

// TestEventLogFixture: the fixture's log parses and replays, with
// go-attestation, to the PCR values its extends give, and its Secure Boot
// state is what the boot says; variants differ in PCR 7 only.
func TestEventLogFixture(t *testing.T) {
	ref := attesttest.Reference.PCRs()
	for _, tc := range []struct {
		name       string
		boot       attesttest.Boot
		secureBoot bool
		differ     []int
	}{
		{"reference", attesttest.Reference, true, nil},
		{"other db", attesttest.OtherDB, true, []int{7}},
		{"Secure Boot off", attesttest.SecureBootOff, false, []int{7}},
		{"other firmware", attesttest.Boot{Firmware: "2.0"}, true, []int{0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pcrs := tc.boot.PCRs()
			var differ []int
			for i := range pcrs {
				if !bytes.Equal(pcrs[i], ref[i]) {
					differ = append(differ, i)
				}
			}
			if !slices.Equal(differ, tc.differ) {
				t.Errorf("PCRs %v differ from the reference, want %v", differ, tc.differ)
			}
			sb, err := attest.ReplayLog(tc.boot.Log(), pcrs)
			if err != nil {
				t.Fatal(err)
			}
			if sb != tc.secureBoot {
				t.Errorf("Secure Boot %v, want %v", sb, tc.secureBoot)
			}
			if _, err := attest.ReplayLog(tc.boot.Log(), attesttest.Boot{Firmware: "3.0", DB: "x"}.PCRs()); err == nil {
				t.Error("the log replays to another boot's PCRs")
			}
		})
	}
}

// TestUnixSocketTPM: a host TPM on a unix socket ("unix:PATH", as a swtpm
// or vtpm data socket) attests as one on TCP does.
func TestUnixSocketTPM(t *testing.T) {
	testutil.Need(t, "swtpm")
	dir := t.TempDir()
	sock := filepath.Join(dir, "tpm.sock")
	testutil.Start(t, "swtpm", nil, sock,
		"--tpm2",
		"--server", "type=unixio,path="+sock,
		"--ctrl", "type=unixio,path="+filepath.Join(dir, "ctrl.sock"),
		"--flags", "not-need-init,startup-clear",
		"--tpmstate", "dir="+dir)
	spec := "unix:" + sock
	if err := attesttest.Extend(spec, attesttest.Reference.Events()); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "binary_bios_measurements")
	if err := os.WriteFile(log, attesttest.Reference.Log(), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := attest.OpenHost(attest.HostOptions{TPM: spec, EventLog: log})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	r, err := attestOnce(t, h, registered(t, h))
	if err != nil {
		t.Fatal(err)
	}
	if !r.SecureBoot {
		t.Error("Secure Boot not seen on")
	}
}
