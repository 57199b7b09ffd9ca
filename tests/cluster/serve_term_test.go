package cluster

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestServeTerminalQuiet: serve on a terminal prints its summary; the log
// lines go to DATA/blockd.log (here as JSON, --log-format json), and the
// terminal gets none at INFO, raft's own lines included.
func TestServeTerminalQuiet(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	cmd := exec.Command(blockdBin, "serve", "--data", data, "--api", freePort(t), "--nbd", freePort(t),
		"--volume", "vol0:64MiB", "--log-format", "json")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for !strings.Contains(stdout.String(), "Logs: ") {
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("no summary in 60s:\nstdout:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	if err := <-done; err != nil {
		t.Fatalf("serve exit: %v\n%s", err, stderr.String())
	}
	out, errOut := stdout.String(), stderr.String()
	t.Logf("terminal (stdout):\n%s\nterminal (stderr):\n%s", out, errOut)
	logFile := filepath.Join(data, "blockd.log")
	if !strings.Contains(out, "blockd is serving volume vol0") || !strings.Contains(out, "Logs: "+logFile) {
		t.Errorf("summary lacks the volume or the log file:\n%s", out)
	}
	for _, line := range strings.Split(strings.TrimSpace(errOut), "\n") {
		if line == "" || strings.HasPrefix(line, "blockd: shutting down") {
			continue
		}
		t.Errorf("terminal got a log line: %s", line)
	}
	f, err := os.Open(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	events := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("log line is not JSON: %s", sc.Text())
		}
		events[rec["msg"].(string)] = true
	}
	for _, ev := range []string{"leader_elected", "server_started", "volume_created", "raft"} {
		if !events[ev] {
			t.Errorf("log file lacks %s", ev)
		}
	}
}
