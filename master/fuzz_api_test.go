package master_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/master"
)

// panicCounter counts the master's api_panic events (the handler recovers
// a panic into a 500; the fuzzer must see it).
type panicCounter struct {
	n    *atomic.Int64
	last *atomic.Value
}

func (h panicCounter) Enabled(context.Context, slog.Level) bool { return true }
func (h panicCounter) Handle(_ context.Context, r slog.Record) error {
	if r.Message == "api_panic" {
		h.n.Add(1)
		var b strings.Builder
		r.Attrs(func(a slog.Attr) bool { b.WriteString(a.Key + "=" + a.Value.String() + " "); return true })
		h.last.Store(b.String())
	}
	return nil
}
func (h panicCounter) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h panicCounter) WithGroup(string) slog.Handler      { return h }

var fuzzPanics struct {
	n    atomic.Int64
	last atomic.Value
}

// startFuzzMaster starts one in-process single-node master for every
// input of the fuzz run in this process (starting raft per input would
// leave no time for inputs), with three servers that heartbeat once and a
// volume, so the volume endpoints have something to act on. It lives in
// f.TempDir until the fuzz target ends.
func startFuzzMaster(f *testing.F) http.Handler {
	m, err := master.Start(master.Config{DataDir: f.TempDir(), LeaseTTL: time.Hour,
		Logger: slog.New(panicCounter{n: &fuzzPanics.n, last: &fuzzPanics.last})})
	if err != nil {
		f.Fatalf("start master: %v", err)
	}
	f.Cleanup(func() { m.Close() })
	h := m.Handler()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if code, _ := call(h, "GET", "/v1/volumes", nil); code == http.StatusOK {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i, id := range []string{"f1", "f2", "f3"} {
		hb, _ := json.Marshal(api.HeartbeatRequest{ServerID: id, Addr: "127.0.0.1:1", NBDAddr: "127.0.0.1:2",
			CapacityBytes: 1 << 40, FreeBytes: int64(1+i) << 39})
		call(h, "POST", "/v1/heartbeat", hb)
	}
	cv, _ := json.Marshal(api.CreateVolumeRequest{Name: "fz", SizeBytes: 1 << 30, RF: 3, Durability: api.DurabilitySyncAll})
	if code, out := call(h, "POST", "/v1/volumes", cv); code >= 300 {
		f.Logf("seed volume not created (%d): %s", code, out)
	}
	return h
}

func call(h http.Handler, method, path string, body []byte) (int, []byte) {
	req := httptest.NewRequest(method, "http://master"+path, bytes.NewReader(body))
	req.RemoteAddr = "127.0.0.1:5555"
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec.Code, rec.Body.Bytes()
}

// endpoints with a JSON body, and GET/DELETE ones that take a name. The
// raft join endpoint is left out: a well-formed join of a made-up address
// would make the single master lose its quorum, which is correct and ends
// the fuzzing.
var fuzzRoutes = []struct{ method, path string }{
	{"POST", "/v1/volumes"},
	{"POST", "/v1/volumes/plan"},
	{"POST", "/v1/volumes/resolve"},
	{"POST", "/v1/heartbeat"},
	{"POST", "/v1/volumes/{name}/expand"},
	{"POST", "/v1/volumes/{name}/promote"},
	{"POST", "/v1/volumes/{name}/update"},
	{"GET", "/v1/volumes/{name}"},
	{"GET", "/v1/volumes/{name}/primary"},
	{"GET", "/v1/volumes/{name}/preflight"},
	{"DELETE", "/v1/volumes/{name}"},
}

// FuzzMasterAPI sends garbage and near-valid JSON bodies to the master's
// HTTP handlers in process. Whatever the input, the answer must not be a
// 500 (a panic the handler recovered is one, and is logged as api_panic),
// and an error answer must be the api.Error JSON.
func FuzzMasterAPI(f *testing.F) {
	seeds := []struct {
		route byte
		name  string
		body  string
	}{
		{0, "", `{"name":"a","size_bytes":1073741824,"rf":3,"durability":"sync_all"}`},
		{0, "", `{"name":"b","size_bytes":-1,"rf":0}`},
		{0, "", `{"name":"","size_bytes":9223372036854775807,"rf":99,"durability":"x","preset":"database","wal_size_bytes":-5,"block_size":3}`},
		{1, "", `{"name":"p","size_bytes":4096,"rf":2,"preset":"throughput"}`},
		{2, "", `{"size_bytes":1,"preset":"general"}`},
		{3, "", `{"server_id":"f1","addr":"127.0.0.1:1","nbd_addr":"127.0.0.1:2","volumes":[{"name":"fz","role":"primary","epoch":18446744073709551615,"replicas":[{"server_id":"f2","state":"InSync","flushed_lsn":1}]}]}`},
		{3, "", `{"server_id":"","volumes":null}`},
		{4, "fz", `{"size_bytes":2147483648}`},
		{4, "fz", `{"size_bytes":-1}`},
		{5, "fz", `{"target":"f2","force":true,"epoch":1}`},
		{5, "fz", `{"target":"nobody"}`},
		{6, "fz", `{"min_copies":0}`},
		{6, "fz", `{"min_copies":3}`},
		{7, "fz", ``},
		{8, "..%2f..", ``},
		{9, "fz", ``},
		{10, "nope", ``},
		{0, "", `{`},
		{0, "", `[]`},
		{0, "", `null`},
		{3, "", `{"volumes":[{"replicas":[{}]}]}`},
	}
	for _, s := range seeds {
		f.Add(s.route, s.name, []byte(s.body))
	}
	h := startFuzzMaster(f)
	f.Fuzz(func(t *testing.T, route byte, name string, body []byte) {
		r := fuzzRoutes[int(route)%len(fuzzRoutes)]
		path := strings.ReplaceAll(r.path, "{name}", url.PathEscape(name))
		before := fuzzPanics.n.Load()
		code, out := call(h, r.method, path, body)
		if n := fuzzPanics.n.Load(); n != before {
			t.Fatalf("%s %s %q: the handler panicked: %v", r.method, path, body, fuzzPanics.last.Load())
		}
		if code >= 500 && code != http.StatusServiceUnavailable {
			t.Fatalf("%s %s %q: status %d: %s", r.method, path, body, code, out)
		}
		if code >= 400 {
			var e api.Error
			if err := json.Unmarshal(out, &e); err != nil || e.Code == "" {
				t.Fatalf("%s %s %q: status %d with a body that is not an api error: %q", r.method, path, body, code, out)
			}
		}
	})
}
