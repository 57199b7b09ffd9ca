package nbd

import (
	"encoding/binary"
	"strings"

	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/nbd/wire"
)

// Metadata contexts beyond base:allocation. A Device may offer its own
// (for example a context of the blocks that changed since some point, in
// the style of qemu's qemu:dirty-bitmap:NAME) by implementing
// MetaContexter; this package only negotiates them and carries their block
// status, it does not know what they mean.

// MetaContexter is implemented by a Device that offers metadata contexts
// of its own to NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT and
// NBD_CMD_BLOCK_STATUS.
type MetaContexter interface {
	// MetaContexts lists the full names ("namespace:leaf") of the contexts
	// the device offers now. "base:" names are the server's own and are
	// ignored here.
	MetaContexts() []string
	// MetaBlockStatus describes [off, off+length) in the named context:
	// extents in order from off, each with the context's flags. They may
	// cover less than asked (the client asks again for the rest) but must
	// start at off.
	MetaBlockStatus(name string, off, length int64) ([]MetaExtent, error)
}

// MetaExtent is a byte range and its flags in one metadata context.
type MetaExtent struct {
	Offset, Length int64
	Flags          uint32
}

// metaSel is one negotiated device context and the ID it was given.
type metaSel struct {
	id   uint32
	name string
}

// firstDeviceMetaID is the ID of the first device context on a connection
// (base:allocation has wire.MetaBaseAllocationID).
const firstDeviceMetaID = wire.MetaBaseAllocationID + 1

// deviceContexts are the contexts dev offers (none if it offers none).
func deviceContexts(dev blockdev.Device) []string {
	mc, ok := dev.(MetaContexter)
	if !ok {
		return nil
	}
	var out []string
	for _, n := range mc.MetaContexts() {
		if n != "" && !strings.HasPrefix(n, "base:") && len(n) <= maxStringLen {
			out = append(out, n)
		}
	}
	return out
}

// matchContexts answers a LIST or SET of queries against the contexts a
// device offers. LIST: no queries lists everything, and a query ending
// in ':' (a namespace, or a prefix such as "blockd:changed:") lists the
// contexts that start with it. SET: exact names only.
func matchContexts(offered, queries []string, list bool) []string {
	var out []string
	seen := map[string]bool{}
	add := func(n string) {
		if !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	if list && len(queries) == 0 {
		for _, n := range offered {
			add(n)
		}
		return out
	}
	for _, q := range queries {
		for _, n := range offered {
			if n == q || (list && strings.HasSuffix(q, ":") && strings.HasPrefix(n, q)) {
				add(n)
			}
		}
	}
	return out
}

// wantsDevice reports whether answering the queries needs the export's
// device: a LIST of everything, or any query outside base:.
func wantsDevice(queries []string, list bool) bool {
	if list && len(queries) == 0 {
		return true
	}
	for _, q := range queries {
		if !strings.HasPrefix(q, "base:") {
			return true
		}
	}
	return false
}

// statusDescriptors encodes the extents as block status descriptors for
// the request: contiguous from its offset, clipped to its end, equal
// neighbours merged, at most maxStatusDescriptors (one with REQ_ONE).
// Nothing usable gives one descriptor for the whole request with flags
// fallback.
func statusDescriptors(r *request, exts []MetaExtent, fallback uint32) []byte {
	reqEnd := int64(r.off) + int64(r.length)
	pos := int64(r.off)
	var desc []byte
	var last uint32 = ^uint32(0)
	count := 0
	for _, e := range exts {
		if pos >= reqEnd || count >= maxStatusDescriptors {
			break
		}
		end := min(e.Offset+e.Length, reqEnd)
		if e.Offset > pos || end <= pos {
			if end <= pos {
				continue
			}
			break // a gap: stop at what is known contiguously
		}
		for pos < end {
			n := min(end-pos, 1<<31) // descriptor lengths are 32-bit
			if count > 0 && e.Flags == last && uint64(binary.BigEndian.Uint32(desc[len(desc)-8:]))+uint64(n) < 1<<32 {
				prev := binary.BigEndian.Uint32(desc[len(desc)-8:])
				binary.BigEndian.PutUint32(desc[len(desc)-8:], prev+uint32(n))
			} else {
				desc = binary.BigEndian.AppendUint32(desc, uint32(n))
				desc = binary.BigEndian.AppendUint32(desc, e.Flags)
				count++
				last = e.Flags
			}
			pos += n
		}
		if r.flags&wire.CmdFlagReqOne != 0 && count > 0 {
			break
		}
	}
	if count == 0 {
		desc = binary.BigEndian.AppendUint32(desc, min(r.length, 1<<31))
		desc = binary.BigEndian.AppendUint32(desc, fallback)
	}
	if r.flags&wire.CmdFlagReqOne != 0 {
		desc = desc[:8]
	}
	return desc
}

// allocExtents turns the device's allocation into base:allocation flags.
func allocExtents(exts []blockdev.Extent) []MetaExtent {
	out := make([]MetaExtent, 0, len(exts))
	for _, e := range exts {
		var st uint32
		if e.Hole {
			st |= wire.StateHole | wire.StateZero
		}
		if e.Zero {
			st |= wire.StateZero
		}
		out = append(out, MetaExtent{Offset: e.Offset, Length: e.Length, Flags: st})
	}
	return out
}

// appendStatusChunk appends one NBD_REPLY_TYPE_BLOCK_STATUS chunk.
func appendStatusChunk(b []byte, r *request, id uint32, desc []byte, done bool) []byte {
	var h [wire.StructuredReplySize + 4]byte
	binary.BigEndian.PutUint32(h[0:], wire.MagicStructuredReply)
	if done {
		binary.BigEndian.PutUint16(h[4:], wire.ReplyFlagDone)
	}
	binary.BigEndian.PutUint16(h[6:], wire.ReplyTypeBlockStatus)
	binary.BigEndian.PutUint64(h[8:], r.handle)
	binary.BigEndian.PutUint32(h[16:], uint32(4+len(desc)))
	binary.BigEndian.PutUint32(h[20:], id)
	b = append(b, h[:]...)
	return append(b, desc...)
}

// blockStatus answers NBD_CMD_BLOCK_STATUS: one chunk per negotiated
// context (base:allocation first), the last one marked done, all sent
// together once every context has answered.
func (c *conn) blockStatus(r *request, off, n int64) {
	var chunks [][]byte
	var ids []uint32
	if c.metaAlloc {
		exts, err := c.dev.BlockStatus(off, n)
		if err != nil {
			c.replyDevError(r, "block status", err)
			return
		}
		chunks = append(chunks, statusDescriptors(r, allocExtents(exts), 0))
		ids = append(ids, wire.MetaBaseAllocationID)
	}
	if len(c.metaSel) > 0 {
		mc, ok := c.dev.(MetaContexter)
		if !ok {
			c.replyError(r, wire.ErrnoInval, "the export no longer offers its metadata contexts")
			return
		}
		for _, m := range c.metaSel {
			exts, err := mc.MetaBlockStatus(m.name, off, n)
			if err != nil {
				c.replyDevError(r, "block status "+m.name, err)
				return
			}
			chunks = append(chunks, statusDescriptors(r, exts, 0))
			ids = append(ids, m.id)
		}
	}
	var out []byte
	for i, d := range chunks {
		out = appendStatusChunk(out, r, ids[i], d, i == len(chunks)-1)
	}
	c.out.send(out, nil, nil, r.deferFlush)
}
