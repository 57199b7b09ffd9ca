package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sort"
	"sync/atomic"
	"testing"

	"github.com/blockd/blockd/nbd/wire"
)

// metaDev is a memDev that offers two contexts of its own: "test:odd"
// (flag 1 on every odd MiB) and "test:all" (flag 7 everywhere).
type metaDev struct {
	*memDev
	failAll atomic.Bool
}

func (d *metaDev) MetaContexts() []string { return []string{"test:odd", "test:all", "base:bogus"} }

func (d *metaDev) MetaBlockStatus(name string, off, length int64) ([]MetaExtent, error) {
	switch name {
	case "test:all":
		if d.failAll.Load() {
			return nil, errors.New("context gone")
		}
		return []MetaExtent{{Offset: off, Length: length, Flags: 7}}, nil
	case "test:odd":
		var out []MetaExtent
		for pos := off; pos < off+length; {
			mib := pos >> 20
			end := min((mib+1)<<20, off+length)
			out = append(out, MetaExtent{Offset: pos, Length: end - pos, Flags: uint32(mib & 1)})
			pos = end
		}
		return out, nil
	}
	return nil, fmt.Errorf("no context %q", name)
}

// releasing counts the lookups and releases of its one export.
type releasing struct {
	dev               *metaDev
	lookups, releases atomic.Int32
}

func (s *releasing) Lookup(name string) (Export, error) {
	if name != "vol0" {
		return Export{}, fmt.Errorf("no export %q", name)
	}
	s.lookups.Add(1)
	return Export{Name: name, Device: s.dev, Release: func() { s.releases.Add(1) }}, nil
}

func (s *releasing) Names() []string { return []string{"vol0"} }

func listMeta(t *testing.T, rc *rawClient, opt uint32, export string, queries ...string) map[string]uint32 {
	t.Helper()
	rc.sendOpt(opt, metaData(export, queries...))
	got := map[string]uint32{}
	for {
		r := rc.readOptReply()
		if r.typ == wire.RepAck {
			return got
		}
		if r.typ != wire.RepMetaContext {
			t.Fatalf("meta context reply type %#x (%q)", r.typ, r.data)
		}
		got[string(r.data[4:])] = binary.BigEndian.Uint32(r.data)
	}
}

func keys(m map[string]uint32) []string {
	var k []string
	for n := range m {
		k = append(k, n)
	}
	sort.Strings(k)
	return k
}

