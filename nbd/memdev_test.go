package nbd

import (
	"fmt"
	"sync"

	"github.com/blockd/blockd/blockdev"
)

// memDev is a small in-memory blockdev.Device for protocol tests: sparse
// 4 KiB blocks, counters for flush/FUA, an optional read failure and an
// optional gate that holds reads at one offset until released, and one
// that holds the next flush.
type memDev struct {
	mu      sync.Mutex
	size    int64
	blocks  map[int64][]byte
	flushes int
	fuas    int
	punches int
	zeroes  int
	trims   int

	failReadAt int64 // -1: none
	gateAt     int64 // -1: none
	gate       chan struct{}
	gated      chan struct{} // receives when a gated read is waiting

	flushGate  chan struct{} // when set, the next Flush waits for it to close
	flushGated chan struct{} // receives when that Flush is waiting
}

const memBlock = 4096

func newMemDev(size int64) *memDev {
	return &memDev{size: size, blocks: map[int64][]byte{}, failReadAt: -1, gateAt: -1}
}

func (d *memDev) Size() int64    { return d.size }
func (d *memDev) BlockSize() int { return memBlock }

func (d *memDev) ReadAt(p []byte, off int64) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return fmt.Errorf("memdev read: %w", err)
	}
	d.mu.Lock()
	gate, failAt, gateAt := d.gate, d.failReadAt, d.gateAt
	d.mu.Unlock()
	if gateAt >= 0 && off == gateAt && gate != nil {
		d.gated <- struct{}{}
		<-gate
	}
	if failAt >= 0 && off <= failAt && failAt < off+int64(len(p)) {
		return fmt.Errorf("memdev read at %d: %w", off, blockdev.ErrIO)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := 0; i < len(p); {
		o := off + int64(i)
		b := o / memBlock * memBlock
		in := int(o - b)
		n := min(memBlock-in, len(p)-i)
		if blk, ok := d.blocks[b]; ok {
			copy(p[i:i+n], blk[in:in+n])
		} else {
			clear(p[i : i+n])
		}
		i += n
	}
	return nil
}

func (d *memDev) WriteAt(p []byte, off int64, fua bool) error {
	if err := blockdev.CheckRange(d.size, off, int64(len(p)), blockdev.MaxIOSize); err != nil {
		return fmt.Errorf("memdev write: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for i := 0; i < len(p); {
		o := off + int64(i)
		b := o / memBlock * memBlock
		in := int(o - b)
		n := min(memBlock-in, len(p)-i)
		blk, ok := d.blocks[b]
		if !ok {
			blk = make([]byte, memBlock)
			d.blocks[b] = blk
		}
		copy(blk[in:in+n], p[i:i+n])
		i += n
	}
	if fua {
		d.fuas++
	}
	return nil
}

func (d *memDev) Flush() error {
	d.mu.Lock()
	d.flushes++
	gate, gated := d.flushGate, d.flushGated
	d.flushGate = nil
	d.mu.Unlock()
	if gate != nil {
		gated <- struct{}{}
		<-gate
	}
	return nil
}

func (d *memDev) zeroRange(off, length int64, punch bool) error {
	if err := blockdev.CheckRange(d.size, off, length, 0); err != nil {
		return fmt.Errorf("memdev zero: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for o := off; o < off+length; {
		b := o / memBlock * memBlock
		in := o - b
		n := min(memBlock-in, off+length-o)
		if in == 0 && n == memBlock && punch {
			delete(d.blocks, b)
		} else if blk, ok := d.blocks[b]; ok {
			clear(blk[in : in+n])
		} else if !punch {
			d.blocks[b] = make([]byte, memBlock)
		}
		o += n
	}
	return nil
}

func (d *memDev) Trim(off, length int64) error {
	d.mu.Lock()
	d.trims++
	d.mu.Unlock()
	return d.zeroRange(off, length, true)
}

func (d *memDev) WriteZeroes(off, length int64, punch bool) error {
	d.mu.Lock()
	if punch {
		d.punches++
	} else {
		d.zeroes++
	}
	d.mu.Unlock()
	return d.zeroRange(off, length, punch)
}

func (d *memDev) BlockStatus(off, length int64) ([]blockdev.Extent, error) {
	if err := blockdev.CheckRange(d.size, off, length, 0); err != nil {
		return nil, fmt.Errorf("memdev block status: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []blockdev.Extent
	for o := off / memBlock * memBlock; o < off+length; o += memBlock {
		_, alloc := d.blocks[o]
		start := max(o, off)
		n := min(o+memBlock, off+length) - start
		if k := len(out) - 1; k >= 0 && out[k].Hole == !alloc {
			out[k].Length += n
			continue
		}
		out = append(out, blockdev.Extent{Offset: start, Length: n, Hole: !alloc, Zero: !alloc})
	}
	return out, nil
}

func (d *memDev) counters() (flushes, fuas, punches, zeroes, trims int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.flushes, d.fuas, d.punches, d.zeroes, d.trims
}
