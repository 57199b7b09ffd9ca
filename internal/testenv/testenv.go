// Package testenv decides what a test does when an outside tool it needs is
// missing: on a developer's machine it skips loudly; under CI (CI=true) a
// missing tool is a failure, because the test command installs every tool.
package testenv

import (
	"os"
	"os/exec"
	"testing"
)

// InCI reports whether the tests run under CI, where nothing may be skipped
// for want of a tool.
func InCI() bool { return os.Getenv("CI") == "true" }

// RequireTool returns the path of the named executable, or skips (fails in
// CI) the test when it is not installed.
func RequireTool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	// Debian puts some tools in /usr/sbin, which a plain user's PATH lacks.
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
		if c := dir + "/" + name; isExec(c) {
			return c
		}
	}
	Unavailable(t, "tool %q not found in PATH (run scripts/install-deps.sh)", name)
	return ""
}

// Unavailable skips the test with a loud reason, or fails it under CI.
func Unavailable(t testing.TB, format string, args ...any) {
	t.Helper()
	if InCI() {
		t.Fatalf("CI=true and a requirement is missing: "+format, args...)
	}
	t.Skipf("SKIPPED, requirement missing: "+format, args...)
}

func isExec(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}
