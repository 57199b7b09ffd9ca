// Package tlsauth makes and loads blockd's TLS credentials: a cluster CA
// and, signed by it, certificates for masters, volume servers and clients.
//
// Identity. Every certificate names one identity twice: the subject's
// CommonName is the name (a server's ID, a master's name, a client's name)
// and a URI SAN blockd://KIND/NAME says what it is (KIND is master, server
// or client). Peers are checked against the URI SAN; the CommonName is for
// humans and for tools (nbdkit, qemu) that only look there. Master and
// server certificates also carry DNS/IP SANs for the hosts given at init
// (localhost, 127.0.0.1 and ::1 by default) so that libnbd and qemu, which
// check the host name, accept them.
//
// Layout written by Init (the file names libnbd's tools, qemu's
// tls-creds-x509 and nbdkit expect):
//
//	DIR/ca-cert.pem, DIR/ca-key.pem           the cluster CA (keep ca-key.pem offline)
//	DIR/masters/NAME/{ca-cert,server-cert,server-key}.pem
//	DIR/servers/ID/{ca-cert,server-cert,server-key}.pem
//	DIR/clients/NAME/{ca-cert,client-cert,client-key}.pem
//
// A master's and a server's certificate is both a TLS server and a TLS
// client certificate: servers present it to the master (heartbeats) and to
// each other (replication), masters to each other (raft).
package tlsauth

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"time"
)

// Kind is what an identity is.
type Kind string

// The identity kinds.
const (
	KindMaster Kind = "master"
	KindServer Kind = "server"
	KindClient Kind = "client"
)

// Identity is who a certificate says its holder is.
type Identity struct {
	Kind Kind
	Name string
}

func (id Identity) String() string { return string(id.Kind) + " " + id.Name }

// URI is the identity's URI SAN, blockd://KIND/NAME.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: "blockd", Host: string(id.Kind), Path: "/" + id.Name}
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// CheckName accepts the names an identity may have: 1 to 64 of
// A-Z a-z 0-9 . _ -, not starting with a punctuation mark.
func CheckName(name string) error {
	if !nameRE.MatchString(name) {
		return fmt.Errorf("name %q: want 1-64 characters of A-Z a-z 0-9 . _ - starting with a letter or digit", clip(name))
	}
	return nil
}

func clip(s string) string {
	if len(s) > 80 {
		return s[:64] + "..."
	}
	return s
}

// IdentityOf reads the blockd identity from a certificate's URI SAN.
func IdentityOf(cert *x509.Certificate) (Identity, error) {
	for _, u := range cert.URIs {
		if u.Scheme != "blockd" {
			continue
		}
		k := Kind(u.Host)
		name := u.Path
		if len(name) > 0 && name[0] == '/' {
			name = name[1:]
		}
		switch k {
		case KindMaster, KindServer, KindClient:
		default:
			return Identity{}, fmt.Errorf("certificate %q: unknown identity kind %q", clip(cert.Subject.CommonName), clip(u.Host))
		}
		if err := CheckName(name); err != nil {
			return Identity{}, fmt.Errorf("certificate %q: %w", clip(cert.Subject.CommonName), err)
		}
		return Identity{Kind: k, Name: name}, nil
	}
	return Identity{}, fmt.Errorf("certificate %q names no blockd identity (no blockd:// URI SAN)", clip(cert.Subject.CommonName))
}

// CA is a cluster certificate authority that can sign certificates.
type CA struct {
	Cert *x509.Certificate
	Key  *ecdsa.PrivateKey
}

// NewCA makes a self-signed ECDSA P-256 CA valid from notBefore to notAfter.
func NewCA(name string, notBefore, notAfter time.Time) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: CA key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"blockd"}},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: sign CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: parse CA: %w", err)
	}
	return &CA{Cert: cert, Key: key}, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(fmt.Sprintf("tlsauth: crypto/rand failed: %v", err)) // the OS has no entropy source
	}
	return n
}

// Leaf is a signed certificate and its key, PEM-encoded.
type Leaf struct {
	CertPEM, KeyPEM []byte
}

// Issue signs a certificate for id. Masters and servers get both server
// and client auth and the hosts as DNS/IP SANs; clients get client auth.
func (ca *CA) Issue(id Identity, hosts []string, notBefore, notAfter time.Time) (Leaf, error) {
	if err := CheckName(id.Name); err != nil {
		return Leaf{}, fmt.Errorf("tlsauth: %s: %w", id.Kind, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Leaf{}, fmt.Errorf("tlsauth: key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: id.Name, Organization: []string{"blockd"}, OrganizationalUnit: []string{string(id.Kind)}},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		URIs:         []*url.URL{id.URI()},
	}
	switch id.Kind {
	case KindClient:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	case KindMaster, KindServer:
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		for _, h := range hosts {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else if h != "" {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
	default:
		return Leaf{}, fmt.Errorf("tlsauth: unknown identity kind %q", id.Kind)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return Leaf{}, fmt.Errorf("tlsauth: sign %s: %w", id, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return Leaf{}, fmt.Errorf("tlsauth: encode key of %s: %w", id, err)
	}
	return Leaf{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}),
	}, nil
}

// CertPEM is the CA certificate, PEM-encoded.
func (ca *CA) CertPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw})
}

