package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/nbd/wire"
)

// rawClient is a deliberately low-level NBD client for protocol tests: it
// lets a test send anything, including what a real client never would.
type rawClient struct {
	t          testing.TB
	nc         net.Conn
	br         *bufio.Reader
	structured bool

	mu    sync.Mutex
	reads map[uint64]uint32 // pending simple-reply reads: handle -> length
}

func dialRaw(t testing.TB, network, addr string) *rawClient {
	t.Helper()
	nc, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	_ = nc.SetDeadline(time.Now().Add(60 * time.Second))
	rc := &rawClient{t: t, nc: nc, br: bufio.NewReader(nc), reads: map[uint64]uint32{}}
	t.Cleanup(func() { nc.Close() })
	var hello [18]byte
	rc.readFull(hello[:])
	if binary.BigEndian.Uint64(hello[0:]) != wire.MagicNBD || binary.BigEndian.Uint64(hello[8:]) != wire.MagicIHaveOpt {
		t.Fatalf("bad greeting % x", hello)
	}
	if f := binary.BigEndian.Uint16(hello[16:]); f != wire.HandshakeFixedNewstyle|wire.HandshakeNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	return rc
}

func (rc *rawClient) readFull(p []byte) {
	rc.t.Helper()
	if _, err := io.ReadFull(rc.br, p); err != nil {
		rc.t.Fatalf("read: %v", err)
	}
}

func (rc *rawClient) write(p []byte) {
	rc.t.Helper()
	if _, err := rc.nc.Write(p); err != nil {
		rc.t.Fatalf("write: %v", err)
	}
}

func (rc *rawClient) clientFlags(f uint32) {
	rc.write(binary.BigEndian.AppendUint32(nil, f))
}

