package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/master"
	"github.com/blockd/blockd/server"
	"github.com/blockd/blockd/tlsauth"
	"github.com/blockd/blockd/vfs"
)

func init() {
	register(&cli.Command{
		Name:  "serve",
		Usage: "the embedded default: a single-node master and one volume server in one process, exporting vol0",
		Description: "Creates the volume on first start (default vol0, 1 GiB) and exports it over NBD.\n" +
			"Ctrl-C or SIGTERM flushes every volume and exits 0.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Value: "./blockd-data", Usage: "data directory"},
			&cli.StringFlag{Name: "nbd", Value: "127.0.0.1:10809", Usage: "NBD listen address (host:port or unix:/path)"},
			&cli.StringFlag{Name: "api", Value: "127.0.0.1:9333", Usage: "master API listen address"},
			&cli.StringFlag{Name: "volume", Value: "vol0:1GiB", Usage: "volume created on first start, NAME:SIZE"},
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:0", Usage: "replication listen address of the embedded server"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error (of the log file; the terminal shows warnings and errors)"},
			&cli.BoolFlag{Name: "no-server-metrics", Usage: "leave the volume server's metrics (the per-request I/O meters among them) out of /metrics; for measuring their cost"},
			logFormatFlag(),
			&cli.StringFlag{Name: "log-file", Usage: "log file (default DATA/blockd.log); - logs everything to the terminal instead"},
			overprovisionFlag(),
			directIOFlag,
			tlsFlags()[0], tlsFlags()[1], tlsFlags()[2], insecureFlag,
		},
		Action: serve,
	})
	register(&cli.Command{
		Name:  "server",
		Usage: "run a volume server that takes its volumes and roles from the master",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Required: true, Usage: "data directory"},
			&cli.StringFlag{Name: "master", Value: api.DefaultMaster, Usage: "master API address(es), comma-separated"},
			&cli.StringFlag{Name: "id", Required: true, Usage: "stable server ID (the master's name for this server)"},
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:0", Usage: "replication listen address"},
			&cli.StringFlag{Name: "nbd", Value: "127.0.0.1:10809", Usage: "NBD listen address (host:port or unix:/path)"},
			&cli.StringFlag{Name: "advertise", Usage: "replication address other servers use (default: --listen)"},
			&cli.StringFlag{Name: "advertise-nbd", Usage: "NBD address clients use (default: --nbd)"},
			&cli.StringFlag{Name: "http", Usage: "admin API listen address (snapshots, images; HTTPS with the --tls-* credentials); none when empty"},
			&cli.StringFlag{Name: "advertise-http", Usage: "admin API address clients use (default: --http)"},
			&cli.StringFlag{Name: "capacity", Usage: "capacity to report, e.g. 100GiB (default: the filesystem's)"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			logFormatFlag(),
			directIOFlag,
			tlsFlags()[0], tlsFlags()[1], tlsFlags()[2], insecureFlag,
		},
		Action: runServer,
	})
}

// directIOFlag: large writes' data around the page cache (server.Config.DirectIO).
var directIOFlag = &cli.BoolFlag{Name: "direct-io", Usage: "write the data of large aligned writes with O_DIRECT: less server CPU per byte and no second copy of guest data in the server's page cache, but reads of that data come from the disk"}

// parseVolumeSpec splits NAME:SIZE (human units) and checks both parts,
// so that a bad --volume fails before anything starts.
func parseVolumeSpec(spec string) (string, int64, error) {
	name, sz, ok := strings.Cut(spec, ":")
	if !ok || name == "" {
		return "", 0, fmt.Errorf("--volume %s: want NAME:SIZE, e.g. vol0:1GiB", api.QuoteName(spec))
	}
	if err := checkVolumeName(name); err != nil {
		return "", 0, fmt.Errorf("--volume: %w", err)
	}
	n, err := parseSize("--volume size", sz)
	if err != nil {
		return "", 0, err
	}
	return name, n, nil
}

