package image

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"time"
)

// Reader decodes an image and verifies it as it goes: the header CRC,
// every record's CRC, sequence number, alignment, bounds and order, and at
// the end the trailer's counts and digest and the end of the stream.
// Next returns io.EOF only once all of that held: a caller that needs the
// whole image verified before acting (import) reads to io.EOF first.
type Reader struct {
	br     *bufio.Reader
	pos    int64 // bytes consumed
	h      Header
	digest hash.Hash
	sum    Summary
	seq    uint64
	next   int64
	buf    []byte
	hdr    [recordHeader]byte
	err    error // sticky
	done   bool
}

// NewReader reads and verifies the header.
func NewReader(r io.Reader) (*Reader, error) {
	rd := &Reader{br: bufio.NewReaderSize(r, 64<<10), digest: sha256.New()}
	if err := rd.readHeader(); err != nil {
		return nil, err
	}
	return rd, nil
}

// Header is the verified header.
func (r *Reader) Header() Header { return r.h }

// Offset is the number of bytes consumed so far.
func (r *Reader) Offset() int64 { return r.pos }

// Summary is the trailer's content; valid once Next returned io.EOF.
func (r *Reader) Summary() Summary { return r.sum }

func (r *Reader) corrupt(at int64, format string, a ...any) error {
	return fmt.Errorf("%w at byte %d: %s", ErrCorrupt, at, fmt.Sprintf(format, a...))
}

// full reads exactly len(p) bytes; a short stream is ErrTruncated naming
// what was being read.
func (r *Reader) full(p []byte, what string) error {
	n, err := io.ReadFull(r.br, p)
	r.pos += int64(n)
	if err == nil {
		return nil
	}
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: the stream ends at byte %d, inside %s", ErrTruncated, r.pos, what)
	}
	return fmt.Errorf("image: read %s at byte %d: %w", what, r.pos, err)
}

func (r *Reader) readHeader() error {
	var fixed [12]byte
	if err := r.full(fixed[:], "the header"); err != nil {
		n := int(min(r.pos, 8))
		if errors.Is(err, ErrTruncated) && !bytes.Equal(fixed[:n], Magic[:n]) {
			return fmt.Errorf("%w: the first %d bytes are % x, an image starts with % x", ErrNotImage, n, fixed[:n], Magic[:])
		}
		return err
	}
	if !bytes.Equal(fixed[:8], Magic[:]) {
		return fmt.Errorf("%w: the first 8 bytes are % x, an image starts with % x", ErrNotImage, fixed[:8], Magic[:])
	}
	if v := binary.LittleEndian.Uint16(fixed[8:]); v != Version {
		return fmt.Errorf("%w: the image is version %d, this blockd reads version %d", ErrVersion, v, Version)
	}
	hl := int(binary.LittleEndian.Uint16(fixed[10:]))
	if hl < headerFixed+5+crcSize || hl > maxHeader {
		return r.corrupt(10, "header length %d outside [%d, %d]", hl, headerFixed+5+crcSize, maxHeader)
	}
	b := make([]byte, hl)
	copy(b, fixed[:])
	if err := r.full(b[12:], "the header"); err != nil {
		return err
	}
	if got, want := crc(b[:hl-crcSize]), binary.LittleEndian.Uint32(b[hl-crcSize:]); got != want {
		return r.corrupt(int64(hl-crcSize), "header checksum %08x, computed %08x", want, got)
	}
	if b[13] != 0 || b[14] != 0 || b[15] != 0 {
		return r.corrupt(13, "header flags/reserved bytes % x are not zero", b[13:16])
	}
	h := Header{
		Kind:      Kind(b[12]),
		BlockSize: int(binary.LittleEndian.Uint32(b[16:])),
		ChunkSize: int(binary.LittleEndian.Uint32(b[20:])),
		Size:      int64(binary.LittleEndian.Uint64(b[24:])),
		Created:   time.Unix(0, int64(binary.LittleEndian.Uint64(b[32:]))).UTC(),
	}
	strs := make([]string, 5)
	p := headerFixed
	for i := range strs {
		if p >= hl-crcSize {
			return r.corrupt(int64(p), "header ends before string %d of 5", i+1)
		}
		n := int(b[p])
		p++
		if p+n > hl-crcSize {
			return r.corrupt(int64(p-1), "header string %d of %d bytes runs past the header", i+1, n)
		}
		strs[i] = string(b[p : p+n])
		p += n
	}
	if p != hl-crcSize {
		return r.corrupt(int64(p), "%d unused bytes at the end of the header", hl-crcSize-p)
	}
	h.Volume, h.SourceName, h.SourceUUID, h.BaseName, h.BaseUUID = strs[0], strs[1], strs[2], strs[3], strs[4]
	if err := h.Validate(); err != nil {
		return r.corrupt(12, "header: %v", err)
	}
	r.h = h
	r.digest.Write(b)
	return nil
}