func (rc *rawClient) sendOpt(opt uint32, data []byte) {
	rc.t.Helper()
	b := binary.BigEndian.AppendUint64(nil, wire.MagicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	rc.write(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (rc *rawClient) readOptReply() optReply {
	rc.t.Helper()
	var h [20]byte
	rc.readFull(h[:])
	if m := binary.BigEndian.Uint64(h[0:]); m != wire.MagicOptReply {
		rc.t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:]), typ: binary.BigEndian.Uint32(h[12:])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	rc.readFull(r.data)
	return r
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaData(export string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	b = append(b, export...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// goInfo holds what an OPT_GO/INFO answered.
type goInfo struct {
	size              uint64
	flags             uint16
	name, desc        string
	minB, prefB, maxB uint32
	gotBlockSize      bool
	errType           uint32
	errMsg            string
}

// info sends OPT_GO or OPT_INFO and reads replies up to ACK or an error.
func (rc *rawClient) info(opt uint32, name string, infos ...uint16) goInfo {
	rc.t.Helper()
	rc.sendOpt(opt, goData(name, infos...))
	var gi goInfo
	for {
		r := rc.readOptReply()
		if r.opt != opt {
			rc.t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		switch {
		case r.typ == wire.RepAck:
			return gi
		case r.typ == wire.RepInfo:
			switch binary.BigEndian.Uint16(r.data) {
			case wire.InfoExport:
				gi.size = binary.BigEndian.Uint64(r.data[2:])
				gi.flags = binary.BigEndian.Uint16(r.data[10:])
			case wire.InfoName:
				gi.name = string(r.data[2:])
			case wire.InfoDescription:
				gi.desc = string(r.data[2:])
			case wire.InfoBlockSize:
				gi.gotBlockSize = true
				gi.minB = binary.BigEndian.Uint32(r.data[2:])
				gi.prefB = binary.BigEndian.Uint32(r.data[6:])
				gi.maxB = binary.BigEndian.Uint32(r.data[10:])
			}
		case r.typ&(1<<31) != 0:
			gi.errType, gi.errMsg = r.typ, string(r.data)
			return gi
		default:
			rc.t.Fatalf("unexpected reply type %#x", r.typ)
		}
	}
}

// connect negotiates: structured replies and base:allocation when asked,
// then OPT_GO on name.
func (rc *rawClient) connect(name string, structured bool) goInfo {
	rc.t.Helper()
	rc.clientFlags(wire.ClientFixedNewstyle | wire.ClientNoZeroes)
	if structured {
		rc.sendOpt(wire.OptStructuredReply, nil)
		if r := rc.readOptReply(); r.typ != wire.RepAck {
			rc.t.Fatalf("structured reply refused: %#x", r.typ)
		}
		rc.sendOpt(wire.OptSetMetaContext, metaData(name, wire.MetaBaseAllocation))
		r := rc.readOptReply()
		if r.typ != wire.RepMetaContext || string(r.data[4:]) != wire.MetaBaseAllocation {
			rc.t.Fatalf("meta context reply %#x %q", r.typ, r.data)
		}
		if r := rc.readOptReply(); r.typ != wire.RepAck {
			rc.t.Fatalf("meta context ack %#x", r.typ)
		}
		rc.structured = true
	}
	gi := rc.info(wire.OptGo, name)
	if gi.errType != 0 {
		rc.t.Fatalf("OPT_GO %q: %#x %s", name, gi.errType, gi.errMsg)
	}
	return gi
}

func (rc *rawClient) request(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	rc.t.Helper()
	rc.write(rc.frame(typ, flags, handle, off, length, payload))
}

// frame encodes a request (and records a simple-reply read's length) for
// a test that sends several in one write.
func (rc *rawClient) frame(typ, flags uint16, handle, off uint64, length uint32, payload []byte) []byte {
	b := make([]byte, wire.RequestSize, wire.RequestSize+len(payload))
	binary.BigEndian.PutUint32(b[0:], wire.MagicRequest)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], handle)
	binary.BigEndian.PutUint64(b[16:], off)
	binary.BigEndian.PutUint32(b[24:], length)
	if typ == wire.CmdRead && !rc.structured {
		rc.mu.Lock()
		rc.reads[handle] = length
		rc.mu.Unlock()
	}
	return append(b, payload...)
}

type reply struct {
	handle  uint64
	errno   uint32
	errMsg  string
	data    []byte // read data, reassembled from offset 0 of the request
	dataOff uint64
	extents [][2]uint32
	chunks  int
	// status holds each block status chunk's descriptors by context ID,
	// and statusIDs the IDs in the order the chunks came.
	status    map[uint32][][2]uint32
	statusIDs []uint32
}

// readReply reads one complete reply (all chunks of a structured one).
func (rc *rawClient) readReply() reply {
	rc.t.Helper()
	r, err := rc.tryReadReply()
	if err != nil {
		rc.t.Fatalf("read reply: %v", err)
	}
	return r
}

func (rc *rawClient) tryReadReply() (reply, error) {
	var m [4]byte
	if _, err := io.ReadFull(rc.br, m[:]); err != nil {
		return reply{}, err
	}
	switch binary.BigEndian.Uint32(m[:]) {
	case wire.MagicSimpleReply:
		var h [12]byte
		if _, err := io.ReadFull(rc.br, h[:]); err != nil {
			return reply{}, err
		}
		r := reply{errno: binary.BigEndian.Uint32(h[0:]), handle: binary.BigEndian.Uint64(h[4:])}
		rc.mu.Lock()
		n, isRead := rc.reads[r.handle]
		delete(rc.reads, r.handle)
		rc.mu.Unlock()
		if isRead && r.errno == 0 {
			r.data = make([]byte, n)
			if _, err := io.ReadFull(rc.br, r.data); err != nil {
				return r, err
			}
		}
		return r, nil
	case wire.MagicStructuredReply:
		var r reply
		for {
			var h [16]byte
			if _, err := io.ReadFull(rc.br, h[:]); err != nil {
				return r, err
			}
			flags := binary.BigEndian.Uint16(h[0:])
			typ := binary.BigEndian.Uint16(h[2:])
			r.handle = binary.BigEndian.Uint64(h[4:])
			p := make([]byte, binary.BigEndian.Uint32(h[12:]))
			if _, err := io.ReadFull(rc.br, p); err != nil {
				return r, err
			}
			r.chunks++
			switch typ {
			case wire.ReplyTypeNone:
			case wire.ReplyTypeOffsetData:
				r.dataOff = binary.BigEndian.Uint64(p)
				r.data = append(r.data, p[8:]...)
			case wire.ReplyTypeBlockStatus:
				id := binary.BigEndian.Uint32(p)
				if r.status == nil {
					r.status = map[uint32][][2]uint32{}
				}
				r.statusIDs = append(r.statusIDs, id)
				for i := 4; i+8 <= len(p); i += 8 {
					d := [2]uint32{binary.BigEndian.Uint32(p[i:]), binary.BigEndian.Uint32(p[i+4:])}
					r.extents = append(r.extents, d)
					r.status[id] = append(r.status[id], d)
				}
			case wire.ReplyTypeError, wire.ReplyTypeErrorOffset:
				r.errno = binary.BigEndian.Uint32(p)
				ml := binary.BigEndian.Uint16(p[4:])
				r.errMsg = string(p[6 : 6+ml])
			default:
				return r, fmt.Errorf("unknown chunk type %d", typ)
			}
			if flags&wire.ReplyFlagDone != 0 {
				return r, nil
			}
			// This client reads one reply at a time; interleaved chunks of
			// other handles would break it, and the server never sends them.
			var m2 [4]byte
			if _, err := io.ReadFull(rc.br, m2[:]); err != nil {
				return r, err
			}
		}
	default:
		return reply{}, fmt.Errorf("bad reply magic % x", m)
	}
}

// expectClosed asserts the server closes the connection.
func (rc *rawClient) expectClosed() {
	rc.t.Helper()
	_ = rc.nc.SetReadDeadline(time.Now().Add(30 * time.Second))
	b := make([]byte, 1)
	for {
		_, err := rc.br.Read(b)
		if err == io.EOF {
			return
		}
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				rc.t.Fatalf("connection not closed by server")
			}
			return // reset is closed too
		}
	}
}

func (r reply) String() string {
	return fmt.Sprintf("{handle %d errno %d msg %q data %d bytes at %d, %d extents, %d chunks}",
		r.handle, r.errno, r.errMsg, len(r.data), r.dataOff, len(r.extents), r.chunks)
}
