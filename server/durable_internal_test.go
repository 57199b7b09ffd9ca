package server

import (
	"log/slog"
	"reflect"
	"testing"
	"time"

	"github.com/blockd/blockd/vfs"
)

// TestServerIDSurvivesPowerCut: a generated server ID is durable once
// serverID returns: after a power cut that drops every unsynced write the
// server comes back under the same identity (a new one would make the
// master see a stranger holding the old server's volumes).
func TestServerIDSurvivesPowerCut(t *testing.T) {
	fs := vfs.NewCrashFS()
	if err := fs.MkdirAll("/data", 0o755); err != nil {
		t.Fatal(err)
	}
	id, err := serverID(fs, "/data", "")
	if err != nil {
		t.Fatal(err)
	}
	after := fs.PowerCut(vfs.CutOptions{})
	again, err := serverID(after, "/data", "")
	if err != nil || again != id {
		t.Fatalf("after a power cut: server id %q (%v), want %q", again, err, id)
	}
	if _, err := serverID(after, "/data", "other"); err == nil {
		t.Fatal("a configured id that differs from the stored one was accepted")
	}
}

// TestUblkStateThroughFS: ublk.json is written through the server's vfs
// and durable once saveState returns, so a restarted server (after a power
// cut) recovers the devices it served.
func TestUblkStateThroughFS(t *testing.T) {
	fs := vfs.NewCrashFS()
	if err := fs.MkdirAll("/data", 0o755); err != nil {
		t.Fatal(err)
	}
	newControl := func(fs vfs.FS) *control {
		return &control{s: &Server{cfg: Config{DataDir: "/data", FS: fs}}, log: slog.Default(), devs: map[int]*ublkEntry{}}
	}
	c := newControl(fs)
	c.devs[3] = &ublkEntry{volume: "vol0", id: 3, size: 1 << 30, blockSize: 4096}
	c.devs[1] = &ublkEntry{volume: "vol1", id: 1, size: 16 << 20, blockSize: 512}
	if err := c.saveState(); err != nil {
		t.Fatal(err)
	}
	got, err := newControl(fs.PowerCut(vfs.CutOptions{})).loadState()
	want := []ublkStateEntry{{Volume: "vol1", ID: 1, SizeBytes: 16 << 20, BlockSize: 512}, {Volume: "vol0", ID: 3, SizeBytes: 1 << 30, BlockSize: 4096}}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("after a power cut: %+v %v, want %+v", got, err, want)
	}
}

// TestUblkRecoveryWaitConfig: the recovery wait comes from the server's
// configuration (set by cmd), 90 s when unset.
func TestUblkRecoveryWaitConfig(t *testing.T) {
	for cfg, want := range map[time.Duration]time.Duration{0: 90 * time.Second, 15 * time.Second: 15 * time.Second} {
		c := &control{s: &Server{cfg: Config{UblkRecoveryWait: cfg}}}
		if got := c.recoveryPrimaryWait(); got != want {
			t.Errorf("UblkRecoveryWait %v: waits %v, want %v", cfg, got, want)
		}
	}
}