func TestDeviceMetaContexts(t *testing.T) {
	src := &releasing{dev: &metaDev{memDev: newMemDev(testSize)}}
	ts := startServer(t, src)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc.sendOpt(wire.OptStructuredReply, nil)
	if r := rc.readOptReply(); r.typ != wire.RepAck {
		t.Fatalf("structured: %#x", r.typ)
	}
	// LIST everything: base:allocation and the device's (not its base: one).
	if got := keys(listMeta(t, rc, wire.OptListMetaContext, "vol0")); fmt.Sprint(got) != "[base:allocation test:all test:odd]" {
		t.Fatalf("list all: %v", got)
	}
	// LIST by namespace, by exact name; an unknown name matches nothing.
	if got := keys(listMeta(t, rc, wire.OptListMetaContext, "vol0", "test:")); fmt.Sprint(got) != "[test:all test:odd]" {
		t.Fatalf("list test: %v", got)
	}
	if got := keys(listMeta(t, rc, wire.OptListMetaContext, "vol0", "test:odd", "nope:x")); fmt.Sprint(got) != "[test:odd]" {
		t.Fatalf("list exact: %v", got)
	}
	// SET takes exact names only: a namespace query selects nothing.
	if got := listMeta(t, rc, wire.OptSetMetaContext, "vol0", "test:"); len(got) != 0 {
		t.Fatalf("set by namespace: %v", got)
	}
	set := listMeta(t, rc, wire.OptSetMetaContext, "vol0", wire.MetaBaseAllocation, "test:odd", "test:all", "test:none")
	if fmt.Sprint(keys(set)) != "[base:allocation test:all test:odd]" || set[wire.MetaBaseAllocation] != wire.MetaBaseAllocationID {
		t.Fatalf("set: %v", set)
	}
	ids := map[uint32]bool{}
	for _, id := range set {
		if id == 0 || ids[id] {
			t.Fatalf("set: context IDs not distinct and non-zero: %v", set)
		}
		ids[id] = true
	}
	// Every lookup made for negotiation was released.
	if l, r := src.lookups.Load(), src.releases.Load(); l == 0 || l != r {
		t.Fatalf("negotiation: %d lookups, %d releases", l, r)
	}
	rc.structured = true
	if gi := rc.info(wire.OptGo, "vol0"); gi.errType != 0 {
		t.Fatalf("go: %+v", gi)
	}
	// One request, one chunk per context, the last one done; each
	// context's own flags.
	rc.request(wire.CmdBlockStatus, 0, 1, 512<<10, 2<<20, nil)
	rep := rc.readReply()
	if rep.errno != 0 || rep.chunks != 3 || len(rep.statusIDs) != 3 {
		t.Fatalf("block status: %+v", rep)
	}
	if got := rep.status[set["test:odd"]]; fmt.Sprint(got) != "[[524288 0] [1048576 1] [524288 0]]" {
		t.Fatalf("test:odd: %v", got)
	}
	if got := rep.status[set["test:all"]]; fmt.Sprint(got) != "[[2097152 7]]" {
		t.Fatalf("test:all: %v", got)
	}
	if got := rep.status[wire.MetaBaseAllocationID]; fmt.Sprint(got) != fmt.Sprint([][2]uint32{{2 << 20, wire.StateHole | wire.StateZero}}) {
		t.Fatalf("base:allocation: %v", got)
	}
	// REQ_ONE: one descriptor per context.
	rc.request(wire.CmdBlockStatus, wire.CmdFlagReqOne, 2, 512<<10, 2<<20, nil)
	if rep := rc.readReply(); rep.errno != 0 || len(rep.extents) != 3 || fmt.Sprint(rep.status[set["test:odd"]]) != "[[524288 0]]" {
		t.Fatalf("req_one: %+v", rep)
	}
	// A context that fails answers the request with an error, nothing else.
	src.dev.failAll.Store(true)
	rc.request(wire.CmdBlockStatus, 0, 3, 0, 1<<20, nil)
	if rep := rc.readReply(); rep.errno != wire.ErrnoIO || len(rep.statusIDs) != 0 {
		t.Fatalf("failing context: %+v", rep)
	}
	rc.request(wire.CmdDisc, 0, 4, 0, 0, nil)
	rc.expectClosed()
	waitConns(t, ts.srv, 0)
	if l, r := src.lookups.Load(), src.releases.Load(); l != r {
		t.Fatalf("after close: %d lookups, %d releases", l, r)
	}
}

// A device's contexts alone (no base:allocation) enable BLOCK_STATUS.
func TestDeviceMetaContextWithoutBase(t *testing.T) {
	src := &releasing{dev: &metaDev{memDev: newMemDev(testSize)}}
	ts := startServer(t, src)
	rc := dialRaw(t, "tcp", ts.addr)
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc.sendOpt(wire.OptStructuredReply, nil)
	rc.readOptReply()
	set := listMeta(t, rc, wire.OptSetMetaContext, "vol0", "test:odd")
	rc.structured = true
	if gi := rc.info(wire.OptGo, "vol0"); gi.errType != 0 {
		t.Fatalf("go: %+v", gi)
	}
	rc.request(wire.CmdBlockStatus, 0, 1, 1<<20, 1<<20, nil)
	if rep := rc.readReply(); rep.errno != 0 || fmt.Sprint(rep.statusIDs) != fmt.Sprint([]uint32{set["test:odd"]}) ||
		fmt.Sprint(rep.status[set["test:odd"]]) != "[[1048576 1]]" {
		t.Fatalf("block status: %+v", rep)
	}
	// Contexts set for another export do not carry over to this one.
	rc2 := dialRaw(t, "tcp", ts.addr)
	rc2.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	rc2.sendOpt(wire.OptStructuredReply, nil)
	rc2.readOptReply()
	listMeta(t, rc2, wire.OptSetMetaContext, "other", "test:odd")
	rc2.structured = true
	if gi := rc2.info(wire.OptGo, "vol0"); gi.errType != 0 {
		t.Fatalf("go: %+v", gi)
	}
	rc2.request(wire.CmdBlockStatus, 0, 1, 0, 1<<20, nil)
	if rep := rc2.readReply(); rep.errno != wire.ErrnoInval {
		t.Fatalf("contexts of another export carried over: %+v", rep)
	}
}
