package replication

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// Wire protocol.
//
// Every message is one frame:
//
//	magic   uint32  "BDRP"
//	type    uint8
//	flags   uint8   (reserved, 0)
//	volLen  uint16  length of the volume name (1..MaxVolumeName)
//	epoch   uint64  the sender's epoch for this volume
//	session uint64  the session the message belongs to
//	lsnFrom uint64  first LSN the message is about (meaning per type)
//	lsnTo   uint64  last LSN the message is about (meaning per type)
//	payLen  uint32  payload length (0..MaxPayload)
//	volume  [volLen]byte
//	payload [payLen]byte
//	crc     uint32  CRC32C of every byte above
//
// A Hello frame's lsnFrom carries the primary's feature bits (HelloFeat*;
// 0 from a primary that has none), which an older replica ignores: a
// replica adds to its HelloResp only what the bits ask for, so either side
// may be the older one.
//
// All integers are big-endian. Decoding validates the lengths before it
// allocates anything and the CRC before it returns the message, so a
// corrupted or hostile stream yields an error, never a panic or a huge
// allocation.

// MsgType identifies a frame.
type MsgType uint8

const (
	MsgHello       MsgType = 1  // primary → replica: open a session (payload: Hello)
	MsgHelloResp   MsgType = 2  // replica → primary: its progress (payload: HelloResp)
	MsgRecord      MsgType = 3  // primary → replica: one WAL record, lsnFrom=lsnTo=LSN (payload: RecordBody)
	MsgBarrier     MsgType = 4  // primary → replica: "durable up to lsnTo?"
	MsgBarrierResp MsgType = 5  // replica → primary: lsnTo = replica FlushedLSN
	MsgPing        MsgType = 6  // liveness, answered without touching the disk
	MsgPong        MsgType = 7  //
	MsgBegin       MsgType = 8  // primary → replica: start a base transfer (payload: Begin)
	MsgBase        MsgType = 9  // primary → replica: base data (payload: BaseChunk)
	MsgDone        MsgType = 10 // primary → replica: transfer complete, lsnTo = achieved LSN
	MsgDoneResp    MsgType = 11 // replica → primary: lsnTo = FlushedLSN after the transfer
	MsgError       MsgType = 12 // either way: refusal (payload: ErrorBody); the session ends
	MsgProgress    MsgType = 13 // replica → primary: lsnTo = base bytes persisted (resume point)
	MsgSnapBegin   MsgType = 14 // primary → replica: install a snapshot after a rebuild's base (payload: SnapBegin)
	MsgSnapData    MsgType = 15 // primary → replica: that snapshot's bytes (payload: BaseChunk)
)

var msgNames = map[MsgType]string{
	MsgHello: "hello", MsgHelloResp: "hello_resp", MsgRecord: "record",
	MsgBarrier: "barrier", MsgBarrierResp: "barrier_resp", MsgPing: "ping",
	MsgPong: "pong", MsgBegin: "begin", MsgBase: "base", MsgDone: "done",
	MsgDoneResp: "done_resp", MsgError: "error", MsgProgress: "progress",
	MsgSnapBegin: "snap_begin", MsgSnapData: "snap_data",
}

func (t MsgType) String() string {
	if n, ok := msgNames[t]; ok {
		return n
	}
	return fmt.Sprintf("msg(%d)", uint8(t))
}

