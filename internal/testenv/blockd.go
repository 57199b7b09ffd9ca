package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// BuildBlockd builds this module's cmd/blockd with goTool into dir and
// returns the binary's path. With BLOCKD_E2E_RACE set, the binary is
// built with the race detector (the server and the CLI under it).
func BuildBlockd(goTool, dir string) (string, error) {
	bin := filepath.Join(dir, "blockd")
	args := []string{"build", "-o", bin}
	if os.Getenv("BLOCKD_E2E_RACE") != "" {
		args = append(args, "-race")
	}
	out, err := exec.Command(goTool, append(args, "github.com/blockd/blockd/cmd/blockd")...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("build blockd: %w\n%s", err, out)
	}
	return bin, nil
}

// MainWithBlockd is the TestMain of a package whose tests run the real
// blockd: it builds cmd/blockd into a temporary directory, stores the
// binary's path in *bin, runs the tests and removes the directory. It
// returns the exit code for os.Exit.
func MainWithBlockd(m *testing.M, bin *string) int {
	dir, err := os.MkdirTemp("", "blockd-test-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if *bin, err = BuildBlockd("go", dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return m.Run()
}

// WaitUntil polls cond every 50 ms until it returns nil, or returns its
// last error once d has passed.
func WaitUntil(d time.Duration, cond func() error) error {
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitFor is WaitUntil that fails the test, naming what it waited for
// and cond's last error.
func WaitFor(t testing.TB, what string, d time.Duration, cond func() error) {
	t.Helper()
	if err := WaitUntil(d, cond); err != nil {
		t.Fatalf("timed out after %v waiting for %s: %v", d, what, err)
	}
}
