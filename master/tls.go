package master

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/raft"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// TLS for the master: the API listener (HTTPS, client certificate
// required), who may call what, raft's stream layer and the master's own
// API calls to other masters. Config.TLS nil keeps everything plain.
//
// Who may call what, by the identity in the client certificate:
//   - POST /v1/heartbeat: a server, only for the server ID its certificate
//     names (a stranger cannot join as a volume server, nor a server speak
//     for another);
//   - POST /v1/raft/join: a master;
//   - everything else: a client, a master or a server.

// apiTLS wraps the API listener when TLS is configured.
func (m *Master) apiTLS(ln net.Listener) net.Listener {
	if m.cfg.TLS == nil {
		return ln
	}
	return tls.NewListener(ln, m.cfg.TLS.ServerConfig(nil))
}

// authorize wraps the API handler with the identity checks above.
func (m *Master) authorize(h http.Handler) http.Handler {
	if m.cfg.TLS == nil {
		return h
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			m.refuse(w, r, "", "no TLS connection state")
			return
		}
		id, err := tlsauth.PeerIdentity(*r.TLS)
		if err != nil {
			m.refuse(w, r, "", err.Error())
			return
		}
		switch {
		case r.URL.Path == "/v1/heartbeat":
			if id.Kind != tlsauth.KindServer {
				m.refuse(w, r, id.String(), "heartbeats come from servers only")
				return
			}
			body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
			if err != nil {
				writeErr(w, &api.Error{Code: api.CodeBadRequest, Status: http.StatusBadRequest, Message: "read heartbeat: " + err.Error()})
				return
			}
			var hb struct {
				ServerID string `json:"server_id"`
			}
			if err := json.Unmarshal(body, &hb); err == nil && hb.ServerID != id.Name {
				m.refuse(w, r, id.String(), fmt.Sprintf("heartbeat for server %q from the certificate of server %q", clipID(hb.ServerID), id.Name))
				return
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		case strings.HasPrefix(r.URL.Path, "/v1/raft/join"):
			if id.Kind != tlsauth.KindMaster {
				m.refuse(w, r, id.String(), "only a master may join the raft cluster")
				return
			}
		}
		h.ServeHTTP(w, r)
	})
}

func clipID(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

func (m *Master) refuse(w http.ResponseWriter, r *http.Request, who, why string) {
	m.log.Warn("api_refused", "remote", r.RemoteAddr, "method", r.Method, "path", r.URL.Path, "identity", who, "reason", why)
	writeErr(w, &api.Error{Code: api.CodeForbidden, Status: http.StatusForbidden, Message: why})
}

// apiClient is a client of other masters' APIs (join, status probes),
// speaking TLS with this master's certificate when configured.
func (m *Master) apiClient(addrs []string) *api.Client {
	if m.cfg.TLS == nil {
		return api.NewClient(addrs)
	}
	return api.NewClientTLS(addrs, m.cfg.TLS.ClientConfig(tlsauth.Expect(tlsauth.KindMaster, "")))
}

// raftTransport is raft's TCP transport, over TLS between masters when
// configured: both ends present a master certificate and accept only one.
// A refused handshake (a plain raft client, another CA, a non-master
// certificate) is logged as raft_tls_refused with its reason.
func (m *Master) raftTransport(bind string, advertise net.Addr) (*raft.NetworkTransport, error) {
	if m.cfg.TLS == nil {
		return raft.NewTCPTransport(bind, advertise, 3, 10*time.Second, &slogWriter{log: m.log})
	}
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, err
	}
	sl := &tlsStream{
		ln: tlsauth.NewLoggingListener(ln, m.cfg.TLS.ServerConfig(tlsauth.Expect(tlsauth.KindMaster, "")),
			tlsauth.ListenOptions{Log: m.log, Event: "raft_tls_refused", PlainReply: raftPlainReply}),
		addr:   advertise,
		client: m.cfg.TLS.ClientConfig(tlsauth.Expect(tlsauth.KindMaster, "")),
	}
	if sl.addr == nil {
		sl.addr = ln.Addr()
	}
	return raft.NewNetworkTransport(sl, 3, 10*time.Second, &slogWriter{log: m.log}), nil
}

// raftPlainReply is what a plain hashicorp/raft peer reads at a raft port
// that requires TLS: one RPC response in raft's msgpack framing, the
// error string and then an empty response, so its RPC fails with this
// reason instead of an EOF.
var raftPlainReply = msgpackRPCError("blockd: this raft port requires mutual TLS: start every master with --tls-cert, --tls-key and --tls-ca (blockd tls init --master NAME)")

func msgpackRPCError(msg string) []byte {
	b := []byte{0xda, byte(len(msg) >> 8), byte(len(msg))} // str16 (raw16 in the old msgpack spec)
	b = append(b, msg...)
	return append(b, 0x80) // the response: an empty map
}

// tlsStream is a raft.StreamLayer over mutual TLS.
type tlsStream struct {
	ln     net.Listener
	addr   net.Addr
	client *tls.Config
}

func (s *tlsStream) Accept() (net.Conn, error) { return s.ln.Accept() }
func (s *tlsStream) Close() error              { return s.ln.Close() }
func (s *tlsStream) Addr() net.Addr            { return s.addr }

func (s *tlsStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	raw, err := d.Dial("tcp", string(address))
	if err != nil {
		return nil, err
	}
	_ = raw.SetDeadline(time.Now().Add(max(timeout, tlsauth.HandshakeTimeout)))
	tc := tls.Client(raw, s.client)
	if err := tc.Handshake(); err != nil {
		raw.Close()
		return nil, fmt.Errorf("raft tls handshake with %s: %w", address, err)
	}
	_ = raw.SetDeadline(time.Time{})
	return tc, nil
}

// tlsErrorLog sends net/http's own messages (TLS handshake failures: a
// plain client, an unknown CA, an expired certificate) to the structured
// log as api_tls_refused events.
func tlsErrorLog(l *slog.Logger) *log.Logger {
	return log.New(&httpErrWriter{log: l}, "", 0)
}

type httpErrWriter struct{ log *slog.Logger }

func (w *httpErrWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSpace(string(p))
	if strings.Contains(msg, "TLS handshake error") {
		w.log.Warn("api_tls_refused", "reason", msg)
	} else {
		w.log.Warn("api_http_error", "reason", msg)
	}
	return len(p), nil
}
