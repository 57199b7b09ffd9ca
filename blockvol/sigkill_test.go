package blockvol

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The SIGKILL test runs a child process (this test binary re-executed)
// that writes to a real volume on disk from several goroutines and prints
// "F <writer> <seq>" each time a Flush returns; the parent kills it with
// SIGKILL mid-writes, reopens the volume and checks every block.
//
// Writer w's op number i is deterministic (block, trim or write), so the
// parent can rebuild each block's history from the flush reports.

const (
	skWriters = 4
	skPer     = 64 // blocks per writer
	skBlocks  = skWriters * skPer
)

type skOp struct {
	block int
	trim  bool
}

func skOpFor(round, w, i int) skOp {
	h := uint64(round)<<40 ^ uint64(w)<<32 ^ uint64(i)
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	return skOp{block: w*skPer + int(h%skPer), trim: h>>20%10 == 0}
}

func skTag(round, w, i int) uint32 { return uint32(round)<<24 | uint32(w)<<20 | uint32(i) }

func TestSIGKILLChild(t *testing.T) {
	dir := os.Getenv("BLOCKVOL_SIGKILL_DIR")
	if dir == "" {
		t.Skip("helper process for TestSIGKILL")
	}
	round, _ := strconv.Atoi(os.Getenv("BLOCKVOL_SIGKILL_ROUND"))
	o := Options{Size: skBlocks * 4096, WALSize: 512 << 10}
	var v *Volume
	var err error
	if Exists(dir) {
		v, err = Open(dir, o)
	} else {
		v, err = Create(dir, o)
	}
	if err != nil {
		fmt.Println("ERR", err)
		os.Exit(2)
	}
	fmt.Println("READY")
	var outMu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < skWriters; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, 4096)
			r := rand.New(rand.NewPCG(uint64(w), uint64(round)))
			for i := 1; i < 1<<20; i++ {
				op := skOpFor(round, w, i)
				var err error
				if op.trim {
					err = v.Trim(int64(op.block)*4096, 4096)
				} else {
					for s := 0; s < spb; s++ {
						fillSector(buf[s*512:], skTag(round, w, i), uint64(op.block), s)
					}
					err = v.WriteAt(buf, int64(op.block)*4096, false)
				}
				if err != nil {
					fmt.Println("ERR", err)
					os.Exit(2)
				}
				if r.IntN(8) == 0 {
					if err := v.Flush(); err != nil {
						fmt.Println("ERR", err)
						os.Exit(2)
					}
					outMu.Lock()
					fmt.Printf("F %d %d\n", w, i)
					outMu.Unlock()
				}
			}
		}(w)
	}
	wg.Wait()
	os.Exit(0)
}

func TestSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	dir := filepath.Join(t.TempDir(), "vol")
	base := make([]uint32, skBlocks) // verified tag per block (0: zeroes)
	rounds := 4
	r := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
	for round := 1; round <= rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSIGKILLChild$", "-test.v=false")
		cmd.Env = append(os.Environ(), "BLOCKVOL_SIGKILL_DIR="+dir, "BLOCKVOL_SIGKILL_ROUND="+strconv.Itoa(round))
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		flushed := make([]int, skWriters) // highest seq covered by a flush
		sc := bufio.NewScanner(out)
		killAfter := 20 + r.IntN(200)
		n := 0
		killed := false
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "ERR"):
				t.Fatalf("round %d child: %s", round, line)
			case strings.HasPrefix(line, "F "):
				var w, i int
				fmt.Sscanf(line, "F %d %d", &w, &i)
				if i > flushed[w] {
					flushed[w] = i
				}
				n++
			}
			if n >= killAfter && !killed {
				cmd.Process.Signal(syscall.SIGKILL)
				killed = true // keep reading what was printed before
			}
		}
		err = cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Fatalf("round %d: child did not die of SIGKILL: %v (%d flush reports)", round, err, n)
		}
		v, err := Open(dir, Options{Logger: testLogger(t)})
		if err != nil {
			t.Fatalf("round %d: reopen after SIGKILL: %v", round, err)
		}
		buf := make([]byte, skBlocks*4096)
		if err := v.ReadAt(buf, 0); err != nil {
			t.Fatal(err)
		}
		for b := 0; b < skBlocks; b++ {
			w := b / skPer
			var got uint32
			for s := 0; s < spb; s++ {
				tag, err := decodeSector(buf[b*4096+s*512:], uint64(b), s)
				if err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if s > 0 && tag != got {
					t.Fatalf("round %d block %d: sectors from different writes (%d, %d)", round, b, got, tag)
				}
				got = tag
			}
			// The last op on b covered by a flush, if any.
			durable := -1
			for i := flushed[w]; i >= 1; i-- {
				if skOpFor(round, w, i).block == b {
					durable = i
					break
				}
			}
			ok := false
			if durable < 0 && got == base[b] {
				ok = true // untouched since the last round, or nothing durable yet
			}
			start := max(durable, 1)
			// Any op on b from the durable one on may show (the child
			// ran at most ~1M ops; stop at a generous bound).
			for i := start; i < flushed[w]+200000 && !ok; i++ {
				op := skOpFor(round, w, i)
				if op.block != b {
					continue
				}
				if (op.trim && got == 0) || (!op.trim && got == skTag(round, w, i)) {
					ok = true
				}
			}
			if !ok {
				t.Fatalf("round %d block %d: tag %x not allowed (durable op %d, flushed %d)", round, b, got, durable, flushed[w])
			}
			base[b] = got
		}
		t.Logf("round %d: killed after %d flush reports, head LSN %d, checkpoint %d", round, n, v.HeadLSN(), v.CheckpointLSN())
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