const (
	wireMagic     = 0x42445250 // "BDRP"
	headerSize    = 4 + 1 + 1 + 2 + 8 + 8 + 8 + 8 + 4
	trailerSize   = 4
	MaxVolumeName = 255
	// MaxPayload bounds one frame's payload: the largest record (32 MiB of
	// data) plus its header, with room to spare.
	MaxPayload = 33 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Errors of the wire layer.
var (
	ErrBadFrame = errors.New("replication: malformed frame")
	ErrBadCRC   = errors.New("replication: frame CRC mismatch")
)

// Msg is one decoded frame.
type Msg struct {
	Type    MsgType
	Volume  string
	Epoch   uint64
	Session uint64
	LSNFrom uint64
	LSNTo   uint64
	Payload []byte
}

// WriteFrame writes the frame of m to w: header, volume, payload and CRC
// in turn, without copying the payload (w is normally a bufio.Writer;
// the caller flushes it). It is the only encoder of the protocol.
func WriteFrame(w io.Writer, m *Msg) error {
	if len(m.Volume) == 0 || len(m.Volume) > MaxVolumeName {
		return fmt.Errorf("%w: volume name length %d", ErrBadFrame, len(m.Volume))
	}
	if len(m.Payload) > MaxPayload {
		return fmt.Errorf("%w: payload %d bytes > %d", ErrBadFrame, len(m.Payload), MaxPayload)
	}
	var h [headerSize + trailerSize]byte
	binary.BigEndian.PutUint32(h[0:], wireMagic)
	h[4] = byte(m.Type)
	binary.BigEndian.PutUint16(h[6:], uint16(len(m.Volume)))
	binary.BigEndian.PutUint64(h[8:], m.Epoch)
	binary.BigEndian.PutUint64(h[16:], m.Session)
	binary.BigEndian.PutUint64(h[24:], m.LSNFrom)
	binary.BigEndian.PutUint64(h[32:], m.LSNTo)
	binary.BigEndian.PutUint32(h[40:], uint32(len(m.Payload)))
	crc := crc32.Checksum(h[:headerSize], castagnoli)
	crc = crc32.Update(crc, castagnoli, []byte(m.Volume))
	crc = crc32.Update(crc, castagnoli, m.Payload)
	if _, err := w.Write(h[:headerSize]); err != nil {
		return err
	}
	if _, err := io.WriteString(w, m.Volume); err != nil {
		return err
	}
	if _, err := w.Write(m.Payload); err != nil {
		return err
	}
	binary.BigEndian.PutUint32(h[headerSize:], crc)
	_, err := w.Write(h[headerSize:])
	return err
}

// MsgReader reads frames from a buffered stream, reusing one payload
// buffer: a returned message is valid until the next Read. It is the
// only decoder of the protocol (primary and replica both run it).
type MsgReader struct {
	r   *bufio.Reader
	buf []byte
}

// NewMsgReader wraps r with a 1 MiB read buffer.
func NewMsgReader(r io.Reader) *MsgReader { return &MsgReader{r: bufio.NewReaderSize(r, 1<<20)} }

// Read reads one frame. It validates the lengths before it allocates
// and the CRC before it returns; io.EOF is returned only for a clean end
// between frames.
func (mr *MsgReader) Read() (*Msg, error) {
	var h [headerSize]byte
	if _, err := io.ReadFull(mr.r, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return nil, fmt.Errorf("%w: short header", ErrBadFrame)
		}
		return nil, err
	}
	m, volLen, payLen, err := parseHeader(h[:])
	if err != nil {
		return nil, err
	}
	n := volLen + payLen + trailerSize
	if cap(mr.buf) < n {
		mr.buf = make([]byte, n, max(n, 64<<10))
	}
	rest := mr.buf[:n]
	if _, err := io.ReadFull(mr.r, rest); err != nil {
		return nil, fmt.Errorf("%w: short body: %v", ErrBadFrame, err)
	}
	crc := crc32.Update(crc32.Checksum(h[:], castagnoli), castagnoli, rest[:volLen+payLen])
	if got := binary.BigEndian.Uint32(rest[volLen+payLen:]); got != crc {
		return nil, fmt.Errorf("%w: got %08x want %08x", ErrBadCRC, got, crc)
	}
	m.Volume = string(rest[:volLen])
	m.Payload = rest[volLen : volLen+payLen : volLen+payLen]
	return m, nil
}

func parseHeader(h []byte) (*Msg, int, int, error) {
	if binary.BigEndian.Uint32(h[0:]) != wireMagic {
		return nil, 0, 0, fmt.Errorf("%w: bad magic %08x", ErrBadFrame, binary.BigEndian.Uint32(h[0:]))
	}
	t := MsgType(h[4])
	if _, ok := msgNames[t]; !ok {
		return nil, 0, 0, fmt.Errorf("%w: unknown type %d", ErrBadFrame, h[4])
	}
	if h[5] != 0 {
		return nil, 0, 0, fmt.Errorf("%w: reserved flags %#x", ErrBadFrame, h[5])
	}
	volLen := int(binary.BigEndian.Uint16(h[6:]))
	if volLen == 0 || volLen > MaxVolumeName {
		return nil, 0, 0, fmt.Errorf("%w: volume name length %d", ErrBadFrame, volLen)
	}
	payLen := int(binary.BigEndian.Uint32(h[40:]))
	if payLen > MaxPayload {
		return nil, 0, 0, fmt.Errorf("%w: payload length %d > %d", ErrBadFrame, payLen, MaxPayload)
	}
	m := &Msg{
		Type:    t,
		Epoch:   binary.BigEndian.Uint64(h[8:]),
		Session: binary.BigEndian.Uint64(h[16:]),
		LSNFrom: binary.BigEndian.Uint64(h[24:]),
		LSNTo:   binary.BigEndian.Uint64(h[32:]),
	}
	return m, volLen, payLen, nil
}

