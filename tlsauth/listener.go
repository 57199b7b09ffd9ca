package tlsauth

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"time"
)

// Conn is a server-side TLS connection whose handshake runs on first use,
// bounded by HandshakeTimeout, so a client that stalls or sends garbage
// costs one goroutine for at most that long and never blocks Accept.
type Conn struct {
	*tls.Conn
	done    atomic.Bool
	refused atomic.Bool
	opt     ListenOptions
}

// Handshake runs the TLS handshake (once) within HandshakeTimeout. A
// failure is logged once, with its reason, on the listener's logger.
func (c *Conn) Handshake() error {
	if c.done.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
	defer cancel()
	err := c.Conn.HandshakeContext(ctx)
	if err == nil {
		c.done.Store(true)
		return nil
	}
	if c.refused.CompareAndSwap(false, true) {
		c.refuse(err)
	}
	return err
}

// refuse logs a failed handshake and answers a plain client in the clear.
func (c *Conn) refuse(err error) {
	if c.opt.Log != nil {
		level := slog.LevelWarn
		if errors.Is(err, io.EOF) {
			level = slog.LevelInfo // a connect-and-close probe, not an attack
		}
		c.opt.Log.Log(context.Background(), level, c.opt.Event, "remote", c.RemoteAddr().String(), "reason", Describe(err))
	}
	var rh tls.RecordHeaderError
	if len(c.opt.PlainReply) > 0 && errors.As(err, &rh) && rh.Conn != nil {
		_ = rh.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		if _, err := rh.Conn.Write(c.opt.PlainReply); err != nil {
			return
		}
		// End our side after the reply and read what the client had sent
		// on (briefly): closing with unread data would reset the
		// connection, and the client could lose the reply.
		if cw, ok := rh.Conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		_ = rh.Conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		_, _ = io.CopyN(io.Discard, rh.Conn, 1<<20)
	}
}

// HandshakeError is a server-side handshake failure as Read and Write
// return it: the remote address and the reason (Describe).
type HandshakeError struct {
	Remote string
	Err    error
}

func (e *HandshakeError) Error() string {
	return "tls handshake with " + e.Remote + " refused: " + Describe(e.Err)
}

func (e *HandshakeError) Unwrap() error { return e.Err }

// Read handshakes first, so the deadline applies to it.
func (c *Conn) Read(p []byte) (int, error) {
	if err := c.Handshake(); err != nil {
		return 0, &HandshakeError{Remote: c.RemoteAddr().String(), Err: err}
	}
	return c.Conn.Read(p)
}

// Write handshakes first, so the deadline applies to it.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.Handshake(); err != nil {
		return 0, &HandshakeError{Remote: c.RemoteAddr().String(), Err: err}
	}
	return c.Conn.Write(p)
}

// PeerIdentity is the verified identity of the client (handshaking first).
func (c *Conn) PeerIdentity() (Identity, error) {
	if err := c.Handshake(); err != nil {
		return Identity{}, err
	}
	return PeerIdentity(c.ConnectionState())
}

// PeerServerID is the server ID the peer's verified certificate names; an
// identity that is not a server's is an error. replication's receiver
// compares it with the primary a Hello claims to be.
func (c *Conn) PeerServerID() (string, error) {
	id, err := c.PeerIdentity()
	if err != nil {
		return "", err
	}
	if id.Kind != KindServer {
		return "", fmt.Errorf("peer certificate is for %s, not a server", id)
	}
	return id.Name, nil
}

type listener struct {
	net.Listener
	cfg *tls.Config
	opt ListenOptions
}

// NewListener wraps ln: every accepted connection is a *Conn.
func NewListener(ln net.Listener, cfg *tls.Config) net.Listener {
	return &listener{Listener: ln, cfg: cfg}
}

// ListenOptions are what a listener does when a handshake fails.
type ListenOptions struct {
	// Log receives one event per failed handshake, named Event, with keys
	// remote and reason (Describe: a plain client, a certificate refused,
	// a stalled handshake).
	Log   *slog.Logger
	Event string
	// PlainReply, when set, is written in the clear to a client whose
	// first bytes are not TLS: the refusal in the port's own protocol, so
	// a plain peer reads why (as net/http answers a plain request at an
	// HTTPS port).
	PlainReply []byte
}

// NewLoggingListener is NewListener whose connections log a failed
// handshake once and answer a plain client (ListenOptions). Ports whose
// protocol has no TLS negotiation of its own (raft, replication) refuse
// here, before the protocol's reader sees the error.
func NewLoggingListener(ln net.Listener, cfg *tls.Config, o ListenOptions) net.Listener {
	return &listener{Listener: ln, cfg: cfg, opt: o}
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &Conn{Conn: tls.Server(c, l.cfg), opt: l.opt}, nil
}

// Dial connects to addr and completes a client handshake with cfg within
// the context's deadline (HandshakeTimeout at most).
func Dial(ctx context.Context, d *net.Dialer, addr string, cfg *tls.Config) (*tls.Conn, error) {
	raw, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	hctx, cancel := context.WithTimeout(ctx, HandshakeTimeout)
	defer cancel()
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(hctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", addr, err)
	}
	return tc, nil
}

// Describe turns a handshake error into a short reason for a log line.
func Describe(err error) string {
	var he *HandshakeError
	if errors.As(err, &he) {
		err = he.Err
	}
	var ce *tls.CertificateVerificationError
	switch {
	case errors.As(err, &ce):
		return "certificate rejected: " + ce.Err.Error()
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return fmt.Sprintf("handshake did not complete within %v", HandshakeTimeout)
	case errors.Is(err, io.EOF):
		return "closed before the TLS handshake completed"
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return "not TLS: the first bytes are not a TLS ClientHello (a plain client?): " + rh.Msg
	}
	return err.Error()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
