package nbd

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/blockd/blockd/nbd/wire"
	"github.com/blockd/blockd/tlsauth"
)

// fuzzSeed builds a client byte stream: flags, options, then requests.
func fuzzSeed(structured bool, opts [][2]any, reqs ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, wire.ClientFixedNewstyle|wire.ClientNoZeroes)
	if structured {
		opts = append([][2]any{{wire.OptStructuredReply, []byte(nil)}, {wire.OptSetMetaContext, metaData("vol0", wire.MetaBaseAllocation)}}, opts...)
	}
	for _, o := range opts {
		data := o[1].([]byte)
		b = binary.BigEndian.AppendUint64(b, wire.MagicIHaveOpt)
		b = binary.BigEndian.AppendUint32(b, o[0].(uint32))
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		b = append(b, data...)
	}
	for _, r := range reqs {
		b = append(b, r...)
	}
	return b
}

func fuzzReq(typ, flags uint16, off uint64, n uint32, payload bool) []byte {
	b := binary.BigEndian.AppendUint32(nil, wire.MagicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, 0x1234)
	b = binary.BigEndian.AppendUint64(b, off)
	b = binary.BigEndian.AppendUint32(b, n)
	if payload {
		b = append(b, make([]byte, n)...)
	}
	return b
}

// FuzzServerInput: whatever a client sends, the server neither panics nor
// leaves the connection behind once the client hangs up.
func FuzzServerInput(f *testing.F) {
	goOpt := [2]any{wire.OptGo, goData("vol0", wire.InfoBlockSize)}
	f.Add(fuzzSeed(false, [][2]any{goOpt}, fuzzReq(wire.CmdWrite, 0, 0, 4096, true), fuzzReq(wire.CmdRead, 0, 0, 4096, false)))
	f.Add(fuzzSeed(true, [][2]any{goOpt}, fuzzReq(wire.CmdBlockStatus, wire.CmdFlagReqOne, 0, 1<<20, false),
		fuzzReq(wire.CmdWriteZeroes, wire.CmdFlagNoHole, 4096, 4096, false), fuzzReq(wire.CmdTrim, 0, 0, 8192, false)))
	f.Add(fuzzSeed(true, [][2]any{{wire.OptList, []byte(nil)}, {wire.OptInfo, goData("", wire.InfoName, wire.InfoDescription)}, {uint32(99), []byte("x")}, goOpt},
		fuzzReq(wire.CmdFlush, 0, 0, 0, false), fuzzReq(wire.CmdDisc, 0, 0, 0, false)))
	f.Add(fuzzSeed(false, [][2]any{{wire.OptExportName, []byte("vol0")}}, fuzzReq(wire.CmdRead, 0, 1<<40, 512, false)))
	f.Add(fuzzSeed(false, [][2]any{goOpt}, fuzzReq(wire.CmdWrite, 0, 0, 1<<31, false)))
	f.Add([]byte{0, 0, 0, 3, 0x49, 0x48})
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(StaticExports{{Name: "vol0", Device: newMemDev(1 << 20)}},
			WithLogger(log), WithHandshakeTimeout(5*time.Second), WithMaxInFlight(4))
		client, server := net.Pipe()
		srv.ServeConn(server)
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_, _ = client.Write(in)
		client.Close()
		deadline := time.Now().Add(10 * time.Second)
		for srv.Conns() != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("connection still open 10s after the client hung up")
			}
			time.Sleep(time.Millisecond)
		}
	})
}

// fuzzTLSServer is a TLS-only server with a client config that passes.
func fuzzTLSServer(f *testing.F) (srvCfg, cliCfg *tls.Config) {
	dir := f.TempDir()
	if _, err := tlsauth.Init(dir, tlsauth.InitOptions{Servers: []string{"s1"}, Clients: []string{"c"}}); err != nil {
		f.Fatal(err)
	}
	ld := func(kind, name, prefix string) *tlsauth.Creds {
		d := filepath.Join(dir, kind, name)
		c, err := tlsauth.Load(filepath.Join(d, prefix+"-cert.pem"), filepath.Join(d, prefix+"-key.pem"), filepath.Join(d, "ca-cert.pem"))
		if err != nil {
			f.Fatal(err)
		}
		return c
	}
	return ld("servers", "s1", "server").ServerConfig(nil), ld("clients", "c", "client").ClientConfig(nil)
}

