package image

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"strings"
	"testing"
	"time"
)

// vol is an in-memory volume: a Sink and a source of test content.
type vol struct{ b []byte }

func (v *vol) WriteAt(p []byte, off int64) error { copy(v.b[off:], p); return nil }
func (v *vol) Zero(off, length int64) error {
	clear(v.b[off : off+length])
	return nil
}

func testHeader(kind Kind, size int64) Header {
	h := Header{Kind: kind, BlockSize: 512, ChunkSize: 4096, Size: size, Volume: "vol0",
		SourceName: "s2", SourceUUID: "0b7c1f9e-3c52-4a53-9d8e-1c1f7f0b7a10",
		Created: time.Date(2026, 12, 1, 12, 0, 0, 0, time.UTC)}
	if kind == Diff {
		h.BaseName, h.BaseUUID = "s1", "5d3c9a1e-77aa-4b1e-8c2d-0a9f3b1e2c44"
	}
	return h
}

// content makes a volume with data runs, zero blocks inside them and holes.
func content(size int64, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, size)
	for i := 0; i < 12; i++ {
		off := r.Int64N(size/512) * 512
		n := (r.Int64N(20) + 1) * 512
		if off+n > size {
			n = size - off
		}
		for j := off; j < off+n; j++ {
			b[j] = byte(r.Uint32())
		}
		// a zero block in the middle of a run
		if n >= 1536 {
			clear(b[off+512 : off+1024])
		}
	}
	return b
}

func encodeFull(t testing.TB, h Header, b []byte) []byte {
	t.Helper()
	var out bytes.Buffer
	w, err := NewWriter(&out, h)
	if err != nil {
		t.Fatal(err)
	}
	// Feed it in uneven pieces, as an exporter reading extents does.
	for off := int64(0); off < int64(len(b)); {
		n := int64(512 * (1 + off/512%7))
		if off+n > int64(len(b)) {
			n = int64(len(b)) - off
		}
		if err := w.Data(off, b[off:off+n]); err != nil {
			t.Fatal(err)
		}
		off += n
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

func decode(t testing.TB, img []byte, base []byte, fill bool) ([]byte, Header, error) {
	t.Helper()
	r, err := NewReader(bytes.NewReader(img))
	if err != nil {
		return nil, Header{}, err
	}
	v := &vol{b: append([]byte(nil), base...)}
	if v.b == nil {
		v.b = make([]byte, r.Header().Size)
	}
	err = Apply(r, v, fill, int64(len(v.b)))
	return v.b, r.Header(), err
}

func TestFullRoundTrip(t *testing.T) {
	const size = 64 << 10
	b := content(size, 1)
	img := encodeFull(t, testHeader(Full, size), b)
	got, h, err := decode(t, img, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, b) {
		t.Fatal("decoded full image differs from the source")
	}
	if h != testHeader(Full, size) {
		t.Fatalf("header %+v", h)
	}
	// Sparse: fewer payload bytes than non-zero blocks would need at most.
	_, sum, err := Verify(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	nz := 0
	for off := 0; off < size; off += 512 {
		if !isZero(b[off : off+512]) {
			nz++
		}
	}
	if sum.DataBytes != uint64(nz*512) || sum.ZeroRecords != 0 {
		t.Fatalf("summary %+v, want %d data bytes and no zero records", sum, nz*512)
	}
	// Over a volume full of junk, fillGaps makes it read as the image.
	junk := bytes.Repeat([]byte{0xee}, size+4096)
	got, _, err = decode(t, img, junk, true)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:size], b) || !isZero(got[size:]) {
		t.Fatal("full image applied with fillGaps does not read as the image")
	}
}

func TestDiffReproducesTarget(t *testing.T) {
	const size = 64 << 10
	s1 := content(size, 1)
	s2 := append([]byte(nil), s1...)
	r := rand.New(rand.NewPCG(9, 9))
	type rng struct{ off, n int64 }
	var changed []rng
	for i := 0; i < 6; i++ {
		off := int64(i)*(size/6)/512*512 + 1024
		n := int64(2048)
		if i%2 == 0 {
			for j := off; j < off+n; j++ {
				s2[j] = byte(r.Uint32())
			}
		} else {
			clear(s2[off : off+n]) // data that became zero must be carried
		}
		changed = append(changed, rng{off, n})
	}
	var out bytes.Buffer
	w, err := NewWriter(&out, testHeader(Diff, size))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range changed {
		if err := w.Data(c.off, s2[c.off:c.off+c.n]); err != nil {
			t.Fatal(err)
		}
	}
	sum, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sum.ZeroRecords == 0 || sum.DataRecords == 0 {
		t.Fatalf("summary %+v: want both data and zero records", sum)
	}
	got, _, err := decode(t, out.Bytes(), s1, false)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, s2) {
		t.Fatal("s1 + diff(s1, s2) != s2")
	}
}

