package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// `blockd tls init`: the certificate helper (tlsauth.Init).
func init() {
	register(&cli.Command{
		Name:  "tls",
		Usage: "TLS credentials for a cluster",
		Subcommands: []*cli.Command{{
			Name:  "init",
			Usage: "create a cluster CA (or reuse the one in --dir) and certificates for masters, servers and clients",
			Description: "Writes DIR/ca-cert.pem and DIR/ca-key.pem (the CA; keep the key safe), and per identity:\n" +
				"  DIR/masters/NAME/{ca-cert,server-cert,server-key}.pem\n" +
				"  DIR/servers/ID/{ca-cert,server-cert,server-key}.pem    (the server ID is in the certificate)\n" +
				"  DIR/clients/NAME/{ca-cert,client-cert,client-key}.pem  (libnbd: nbds://HOST/VOL?tls-certificates=DIR/clients/NAME;\n" +
				"                                                          qemu: --object tls-creds-x509,id=t0,dir=DIR/clients/NAME,endpoint=client)\n" +
				"A certificate names its holder as CN=NAME and URI SAN blockd://KIND/NAME. Run it again to add\n" +
				"identities; an existing one is never overwritten.",
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "dir", Required: true, Usage: "directory for the CA and the certificates"},
				&cli.StringSliceFlag{Name: "master", Usage: "master name (repeat)"},
				&cli.StringSliceFlag{Name: "server", Usage: "volume server ID (repeat)"},
				&cli.StringSliceFlag{Name: "client", Usage: "client name (repeat)"},
				&cli.StringSliceFlag{Name: "host", Usage: "DNS name or IP address put into master and server certificates (repeat; default localhost, 127.0.0.1, ::1)"},
				&cli.IntFlag{Name: "days", Value: 365, Usage: "validity of the certificates in days"},
			},
			Action: tlsInit,
		}},
	})
}

func splitList(v []string) []string {
	var out []string
	for _, s := range v {
		out = append(out, api.ParseAddrs(s)...)
	}
	return out
}

func tlsInit(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return fmt.Errorf("tls init: unexpected arguments %s", api.QuoteName(strings.Join(c.Args().Slice(), " ")))
	}
	if c.Int("days") <= 0 {
		return fmt.Errorf("tls init: --days must be positive")
	}
	dir := c.String("dir")
	written, err := tlsauth.Init(dir, tlsauth.InitOptions{
		Masters:  splitList(c.StringSlice("master")),
		Servers:  splitList(c.StringSlice("server")),
		Clients:  splitList(c.StringSlice("client")),
		Hosts:    splitList(c.StringSlice("host")),
		Validity: durationDays(c.Int("days")),
	})
	if err != nil {
		return fmt.Errorf("tls init: %w", err)
	}
	fmt.Printf("CA: %s\n", filepath.Join(dir, "ca-cert.pem"))
	for _, w := range written {
		fmt.Printf("%-6s %-20s %s\n", w.ID.Kind, w.ID.Name, w.Dir)
	}
	if len(written) == 0 {
		fmt.Fprintln(os.Stderr, "blockd: tls init: no --master, --server or --client given; only the CA exists")
	}
	return nil
}

func durationDays(d int) time.Duration { return time.Duration(d) * 24 * time.Hour }
