package nbd

import (
	"testing"

	"github.com/blockd/blockd/nbd/wire"
)

// TestStats: connections and in-flight requests are counted from the live
// connections, error replies by errno.
func TestStats(t *testing.T) {
	ts := startMem(t)
	ts.dev.mu.Lock()
	ts.dev.gateAt = 1 << 20
	ts.dev.gate = make(chan struct{})
	ts.dev.gated = make(chan struct{}, 1)
	ts.dev.mu.Unlock()
	rc := dialRaw(t, "tcp", ts.addr)
	rc.connect("vol0", true)
	rc.request(wire.CmdRead, 0, 1, 1<<20, 4096, nil) // held in the device
	<-ts.dev.gated
	st := ts.srv.Stats()
	if st.Connections != 1 || st.Accepted != 1 || st.InFlight != 1 {
		t.Fatalf("with a held read: %+v", st)
	}
	rc.request(wire.CmdRead, 0, 2, testSize, 4096, nil)                     // beyond the end
	rc.request(wire.CmdWrite, 0, 3, testSize-512, 4096, make([]byte, 4096)) // write beyond the end
	for i := 0; i < 2; i++ {
		if r := rc.readReply(); r.errno == 0 {
			t.Fatalf("reply %+v: want an error", r)
		}
	}
	close(ts.dev.gate)
	if r := rc.readReply(); r.handle != 1 || r.errno != 0 {
		t.Fatalf("held read: %+v", r)
	}
	st = ts.srv.Stats()
	if st.Errors["EINVAL"] != 1 || st.Errors["ENOSPC"] != 1 || st.Errors["EIO"] != 0 || st.InFlight != 0 {
		t.Fatalf("after the errors: %+v", st)
	}
	if len(st.Errors) != len(ErrnoNames)+1 {
		t.Fatalf("errno keys %v, want every name and other", st.Errors)
	}
}
