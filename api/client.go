package api

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultMaster is the default master API address (the default of every
// client command's --master).
const DefaultMaster = "127.0.0.1:9333"

// Client talks to a set of masters and follows the raft leader: it sends to
// the last known leader first, follows 307 redirects and not_leader answers,
// and on transport errors tries the next address, with backoff, until
// RetryFor (or the context) runs out. Safe for concurrent use.
//
// When no master gives an answer, calls return an *UnreachableError: one
// line that names every address tried and what happened there.
type Client struct {
	addrs []string
	hc    *http.Client

	// RetryFor bounds how long one call keeps trying masters when none
	// answers or none is leader (default 30s); 0 tries each address once.
	// The context bounds it too.
	RetryFor time.Duration
	// AnswerTimeout bounds one exchange with one master: connecting,
	// sending and reading the whole reply (default 15s). A master that
	// accepts the connection but does not answer within it counts as not
	// answering, and the next address is tried.
	AnswerTimeout time.Duration

	tls *tls.Config // nil: plain http

	mu     sync.Mutex
	leader string
}

// NewClientTLS is NewClient speaking HTTPS with cfg (which should carry a
// client certificate; the masters require one). Addresses given as
// http://... and leaders named in redirects are reached over https.
func NewClientTLS(addrs []string, cfg *tls.Config) *Client {
	c := NewClient(addrs)
	if cfg == nil {
		return c
	}
	c.tls = cfg
	for i, a := range c.addrs {
		c.addrs[i] = toHTTPS(a)
	}
	c.hc.Transport = &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		TLSClientConfig:     cfg,
		TLSHandshakeTimeout: 10 * time.Second,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   false,
	}
	return c
}

func toHTTPS(base string) string {
	if rest, ok := strings.CutPrefix(base, "http://"); ok {
		return "https://" + rest
	}
	return base
}

// NewClient returns a client for the given master API addresses
// ("host:port" or "http://host:port"). An empty list means DefaultMaster.
func NewClient(addrs []string) *Client {
	var norm []string
	for _, a := range addrs {
		if a = strings.TrimSpace(a); a != "" {
			norm = append(norm, normalize(a))
		}
	}
	if len(norm) == 0 {
		norm = []string{normalize(DefaultMaster)}
	}
	return &Client{
		addrs:         norm,
		RetryFor:      30 * time.Second,
		AnswerTimeout: 15 * time.Second,
		hc: &http.Client{
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse // we follow ourselves, remembering the leader
			},
		},
	}
}

// ParseAddrs splits "a,b,c" into addresses.
func ParseAddrs(s string) []string {
	var out []string
	for _, a := range strings.Split(s, ",") {
		if a = strings.TrimSpace(a); a != "" {
			out = append(out, a)
		}
	}
	return out
}

func normalize(a string) string {
	a = strings.TrimRight(a, "/")
	if !strings.Contains(a, "://") {
		a = "http://" + a
	}
	return a
}

// Addrs returns the configured master base URLs.
func (c *Client) Addrs() []string { return append([]string(nil), c.addrs...) }

// Leader returns the base URL of the master last seen as leader ("" if none).
func (c *Client) Leader() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader
}

// order returns the addresses to try: the known leader first.
func (c *Client) order() []string {
	c.mu.Lock()
	l := c.leader
	c.mu.Unlock()
	out := make([]string, 0, len(c.addrs)+1)
	if l != "" {
		out = append(out, l)
	}
	for _, a := range c.addrs {
		if a != l {
			out = append(out, a)
		}
	}
	return out
}

func (c *Client) setLeader(base string) {
	c.mu.Lock()
	c.leader = base
	c.mu.Unlock()
}

// retrySafe reports whether a transport error proves the request was never
// delivered (so even a non-idempotent call may be retried).
func retrySafe(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	return false
}

