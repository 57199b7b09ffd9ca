package kernel

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// TestKeeperPid: detach signals the pid in a keeper's pid file only when
// that process is the keeper that wrote it. A keeper killed with -9
// leaves its file; a later process with the same pid (here: this one,
// with another start time) must not be taken for it.
func TestKeeperPid(t *testing.T) {
	p := filepath.Join(t.TempDir(), "nbd0.pid")
	if err := writePidFile(p); err != nil {
		t.Fatal(err)
	}
	if pid, ok := KeeperPid(p); !ok || pid != os.Getpid() {
		t.Fatalf("own pid file: %d %v", pid, ok)
	}
	start, err := startTime(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{
		fmt.Sprintf("%d %d\n", os.Getpid(), start+1), // pid reused by another process
		"2147483000 1\n", // gone
		"junk\n",
		"\n",
		fmt.Sprintf("%d\n", os.Getppid()), // an older blockd's format naming a live non-blockd
	} {
		if err := os.WriteFile(p, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
		if pid, ok := KeeperPid(p); ok {
			t.Errorf("pid file %q taken for a live keeper (pid %d)", c, pid)
		}
	}
	if _, ok := KeeperPid(filepath.Join(t.TempDir(), "none")); ok {
		t.Error("a missing pid file names a keeper")
	}
}

func TestParseStartTime(t *testing.T) {
	line := "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 20 21\n"
	if got, err := parseStartTime(line); err != nil || got != 987654 {
		t.Fatalf("parseStartTime = %d, %v; want 987654", got, err)
	}
	for _, bad := range []string{"", "1234 no name", "1 (x) S 1 2"} {
		if _, err := parseStartTime(bad); err == nil {
			t.Errorf("parseStartTime(%q) accepted", bad)
		}
	}
}
