package master

import (
	"testing"

	"github.com/blockd/blockd/api"
)

// TestSetAllowApply: the allow list is raft state: set, replaced, lifted,
// refused when malformed or for another incarnation, and copied on read.
func TestSetAllowApply(t *testing.T) {
	s := newState()
	res := s.apply(&command{Op: opCreate, Volume: &VolumeRecord{Name: "v", SizeBytes: 1 << 30, BlockSize: 4096, RF: 1,
		Allow: []api.AllowEntry{{Client: "alice"}}}}, 7)
	if res.Err != nil || len(res.Vol.Allow) != 1 {
		t.Fatalf("create: %+v", res)
	}
	res = s.apply(&command{Op: opSetAllow, Name: "v", ID: 7, Allow: []api.AllowEntry{{Client: "bob", ReadOnly: true}}}, 8)
	if res.Err != nil || len(res.Vol.Allow) != 1 || res.Vol.Allow[0] != (api.AllowEntry{Client: "bob", ReadOnly: true}) || res.Vol.Epoch != 1 {
		t.Fatalf("set: %+v", res)
	}
	res.Vol.Allow[0].Client = "mallory" // a copy
	if s.Volumes["v"].Allow[0].Client != "bob" {
		t.Fatal("the result aliases the state")
	}
	if res := s.apply(&command{Op: opSetAllow, Name: "v", ID: 9, Allow: nil}, 9); res.Err == nil || res.Err.Code != api.CodeEpochChanged {
		t.Fatalf("another incarnation: %+v", res.Err)
	}
	if res := s.apply(&command{Op: opSetAllow, Name: "v", ID: 7, Allow: []api.AllowEntry{{Client: "../x"}}}, 10); res.Err == nil || res.Err.Code != api.CodeBadRequest {
		t.Fatalf("bad name: %+v", res.Err)
	}
	if res := s.apply(&command{Op: opSetAllow, Name: "v", ID: 7, Allow: []api.AllowEntry{}}, 11); res.Err != nil || res.Vol.Allow != nil {
		t.Fatalf("lift: %+v", res)
	}
}
