// Package nbd is the server side of the Network Block Device protocol
// (fixed newstyle negotiation, structured replies, base:allocation block
// status). It serves blockdev.Device values and knows nothing about what
// stores their bytes.
//
// Requests on a connection are read continuously, executed concurrently
// (bounded per connection) and answered out of order; replies are coalesced
// so that a burst of completions costs one write(2).
package nbd

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd/wire"
)

// Export is one device offered to clients under a name.
type Export struct {
	Name        string
	Description string
	Device      blockdev.Device
	ReadOnly    bool
	// Access, when set, is asked at NBD_OPT_GO / NBD_OPT_INFO /
	// NBD_OPT_EXPORT_NAME with the client's name (WithPeerName; "" without
	// TLS): an error refuses the export (NBD_REP_ERR_POLICY, its text shown
	// to the client, the refusal logged); readOnly serves it read-only.
	Access func(client string) (readOnly bool, err error)
	// Release, when set, is called once the connection that looked the
	// export up is done with it: at once for a lookup that only answered
	// an option (NBD_OPT_INFO, NBD_OPT_LIST, meta contexts, a refusal),
	// when the connection closes for the export it served. A source whose
	// exports hold resources (an open snapshot) frees them here.
	Release func()
}

func (e Export) release() {
	if e.Release != nil {
		e.Release()
	}
}

// ExportSource maps export names to devices. Lookup is called once per
// negotiated connection (and for NBD_OPT_INFO / OPT_LIST descriptions); its
// error message is shown to the client (NBD_REP_ERR_UNKNOWN), so it should
// say why, e.g. "volume vol1: this server is not its primary; primary is
// server s2 at 10.0.0.2:10809".
type ExportSource interface {
	Lookup(name string) (Export, error)
	// Names lists the exports (NBD_OPT_LIST). When it returns exactly one
	// name, the empty export name selects that export.
	Names() []string
}

// StaticExports is an ExportSource over a fixed list.
type StaticExports []Export

// Lookup implements ExportSource.
func (s StaticExports) Lookup(name string) (Export, error) {
	for _, e := range s {
		if e.Name == name {
			return e, nil
		}
	}
	return Export{}, fmt.Errorf("export %q not found", name)
}

// Names implements ExportSource.
func (s StaticExports) Names() []string {
	n := make([]string, 0, len(s))
	for _, e := range s {
		n = append(n, e.Name)
	}
	return n
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Option configures a Server.
type Option func(*Server)

// WithLogger sets the structured logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option { return func(s *Server) { s.log = l } }

// WithMaxInFlight bounds the requests executing at once on one connection
// (default 128). The reader stops reading when the bound is reached.
func WithMaxInFlight(n int) Option {
	return func(s *Server) {
		if n > 0 {
			s.maxInFlight = n
		}
	}
}

// WithHandshakeTimeout bounds the whole option negotiation (default 30s).
func WithHandshakeTimeout(d time.Duration) Option {
	return func(s *Server) { s.handshakeTimeout = d }
}

// WithMaxBlockSize sets the advertised maximum block size and the largest
// READ/WRITE accepted (default and upper bound blockdev.MaxIOSize).
func WithMaxBlockSize(n uint32) Option {
	return func(s *Server) {
		if n >= wire.PreferredBlockSize && n <= blockdev.MaxIOSize {
			s.maxBlock = n
		}
	}
}

// Server serves NBD exports on any number of listeners.
type Server struct {
	src              ExportSource
	log              *slog.Logger
	maxInFlight      int
	handshakeTimeout time.Duration
	maxBlock         uint32
	tls              *tls.Config
	peerName         func(*x509.Certificate) string

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
	stats     serverStats    // observe.go
	wg        sync.WaitGroup // connection goroutines
}

// NewServer returns a server for the exports of src.
func NewServer(src ExportSource, opts ...Option) *Server {
	s := &Server{
		src:              src,
		log:              slog.Default(),
		maxInFlight:      128,
		handshakeTimeout: 30 * time.Second,
		maxBlock:         blockdev.MaxIOSize,
		listeners:        map[net.Listener]struct{}{},
		conns:            map[*conn]struct{}{},
	}
	for _, o := range opts {
		o(s)
	}
	return s
}

// Serve accepts connections on l (TCP or unix) until Shutdown/Close or an
// accept error. It always closes l. After Shutdown it returns ErrServerClosed.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Temporary accept failures (EMFILE...): back off and go on.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("nbd_accept_failed", "err", err, "backoff", backoff, "action", "retrying")
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept on %s: %w", l.Addr(), err)
		}
		backoff = 0
		s.ServeConn(nc)
	}
}