// ---- payloads ----

// dec is a bounds-checked reader over a payload.
type dec struct {
	b   []byte
	err error
}

func (d *dec) need(n int) bool {
	if d.err != nil {
		return false
	}
	if n < 0 || len(d.b) < n {
		d.err = fmt.Errorf("%w: payload too short", ErrBadFrame)
		return false
	}
	return true
}
func (d *dec) u8() uint8 {
	if !d.need(1) {
		return 0
	}
	v := d.b[0]
	d.b = d.b[1:]
	return v
}
func (d *dec) u32() uint32 {
	if !d.need(4) {
		return 0
	}
	v := binary.BigEndian.Uint32(d.b)
	d.b = d.b[4:]
	return v
}
func (d *dec) u64() uint64 {
	if !d.need(8) {
		return 0
	}
	v := binary.BigEndian.Uint64(d.b)
	d.b = d.b[8:]
	return v
}
func (d *dec) bytes(n int) []byte {
	if !d.need(n) {
		return nil
	}
	v := d.b[:n:n]
	d.b = d.b[n:]
	return v
}
func (d *dec) str() string {
	n := int(d.u32())
	if n > 4096 {
		d.err = fmt.Errorf("%w: string length %d", ErrBadFrame, n)
		return ""
	}
	return string(d.bytes(n))
}
func (d *dec) done() error {
	if d.err == nil && len(d.b) != 0 {
		d.err = fmt.Errorf("%w: %d trailing payload bytes", ErrBadFrame, len(d.b))
	}
	return d.err
}

func appendStr(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(s)))
	return append(b, s...)
}

// Hello opens a session. The primary names the server it means to talk to
// (TargetServerID): a receiver whose own ID differs refuses, so an address
// that was reused by another server never receives this volume's data.
type Hello struct {
	PrimaryID      string
	TargetServerID string
	HeadLSN        uint64 // primary head H
	OldestLSN      uint64 // oldest LSN the primary still retains, S
	RegionSize     uint32 // the unit of region lists (divergent regions, transfers)
	// EpochStartLSN is the first LSN this primary wrote in its current
	// epoch: every primary record from it on carries the Hello's epoch, so
	// a replica record at or beyond it with another epoch is divergent.
	EpochStartLSN uint64
}

func (h Hello) Encode() []byte {
	b := appendStr(nil, h.PrimaryID)
	b = appendStr(b, h.TargetServerID)
	b = binary.BigEndian.AppendUint64(b, h.HeadLSN)
	b = binary.BigEndian.AppendUint64(b, h.OldestLSN)
	b = binary.BigEndian.AppendUint32(b, h.RegionSize)
	return binary.BigEndian.AppendUint64(b, h.EpochStartLSN)
}

func DecodeHello(p []byte) (Hello, error) {
	d := dec{b: p}
	h := Hello{PrimaryID: d.str(), TargetServerID: d.str(), HeadLSN: d.u64(), OldestLSN: d.u64(), RegionSize: d.u32(), EpochStartLSN: d.u64()}
	if err := d.done(); err != nil {
		return h, err
	}
	if h.RegionSize == 0 || h.RegionSize%512 != 0 {
		return h, fmt.Errorf("%w: region size %d", ErrBadFrame, h.RegionSize)
	}
	return h, nil
}

// Pending describes an interrupted base transfer the replica persisted.
type Pending struct {
	Session  uint64
	Epoch    uint64
	Kind     TransferKind
	ResetLSN uint64 // the LSN the replica's head was reset to
	Progress int64  // regions (in the transfer's order) already persisted
	All      bool   // every region of the volume (rebuild)
	Regions  []uint32
}

