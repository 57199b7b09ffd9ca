package replication

import (
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// faultProxy is a TCP proxy between a primary and a replica server that
// can drop new connections, cut live ones, delay traffic, black-hole it
// (a silent partition), cut each connection after N bytes, and record a
// connection's bytes to replay them later on a fresh connection (a late,
// reordered stream from an old session).
type faultProxy struct {
	t      *testing.T
	ln     net.Listener
	mu     sync.Mutex
	target string
	conns  map[net.Conn]struct{}
	refuse bool
	// per-direction delay applied to every chunk
	delayUp, delayDown atomic.Int64
	blackhole          atomic.Bool
	cutAfter           atomic.Int64 // bytes primary→replica per connection, 0 = off
	record             atomic.Bool
	recorded           []byte
	accepted           atomic.Int64
	wg                 sync.WaitGroup
}

func newFaultProxy(t *testing.T, target string) *faultProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{t: t, ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *faultProxy) addr() string { return p.ln.Addr().String() }

// drop: refuse (accept and close at once) every new connection.
func (p *faultProxy) drop(on bool) { p.mu.Lock(); p.refuse = on; p.mu.Unlock() }

// cut closes every live connection.
func (p *faultProxy) cut() {
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

func (p *faultProxy) close() {
	p.ln.Close()
	p.cut()
	p.wg.Wait()
}

func (p *faultProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.accepted.Add(1)
		p.mu.Lock()
		refuse, target := p.refuse, p.target
		p.mu.Unlock()
		if refuse {
			c.Close()
			continue
		}
		u, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[u] = struct{}{}, struct{}{}
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, u, true)
		go p.pipe(u, c, false)
	}
}

func (p *faultProxy) pipe(src, dst net.Conn, up bool) {
	defer p.wg.Done()
	defer func() {
		src.Close()
		dst.Close()
		p.mu.Lock()
		delete(p.conns, src)
		delete(p.conns, dst)
		p.mu.Unlock()
	}()
	buf := make([]byte, 64<<10)
	var sent int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			d := p.delayDown.Load()
			if up {
				d = p.delayUp.Load()
			}
			if d > 0 {
				time.Sleep(time.Duration(d))
			}
			for p.blackhole.Load() {
				time.Sleep(5 * time.Millisecond)
				if p.isClosed(src) {
					return
				}
			}
			chunk := buf[:n]
			if up {
				if ca := p.cutAfter.Load(); ca > 0 && sent+int64(n) > ca {
					dst.Write(chunk[:ca-sent])
					return
				}
				if p.record.Load() {
					p.mu.Lock()
					p.recorded = append(p.recorded, chunk...)
					p.mu.Unlock()
				}
			}
			sent += int64(n)
			if _, werr := dst.Write(chunk); werr != nil {
				return
			}
		}
		if err != nil {
			if err != io.EOF {
				return
			}
			return
		}
	}
}

func (p *faultProxy) isClosed(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.conns[c]
	return !ok
}

// replay sends the recorded primary→replica bytes on a new connection to
// the target and returns what the replica answered.
func (p *faultProxy) replay() []byte {
	p.mu.Lock()
	data := append([]byte(nil), p.recorded...)
	target := p.target
	p.mu.Unlock()
	c, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		p.t.Fatal(err)
	}
	defer c.Close()
	c.Write(data)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	out, _ := io.ReadAll(c)
	return out
}
