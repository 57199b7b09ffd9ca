package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
)

// TestFlagsAfterArgs: `volume create NAME --size 1GiB` parses like flags
// first, through run.
func TestFlagsAfterArgs(t *testing.T) {
	var gotArgs []string
	var size, master, output string
	var rf int
	app := &cli.App{Name: "t", Commands: []*cli.Command{{
		Name:  "create",
		Flags: volClientFlags(volPolicyFlags()...),
		Action: func(c *cli.Context) error {
			gotArgs, size, master, rf, output = c.Args().Slice(), c.String("size"), c.String("master"), c.Int("rf"), c.String("output")
			return nil
		},
	}}}
	if err := run(app, []string{"t", "create", "--rf", "3", "vol1", "--size", "10GiB", "-o", "json", "--master=a:1,b:2"}); err != nil {
		t.Fatal(err)
	}
	if len(gotArgs) != 1 || gotArgs[0] != "vol1" || size != "10GiB" || rf != 3 || master != "a:1,b:2" || output != "json" {
		t.Fatalf("args %q size %q rf %d master %q output %q", gotArgs, size, rf, master, output)
	}
	// A value that looks like a flag stays the value of its flag.
	if err := run(app, []string{"t", "create", "vol1", "--size", "-5GiB"}); err != nil || size != "-5GiB" || len(gotArgs) != 1 {
		t.Fatalf("--size -5GiB: %v size %q args %q", err, size, gotArgs)
	}
	if err := run(app, []string{"t", "create", "vol1", "--bogus"}); err == nil {
		t.Fatal("unknown flag accepted")
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"512MiB": 512 << 20, "10GiB": 10 << 30, "1TB": 1e12, "4096": 4096, "1GB": 1000001536, "1.5GiB": 3 << 29} {
		got, err := volParseSize("size", in, 4096)
		if err != nil || got != want {
			t.Errorf("%s = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"ten", "-1G", "1ZiB", "0", "-5GiB", " -1"} {
		if _, err := volParseSize("size", in, 4096); err == nil {
			t.Errorf("%s accepted", in)
		}
	}
}

// policyMaster is an HTTP endpoint with the master's API shape that
// records the create and update requests it gets and answers with info.
func policyMaster(t *testing.T, info api.VolumeInfo) (addr string, got func() (string, []byte)) {
	t.Helper()
	var mu sync.Mutex
	var path string
	var body []byte
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		path, body = r.Method+" "+r.URL.Path, b
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(info)
	}))
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://"), func() (string, []byte) {
		mu.Lock()
		defer mu.Unlock()
		return path, body
	}
}

func TestMinCopiesFlags(t *testing.T) {
	addr, got := policyMaster(t, api.VolumeInfo{Name: "db", MinCopies: 3})
	if _, err := runCLI(t, "volume", "create", "db", "--size", "1GiB", "--rf", "3", "--min-copies", "2", "--master", addr); err != nil {
		t.Fatal(err)
	}
	path, body := got()
	var create api.CreateVolumeRequest
	if err := json.Unmarshal(body, &create); err != nil || path != "POST /v1/volumes" || create.MinCopies != 2 || create.RF != 3 {
		t.Fatalf("%s %s: %+v %v", path, body, create, err)
	}

	out, err := runCLI(t, "volume", "update", "db", "--min-copies", "3", "--master", addr)
	if err != nil {
		t.Fatal(err)
	}
	path, body = got()
	var upd api.UpdateVolumeRequest
	if err := json.Unmarshal(body, &upd); err != nil || path != "POST /v1/volumes/db/update" || upd.MinCopies == nil || *upd.MinCopies != 3 {
		t.Fatalf("%s %s: %+v %v", path, body, upd, err)
	}
	if !strings.Contains(out, "min copies:  3") {
		t.Errorf("update printed:\n%s", out)
	}

	for _, args := range [][]string{
		{"volume", "update", "db"},
		{"volume", "update", "db", "--min-copies", "0"},
		{"volume", "create", "db", "--size", "1GiB", "--min-copies", "0"},
	} {
		before, _ := got()
		_, err := runCLI(t, append(args, "--master", addr)...)
		mustOneLine(t, err, "min-copies")
		if after, _ := got(); after != before {
			t.Errorf("%v reached the master", args)
		}
	}
}

func TestInfoShowsActingSet(t *testing.T) {
	info := api.VolumeInfo{Name: "db", RF: 3, Status: api.StatusDegraded, MinCopies: 2,
		Primary:   api.PrimaryRef{ServerID: "s1"},
		Replicas:  []api.ReplicaInfo{{ServerID: "s2", State: "InSync", InActingSet: true}, {ServerID: "s3", State: "Disconnected", Stale: true}},
		ActingSet: []string{"s1", "s2"}, Stale: []string{"s3"},
		FlushesOK: false, FlushBlocker: "sync_all: s2 has not flushed"}
	addr, _ := policyMaster(t, info)
	out, err := runCLI(t, "volume", "info", "db", "--master", addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"min copies:  2", "acting set:  s1,s2", "stale:       s3",
		"flushes:     blocked: sync_all: s2 has not flushed",
		"replica:     s2 InSync flushed_lsn=0 addr= (in acting set)",
		"replica:     s3 Disconnected flushed_lsn=0 addr= (stale)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("info lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "failure:") {
		t.Errorf("failure shown for a volume that has not failed:\n%s", out)
	}

	failed := api.VolumeInfo{Name: "big", Status: api.StatusFailed, Failure: "s1: fallocate wal: no space left on device", FlushesOK: true}
	addr, _ = policyMaster(t, failed)
	out, err = runCLI(t, "volume", "info", "big", "--master", addr)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"status:      failed", "failure:     s1: fallocate wal: no space left on device", "flushes:     ok", "acting set:  (none)"} {
		if !strings.Contains(out, want) {
			t.Errorf("info lacks %q:\n%s", want, out)
		}
	}
}
