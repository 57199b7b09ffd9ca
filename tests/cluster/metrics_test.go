package cluster

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tlsauth"
)

// startServerMetrics starts a volume server that also serves /metrics on
// a port of its own; it returns that address.
func (c *cluster) startServerMetrics(id string) string {
	maddr := freePort(c.t)
	nbdAddr := freePort(c.t)
	c.mu.Lock()
	c.servers[id] = &proc{name: id, log: filepath.Join(c.dir, id+".log"),
		args: []string{"server", "--id", id, "--data", filepath.Join(c.dir, id),
			"--master", strings.Join(c.mAPI, ","), "--listen", freePort(c.t), "--nbd", nbdAddr, "--metrics", maddr}}
	c.nbd[id] = nbdAddr
	c.mu.Unlock()
	c.startServer(id)
	return maddr
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s: %v", addr, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %d %v", addr, resp.StatusCode, err)
	}
	return string(b)
}

// promQuery asks Prometheus's HTTP API for an instant vector and returns
// the values by their label set.
func promQuery(prom, q string) (map[string]float64, error) {
	resp, err := http.Get("http://" + prom + "/api/v1/query?query=" + url.QueryEscape(q))
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var r struct {
		Status string `json:"status"`
		Error  string `json:"error"`
		Data   struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"`
			} `json:"result"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return nil, err
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("query %s: %s", q, r.Error)
	}
	out := map[string]float64{}
	for _, s := range r.Data.Result {
		v, _ := strconv.ParseFloat(fmt.Sprint(s.Value[1]), 64)
		out[fmt.Sprint(s.Metric)] = v
	}
	return out, nil
}

// TestPrometheusScrapesCluster: a real Prometheus scrapes a master and two
// servers; under qemu-io load the write rate it computes moves; every
// /metrics passes promtool check metrics; the shipped alert rules pass
// promtool check rules, and every blockd_ metric the rules and the
// dashboard name is exported.
func TestPrometheusScrapesCluster(t *testing.T) {
	promBin := testenv.RequireTool(t, "prometheus")
	promtool := testenv.RequireTool(t, "promtool")
	c := newCluster(t)
	c.startMaster()
	m1 := c.startServerMetrics("s1")
	m2 := c.startServerMetrics("s2")
	if _, err := c.cli("volume", "create", "m", "--size", "64MiB", "--rf", "2", "--durability", "sync_all"); err != nil {
		t.Fatal(err)
	}
	info := c.waitHealthy("m", 30*time.Second)
	nbdAddr := c.nbd[info.Primary.ServerID]
	c.waitExport(nbdAddr, "m")

	docs := filepath.Join("..", "..", "docs", "monitoring")
	rules, err := filepath.Abs(filepath.Join(docs, "alerts.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", rules).CombinedOutput(); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}

	promAddr := freePort(t)
	cfg := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: [%q]
scrape_configs:
  - job_name: blockd-master
    static_configs: [{targets: [%q]}]
  - job_name: blockd-server
    static_configs: [{targets: [%q, %q]}]
`, rules, c.mAPI[0], m1, m2)
	cfgFile := filepath.Join(c.dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	plog, err := os.Create(filepath.Join(c.dir, "prometheus.log"))
	if err != nil {
		t.Fatal(err)
	}
	prom := exec.Command(promBin, "--config.file", cfgFile, "--storage.tsdb.path", filepath.Join(c.dir, "tsdb"),
		"--web.listen-address", promAddr)
	prom.Stdout, prom.Stderr = plog, plog
	if err := prom.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = prom.Process.Kill(); _ = prom.Wait(); plog.Close() })

	c.waitFor("prometheus scraping every target", 60*time.Second, func() error {
		up, err := promQuery(promAddr, "up")
		if err != nil {
			return err
		}
		n := 0
		for _, v := range up {
			if v == 1 {
				n++
			}
		}
		if n != 3 {
			return fmt.Errorf("up: %v", up)
		}
		return nil
	})

	// Load: 1 MiB writes with flushes for a few seconds.
	stop := time.Now().Add(6 * time.Second)
	for i := 0; time.Now().Before(stop); i++ {
		off := (i % 32) << 20
		if out, err := c.qemuIO(nbdAddr, "m", fmt.Sprintf("write -P 0x%02x %d 1M", i%251+1, off), "flush"); err != nil {
			t.Fatalf("qemu-io: %v\n%s", err, out)
		}
	}
	q := `sum(rate(blockd_volume_request_bytes_total{volume="m",op="write"}[15s]))`
	var rate float64
	c.waitFor("a write rate in Prometheus", 30*time.Second, func() error {
		r, err := promQuery(promAddr, q)
		if err != nil {
			return err
		}
		for _, v := range r {
			rate = v
		}
		if rate <= 0 {
			return fmt.Errorf("%s = %v", q, r)
		}
		return nil
	})
	t.Logf("Prometheus: %s = %.0f bytes/s", q, rate)
	for _, q := range []string{
		`sum(rate(blockd_replica_wal_sent_bytes_total{volume="m"}[15s]))`,
		`max(blockd_master_is_leader)`,
		`sum(blockd_master_volumes{health="healthy"})`,
	} {
		c.waitFor(q+" > 0", 30*time.Second, func() error {
			r, err := promQuery(promAddr, q)
			if err != nil {
				return err
			}
			for _, v := range r {
				if v > 0 {
					t.Logf("Prometheus: %s = %v", q, v)
					return nil
				}
			}
			return fmt.Errorf("%s = %v", q, r)
		})
	}

	// promtool check metrics on each /metrics, and the names the rules and
	// the dashboard use.
	exported := map[string]bool{}
	nameRE := regexp.MustCompile(`(?m)^# TYPE (blockd_[a-z0-9_]+) (\w+)`)
	for _, addr := range []string{c.mAPI[0], m1, m2} {
		text := scrape(t, addr)
		cmd := exec.Command(promtool, "check", "metrics")
		cmd.Stdin = strings.NewReader(text)
		if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("promtool check metrics %s: %v\n%s", addr, err, out)
		}
		for _, mm := range nameRE.FindAllStringSubmatch(text, -1) {
			exported[mm[1]] = true
			if mm[2] == "histogram" {
				for _, s := range []string{"_bucket", "_sum", "_count"} {
					exported[mm[1]+s] = true
				}
			}
		}
	}
	// Present only while a transfer runs or a ublk device is hosted.
	transient := regexp.MustCompile(`^blockd_(replica_transfer_|ublk_requests_in_flight|ublk_errors_total)`)
	used := map[string]bool{}
	useRE := regexp.MustCompile(`blockd_[a-z0-9_]+`)
	for _, f := range []string{"alerts.yml", "grafana-dashboard.json"} {
		b, err := os.ReadFile(filepath.Join(docs, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == "grafana-dashboard.json" && !json.Valid(b) {
			t.Errorf("%s is not valid JSON", f)
		}
		for _, n := range useRE.FindAllString(string(b), -1) {
			used[n] = true
		}
	}
	var missing []string
	for n := range used {
		if !exported[n] && !transient.MatchString(n) && n != "blockd_overview" {
			missing = append(missing, n)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("docs/monitoring names metrics nobody exports: %v", missing)
	}
	t.Logf("%d blockd_ metric families exported; %d named by the rules and dashboard", len(exported), len(used))
}

// TestMetricsTLS: with TLS the master's /metrics and a server's --metrics
// listener answer HTTPS to a cluster client certificate, and nothing to a
// client without one.
func TestMetricsTLS(t *testing.T) {
	c := startTLSCluster(t)
	s1 := c.servers["s1"]
	s1.stop()
	maddr := freePort(t)
	s1.args = append(s1.args, "--metrics", maddr)
	s1.start(t)
	good := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: c.alice.ClientConfig(tlsauth.AnyOf(tlsauth.KindMaster, tlsauth.KindServer))}}
	noCert := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: c.alice.Pool}}}
	for _, addr := range []string{c.mAPI[0], maddr} {
		url := "https://" + addr + "/metrics"
		c.waitFor(url, 30*time.Second, func() error {
			resp, err := good.Get(url)
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "blockd_") {
				return fmt.Errorf("%d: %.200s", resp.StatusCode, b)
			}
			return nil
		})
		if resp, err := noCert.Get(url); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.Contains(string(b), "blockd_") {
				t.Errorf("%s: metrics served without a client certificate", url)
			}
		}
		if resp, err := http.Get("http://" + addr + "/metrics"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				t.Errorf("%s: metrics served in the clear", addr)
			}
		}
	}
}
