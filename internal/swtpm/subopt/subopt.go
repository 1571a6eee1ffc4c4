// Package subopt parses swtpm's sub-option syntax: comma separated
// name=value pairs, where a bare name means "true".
package subopt

import (
	"fmt"
	"slices"
	"strings"
)

// Parse parses swtpm's sub-option syntax, as used by --key,
// --tpmstate, --ctrl, --server, --log, --pid, --flags and --locality:
// comma separated name=value pairs, where a bare name means "true". Commas
// cannot be escaped. A name not in allowed, or given twice, is an error.
func Parse(s string, allowed ...string) (map[string]string, error) {
	opts := make(map[string]string)
	for field := range strings.SplitSeq(s, ",") {
		if field == "" {
			continue // swtpm tolerates empty fields such as a trailing comma
		}
		name, value, hasValue := strings.Cut(field, "=")
		if !hasValue {
			value = "true"
		}
		if name == "" {
			return nil, fmt.Errorf("sub-option %q has no name; use name=value", field)
		}
		if !slices.Contains(allowed, name) {
			return nil, fmt.Errorf("unknown sub-option %q; allowed are %s", name, strings.Join(allowed, ", "))
		}
		if _, dup := opts[name]; dup {
			return nil, fmt.Errorf("sub-option %q given more than once", name)
		}
		opts[name] = value
	}
	return opts, nil
}

// Bool interprets a boolean sub-option value the way swtpm does.
func Bool(name, value string) (bool, error) {
	switch value {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, fmt.Errorf("sub-option %s=%q: want true or false", name, value)
}
