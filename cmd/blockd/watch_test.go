package main

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// TestRenderWatch: a rebuild gets a bar, its rate from two frames and an
// ETA; an InSync replica its flushed LSN.
func TestRenderWatch(t *testing.T) {
	info := &api.VolumeInfo{Name: "v", Status: api.StatusDegraded, Epoch: 3, RF: 3, Durability: api.DurabilityBestEffort,
		Primary: api.PrimaryRef{ServerID: "s1"}, Replicas: []api.ReplicaInfo{
			{ServerID: "s2", State: api.StateRebuilding, Progress: &api.TransferProgress{Kind: "rebuild", DoneBytes: 16 << 20, TotalBytes: 64 << 20, ElapsedMS: 500}},
			{ServerID: "s3", State: api.StateInSync, FlushedLSN: 42}}}
	last := map[string]sample{}
	t0 := time.Unix(1000, 0)
	first := renderWatch(info, t0, last)
	if !strings.Contains(first, "[######..................]  25%  16 MiB / 64 MiB  0 B/s  ETA -") {
		t.Errorf("first frame:\n%s", first)
	}
	info.Replicas[0].Progress.DoneBytes = 24 << 20
	second := renderWatch(info, t0.Add(time.Second), last)
	for _, want := range []string{"37%  24 MiB / 64 MiB  8.0 MiB/s  ETA 5s", "s3  InSync       flushed_lsn 42", "primary s1"} {
		if !strings.Contains(second, want) {
			t.Errorf("second frame lacks %q:\n%s", want, second)
		}
	}
	info.Replicas[0].State, info.Replicas[0].Progress = api.StateInSync, nil
	if f := renderWatch(info, t0.Add(2*time.Second), last); strings.Contains(f, "[") || len(last) != 0 {
		t.Errorf("after the rebuild:\n%s", f)
	}
}
