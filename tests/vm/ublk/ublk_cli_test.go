package ublk_test

import (
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// TestBlockdAttachUblk runs the documented CLI in the guest: `blockd serve`
// hosts vol0, `blockd attach ublk vol0` (asking the master for the
// primary, reaching it over NBD) prints /dev/ublkbN and serves it; ext4
// round trip on it; then the device is detached (STOP_DEV + DEL_DEV from
// another process) and the attach process exits 0. A second attach is
// stopped with SIGTERM.
func TestBlockdAttachUblk(t *testing.T) {
	vmtest.Require(t)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{
			"/usr/local/bin/blockd":    vmtest.BuildBlockd(t),
			"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve"),
		},
		MemoryMiB: 2048,
		Timeout:   8 * time.Minute,
		Script: prelude + `
blockd serve --log-file - --data /tmp/bd --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:256MiB >/tmp/serve.log 2>&1 &
attached() { test -s /tmp/attach.out || ! kill -0 $ATT; }
blockd attach ublk vol0 >/tmp/attach.out 2>/tmp/attach.log &
ATT=$!
waitfor 120 attached
DEV=$(cat /tmp/attach.out)
test -b "$DEV" || { cat /tmp/attach.log /tmp/serve.log; exit 1; }
echo "attached at $DEV"
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/u && mount -t ext4 $DEV /mnt/u
dd if=/dev/urandom of=/mnt/u/f bs=1M count=16 2>/dev/null
md5sum /mnt/u/f > /tmp/sum
umount /mnt/u
e2fsck -fn $DEV
ublkserve --detach $DEV
wait $ATT
echo "attach exited with $?"
test ! -e $DEV
rm -f /tmp/attach.out
blockd attach ublk vol0 --nbd 127.0.0.1:10809 >/tmp/attach.out 2>/tmp/attach2.log &
ATT=$!
waitfor 120 attached
DEV=$(cat /tmp/attach.out)
mount -t ext4 $DEV /mnt/u
md5sum -c /tmp/sum
umount /mnt/u
kill -TERM $ATT; wait $ATT
echo "attach exited with $? after SIGTERM"
test ! -e $DEV
echo BLOCKD-ATTACH-UBLK-OK
`,
	})
	expect(t, res, "BLOCKD-ATTACH-UBLK-OK", "attach exited with 0", "attach exited with 0 after SIGTERM")
}
