package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/blockd/blockd/nbd/wire"
)

// WithPeerName sets how a verified client certificate becomes the client
// name Export.Access is asked about (default: its subject CommonName).
func WithPeerName(f func(*x509.Certificate) string) Option {
	return func(s *Server) { s.peerName = f }
}

// WithTLS requires TLS on every connection (the NBD protocol's "TLS
// required" mode): before NBD_OPT_STARTTLS every option but NBD_OPT_ABORT
// is answered NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which cannot
// carry an error, ends the session); STARTTLS upgrades the connection with
// cfg, which should demand a client certificate. nil: plain NBD.
func WithTLS(cfg *tls.Config) Option { return func(s *Server) { s.tls = cfg } }

// tlsHandshakeTimeout bounds the TLS handshake after STARTTLS (the whole
// negotiation is bounded by WithHandshakeTimeout too).
const tlsHandshakeTimeout = 10 * time.Second

// errTLSRequired ends a session that asked for an export in the clear.
var errTLSRequired = errors.New("TLS required: the client sent NBD_OPT_EXPORT_NAME without NBD_OPT_STARTTLS")

// tlsGate answers an option received before STARTTLS on a TLS-only server.
// handled means the option was dealt with here.
func (c *conn) tlsGate(opt uint32, data []byte) (handled bool, err error) {
	if c.srv.tls == nil {
		if opt == wire.OptStartTLS {
			return true, c.optReply(opt, wire.RepErrUnsup, []byte("this server does not offer TLS"))
		}
		return false, nil
	}
	if c.peer != nil {
		if opt == wire.OptStartTLS {
			return true, c.optReply(opt, wire.RepErrInvalid, []byte("TLS is already negotiated"))
		}
		return false, nil
	}
	switch opt {
	case wire.OptStartTLS:
		if len(data) != 0 {
			return true, c.optReply(opt, wire.RepErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
		}
		return true, c.startTLS()
	case wire.OptAbort:
		return false, nil
	case wire.OptExportName:
		c.srv.log.Warn("nbd_tls_required", "remote", c.remote, "option", opt, "err", errTLSRequired)
		return true, errTLSRequired
	default:
		if !c.warnedPlain {
			c.warnedPlain = true
			c.srv.log.Warn("nbd_tls_required", "remote", c.remote, "option", opt,
				"err", "option sent before NBD_OPT_STARTTLS on a TLS-only server")
		}
		return true, c.optReply(opt, wire.RepErrTLSReqd, []byte("TLS required: send NBD_OPT_STARTTLS first"))
	}
}

// startTLS acknowledges STARTTLS and runs the server handshake; on
// success the connection continues negotiating over TLS.
func (c *conn) startTLS() error {
	if c.br.Buffered() > 0 {
		// Bytes sent after STARTTLS before our reply would be read as if
		// they had come over TLS: refuse rather than let them in.
		c.srv.log.Warn("nbd_tls_refused", "remote", c.remote, "reason", "data pipelined after NBD_OPT_STARTTLS")
		return errors.New("client sent data after NBD_OPT_STARTTLS before the reply")
	}
	if err := c.optReply(wire.OptStartTLS, wire.RepAck, nil); err != nil {
		return err
	}
	// TLS reads from a large buffer: one read(2) brings many records.
	bc := &bufConn{Conn: c.nc, r: bufio.NewReaderSize(c.nc, tlsReadBufferSize)}
	tc := tls.Server(bc, c.srv.tls)
	ctx, cancel := context.WithTimeout(context.Background(), tlsHandshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		reason := describeTLS(err)
		c.srv.log.Warn("nbd_tls_refused", "remote", c.remote, "reason", reason)
		return fmt.Errorf("tls handshake: %s", reason)
	}
	st := tc.ConnectionState()
	if len(st.PeerCertificates) > 0 {
		c.peer = st.PeerCertificates[0]
	} else {
		c.peer = &x509.Certificate{} // the config did not ask for one
	}
	c.mu.Lock()
	c.nc = tc
	c.mu.Unlock()
	c.setSource(&readAhead{tc: tc, bc: bc})
	c.out.nc = tc
	c.srv.log.Info("nbd_tls_established", "remote", c.remote, "client", c.peer.Subject.CommonName,
		"version", tls.VersionName(st.Version), "cipher", tls.CipherSuiteName(st.CipherSuite))
	return nil
}

// describeTLS is a handshake failure in a few words for the log.
func describeTLS(err error) string {
	var ce *tls.CertificateVerificationError
	var rh tls.RecordHeaderError
	var ne net.Error
	switch {
	case errors.As(err, &ce):
		return "client certificate rejected: " + ce.Err.Error()
	case errors.As(err, &rh):
		return "not a TLS ClientHello: " + rh.Msg
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "TLS handshake did not complete in time"
	}
	return err.Error()
}

// readAhead feeds the connection's bufio.Reader from TLS. tls.Conn.Read
// returns one record at a time, so after a request the reader would find
// its buffer empty and flush replies one by one although more requests are
// already here. readAhead adds the records already received: it reads on
// with the socket buffer in probe mode, where an empty buffer answers
// "would block" at once instead of reading the socket, so Buffered() keeps
// meaning "requests already received".
type readAhead struct {
	tc *tls.Conn
	bc *bufConn
}

// maxRecord is the largest TLS record payload.
const maxRecord = 16 << 10

func (r *readAhead) Read(p []byte) (int, error) {
	n, err := r.tc.Read(p)
	if err != nil || n == 0 {
		return n, err
	}
	r.bc.probe = true
	for len(p)-n >= maxRecord {
		m, err := r.tc.Read(p[n:])
		n += m
		if err != nil || m == 0 {
			break // would block: nothing more received; another error comes back on the next Read
		}
	}
	r.bc.probe = false
	return n, nil
}

// bufConn is the socket as tls.Conn sees it: reads go through a large
// buffer (tls.Conn alone reads a few records per system call). In probe
// mode (readAhead, on the reading goroutine) an empty buffer answers
// errWouldBlock, a temporary error tls.Conn does not keep.
type bufConn struct {
	net.Conn
	r     *bufio.Reader
	probe bool
}

func (b *bufConn) Read(p []byte) (int, error) {
	if b.probe && b.r.Buffered() == 0 {
		return 0, errWouldBlock{}
	}
	return b.r.Read(p)
}

type errWouldBlock struct{}

func (errWouldBlock) Error() string   { return "no TLS record received yet" }
func (errWouldBlock) Timeout() bool   { return true }
func (errWouldBlock) Temporary() bool { return true }

// peerName is the client's name for Export.Access ("" in plain mode).
func (c *conn) peerName() string {
	if c.peer == nil || c.peer.Raw == nil {
		return ""
	}
	if c.srv.peerName != nil {
		return c.srv.peerName(c.peer)
	}
	return c.peer.Subject.CommonName
}

// checkAccess applies e.Access for this connection's client.
func (c *conn) checkAccess(e Export) (Export, error) {
	if e.Access == nil {
		return e, nil
	}
	client := c.peerName()
	ro, err := e.Access(client)
	if err != nil {
		c.srv.log.Warn("nbd_access_refused", "export", e.Name, "client", client, "remote", c.remote, "err", err)
		return Export{}, err
	}
	if ro && !e.ReadOnly {
		e.ReadOnly = true
	}
	return e, nil
}

func clipMsg(s string) string {
	if len(s) > maxStringLen {
		return s[:maxStringLen]
	}
	return s
}

// tlsReadBufferSize is the socket buffer under TLS.
const tlsReadBufferSize = 1 << 20