// HelloResp is the replica's answer to Hello.
type HelloResp struct {
	FlushedLSN uint64 // R: covered by the replica's own fdatasync
	HeadLSN    uint64 // replica head (may exceed R)
	Blank      bool   // never written: no history at all
	Untrusted  bool   // the data is not a consistent image (an interrupted transfer without resume info)
	HasPending bool
	Pending    Pending
	// ForkLSN (0: none) is the first replica record that is not the
	// primary's: beyond the primary's head, or at/after its EpochStartLSN
	// with an older epoch. Divergent lists the regions (RegionSize units)
	// the replica's records from ForkLSN on touched; DivergentKnown is
	// false when those records are no longer readable.
	ForkLSN        uint64
	DivergentKnown bool
	Divergent      []uint32
	// SnapshotsKnown: the replica listed its snapshots (Snapshots, oldest
	// first), as a Hello with HelloFeatSnapshots asks. They trail the
	// payload, so an older primary never receives them, and an older
	// replica's answer decodes without them.
	SnapshotsKnown bool
	Snapshots      []SnapRef
}

// HelloFeatSnapshots (a Hello frame's lsnFrom bit): the primary reads the
// replica's snapshot list from the end of the HelloResp, and may then
// drop and send snapshots after any base transfer (snapshot_transfer.go).
const HelloFeatSnapshots uint64 = 1

// SnapRef identifies one snapshot a replica holds.
type SnapRef struct {
	ID   uint64 `json:"id"`
	LSN  uint64 `json:"lsn"`
	UUID string `json:"uuid"`
	Name string `json:"name"`
}

// snapRefMin is the smallest encoding of a SnapRef (two empty strings).
const snapRefMin = 8 + 8 + 4 + 4

func (r HelloResp) Encode() []byte {
	var flags uint8
	if r.Blank {
		flags |= 1
	}
	if r.Untrusted {
		flags |= 2
	}
	if r.HasPending {
		flags |= 4
	}
	if r.DivergentKnown {
		flags |= 8
	}
	b := []byte{flags}
	b = binary.BigEndian.AppendUint64(b, r.FlushedLSN)
	b = binary.BigEndian.AppendUint64(b, r.HeadLSN)
	b = binary.BigEndian.AppendUint64(b, r.Pending.Session)
	b = binary.BigEndian.AppendUint64(b, r.Pending.Epoch)
	b = append(b, byte(r.Pending.Kind))
	b = binary.BigEndian.AppendUint64(b, r.Pending.ResetLSN)
	b = binary.BigEndian.AppendUint64(b, uint64(r.Pending.Progress))
	if r.Pending.All {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Pending.Regions)))
	for _, x := range r.Pending.Regions {
		b = binary.BigEndian.AppendUint32(b, x)
	}
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.Divergent)))
	for _, x := range r.Divergent {
		b = binary.BigEndian.AppendUint32(b, x)
	}
	b = binary.BigEndian.AppendUint64(b, r.ForkLSN)
	if r.SnapshotsKnown {
		b = binary.BigEndian.AppendUint32(b, uint32(len(r.Snapshots)))
		for _, x := range r.Snapshots {
			b = binary.BigEndian.AppendUint64(b, x.ID)
			b = binary.BigEndian.AppendUint64(b, x.LSN)
			b = appendStr(b, x.UUID)
			b = appendStr(b, x.Name)
		}
	}
	return b
}

func DecodeHelloResp(p []byte) (HelloResp, error) {
	d := dec{b: p}
	var r HelloResp
	flags := d.u8()
	r.Blank, r.Untrusted, r.HasPending, r.DivergentKnown = flags&1 != 0, flags&2 != 0, flags&4 != 0, flags&8 != 0
	r.FlushedLSN = d.u64()
	r.HeadLSN = d.u64()
	r.Pending.Session = d.u64()
	r.Pending.Epoch = d.u64()
	r.Pending.Kind = TransferKind(d.u8())
	r.Pending.ResetLSN = d.u64()
	r.Pending.Progress = int64(d.u64())
	r.Pending.All = d.u8() == 1
	pn := int(d.u32())
	if d.err == nil && pn > len(d.b)/4 {
		return r, fmt.Errorf("%w: pending region count %d", ErrBadFrame, pn)
	}
	if pn > 0 {
		r.Pending.Regions = make([]uint32, pn)
		for i := range r.Pending.Regions {
			r.Pending.Regions[i] = d.u32()
		}
	}
	n := int(d.u32())
	if d.err == nil && n > len(d.b)/4 {
		return r, fmt.Errorf("%w: divergent count %d", ErrBadFrame, n)
	}
	if n > 0 {
		r.Divergent = make([]uint32, n)
		for i := range r.Divergent {
			r.Divergent[i] = d.u32()
		}
	}
	r.ForkLSN = d.u64()
	if d.err == nil && len(d.b) > 0 {
		r.SnapshotsKnown = true
		n := int(d.u32())
		if d.err == nil && n > len(d.b)/snapRefMin {
			return r, fmt.Errorf("%w: snapshot count %d", ErrBadFrame, n)
		}
		r.Snapshots = make([]SnapRef, 0, n)
		for range n {
			r.Snapshots = append(r.Snapshots, SnapRef{ID: d.u64(), LSN: d.u64(), UUID: d.str(), Name: d.str()})
		}
	}
	return r, d.done()
}

