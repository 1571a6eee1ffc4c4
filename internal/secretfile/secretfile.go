// Package secretfile is how secrets cross the command line: a password or
// passphrase is the first line of a file or an environment variable (never
// an argument, which other users can read in /proc), and an export is
// written to a new file only, so that a mistyped name never destroys a key
// or a guardian held nowhere else.
package secretfile

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"vtpm/internal/errdefs"
)

// Read returns the first line of file or, when file is "", the environment
// variable env. what names the secret ("passphrase"); the flag that gives its
// file is --<what>-file.
func Read(file, env, what string) (string, error) {
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("read %s file: %w", what, err)
		}
		s, _, _ := strings.Cut(string(b), "\n")
		return s, nil
	}
	if s := os.Getenv(env); s != "" {
		return s, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "no %s: give --%s-file FILE or set %s", what, what, env)
}

// Create writes data into a new file at path with mode perm, or to stdout
// when path is "" or "-". A path that exists is refused (ErrAlreadyExists)
// and left as it is.
func Create(path string, data []byte, perm os.FileMode, stdout io.Writer) error {
	if path == "" || path == "-" {
		_, err := stdout.Write(data)
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if errors.Is(err, os.ErrExist) {
		return errdefs.New(errdefs.ErrAlreadyExists, "%s already exists; choose another name (nothing was overwritten)", path)
	}
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