// Tried is what one address did during a call that got no answer.
type Tried struct {
	Addr     string // host:port
	Attempts int
	Outcome  string // the last attempt's, e.g. "refused the connection"
}

// UnreachableError is returned when no master answered a call: every
// address refused, could not be reached, did not answer within
// AnswerTimeout, or was not the leader, for as long as RetryFor (or the
// context) allowed. Its message is one line.
type UnreachableError struct {
	Method, Path string
	Tried        []Tried
	Elapsed      time.Duration
	// MaybeApplied: a non-idempotent request may have reached a master
	// before its connection failed, so it was not retried.
	MaybeApplied bool
	// Err is the last attempt's error (or the context's).
	Err error
}

func (e *UnreachableError) Error() string {
	var b strings.Builder
	who := "master"
	for _, t := range e.Tried {
		if strings.HasPrefix(t.Outcome, "is not the leader") {
			who = "leader"
		}
	}
	fmt.Fprintf(&b, "%s %s: no %s answered: ", e.Method, clip(e.Path), who)
	for i, t := range e.Tried {
		if i > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "%s %s", t.Addr, t.Outcome)
		if t.Attempts > 1 {
			fmt.Fprintf(&b, " (%d attempts)", t.Attempts)
		}
	}
	fmt.Fprintf(&b, "; gave up after %v", e.Elapsed.Round(100*time.Millisecond))
	if e.MaybeApplied {
		b.WriteString(" (not retried: the request may have been applied)")
	}
	return b.String()
}

func (e *UnreachableError) Unwrap() error { return e.Err }

// tries records each address's attempts in the order first tried.
type tries struct {
	list []Tried
}

func (t *tries) add(base, outcome string) {
	addr := strings.TrimPrefix(strings.TrimPrefix(base, "http://"), "https://")
	for i := range t.list {
		if t.list[i].Addr == addr {
			t.list[i].Attempts++
			t.list[i].Outcome = outcome
			return
		}
	}
	t.list = append(t.list, Tried{Addr: addr, Attempts: 1, Outcome: outcome})
}

// outcome says in words what one failed exchange with a master did.
func outcome(err error, connected, timedOut bool, timeout time.Duration) string {
	var apiErr *Error
	if errors.As(err, &apiErr) && apiErr.Code == CodeNotLeader {
		if apiErr.Leader != "" {
			return "is not the leader (leader " + clip(apiErr.Leader) + ")"
		}
		return "is not the leader and knows of none"
	}
	switch {
	case timedOut && connected:
		return fmt.Sprintf("accepted the connection but sent no reply within %v", timeout)
	case timedOut:
		return fmt.Sprintf("did not accept a connection within %v", timeout)
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused the connection"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET),
		strings.Contains(err.Error(), "server closed idle connection"): // net/http's unexported errServerClosedIdle
		return "closed the connection without a reply"
	}
	var op *net.OpError
	if errors.As(err, &op) {
		if op.Op == "dial" {
			return "could not be reached: " + innermost(op)
		}
		return "failed: " + innermost(op)
	}
	return "failed: " + innermost(err)
}

// innermost is the text of the deepest wrapped error (no repeated URLs).
func innermost(err error) string {
	for {
		u := errors.Unwrap(err)
		if u == nil {
			return clip(err.Error())
		}
		err = u
	}
}

// clip shortens a string for an error message: a 10,000-character name
// is not echoed back whole.
func clip(s string) string {
	const max = 80
	if len(s) <= max {
		return s
	}
	return fmt.Sprintf("%s...(%d bytes)", s[:max-16], len(s))
}

// clipWords clips every overlong word of a master's message (a name the
// master echoed back).
func clipWords(msg string) string {
	if len(msg) <= 80 {
		return msg
	}
	f := strings.Fields(msg)
	changed := false
	for i, w := range f {
		if len(w) > 80 {
			f[i], changed = clip(w), true
		}
	}
	if !changed {
		return msg
	}
	return strings.Join(f, " ")
}

