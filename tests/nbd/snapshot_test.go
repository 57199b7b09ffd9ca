package nbdtests

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

// Snapshots end to end against `blockd serve`: the blockd snapshot CLI,
// the export VOLUME@SNAP with qemu-img, qemu-io, nbdinfo and nbdsh, the
// blockd:changed:SNAP0 meta context, restore, and bad input.

// cli runs `blockd ARGS... --master API` and returns stdout+stderr.
func (s *server) cli(args ...string) (string, error) {
	s.t.Helper()
	args = append(args, "--master", s.apiAddr)
	cmd := exec.Command(blockdBin, args...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (s *server) mustCLI(args ...string) string {
	s.t.Helper()
	out, err := s.cli(args...)
	if err != nil {
		s.t.Fatalf("blockd %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// snapURI is the NBD URI of VOLUME@SNAP.
func (s *server) snapURI(snap string) string { return "nbd://" + s.addr + "/vol0@" + snap }

type snapJSON struct {
	Name      string    `json:"name"`
	Created   time.Time `json:"created"`
	LSN       uint64    `json:"lsn"`
	SizeBytes int64     `json:"size_bytes"`
	ID        uint64    `json:"id"`
}

func (s *server) snapList() []snapJSON {
	s.t.Helper()
	out, err := exec.Command(blockdBin, "snapshot", "list", "vol0", "-o", "json", "--master", s.apiAddr).Output()
	if err != nil {
		s.t.Fatalf("snapshot list: %v\n%s", err, out)
	}
	var list []snapJSON
	if err := json.Unmarshal(out, &list); err != nil {
		s.t.Fatalf("snapshot list -o json: %v\n%s", err, out)
	}
	return list
}

// capture copies an NBD export to a local raw file.
func capture(t *testing.T, uri, path string) {
	t.Helper()
	run(t, 3*time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, path)
}

func TestSnapshotExportRestore(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 10M 64k", "-c", "write -P 0x23 600M 4k")
	atSnap := filepath.Join(dir, "at-s1.raw")
	capture(t, s.uri(), atSnap)

	out := s.mustCLI("snapshot", "create", "vol0", "s1", "-o", "json")
	var created snapJSON
	if err := json.Unmarshal([]byte(out), &created); err != nil || created.Name != "s1" || created.LSN == 0 || created.SizeBytes != volSize || created.Created.IsZero() {
		t.Fatalf("snapshot create -o json: %v\n%s", err, out)
	}
	// Writes after the snapshot: overwrite, zero, new data.
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "write -P 0x33 0 4k", "-c", "write -z 10M 64k", "-c", "write -P 0x44 100M 1M")
	afterWrites := filepath.Join(dir, "after.raw")
	capture(t, s.uri(), afterWrites)

	// VOLUME@SNAP reads exactly what the volume held at snapshot time.
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, s.snapURI("s1"))
	if out, err := runErr(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, s.uri()); err == nil {
		t.Fatalf("the live volume still compares equal to the snapshot's capture:\n%s", out)
	}
	run(t, time.Minute, "qemu-io", "-r", "-f", "raw", s.snapURI("s1"),
		"-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 10M 64k", "-c", "read -P 0 100M 1M")

	// The snapshot export is read-only, and the server itself refuses a
	// write (libnbd's client-side checks off) with EPERM.
	info := run(t, time.Minute, "nbdinfo", "--json", s.snapURI("s1"))
	if !strings.Contains(info, `"is_read_only": true`) {
		t.Fatalf("vol0@s1 not advertised read-only:\n%s", info)
	}
	out, err := runErr(t, time.Minute, "nbdsh", "-u", s.snapURI("s1"), "-c", `
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 4096, 0)
    print("WRITE ACCEPTED")
except nbd.Error as e:
    print("errno", e.errnum, e.string)
try:
    h.trim(4096, 0)
    print("TRIM ACCEPTED")
except nbd.Error as e:
    print("errno", e.errnum, e.string)
`)
	if err != nil || strings.Contains(out, "ACCEPTED") || strings.Count(out, "errno 1 ") != 2 {
		t.Fatalf("writes to vol0@s1: want EPERM (errno 1) twice: %v\n%s", err, out)
	}
	run(t, time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, s.snapURI("s1"))

	// base:allocation of the snapshot: its data where the volume had data.
	m := run(t, time.Minute, "nbdinfo", "--map", s.snapURI("s1"))
	if !mapHas(m, 0, "data") || !mapHas(m, 100<<20, "hole") {
		t.Fatalf("vol0@s1 allocation map:\n%s", m)
	}

	// blockd:changed:s1 on the live volume: the three ranges written since.
	cm := run(t, time.Minute, "nbdinfo", "--map=blockd:changed:s1", s.uri())
	t.Logf("nbdinfo --map=blockd:changed:s1 vol0:\n%s", cm)
	for _, off := range []int64{0, 10 << 20, 100 << 20} {
		if !mapChanged(cm, off) {
			t.Fatalf("offset %d not reported changed since s1:\n%s", off, cm)
		}
	}
	for _, off := range []int64{2 << 20, 600 << 20, 900 << 20} {
		if mapChanged(cm, off) {
			t.Fatalf("offset %d reported changed since s1, never written after it:\n%s", off, cm)
		}
	}
	list := run(t, time.Minute, "nbdinfo", "--json", s.uri())
	if !strings.Contains(list, "blockd:changed:s1") {
		t.Fatalf("vol0 does not list the meta context blockd:changed:s1:\n%s", list)
	}

	// A second snapshot: vol0@s2 offers blockd:changed:s1, the blocks that
	// differ between s1 and s2.
	s.mustCLI("snapshot", "create", "vol0", "s2")
	cm2 := run(t, time.Minute, "nbdinfo", "--map=blockd:changed:s1", s.snapURI("s2"))
	if !mapChanged(cm2, 100<<20) || mapChanged(cm2, 600<<20) {
		t.Fatalf("vol0@s2 blockd:changed:s1:\n%s", cm2)
	}
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", afterWrites, s.snapURI("s2"))

	if l := s.snapList(); len(l) != 2 || l[0].Name != "s1" || l[1].Name != "s2" || l[0].LSN >= l[1].LSN || l[0].LSN != created.LSN {
		t.Fatalf("snapshot list: %+v", l)
	}

	// Restore s1: qemu-io patterns before (the newer data) and after.
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "read -P 0x33 0 4k", "-c", "read -P 0x44 100M 1M")
	out = s.mustCLI("snapshot", "restore", "vol0", "s1")
	if !strings.Contains(out, "reconnect") {
		t.Fatalf("restore does not tell clients to reconnect:\n%s", out)
	}
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 10M 64k", "-c", "read -P 0 100M 1M", "-c", "read -P 0x23 600M 4k")
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, s.uri())
	// Both snapshots stay, with their content.
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", afterWrites, s.snapURI("s2"))
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", atSnap, s.snapURI("s1"))

	// Snapshots survive a restart of the server.
	s.stop()
	s.start()
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", afterWrites, s.snapURI("s2"))
	s.mustCLI("snapshot", "delete", "vol0", "s2")
	if l := s.snapList(); len(l) != 1 || l[0].Name != "s1" {
		t.Fatalf("after delete: %+v", l)
	}
	if out, err := runErr(t, time.Minute, "nbdinfo", s.snapURI("s2")); err == nil || !strings.Contains(out, "s2") {
		t.Fatalf("deleted snapshot still served: %v\n%s", err, out)
	}
}

// mapHas reports whether an nbdinfo --map line covers off with a
// description containing what.
func mapHas(m string, off int64, what string) bool {
	for _, line := range strings.Split(m, "\n") {
		var start, length int64
		var typ int
		if n, _ := fmt.Sscan(line, &start, &length, &typ); n != 3 {
			continue
		}
		if off >= start && off < start+length {
			return strings.Contains(line, what)
		}
	}
	return false
}

// mapChanged reports whether an nbdinfo --map of blockd:changed:X marks
// off as changed (flag 1).
func mapChanged(m string, off int64) bool {
	for _, line := range strings.Split(m, "\n") {
		var start, length int64
		var typ int
		if n, _ := fmt.Sscan(line, &start, &length, &typ); n != 3 {
			continue
		}
		if off >= start && off < start+length {
			return typ&1 != 0
		}
	}
	return false
}

// TestSnapshotBadInput: every refusal names its cause and changes nothing.
func TestSnapshotBadInput(t *testing.T) {
	s := startServer(t)
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x5a 0 64k")
	s.mustCLI("snapshot", "create", "vol0", "s1")
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"snapshot", "create", "vol0", "s1"}, "already exists"},
		{[]string{"snapshot", "create", "vol0", "a@b"}, "invalid snapshot name"},
		{[]string{"snapshot", "create", "vol0", "a/b"}, "invalid snapshot name"},
		{[]string{"snapshot", "create", "vol0", ".hidden"}, "must start with a letter or digit"},
		{[]string{"snapshot", "create", "vol0", strings.Repeat("x", 65)}, "at most 64"},
		{[]string{"snapshot", "create", "vol0"}, "want VOLUME SNAP"},
		{[]string{"snapshot", "create", "nosuch", "s9"}, "unknown volume"},
		{[]string{"snapshot", "delete", "vol0", "nope"}, "no such snapshot"},
		{[]string{"snapshot", "restore", "vol0", "nope"}, "no such snapshot"},
		{[]string{"snapshot", "list", "vol0", "extra"}, "want VOLUME"},
	}
	for _, c := range cases {
		out, err := s.cli(c.args...)
		if err == nil || !strings.Contains(out, c.want) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Errorf("blockd %s: want one line with %q, got %v:\n%s", strings.Join(c.args, " "), c.want, err, out)
		}
	}
	// The server checks names too (a client that skips the CLI).
	out := run(t, time.Minute, "curl", "-s", "-X", "POST", "-d", `{"name":"x@y"}`, "http://"+s.apiAddr+"/v1/server/volumes/vol0/snapshots")
	if !strings.Contains(out, `"code":"bad_request"`) || !strings.Contains(out, "invalid snapshot name") {
		t.Fatalf("server-side name check: %s", out)
	}
	if l := s.snapList(); len(l) != 1 || l[0].Name != "s1" {
		t.Fatalf("refusals changed the snapshots: %+v", l)
	}
	// An unknown snapshot as an export name is refused with the reason.
	if out, err := runErr(t, time.Minute, "nbdinfo", s.snapURI("nope")); err == nil || !strings.Contains(out, "nope") {
		t.Fatalf("unknown snapshot export: %v\n%s", err, out)
	}

	// A snapshot an NBD client has open cannot be deleted (busy), and can
	// once the client is gone.
	nbdsh := testenv.RequireTool(t, "nbdsh")
	cmd := exec.Command(nbdsh, "-u", s.snapURI("s1"), "-c", `
import sys
print("connected", flush=True)
sys.stdin.read()
`)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/usr/sbin:/sbin:/bin:"+os.Getenv("PATH"))
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if !strings.Contains(line, "connected") {
		_ = cmd.Process.Kill()
		t.Fatalf("nbdsh did not connect: %q", line)
	}
	out, err := s.cli("snapshot", "delete", "vol0", "s1")
	if err == nil || !strings.Contains(out, "in use") {
		t.Errorf("delete of an open snapshot: want busy, got %v:\n%s", err, out)
	}
	stdin.Close()
	_ = cmd.Wait()
	go io.Copy(io.Discard, stdout)
	deadline := time.Now().Add(30 * time.Second)
	for {
		out, err = s.cli("snapshot", "delete", "vol0", "s1")
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond) // the server notices the closed connection
	}
	if err != nil {
		t.Fatalf("delete after the reader left: %v\n%s", err, out)
	}
}

