// Package testenv decides what a test does when an outside tool it needs is
// missing: on a developer's machine it skips loudly; under CI (CI=true) a
// missing tool is a failure, because the test command installs every tool.
package testenv

import (
	"net"
	"os"
	"os/exec"
	"sync"
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

// handedOut remembers every address FreeAddr gave in this test process: a
// port closed here may be handed back by the kernel before the process it
// was meant for has bound it, and two daemons would then race for it.
var (
	handedOutMu sync.Mutex
	handedOut   = map[string]bool{}
)

// FreeAddr returns a loopback host:port that was free a moment ago and
// that this process has not handed out before.
func FreeAddr(t testing.TB) string {
	t.Helper()
	handedOutMu.Lock()
	defer handedOutMu.Unlock()
	for range 100 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		a := l.Addr().String()
		l.Close()
		if !handedOut[a] {
			handedOut[a] = true
			return a
		}
	}
	t.Fatal("testenv: no fresh loopback port in 100 tries")
	return ""
}
