package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/replication"
	"github.com/blockd/blockd/tlsauth"
)

// TLS on a volume server (Config.TLS): the NBD frontend requires
// STARTTLS and a client certificate from the cluster CA; the replication
// listener takes only servers' certificates, and the receiver compares
// the certificate's server ID with the primary the Hello names
// (replication's PeerServerID hook); a primary dials a replica over TLS
// and accepts only a certificate naming a server ID the master assigned
// at that address; heartbeats are HTTPS with the server's certificate,
// which must name this server's ID.

// checkTLSIdentity refuses credentials that are not this server's.
func checkTLSIdentity(c *tlsauth.Creds, id string) error {
	if c == nil {
		return nil
	}
	want := tlsauth.Identity{Kind: tlsauth.KindServer, Name: id}
	if c.ID != want {
		return fmt.Errorf("server: --tls-cert is for %s, this server is %s: a server presents the certificate of its own ID", c.ID, want)
	}
	return nil
}

func (s *Server) masterClient() *api.Client {
	if s.cfg.TLS == nil {
		return api.NewClient(s.cfg.Masters)
	}
	check := tlsauth.Expect(tlsauth.KindMaster, "")
	if s.cfg.EmbeddedMaster {
		self := s.cfg.TLS.ID
		check = func(id tlsauth.Identity) error {
			if id == self {
				return nil
			}
			return tlsauth.Expect(tlsauth.KindMaster, "")(id)
		}
	}
	return api.NewClientTLS(s.cfg.Masters, s.cfg.TLS.ClientConfig(check))
}

// replListener wraps the replication listener: servers' certificates only;
// a refused handshake (a plain client, another CA, a client certificate)
// is logged as replication_tls_refused with its reason.
func (s *Server) replListener(ln net.Listener) net.Listener {
	if s.cfg.TLS == nil {
		return ln
	}
	return tlsauth.NewLoggingListener(ln, s.cfg.TLS.ServerConfig(tlsauth.Expect(tlsauth.KindServer, "")),
		tlsauth.ListenOptions{Log: s.log, Event: "replication_tls_refused", PlainReply: replPlainReply})
}

// replPlainReply is what a plain replication peer reads at a replication
// port that requires TLS: a MsgError frame, so its Hello fails with this
// reason ("peer refused: protocol: ...") instead of an EOF.
var replPlainReply = func() []byte {
	var b bytes.Buffer
	_ = replication.WriteFrame(&b, &replication.Msg{Type: replication.MsgError, Volume: "-", Payload: replication.ErrorBody{
		Code:    replication.CodeProtocol,
		Message: "this replication port requires mutual TLS: start every server with --tls-cert, --tls-key and --tls-ca (blockd tls init --server ID)",
	}.Encode()})
	return b.Bytes()
}()

// peerIDs remembers, from the latest assignments, which server IDs the
// master placed at each replication address, for the dialer's check.
type peerIDs struct {
	mu sync.Mutex
	m  map[string]map[string]bool // addr -> server IDs
}

func (p *peerIDs) set(as []api.VolumeAssignment) {
	m := map[string]map[string]bool{}
	for _, a := range as {
		for _, r := range a.Replicas {
			if r.ServerID == "" || r.Addr == "" {
				continue
			}
			if m[r.Addr] == nil {
				m[r.Addr] = map[string]bool{}
			}
			m[r.Addr][r.ServerID] = true
		}
	}
	p.mu.Lock()
	p.m = m
	p.mu.Unlock()
}

func (p *peerIDs) expected(addr string) []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var ids []string
	for id := range p.m[addr] {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids
}

// replDial is replication's Dial hook under TLS: the replica must present
// the certificate of a server ID assigned at addr.
func (s *Server) replDial(ctx context.Context, addr string) (net.Conn, error) {
	d := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 5 * time.Second}
	want := s.peers.expected(addr)
	check := func(id tlsauth.Identity) error {
		if id.Kind == tlsauth.KindServer {
			for _, w := range want {
				if id.Name == w {
					return nil
				}
			}
		}
		if len(want) == 0 {
			return fmt.Errorf("no replica is assigned at %s (certificate of %s)", addr, id)
		}
		return fmt.Errorf("replica at %s presented the certificate of %s, the master assigned server %s there", addr, id, strings.Join(want, ", "))
	}
	c, err := tlsauth.Dial(ctx, d, addr, s.cfg.TLS.ClientConfig(check))
	if err != nil {
		var ne net.Error
		if !errors.As(err, &ne) {
			s.log.Warn("replica_tls_refused", "addr", addr, "expected", strings.Join(want, ","), "reason", tlsauth.Describe(err))
		}
		return nil, err
	}
	return c, nil
}
