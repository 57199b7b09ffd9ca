package torture

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/api"
)

// The masters: one, or a raft cluster of three (each APIADDR=RAFTADDR in
// --peers), all on the host (the bridge address in a netLab). The
// servers reach each master through a masterProxy of their own, so the
// schedule can cut one server off from every master at once.

// startMasters starts n masters (1 or 3) and waits for a leader.
func (c *cluster) startMasters(n int, leaseTTL time.Duration) {
	host := "127.0.0.1"
	if c.lab != nil {
		host = c.lab.hostIP // where the namespaced servers reach it
	}
	var peers []string
	for i := 0; i < n; i++ {
		_, port, _ := net.SplitHostPort(freeAddr(c.t))
		c.mAPIs = append(c.mAPIs, net.JoinHostPort(host, port))
		c.mRaft = append(c.mRaft, freeAddr(c.t))
		peers = append(peers, c.mAPIs[i]+"="+c.mRaft[i])
	}
	for i := 0; i < n; i++ {
		args := []string{"master", "--data", filepath.Join(c.dir, fmt.Sprintf("master%d", i)), "--api", c.mAPIs[i],
			"--lease-ttl", leaseTTL.String()}
		if n > 1 {
			args = append(args, "--raft", c.mRaft[i], "--peers", strings.Join(peers, ","))
		}
		if c.lab != nil {
			args = append(args, "--insecure") // the bridge address is not loopback
		}
		name := fmt.Sprintf("master%d", i)
		if n == 1 {
			name = "master"
		}
		p := &proc{name: name, log: filepath.Join(c.dir, name+".log"), args: args}
		c.masters = append(c.masters, p)
		p.start(c.t)
	}
	c.mAPI = strings.Join(c.mAPIs, ",")
	c.client = api.NewClient(c.mAPIs)
	c.waitFor("master leader", 60*time.Second, func() error {
		_, err := c.leader(-1)
		return err
	})
}

// leader returns the index of the master that says it is the leader,
// skipping except (-1: none).
func (c *cluster) leader(except int) (int, error) {
	var states []string
	for i, a := range c.mAPIs {
		if i == except || !c.masters[i].running() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		st, err := c.client.Status(ctx, a)
		cancel()
		if err != nil {
			states = append(states, fmt.Sprintf("%s: %v", a, err))
			continue
		}
		if st.IsLeader {
			return i, nil
		}
		states = append(states, a+": "+st.State)
	}
	return -1, fmt.Errorf("no leader: %s", strings.Join(states, "; "))
}

// masterLinks gives server id its own masterProxy to every master and
// returns their addresses (its --master list).
func (c *cluster) masterLinks(id string) string {
	host := "127.0.0.1"
	if c.lab != nil {
		host = c.lab.hostIP
	}
	ml := &masterLink{}
	for _, a := range c.mAPIs {
		ml.proxies = append(ml.proxies, newMasterProxy(c.t, host, a))
	}
	// A master's redirect names the leader's real address: point it at
	// this server's proxy to that master instead, or the server would
	// follow it around the cut.
	rw := map[string]string{}
	for i, a := range c.mAPIs {
		rw[a] = ml.proxies[i].addr()
	}
	var addrs []string
	for _, p := range ml.proxies {
		p.setRewrite(rw)
		addrs = append(addrs, p.addr())
	}
	c.mproxy[id] = ml
	return strings.Join(addrs, ",")
}

// masterLink is one server's links to every master.
type masterLink struct{ proxies []*masterProxy }

func (ml *masterLink) setCut(cut bool) {
	for _, p := range ml.proxies {
		p.setCut(cut)
	}
}

// masterProxy is an HTTP relay in front of one master for one server.
// While cut, or when the master does not answer, it drops the client's
// connection without a reply (what a dead or unreachable master does to
// an HTTP client); it rewrites the leader named in a redirect.
type masterProxy struct {
	ln      net.Listener
	srv     *http.Server
	rp      *httputil.ReverseProxy
	mu      sync.Mutex
	cut     bool
	conns   map[net.Conn]struct{}
	rewrite map[string]string
}

func newMasterProxy(t testing.TB, host, target string) *masterProxy {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	p := &masterProxy{ln: ln, conns: map[net.Conn]struct{}{}}
	u := &url.URL{Scheme: "http", Host: target}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) { r.SetURL(u) },
		Transport: &http.Transport{
			DialContext:     (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
			MaxIdleConns:    4,
			IdleConnTimeout: 30 * time.Second,
		},
		ModifyResponse: func(resp *http.Response) error {
			loc := resp.Header.Get("Location")
			if loc == "" {
				return nil
			}
			lu, err := url.Parse(loc)
			if err != nil {
				return nil
			}
			p.mu.Lock()
			to, ok := p.rewrite[lu.Host]
			p.mu.Unlock()
			if ok {
				lu.Host = to
				resp.Header.Set("Location", lu.String())
			}
			return nil
		},
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) { drop(w) },
	}
	p.srv = &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			p.mu.Lock()
			cut := p.cut
			p.mu.Unlock()
			if cut {
				drop(w)
				return
			}
			p.rp.ServeHTTP(w, r)
		}),
		ConnState: func(nc net.Conn, st http.ConnState) {
			p.mu.Lock()
			defer p.mu.Unlock()
			switch st {
			case http.StateNew:
				if p.cut {
					nc.Close()
					return
				}
				p.conns[nc] = struct{}{}
			case http.StateClosed, http.StateHijacked:
				delete(p.conns, nc)
			}
		},
	}
	go func() { _ = p.srv.Serve(ln) }()
	t.Cleanup(func() { _ = p.srv.Close() })
	return p
}

// drop closes the client's connection without an answer.
func drop(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if nc, _, err := hj.Hijack(); err == nil {
			nc.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

func (p *masterProxy) addr() string { return p.ln.Addr().String() }

func (p *masterProxy) setRewrite(m map[string]string) {
	p.mu.Lock()
	p.rewrite = m
	p.mu.Unlock()
}

// setCut cuts (every connection closed, new ones dropped) or heals.
func (p *masterProxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for nc := range p.conns {
			nc.Close()
		}
	}
}