// KeyPEM is the CA key, PEM-encoded.
func (ca *CA) KeyPEM() ([]byte, error) {
	kder, err := x509.MarshalECPrivateKey(ca.Key)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: encode CA key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), nil
}

// LoadCA reads DIR/ca-cert.pem and DIR/ca-key.pem.
func LoadCA(dir string) (*CA, error) {
	cb, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, fmt.Errorf("tlsauth: %w", err)
	}
	kb, err := os.ReadFile(filepath.Join(dir, "ca-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("tlsauth: %w (the CA key is needed to sign new certificates)", err)
	}
	blk, _ := pem.Decode(cb)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("tlsauth: %s: no PEM certificate", filepath.Join(dir, "ca-cert.pem"))
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: %s: %w", filepath.Join(dir, "ca-cert.pem"), err)
	}
	kblk, _ := pem.Decode(kb)
	if kblk == nil {
		return nil, fmt.Errorf("tlsauth: %s: no PEM key", filepath.Join(dir, "ca-key.pem"))
	}
	key, err := x509.ParseECPrivateKey(kblk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("tlsauth: %s: %w", filepath.Join(dir, "ca-key.pem"), err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("tlsauth: %s does not match %s", filepath.Join(dir, "ca-key.pem"), filepath.Join(dir, "ca-cert.pem"))
	}
	return &CA{Cert: cert, Key: key}, nil
}

// InitOptions says what Init makes.
type InitOptions struct {
	Masters, Servers, Clients []string
	// Hosts are the DNS names and IP addresses put into master and server
	// certificates (default localhost, 127.0.0.1, ::1).
	Hosts []string
	// Validity of the leaf certificates (default 365 days); the CA gets
	// ten years.
	Validity time.Duration
	// Now is the start of validity (default time.Now()); tests make
	// expired certificates with it.
	Now time.Time
}

// Written is one entity directory Init wrote.
type Written struct {
	ID  Identity
	Dir string
}

// Init creates the CA in dir (or reuses the one there) and a directory per
// requested identity. An identity whose directory exists is an error: Init
// never overwrites a key.
func Init(dir string, o InitOptions) ([]Written, error) {
	if o.Validity <= 0 {
		o.Validity = 365 * 24 * time.Hour
	}
	if o.Now.IsZero() {
		o.Now = time.Now()
	}
	if len(o.Hosts) == 0 {
		o.Hosts = []string{"localhost", "127.0.0.1", "::1"}
	}
	var ids []Identity
	seen := map[Identity]bool{}
	add := func(k Kind, names []string) error {
		for _, n := range names {
			if err := CheckName(n); err != nil {
				return fmt.Errorf("tlsauth: --%s: %w", k, err)
			}
			id := Identity{Kind: k, Name: n}
			if seen[id] {
				return fmt.Errorf("tlsauth: %s named twice", id)
			}
			seen[id] = true
			ids = append(ids, id)
		}
		return nil
	}
	if err := errors.Join(add(KindMaster, o.Masters), add(KindServer, o.Servers), add(KindClient, o.Clients)); err != nil {
		return nil, err
	}
	for _, id := range ids {
		if _, err := os.Stat(entityDir(dir, id)); err == nil {
			return nil, fmt.Errorf("tlsauth: %s exists; remove it to issue a new certificate for %s", entityDir(dir, id), id)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("tlsauth: %w", err)
	}
	ca, err := LoadCA(dir)
	if errors.Is(err, os.ErrNotExist) {
		if _, serr := os.Stat(filepath.Join(dir, "ca-cert.pem")); serr == nil {
			return nil, err // a certificate without its key: do not replace the CA
		}
		if ca, err = NewCA("blockd cluster CA", o.Now.Add(-time.Hour), o.Now.Add(10*365*24*time.Hour)); err != nil {
			return nil, err
		}
		kp, err := ca.KeyPEM()
		if err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(dir, "ca-key.pem"), kp, 0o600); err != nil {
			return nil, err
		}
		if err := writeFile(filepath.Join(dir, "ca-cert.pem"), ca.CertPEM(), 0o644); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, err
	}
	var out []Written
	for _, id := range ids {
		leaf, err := ca.Issue(id, o.Hosts, o.Now.Add(-time.Hour), o.Now.Add(o.Validity))
		if err != nil {
			return out, err
		}
		d := entityDir(dir, id)
		if err := os.MkdirAll(d, 0o700); err != nil {
			return out, fmt.Errorf("tlsauth: %w", err)
		}
		prefix := "server"
		if id.Kind == KindClient {
			prefix = "client"
		}
		for _, f := range []struct {
			name string
			data []byte
			mode os.FileMode
		}{
			{"ca-cert.pem", ca.CertPEM(), 0o644},
			{prefix + "-cert.pem", leaf.CertPEM, 0o644},
			{prefix + "-key.pem", leaf.KeyPEM, 0o600},
		} {
			if err := writeFile(filepath.Join(d, f.name), f.data, f.mode); err != nil {
				return out, err
			}
		}
		out = append(out, Written{ID: id, Dir: d})
	}
	return out, nil
}

func entityDir(dir string, id Identity) string {
	return filepath.Join(dir, string(id.Kind)+"s", id.Name)
}

// writeFile creates path (never over an existing file) with data, synced.
func writeFile(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("tlsauth: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("tlsauth: write %s: %w", path, err)
	}
	return nil
}
