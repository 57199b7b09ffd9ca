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
// one-line ublk note (that driver has no size update).
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
blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
echo EXPAND-OK
`,
	})
	expect(t, res, "EXPAND-OK", "without a detach", "keeper exit 0", "verified 4 files ex", "verified 3 files grown")
}