func fuzzWaitClosed(t *testing.T, srv *Server) {
	deadline := time.Now().Add(10 * time.Second)
	for srv.Conns() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("connection still open 10s after the client hung up")
		}
		time.Sleep(time.Millisecond)
	}
}

// FuzzServerTLSRequired: the plaintext side of a TLS-only server
// (options before STARTTLS, STARTTLS itself, whatever follows it in place
// of a ClientHello): no panic, no connection left behind.
func FuzzServerTLSRequired(f *testing.F) {
	srvCfg, _ := fuzzTLSServer(f)
	goOpt := [2]any{wire.OptGo, goData("vol0", wire.InfoBlockSize)}
	f.Add(fuzzSeed(false, [][2]any{{wire.OptList, []byte(nil)}, goOpt, {wire.OptAbort, []byte(nil)}}))
	f.Add(fuzzSeed(false, [][2]any{{wire.OptStartTLS, []byte(nil)}}))
	f.Add(append(fuzzSeed(false, [][2]any{{wire.OptStartTLS, []byte(nil)}}), "\x16\x03\x01\x00\x05hello"...))
	f.Add(fuzzSeed(false, [][2]any{{wire.OptStartTLS, []byte("data")}, {wire.OptExportName, []byte("vol0")}}))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(StaticExports{{Name: "vol0", Device: newMemDev(1 << 20)}},
			WithLogger(log), WithHandshakeTimeout(5*time.Second), WithTLS(srvCfg))
		client, server := net.Pipe()
		srv.ServeConn(server)
		go func() { _, _ = io.Copy(io.Discard, client) }()
		_, _ = client.Write(in)
		client.Close()
		fuzzWaitClosed(t, srv)
	})
}

// FuzzServerTLSSession: after a real STARTTLS and handshake, whatever the
// client sends over TLS (options, a second STARTTLS, requests).
func FuzzServerTLSSession(f *testing.F) {
	srvCfg, cliCfg := fuzzTLSServer(f)
	goOpt := [2]any{wire.OptGo, goData("vol0", wire.InfoBlockSize)}
	strip := func(b []byte) []byte { return b[4:] } // no client flags: sent before STARTTLS
	f.Add(strip(fuzzSeed(false, [][2]any{goOpt}, fuzzReq(wire.CmdWrite, 0, 0, 4096, true), fuzzReq(wire.CmdRead, 0, 0, 4096, false))))
	f.Add(strip(fuzzSeed(true, [][2]any{{wire.OptStartTLS, []byte(nil)}, goOpt}, fuzzReq(wire.CmdFlush, 0, 0, 0, false))))
	f.Add(strip(fuzzSeed(false, [][2]any{{wire.OptExportName, []byte("vol0")}}, fuzzReq(wire.CmdDisc, 0, 0, 0, false))))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := NewServer(StaticExports{{Name: "vol0", Device: newMemDev(1 << 20)}},
			WithLogger(log), WithHandshakeTimeout(5*time.Second), WithMaxInFlight(4), WithTLS(srvCfg))
		client, server := net.Pipe()
		srv.ServeConn(server)
		defer func() { client.Close(); fuzzWaitClosed(t, srv) }()
		_ = client.SetDeadline(time.Now().Add(5 * time.Second))
		var hello [18]byte
		if _, err := io.ReadFull(client, hello[:]); err != nil {
			t.Fatalf("greeting: %v", err)
		}
		start := fuzzSeed(false, [][2]any{{wire.OptStartTLS, []byte(nil)}})
		if _, err := client.Write(start); err != nil {
			t.Fatalf("STARTTLS: %v", err)
		}
		var rep [20]byte
		if _, err := io.ReadFull(client, rep[:]); err != nil || binary.BigEndian.Uint32(rep[12:]) != wire.RepAck {
			t.Fatalf("STARTTLS reply % x: %v", rep, err)
		}
		tc := tls.Client(client, cliCfg)
		if err := tc.Handshake(); err != nil {
			t.Fatalf("handshake: %v", err)
		}
		_ = client.SetDeadline(time.Time{})
		go func() { _, _ = io.Copy(io.Discard, tc) }()
		_, _ = tc.Write(in)
	})
}
