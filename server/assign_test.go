package server

import (
	"testing"

	"github.com/blockd/blockd/api"
)

func TestDecide(t *testing.T) {
	a := func(role string, epoch uint64) api.VolumeAssignment {
		return api.VolumeAssignment{Volume: "v", Role: role, Epoch: epoch}
	}
	cases := []struct {
		name  string
		local localFacts
		in    api.VolumeAssignment
		want  step
	}{
		{"new volume as primary", localFacts{}, a(api.RolePrimary, 1), stepBecomePrimary},
		{"new volume as replica", localFacts{}, a(api.RoleReplica, 1), stepBecomeReplica},
		{"renewal", localFacts{true, api.RolePrimary, 3}, a(api.RolePrimary, 3), stepRenewPrimary},
		{"promotion bumps epoch", localFacts{true, api.RoleReplica, 3}, a(api.RolePrimary, 4), stepBecomePrimary},
		{"restart: role unknown, same epoch", localFacts{true, api.RoleNone, 3}, a(api.RolePrimary, 3), stepBecomePrimary},
		{"demotion of old primary", localFacts{true, api.RolePrimary, 3}, a(api.RoleReplica, 4), stepBecomeReplica},
		{"replica unchanged", localFacts{true, api.RoleReplica, 4}, a(api.RoleReplica, 4), stepKeepReplica},
		{"stale assignment after failover", localFacts{true, api.RolePrimary, 5}, a(api.RolePrimary, 4), stepIgnoreStale},
		{"stale replica assignment", localFacts{true, api.RoleReplica, 5}, a(api.RoleReplica, 4), stepIgnoreStale},
		{"stop", localFacts{true, api.RolePrimary, 5}, a(api.RoleNone, 5), stepStop},
		{"epoch zero refused", localFacts{}, a(api.RolePrimary, 0), stepRefuseInvalid},
		{"unknown role refused", localFacts{}, a("boss", 2), stepRefuseInvalid},
	}
	for _, c := range cases {
		if got := decide(c.local, c.in); got != c.want {
			t.Errorf("%s: decide = %v, want %v", c.name, got, c.want)
		}
	}
}

func TestValidVolumeName(t *testing.T) {
	for _, bad := range []string{"", ".", "..", "a/b", "a\\b", "x\x00"} {
		if validVolumeName(bad) == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
	for _, good := range []string{"vol0", "db-1", "a.b_c"} {
		if err := validVolumeName(good); err != nil {
			t.Errorf("name %q refused: %v", good, err)
		}
	}
}
