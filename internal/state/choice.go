package state

import (
	"fmt"

	"vtpm/internal/errdefs"
	"vtpm/internal/seal"
	"vtpm/internal/swtpm/statefile"
)

// FormatEnv names the environment variable that asks for a state format,
// as --tpmstate format= does, for the TPM process, manufacture and
// swtpm_setup alike.
const FormatEnv = "VTPM_STATE_FORMAT"

// ParseFormat parses a format asked for by name: "sealed" or "swtpm". The
// empty string asks for none: the directory decides (see [Choose]).
func ParseFormat(s string) (Format, error) {
	switch f := Format(s); f {
	case "", Sealed, Swtpm:
		return f, nil
	}
	return "", errdefs.New(errdefs.ErrInvalidArgument, "state format %q: want %s or %s", s, Sealed, Swtpm)
}

// FormatFromEnv returns the format $VTPM_STATE_FORMAT asks for ("" when
// unset), read through getenv.
func FormatFromEnv(getenv func(string) string) (Format, error) {
	f, err := ParseFormat(getenv(FormatEnv))
	if err != nil {
		return "", fmt.Errorf("%s: %w", FormatEnv, err)
	}
	return f, nil
}

// ChooseExplicit is [Choose] with a format asked for explicitly (want; ""
// asks for none). The request decides for a new directory: swtpm's format
// gives swtpm's file layout and semantics (tpm2-00.permall and its
// siblings, a deleted file is a new TPM), sealed gives sealed state even
// with a swtpm key. A directory that already holds state keeps its format,
// and a request for the other one is a [FormatError] rather than a second
// TPM beside the first. swtpm's linear file (an empty dir) is swtpm's
// format only.
func ChooseExplicit(dir string, swtpmKey bool, want Format) (Format, error) {
	if _, err := ParseFormat(string(want)); err != nil {
		return "", err
	}
	if want == "" {
		return Choose(dir, swtpmKey), nil
	}
	have := Format("")
	switch {
	case dir == "":
		have = Swtpm
	case seal.Exists(dir):
		have = Sealed
	case statefile.HasState(dir):
		have = Swtpm
	}
	if have != "" && have != want {
		return "", &FormatError{Dir: dir, Want: want, Have: have}
	}
	return want, nil
}

// FormatError is an explicit format request that the state already in a
// directory contradicts.
type FormatError struct {
	Dir  string // "" for swtpm's linear file
	Want Format // asked for
	Have Format // what the directory holds
}

func (e *FormatError) Error() string {
	if e.Dir == "" {
		return fmt.Sprintf("%s state was asked for, but swtpm's linear state file (backend-uri=file://) holds only %s state", e.Want, e.Have)
	}
	return fmt.Sprintf("%s state was asked for, but %s holds %s state; nothing was changed", e.Want, e.Dir, e.Have)
}

// Is makes a FormatError match errdefs.ErrFailedPrecondition, or
// ErrInvalidArgument for the linear file, which can never be sealed.
func (e *FormatError) Is(target error) bool {
	if e.Dir == "" {
		return target == errdefs.ErrInvalidArgument
	}
	return target == errdefs.ErrFailedPrecondition
}

// Remedies says how to serve the state that is there, or convert it.
func (e *FormatError) Remedies() []errdefs.Remedy {
	switch {
	case e.Dir == "":
		return []errdefs.Remedy{errdefs.Advise("keep sealed state in a directory (--tpmstate dir=DIR)")}
	case e.Have == Swtpm:
		return []errdefs.Remedy{
			errdefs.Do(errdefs.ActionStateImport, "dir", e.Dir).WithNote("converts swtpm's files into sealed state, keeping the originals"),
			errdefs.Advise("ask for format=swtpm (or unset %s) to keep serving swtpm's files", FormatEnv),
		}
	}
	return []errdefs.Remedy{errdefs.Advise("ask for format=sealed (or unset %s) to serve the sealed state, or give swtpm's format a new directory", FormatEnv)}
}
