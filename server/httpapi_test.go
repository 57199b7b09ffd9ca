package server_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockvol"
	"github.com/blockd/blockd/server"
)

// TestHTTPAPIErrors: the admin API (--http) answers every refusal with a
// one-line JSON error naming its cause. The server has no reachable
// master, so its volume never becomes primary: snapshot operations on it
// are 409 not_primary, and nothing is created.
func TestHTTPAPIErrors(t *testing.T) {
	dir := t.TempDir()
	vol, err := blockvol.Create(filepath.Join(dir, "volumes", "idle"), blockvol.Options{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := vol.Close(); err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{DataDir: dir, Masters: []string{"127.0.0.1:1"}, NBD: "127.0.0.1:0", HTTP: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if srv.HTTPAddr() == "" || strings.HasSuffix(srv.HTTPAddr(), ":0") {
		t.Fatalf("HTTPAddr %q", srv.HTTPAddr())
	}
	base := "http://" + srv.HTTPAddr()
	cases := []struct {
		name, method, path, body string
		status                   int
		code, msg                string
	}{
		{"unknown volume", "POST", "/v1/server/volumes/nope/snapshots", `{"name":"s1"}`, 404, "not_found", `volume "nope" is not hosted`},
		{"not primary", "POST", "/v1/server/volumes/idle/snapshots", `{"name":"s1"}`, 409, "not_primary", "not its primary"},
		{"list not primary", "GET", "/v1/server/volumes/idle/snapshots", "", 409, "not_primary", "not its primary"},
		{"delete not primary", "DELETE", "/v1/server/volumes/idle/snapshots/s1", "", 409, "not_primary", "not its primary"},
		{"restore not primary", "POST", "/v1/server/volumes/idle/snapshots/s1/restore", "", 409, "not_primary", "not its primary"},
		{"bad json", "POST", "/v1/server/volumes/idle/snapshots", `{"name":`, 400, "bad_request", "invalid JSON body"},
		{"bad name", "POST", "/v1/server/volumes/idle/snapshots", `{"name":"a@b"}`, 400, "bad_request", "invalid snapshot name"},
		{"empty name", "POST", "/v1/server/volumes/idle/snapshots", `{}`, 400, "bad_request", "invalid snapshot name: empty"},
		{"bad name in path", "DELETE", "/v1/server/volumes/idle/snapshots/.x", "", 400, "bad_request", "must start with a letter or digit"},
		{"huge body", "POST", "/v1/server/volumes/idle/snapshots", `{"name":"` + strings.Repeat("x", 2<<20) + `"}`, 400, "bad_request", "body larger than"},
		{"unknown endpoint", "GET", "/v1/server/nothing", "", 404, "not_found", "no such endpoint"},
		{"wrong method", "PUT", "/v1/server/volumes/idle/snapshots", "", 404, "not_found", "no such endpoint: PUT"},
	}
	for _, tc := range cases {
		req, err := http.NewRequest(tc.method, base+tc.path, strings.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status {
			t.Errorf("%s: status %d, want %d (%s)", tc.name, resp.StatusCode, tc.status, b)
			continue
		}
		if tc.code == "" {
			continue
		}
		var e api.Error
		if err := json.Unmarshal(b, &e); err != nil || e.Code != tc.code || !strings.Contains(e.Message, tc.msg) {
			t.Errorf("%s: body %s, want code %s with %q", tc.name, b, tc.code, tc.msg)
		}
		if strings.Count(strings.TrimSpace(string(b)), "\n") != 0 {
			t.Errorf("%s: error body is not one line: %q", tc.name, b)
		}
	}
	// The Go client sees the same.
	_, err = api.NewClient([]string{srv.HTTPAddr()}).CreateSnapshot(context.Background(), "idle", "s1")
	if !api.IsCode(err, api.CodeNotPrimary) {
		t.Fatalf("client create on a non-primary: %v", err)
	}
}
