package kernel

import (
	"fmt"
	"io"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// The kernel nbd driver speaks NBD on a plain socket; it has no TLS. As
// nbd-client does in its TLS mode (it forks a GnuTLS proxy and gives the
// kernel one end of a socketpair), the keeper negotiates NBD over TLS
// itself, then hands the kernel one end of a unix socketpair and copies
// between the other end and the TLS connection. The proxy lives in the
// keeper process: when the keeper reconnects (failover, server restart),
// each new connection negotiates TLS again and gets a new proxy.

// tlsProxy returns the kernel's end of a socketpair whose other end is
// copied to and from tc until either side closes.
func tlsProxy(tc net.Conn) (net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tls proxy: socketpair: %w", err)
	}
	mine, err := fileConn(fds[0], "nbd-tls-proxy")
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	kern, err := fileConn(fds[1], "nbd-tls-kernel")
	if err != nil {
		mine.Close()
		return nil, err
	}
	go pump(tc, mine)
	return kern, nil
}

func fileConn(fd int, name string) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), name)
	c, err := net.FileConn(f) // dups the descriptor
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("tls proxy: %w", err)
	}
	return c, nil
}

// pump copies both ways; the first direction to end closes both
// connections, so the kernel sees a dead link (and the keeper
// reconnects) when the TLS connection breaks, and the server sees the
// connection close when the kernel drops its socket.
func pump(tc, plain net.Conn) {
	var once sync.Once
	stop := func() {
		once.Do(func() {
			tc.Close()
			plain.Close()
		})
	}
	go func() {
		_, _ = io.Copy(tc, plain)
		stop()
	}()
	_, _ = io.Copy(plain, tc)
	stop()
}
