package api

import (
	"fmt"
	"regexp"
	"strings"
)

// MaxAllowEntries bounds a volume's allow list.
const MaxAllowEntries = 256

// allowRE: a client's certificate name (blockd tls init --client NAME),
// or KIND/NAME for a master's or a server's certificate.
var allowRE = regexp.MustCompile(`^((master|server)/)?[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidateAllow checks an allow list: well-formed names, none twice.
func ValidateAllow(list []AllowEntry) error {
	if len(list) > MaxAllowEntries {
		return fmt.Errorf("allow list of %d entries: at most %d", len(list), MaxAllowEntries)
	}
	seen := map[string]bool{}
	for _, a := range list {
		if !allowRE.MatchString(a.Client) {
			return fmt.Errorf("allow %s: want a client certificate name (1-64 of A-Z a-z 0-9 . _ -, or server/ID, master/NAME)", QuoteName(a.Client))
		}
		if seen[a.Client] {
			return fmt.Errorf("allow %s: named twice", QuoteName(a.Client))
		}
		seen[a.Client] = true
	}
	return nil
}

// ParseAllow parses NAME or NAME:ro (read-only), as the CLI takes them.
func ParseAllow(specs []string) ([]AllowEntry, error) {
	var out []AllowEntry
	for _, s := range specs {
		name, mode, hasMode := strings.Cut(s, ":")
		e := AllowEntry{Client: name}
		switch {
		case !hasMode:
		case mode == "ro":
			e.ReadOnly = true
		case mode == "rw":
		default:
			return nil, fmt.Errorf("--allow %s: want NAME, NAME:ro or NAME:rw", QuoteName(s))
		}
		out = append(out, e)
	}
	if err := ValidateAllow(out); err != nil {
		return nil, err
	}
	return out, nil
}

// FormatAllow is the list as the CLI prints it ("alice, bob:ro"; "anyone" when empty).
func FormatAllow(list []AllowEntry) string {
	if len(list) == 0 {
		return "anyone with a certificate of the cluster CA"
	}
	var parts []string
	for _, a := range list {
		if a.ReadOnly {
			parts = append(parts, a.Client+":ro")
		} else {
			parts = append(parts, a.Client)
		}
	}
	return strings.Join(parts, ", ")
}