func TestEveryTruncationRefused(t *testing.T) {
	img := encodeFull(t, testHeader(Full, 16<<10), content(16<<10, 3))
	for n := 0; n < len(img); n++ {
		_, _, err := Verify(bytes.NewReader(img[:n]))
		if !errors.Is(err, ErrTruncated) {
			t.Fatalf("image cut at %d of %d bytes: got %v, want ErrTruncated", n, len(img), err)
		}
	}
	if _, _, err := Verify(bytes.NewReader(append(append([]byte(nil), img...), 0))); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "after the end marker") {
		t.Fatalf("trailing byte: %v", err)
	}
}

func TestEveryBitFlipRefused(t *testing.T) {
	img := encodeFull(t, testHeader(Diff, 8<<10), content(8<<10, 4))
	if _, _, err := Verify(bytes.NewReader(img)); err != nil {
		t.Fatal(err)
	}
	bad := make([]byte, len(img))
	for i := 0; i < len(img)*8; i++ {
		copy(bad, img)
		bad[i/8] ^= 1 << (i % 8)
		if _, _, err := Verify(bytes.NewReader(bad)); err == nil {
			t.Fatalf("bit %d (byte %d) flipped: the image was accepted", i%8, i/8)
		}
	}
}

// records splits an image into its header, its records and its trailer.
func records(t *testing.T, img []byte) (hdr []byte, recs [][]byte, trailer []byte) {
	t.Helper()
	hl := int(binary.LittleEndian.Uint16(img[10:]))
	hdr = img[:hl]
	p := hl
	for img[p] != recTrailer {
		n := recordHeader + crcSize
		if img[p] == recData {
			n += int(binary.LittleEndian.Uint64(img[p+24:]))
		}
		recs = append(recs, img[p:p+n])
		p += n
	}
	return hdr, recs, img[p:]
}

func reseal(rec []byte, seq uint64) []byte {
	rec = append([]byte(nil), rec...)
	binary.LittleEndian.PutUint64(rec[8:], seq)
	c := crc32.Checksum(rec[:len(rec)-crcSize], castagnoli)
	binary.LittleEndian.PutUint32(rec[len(rec)-crcSize:], c)
	return rec
}

func TestReorderedRecordsRefused(t *testing.T) {
	img := encodeFull(t, testHeader(Full, 64<<10), content(64<<10, 5))
	hdr, recs, tr := records(t, img)
	if len(recs) < 3 {
		t.Fatalf("only %d records", len(recs))
	}
	join := func(rs ...[]byte) []byte {
		var b []byte
		b = append(b, hdr...)
		for _, r := range rs {
			b = append(b, r...)
		}
		return append(b, tr...)
	}
	swapped := append([][]byte{recs[1], recs[0]}, recs[2:]...)
	cases := map[string]struct {
		img  []byte
		want string
	}{
		"swapped":                {join(swapped...), "sequence"},
		"swapped, seq rewritten": {join(append([][]byte{reseal(recs[1], 0), reseal(recs[0], 1)}, recs[2:]...)...), "precedes"},
		"dropped":                {join(recs[1:]...), "sequence"},
		"duplicated":             {join(append([][]byte{recs[0]}, recs...)...), "sequence"},
	}
	// A payload edited and its CRC recomputed: only the digest sees it.
	edited := append([]byte(nil), recs[1]...)
	edited[recordHeader] ^= 0xff
	cases["payload edited, crc fixed"] = struct {
		img  []byte
		want string
	}{join(append([][]byte{recs[0], reseal(edited, 1)}, recs[2:]...)...), "digest"}
	for name, c := range cases {
		_, _, err := Verify(bytes.NewReader(c.img))
		if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want ErrCorrupt naming %q", name, err, c.want)
		}
	}
}

