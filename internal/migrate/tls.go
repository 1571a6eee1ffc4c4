package migrate

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"vtpm/internal/hostcert"
	"vtpm/internal/qmp"
)

// tlsID is the QEMU object id of a migration's TLS credentials.
const tlsID = "vtpm-migrate-tls"

// addTLSCreds gives the QEMU behind q the x509 credentials of one end of
// the migration (endpoint "client" or "server"): id's certificate and key,
// and ca, the certificates that may issue the peer's (and id's own, which
// QEMU checks at load). QEMU, confined as another user, reads them through
// a directory descriptor passed on its monitor, from a private directory
// given to that user (uid, gid) and removed once loaded.
func addTLSCreds(ctx context.Context, q *qmp.Conn, endpoint string, id *hostcert.Identity, ca []byte, uid, gid int) error {
	dir, err := os.MkdirTemp("", "vtpm-tls-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	files := map[string][]byte{
		"ca-cert.pem":          ca,
		endpoint + "-cert.pem": id.CertPEM,
		endpoint + "-key.pem":  id.KeyPEM,
	}
	for name, b := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o400); err != nil {
			return err
		}
		if err := os.Chown(p, uid, gid); err != nil && os.Geteuid() == 0 {
			return err
		}
	}
	if err := os.Chmod(dir, 0o500); err != nil {
		return err
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, uid, gid); err != nil {
			return err
		}
	}
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	set, fd, err := q.AddFD(ctx, f)
	if err != nil {
		return err
	}
	_, err = q.Execute(ctx, "object-add", map[string]any{
		"qom-type": "tls-creds-x509", "id": tlsID, "endpoint": endpoint,
		"dir": fmt.Sprintf("/proc/self/fd/%d", fd), "verify-peer": true,
	})
	// Loaded (or refused): QEMU needs the directory no longer.
	q.Execute(ctx, "remove-fd", map[string]any{"fdset-id": set, "fd": fd})
	if err != nil {
		return fmt.Errorf("load the TLS credentials into QEMU: %w", err)
	}
	return nil
}
