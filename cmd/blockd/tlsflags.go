package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/tlsauth"
)

// tlsFlags are --tls-cert, --tls-key and --tls-ca, on every command that
// listens or talks to a master or an NBD server.
func tlsFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"BLOCKD_TLS_CERT"}, Usage: "TLS certificate (PEM) naming this identity (blockd tls init)"},
		&cli.StringFlag{Name: "tls-key", EnvVars: []string{"BLOCKD_TLS_KEY"}, Usage: "TLS private key (PEM) of --tls-cert"},
		&cli.StringFlag{Name: "tls-ca", EnvVars: []string{"BLOCKD_TLS_CA"}, Usage: "cluster CA certificate (PEM) peers must chain to"},
	}
}

// insecureFlag lets a daemon listen on a non-loopback address in the clear.
var insecureFlag = &cli.BoolFlag{Name: "insecure", Usage: "allow listening on a non-loopback address without TLS credentials (anyone who can reach the ports can do anything)"}

func loadTLS(c *cli.Context) (*tlsauth.Creds, error) {
	return tlsauth.LoadFlags(c.String("tls-cert"), c.String("tls-key"), c.String("tls-ca"))
}

// loadTLSKind is loadTLS for a daemon whose certificate must be of kind.
func loadTLSKind(c *cli.Context, kind tlsauth.Kind) (*tlsauth.Creds, error) {
	cr, err := loadTLS(c)
	if err != nil || cr == nil {
		return cr, err
	}
	if cr.ID.Kind != kind {
		return nil, fmt.Errorf("--tls-cert %s is the certificate of %s; this command needs a %s certificate (blockd tls init --%s NAME)", c.String("tls-cert"), cr.ID, kind, kind)
	}
	return cr, nil
}

// isLoopback reports whether a listen address binds loopback only
// (unix: sockets count as local).
func isLoopback(addr string) bool {
	if strings.HasPrefix(addr, "unix:") {
		return true
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkPlain enforces plain mode: without credentials every listen
// address must be loopback, unless --insecure (then a warning).
func checkPlain(c *cli.Context, cmd string, creds *tlsauth.Creds, flags ...string) error {
	if creds != nil {
		return nil
	}
	var open []string
	for _, f := range flags {
		if a := c.String(f); a != "" && !isLoopback(a) {
			open = append(open, "--"+f+" "+a)
		}
	}
	if len(open) == 0 {
		return nil
	}
	if !c.Bool("insecure") {
		return fmt.Errorf("%s: %s binds a non-loopback address without TLS: give --tls-cert, --tls-key and --tls-ca (blockd tls init), or --insecure to serve in the clear", cmd, strings.Join(open, ", "))
	}
	fmt.Fprintf(os.Stderr, "blockd: WARNING: %s: %s without TLS (--insecure): anyone who can reach these ports can read and write every volume and run the cluster\n", cmd, strings.Join(open, ", "))
	return nil
}

// apiClient is a master API client with the command's TLS credentials.
func apiClient(c *cli.Context, addrs []string) (*api.Client, error) {
	creds, err := loadTLS(c)
	if err != nil {
		return nil, err
	}
	if creds == nil {
		return api.NewClient(addrs), nil
	}
	// A master presents a master certificate; blockd serve's embedded
	// master presents its server's.
	return api.NewClientTLS(addrs, creds.ClientConfig(tlsauth.AnyOf(tlsauth.KindMaster, tlsauth.KindServer))), nil
}

// nbdTLS is the client TLS config for NBD connections to volume servers
// (nil in plain mode).
func nbdTLS(c *cli.Context) (*tls.Config, error) {
	creds, err := loadTLS(c)
	if err != nil || creds == nil {
		return nil, err
	}
	return creds.ClientConfig(tlsauth.Expect(tlsauth.KindServer, "")), nil
}

// allowFlag is volume create/update --allow NAME[:ro] (repeat or comma-separate).
func allowFlag() cli.Flag {
	return &cli.StringSliceFlag{Name: "allow", Usage: "client identity (its certificate's name) that may attach the volume over NBD; NAME:ro for read-only (repeat); none given: any certificate of the cluster CA"}
}
