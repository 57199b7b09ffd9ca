package api

import (
	"context"
	"encoding/json"
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
	if _, err := c.ListVolumes(ctx(t)); err == nil || !strings.Contains(err.Error(), "no leader reachable") {
		t.Fatalf("err = %v", err)
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
