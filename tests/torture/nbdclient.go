package torture

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// BlockSize is the register size of the model: every write fills whole
// blocks with its tag's pattern.
const BlockSize = 4096

// Pattern fills buf (one block) with the pattern of tag for block b:
// 256 records of (tag, block). A block that is not 256 equal records is
// torn; one whose records name another block was misplaced.
func Pattern(buf []byte, tag uint64, b int64) {
	for off := 0; off+16 <= len(buf); off += 16 {
		binary.BigEndian.PutUint64(buf[off:], tag)
		binary.BigEndian.PutUint64(buf[off+8:], uint64(b))
	}
}

// Decode returns the tag a block holds: 0 for zeros, TagTorn for a mix,
// TagMisplaced for another block's pattern.
func Decode(buf []byte, b int64) uint64 {
	tag, blk := binary.BigEndian.Uint64(buf), binary.BigEndian.Uint64(buf[8:])
	for off := 16; off+16 <= len(buf); off += 16 {
		if binary.BigEndian.Uint64(buf[off:]) != tag || binary.BigEndian.Uint64(buf[off+8:]) != blk {
			return TagTorn
		}
	}
	if tag == 0 && blk == 0 {
		return 0
	}
	if blk != uint64(b) {
		return TagMisplaced
	}
	return tag
}

// NBD wire constants (the NBD protocol description).
const (
	nbdMagic      uint64 = 0x4e42444d41474943
	nbdIHaveOpt   uint64 = 0x49484156454F5054
	nbdOptReply   uint64 = 0x3e889045565a9
	nbdReqMagic   uint32 = 0x25609513
	nbdReplyMagic uint32 = 0x67446698
	nbdOptGo      uint32 = 7
	nbdRepAck     uint32 = 1
	nbdRepInfo    uint32 = 3
	nbdCmdRead    uint16 = 0
	nbdCmdWrite   uint16 = 1
	nbdCmdDisc    uint16 = 2
	nbdCmdFlush   uint16 = 3
)

// ErrServer is an error the server answered (as opposed to a broken
// connection, whose outcome is unknown).
type ErrServer struct{ Errno uint32 }

func (e *ErrServer) Error() string { return fmt.Sprintf("nbd server error %d", e.Errno) }

// IsServerError tells an answered error from a broken connection.
func IsServerError(err error) bool {
	var se *ErrServer
	return errors.As(err, &se)
}

// Client is a minimal NBD client: fixed newstyle, NBD_OPT_GO, simple
// replies, one request at a time (so each operation's interval is exact).
type Client struct {
	nc      net.Conn
	br      *bufio.Reader
	Size    int64
	timeout time.Duration
	handle  uint64
}

// Dial connects and negotiates export name. timeout bounds the
// negotiation and then every request.
func Dial(addr, name string, timeout time.Duration) (*Client, error) {
	nc, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	c := &Client{nc: nc, br: bufio.NewReader(nc), timeout: timeout}
	if err := c.negotiate(name); err != nil {
		nc.Close()
		return nil, fmt.Errorf("negotiate %s at %s: %w", name, addr, err)
	}
	return c, nil
}

func (c *Client) negotiate(name string) error {
	_ = c.nc.SetDeadline(time.Now().Add(c.timeout))
	var hello [18]byte
	if _, err := io.ReadFull(c.br, hello[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint64(hello[0:]) != nbdMagic || binary.BigEndian.Uint64(hello[8:]) != nbdIHaveOpt {
		return fmt.Errorf("bad greeting % x", hello)
	}
	b := binary.BigEndian.AppendUint32(nil, 3) // fixed newstyle, no zeroes
	b = binary.BigEndian.AppendUint64(b, nbdIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, nbdOptGo)
	b = binary.BigEndian.AppendUint32(b, uint32(4+len(name)+2))
	b = binary.BigEndian.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, 0)
	if _, err := c.nc.Write(b); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return err
		}
		if binary.BigEndian.Uint64(h[0:]) != nbdOptReply {
			return fmt.Errorf("bad option reply magic")
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 1<<20 {
			return fmt.Errorf("option reply of %d bytes", n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.br, data); err != nil {
			return err
		}
		switch {
		case typ == nbdRepAck:
			if c.Size == 0 {
				return fmt.Errorf("no export info before ack")
			}
			_ = c.nc.SetDeadline(time.Time{})
			return nil
		case typ == nbdRepInfo:
			if len(data) >= 10 && binary.BigEndian.Uint16(data) == 0 {
				c.Size = int64(binary.BigEndian.Uint64(data[2:]))
			}
		case typ&(1<<31) != 0:
			return fmt.Errorf("export refused (reply %#x): %s", typ, data)
		}
	}
}

// Close sends a disconnect and closes the connection.
func (c *Client) Close() error {
	_ = c.nc.SetDeadline(time.Now().Add(time.Second))
	_, _ = c.nc.Write(c.request(nbdCmdDisc, 0, 0))
	return c.nc.Close()
}

func (c *Client) request(cmd uint16, off uint64, n uint32) []byte {
	c.handle++
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 28), nbdReqMagic)
	b = binary.BigEndian.AppendUint16(b, 0)
	b = binary.BigEndian.AppendUint16(b, cmd)
	b = binary.BigEndian.AppendUint64(b, c.handle)
	b = binary.BigEndian.AppendUint64(b, off)
	return binary.BigEndian.AppendUint32(b, n)
}

// do sends one request and waits for its reply; data is the payload of a
// write or the buffer of a read.
func (c *Client) do(cmd uint16, off int64, data []byte) error {
	_ = c.nc.SetDeadline(time.Now().Add(c.timeout))
	req := c.request(cmd, uint64(off), uint32(len(data)))
	if cmd == nbdCmdWrite {
		req = append(req, data...)
	}
	if _, err := c.nc.Write(req); err != nil {
		return err
	}
	var h [16]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(h[0:]) != nbdReplyMagic || binary.BigEndian.Uint64(h[8:]) != c.handle {
		return fmt.Errorf("bad reply header % x", h)
	}
	if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
		return &ErrServer{Errno: e}
	}
	if cmd == nbdCmdRead {
		if _, err := io.ReadFull(c.br, data); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (c *Client) ReadAt(p []byte, off int64) error { return c.do(nbdCmdRead, off, p) }

// WriteAt writes p at off.
func (c *Client) WriteAt(p []byte, off int64) error { return c.do(nbdCmdWrite, off, p) }

// Flush asks for every completed write to be durable.
func (c *Client) Flush() error { return c.do(nbdCmdFlush, 0, nil) }

// Abort closes the connection at once, without a disconnect request.
func (c *Client) Abort() error { return c.nc.Close() }

// SendRead sends a read request and does not wait for the reply (the
// caller aborts the connection with the request in flight).
func (c *Client) SendRead(n uint32, off int64) error {
	_ = c.nc.SetDeadline(time.Now().Add(c.timeout))
	_, err := c.nc.Write(c.request(nbdCmdRead, uint64(off), n))
	return err
}
