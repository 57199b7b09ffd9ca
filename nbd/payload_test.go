package nbd

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/blockd/blockd/nbd/wire"
)

// Large write payloads are read straight from the stream, past the
// connection's buffer, and the buffer fill after one reads only a header
// (readPayload). Writes of every size around that threshold, pipelined
// with small writes and flushes in one stream cut at random points, must
// all land, plain and over TLS; a read of everything then shows each
// write's bytes.
func TestPipelinedWritesOfMixedSizes(t *testing.T) {
	t.Run("plain", func(t *testing.T) {
		ts := startMem(t)
		rc := dialRaw(t, "tcp", ts.addr)
		rc.connect("vol0", true)
		pipelineMixedWrites(t, rc, ts.dev)
	})
	t.Run("tls", func(t *testing.T) {
		f := startTLS(t)
		rc := dialRaw(t, "tcp", f.ts.addr)
		rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
		if err := rc.upgrade(f.alice.ClientConfig(nil)); err != nil {
			t.Fatal(err)
		}
		if gi := rc.info(wire.OptGo, "vol0"); gi.errType != 0 {
			t.Fatalf("go vol0: %#x %q", gi.errType, gi.errMsg)
		}
		pipelineMixedWrites(t, rc, f.ts.dev)
	})
}

func pipelineMixedWrites(t *testing.T, rc *rawClient, dev *memDev) {
	r := rand.New(rand.NewPCG(7, 11))
	sizes := []int{512, 4096, 60 << 10, 64<<10 - 512, 64 << 10, 64<<10 + 512, 128 << 10, 1 << 20, 2 << 20}
	// In-flight writes may run in any order: they do not overlap.
	want := make([]byte, testSize)
	var stream []byte
	n, off := 0, 0
	for i := 0; ; i++ {
		size := sizes[r.IntN(len(sizes))]
		off += r.IntN(8) * 512
		if off+size > len(want) {
			break
		}
		data := make([]byte, size)
		for j := range data {
			data[j] = byte(r.Uint32())
		}
		copy(want[off:], data)
		stream = appendRequest(stream, wire.CmdWrite, uint64(i+1), uint64(off), data)
		off += size
		n++
		if r.IntN(10) == 0 {
			stream = appendRequest(stream, wire.CmdFlush, uint64(1<<32+i), 0, nil)
			n++
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for len(stream) > 0 {
			k := min(len(stream), 1+r.IntN(300<<10))
			if _, err := rc.nc.Write(stream[:k]); err != nil {
				t.Errorf("write the stream: %v", err)
				return
			}
			stream = stream[k:]
		}
	}()
	for i := 0; i < n; i++ {
		if rep := rc.readReply(); rep.errno != 0 {
			t.Fatalf("reply %d: errno %d %q", rep.handle, rep.errno, rep.errMsg)
		}
	}
	<-done
	got := make([]byte, len(want))
	for o := 0; o < len(got); o += 1 << 20 {
		if err := dev.ReadAt(got[o:o+1<<20], int64(o)); err != nil {
			t.Fatalf("device read at %d: %v", o, err)
		}
	}
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("device differs from the writes first at byte %d", i)
			}
		}
	}
}

func appendRequest(b []byte, typ uint16, handle, off uint64, payload []byte) []byte {
	var h [wire.RequestSize]byte
	binary.BigEndian.PutUint32(h[0:], wire.MagicRequest)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], handle)
	binary.BigEndian.PutUint64(h[16:], off)
	binary.BigEndian.PutUint32(h[24:], uint32(len(payload)))
	return append(append(b, h[:]...), payload...)
}
