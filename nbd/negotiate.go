package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/blockd/blockd/nbd/wire"
)

// maxOptionLen bounds the data of one option we are willing to read; a
// longer option is skipped (up to maxOptionSkip) and refused, or the
// connection is dropped.
const (
	maxOptionLen  = 64 << 10
	maxOptionSkip = 16 << 20
	maxStringLen  = 4096
)

// errAbort ends negotiation without an error worth logging.
var errAbort = errors.New("client aborted negotiation")

// negotiate runs the fixed newstyle handshake. It returns nil once an export
// has been selected (c.exp set) and transmission may start.
func (c *conn) negotiate() error {
	if c.srv.handshakeTimeout > 0 {
		_ = c.nc.SetDeadline(time.Now().Add(c.srv.handshakeTimeout))
	}
	var hello [18]byte
	binary.BigEndian.PutUint64(hello[0:], wire.MagicNBD)
	binary.BigEndian.PutUint64(hello[8:], wire.MagicIHaveOpt)
	binary.BigEndian.PutUint16(hello[16:], wire.HandshakeFixedNewstyle|wire.HandshakeNoZeroes)
	if _, err := c.nc.Write(hello[:]); err != nil {
		return fmt.Errorf("send greeting: %w", err)
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return fmt.Errorf("read client flags: %w", err)
	}
	clientFlags := binary.BigEndian.Uint32(cf[:])
	if clientFlags&^(wire.ClientFixedNewstyle|wire.ClientNoZeroes) != 0 {
		return fmt.Errorf("unknown client flags %#x", clientFlags)
	}
	c.noZeroes = clientFlags&wire.ClientNoZeroes != 0

	for {
		var oh [16]byte
		if _, err := io.ReadFull(c.br, oh[:]); err != nil {
			return fmt.Errorf("read option header: %w", err)
		}
		if m := binary.BigEndian.Uint64(oh[0:]); m != wire.MagicIHaveOpt {
			return fmt.Errorf("bad option magic %#x", m)
		}
		opt := binary.BigEndian.Uint32(oh[8:])
		n := binary.BigEndian.Uint32(oh[12:])
		if n > maxOptionLen {
			if n > maxOptionSkip {
				return fmt.Errorf("option %d with %d bytes of data", opt, n)
			}
			if err := discard(c.br, int64(n)); err != nil {
				return fmt.Errorf("skip option data: %w", err)
			}
			if err := c.optReply(opt, wire.RepErrTooBig, []byte("option data too long")); err != nil {
				return err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return fmt.Errorf("read option data: %w", err)
		}
		if c.srv.isClosing() && opt != wire.OptAbort {
			if opt == wire.OptExportName {
				return errors.New("server shutting down")
			}
			if err := c.optReply(opt, wire.RepErrShutdown, []byte("server is shutting down")); err != nil {
				return err
			}
			continue
		}
		if handled, err := c.tlsGate(opt, data); handled || err != nil {
			if err != nil {
				return err
			}
			continue
		}
		done, err := c.handleOption(opt, data)
		if err != nil || done {
			return err
		}
	}
}

// handleOption answers one option. done means transmission starts.
func (c *conn) handleOption(opt uint32, data []byte) (done bool, err error) {
	switch opt {
	case wire.OptExportName:
		name := string(data)
		e, lerr := c.lookupChecked(name)
		if lerr != nil {
			// EXPORT_NAME cannot carry an error: the session ends.
			c.srv.log.Warn("nbd_export_refused", "export", name, "remote", c.remote, "err", lerr)
			return false, fmt.Errorf("export %q: %w", name, lerr)
		}
		c.selectExport(e)
		buf := make([]byte, 10, 10+124)
		binary.BigEndian.PutUint64(buf[0:], uint64(e.Device.Size()))
		binary.BigEndian.PutUint16(buf[8:], c.tflags)
		if !c.noZeroes {
			buf = buf[:10+124]
		}
		if _, err := c.nc.Write(buf); err != nil {
			return false, fmt.Errorf("send export info: %w", err)
		}
		return true, nil

	case wire.OptAbort:
		_ = c.optReply(opt, wire.RepAck, nil)
		return false, errAbort

	case wire.OptList:
		if len(data) != 0 {
			return false, c.optReply(opt, wire.RepErrInvalid, []byte("NBD_OPT_LIST takes no data"))
		}
		for _, name := range c.srv.names() {
			p := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			p = append(p, name...)
			if e, err := c.srv.src.Lookup(name); err == nil {
				if e.Description != "" {
					p = append(p, e.Description...)
				}
				e.release()
			}
			if err := c.optReply(opt, wire.RepServer, p); err != nil {
				return false, err
			}
		}
		return false, c.optReply(opt, wire.RepAck, nil)

	case wire.OptInfo, wire.OptGo:
		return c.handleInfoGo(opt, data)

	case wire.OptStructuredReply:
		if len(data) != 0 {
			return false, c.optReply(opt, wire.RepErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return false, c.optReply(opt, wire.RepAck, nil)

	case wire.OptListMetaContext, wire.OptSetMetaContext:
		return false, c.handleMetaContext(opt, data)

	default: // STARTTLS, EXTENDED_HEADERS and anything unknown
		return false, c.optReply(opt, wire.RepErrUnsup, []byte(fmt.Sprintf("option %d not supported", opt)))
	}
}

func (c *conn) handleInfoGo(opt uint32, data []byte) (bool, error) {
	if len(data) < 6 {
		return false, c.optReply(opt, wire.RepErrInvalid, []byte("option data too short"))
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl)+6 > uint64(len(data)) || nl > maxStringLen {
		return false, c.optReply(opt, wire.RepErrInvalid, []byte("bad export name length"))
	}
	name := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nreq := binary.BigEndian.Uint16(rest)
	rest = rest[2:]
	if len(rest) != 2*int(nreq) {
		return false, c.optReply(opt, wire.RepErrInvalid, []byte("bad information request count"))
	}
	var wantName, wantDesc bool
	for i := 0; i < int(nreq); i++ {
		switch binary.BigEndian.Uint16(rest[2*i:]) {
		case wire.InfoName:
			wantName = true
		case wire.InfoDescription:
			wantDesc = true
		}
	}
	e, err := c.srv.resolve(name)
	if err == nil {
		checked, aerr := c.checkAccess(e)
		if aerr != nil {
			e.release()
			return false, c.optReply(opt, wire.RepErrPolicy, []byte(clipMsg(aerr.Error())))
		}
		e = checked
	}
	if err != nil {
		c.srv.log.Warn("nbd_export_refused", "export", name, "remote", c.remote, "err", err)
		msg := err.Error()
		if len(msg) > maxStringLen {
			msg = msg[:maxStringLen]
		}
		return false, c.optReply(opt, wire.RepErrUnknown, []byte(msg))
	}
	selected := false
	defer func() {
		if !selected {
			e.release() // NBD_OPT_INFO, or a reply that failed
		}
	}()
	// Meta contexts negotiated for another export do not carry over.
	if c.metaExport != e.Name {
		c.metaAlloc, c.metaSel = false, nil
	}
	flags := c.transmissionFlags(e)
	info := make([]byte, 12)
	binary.BigEndian.PutUint16(info[0:], wire.InfoExport)
	binary.BigEndian.PutUint64(info[2:], uint64(e.Device.Size()))
	binary.BigEndian.PutUint16(info[10:], flags)
	if err := c.optReply(opt, wire.RepInfo, info); err != nil {
		return false, err
	}
	if wantName {
		p := binary.BigEndian.AppendUint16(nil, wire.InfoName)
		if err := c.optReply(opt, wire.RepInfo, append(p, e.Name...)); err != nil {
			return false, err
		}
	}
	if wantDesc && e.Description != "" {
		p := binary.BigEndian.AppendUint16(nil, wire.InfoDescription)
		if err := c.optReply(opt, wire.RepInfo, append(p, e.Description...)); err != nil {
			return false, err
		}
	}
	// Block sizes are always sent: the device needs 512-byte alignment.
	bs := make([]byte, 14)
	binary.BigEndian.PutUint16(bs[0:], wire.InfoBlockSize)
	binary.BigEndian.PutUint32(bs[2:], wire.MinBlockSize)
	pref := uint32(wire.PreferredBlockSize)
	if b := e.Device.BlockSize(); b >= wire.MinBlockSize && b <= int(c.srv.maxBlock) {
		pref = uint32(b)
	}
	binary.BigEndian.PutUint32(bs[6:], pref)
	binary.BigEndian.PutUint32(bs[10:], c.srv.maxBlock)
	if err := c.optReply(opt, wire.RepInfo, bs); err != nil {
		return false, err
	}
	if err := c.optReply(opt, wire.RepAck, nil); err != nil {
		return false, err
	}
	if opt == wire.OptGo {
		c.selectExport(e)
		selected = true
		return true, nil
	}
	return false, nil
}

func (c *conn) handleMetaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.optReply(opt, wire.RepErrInvalid, []byte("negotiate structured replies first"))
	}
	bad := func() error { return c.optReply(opt, wire.RepErrInvalid, []byte("malformed meta context request")) }
	if len(data) < 8 {
		return bad()
	}
	nl := binary.BigEndian.Uint32(data)
	if uint64(nl)+8 > uint64(len(data)) || nl > maxStringLen {
		return bad()
	}
	export := string(data[4 : 4+nl])
	rest := data[4+nl:]
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	var queries []string
	for i := uint32(0); i < nq; i++ {
		if len(rest) < 4 {
			return bad()
		}
		ql := binary.BigEndian.Uint32(rest)
		if uint64(ql)+4 > uint64(len(rest)) || ql > maxStringLen {
			return bad()
		}
		queries = append(queries, string(rest[4:4+ql]))
		rest = rest[4+ql:]
	}
	if len(rest) != 0 {
		return bad()
	}
	list := opt == wire.OptListMetaContext
	match := false
	if list && nq == 0 {
		match = true
	}
	for _, q := range queries {
		if q == wire.MetaBaseAllocation || (list && q == "base:") {
			match = true
		}
	}
	// The export's own contexts (MetaContexter, meta.go): its device is
	// looked up only when a query asks beyond base:.
	var devCtx []string
	if wantsDevice(queries, list) {
		if e, err := c.lookupChecked(export); err == nil {
			devCtx = matchContexts(deviceContexts(e.Device), queries, list)
			e.release()
		}
	}
	var sel []metaSel
	if !list {
		c.metaExport = c.srv.canonical(export)
		c.metaAlloc = match
		for i, n := range devCtx {
			sel = append(sel, metaSel{id: firstDeviceMetaID + uint32(i), name: n})
		}
		c.metaSel = sel
	}
	if match {
		id := uint32(0)
		if !list {
			id = wire.MetaBaseAllocationID
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, wire.RepMetaContext, append(p, wire.MetaBaseAllocation...)); err != nil {
			return err
		}
	}
	for i, n := range devCtx {
		id := uint32(0)
		if !list {
			id = sel[i].id
		}
		p := binary.BigEndian.AppendUint32(nil, id)
		if err := c.optReply(opt, wire.RepMetaContext, append(p, n...)); err != nil {
			return err
		}
	}
	return c.optReply(opt, wire.RepAck, nil)
}

// lookupChecked resolves an export and applies its access check; a
// refused export is released.
func (c *conn) lookupChecked(name string) (Export, error) {
	e, err := c.srv.resolve(name)
	if err != nil {
		return Export{}, err
	}
	checked, err := c.checkAccess(e)
	if err != nil {
		e.release()
		return Export{}, err
	}
	return checked, nil
}

// optReply sends one fixed newstyle option reply.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	buf := make([]byte, 20, 20+len(data))
	binary.BigEndian.PutUint64(buf[0:], wire.MagicOptReply)
	binary.BigEndian.PutUint32(buf[8:], opt)
	binary.BigEndian.PutUint32(buf[12:], typ)
	binary.BigEndian.PutUint32(buf[16:], uint32(len(data)))
	buf = append(buf, data...)
	if _, err := c.nc.Write(buf); err != nil {
		return fmt.Errorf("send reply to option %d: %w", opt, err)
	}
	return nil
}

// transmissionFlags are the flags advertised for e on this connection.
func (c *conn) transmissionFlags(e Export) uint16 {
	f := wire.FlagHasFlags | wire.FlagSendFlush | wire.FlagSendFUA | wire.FlagCanMultiConn | wire.FlagSendCache
	if e.ReadOnly {
		f |= wire.FlagReadOnly
	} else {
		f |= wire.FlagSendTrim | wire.FlagSendWriteZeroes | wire.FlagSendFastZero
	}
	if c.structured {
		f |= wire.FlagSendDF
	}
	return f
}

func (c *conn) selectExport(e Export) {
	c.mu.Lock()
	c.exp = e
	c.mu.Unlock()
	c.dev = e.Device
	c.size = e.Device.Size()
	c.tflags = c.transmissionFlags(e)
	if c.metaExport != e.Name {
		c.metaAlloc, c.metaSel = false, nil
	}
}

func sanitize(s string) string {
	if len(s) > 200 {
		s = s[:200]
	}
	return strings.ToValidUTF8(s, "?")
}
