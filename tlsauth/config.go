package tlsauth

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"
)

// Creds are one identity's credentials and the cluster CA it trusts.
type Creds struct {
	Cert tls.Certificate
	Leaf *x509.Certificate
	ID   Identity
	Pool *x509.CertPool
}

// Load reads a certificate, its key and the CA bundle peers must chain to.
// The certificate must carry a blockd identity (IdentityOf).
func Load(certFile, keyFile, caFile string) (*Creds, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("tls: load --tls-cert %s / --tls-key %s: %w", certFile, keyFile, err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("tls: parse %s: %w", certFile, err)
	}
	id, err := IdentityOf(leaf)
	if err != nil {
		return nil, fmt.Errorf("tls: %s: %w", certFile, err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("tls: --tls-ca: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("tls: --tls-ca %s holds no PEM certificate", caFile)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, fmt.Errorf("tls: %s does not chain to --tls-ca %s: %w", certFile, caFile, err)
	}
	cert.Leaf = leaf
	return &Creds{Cert: cert, Leaf: leaf, ID: id, Pool: pool}, nil
}

// LoadFlags is Load for the three --tls-* flags: all empty is plain mode
// (nil, nil); some but not all of them is an error.
func LoadFlags(certFile, keyFile, caFile string) (*Creds, error) {
	if certFile == "" && keyFile == "" && caFile == "" {
		return nil, nil
	}
	if certFile == "" || keyFile == "" || caFile == "" {
		return nil, errors.New("tls: --tls-cert, --tls-key and --tls-ca go together (give all three or none)")
	}
	return Load(certFile, keyFile, caFile)
}

// Check decides whether a verified peer identity is acceptable.
type Check func(Identity) error

// Expect accepts only the given kind and, unless name is "", that name.
func Expect(kind Kind, name string) Check {
	return func(id Identity) error {
		if id.Kind != kind || (name != "" && id.Name != name) {
			want := string(kind)
			if name != "" {
				want += " " + name
			}
			return fmt.Errorf("peer certificate is for %s, want %s", id, want)
		}
		return nil
	}
}

// AnyOf accepts an identity of any of the kinds.
func AnyOf(kinds ...Kind) Check {
	return func(id Identity) error {
		for _, k := range kinds {
			if id.Kind == k {
				return nil
			}
		}
		return fmt.Errorf("peer certificate is for %s, want one of %v", id, kinds)
	}
}

// ServerConfig is the config of a TLS server that requires a client
// certificate chaining to the CA; check (nil: any identity) vets the
// client's blockd identity.
func (c *Creds) ServerConfig(check Check) *tls.Config {
	cfg := &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{c.Cert},
		ClientCAs:    c.Pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
	}
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if check == nil {
			return nil
		}
		id, err := PeerIdentity(cs)
		if err != nil {
			return err
		}
		return check(id)
	}
	return cfg
}

// ClientConfig is the config of a TLS client presenting these credentials.
// The server's certificate must chain to the CA and its identity pass
// check; the host name is not checked (peers are addressed by IP and known
// by identity), check is.
func (c *Creds) ClientConfig(check Check) *tls.Config {
	pool := c.Pool
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		Certificates:       []tls.Certificate{c.Cert},
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("server sent no certificate")
			}
			inter := x509.NewCertPool()
			for _, ic := range cs.PeerCertificates[1:] {
				inter.AddCert(ic)
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("server certificate: %w", err)
			}
			if check == nil {
				return nil
			}
			id, err := IdentityOf(cs.PeerCertificates[0])
			if err != nil {
				return err
			}
			return check(id)
		},
	}
}

// PeerIdentity is the identity of a verified peer's certificate.
func PeerIdentity(cs tls.ConnectionState) (Identity, error) {
	if len(cs.PeerCertificates) == 0 {
		return Identity{}, errors.New("peer sent no certificate")
	}
	return IdentityOf(cs.PeerCertificates[0])
}

// HandshakeTimeout bounds a TLS handshake on every blockd listener.
const HandshakeTimeout = 10 * time.Second
