package kernel

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// A keeper's pid file says which process keeps /dev/nbdN: "PID START",
// START being the process's start time in clock ticks since boot (field
// 22 of /proc/PID/stat). A keeper killed with -9 leaves its file behind,
// and its pid may belong to another process by the time `blockd detach`
// reads it; the start time tells them apart, so detach never signals a
// stranger.

// PidFile is where the keeper of /dev/nbdINDEX writes its pid file.
func PidFile(index int) string { return fmt.Sprintf("/run/blockd/nbd%d.pid", index) }

// writePidFile records this process as the keeper.
func writePidFile(path string) error {
	start, err := startTime(os.Getpid())
	if err != nil {
		return err
	}
	return os.WriteFile(path, []byte(fmt.Sprintf("%d %d\n", os.Getpid(), start)), 0o644)
}

// KeeperPid returns the pid of the live keeper named by the pid file at
// path, or ok false when there is none: no file, a malformed one, or a
// process that is gone or is another one with the same pid. A file of an
// older blockd (the pid alone) is believed when that process is a blockd.
func KeeperPid(path string) (pid int, ok bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, false
	}
	pid, err = strconv.Atoi(f[0])
	if err != nil || pid <= 0 {
		return 0, false
	}
	if len(f) == 1 {
		comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		return pid, err == nil && strings.TrimSpace(string(comm)) == "blockd"
	}
	want, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return 0, false
	}
	got, err := startTime(pid)
	return pid, err == nil && got == want
}

// startTime reads a process's start time (clock ticks since boot).
func startTime(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStartTime(string(b))
}

// parseStartTime takes field 22 of a /proc/PID/stat line. The command
// name (field 2) is in parentheses and may hold spaces or parentheses, so
// the fields are counted after the last ')'.
func parseStartTime(stat string) (uint64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat %.40q: no command name", stat)
	}
	f := strings.Fields(stat[i+1:])
	const startField = 22 - 3 // fields 3.. follow the name
	if len(f) <= startField {
		return 0, fmt.Errorf("stat: %d fields, want 22", len(f)+2)
	}
	return strconv.ParseUint(f[startField], 10, 64)
}