// Record types on the wire (mirror wal.RecordType values by name).
const (
	RecWrite   uint8 = 1
	RecZero    uint8 = 2
	RecBarrier uint8 = 3
	// RecSnapshot and RecSnapshotDelete carry a snapshot record's payload
	// (wal's snapshot payload: ID, name, UUID...), shipped in LSN order
	// like any record and applied by the replica's ApplyRecord.
	RecSnapshot       uint8 = 5
	RecSnapshotDelete uint8 = 6
)

// maxSnapshotBody bounds a snapshot record's payload on the wire.
const maxSnapshotBody = 4096

// isSnapshotRec reports whether t is a snapshot record type.
func isSnapshotRec(t uint8) bool { return t == RecSnapshot || t == RecSnapshotDelete }

// RecordBody is the payload of MsgRecord. The LSN travels in the frame
// header (LSNFrom == LSNTo == LSN).
type RecordBody struct {
	Type   uint8
	Epoch  uint64 // the epoch the record was written in
	Offset int64
	Length uint32
	Data   []byte
}

func (r RecordBody) Encode(dst []byte) []byte {
	dst = append(dst, r.Type)
	dst = binary.BigEndian.AppendUint64(dst, r.Epoch)
	dst = binary.BigEndian.AppendUint64(dst, uint64(r.Offset))
	dst = binary.BigEndian.AppendUint32(dst, r.Length)
	return append(dst, r.Data...)
}

func DecodeRecordBody(p []byte) (RecordBody, error) {
	d := dec{b: p}
	r := RecordBody{Type: d.u8(), Epoch: d.u64(), Offset: int64(d.u64()), Length: d.u32()}
	if d.err != nil {
		return r, d.err
	}
	if r.Offset < 0 {
		return r, fmt.Errorf("%w: negative offset", ErrBadFrame)
	}
	r.Data = d.b
	switch r.Type {
	case RecWrite:
		if uint64(len(r.Data)) != uint64(r.Length) {
			return r, fmt.Errorf("%w: write record length %d with %d data bytes", ErrBadFrame, r.Length, len(r.Data))
		}
	case RecZero, RecBarrier:
		if len(r.Data) != 0 {
			return r, fmt.Errorf("%w: %d data bytes on a dataless record", ErrBadFrame, len(r.Data))
		}
	case RecSnapshot, RecSnapshotDelete:
		if uint64(len(r.Data)) != uint64(r.Length) || len(r.Data) == 0 || len(r.Data) > maxSnapshotBody {
			return r, fmt.Errorf("%w: snapshot record length %d with %d data bytes (1 to %d)", ErrBadFrame, r.Length, len(r.Data), maxSnapshotBody)
		}
	default:
		return r, fmt.Errorf("%w: record type %d", ErrBadFrame, r.Type)
	}
	return r, nil
}

// TransferKind names a base transfer.
type TransferKind uint8

const (
	TransferNone    TransferKind = 0
	TransferRebuild TransferKind = 1 // every region
	TransferResync  TransferKind = 2 // regions from the primary's dirty bitmap
	TransferTrunc   TransferKind = 3 // regions the replica wrote beyond the primary's head
)

func (k TransferKind) String() string {
	switch k {
	case TransferRebuild:
		return "rebuild"
	case TransferResync:
		return "resync"
	case TransferTrunc:
		return "truncate"
	}
	return "none"
}

// Begin starts a base transfer: the replica persists its intent, sets its
// head to ResetLSN, then receives base regions (MsgBase) interleaved with
// live records from ResetLSN+1 on. Live records win over base data for
// the same block. MsgDone carries the achieved LSN.
type Begin struct {
	Kind       TransferKind
	ResetLSN   uint64
	RegionSize uint32
	Regions    []uint32 // region indexes, ascending; ignored for TransferRebuild
	AllRegions bool
	Resume     bool // continue the replica's pending transfer of this session
}

