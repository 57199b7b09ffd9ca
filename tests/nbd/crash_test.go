package nbdtests

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

// TestCrashKill9: data a real client wrote and flushed survives kill -9 of
// the server in the middle of a fio load; after a restart on the same data
// directory, another real client reads it back. Data written with FUA
// survives too, and so does data written on one connection and flushed on
// another (CAN_MULTI_CONN). kill -9 keeps the page cache: this proves the
// engine's recovery and the acknowledgement order, not fsync placement,
// which the engine's power-cut tests (vfs crash FS) cover.
func TestCrashKill9(t *testing.T) {
	s := startServer(t)
	// Background load on [0, 256M), until the kill.
	fioPath := testenv.RequireTool(t, "fio")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	load := exec.CommandContext(ctx, fioPath, "--name=load", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--numjobs=2", "--size=256m",
		"--time_based", "--runtime=120")
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	loadDone := make(chan error, 1)
	go func() { loadDone <- load.Wait() }()
	waited := false
	defer func() {
		cancel()
		if !waited {
			<-loadDone
		}
	}()
	// Let the load run, then write the data that must survive, beyond the
	// load's range: flushed writes and a FUA write, by two other clients.
	time.Sleep(2 * time.Second)
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "write -P 0x5a 300M 4M", "-c", "write -P 0xa5 310M 64k", "-c", "flush")
	script := `
h.pwrite(b"\x3c" * 1048576, 320 << 20)
h.flush()
h.pwrite(b"\xc3" * 65536, 330 << 20, nbd.CMD_FLAG_FUA)
# multi-conn: written on this connection, flushed on another
h.pwrite(b"\x99" * 131072, 340 << 20)
h2 = nbd.NBD()
h2.connect_uri(URI)
assert h2.can_multi_conn()
h2.flush()
print("WRITTEN")
`
	script = strings.ReplaceAll(script, "URI", fmt.Sprintf("%q", s.uri()))
	if out := run(t, time.Minute, "nbdsh", "-u", s.uri(), "-c", script); !strings.Contains(out, "WRITTEN") {
		t.Fatal(out)
	}
	select {
	case err := <-loadDone:
		t.Fatalf("fio load ended before the kill: %v", err)
	default:
	}
	s.kill9()
	// fio sees the server vanish and fails: expected.
	select {
	case <-loadDone:
		waited = true
	case <-time.After(time.Minute):
		t.Fatal("fio did not notice the server died")
	}

	s.start() // same data directory: recovery runs here
	out := run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "read -P 0x5a 300M 4M", "-c", "read -P 0xa5 310M 64k",
		"-c", "read -P 0x3c 320M 1M", "-c", "read -P 0xc3 330M 64k", "-c", "read -P 0x99 340M 128k")
	if strings.Contains(out, "fail") {
		t.Fatalf("flushed data lost after kill -9:\n%s\nserver log:\n%s", out, s.log)
	}
	// The restarted server takes writes and a full verify pass again.
	fio := run(t, 3*time.Minute, "fio", "--name=after", "--ioengine=nbd", "--uri="+s.uri(),
		"--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=16m", "--offset=512m",
		"--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--output-format=json")
	checkFio(t, fio, true, true)
}
