// Package kernel attaches a remote NBD export to the Linux nbd driver: the
// client side of the fixed-newstyle handshake, the generic-netlink "nbd"
// family (CONNECT, RECONFIGURE, DISCONNECT, STATUS, LINK_DEAD events), and
// the keeper that stays with the device and hands it new sockets when its
// connections die (server restart, failover), so that a mounted filesystem
// continues.
package kernel

import (
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/blockd/blockd/nbd/wire"
)

// maxOptReplySize bounds an option reply this client accepts.
const maxOptReplySize = 1 << 20

// ErrUnknownExport means the server has no such export (volume).
var ErrUnknownExport = errors.New("nbd: unknown export")

// ErrRefused means the server refused the export for another reason, for
// example because it is not the volume's primary (its message says which).
var ErrRefused = errors.New("nbd: export refused")

// Export is what the handshake learned.
type Export struct {
	Name  string
	Size  uint64
	Flags uint16
	// Block size constraints if the server sent them (0 otherwise).
	MinBlock, PrefBlock, MaxBlock uint32
}

// Negotiate runs the fixed-newstyle handshake on conn for the named export:
// NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME when the server does not
// know OPT_GO). On success conn is in the transmission phase. The deadline
// bounds the whole handshake (zero: none).
func Negotiate(conn net.Conn, name string, deadline time.Time) (Export, error) {
	_, exp, err := NegotiateTLS(conn, name, deadline, nil)
	return exp, err
}

// ErrTLS means the TLS upgrade failed: the server does not offer TLS or
// the handshake failed (a certificate rejected on either side).
var ErrTLS = errors.New("nbd: TLS")

// NegotiateTLS is Negotiate with NBD_OPT_STARTTLS first when cfg is not
// nil. It returns the connection to use from then on (the TLS one).
func NegotiateTLS(conn net.Conn, name string, deadline time.Time, cfg *tls.Config) (net.Conn, Export, error) {
	if !deadline.IsZero() {
		_ = conn.SetDeadline(deadline)
		defer conn.SetDeadline(time.Time{})
	}
	noZeroes, err := greet(conn)
	if err != nil {
		return nil, Export{}, err
	}
	if cfg != nil {
		if conn, err = startTLS(conn, cfg); err != nil {
			return nil, Export{}, err
		}
	}
	exp, err := optGo(conn, name, noZeroes)
	return conn, exp, err
}

// startTLS sends NBD_OPT_STARTTLS and runs the client handshake.
func startTLS(conn net.Conn, cfg *tls.Config) (net.Conn, error) {
	if err := writeOpt(conn, wire.OptStartTLS, nil); err != nil {
		return nil, err
	}
	opt, typ, payload, err := readOptReply(conn)
	if err != nil {
		return nil, err
	}
	if opt != wire.OptStartTLS {
		return nil, fmt.Errorf("nbd handshake: reply for option %d, want STARTTLS", opt)
	}
	if typ != wire.RepAck {
		return nil, fmt.Errorf("%w: server refused NBD_OPT_STARTTLS: %s (NBD reply %#x)", ErrTLS, msgOr(payload, "no reason given"), typ)
	}
	tc := tls.Client(conn, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, fmt.Errorf("%w: handshake: %v", ErrTLS, err)
	}
	return tc, nil
}