func (b Begin) Encode() []byte {
	out := []byte{byte(b.Kind)}
	out = binary.BigEndian.AppendUint64(out, b.ResetLSN)
	out = binary.BigEndian.AppendUint32(out, b.RegionSize)
	var fl uint8
	if b.AllRegions {
		fl |= 1
	}
	if b.Resume {
		fl |= 2
	}
	out = append(out, fl)
	out = binary.BigEndian.AppendUint32(out, uint32(len(b.Regions)))
	for _, r := range b.Regions {
		out = binary.BigEndian.AppendUint32(out, r)
	}
	return out
}

func DecodeBegin(p []byte) (Begin, error) {
	d := dec{b: p}
	b := Begin{Kind: TransferKind(d.u8()), ResetLSN: d.u64(), RegionSize: d.u32()}
	fl := d.u8()
	b.AllRegions, b.Resume = fl&1 != 0, fl&2 != 0
	n := int(d.u32())
	if d.err == nil && n > len(d.b)/4 {
		return b, fmt.Errorf("%w: region count %d", ErrBadFrame, n)
	}
	if n > 0 {
		b.Regions = make([]uint32, n)
		for i := range b.Regions {
			b.Regions[i] = d.u32()
		}
	}
	if err := d.done(); err != nil {
		return b, err
	}
	if b.Kind < TransferRebuild || b.Kind > TransferTrunc {
		return b, fmt.Errorf("%w: transfer kind %d", ErrBadFrame, b.Kind)
	}
	if b.RegionSize == 0 || b.RegionSize%512 != 0 {
		return b, fmt.Errorf("%w: region size %d", ErrBadFrame, b.RegionSize)
	}
	return b, nil
}

// BaseChunk is the payload of MsgBase: data for [Offset, Offset+len) or,
// with Zero set, Length bytes that read as zeroes. Seq is the index (in
// the Begin's region order) of the region this chunk completes, or -1.
type BaseChunk struct {
	Offset int64
	Length uint32
	Zero   bool
	Done   int64 // number of regions fully sent once this chunk is applied
	Data   []byte
}

func (c BaseChunk) Encode(dst []byte) []byte {
	var fl uint8
	if c.Zero {
		fl = 1
	}
	dst = append(dst, fl)
	dst = binary.BigEndian.AppendUint64(dst, uint64(c.Offset))
	dst = binary.BigEndian.AppendUint32(dst, c.Length)
	dst = binary.BigEndian.AppendUint64(dst, uint64(c.Done))
	return append(dst, c.Data...)
}

func DecodeBaseChunk(p []byte) (BaseChunk, error) {
	d := dec{b: p}
	c := BaseChunk{Zero: d.u8()&1 != 0, Offset: int64(d.u64()), Length: d.u32(), Done: int64(d.u64())}
	if d.err != nil {
		return c, d.err
	}
	c.Data = d.b
	if c.Offset < 0 || c.Done < 0 || c.Length == 0 || c.Offset%512 != 0 || c.Length%512 != 0 {
		return c, fmt.Errorf("%w: base chunk off=%d len=%d", ErrBadFrame, c.Offset, c.Length)
	}
	if !c.Zero && uint64(len(c.Data)) != uint64(c.Length) {
		return c, fmt.Errorf("%w: base chunk length %d with %d bytes", ErrBadFrame, c.Length, len(c.Data))
	}
	if c.Zero && len(c.Data) != 0 {
		return c, fmt.Errorf("%w: zero chunk with data", ErrBadFrame)
	}
	return c, nil
}

// Error codes carried by MsgError.
const (
	CodeStaleEpoch   = "stale_epoch"
	CodeStaleSession = "stale_session"
	CodeWrongServer  = "wrong_server"
	CodeWrongPrimary = "wrong_primary" // the Hello's primary is not the one the replica's assignment names
	CodeNoVolume     = "no_volume"
	CodeGap          = "lsn_gap"
	CodeApply        = "apply_failed"
	CodeProtocol     = "protocol"
)

// ErrorBody is the payload of MsgError.
type ErrorBody struct {
	Code    string
	Message string
}

func (e ErrorBody) Encode() []byte { return appendStr(appendStr(nil, e.Code), e.Message) }

func DecodeErrorBody(p []byte) (ErrorBody, error) {
	d := dec{b: p}
	e := ErrorBody{Code: d.str(), Message: d.str()}
	return e, d.done()
}

// RemoteError is a refusal received from the peer.
type RemoteError struct{ ErrorBody }

func (e *RemoteError) Error() string {
	return fmt.Sprintf("replication: peer refused: %s: %s", e.Code, e.Message)
}
