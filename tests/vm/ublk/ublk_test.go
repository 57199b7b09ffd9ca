// Package ublk_test runs the ublk frontend against the real ublk_drv in a
// Debian 6.12 guest (tests/vm/vmtest): filesystem round trips, fio
// verification, restart with user recovery, detach under load, and a
// ublk-vs-NBD benchmark.
package ublk_test

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// prelude is sourced by every guest script: it starts helpers that wait
// for conditions instead of sleeping blindly.
const prelude = `
waitfor() { # waitfor SECONDS CMD...: poll until CMD succeeds
	n=$(( $1 * 10 )); shift
	while ! "$@" 2>/dev/null; do
		n=$((n-1)); [ $n -gt 0 ] || { echo "waitfor timed out: $*"; return 1; }
		sleep 0.1
	done
}
serve() { # serve LOG ARGS...: start ublkserve in the background, wait until ready
	log=$1; shift
	rm -f /tmp/ready
	ublkserve --ready /tmp/ready "$@" >>$log 2>&1 &
	SERVER=$!
	waitfor 60 test -s /tmp/ready || { cat $log; return 1; }
	DEV=$(cat /tmp/ready)
	echo "serving $DEV (pid $SERVER)"
}
`

func boot(t *testing.T, script string, tools ...string) vmtest.Result {
	t.Helper()
	return vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve")},
		Tools:    tools,
		Script:   prelude + script,
		Timeout:  8 * time.Minute,
	})
}

func expect(t *testing.T, res vmtest.Result, markers ...string) {
	t.Helper()
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d", res.ExitCode)
	}
	for _, m := range markers {
		if !strings.Contains(res.Console, m) {
			t.Errorf("console lacks %q", m)
		}
	}
}

// TestUblkExt4 formats /dev/ublkbN, writes files with checksums, checks the
// filesystem with e2fsck -fn and verifies the data after a remount and after
// the device is deleted and served again from the same backing file.
func TestUblkExt4(t *testing.T) {
	res := boot(t, `
serve /tmp/s1.log --file /tmp/vol.img --size 256M
test -b $DEV
cat /sys/block/$(basename $DEV)/queue/logical_block_size /sys/block/$(basename $DEV)/queue/physical_block_size
echo "write_cache: $(cat /sys/block/$(basename $DEV)/queue/write_cache) fua: $(cat /sys/block/$(basename $DEV)/queue/fua)"
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/u
mount -t ext4 $DEV /mnt/u
for i in 1 2 3 4 5 6 7 8; do
	dd if=/dev/urandom of=/mnt/u/f$i bs=64k count=$((i*8)) 2>/dev/null
done
(cd /mnt/u && md5sum f* > /tmp/sums)
sync
umount /mnt/u
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/u
(cd /mnt/u && md5sum -c /tmp/sums)
fstrim -v /mnt/u || true
umount /mnt/u
kill -TERM $SERVER; wait $SERVER
test ! -e $DEV
echo "deleted ok"
serve /tmp/s2.log --file /tmp/vol.img
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/u
(cd /mnt/u && md5sum -c /tmp/sums)
umount /mnt/u
kill -TERM $SERVER; wait $SERVER
cat /tmp/s1.log /tmp/s2.log
echo UBLK-EXT4-OK
`)
	expect(t, res, "UBLK-EXT4-OK", "deleted ok")
}