// do sends one call. idempotent calls are retried on any transport error;
// others only when the request provably never left (dial errors) or was
// refused with not_leader.
func (c *Client) do(ctx context.Context, method, path string, in, out any, idempotent bool) error {
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("api: encode %s %s: %w", method, clip(path), err)
		}
	}
	start := time.Now()
	deadline := start.Add(c.RetryFor)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	var tried tries
	unreachable := func(err error, maybeApplied bool) error {
		return &UnreachableError{Method: method, Path: path, Tried: tried.list, Elapsed: time.Since(start), MaybeApplied: maybeApplied, Err: err}
	}
	backoff := 50 * time.Millisecond
	var lastErr error
	for {
		for _, base := range c.order() {
			target := base
			for hop := 0; hop < 4; hop++ {
				next, connected, timedOut, err := c.attempt(ctx, method, target, path, body, out)
				if err == nil {
					c.setLeader(target)
					return nil
				}
				var apiErr *Error
				isAPI := errors.As(err, &apiErr)
				if ctx.Err() != nil && !isAPI {
					what := "could not be reached"
					if connected {
						what = "accepted the connection but sent no reply"
					}
					tried.add(target, what+" before the call ended ("+ctx.Err().Error()+")")
					return unreachable(ctx.Err(), false)
				}
				switch {
				case next != "":
					lastErr = err
					target = next
					continue // follow the redirect to the leader
				case isAPI && apiErr.Code == CodeNotLeader:
					lastErr = err
					tried.add(target, outcome(err, connected, false, 0))
				case isAPI:
					if c.Leader() == "" {
						c.setLeader(target)
					}
					return err // a real answer from the leader
				default: // transport
					lastErr = err
					tried.add(target, outcome(err, connected, timedOut, c.answerTimeout()))
					if !idempotent && !retrySafe(err) {
						return unreachable(err, true)
					}
					if target == c.Leader() {
						c.setLeader("")
					}
				}
				break
			}
		}
		if time.Now().Add(backoff).After(deadline) {
			return unreachable(lastErr, false)
		}
		select {
		case <-ctx.Done():
			return unreachable(ctx.Err(), false)
		case <-time.After(backoff):
		}
		if backoff < time.Second {
			backoff *= 2
		}
	}
}

func (c *Client) answerTimeout() time.Duration {
	if c.AnswerTimeout > 0 {
		return c.AnswerTimeout
	}
	return 15 * time.Second
}

// attempt is one exchange with base, bounded by AnswerTimeout. connected
// tells whether a TCP connection was made (so a timeout means the master
// accepted and did not answer); timedOut that AnswerTimeout ran out.
func (c *Client) attempt(ctx context.Context, method, base, path string, body []byte, out any) (next string, connected, timedOut bool, err error) {
	actx, cancel := context.WithTimeout(ctx, c.answerTimeout())
	defer cancel()
	var got atomic.Bool
	actx = httptrace.WithClientTrace(actx, &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) { got.Store(true) },
	})
	next, err = c.once(actx, method, base, path, body, out)
	timedOut = err != nil && ctx.Err() == nil && actx.Err() == context.DeadlineExceeded
	return next, got.Load(), timedOut, err
}

