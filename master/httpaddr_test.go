package master

import (
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// A server's admin API address (http_addr) is recorded from its
// heartbeats and answered as the primary's; a forged heartbeat cannot
// move it, nor claim a live server's, while that server heartbeats.
func TestHTTPAddrRecordedAndGuarded(t *testing.T) {
	var logs logSink
	ttl := time.Second
	m := startMaster(t, Config{DataDir: t.TempDir(), APIAddr: "127.0.0.1:0", LeaseTTL: ttl, Logger: logs.logger()})
	if err := m.WaitLeader(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	c := api.NewClient([]string{m.APIAddr()})
	beat := func(id, addr, nbd, http string) error {
		_, err := c.Heartbeat(ctxT(t), api.HeartbeatRequest{ServerID: id, Addr: addr, NBDAddr: nbd, HTTPAddr: http,
			CapacityBytes: 100 << 30, FreeBytes: 90 << 30})
		return err
	}
	if err := beat("a", "127.0.0.1:7001", "127.0.0.1:8001", "127.0.0.1:9001"); err != nil {
		t.Fatal(err)
	}
	v, err := c.CreateVolume(ctxT(t), api.CreateVolumeRequest{Name: "v", SizeBytes: 1 << 20, RF: 1})
	if err != nil {
		t.Fatal(err)
	}
	if v.Primary.HTTPAddr != "127.0.0.1:9001" {
		t.Fatalf("volume info primary http_addr %q", v.Primary.HTTPAddr)
	}
	p, err := c.PrimaryOf(ctxT(t), "v")
	if err != nil || p.HTTPAddr != "127.0.0.1:9001" {
		t.Fatalf("primary %+v %v", p, err)
	}
	// A forged heartbeat as a, same endpoints but another admin address.
	if err := beat("a", "127.0.0.1:7001", "127.0.0.1:8001", "127.0.0.1:9666"); !api.IsCode(err, api.CodeAddressInUse) {
		t.Fatalf("moved http_addr of a live server: %v", err)
	}
	// Another server claiming a's admin address.
	if err := beat("b", "127.0.0.1:7002", "127.0.0.1:8002", "127.0.0.1:9001"); !api.IsCode(err, api.CodeAddressInUse) {
		t.Fatalf("b took live a's http_addr: %v", err)
	}
	if len(logs.find("endpoint_change_refused", "field", "http_addr")) == 0 {
		t.Fatal("refusal not logged")
	}
	if p, _ := c.PrimaryOf(ctxT(t), "v"); p.HTTPAddr != "127.0.0.1:9001" {
		t.Fatalf("forged heartbeats moved http_addr to %q", p.HTTPAddr)
	}
	// A real move, after a silence of the lease TTL.
	time.Sleep(ttl + 200*time.Millisecond)
	if err := beat("a", "127.0.0.1:7001", "127.0.0.1:8001", "127.0.0.1:9002"); err != nil {
		t.Fatal(err)
	}
	if p, _ := c.PrimaryOf(ctxT(t), "v"); p.HTTPAddr != "127.0.0.1:9002" {
		t.Fatalf("after the move http_addr %q", p.HTTPAddr)
	}
}
