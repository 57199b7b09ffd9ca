package main

import (
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/master"
	"github.com/blockd/blockd/tlsauth"
)

// `blockd master`: a standalone master (raft member). `blockd serve` embeds
// one through master.Start instead.
func init() {
	register(&cli.Command{
		Name:  "master",
		Usage: "run a master: the raft-replicated volume registry, heartbeats, leases and failover",
		Description: "Single node (default): blockd master --data DIR --api ADDR\n" +
			"Three nodes, all started with the same --peers (each entry APIADDR=RAFTADDR, this one included):\n" +
			"  blockd master --data d1 --api 127.0.0.1:9333 --raft 127.0.0.1:9433 \\\n" +
			"    --peers 127.0.0.1:9333=127.0.0.1:9433,127.0.0.1:9334=127.0.0.1:9434,127.0.0.1:9335=127.0.0.1:9435\n" +
			"Or grow a running cluster: blockd master --data d4 --api ADDR --raft ADDR --join EXISTING_API_ADDR\n" +
			"A master's raft ID is its --api address: keep it fixed across restarts.",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "data", Value: "./blockd-master", Usage: "data directory (raft log, snapshots)"},
			&cli.StringFlag{Name: "api", Value: api.DefaultMaster, Usage: "HTTP API listen address (also this master's raft ID)"},
			&cli.StringFlag{Name: "raft", Usage: "raft TCP address (required with --peers/--join)"},
			&cli.StringFlag{Name: "join", Usage: "API address of a member of an existing cluster to join"},
			&cli.StringFlag{Name: "peers", Usage: "every member of a new cluster: APIADDR=RAFTADDR,..."},
			&cli.DurationFlag{Name: "lease-ttl", Value: 5 * time.Second, Usage: "primary lease granted per heartbeat"},
			&cli.DurationFlag{Name: "lease-margin", Value: 250 * time.Millisecond, Usage: "extra wait after a lost primary's lease before promoting"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug | info | warn | error"},
			logFormatFlag(),
			overprovisionFlag(),
			tlsFlags()[0], tlsFlags()[1], tlsFlags()[2], insecureFlag,
		},
		Action: runMaster,
	})
}

func runMaster(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return fmt.Errorf("master: unexpected arguments %s", api.QuoteName(strings.Join(c.Args().Slice(), " ")))
	}
	log, err := daemonLogger(c)
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	creds, err := loadTLSKind(c, tlsauth.KindMaster)
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	if err := checkPlain(c, "master", creds, "api", "raft"); err != nil {
		return err
	}
	over, err := overprovision(c)
	if err != nil {
		return fmt.Errorf("master: %w", err)
	}
	var peers []string
	if p := c.String("peers"); p != "" {
		peers = api.ParseAddrs(p)
	}
	m, err := master.Start(master.Config{
		DataDir:     c.String("data"),
		APIAddr:     c.String("api"),
		RaftAddr:    c.String("raft"),
		Bootstrap:   len(peers) == 0 && c.String("join") == "",
		Peers:       peers,
		Join:        c.String("join"),
		LeaseTTL:    c.Duration("lease-ttl"),
		LeaseMargin: c.Duration("lease-margin"),
		Logger:      log,

		OverprovisionPercent: over,
		TLS:                  creds,
	})
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "blockd master %s: API http://%s, data %s\n", m.ID(), m.APIAddr(), c.String("data"))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	<-sig
	signal.Stop(sig)
	return m.Close()
}

// overprovisionFlag is the placement policy for sparse volumes (master and
// serve).
func overprovisionFlag() cli.Flag {
	return &cli.IntFlag{Name: "overprovision", Value: master.DefaultOverprovisionPercent, Usage: "PERCENT: a server takes volumes whose sizes plus WALs add up to this percentage of its capacity (volumes are sparse; above 100 a full disk fails writes instead of creates)"}
}

func overprovision(c *cli.Context) (int, error) {
	n := c.Int("overprovision")
	if n < 1 || n > 10000 {
		return 0, fmt.Errorf("--overprovision %d: want a percentage from 1 to 10000 (default %d)", n, master.DefaultOverprovisionPercent)
	}
	return n, nil
}
