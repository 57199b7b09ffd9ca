package image

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
)

// Writer streams an image. Call Data and Zero in increasing, non-overlapping
// offset order, then Close to write the trailer. A Writer is not safe for
// concurrent use. After any error the image is unusable (a reader refuses
// it: it has no trailer).
type Writer struct {
	bw     *bufio.Writer
	h      Header
	digest hash.Hash
	sum    Summary
	seq    uint64
	next   int64 // lowest offset the next record may start at
	// A pending zero run, merged with adjacent ones before it is written.
	zoff, zlen int64
	hdr        [recordHeader]byte
	crcb       [crcSize]byte
	err        error
	closed     bool
}

// NewWriter validates h and writes the image header to w. A zero
// ChunkSize means DefaultChunkSize (capped at the volume's size rounded
// up to a block), and a zero Created means now.
func NewWriter(w io.Writer, h Header) (*Writer, error) {
	if h.ChunkSize == 0 {
		h.ChunkSize = DefaultChunkSize
		if h.BlockSize > h.ChunkSize {
			h.ChunkSize = h.BlockSize
		}
	}
	if err := h.Validate(); err != nil {
		return nil, fmt.Errorf("image: header: %w", err)
	}
	wr := &Writer{bw: bufio.NewWriterSize(w, 1<<20), h: h, digest: sha256.New()}
	b := h.marshal()
	wr.digest.Write(b)
	if _, err := wr.bw.Write(b); err != nil {
		return nil, fmt.Errorf("image: write header: %w", err)
	}
	return wr, nil
}

// Header is the header as written (defaults filled in).
func (w *Writer) Header() Header { return w.h }

// Summary is what has been written so far (the digest only after Close).
func (w *Writer) Summary() Summary { return w.sum }

func (w *Writer) check(op string, off, length int64) error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return fmt.Errorf("image: %s after Close", op)
	}
	bs := int64(w.h.BlockSize)
	if off < 0 || length < 0 || off%bs != 0 || length%bs != 0 {
		return fmt.Errorf("image: %s [%d, +%d) is not aligned to the block size %d", op, off, length, bs)
	}
	if off > w.h.Size || length > w.h.Size-off {
		return fmt.Errorf("image: %s [%d, +%d) goes past the volume size %d", op, off, length, w.h.Size)
	}
	if off < w.next || (w.zlen > 0 && off < w.zoff+w.zlen) {
		return fmt.Errorf("image: %s at %d is out of order (next offset must be at least %d)", op, off, max(w.next, w.zoff+w.zlen))
	}
	return nil
}

// Zero records that [off, off+length) reads as zeroes. In a full image
// every range without data reads as zeroes already, so Zero only checks
// the order there; in a diff it becomes a zero record (adjacent runs
// merged).
func (w *Writer) Zero(off, length int64) error {
	if err := w.check("zero", off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	if w.h.Kind == Full {
		w.next = off + length
		return nil
	}
	w.addZero(off, length)
	return nil
}

func (w *Writer) addZero(off, length int64) {
	if w.zlen > 0 && w.zoff+w.zlen == off {
		w.zlen += length
		return
	}
	if w.zlen > 0 {
		w.flushZero()
	}
	w.zoff, w.zlen = off, length
}

func (w *Writer) flushZero() {
	if w.zlen == 0 || w.err != nil {
		return
	}
	putRecordHeader(w.hdr[:], recZero, w.seq, w.zoff, w.zlen)
	c := crc(w.hdr[:])
	binary.LittleEndian.PutUint32(w.crcb[:], c)
	w.write(w.hdr[:], w.crcb[:])
	w.sum.ZeroRecords++
	w.sum.ZeroBytes += uint64(w.zlen)
	w.seq++
	w.next = w.zoff + w.zlen
	w.zlen = 0
}

// write writes parts of one record; hdr and c are also fed to the digest.
func (w *Writer) write(hdr, c []byte, payload ...[]byte) {
	w.digest.Write(hdr)
	w.digest.Write(c)
	if _, err := w.bw.Write(hdr); err != nil {
		w.err = fmt.Errorf("image: write: %w", err)
		return
	}
	for _, p := range payload {
		if _, err := w.bw.Write(p); err != nil {
			w.err = fmt.Errorf("image: write: %w", err)
			return
		}
	}
	if _, err := w.bw.Write(c); err != nil {
		w.err = fmt.Errorf("image: write: %w", err)
	}
}

// Data records the bytes p at off. Blocks that are all zeroes are not
// sent: in a full image they are left out, in a diff they become zero
// records. The rest is split into records that never cross a chunk
// boundary.
func (w *Writer) Data(off int64, p []byte) error {
	if err := w.check("data", off, int64(len(p))); err != nil {
		return err
	}
	bs := w.h.BlockSize
	cs := int64(w.h.ChunkSize)
	for len(p) > 0 {
		// The run of zero blocks at the front.
		z := 0
		for z < len(p) && isZero(p[z:z+bs]) {
			z += bs
		}
		if z > 0 {
			if w.h.Kind == Diff {
				w.addZero(off, int64(z))
			} else {
				w.next = off + int64(z)
			}
			off += int64(z)
			p = p[z:]
			continue
		}
		// A run of non-zero blocks, at most to the end of this chunk.
		limit := int((off/cs+1)*cs - off)
		if limit > len(p) {
			limit = len(p)
		}
		n := bs
		for n < limit && !isZero(p[n:n+bs]) {
			n += bs
		}
		w.flushZero()
		w.dataRecord(off, p[:n])
		if w.err != nil {
			return w.err
		}
		off += int64(n)
		p = p[n:]
	}
	return w.err
}

func (w *Writer) dataRecord(off int64, p []byte) {
	putRecordHeader(w.hdr[:], recData, w.seq, off, int64(len(p)))
	c := crc32.Update(crc(w.hdr[:]), castagnoli, p)
	binary.LittleEndian.PutUint32(w.crcb[:], c)
	w.write(w.hdr[:], w.crcb[:], p)
	w.sum.DataRecords++
	w.sum.DataBytes += uint64(len(p))
	w.seq++
	w.next = off + int64(len(p))
}

// Close writes the trailer and flushes. It does not close the underlying
// writer.
func (w *Writer) Close() (Summary, error) {
	if w.err != nil {
		return w.sum, w.err
	}
	if w.closed {
		return w.sum, fmt.Errorf("image: Close twice")
	}
	w.flushZero()
	if w.err != nil {
		return w.sum, w.err
	}
	w.closed = true
	var t [trailerSize]byte
	putTrailer(t[:], w.seq, &w.sum)
	w.digest.Write(t[:48])
	copy(w.sum.Digest[:], w.digest.Sum(nil))
	putTrailer(t[:], w.seq, &w.sum)
	if _, err := w.bw.Write(t[:]); err != nil {
		w.err = fmt.Errorf("image: write trailer: %w", err)
		return w.sum, w.err
	}
	if err := w.bw.Flush(); err != nil {
		w.err = fmt.Errorf("image: write: %w", err)
		return w.sum, w.err
	}
	return w.sum, nil
}

var zeroBlock [MaxBlockSize]byte

func isZero(p []byte) bool { return bytes.Equal(p, zeroBlock[:len(p)]) }
