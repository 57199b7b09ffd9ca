// Command pcclient is the client side of the power-cut test, run inside
// the guest against `blockd serve`:
//
//	pcclient write -state F -cut-after D -cut CMD  writes tagged blocks and
//	    flushes; it records, for every block, the last tag a successful
//	    flush covered and the highest tag it ever sent. After D it runs CMD
//	    (which cuts the power below the file system) with the recording
//	    closed: no acknowledgement that arrives during or after the cut is
//	    counted. With -cut "" it records every acknowledgement until the
//	    server fails (for error_writes: a correct server never acknowledges
//	    a flush it could not make durable).
//	pcclient verify -state F  reads every block: each must hold its flushed
//	    tag or a later one it was sent, whole.
//	pcclient wait  waits until the export answers.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"sync"
	"time"

	"github.com/blockd/blockd/tests/torture"
)

type state struct {
	Blocks  int64    `json:"blocks"`
	Flushed []uint64 `json:"flushed"` // per block: covered by a successful flush
	Sent    []uint64 `json:"sent"`    // per block: highest tag sent
	Flushes int      `json:"flushes"`
	Writes  int      `json:"writes"`
	NextTag uint64   `json:"next_tag"`
}

func load(path string, blocks int64) (*state, error) {
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return &state{Blocks: blocks, Flushed: make([]uint64, blocks), Sent: make([]uint64, blocks), NextTag: 1}, nil
	}
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("state %s: %w", path, err)
	}
	return &s, nil
}

// save writes the state atomically (tmpfs: it survives the power cut,
// which only hits the disk under the data directory).
func (s *state) save(path string) error {
	b, err := json.Marshal(s)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path+".tmp", b, 0o644); err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: pcclient write|verify|wait [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	addr := fs.String("addr", "127.0.0.1:10809", "NBD address")
	name := fs.String("name", "vol0", "export")
	statePath := fs.String("state", "/tmp/pc-state.json", "state file (on tmpfs)")
	blocks := fs.Int64("blocks", 256, "blocks used")
	cutAfter := fs.Duration("cut-after", 3*time.Second, "run -cut after this long")
	cutCmd := fs.String("cut", "", "shell command that cuts the power (empty: none)")
	seed := fs.Int64("seed", 1, "seed")
	_ = fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "wait":
		err = wait(*addr, *name)
	case "write":
		err = write(*addr, *name, *statePath, *blocks, *cutAfter, *cutCmd, *seed)
	case "verify":
		err = verify(*addr, *name, *statePath, *blocks)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "pcclient:", err)
		os.Exit(1)
	}
}

func wait(addr, name string) error {
	deadline := time.Now().Add(120 * time.Second)
	for {
		c, err := torture.Dial(addr, name, 10*time.Second)
		if err == nil {
			return c.Close()
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func write(addr, name, path string, blocks int64, cutAfter time.Duration, cutCmd string, seed int64) error {
	s, err := load(path, blocks)
	if err != nil {
		return err
	}
	c, err := torture.Dial(addr, name, 30*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	var mu sync.Mutex // held while recording, and across the cut
	cut := false
	var cutErr error
	cutDone := make(chan struct{})
	if cutCmd != "" {
		go func() {
			defer close(cutDone)
			time.Sleep(cutAfter)
			mu.Lock()
			cut = true
			out, err := exec.Command("sh", "-c", cutCmd).CombinedOutput()
			mu.Unlock()
			if err != nil {
				cutErr = fmt.Errorf("cut command: %v: %s", err, out)
			}
			fmt.Printf("POWERCUT cut after %v (writes %d, flushes %d recorded)\n", cutAfter, s.Writes, s.Flushes)
		}()
	} else {
		close(cutDone)
	}
	rng := rand.New(rand.NewSource(seed))
	buf := make([]byte, torture.BlockSize)
	// written: tags sent since the last flush began, per block
	pending := map[int64]uint64{}
	var loopErr error
	for i := 0; ; i++ {
		mu.Lock()
		done := cut
		mu.Unlock()
		if done {
			break
		}
		if i%8 == 7 {
			snap := make(map[int64]uint64, len(pending))
			for b, t := range pending {
				snap[b] = t
			}
			if err := c.Flush(); err != nil {
				loopErr = fmt.Errorf("flush: %w", err)
				break
			}
			mu.Lock()
			if !cut {
				for b, t := range snap {
					if t > s.Flushed[b] {
						s.Flushed[b] = t
					}
				}
				s.Flushes++
				err = s.save(path)
			}
			mu.Unlock()
			if err != nil {
				return err
			}
			continue
		}
		b := rng.Int63n(blocks)
		mu.Lock()
		tag := s.NextTag
		s.NextTag++
		s.Sent[b] = tag // before it is sent: an unanswered write may land
		err = s.save(path)
		mu.Unlock()
		if err != nil {
			return err
		}
		torture.Pattern(buf, tag, b)
		if err := c.WriteAt(buf, b*torture.BlockSize); err != nil {
			loopErr = fmt.Errorf("write: %w", err)
			break
		}
		pending[b] = tag
		mu.Lock()
		s.Writes++
		mu.Unlock()
	}
	<-cutDone
	if cutErr != nil {
		return cutErr
	}
	fmt.Printf("POWERCUT writer done: writes %d, flushes %d acknowledged and recorded; stopped by: %v\n", s.Writes, s.Flushes, loopErr)
	if cutCmd == "" && loopErr == nil {
		return fmt.Errorf("writer stopped without a cut or an error")
	}
	return nil
}

func verify(addr, name, path string, blocks int64) error {
	s, err := load(path, blocks)
	if err != nil {
		return err
	}
	c, err := torture.Dial(addr, name, 30*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	buf := make([]byte, torture.BlockSize)
	var kept, newer, lost, torn int
	for b := int64(0); b < s.Blocks; b++ {
		if err := c.ReadAt(buf, b*torture.BlockSize); err != nil {
			return fmt.Errorf("read block %d: %w", b, err)
		}
		tag := torture.Decode(buf, b)
		switch {
		case tag == torture.TagTorn || tag == torture.TagMisplaced:
			torn++
			if torn+lost > 8 {
				continue
			}
			fmt.Printf("POWERCUT block %d torn or misplaced (flushed w%d, sent w%d)\n", b, s.Flushed[b], s.Sent[b])
		case tag < s.Flushed[b] || tag > s.Sent[b]:
			lost++
			if torn+lost > 8 {
				continue
			}
			fmt.Printf("POWERCUT block %d holds w%d: flushed w%d, highest sent w%d\n", b, tag, s.Flushed[b], s.Sent[b])
		case tag == s.Flushed[b]:
			kept++
		default:
			newer++
		}
	}
	fmt.Printf("POWERCUT verify: blocks %d, flushed value kept %d, newer unflushed value %d, lost %d, torn %d (after %d acknowledged flushes)\n",
		s.Blocks, kept, newer, lost, torn, s.Flushes)
	if lost+torn > 0 {
		return fmt.Errorf("%d blocks lost a flushed write, %d torn", lost, torn)
	}
	return nil
}
