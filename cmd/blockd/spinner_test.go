package main

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestWaitSpinnerOnlyOnTTY runs the spinner in a child process, once with
// stderr a pipe (nothing may be printed) and once on a pseudo-terminal
// made by script(1) (the spinner and its text must appear).
func TestWaitSpinnerOnlyOnTTY(t *testing.T) {
	if os.Getenv("BLOCKD_SPINNER_CHILD") == "1" {
		stop := waitSpinner("waiting for its primary", 100*time.Millisecond)
		time.Sleep(700 * time.Millisecond)
		stop()
		return
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run", "^TestWaitSpinnerOnlyOnTTY$")
	cmd.Env = append(os.Environ(), "BLOCKD_SPINNER_CHILD=1")
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(errb.String(), "waiting for its primary") {
		t.Fatalf("spinner printed to a pipe: %q", errb.String())
	}
	script, err := exec.LookPath("script")
	if err != nil {
		t.Fatalf("script(1) (util-linux) is needed for the terminal half: %v", err)
	}
	tty := exec.Command(script, "-qec", exe+" -test.run ^TestWaitSpinnerOnlyOnTTY$", "/dev/null")
	tty.Env = cmd.Env
	out, err := tty.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !strings.Contains(string(out), "waiting for its primary") {
		t.Fatalf("no spinner on a terminal: %q", out)
	}
}