func TestWrongVersionAndNotAnImage(t *testing.T) {
	img := encodeFull(t, testHeader(Full, 4096), content(4096, 6))
	v2 := append([]byte(nil), img...)
	binary.LittleEndian.PutUint16(v2[8:], 2)
	_, _, err := Verify(bytes.NewReader(v2))
	if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 2") {
		t.Fatalf("version 2: %v", err)
	}
	for _, in := range []string{"", "hello world, not an image", "\x89BD"} {
		_, _, err := Verify(strings.NewReader(in))
		if in == "\x89BD" || in == "" {
			if !errors.Is(err, ErrTruncated) {
				t.Errorf("%q: %v, want ErrTruncated", in, err)
			}
			continue
		}
		if !errors.Is(err, ErrNotImage) {
			t.Errorf("%q: %v, want ErrNotImage", in, err)
		}
	}
}

func TestWriterRefusesBadCalls(t *testing.T) {
	if _, err := NewWriter(io.Discard, Header{Kind: Diff, BlockSize: 512, Size: 4096}); err == nil || !strings.Contains(err.Error(), "base snapshot") {
		t.Fatalf("diff without base: %v", err)
	}
	if _, err := NewWriter(io.Discard, Header{Kind: Full, BlockSize: 4096, Size: 1000}); err == nil {
		t.Fatal("size not a multiple of the block size accepted")
	}
	w, err := NewWriter(io.Discard, testHeader(Full, 8192))
	if err != nil {
		t.Fatal(err)
	}
	one := bytes.Repeat([]byte{1}, 512)
	if err := w.Data(1024, one); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"out of order": w.Data(0, one),
		"misaligned":   w.Data(2000, one),
		"past the end": w.Data(8192, one),
		"short block":  w.Data(4096, one[:100]),
	} {
		if err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}

// TestChunkBoundaries: data records never cross a chunk boundary and the
// header carries the default chunk size.
func TestChunkBoundaries(t *testing.T) {
	h := testHeader(Full, 4<<20)
	h.ChunkSize = 0
	var out bytes.Buffer
	w, err := NewWriter(&out, h)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{7}, 3<<20)
	if err := w.Data(512, data); err != nil {
		t.Fatal(err)
	}
	sum, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if w.Header().ChunkSize != DefaultChunkSize || sum.DataRecords != 4 {
		t.Fatalf("chunk %d, %d records; want %d and 4", w.Header().ChunkSize, sum.DataRecords, DefaultChunkSize)
	}
	got, _, err := decode(t, out.Bytes(), nil, false)
	if err != nil || !bytes.Equal(got[512:512+3<<20], data) {
		t.Fatalf("decode: %v", err)
	}
}

func fuzzSeeds(t testing.TB) [][]byte {
	var seeds [][]byte
	seeds = append(seeds, encodeFull(t, testHeader(Full, 8<<10), content(8<<10, 7)))
	seeds = append(seeds, encodeFull(t, testHeader(Diff, 8<<10), content(8<<10, 8)))
	seeds = append(seeds, encodeFull(t, testHeader(Full, 4096), make([]byte, 4096)))
	return seeds
}

// FuzzReader: whatever the bytes, the reader never panics, never allocates
// past its limits, and accepts nothing but the valid images it was seeded
// with (any other accepted input would be a corrupted stream passing every
// check).
func FuzzReader(f *testing.F) {
	seeds := fuzzSeeds(f)
	for _, s := range seeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := NewReader(bytes.NewReader(in))
		if err != nil {
			if !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrVersion) && !errors.Is(err, ErrNotImage) {
				t.Fatalf("header error of no known kind: %v", err)
			}
			return
		}
		for {
			rec, err := r.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				if !errors.Is(err, ErrTruncated) && !errors.Is(err, ErrCorrupt) {
					t.Fatalf("record error of no known kind: %v", err)
				}
				return
			}
			if rec.Off < 0 || rec.Len <= 0 || rec.Off+rec.Len > r.Header().Size {
				t.Fatalf("record out of bounds accepted: %+v", rec)
			}
		}
		for _, s := range seeds {
			if bytes.Equal(in, s) {
				return
			}
		}
		t.Fatalf("accepted an input that is none of the valid seeds (%d bytes)", len(in))
	})
}
