package keystore

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// fixChangedTPM is the advice for a keystore sealed to another TPM; the
// guardians then come back with recoverGuardians.
const fixChangedTPM = "restore the host TPM's state; or move the keystore aside (mv KEYSTORE KEYSTORE.old — a new keystore and host guardian are created on next use) and recover the guardians you need from their exports"

// masterTPM is the JSON content of master.tpm.
type masterTPM struct {
	Format  int    `json:"format"`
	HostTPM string `json:"host_tpm"` // the setting it was sealed through, for messages and auto mode
	SRKName []byte `json:"srk_name"` // name of the SRK it was sealed under: identifies the TPM's owner seed
	Public  []byte `json:"public"`   // TPM2B_PUBLIC of the sealed-data object
	Private []byte `json:"private"`  // TPM2B_PRIVATE of the sealed-data object
}

// readPrivate reads a file that must be a regular file, not a symlink,
// and not accessible to group or others.
func readPrivate(p string) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, err
		}
		if errors.Is(err, syscall.ELOOP) {
			return nil, errf(ErrPermission, err, "keystore file %s is a symbolic link; replace it with the real file", p)
		}
		return nil, ownerOr(err, filepath.Dir(p), "read %s: %v", p, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, permOr(err, "stat %s: %v", p, err)
	}
	if !st.Mode().IsRegular() {
		return nil, errf(ErrCorrupt, nil, "keystore file %s is not a regular file; restore it from backup", p)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return nil, errf(ErrPermission, nil, "keystore file %s has mode %04o, so other users may have read the master key; run `chmod 600 %s`", p, perm, p)
	}
	data := make([]byte, 0, st.Size())
	buf := make([]byte, 4096)
	for {
		n, err := f.Read(buf)
		data = append(data, buf[:n]...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			clear(buf)
			clear(data)
			return nil, errf(errGeneric, err, "read %s: %v; check the disk for errors", p, err)
		}
	}
	clear(buf)
	return data, nil
}

// loadMaster reads the existing master key. It returns an error wrapping
// fs.ErrNotExist when the keystore has none yet.
func loadMaster(dir string, opts Options, log *slog.Logger) ([]byte, Protection, error) {
	tp := filepath.Join(dir, masterTPMFile)
	data, err := readPrivate(tp)
	if err == nil {
		return unsealMaster(tp, data, opts, log)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, Protection{}, err
	}
	fp := filepath.Join(dir, masterFile)
	key, err := readPrivate(fp)
	if err != nil {
		return nil, Protection{}, err
	}
	if len(key) != masterKeyLen {
		clear(key)
		return nil, Protection{}, errf(ErrCorrupt, nil, "keystore master key %s is damaged (%d bytes, want %d); restore it from backup, or move the keystore aside and recover this host's guardians from their exports", fp, len(key), masterKeyLen).with(recoverGuardians)
	}
	if opts.HostTPM != "" && opts.HostTPM != "none" {
		log.Warn("keystore master key is a file; the configured host TPM is not used for an existing keystore", "keystore", dir, "host_tpm", opts.HostTPM)
	}
	return key, fileProtection(fp, ""), nil
}

func fileProtection(p, why string) Protection {
	d := fmt.Sprintf("master key stored in %s (mode 0600), not sealed to a TPM: root, or anyone with a copy of the disk, can read the guardian keys", p)
	if why != "" {
		d += " (" + why + ")"
	}
	return Protection{Kind: "file", Detail: d}
}

func unsealMaster(p string, data []byte, opts Options, log *slog.Logger) ([]byte, Protection, error) {
	var m masterTPM
	if err := json.Unmarshal(data, &m); err != nil || m.Format != 1 || len(m.SRKName) == 0 || len(m.Public) == 0 || len(m.Private) == 0 {
		why := "missing fields"
		if err != nil {
			why = err.Error()
		} else if m.Format != 1 {
			why = fmt.Sprintf("format %d, want 1", m.Format)
		}
		return nil, Protection{}, errf(ErrCorrupt, err, "sealed master key %s is damaged (%s); restore it from backup, or move the keystore aside and recover this host's guardians from their exports", p, why).with(recoverGuardians)
	}
	spec := opts.HostTPM
	switch spec {
	case "":
		spec = m.HostTPM
	case "none":
		return nil, Protection{}, errf(ErrHostTPMMissing, nil, "the keystore's master key is sealed to the host TPM (%s), but the host TPM setting is \"none\"; unset VTPM_HOST_TPM, or set it to %s", m.HostTPM, m.HostTPM)
	}
	t, err := openHostTPM(spec)
	if err != nil {
		if errors.Is(err, ErrHostTPMMissing) {
			return nil, Protection{}, errf(ErrHostTPMMissing, err, "the keystore's master key (%s) is sealed to the host TPM, but %v", p, err)
		}
		return nil, Protection{}, err
	}
	defer closeTPM(t)
	key, persistent, err := unsealFromTPM(t, &sealedKey{public: m.Public, private: m.Private, srkName: m.SRKName})
	switch {
	case errors.Is(err, errTPMChanged):
		return nil, Protection{}, errf(ErrHostTPMChanged, err, "the keystore's master key (%s) is sealed to a different TPM (the host TPM at %s was cleared or replaced; %s): %s", p, spec, strings.TrimPrefix(err.Error(), errTPMChanged.Error()+": "), strings.ReplaceAll(fixChangedTPM, "KEYSTORE", filepath.Dir(p))).with(recoverGuardians)
	case errors.Is(err, ErrCorrupt):
		return nil, Protection{}, errf(ErrCorrupt, err, "sealed master key %s is damaged (%v); restore it from backup, or move the keystore aside and recover this host's guardians from their exports", p, err).with(recoverGuardians)
	case err != nil:
		var ke *Error
		if errors.As(err, &ke) {
			return nil, Protection{}, err
		}
		return nil, Protection{}, errf(errGeneric, err, "unseal the keystore master key (%s) with the host TPM at %s: %v; check that the TPM works (tpm2_getcap properties-fixed) and retry", p, spec, err)
	}
	if len(key) != masterKeyLen {
		clear(key)
		return nil, Protection{}, errf(ErrCorrupt, nil, "sealed master key %s unsealed to %d bytes, want %d; restore it from backup", p, len(key), masterKeyLen)
	}
	srkDesc := "SRK recreated from the owner seed"
	if persistent {
		srkDesc = "persistent SRK 0x81000001"
	}
	log.Debug("keystore master key unsealed", "file", p, "host_tpm", spec, "srk", srkDesc)
	return key, Protection{Kind: "tpm", Detail: fmt.Sprintf("master key sealed to the host TPM at %s (%s, name %x)", spec, srkDesc, m.SRKName)}, nil
}

