package qmp

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
)

// SystemPowerdown presses the guest's ACPI power button.
func (q *Conn) SystemPowerdown(ctx context.Context) error {
	_, err := q.Execute(ctx, "system_powerdown", nil)
	return err
}

// Quit makes QEMU exit at once. The connection closing before the reply
// arrives counts as done.
func (q *Conn) Quit(ctx context.Context) error {
	_, err := q.Execute(ctx, "quit", nil)
	if errors.Is(err, ErrClosed) {
		return nil
	}
	return err
}

// Status is query-status's "status": "running", "paused", "inmigrate",
// "postmigrate", "internal-error", …
func (q *Conn) Status(ctx context.Context) (string, error) {
	raw, err := q.Execute(ctx, "query-status", nil)
	if err != nil {
		return "", err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return "", fmt.Errorf("decode query-status: %w", err)
	}
	return st.Status, nil
}

// SetMigrationCapabilities turns migration capabilities ("return-path",
// "events", …) on or off.
func (q *Conn) SetMigrationCapabilities(ctx context.Context, caps map[string]bool) error {
	list := make([]map[string]any, 0, len(caps))
	for name, on := range caps {
		list = append(list, map[string]any{"capability": name, "state": on})
	}
	_, err := q.Execute(ctx, "migrate-set-capabilities", map[string]any{"capabilities": list})
	return err
}

// Migrate starts migrating the VM to uri (the destination's -incoming).
func (q *Conn) Migrate(ctx context.Context, uri string) error {
	_, err := q.Execute(ctx, "migrate", map[string]any{"uri": uri})
	return err
}

// MigrationInfo is what query-migrate reports.
type MigrationInfo struct {
	// Status is "none", "setup", "active", "completed", "failed",
	// "cancelled", …
	Status string `json:"status"`
	// ErrorDesc says why a migration failed (with the return-path
	// capability, also failures on the destination).
	ErrorDesc string `json:"error-desc,omitempty"`
}

// Finished reports whether the migration has ended, one way or the other.
func (m MigrationInfo) Finished() bool {
	return m.Status == "completed" || m.Status == "failed" || m.Status == "cancelled"
}

// QueryMigrate reports the state of the current or last migration.
func (q *Conn) QueryMigrate(ctx context.Context) (MigrationInfo, error) {
	var m MigrationInfo
	raw, err := q.Execute(ctx, "query-migrate", nil)
	if err != nil {
		return m, err
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		return m, fmt.Errorf("decode query-migrate: %w", err)
	}
	return m, nil
}