func serve(c *cli.Context) error {
	data := c.String("data")
	log, logPath, closeLog, err := serveLogger(c, data)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer closeLog()
	volName, volSize, err := parseVolumeSpec(c.String("volume"))
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	over, err := overprovision(c)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	creds, err := loadTLSKind(c, tlsauth.KindServer)
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if creds != nil && creds.ID.Name != serveServerID {
		return fmt.Errorf("serve: --tls-cert is for %s; serve's embedded server is %q: use blockd tls init --server %s", creds.ID, serveServerID, serveServerID)
	}
	if err := checkPlain(c, "serve", creds, "nbd", "api", "listen"); err != nil {
		return err
	}
	// The whole data directory is locked before the master opens its raft
	// store, so a second serve fails at once with a clear error.
	lock, err := server.LockDir(data)
	if err != nil {
		return err
	}
	defer lock.Release()

	m, err := master.Start(master.Config{DataDir: filepath.Join(data, "master"), APIAddr: c.String("api"), Logger: log, TLS: creds,
		OverprovisionPercent: over})
	if err != nil {
		return fmt.Errorf("start master: %w", err)
	}
	defer m.Close()
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := m.WaitLeader(ctx); err != nil {
		return fmt.Errorf("master: %w", err)
	}
	ublkWait, err := ublkRecoveryWait()
	if err != nil {
		return err
	}
	listen := c.String("listen")
	addrFile := filepath.Join(data, "server", "listen-addr")
	if !c.IsSet("listen") {
		listen = stableListen(addrFile, listen)
	}
	srv, err := server.New(server.Config{DataDir: filepath.Join(data, "server"), ServerID: serveServerID, TLS: creds, EmbeddedMaster: creds != nil,
		Listen: listen, NBD: c.String("nbd"), DeferNBD: true, Masters: []string{m.APIAddr()}, Logger: log,
		Metrics:          serveMetrics(c, m), // one /metrics on the API address for both
		UblkRecoveryWait: ublkWait, AdvertiseHTTP: m.APIAddr(), DirectIO: c.Bool("direct-io")})
	if err != nil {
		return err
	}
	defer srv.Close()
	// The server's admin API (snapshots, images) shares the master's
	// listener, TLS and client checks: the one API address serves both.
	m.MountServerAPI(srv.HTTPHandler())
	if !c.IsSet("listen") {
		// Best effort: a lost file only costs the next start a new port.
		if err := vfs.WriteFileAtomic(vfs.Default, addrFile, []byte(srv.Addr()+"\n"), 0o644); err != nil {
			log.Warn("listen_addr_not_saved", "file", addrFile, "err", err)
		}
	}

	client := api.NewClient([]string{m.APIAddr()})
	if creds != nil {
		// The embedded master presents the same (server) certificate.
		client = api.NewClientTLS([]string{m.APIAddr()}, creds.ClientConfig(tlsauth.Expect(tlsauth.KindServer, serveServerID)))
	}
	if err := ensureVolume(ctx, client, volName, volSize); err != nil {
		return err
	}
	if err := waitServing(ctx, srv, volName); err != nil {
		return err
	}
	srv.StartNBD()
	printAttachHelp(srv.NBDAddr(), m.APIAddr(), volName, volSize, creds != nil)
	if logPath != "" {
		fmt.Printf("Logs: %s (warnings and errors also here); metrics: http://%s/metrics\n", logPath, m.APIAddr())
	}

	<-ctx.Done()
	fmt.Fprintln(os.Stderr, "blockd: shutting down: draining NBD connections and flushing volumes")
	if err := srv.Close(); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	return m.Close()
}

// ensureVolume creates the embedded volume on first start (RF 1: there is
// one server).
func ensureVolume(ctx context.Context, client *api.Client, name string, size int64) error {
	info, err := client.VolumeInfo(ctx, name)
	if err == nil {
		if info.SizeBytes != size {
			fmt.Fprintf(os.Stderr, "blockd: volume %s exists with size %s; --volume size %s ignored\n",
				name, humanize.IBytes(uint64(info.SizeBytes)), humanize.IBytes(uint64(size)))
		}
		return nil
	}
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeNotFound {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	// The server must have registered before placement can choose it: the
	// create is retried only while placement has not heard from it; any
	// other refusal (a disk too small, say) is final and printed at once.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = client.CreateVolume(ctx, api.CreateVolumeRequest{Name: name, SizeBytes: size, RF: 1,
			Durability: api.DurabilityBestEffort, Preset: "general"})
		if err == nil || !notRegisteredYet(err) || time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("create volume %s: %w", name, err)
	}
	return nil
}

// notRegisteredYet: a create refused only because no server has been heard
// from yet (none registered, or every one not_alive).
func notRegisteredYet(err error) bool {
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Code != api.CodeInsufficientServers {
		return false
	}
	for _, c := range ae.Placement {
		if c.Rejection != master.RejectNotAlive {
			return false
		}
	}
	return true
}