// Next returns the next data or zero record, io.EOF after the verified
// trailer, or an error wrapping ErrTruncated or ErrCorrupt. Errors are
// sticky.
func (r *Reader) Next() (Record, error) {
	if r.err != nil {
		return Record{}, r.err
	}
	if r.done {
		return Record{}, io.EOF
	}
	rec, err := r.next1()
	if err != nil {
		r.err = err
	}
	return rec, err
}

func (r *Reader) next1() (Record, error) {
	at := r.pos
	hdr := r.hdr[:]
	if err := r.full(hdr[:1], fmt.Sprintf("record %d", r.seq)); err != nil {
		return Record{}, err
	}
	typ := hdr[0]
	if typ == recTrailer {
		return Record{}, r.trailer(at)
	}
	if typ != recData && typ != recZero {
		return Record{}, r.corrupt(at, "record %d has type %#02x (data 'D', zero 'Z' or trailer 'T' expected)", r.seq, typ)
	}
	if err := r.full(hdr[1:], fmt.Sprintf("the header of record %d", r.seq)); err != nil {
		return Record{}, err
	}
	if hdr[1] != 0 || hdr[2] != 0 || hdr[3] != 0 || binary.LittleEndian.Uint32(hdr[4:]) != 0 {
		return Record{}, r.corrupt(at+1, "record %d reserved bytes % x are not zero", r.seq, hdr[1:8])
	}
	if s := binary.LittleEndian.Uint64(hdr[8:]); s != r.seq {
		return Record{}, r.corrupt(at+8, "record sequence %d where %d was due (records reordered, dropped or duplicated)", s, r.seq)
	}
	uoff := binary.LittleEndian.Uint64(hdr[16:])
	ulen := binary.LittleEndian.Uint64(hdr[24:])
	bs := uint64(r.h.BlockSize)
	size := uint64(r.h.Size)
	if uoff%bs != 0 || ulen%bs != 0 || ulen == 0 {
		return Record{}, r.corrupt(at+16, "record %d [%d, +%d) is empty or not aligned to the block size %d", r.seq, uoff, ulen, bs)
	}
	if uoff > size || ulen > size-uoff {
		return Record{}, r.corrupt(at+16, "record %d [%d, +%d) goes past the volume size %d", r.seq, uoff, ulen, size)
	}
	off, length := int64(uoff), int64(ulen)
	if off < r.next {
		return Record{}, r.corrupt(at+16, "record %d at %d overlaps or precedes the previous record's end %d", r.seq, off, r.next)
	}
	c := crc(hdr)
	rec := Record{Off: off, Len: length}
	if typ == recZero {
		if r.h.Kind == Full {
			return Record{}, r.corrupt(at, "record %d is a zero record in a full image", r.seq)
		}
		rec.Zero = true
	} else {
		cs := uint64(r.h.ChunkSize)
		if uoff/cs != (uoff+ulen-1)/cs {
			return Record{}, r.corrupt(at+16, "data record %d [%d, +%d) crosses a %d-byte chunk boundary", r.seq, uoff, ulen, cs)
		}
		if cap(r.buf) < int(length) {
			r.buf = make([]byte, r.h.ChunkSize)
		}
		rec.Data = r.buf[:length]
		if err := r.full(rec.Data, fmt.Sprintf("the data of record %d", r.seq)); err != nil {
			return Record{}, err
		}
		c = crc32.Update(c, castagnoli, rec.Data)
	}
	var cb [crcSize]byte
	if err := r.full(cb[:], fmt.Sprintf("the checksum of record %d", r.seq)); err != nil {
		return Record{}, err
	}
	if want := binary.LittleEndian.Uint32(cb[:]); want != c {
		return Record{}, r.corrupt(r.pos-crcSize, "record %d [%d, +%d) checksum %08x, computed %08x", r.seq, off, length, want, c)
	}
	r.digest.Write(hdr)
	r.digest.Write(cb[:])
	if rec.Zero {
		r.sum.ZeroRecords++
		r.sum.ZeroBytes += ulen
	} else {
		r.sum.DataRecords++
		r.sum.DataBytes += ulen
	}
	r.seq++
	r.next = off + length
	return rec, nil
}

