package api

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

// leaderServer answers volume info for "v" and 404 otherwise.
func leaderServer(t *testing.T, hits *atomic.Int32) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/v1/volumes/v" {
			json.NewEncoder(w).Encode(VolumeInfo{Name: "v", Epoch: 3})
			return
		}
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(Error{Code: CodeNotFound, Message: "volume not found"})
	}))
	t.Cleanup(s.Close)
	return s
}

func TestClientFollowsRedirectAndRemembersLeader(t *testing.T) {
	var leaderHits, followerHits atomic.Int32
	leader := leaderServer(t, &leaderHits)
	lhost := strings.TrimPrefix(leader.URL, "http://")
	follower := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		followerHits.Add(1)
		w.Header().Set("Location", leader.URL+r.URL.RequestURI())
		w.WriteHeader(http.StatusTemporaryRedirect)
		json.NewEncoder(w).Encode(Error{Code: CodeNotLeader, Leader: lhost})
	}))
	defer follower.Close()

	c := NewClient([]string{strings.TrimPrefix(follower.URL, "http://")})
	v, err := c.VolumeInfo(ctx(t), "v")
	if err != nil || v.Epoch != 3 {
		t.Fatalf("info = %+v, %v", v, err)
	}
	if c.Leader() != leader.URL {
		t.Fatalf("leader = %q, want %q", c.Leader(), leader.URL)
	}
	if _, err := c.VolumeInfo(ctx(t), "v"); err != nil {
		t.Fatal(err)
	}
	if followerHits.Load() != 1 || leaderHits.Load() != 2 {
		t.Fatalf("follower hits %d, leader hits %d: the leader was not remembered", followerHits.Load(), leaderHits.Load())
	}
}

func TestClientSkipsDeadAndLeaderlessMasters(t *testing.T) {
	var hits atomic.Int32
	leader := leaderServer(t, &hits)
	// A dead address: a listener closed before use.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	// A master that knows no leader.
	noLeader := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(Error{Code: CodeNotLeader, Message: "no leader"})
	}))
	defer noLeader.Close()

	c := NewClient([]string{dead, noLeader.URL, leader.URL})
	v, err := c.VolumeInfo(ctx(t), "v")
	if err != nil || v.Name != "v" {
		t.Fatalf("info = %+v, %v", v, err)
	}
	// A real answer from the leader is returned as a typed error, not retried.
	before := hits.Load()
	_, err = c.VolumeInfo(ctx(t), "nope")
	if !IsCode(err, CodeNotFound) {
		t.Fatalf("err = %v", err)
	}
	if e := err.(*Error); e.Status != http.StatusNotFound {
		t.Fatalf("status = %d", e.Status)
	}
	if hits.Load() != before+1 {
		t.Fatalf("a 404 was retried")
	}
}

func TestClientGivesUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	c := NewClient([]string{dead})
	c.RetryFor = 300 * time.Millisecond
	_, err = c.ListVolumes(ctx(t))
	var ue *UnreachableError
	if !errors.As(err, &ue) || len(ue.Tried) != 1 || ue.Tried[0].Addr != dead || ue.Tried[0].Outcome != "refused the connection" {
		t.Fatalf("err = %#v", err)
	}
	if want := "GET /v1/volumes: no master answered: " + dead + " refused the connection ("; !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("err = %q, want it to start with %q", err, want)
	}
}

// TestClientSilentMaster: a master that accepts and never answers costs one
// AnswerTimeout per attempt and is named in the error.
func TestClientSilentMaster(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var accepted atomic.Int32
	go func() {
		var held []net.Conn
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			held = append(held, c)
		}
	}()
	c := NewClient([]string{ln.Addr().String()})
	c.RetryFor, c.AnswerTimeout = 0, 200*time.Millisecond
	_, err = c.VolumeInfo(ctx(t), "v")
	want := ln.Addr().String() + " accepted the connection but sent no reply within 200ms"
	if err == nil || !strings.Contains(err.Error(), want) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("err = %v, want %q", err, want)
	}
	if n := accepted.Load(); n != 1 {
		t.Fatalf("RetryFor 0 made %d attempts, want 1", n)
	}
}

// TestClientDoesNotRetryADeliveredPromote: a non-idempotent call whose
// connection breaks after sending is not retried and says so.
func TestClientDoesNotRetryADeliveredPromote(t *testing.T) {
	var hits atomic.Int32
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		hj, _ := w.(http.Hijacker)
		conn, _, _ := hj.Hijack()
		conn.Close()
	}))
	defer s.Close()
	c := NewClient([]string{s.URL})
	_, err := c.Promote(ctx(t), "v", PromoteRequest{})
	var ue *UnreachableError
	if !errors.As(err, &ue) || !ue.MaybeApplied || !strings.Contains(err.Error(), "may have been applied") {
		t.Fatalf("err = %v", err)
	}
	if hits.Load() != 1 {
		t.Fatalf("promote sent %d times", hits.Load())
	}
}