// once performs a single HTTP exchange with base. It returns the leader's
// base URL to go to next when the answer is a redirect.
func (c *Client) once(ctx context.Context, method, base, path string, body []byte, out any) (string, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, rd)
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: %w", method, base, clip(path), err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: %w", method, base, clip(path), unwrapURL(err))
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return "", fmt.Errorf("api: %s %s%s: read reply: %w", method, base, clip(path), err)
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		if out != nil && len(data) > 0 {
			if err := json.Unmarshal(data, out); err != nil {
				return "", &Error{Code: CodeInternal, Message: fmt.Sprintf("decode reply of %s %s: %v", method, clip(path), err), Status: resp.StatusCode}
			}
		}
		return "", nil
	}
	apiErr := &Error{}
	if json.Unmarshal(data, apiErr) != nil || apiErr.Code == "" {
		// Not the API's error body: a proxy, another service on that
		// port, or a master too old for this endpoint. Name who said what.
		msg := fmt.Sprintf("%s answered %s %s with %s", strings.TrimPrefix(strings.TrimPrefix(base, "http://"), "https://"), method, clip(path), resp.Status)
		body := strings.Join(strings.Fields(string(data)), " ")
		if body != "" {
			msg += ": " + clip(body)
		}
		code := CodeInternal
		if strings.Contains(body, "HTTP request to an HTTPS server") {
			// Go's TLS listener answers a plain client this way: say what to do.
			code = CodeForbidden
			msg = fmt.Sprintf("%s requires TLS: give --tls-cert, --tls-key and --tls-ca (it answered a plain request with %s)",
				strings.TrimPrefix(strings.TrimPrefix(base, "http://"), "https://"), resp.Status)
		}
		apiErr = &Error{Code: code, Message: msg}
	}
	apiErr.Status = resp.StatusCode
	apiErr.Message = clipWords(apiErr.Message)
	if resp.StatusCode == http.StatusTemporaryRedirect || resp.StatusCode == http.StatusPermanentRedirect {
		if loc := resp.Header.Get("Location"); loc != "" {
			if u, err := url.Parse(loc); err == nil && u.Host != "" {
				return c.scheme(u.Scheme + "://" + u.Host), apiErr
			}
		}
		if apiErr.Leader != "" {
			return c.scheme(normalize(apiErr.Leader)), apiErr
		}
	}
	return "", apiErr
}

// scheme keeps a TLS client on https whatever a master's redirect says.
func (c *Client) scheme(base string) string {
	if c.tls != nil {
		return toHTTPS(base)
	}
	return base
}

// unwrapURL drops net/http's *url.Error, whose text repeats the method and
// URL that the caller's message already names.
func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func esc(name string) string { return url.PathEscape(name) }