// greet reads the server's greeting and sends the client flags.
func greet(conn net.Conn) (noZeroes bool, err error) {
	var hello [18]byte
	if _, err := io.ReadFull(conn, hello[:]); err != nil {
		return false, fmt.Errorf("nbd handshake: read greeting: %w", err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != wire.MagicNBD {
		return false, fmt.Errorf("nbd handshake: not an NBD server (bad magic %#x)", binary.BigEndian.Uint64(hello[0:]))
	}
	if binary.BigEndian.Uint64(hello[8:]) != wire.MagicIHaveOpt {
		return false, fmt.Errorf("nbd handshake: server speaks oldstyle NBD, need fixed newstyle")
	}
	hflags := binary.BigEndian.Uint16(hello[16:])
	if hflags&wire.HandshakeFixedNewstyle == 0 {
		return false, fmt.Errorf("nbd handshake: server lacks fixed newstyle (flags %#x)", hflags)
	}
	cflags := wire.ClientFixedNewstyle
	noZeroes = hflags&wire.HandshakeNoZeroes != 0
	if noZeroes {
		cflags |= wire.ClientNoZeroes
	}
	if err := binary.Write(conn, binary.BigEndian, cflags); err != nil {
		return false, fmt.Errorf("nbd handshake: write client flags: %w", err)
	}
	return noZeroes, nil
}

// optGo selects the export with NBD_OPT_GO (or NBD_OPT_EXPORT_NAME).
func optGo(conn net.Conn, name string, noZeroes bool) (Export, error) {
	// OPT_GO: name, and one info request (block size).
	data := make([]byte, 0, 4+len(name)+4)
	data = binary.BigEndian.AppendUint32(data, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, wire.InfoBlockSize)
	if err := writeOpt(conn, wire.OptGo, data); err != nil {
		return Export{}, err
	}
	exp := Export{Name: name}
	gotExport := false
	for {
		opt, typ, payload, err := readOptReply(conn)
		if err != nil {
			return Export{}, err
		}
		if opt != wire.OptGo {
			return Export{}, fmt.Errorf("nbd handshake: reply for option %d, want %d", opt, wire.OptGo)
		}
		switch {
		case typ == wire.RepAck:
			if !gotExport {
				return Export{}, fmt.Errorf("nbd handshake: server acked OPT_GO without NBD_INFO_EXPORT")
			}
			return exp, nil
		case typ == wire.RepInfo:
			if len(payload) < 2 {
				return Export{}, fmt.Errorf("nbd handshake: short NBD_REP_INFO")
			}
			switch binary.BigEndian.Uint16(payload) {
			case wire.InfoExport:
				if len(payload) != 12 {
					return Export{}, fmt.Errorf("nbd handshake: NBD_INFO_EXPORT of %d bytes", len(payload))
				}
				exp.Size = binary.BigEndian.Uint64(payload[2:])
				exp.Flags = binary.BigEndian.Uint16(payload[10:])
				gotExport = true
			case wire.InfoBlockSize:
				if len(payload) == 14 {
					exp.MinBlock = binary.BigEndian.Uint32(payload[2:])
					exp.PrefBlock = binary.BigEndian.Uint32(payload[6:])
					exp.MaxBlock = binary.BigEndian.Uint32(payload[10:])
				}
			}
		case typ == wire.RepErrUnsup:
			return exportName(conn, name, noZeroes)
		case typ == wire.RepErrTLSReqd:
			return Export{}, fmt.Errorf("%w: %q: the server requires TLS: %s (give --tls-cert, --tls-key, --tls-ca)", ErrRefused, name, msgOr(payload, "TLS required"))
		case typ == wire.RepErrUnknown:
			return Export{}, fmt.Errorf("%w %q: %s", ErrUnknownExport, name, msgOr(payload, "no such export"))
		case typ&wire.RepFlagError != 0:
			return Export{}, fmt.Errorf("%w: %q: %s (NBD error %#x)", ErrRefused, name, msgOr(payload, "refused"), typ)
		default:
			// Unknown informational reply: ignore, per the protocol.
		}
	}
}

func msgOr(p []byte, def string) string {
	if len(p) == 0 {
		return def
	}
	return string(p)
}

// exportName is the NBD_OPT_EXPORT_NAME fallback: the server answers with
// size and flags, or closes the connection for an unknown export.
func exportName(conn net.Conn, name string, noZeroes bool) (Export, error) {
	if err := writeOpt(conn, wire.OptExportName, []byte(name)); err != nil {
		return Export{}, err
	}
	n := 10
	if !noZeroes {
		n += 124
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(conn, buf); err != nil {
		return Export{}, fmt.Errorf("%w %q: server closed the connection after NBD_OPT_EXPORT_NAME: %v", ErrUnknownExport, name, err)
	}
	return Export{Name: name, Size: binary.BigEndian.Uint64(buf), Flags: binary.BigEndian.Uint16(buf[8:])}, nil
}

func writeOpt(w io.Writer, opt uint32, data []byte) error {
	b := make([]byte, 0, 16+len(data))
	b = binary.BigEndian.AppendUint64(b, wire.MagicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("nbd handshake: write option %d: %w", opt, err)
	}
	return nil
}

func readOptReply(r io.Reader) (opt, typ uint32, payload []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, 0, nil, fmt.Errorf("nbd handshake: read option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(h[0:]); m != wire.MagicOptReply {
		return 0, 0, nil, fmt.Errorf("nbd handshake: bad option reply magic %#x", m)
	}
	opt = binary.BigEndian.Uint32(h[8:])
	typ = binary.BigEndian.Uint32(h[12:])
	n := binary.BigEndian.Uint32(h[16:])
	if n > maxOptReplySize {
		return 0, 0, nil, fmt.Errorf("nbd handshake: option reply of %d bytes", n)
	}
	payload = make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, 0, nil, fmt.Errorf("nbd handshake: read option reply payload: %w", err)
	}
	return opt, typ, payload, nil
}
