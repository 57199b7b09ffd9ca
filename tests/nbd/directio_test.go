package nbdtests

import (
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// `blockd serve --direct-io`: large writes' data goes around the page
// cache (the metric says how much), and flushed data survives kill -9:
// large flushed writes, a large write flushed on another connection's
// FLUSH, and small writes in between.
func TestDirectIOKill9(t *testing.T) {
	s := startServer(t, "--direct-io")
	run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "write -P 0x5a 0 8M", "-c", "write -P 0x11 9M 4k", "-c", "write -P 0xa5 16M 1M", "-c", "flush")
	script := `
h.pwrite(b"\x3c" * 2097152, 32 << 20)
h2 = nbd.NBD()
h2.connect_uri(URI)
h2.flush()
print("WRITTEN")
`
	script = strings.ReplaceAll(script, "URI", strconv.Quote(s.uri()))
	if out := run(t, time.Minute, "nbdsh", "-u", s.uri(), "-c", script); !strings.Contains(out, "WRITTEN") {
		t.Fatal(out)
	}
	if got := directBytes(t, s.apiAddr); got < 11<<20 {
		t.Fatalf("blockd_volume_large_write_direct_bytes_total = %d after 11 MiB of large writes with --direct-io", got)
	}
	s.kill9()
	s.start()
	out := run(t, time.Minute, "qemu-io", "-f", "raw", s.uri(),
		"-c", "read -P 0x5a 0 8M", "-c", "read -P 0x11 9M 4k", "-c", "read -P 0xa5 16M 1M", "-c", "read -P 0x3c 32M 2M")
	if strings.Contains(out, "fail") {
		t.Fatalf("flushed data lost after kill -9 with --direct-io:\n%s\nserver log:\n%s", out, s.log)
	}
}

// directBytes reads vol0's direct-write counter from the server's /metrics.
func directBytes(t *testing.T, api string) int64 {
	t.Helper()
	resp, err := http.Get("http://" + api + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^blockd_volume_large_write_direct_bytes_total\{volume="vol0"\} (\S+)$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("no direct-write counter for vol0 in /metrics:\n%s", b)
	}
	f, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatal(err)
	}
	return int64(f)
}
