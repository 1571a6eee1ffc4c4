package swtpm

// StateFormatEnv asks for a state format as --tpmstate format= does; the
// option wins. internal/state reads the same variable for manufacture and
// swtpm_setup.
const StateFormatEnv = "VTPM_STATE_FORMAT"

// stateFormat returns the format asked for: the --tpmstate format=
// sub-option, else the environment's. Only the formats vtpm has are
// accepted.
func stateFormat(option string, getenv func(string) string) (string, error) {
	format, what := option, "--tpmstate format"
	if format == "" {
		format, what = getenv(StateFormatEnv), StateFormatEnv
	}
	switch format {
	case "", "sealed", "swtpm":
		return format, nil
	}
	return "", usagef("%s=%q: want sealed or swtpm", what, format)
}
