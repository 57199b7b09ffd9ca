package nbdkern

import (
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// TestAttachSeesExpand: `blockd volume expand` while an ext4 on a
// `blockd attach nbd` device is mounted and written. The server cuts its
// NBD clients off at the commit; the keeper reconnects and hands the
// kernel the new size with the sockets (NBD_CMD_RECONFIGURE with
// NBD_ATTR_SIZE_BYTES, which 6.12's nbd driver applies to a connected
// device), so the same device grows without a detach, resize2fs grows the
// mounted file system, and the files stay intact. The expand prints the
// one-line ublk note (that driver has no size update). Then a read that
// waits on a dead link when the volume grows again completes once the
// keeper reconnects (sockets first, size after: see Device.reconnect).
func TestAttachSeesExpand(t *testing.T) {
	s := guestServer(t)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries:  s.binaries,
		Files:     map[string][]byte{"/etc/passwd": []byte("root:x:0:0:root:/root:/bin/sh\n")},
		Tools:     []string{"resize2fs"},
		Env:       map[string]string{"SERVER_CMD": s.cmd, "SERVER_READY": s.ready, "ATTACH_ARGS": s.attachArgs},
		MemoryMiB: 2048,
		Timeout:   8 * time.Minute,
		Script: prelude + `
start_server
attach --connections 2
SYS=/sys/block/$(basename $DEV)/size
test "$(cat $SYS)" = 524288
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/v
mount -t ext4 $DEV /mnt/v
fs_write /mnt/v ex 4
sync
blockd volume expand --master 127.0.0.1:9333 vol0 --size 512MiB >/tmp/expand.out 2>/tmp/expand.err
cat /tmp/expand.out /tmp/expand.err
test "$(wc -l </tmp/expand.out)" = 1
grep -q 'expanded from 256 MiB to 512 MiB' /tmp/expand.out
grep -q 'ublk' /tmp/expand.err
waitfor 120 sh -c "test \"\$(cat $SYS)\" = 1048576" || { echo "device size $(cat $SYS)"; cat /tmp/attach.log; exit 1; }
echo "device grew to $(cat $SYS) sectors without a detach"
kill -0 $KEEPER
grep nbd_resized /tmp/attach.log
resize2fs $DEV
df -k /mnt/v | tail -1
fs_write /mnt/v grown 3
sync
fs_verify /mnt/v ex
umount /mnt/v
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/v
fs_verify /mnt/v ex
fs_verify /mnt/v grown
umount /mnt/v
# A read waiting on a dead link when the volume grows: the keeper must
# hand the kernel its sockets before the new size (a resize waits for the
# requests in flight; one request with both hung until the give-up).
n0=$(dmesg | grep -c "Receive control failed" || true)
kill -STOP $KEEPER
blockd volume expand --master 127.0.0.1:9333 vol0 --size 768MiB >/dev/null
waitfor 60 sh -c "test \$(dmesg | grep -c 'Receive control failed') -gt $n0"
dd if=$DEV of=/dev/null bs=4096 count=1 skip=1000 iflag=direct 2>/dev/null &
DD=$!
sleep 1
kill -0 $DD && echo "read waits on the dead link"
kill -CONT $KEEPER
waitfor 60 sh -c "! kill -0 $DD" || { echo "read still stuck"; cat /tmp/attach.log; exit 1; }
wait $DD || { echo "read failed"; exit 1; }
echo "waiting read done after the reconnect"
waitfor 60 sh -c "test \"\$(cat $SYS)\" = 1572864" || { echo "device size $(cat $SYS)"; cat /tmp/attach.log; exit 1; }
echo "device grew again to $(cat $SYS) sectors"
blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
echo EXPAND-OK
`,
	})
	expect(t, res, "EXPAND-OK", "without a detach", "keeper exit 0", "verified 4 files ex", "verified 3 files grown",
		"read waits on the dead link", "waiting read done after the reconnect", "device grew again to 1572864 sectors")
}