// TestClientClipsLongWords: a master's message echoing a huge name is cut.
func TestClientClipsLongWords(t *testing.T) {
	long := strings.Repeat("x", 10000)
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNotFound)
		json.NewEncoder(w).Encode(Error{Code: CodeNotFound, Message: "volume " + long + " not found"})
	}))
	defer s.Close()
	_, err := NewClient([]string{s.URL}).VolumeInfo(ctx(t), "x")
	if !IsCode(err, CodeNotFound) || len(err.Error()) > 200 || !strings.Contains(err.Error(), "(10000 bytes) not found") {
		t.Fatalf("err = %.300v", err)
	}
}

func TestCheckVolumeName(t *testing.T) {
	for _, ok := range []string{"a", "vol0", "A.b_c-d", strings.Repeat("z", 64), "0x"} {
		if err := CheckVolumeName(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "bad/name", ".x", "-x", "_x", "a b", "a@b", strings.Repeat("z", 65), "é"} {
		err := CheckVolumeName(bad)
		if !IsCode(err, CodeBadRequest) || !strings.Contains(err.Error(), VolumeNameRule) {
			t.Errorf("%q: %v", bad, err)
		}
	}
	err := CheckVolumeName(strings.Repeat("n", 10000))
	if err == nil || len(err.Error()) > 200 || !strings.Contains(err.Error(), "(10000 bytes)") {
		t.Errorf("long name: %.300v", err)
	}
}

func TestCreateFillsRequestID(t *testing.T) {
	var got CreateVolumeRequest
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&got)
		w.WriteHeader(http.StatusCreated)
		json.NewEncoder(w).Encode(VolumeInfo{Name: got.Name})
	}))
	defer s.Close()
	c := NewClient([]string{s.URL})
	if _, err := c.CreateVolume(ctx(t), CreateVolumeRequest{Name: "x", SizeBytes: 4096}); err != nil {
		t.Fatal(err)
	}
	if len(got.RequestID) != 24 {
		t.Fatalf("request id %q", got.RequestID)
	}
}

func TestParseAddrs(t *testing.T) {
	got := ParseAddrs(" a:1, ,b:2,")
	if len(got) != 2 || got[0] != "a:1" || got[1] != "b:2" {
		t.Fatalf("%q", got)
	}
	c := NewClient(nil)
	if c.Addrs()[0] != "http://"+DefaultMaster {
		t.Fatalf("%q", c.Addrs())
	}
}

func TestPrimaryNBD(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/volumes/ok/primary":
			json.NewEncoder(w).Encode(PrimaryInfo{Volume: "ok", ServerID: "s1", NBDAddr: "127.0.0.1:10809"})
		case "/v1/volumes/nonbd/primary":
			json.NewEncoder(w).Encode(PrimaryInfo{Volume: "nonbd", ServerID: "s2"})
		default:
			w.WriteHeader(http.StatusNotFound)
			json.NewEncoder(w).Encode(Error{Code: CodeNotFound, Message: "volume not found"})
		}
	}))
	defer s.Close()
	c := NewClient([]string{s.URL})
	if p, err := c.PrimaryNBD(ctx(t), "ok"); err != nil || p.NBDAddr != "127.0.0.1:10809" {
		t.Fatalf("ok: %+v %v", p, err)
	}
	if _, err := c.PrimaryNBD(ctx(t), "nonbd"); err == nil || !strings.Contains(err.Error(), `volume "nonbd": primary s2 has no NBD address`) {
		t.Fatalf("nonbd: %v", err)
	}
	if _, err := c.PrimaryNBD(ctx(t), "gone"); !IsCode(err, CodeNotFound) || !strings.Contains(err.Error(), `unknown volume "gone"`) {
		t.Fatalf("gone: %v", err)
	}
}

// TestClientNamesANonAPIAnswer: an HTTP server that is not a blockd master
// (or a master without that endpoint) is named with what it answered.
func TestClientNamesANonAPIAnswer(t *testing.T) {
	s := httptest.NewServer(http.NotFoundHandler())
	defer s.Close()
	_, err := NewClient([]string{s.URL}).UpdateVolume(ctx(t), "v", UpdateVolumeRequest{})
	want := strings.TrimPrefix(s.URL, "http://") + " answered POST /v1/volumes/v/update with 404 Not Found: 404 page not found"
	if !IsCode(err, CodeInternal) || !strings.Contains(err.Error(), want) {
		t.Fatalf("err = %v, want %q", err, want)
	}
}

// TestClientNamesLeaderlessMasters: masters that answer but know no
// leader are named as such.
func TestClientNamesLeaderlessMasters(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(Error{Code: CodeNotLeader, Message: "no leader"})
	}))
	defer s.Close()
	c := NewClient([]string{s.URL})
	c.RetryFor = 0
	_, err := c.ListVolumes(ctx(t))
	want := "GET /v1/volumes: no leader answered: " + strings.TrimPrefix(s.URL, "http://") + " is not the leader and knows of none"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Fatalf("err = %v, want %q", err, want)
	}
}