func (r *Reader) trailer(at int64) error {
	var t [trailerSize]byte
	t[0] = recTrailer
	if err := r.full(t[1:], "the trailer"); err != nil {
		return err
	}
	if got, want := crc(t[:80]), binary.LittleEndian.Uint32(t[80:]); got != want {
		return r.corrupt(at+80, "trailer checksum %08x, computed %08x", want, got)
	}
	if !bytes.Equal(t[84:92], EndMagic[:]) {
		return r.corrupt(at+84, "end marker % x, expected % x", t[84:92], EndMagic[:])
	}
	if t[1] != 0 || t[2] != 0 || t[3] != 0 || binary.LittleEndian.Uint32(t[4:]) != 0 {
		return r.corrupt(at+1, "trailer reserved bytes % x are not zero", t[1:8])
	}
	if s := binary.LittleEndian.Uint64(t[8:]); s != r.seq {
		return r.corrupt(at+8, "trailer says %d records, the stream had %d", s, r.seq)
	}
	got := Summary{
		DataRecords: binary.LittleEndian.Uint64(t[16:]),
		ZeroRecords: binary.LittleEndian.Uint64(t[24:]),
		DataBytes:   binary.LittleEndian.Uint64(t[32:]),
		ZeroBytes:   binary.LittleEndian.Uint64(t[40:]),
	}
	if got.DataRecords != r.sum.DataRecords || got.ZeroRecords != r.sum.ZeroRecords ||
		got.DataBytes != r.sum.DataBytes || got.ZeroBytes != r.sum.ZeroBytes {
		return r.corrupt(at+16, "trailer counts (%d data records, %d bytes; %d zero records, %d bytes) differ from the stream's (%d, %d; %d, %d)",
			got.DataRecords, got.DataBytes, got.ZeroRecords, got.ZeroBytes,
			r.sum.DataRecords, r.sum.DataBytes, r.sum.ZeroRecords, r.sum.ZeroBytes)
	}
	r.digest.Write(t[:48])
	var d [32]byte
	copy(d[:], r.digest.Sum(nil))
	if !bytes.Equal(d[:], t[48:80]) {
		return r.corrupt(at+48, "image digest %x, computed %x", t[48:80], d[:])
	}
	r.sum.Digest = d
	// Nothing may follow the end marker.
	var one [1]byte
	n, err := r.br.Read(one[:])
	for n == 0 && err == nil {
		n, err = r.br.Read(one[:])
	}
	if n > 0 {
		return r.corrupt(r.pos, "data after the end marker")
	}
	if !errors.Is(err, io.EOF) {
		return fmt.Errorf("image: read after the end marker: %w", err)
	}
	r.done = true
	return io.EOF
}

// Verify reads r to its end and returns the header and summary, or the
// first error.
func Verify(r io.Reader) (Header, Summary, error) {
	rd, err := NewReader(r)
	if err != nil {
		return Header{}, Summary{}, err
	}
	for {
		if _, err := rd.Next(); err != nil {
			if errors.Is(err, io.EOF) {
				return rd.h, rd.sum, nil
			}
			return rd.h, rd.sum, err
		}
	}
}
