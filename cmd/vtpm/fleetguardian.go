package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"

	"vtpm/internal/errdefs"
	"vtpm/internal/guardian"
	"vtpm/internal/keybroker"
)

// fleetGuardian returns the key service's fleet guardian (public), asked
// of the key service at urls by vtpm-hostd with this host's client bundle:
// vtpm links no network client (every vTPM is a vtpm process). The
// certificates can also be given as a file (`vtpm keyservice
// fleet-guardian` prints them), which needs no helper.
func fleetGuardian(urls string) (*guardian.Guardian, error) {
	path, err := findHelper(hostHelper)
	if err != nil {
		return nil, err
	}
	var out, stderr bytes.Buffer
	c := exec.Command(path, "fleet-guardian", "--key-service", urls)
	c.Stdout, c.Stderr, c.Env = &out, &stderr, os.Environ()
	if err := c.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		var ee *exec.ExitError
		if !errors.As(err, &ee) || msg == "" {
			msg = err.Error()
		}
		// The helper has printed its own remedies as part of msg.
		return nil, errdefs.New(errdefs.ErrUnavailable, "cannot fetch the fleet guardian from the key service at %s: %s", urls, strings.TrimPrefix(msg, "vtpm: "))
	}
	g, err := guardian.ParseCertificates(out.Bytes())
	if err != nil {
		return nil, errdefs.Wrap(errdefs.ErrInternal, err, "the fleet guardian's certificates from %s", urls)
	}
	return g, nil
}

// grantFleet adds the fleet guardian's row to the protector of the TPM in
// dir (owner-signed, as any grant).
func grantFleet(dir string, g *guardian.Guardian) (*guardian.Protector, error) {
	var p *guardian.Protector
	err := withHost(func(h *keybroker.Broker) error {
		var err error
		p, err = h.Grant(dir, g)
		return err
	})
	return p, err
}
