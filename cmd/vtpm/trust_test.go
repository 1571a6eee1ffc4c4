package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vtpm/internal/testutil"
)

// These tests attack the key commands with files that travel between hosts:
// a TPM swapped for one owned by someone else, and a key protector saved
// before a revocation and put back.

// startTPM runs a vTPM on h for the state in dir and shuts it down again;
// it must start.
func (h *cliHost) startTPM(dir string) {
	h.t.Helper()
	sock := filepath.Join(shortTemp(h.t), "ctrl")
	p := testutil.Start(h.t, testutil.Binary(h.t), h.env(), sock,
		"--tpm2", "--tpmstate", "dir="+dir, "--ctrl", "type=unixio,path="+sock, "--flags", "not-need-init,startup-clear")
	testutil.Run(h.t, nil, "swtpm_ioctl", "--unix", sock, "-s")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := p.Wait(ctx); err != nil {
		h.t.Fatalf("vTPM did not exit cleanly: %v\n%s", err, p.Stderr)
	}
}

// refuseTPM runs a vTPM on h for the state in dir that must refuse to
// start, and returns what it printed.
func (h *cliHost) refuseTPM(dir string) string {
	h.t.Helper()
	sock := filepath.Join(shortTemp(h.t), "ctrl")
	return h.fail("swtpm", "socket", "--tpm2", "--tpmstate", "dir="+dir, "--ctrl", "type=unixio,path="+sock, "--flags", "not-need-init,startup-clear")
}

