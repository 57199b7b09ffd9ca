package main

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
)

// TestServeRefusesTooBigAtOnce: a volume larger than the data filesystem
// (at the default 100% over-provisioning) is refused with the server's own
// reason, at once, not after 30 s of retries naming only "insufficient
// servers".
func TestServeRefusesTooBigAtOnce(t *testing.T) {
	start := time.Now()
	_, err := runCLI(t, "serve", "--data", t.TempDir(), "--api", testenv.FreeAddr(t), "--nbd", testenv.FreeAddr(t),
		"--volume", "vol0:100TiB")
	took := time.Since(start)
	t.Logf("serve refused in %v", took.Round(time.Millisecond))
	if err == nil {
		t.Fatal("serve accepted a 100 TiB volume")
	}
	msg := oneLine(err)
	for _, want := range []string{"insufficient_servers", "local: insufficient_capacity", "free to provision", "100% over-provisioning"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q lacks %q", msg, want)
		}
	}
	// Generous bound: the retry loop it replaces ran for 30 s.
	if took > 20*time.Second {
		t.Errorf("refusal took %v", took)
	}
}

// TestServeOverprovisionFlag: a bad percentage is refused before anything
// starts.
func TestServeOverprovisionFlag(t *testing.T) {
	_, err := runCLI(t, "serve", "--data", t.TempDir(), "--overprovision", "0")
	if err == nil || !strings.Contains(err.Error(), "--overprovision 0") {
		t.Fatalf("err = %v", err)
	}
}