// NewRequestID returns a random id for CreateVolumeRequest.RequestID.
func NewRequestID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// CreateVolume creates a volume. Retries (also across a leader change) are
// safe: the request carries a RequestID, filled here when empty.
func (c *Client) CreateVolume(ctx context.Context, req CreateVolumeRequest) (*VolumeInfo, error) {
	if req.RequestID == "" {
		req.RequestID = NewRequestID()
	}
	var out VolumeInfo
	if err := c.do(ctx, http.MethodPost, "/v1/volumes", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// ListVolumes lists every volume, sorted by name.
func (c *Client) ListVolumes(ctx context.Context) ([]VolumeInfo, error) {
	var out []VolumeInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes", nil, &out, true); err != nil {
		return nil, err
	}
	return out, nil
}

// VolumeInfo returns one volume.
func (c *Client) VolumeInfo(ctx context.Context, name string) (*VolumeInfo, error) {
	var out VolumeInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name), nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// DeleteVolume deletes a volume (code not_found when it does not exist).
func (c *Client) DeleteVolume(ctx context.Context, name string) error {
	return c.do(ctx, http.MethodDelete, "/v1/volumes/"+esc(name), nil, nil, false)
}

// ExpandVolume grows a volume to size bytes (never shrinks; same size is a
// no-op) and waits for the two-phase expand to end: the volume once every
// member committed, or an *Error with Code CodeExpandCancelled naming the
// member that made it cancel (every member keeps the old size).
func (c *Client) ExpandVolume(ctx context.Context, name string, size int64) (*VolumeInfo, error) {
	var out VolumeInfo
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(name)+"/expand", ExpandRequest{SizeBytes: size}, &out, true); err != nil {
		return nil, err
	}
	for out.Expand != nil && out.Expand.Phase == ExpandPreparing {
		id := out.Expand.ID
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("api: expand %s: waiting for the outcome of expand %d: %w", name, id, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
		info, err := c.VolumeInfo(ctx, name)
		if err != nil {
			return nil, err
		}
		if info.Expand == nil || info.Expand.ID != id {
			return nil, Errorf(CodeInternal, "expand of %q: expand %d vanished from the registry", name, id)
		}
		if e := info.Expand.Err(name); e != nil {
			return nil, e
		}
		out = *info
	}
	return &out, nil
}

// PlanVolume is the dry run of CreateVolume (resolution and placement).
func (c *Client) PlanVolume(ctx context.Context, req CreateVolumeRequest) (*PlanResponse, error) {
	var out PlanResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/plan", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// ResolveVolume is the dry run of preset resolution.
func (c *Client) ResolveVolume(ctx context.Context, req CreateVolumeRequest) (*ResolveResponse, error) {
	var out ResolveResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/resolve", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Preflight evaluates every promotion candidate of a volume (read only).
func (c *Client) Preflight(ctx context.Context, name string) (*PreflightResponse, error) {
	var out PreflightResponse
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name)+"/preflight", nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Promote promotes a replica. Not retried after a request may have been
// delivered; set req.Epoch to make a manual retry safe.
func (c *Client) Promote(ctx context.Context, name string, req PromoteRequest) (*PromoteResponse, error) {
	var out PromoteResponse
	if err := c.do(ctx, http.MethodPost, "/v1/volumes/"+esc(name)+"/promote", req, &out, req.Epoch != 0); err != nil {
		return nil, err
	}
	return &out, nil
}

// PrimaryOf returns where a volume is served (for attach clients). Code
// no_primary when the volume currently has none.
func (c *Client) PrimaryOf(ctx context.Context, name string) (*PrimaryInfo, error) {
	var out PrimaryInfo
	if err := c.do(ctx, http.MethodGet, "/v1/volumes/"+esc(name)+"/primary", nil, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// PrimaryNBD is PrimaryOf for a client about to connect over NBD: an
// unknown volume is named as such, and a primary without an NBD address
// is an error.
func (c *Client) PrimaryNBD(ctx context.Context, name string) (*PrimaryInfo, error) {
	p, err := c.PrimaryOf(ctx, name)
	if err != nil {
		if IsCode(err, CodeNotFound) {
			return nil, fmt.Errorf("unknown volume %s: %w", QuoteName(name), err)
		}
		return nil, err
	}
	if p.NBDAddr == "" {
		return nil, fmt.Errorf("volume %s: primary %s has no NBD address", QuoteName(name), p.ServerID)
	}
	return p, nil
}

// Heartbeat sends a server heartbeat to the leader. Give it a context whose
// deadline is shorter than the lease TTL.
func (c *Client) Heartbeat(ctx context.Context, req HeartbeatRequest) (*HeartbeatResponse, error) {
	var out HeartbeatResponse
	if err := c.do(ctx, http.MethodPost, "/v1/heartbeat", req, &out, true); err != nil {
		return nil, err
	}
	return &out, nil
}

// Servers lists the registered volume servers.
func (c *Client) Servers(ctx context.Context) ([]ServerInfo, error) {
	var out []ServerInfo
	if err := c.do(ctx, http.MethodGet, "/v1/servers", nil, &out, true); err != nil {
		return nil, err
	}
	return out, nil
}

// Join asks the cluster's leader to add a master as a voter.
func (c *Client) Join(ctx context.Context, req JoinRequest) error {
	return c.do(ctx, http.MethodPost, "/v1/raft/join", req, nil, true)
}

// Status asks one specific master (base "host:port") about itself, without
// following the leader.
func (c *Client) Status(ctx context.Context, addr string) (*StatusResponse, error) {
	var out StatusResponse
	if _, err := c.once(ctx, http.MethodGet, c.scheme(normalize(addr)), "/v1/status", nil, &out); err != nil {
		return nil, err
	}
	return &out, nil
}
