package kernel

import (
	"encoding/binary"
	"testing"
)

// TestAttrEncoding checks the netlink attribute layout the kernel parses:
// 4-byte aligned TLVs, NUL-terminated strings, and the SOCKETS nest of
// SOCK_ITEM{SOCK_FD}.
func TestAttrEncoding(t *testing.T) {
	var a attrBuf
	a.u32(attrIndex, 7)
	a.u64(attrSizeBytes, 1<<30)
	a.str(attrBackendID, "vol0") // 5 bytes + 3 padding
	a.raw(attrSockets, sockets([]int{3, 4}))
	b := a.bytes()
	if len(b)%4 != 0 {
		t.Fatalf("length %d not aligned", len(b))
	}
	m := parseAttrs(b)
	if binary.NativeEndian.Uint32(m[attrIndex]) != 7 {
		t.Errorf("index %v", m[attrIndex])
	}
	if binary.NativeEndian.Uint64(m[attrSizeBytes]) != 1<<30 {
		t.Errorf("size %v", m[attrSizeBytes])
	}
	if got := cstr(m[attrBackendID]); got != "vol0" || len(m[attrBackendID]) != 5 {
		t.Errorf("backend %q (%d bytes)", got, len(m[attrBackendID]))
	}
	items := parseAttrList(m[attrSockets])
	if len(items) != 2 {
		t.Fatalf("%d socket items", len(items))
	}
	for i, it := range items {
		if it.typ != sockItem {
			t.Errorf("item type %d", it.typ)
		}
		fd := parseAttrs(it.data)[sockFD]
		if int(binary.NativeEndian.Uint32(fd)) != 3+i {
			t.Errorf("item %d fd %v", i, fd)
		}
	}
	// Truncated or garbage input never panics.
	for n := 0; n < len(b); n++ {
		parseAttrs(b[:n])
	}
	parseAttrs([]byte{0xff, 0xff, 1, 0, 0, 0})
	parseAttrs([]byte{2, 0, 1, 0})
}