// createMaster makes a fresh master key, sealed to the host TPM when one
// is available, under the writers' lock (another process may be creating
// it at the same moment).
func createMaster(dir string, opts Options, log *slog.Logger) ([]byte, Protection, error) {
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, Protection{}, err
	}
	defer unlock()
	key, prot, err := loadMaster(dir, opts, log)
	if !errors.Is(err, fs.ErrNotExist) {
		return key, prot, err // created meanwhile, or broken
	}
	if err := checkNoRecords(dir); err != nil {
		return nil, Protection{}, err
	}
	key = make([]byte, masterKeyLen)
	if _, err := rand.Read(key); err != nil {
		return nil, Protection{}, fmt.Errorf("generate the keystore master key: %w", err)
	}
	spec, why := opts.HostTPM, ""
	if spec == "" {
		spec = DefaultHostTPM
	}
	if spec != "none" {
		m, err := sealMaster(spec, key)
		switch {
		case err == nil:
			data, err := json.MarshalIndent(m, "", "  ")
			if err != nil {
				return nil, Protection{}, fmt.Errorf("encode %s: %w", masterTPMFile, err)
			}
			if err := writeFileAtomic(dir, masterTPMFile, append(data, '\n')); err != nil {
				return nil, Protection{}, fmt.Errorf("store the sealed master key: %w", err)
			}
			prot := Protection{Kind: "tpm", Detail: fmt.Sprintf("master key sealed to the host TPM at %s (name %x)", spec, m.SRKName)}
			log.Info("keystore created", "dir", dir, "protection", prot.Kind, "host_tpm", spec)
			return key, prot, nil
		case opts.HostTPM != "":
			// Configured explicitly: never fall back to weaker protection.
			clear(key)
			return nil, Protection{}, err
		default:
			why = err.Error()
			log.Warn("no usable host TPM; the keystore master key is protected by file permissions only", "dir", dir, "reason", why)
		}
	}
	if err := writeFileAtomic(dir, masterFile, key); err != nil {
		clear(key)
		return nil, Protection{}, fmt.Errorf("store the master key: %w", err)
	}
	prot = fileProtection(filepath.Join(dir, masterFile), why)
	log.Info("keystore created", "dir", dir, "protection", prot.Kind)
	return key, prot, nil
}

// sealMaster seals key to the TPM named by spec and checks it unseals.
func sealMaster(spec string, key []byte) (*masterTPM, error) {
	t, err := openHostTPM(spec)
	if err != nil {
		return nil, err
	}
	defer closeTPM(t)
	sk, err := sealToTPM(t, key)
	if err != nil {
		var ke *Error
		if errors.As(err, &ke) {
			return nil, err
		}
		return nil, errf(errGeneric, err, "seal the keystore master key to the host TPM at %s: %v; check that the TPM works (tpm2_getcap properties-fixed), or use VTPM_HOST_TPM=none for file protection", spec, err)
	}
	got, _, err := unsealFromTPM(t, sk)
	if err != nil || len(got) != len(key) || string(got) != string(key) {
		clear(got)
		return nil, errf(errGeneric, err, "the host TPM at %s did not return the master key it just sealed (%v); check the TPM, or use VTPM_HOST_TPM=none for file protection", spec, err)
	}
	clear(got)
	return &masterTPM{Format: 1, HostTPM: spec, SRKName: sk.srkName, Public: sk.public, Private: sk.private}, nil
}

// checkNoRecords refuses to create a master key where records exist: they
// were encrypted under a master key that is now missing.
func checkNoRecords(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return ownerOr(err, dir, "list keystore directory %s: %v", dir, err)
	}
	for _, e := range ents {
		if !e.IsDir() || !kindRE.MatchString(e.Name()) {
			continue
		}
		sub, err := os.ReadDir(filepath.Join(dir, e.Name()))
		if err != nil {
			return permOr(err, "list keystore directory %s: %v", filepath.Join(dir, e.Name()), err)
		}
		for _, r := range sub {
			if nameRE.MatchString(r.Name()) {
				return errf(ErrCorrupt, nil, "keystore %s holds records (%s/%s) but its master key (%s or %s) is missing; restore the master key file from backup, or move the keystore aside and recover this host's guardians from their exports", dir, e.Name(), r.Name(), masterTPMFile, masterFile).with(recoverGuardians)
			}
		}
	}
	return nil
}
