package swtpm

// StateFormatEnv asks for a state format as --tpmstate format= does; the
// option wins. internal/state reads the same variable for manufacture and
// swtpm_setup.
const StateFormatEnv = "VTPM_STATE_FORMAT"

// checkStateFormat takes the format from the environment when --tpmstate
// did not give one, and accepts only the formats vtpm has.
func (c *Config) checkStateFormat(getenv func(string) string) error {
	what := "--tpmstate format"
	if c.StateFormat == "" {
		c.StateFormat, what = getenv(StateFormatEnv), StateFormatEnv
	}
	switch c.StateFormat {
	case "", "sealed", "swtpm":
		return nil
	}
	return usagef("%s=%q: want sealed or swtpm", what, c.StateFormat)
}
