package replication

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/blockd/blockd/tlsauth"
)

// BenchmarkReplicationTLSTax: the same 4k randwrite QD32 RF=2 sync_all
// workload as BenchmarkReplicationTax, with the replication link plain and
// over mutual TLS (the listener and dialer blockd's server uses, with
// the replica's certificate ID checked), alternating in one run; the
// median TLS/plain ratio is reported.
func BenchmarkReplicationTLSTax(b *testing.B) {
	const size = 1 << 30
	ops := 40000
	rounds := 3
	if s := os.Getenv("BLOCKD_BENCH_ROUNDS"); s != "" {
		fmt.Sscan(s, &rounds)
	}
	dir := b.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Servers: []string{testPrimaryID, "r"}}); err != nil {
		b.Fatal(err)
	}
	load := func(id string) *tlsauth.Creds {
		d := filepath.Join(dir, "servers", id)
		c, err := tlsauth.Load(filepath.Join(d, "server-cert.pem"), filepath.Join(d, "server-key.pem"), filepath.Join(d, "ca-cert.pem"))
		if err != nil {
			b.Fatal(err)
		}
		return c
	}
	pc, rc := load(testPrimaryID), load("r")
	run := func(useTLS bool) float64 {
		pv, rv := benchVol(b, size), benchVolIn(b, replicaBenchDir(b), size)
		log := quietLog()
		rec := NewReceiver(ReceiverConfig{ServerID: "r", Logger: log, Lookup: func(string) (ReplicaTarget, bool) {
			return ReplicaTarget{Vol: rv, Epoch: 1, PrimaryID: testPrimaryID}, true
		}})
		ln := mustListen(b)
		cfg := PrimaryConfig{Volume: "bench", ServerID: testPrimaryID, Epoch: 1, Durability: SyncAll,
			Replicas: []Peer{{"r", ln.Addr().String()}}, Logger: log}
		var sl net.Listener = ln
		if useTLS {
			sl = tlsauth.NewListener(ln, rc.ServerConfig(tlsauth.Expect(tlsauth.KindServer, "")))
			cli := pc.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "r"))
			cfg.Dial = func(ctx context.Context, addr string) (net.Conn, error) {
				return tlsauth.Dial(ctx, &net.Dialer{}, addr, cli)
			}
		}
		go rec.Serve(sl)
		p, err := NewPrimary(pv, cfg)
		if err != nil {
			b.Fatal(err)
		}
		benchWaitInSync(b, p)
		randWriteQD32(b, p, 2000)
		iops := randWriteQD32(b, p, ops)
		p.Close()
		rec.Close()
		pv.Close()
		rv.Close()
		return iops
	}
	var ratios, plains, tlss []float64
	for i := 0; i < b.N*rounds; i++ {
		var plain, withTLS float64
		if i%2 == 0 {
			plain, withTLS = run(false), run(true)
		} else {
			withTLS, plain = run(true), run(false)
		}
		fmt.Printf("round %d: RF=2 sync_all plain %.0f IOPS, over TLS %.0f IOPS, ratio %.2f\n", i, plain, withTLS, withTLS/plain)
		ratios, plains, tlss = append(ratios, withTLS/plain), append(plains, plain), append(tlss, withTLS)
	}
	sort.Float64s(ratios)
	sort.Float64s(plains)
	sort.Float64s(tlss)
	med := func(x []float64) float64 { return x[len(x)/2] }
	b.ReportMetric(med(plains), "plain_iops")
	b.ReportMetric(med(tlss), "tls_iops")
	b.ReportMetric(med(ratios), "tls/plain")
	fmt.Printf("replication TLS tax (median of %d rounds): plain %.0f IOPS, TLS %.0f IOPS, ratio %.2f\n", len(ratios), med(plains), med(tlss), med(ratios))
}
