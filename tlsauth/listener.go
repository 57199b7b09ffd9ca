package tlsauth

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
)

// Conn is a server-side TLS connection whose handshake runs on first use,
// bounded by HandshakeTimeout, so a client that stalls or sends garbage
// costs one goroutine for at most that long and never blocks Accept.
type Conn struct {
	*tls.Conn
	done atomic.Bool
}

// Handshake runs the TLS handshake (once) within HandshakeTimeout.
func (c *Conn) Handshake() error {
	if c.done.Load() {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), HandshakeTimeout)
	defer cancel()
	err := c.Conn.HandshakeContext(ctx)
	if err == nil {
		c.done.Store(true)
	}
	return err
}

// Read handshakes first, so the deadline applies to it.
func (c *Conn) Read(p []byte) (int, error) {
	if err := c.Handshake(); err != nil {
		return 0, fmt.Errorf("tls handshake with %s: %w", c.RemoteAddr(), err)
	}
	return c.Conn.Read(p)
}

// Write handshakes first, so the deadline applies to it.
func (c *Conn) Write(p []byte) (int, error) {
	if err := c.Handshake(); err != nil {
		return 0, fmt.Errorf("tls handshake with %s: %w", c.RemoteAddr(), err)
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
}

// NewListener wraps ln: every accepted connection is a *Conn.
func NewListener(ln net.Listener, cfg *tls.Config) net.Listener {
	return &listener{Listener: ln, cfg: cfg}
}

func (l *listener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &Conn{Conn: tls.Server(c, l.cfg)}, nil
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
	var ce *tls.CertificateVerificationError
	switch {
	case errors.As(err, &ce):
		return "certificate rejected: " + ce.Err.Error()
	case errors.Is(err, context.DeadlineExceeded), isTimeout(err):
		return fmt.Sprintf("handshake did not complete within %v", HandshakeTimeout)
	}
	var rh tls.RecordHeaderError
	if errors.As(err, &rh) {
		return "not TLS (no ClientHello): " + rh.Msg
	}
	return err.Error()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