// replaceTPM empties dir and copies the files of src's TPM into it: the
// bundle's tpm/ replaced wholesale.
func replaceTPM(t *testing.T, dir, src string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range filesUnder(t, src) {
		if name == ".lock" || strings.Contains(name, "/") {
			continue
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestForeignOwnerSwapRefused: the TPM in a bundle is replaced by one its
// writer owns (so they know its key) and granted to this host. This host's
// guardian opens its protector, but the owner is no guardian this host
// holds or trusts: the vTPM refuses, naming the owner and the way to trust
// it, and nothing in the bundle changes. Trusted, it starts; untrusted
// again, it is refused again.
func TestForeignOwnerSwapRefused(t *testing.T) {
	t.Parallel()
	testutil.Need(t, "swtpm_ioctl")
	h, mallory := newCLIHost(t), newCLIHost(t)
	bundle := h.newTPMDir()
	hers := mallory.newTPMDir()
	dir := t.TempDir()
	certsH, certsM := filepath.Join(dir, "h.pem"), filepath.Join(dir, "m.pem")
	h.run("guardian", "export", "--certs-only", "-o", certsH)
	mallory.run("guardian", "export", "--certs-only", "-o", certsM)
	mallory.run("protector", "grant", hers, certsH)
	replaceTPM(t, bundle, hers)
	fpM := mallory.fingerprint()

	before, ks := filesUnder(t, bundle), h.keystore()
	wantIn(t, h.refuseTPM(bundle), "neither holds nor trusts", fpM, "vtpm guardian trust owner.pem", "vtpm guardian export --certs-only -o owner.pem")
	if !sameFiles(filesUnder(t, bundle), before) {
		t.Error("the refused start changed the bundle's TPM")
	}
	if !sameFiles(h.keystore(), ks) {
		t.Error("the refused start changed the keystore")
	}
	// Every command that opens the key refuses it alike.
	wantIn(t, h.fail("key", "export", bundle, "-o", filepath.Join(dir, "k"), "--passphrase-file", writeFile(t, dir, "pp", "pp")), "neither holds nor trusts", fpM)

	wantIn(t, h.run("guardian", "trust", certsM), "trusting guardian", fpM)
	wantIn(t, h.run("guardian", "trust", certsM), "trusted already")
	wantIn(t, h.run("guardian", "list"), fpM[:16], "trusted only")
	wantIn(t, h.fail("guardian", "trust", certsH), "held by this host")
	h.startTPM(bundle)
	wantIn(t, h.run("guardian", "untrust", fpM[:12]), "no longer trusting", fpM)
	if strings.Contains(h.run("guardian", "list"), fpM[:16]) {
		t.Error("guardian list still shows the untrusted guardian")
	}
	wantIn(t, h.refuseTPM(bundle), "neither holds nor trusts", fpM)
}

// TestRevokedProtectorRefused: host B, granted a TPM of host A, kept a copy
// of the protector that admitted it. A revokes B, which re-keys the TPM.
// B putting the old protector back is refused, and so is A handed the old
// protector again; neither attempt changes the TPM's files.
func TestRevokedProtectorRefused(t *testing.T) {
	t.Parallel()
	testutil.Need(t, "swtpm_ioctl")
	a, b := newCLIHost(t), newCLIHost(t)
	tpm := a.newTPMDir()
	dir := t.TempDir()
	certsA, certsB := filepath.Join(dir, "a.pem"), filepath.Join(dir, "b.pem")
	a.run("guardian", "export", "--certs-only", "-o", certsA)
	b.run("guardian", "export", "--certs-only", "-o", certsB)
	wantIn(t, a.run("protector", "grant", tpm, certsB), "granted", "protector version 2")

	// What B must do now: trust A, the owner, as well as be granted.
	copyB := copyTPMDir(t, tpm)
	wantIn(t, b.refuseTPM(copyB), "neither holds nor trusts", a.fingerprint())
	b.run("guardian", "trust", certsA)
	b.startTPM(copyB)
	saved, err := os.ReadFile(filepath.Join(tpm, "protector.json"))
	if err != nil {
		t.Fatal(err)
	}

	// A revokes B while the TPM runs on A: refused, nothing changes.
	t.Run("revoke while running", func(t *testing.T) {
		sock := filepath.Join(shortTemp(t), "ctrl")
		p := testutil.Start(t, testutil.Binary(t), a.env(), sock,
			"--tpm2", "--tpmstate", "dir="+tpm, "--ctrl", "type=unixio,path="+sock, "--flags", "not-need-init,startup-clear")
		before := filesUnder(t, tpm)
		wantIn(t, a.with(t).fail("protector", "revoke", tpm, b.fingerprint()), "running", "re-keys", "nothing was changed")
		after := filesUnder(t, tpm)
		testutil.Run(t, nil, "swtpm_ioctl", "--unix", sock, "-s")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := p.Wait(ctx); err != nil {
			t.Fatalf("vTPM did not exit cleanly: %v\n%s", err, p.Stderr)
		}
		// The running vTPM writes its state meanwhile; the revocation must
		// have changed neither the key protector nor the identity, nor left
		// a sealed file the vTPM did not write.
		for _, f := range []string{"protector.json", "vtpm-state.json"} {
			if string(after[f]) != string(before[f]) {
				t.Errorf("the refused revocation changed %s", f)
			}
		}
		for name := range after {
			if _, ok := before[name]; !ok && name != ".lock" && !strings.HasSuffix(name, ".sealed") {
				t.Errorf("the refused revocation left %s", name)
			}
		}
	})

	wantIn(t, a.run("protector", "revoke", tpm, b.fingerprint()), "revoked", "re-keyed", "protector version 3")
	a.startTPM(tpm)

	t.Run("B puts the old protector back", func(t *testing.T) {
		copyB := copyTPMDir(t, tpm)
		if err := os.WriteFile(filepath.Join(copyB, "protector.json"), saved, 0o600); err != nil {
			t.Fatal(err)
		}
		before := filesUnder(t, copyB)
		wantIn(t, b.with(t).refuseTPM(copyB), "protector version 2", "does not open the sealed state", "older than the state")
		if !sameFiles(filesUnder(t, copyB), before) {
			t.Error("the refused start changed the TPM's files")
		}
	})
	t.Run("A handed the old protector again", func(t *testing.T) {
		copyA := copyTPMDir(t, tpm)
		if err := os.WriteFile(filepath.Join(copyA, "protector.json"), saved, 0o600); err != nil {
			t.Fatal(err)
		}
		before := filesUnder(t, copyA)
		wantIn(t, a.with(t).refuseTPM(copyA), "is version 2, but version 3 was seen last", "rollback", "--allow-rollback")
		if !sameFiles(filesUnder(t, copyA), before) {
			t.Error("the refused start changed the TPM's files")
		}
	})
}
