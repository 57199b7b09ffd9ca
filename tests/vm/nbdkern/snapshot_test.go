package nbdkern

import "testing"

// TestSnapshotRestoreExt4: ext4 on the volume over the kernel nbd driver
// (blockd attach nbd); a snapshot of the frozen filesystem; files changed,
// deleted and added; the snapshot itself attached read-only with
// nbd-client (VOLUME@SNAP) fscks clean and holds the old files; then
// unmount, detach, restore, attach again: e2fsck is clean and the files
// are as they were when the snapshot was taken.
func TestSnapshotRestoreExt4(t *testing.T) {
	s := guestServer(t)
	res := boot(t, s, `
M="--master 127.0.0.1:9333"
start_server
attach --connections 2
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/v /mnt/s
mount -t ext4 $DEV /mnt/v
fs_write /mnt/v keep 5
sync
fsfreeze --freeze /mnt/v
blockd snapshot create vol0 before $M
fsfreeze --unfreeze /mnt/v
blockd snapshot list vol0 $M

# change the files: overwrite one, delete one, add new ones
dd if=/dev/urandom of=/mnt/v/keep1 bs=64k count=8 conv=notrunc 2>/dev/null
rm /mnt/v/keep2
fs_write /mnt/v new 3
sync
if (cd /mnt/v && sha256sum -c /tmp/keep.sums) >/dev/null 2>&1; then echo "the changes did not change the files"; exit 1; fi
echo "files changed"

# the snapshot through the kernel: read-only, clean, the old files
waitfor 30 nbd-client 127.0.0.1 10809 /dev/nbd9 -N vol0@before -b 4096 -readonly
test "$(cat /sys/block/nbd9/ro)" = 1
e2fsck -fn /dev/nbd9
mount -t ext4 -o ro /dev/nbd9 /mnt/s
fs_verify /mnt/s keep
umount /mnt/s
nbd-client -d /dev/nbd9
echo "snapshot verified over the kernel driver"

umount /mnt/v
blockd detach $DEV
wait $KEEPER
blockd snapshot restore vol0 before $M | tee /tmp/restore.out
grep -q reconnect /tmp/restore.out
attach --connections 2
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/v
fs_verify /mnt/v keep
test ! -e /mnt/v/new1
umount /mnt/v
blockd detach $DEV
wait $KEEPER
# the snapshot stays after the restore
blockd snapshot list vol0 $M -o json | grep -q '"name": "before"'
echo SNAPSHOT-RESTORE-OK
`)
	expect(t, res, "SNAPSHOT-RESTORE-OK", "files changed", "snapshot verified over the kernel driver", "verified 5 files keep")
}
