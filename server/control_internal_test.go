package server

import (
	"errors"
	"strings"
	"syscall"
	"testing"

	"github.com/blockd/blockd/api"
	"github.com/blockd/blockd/blockdev"
	"github.com/blockd/blockd/replication"
)

// TestLiveDeviceNotPrimary: a server-hosted ublk device whose volume is
// not primary here (demoted, or not yet promoted) fails every request at
// once with ErrNotPrimary, which the ublk queue completes as -EPERM: the
// kernel gets an error, never a hang. An unknown volume fails the same way.
func TestLiveDeviceNotPrimary(t *testing.T) {
	host := replication.NewHost(replication.HostConfig{ServerID: "local"})
	s := &Server{cfg: Config{ServerID: "local"}, host: host, vols: map[string]*hosted{
		"v": {name: "v", host: host, primary: api.ServerRef{ServerID: "other", NBDAddr: "10.0.0.2:10809"}},
	}}
	d := &liveDevice{s: s, name: "v", size: 1 << 20, blockSize: 4096}
	buf := make([]byte, 4096)
	ops := map[string]error{
		"read":         d.ReadAt(buf, 0),
		"write":        d.WriteAt(buf, 0, true),
		"flush":        d.Flush(),
		"trim":         d.Trim(0, 4096),
		"write_zeroes": d.WriteZeroes(0, 4096, true),
	}
	for op, err := range ops {
		if !errors.Is(err, blockdev.ErrNotPrimary) || blockdev.Errno(err) != syscall.EPERM {
			t.Errorf("%s: %v (errno %v), want ErrNotPrimary/EPERM", op, err, blockdev.Errno(err))
		}
	}
	if err := d.WriteAt(buf, 0, false); err == nil || !errors.Is(err, blockdev.ErrNotPrimary) {
		t.Fatalf("write: %v", err)
	} else if got := err.Error(); !strings.Contains(got, "primary is server other") {
		t.Errorf("error does not name the primary: %s", got)
	}
	gone := &liveDevice{s: s, name: "gone", size: 1 << 20, blockSize: 4096}
	if err := gone.ReadAt(buf, 0); !errors.Is(err, errUnknownVolume) || blockdev.Errno(err) != syscall.EIO {
		t.Errorf("unknown volume: %v (errno %v)", err, blockdev.Errno(err))
	}
}
