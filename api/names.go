package api

import "fmt"

// VolumeNameRule is the rule every volume name follows; the master refuses
// any other name, and client commands refuse one before they send it.
const VolumeNameRule = "1-64 characters of [A-Za-z0-9._-], starting with a letter or digit"

// CheckVolumeName returns a bad_request *Error naming the rule when name
// breaks VolumeNameRule. The name is quoted and, when long, cut short
// (QuoteName), so that an error never echoes a huge name back whole.
func CheckVolumeName(name string) error {
	if validVolumeName(name) {
		return nil
	}
	return Errorf(CodeBadRequest, "invalid volume name %s: %s", QuoteName(name), VolumeNameRule)
}

func validVolumeName(name string) bool {
	if len(name) == 0 || len(name) > 64 {
		return false
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case i > 0 && (c == '.' || c == '_' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// QuoteName quotes a user-given string for an error message, cut to its
// first 48 bytes with its length when it is longer than 64 bytes.
func QuoteName(s string) string {
	if len(s) <= 64 {
		return fmt.Sprintf("%q", s)
	}
	return fmt.Sprintf("%q... (%d bytes)", s[:48], len(s))
}