// ServeConn serves one already accepted connection in the background.
func (s *Server) ServeConn(nc net.Conn) {
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.stats.accepted.Add(1)
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
		c.serve()
	}()
}

// Shutdown stops accepting, lets every connection finish the requests it
// has already read (their replies are sent), then closes the connections.
// Connections still negotiating are closed at once. If ctx ends first, the
// remaining connections are closed hard and ctx's error returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain("server shutdown")
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.abort()
		}
		s.mu.Unlock()
		// Requests stuck inside the device keep their goroutines until
		// the device returns; do not wait for them here.
		return ctx.Err()
	}
}

// Close is Shutdown bounded by 10 seconds of draining.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := s.Shutdown(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("nbd: close: in-flight requests did not drain in 10s; connections closed hard")
	}
	return err
}

// disconnectDrainTimeout bounds how long DisconnectExport lets in-flight
// requests finish before it closes the sockets hard.
const disconnectDrainTimeout = 10 * time.Second

// DisconnectExport drains and closes every connection serving the named
// export (for instance when the volume is deleted or this server loses its
// primary role). New connections still go through ExportSource.Lookup.
// It returns the number of connections it closed, once they are closed, or
// after at most 10 s: connections whose requests are stuck in the device
// are then closed hard (their goroutines end when the device returns).
func (s *Server) DisconnectExport(name string) int {
	return s.DisconnectMatching(func(n string) bool { return n == name })
}

// DisconnectMatching is DisconnectExport for every export whose name
// match accepts.
func (s *Server) DisconnectMatching(match func(name string) bool) int {
	s.mu.Lock()
	var conns []*conn
	for c := range s.conns {
		if n := c.exportName(); n != "" && match(n) {
			conns = append(conns, c)
		}
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain("export disconnected")
	}
	timeout := time.NewTimer(disconnectDrainTimeout)
	defer timeout.Stop()
	for _, c := range conns {
		select {
		case <-c.done:
		case <-timeout.C:
			s.log.Warn("nbd_drain_timeout", "export", c.exportName(), "conns", len(conns), "action", "in-flight requests did not drain; closing the connections hard")
			for _, c := range conns {
				c.abort()
			}
			return len(conns)
		}
	}
	return len(conns)
}

// Conns returns the number of open connections.
func (s *Server) Conns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// resolve applies the empty-name rule and looks the export up.
func (s *Server) resolve(name string) (Export, error) {
	name = s.canonical(name)
	e, err := s.src.Lookup(name)
	if err != nil {
		return Export{}, err
	}
	if e.Device == nil {
		e.release()
		return Export{}, fmt.Errorf("export %q has no device", name)
	}
	if e.Name == "" {
		e.Name = name
	}
	return e, nil
}

func (s *Server) canonical(name string) string {
	if name == "" {
		if names := s.src.Names(); len(names) == 1 {
			return names[0]
		}
	}
	return name
}

func (s *Server) names() []string {
	n := append([]string(nil), s.src.Names()...)
	sort.Strings(n)
	return n
}

// discard skips n bytes of r.
func discard(r io.Reader, n int64) error {
	_, err := io.CopyN(io.Discard, r, n)
	return err
}
