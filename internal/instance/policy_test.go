package instance

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"vtpm/internal/sandbox"
	"vtpm/internal/swtpm"
)

func TestSandboxPolicy(t *testing.T) {
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "keys", "k")
	logFile := filepath.Join(dir, "log")
	// Of the data root, only the TPM's generation record is writable.
	record := filepath.Join(dir, "root", "keystore", "generations", "7c2b0e5e-0000-4000-8000-000000000001")
	if err := os.WriteFile(logFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VTPM_HOST_TPM", "")
	devs := []string{os.DevNull}
	for _, d := range []string{"/dev/tpmrm0", "/dev/tpm0"} {
		if _, err := os.Stat(d); err == nil {
			devs = append(devs, d)
		}
	}
	tests := []struct {
		name string
		opts swtpm.Options
		iso  sandbox.Isolation
		want sandbox.Policy
	}{
		{
			name: "libvirt: unix ctrl, pid file, log file, --key remove",
			opts: swtpm.Options{
				StateDir: filepath.Join(dir, "state"), Seccomp: "log",
				Ctrl:    &swtpm.Endpoint{Type: "unixio", Path: filepath.Join(dir, "run", "ctrl.sock"), FD: -1, ClientFD: -1},
				PidFile: filepath.Join(dir, "run", "vm.pid"),
				Log:     swtpm.Log{File: logFile},
				Key:     "file=" + keyFile + ",remove=true",
			},
			iso: sandbox.Required,
			want: sandbox.Policy{
				Isolation: sandbox.Required, Seccomp: "log",
				WriteDirs:   []string{filepath.Join(dir, "state")},
				RuntimeDirs: []string{filepath.Join(dir, "run"), filepath.Join(dir, "keys")},
				WriteFiles:  append([]string{record, logFile}, devs...),
			},
		},
		{
			name: "tcp data and ctrl, passed fds",
			opts: swtpm.Options{
				StateDir: filepath.Join(dir, "state"),
				Ctrl:     &swtpm.Endpoint{Type: "tcp", Port: 2322, FD: -1, ClientFD: -1},
				Server:   &swtpm.Endpoint{Type: "tcp", Port: 2321, FD: -1, ClientFD: -1},
				Log:      swtpm.Log{File: "-"},
			},
			want: sandbox.Policy{
				WriteDirs:  []string{filepath.Join(dir, "state")},
				WriteFiles: append([]string{record}, devs...),
				BindTCP:    []uint16{2322, 2321},
			},
		},
		{
			name: "swtpm's file backend on an existing file or device, chardev's device",
			opts: swtpm.Options{StateFile: logFile, Chardev: true, Device: "/dev/ptmx", DataFD: -1},
			want: sandbox.Policy{
				WriteFiles: append([]string{logFile, "/dev/ptmx"}, devs...),
			},
		},
		{
			name: "swtpm's file backend, a new file",
			opts: swtpm.Options{StateFile: filepath.Join(dir, "new", "tpm2.state")},
			want: sandbox.Policy{
				RuntimeDirs: []string{filepath.Join(dir, "new")},
				WriteFiles:  devs,
			},
		},
		{
			name: "QEMU: ctrl passed as a connected fd",
			opts: swtpm.Options{
				StateDir: filepath.Join(dir, "state"),
				Ctrl:     &swtpm.Endpoint{Type: "unixio", FD: -1, ClientFD: 5},
			},
			want: sandbox.Policy{
				WriteDirs:  []string{filepath.Join(dir, "state")},
				WriteFiles: append([]string{record}, devs...),
			},
		},
		{
			// Root is no user to drop to: its directories get no owner.
			name: "--runas root",
			opts: swtpm.Options{StateDir: filepath.Join(dir, "state"), RunAs: "root"},
			want: sandbox.Policy{
				WriteDirs:  []string{filepath.Join(dir, "state")},
				WriteFiles: append([]string{record}, devs...),
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var records []string
			if tc.opts.StateDir != "" { // sealed state: its generation record
				records = append(records, record)
			}
			got := SandboxPolicy(&tc.opts, tc.iso, records...)
			if !reflect.DeepEqual(*got, tc.want) {
				t.Errorf("SandboxPolicy:\n got %+v\nwant %+v", *got, tc.want)
			}
		})
	}
}

// A vTPM the host service serves holds its generation record by descriptor:
// no file of the data root (and never the working directory) is writable.
func TestSandboxPolicyRecordByDescriptor(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	got := SandboxPolicy(&swtpm.Options{StateDir: state}, sandbox.Required, "")
	cwd, _ := os.Getwd()
	for _, f := range got.WriteFiles {
		if f == cwd || f == "" {
			t.Errorf("WriteFiles %v holds %q", got.WriteFiles, f)
		}
	}
	if !reflect.DeepEqual(got.WriteDirs, []string{state}) {
		t.Errorf("WriteDirs %v, want only the state directory", got.WriteDirs)
	}
}
