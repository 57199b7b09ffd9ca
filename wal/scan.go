package wal

import (
	"errors"
	"fmt"
	"io"
)

// ScanOptions says where a scan starts and what it accepts.
type ScanOptions struct {
	// From is the logical position of the first record.
	From uint64
	// FirstLSN is the LSN the first record must carry; every following
	// record must carry the next one (Padding carries the LSN after it).
	FirstLSN uint64
	// MaxGen: records with a larger generation stop the scan (0: no bound).
	// Generations must not decrease along the log.
	MaxGen uint32
	// GenLSN is the first LSN written by generation MaxGen: a record at
	// or after it of an older generation is stale (left behind by an
	// earlier life whose LSNs this one reused) and stops the scan, even
	// when the scan starts after the last record MaxGen wrote before it
	// (0: no such bound; then only decreasing generations are caught).
	// Padding is exempt: it carries the LSN of the record after it, and
	// the scan that ended the earlier life's log may have stopped just
	// past an old padding, where MaxGen then wrote that LSN at the start
	// of the next lap; skipping to the lap start is all padding does, and
	// the record found there is checked.
	GenLSN uint64
	// Limit is how many bytes past From may be scanned (0: Ring.Size).
	Limit uint64
	// MaxLSN stops the scan after this LSN (0: no bound).
	MaxLSN uint64
}

// ScanResult says where and why a scan stopped.
type ScanResult struct {
	// End is the logical position just past the last valid record: where
	// the next record is to be appended.
	End uint64
	// LastLSN is the LSN of the last valid record (FirstLSN-1 if none).
	LastLSN uint64
	// LastGen is the generation of the last valid record (0 if none).
	LastGen uint32
	// Records counts the valid non-padding records.
	Records int
	// Stop is why the scan stopped: nil when it reached Limit or MaxLSN,
	// otherwise an error describing the first bad record at End.
	Stop error
	// Unwritten: the scan stopped on an all-zero header (space never
	// written), not on a torn or stale record.
	Unwritten bool
}

// ErrStop is wrapped by ScanResult.Stop for every reason a log ends
// (bad CRC, LSN discontinuity, torn or stale record).
var ErrStop = errors.New("wal: end of log")

const scanChunk = 1 << 20

// Scan reads records from r (a ring of ring.Size bytes) starting at
// opt.From and calls fn for each valid non-Padding record in order, until
// the first record that does not check out (bad magic or CRC, unexpected
// LSN, decreasing or too new generation, a record that does not fit the
// ring). rec.Payload is only valid during the call. An error from fn or a
// read error other than io.EOF is returned; the end of the log is not an
// error but ScanResult.Stop.
func Scan(r io.ReaderAt, ring Ring, opt ScanOptions, fn func(pos uint64, rec Record) error) (ScanResult, error) {
	res := ScanResult{End: opt.From, LastLSN: opt.FirstLSN - 1}
	if ring.Size < HeaderSize || ring.Size%Align != 0 {
		return res, fmt.Errorf("wal: scan: bad ring size %d", ring.Size)
	}
	limit := opt.Limit
	if limit == 0 || limit > uint64(ring.Size) {
		limit = uint64(ring.Size)
	}
	end := opt.From + limit
	expect := opt.FirstLSN
	var lastGen uint32
	buf := make([]byte, 0, min(int64(scanChunk), ring.Size))
	var bufPos uint64 // logical position of buf[0]
	// view returns n bytes at logical pos (never straddling the ring end).
	view := func(pos uint64, n int) ([]byte, error) {
		if pos >= bufPos && pos+uint64(n) <= bufPos+uint64(len(buf)) {
			o := pos - bufPos
			return buf[o : o+uint64(n)], nil
		}
		want := n
		if want < scanChunk {
			want = scanChunk
		}
		rem := ring.Remaining(pos)
		if int64(want) > rem {
			want = int(rem)
		}
		if cap(buf) < want {
			buf = make([]byte, want)
		}
		buf = buf[:want]
		got, err := r.ReadAt(buf, ring.Phys(pos))
		buf = buf[:got]
		bufPos = pos
		if got < n {
			if err == nil || errors.Is(err, io.EOF) {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
		return buf[:n], nil
	}
	stop := func(format string, args ...any) (ScanResult, error) {
		res.Stop = fmt.Errorf("%w at position %d: %s", ErrStop, res.End, fmt.Sprintf(format, args...))
		return res, nil
	}
	pos := opt.From
	for {
		if opt.MaxLSN != 0 && expect > opt.MaxLSN {
			return res, nil
		}
		if rem := ring.Remaining(pos); rem < HeaderSize {
			pos += uint64(rem) // a gap too short for a header: next lap
			if pos > end {
				return res, nil
			}
		}
		if pos+HeaderSize > end {
			return res, nil
		}
		hdr, err := view(pos, HeaderSize)
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return stop("read past end of file")
			}
			return res, fmt.Errorf("wal: scan read at %d: %w", pos, err)
		}
		h, size, err := DecodeHeader(hdr)
		if err != nil {
			if allZero(hdr) {
				res.Unwritten = true
				return stop("unwritten space")
			}
			return stop("%v", err)
		}
		if int64(size) > ring.Remaining(pos) {
			return stop("record of %d bytes does not fit the ring", size)
		}
		if h.Type == Padding && int64(size) != ring.Remaining(pos) {
			return stop("padding does not end at the ring end")
		}
		if pos+uint64(size) > end {
			return res, nil
		}
		if h.LSN != expect {
			return stop("LSN %d, expected %d", h.LSN, expect)
		}
		if opt.GenLSN != 0 && h.LSN >= opt.GenLSN && h.Gen != opt.MaxGen && h.Type != Padding {
			return stop("stale record: generation %d at LSN %d, generation %d began at LSN %d", h.Gen, h.LSN, opt.MaxGen, opt.GenLSN)
		}
		if h.Gen < lastGen || (opt.MaxGen != 0 && h.Gen > opt.MaxGen) {
			return stop("generation %d after %d (max %d)", h.Gen, lastGen, opt.MaxGen)
		}
		n := HeaderSize
		if h.Type == Write {
			n = size
		}
		b, err := view(pos, n)
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return stop("read past end of file")
			}
			return res, fmt.Errorf("wal: scan read at %d: %w", pos, err)
		}
		rec, _, err := Decode(b)
		if h.Type == Padding {
			rec, err = h, checkHeaderCRC(b)
		}
		if err != nil {
			return stop("%v", err)
		}
		lastGen = rec.Gen
		pos += uint64(size)
		res.End = pos
		res.LastGen = rec.Gen
		if rec.Type == Padding {
			continue
		}
		res.LastLSN = rec.LSN
		res.Records++
		expect++
		if fn != nil {
			if err := fn(pos-uint64(size), rec); err != nil {
				return res, err
			}
		}
	}
}

func checkHeaderCRC(hdr []byte) error {
	var h [HeaderSize]byte
	copy(h[:], hdr)
	r, _, err := DecodeHeader(h[:])
	if err != nil {
		return err
	}
	if Checksum(h[4:]) != uint32(h[0])|uint32(h[1])<<8|uint32(h[2])<<16|uint32(h[3])<<24 {
		return fmt.Errorf("%w: CRC mismatch", ErrCorrupt)
	}
	_ = r
	return nil
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