// TestSnapshotRaces: restore and delete racing creates. Every operation
// either succeeds or fails with a clear reason, and afterwards each
// snapshot holds one consistent image: the volume before or after the
// restore, never a mix.
func TestSnapshotRaces(t *testing.T) {
	s := startServer(t)
	dir := t.TempDir()
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x11 0 4M")
	base := filepath.Join(dir, "base.raw")
	capture(t, s.uri(), base)
	s.mustCLI("snapshot", "create", "vol0", "base")
	s.mustCLI("snapshot", "create", "vol0", "victim")
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(), "-c", "write -P 0x77 0 4M", "-c", "write -P 0x78 200M 1M")
	changed := filepath.Join(dir, "changed.raw")
	capture(t, s.uri(), changed)

	var wg sync.WaitGroup
	results := make([]string, 6)
	ops := [][]string{
		{"snapshot", "restore", "vol0", "base"},
		{"snapshot", "create", "vol0", "r1"},
		{"snapshot", "delete", "vol0", "victim"},
		{"snapshot", "create", "vol0", "r2"},
		{"snapshot", "create", "vol0", "r3"},
		{"snapshot", "create", "vol0", "r1"}, // duplicate of a concurrent create: one of the two fails
	}
	for i, op := range ops {
		wg.Add(1)
		go func(i int, op []string) {
			defer wg.Done()
			out, err := s.cli(op...)
			results[i] = fmt.Sprintf("%v: %v: %s", op, err, strings.TrimSpace(out))
		}(i, op)
	}
	wg.Wait()
	for _, r := range results {
		t.Log(r)
	}
	for i, r := range results {
		if i == 5 || i == 1 {
			continue
		}
		if !strings.Contains(r, ": <nil>: ") {
			t.Fatalf("operation failed: %s", r)
		}
	}
	ok1, ok5 := strings.Contains(results[1], ": <nil>: "), strings.Contains(results[5], ": <nil>: ")
	if ok1 == ok5 {
		t.Fatalf("two creates of r1: want exactly one to succeed:\n%s\n%s", results[1], results[5])
	}
	for _, r := range []string{results[1], results[5]} {
		if !strings.Contains(r, ": <nil>: ") && !strings.Contains(r, "already exists") {
			t.Fatalf("duplicate create failed without naming the cause: %s", r)
		}
	}
	names := map[string]bool{}
	for _, sn := range s.snapList() {
		names[sn.Name] = true
	}
	if names["victim"] || !names["base"] || !names["r1"] || !names["r2"] || !names["r3"] {
		t.Fatalf("snapshots after the race: %v", names)
	}
	run(t, 3*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", base, s.uri())
	for _, sn := range []string{"r1", "r2", "r3"} {
		_, e1 := runErr(t, 3*time.Minute, "qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", base, s.snapURI(sn))
		_, e2 := runErr(t, 3*time.Minute, "qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", changed, s.snapURI(sn))
		if (e1 == nil) == (e2 == nil) {
			t.Fatalf("snapshot %s is neither the volume before nor after the restore (before: %v, after: %v)", sn, e2, e1)
		}
	}
}
