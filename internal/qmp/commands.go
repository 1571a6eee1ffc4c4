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
	// Status is "none", "setup", "active", "pre-switchover", "device",
	// "completed", "failed", "cancelled", …
	Status string `json:"status"`
	// ErrorDesc says why a migration failed (with the return-path
	// capability, also failures on the destination).
	ErrorDesc string `json:"error-desc,omitempty"`
	// RAM is the memory transfer's progress (nil before it starts).
	RAM *MigrationRAM `json:"ram,omitempty"`
	// TotalTime is the time since the migration started (ms); Downtime
	// (ms) is set once it completed, ExpectedDowntime while it runs.
	TotalTime        int64 `json:"total-time,omitempty"`
	Downtime         int64 `json:"downtime,omitempty"`
	ExpectedDowntime int64 `json:"expected-downtime,omitempty"`
	SetupTime        int64 `json:"setup-time,omitempty"`
}

// MigrationRAM is query-migrate's "ram".
type MigrationRAM struct {
	Transferred    int64   `json:"transferred"`
	Remaining      int64   `json:"remaining"`
	Total          int64   `json:"total"`
	DirtyPagesRate int64   `json:"dirty-pages-rate"`
	PageSize       int64   `json:"page-size"`
	MBps           float64 `json:"mbps"`
	DirtySyncCount int64   `json:"dirty-sync-count"`
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

// Version is QEMU's version as query-version reports it.
type Version struct {
	Major, Minor, Micro int
}

func (v Version) String() string { return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Micro) }

// Less orders versions.
func (v Version) Less(w Version) bool {
	if v.Major != w.Major {
		return v.Major < w.Major
	}
	if v.Minor != w.Minor {
		return v.Minor < w.Minor
	}
	return v.Micro < w.Micro
}

// QueryVersion reports the QEMU version.
func (q *Conn) QueryVersion(ctx context.Context) (Version, error) {
	raw, err := q.Execute(ctx, "query-version", nil)
	if err != nil {
		return Version{}, err
	}
	var r struct {
		QEMU struct {
			Major int `json:"major"`
			Minor int `json:"minor"`
			Micro int `json:"micro"`
		} `json:"qemu"`
	}
	if err := json.Unmarshal(raw, &r); err != nil {
		return Version{}, fmt.Errorf("decode query-version: %w", err)
	}
	return Version{r.QEMU.Major, r.QEMU.Minor, r.QEMU.Micro}, nil
}

// BlockJob is one entry of query-block-jobs.
type BlockJob struct {
	Device string `json:"device"`
	Type   string `json:"type"`
	Len    int64  `json:"len"`
	Offset int64  `json:"offset"`
	Ready  bool   `json:"ready"`
	Status string `json:"status"`
}

// QueryBlockJobs lists the running block jobs.
func (q *Conn) QueryBlockJobs(ctx context.Context) ([]BlockJob, error) {
	raw, err := q.Execute(ctx, "query-block-jobs", nil)
	if err != nil {
		return nil, err
	}
	var jobs []BlockJob
	if err := json.Unmarshal(raw, &jobs); err != nil {
		return nil, fmt.Errorf("decode query-block-jobs: %w", err)
	}
	return jobs, nil
}

// BlockDevice is one entry of query-block: a drive and, when a medium is
// inserted, its top node.
type BlockDevice struct {
	Device   string `json:"device"`
	Inserted *struct {
		NodeName string `json:"node-name"`
		Image    struct {
			VirtualSize int64 `json:"virtual-size"`
		} `json:"image"`
	} `json:"inserted,omitempty"`
}

// QueryBlock lists the VM's drives.
func (q *Conn) QueryBlock(ctx context.Context) ([]BlockDevice, error) {
	raw, err := q.Execute(ctx, "query-block", nil)
	if err != nil {
		return nil, err
	}
	var devs []BlockDevice
	if err := json.Unmarshal(raw, &devs); err != nil {
		return nil, fmt.Errorf("decode query-block: %w", err)
	}
	return devs, nil
}