func waitServing(ctx context.Context, srv *server.Server, name string) error {
	deadline := time.Now().Add(60 * time.Second)
	for !srv.Serving(name) {
		if time.Now().After(deadline) {
			return fmt.Errorf("volume %s: not serving after 60s (see the log above)", name)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

// serveServerID is the ID of serve's embedded server (and the name its
// TLS certificate must carry).
const serveServerID = "local"

func printAttachHelp(nbdAddr, apiAddr, vol string, size int64, tls bool) {
	if tls {
		fmt.Printf(`blockd is serving volume %[3]s (%[4]s) over TLS (client certificates required)
  NBD URI:   nbds://%[1]s/%[3]s?tls-certificates=DIR/clients/NAME
  master:    https://%[2]s/v1/volumes/%[3]s

Attach it (with a client certificate from blockd tls init --client NAME):
  kernel:    blockd attach nbd %[3]s --master %[2]s --tls-cert C --tls-key K --tls-ca CA
  qemu:      qemu-img info --object tls-creds-x509,id=t0,endpoint=client,dir=DIR/clients/NAME \
               --image-opts driver=nbd,host=HOST,port=PORT,export=%[3]s,tls-creds=t0
  libnbd:    nbdinfo 'nbds://%[1]s/%[3]s?tls-certificates=DIR/clients/NAME'
Ctrl-C flushes every volume and exits.
`, nbdAddr, apiAddr, vol, humanize.IBytes(uint64(size)))
		return
	}
	uri := "nbd://" + nbdAddr + "/" + vol
	host, port := nbdAddr, "10809"
	if i := strings.LastIndex(nbdAddr, ":"); i >= 0 {
		host, port = nbdAddr[:i], nbdAddr[i+1:]
	}
	if p, ok := strings.CutPrefix(nbdAddr, "unix:"); ok {
		uri = "nbd+unix:///" + vol + "?socket=" + p
	}
	fmt.Printf(`blockd is serving volume %[3]s (%[4]s)
  NBD URI:   %[1]s
  master:    http://%[2]s/v1/volumes/%[3]s

Attach it:
  kernel:    blockd attach nbd %[3]s --master %[2]s
             nbd-client %[5]s %[6]s /dev/nbd0 -N %[3]s -b 4096 -C 2
  ublk:      blockd attach ublk %[3]s --master %[2]s   (served by this process, survives its restart)
  qemu:      qemu-img info %[1]s ; qemu-io -f raw %[1]s
  libnbd:    nbdinfo %[1]s ; nbdfuse /mnt/vol %[1]s &
Then: mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt
Ctrl-C flushes every volume and exits.
`, uri, apiAddr, vol, humanize.IBytes(uint64(size)), host, port)
}

func runServer(c *cli.Context) error {
	log, err := daemonLogger(c)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	var capacity int64
	if s := c.String("capacity"); s != "" {
		n, err := parseSize("--capacity", s)
		if err != nil {
			return fmt.Errorf("server: %w", err)
		}
		capacity = n
	}
	ctx, stop := signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
	defer stop()
	ublkWait, err := ublkRecoveryWait()
	if err != nil {
		return err
	}
	creds, err := loadTLSKind(c, tlsauth.KindServer)
	if err != nil {
		return fmt.Errorf("server: %w", err)
	}
	if err := checkPlain(c, "server", creds, "nbd", "listen", "http"); err != nil {
		return err
	}
	srv, err := server.New(server.Config{DataDir: c.String("data"), ServerID: c.String("id"), TLS: creds,
		Listen: c.String("listen"), NBD: c.String("nbd"), AdvertiseAddr: c.String("advertise"),
		AdvertiseNBD: c.String("advertise-nbd"), Masters: api.ParseAddrs(c.String("master")),
		HTTP: c.String("http"), AdvertiseHTTP: c.String("advertise-http"),
		CapacityBytes: capacity, Logger: log, UblkRecoveryWait: ublkWait, MetricsAddr: c.String("metrics"),
		DirectIO: c.Bool("direct-io")})
	if err != nil {
		return err
	}
	httpNote := ""
	if a := srv.HTTPAddr(); a != "" {
		httpNote = ", admin API on " + a
	}
	fmt.Printf("blockd server %s: NBD on %s, replication on %s%s, master %s\n", srv.ID(), srv.NBDAddr(), srv.Addr(), httpNote, c.String("master"))
	if a := srv.MetricsAddr(); a != "" {
		fmt.Printf("  metrics:   http://%s/metrics\n", a)
	}
	<-ctx.Done()
	return srv.Close()
}

// stableListen keeps serve's replication address across restarts: the
// master lets a known server's endpoint move only once the old one has
// been silent for a lease TTL (a forged heartbeat cannot redirect it), so
// a restart on a new random port would wait out that TTL before its
// heartbeats count. The port of the last run is reused while it is free;
// otherwise def (a random port) is.
func stableListen(file, def string) string {
	b, err := os.ReadFile(file)
	if err != nil {
		return def
	}
	addr := strings.TrimSpace(string(b))
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return def
	}
	l.Close()
	return addr
}

// serveMetrics is the registry the embedded server adds its metrics to:
// the master's, so one /metrics answers for both; nil with
// --no-server-metrics, which leaves out the per-request I/O meters (to
// measure what they cost: bench/metrics-cost.sh).
func serveMetrics(c *cli.Context, m *master.Master) *prometheus.Registry {
	if c.Bool("no-server-metrics") {
		return nil
	}
	return m.Registry()
}
