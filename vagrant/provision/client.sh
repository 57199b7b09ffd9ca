#!/usr/bin/env bash
# The client: create the volume (once), attach it through the kernel nbd
# driver with a keeper unit, mkfs (once), mount, and run a fio check.
source "$(dirname "$0")/lib.sh"

MASTER=${MASTER:?}
VOLUME=${VOLUME:-vol0}
VOLUME_SIZE=${VOLUME_SIZE:-2GiB}
RF=${RF:-2}
DURABILITY=${DURABILITY:-sync_all}
WAL_SIZE=${WAL_SIZE:-}   # empty: the preset's
DEVICE=${DEVICE:-/dev/nbd0}
MNT=${MNT:-$ROOT/mnt/$VOLUME}
FIO_SIZE=${FIO_SIZE:-64M}
CLIENT_NAME=${CLIENT_NAME:-client}   # its certificate (master.sh CLIENTS)

install_tls "$PKI_SHARE/clients/$CLIENT_NAME"
export BLOCKD_TLS_CERT=$TLS_DIR/client-cert.pem BLOCKD_TLS_KEY=$TLS_DIR/client-key.pem BLOCKD_TLS_CA=$TLS_DIR/ca-cert.pem

if [ -z "$ROOT" ]; then
	modprobe nbd
	echo nbd >/etc/modules-load.d/nbd.conf
fi

# The servers register asynchronously: retry create until placement works.
if ! "$BLOCKD" volume info --master "$MASTER" "$VOLUME" >/dev/null 2>&1; then
	wait_for 180 "$BLOCKD" volume create --master "$MASTER" --size "$VOLUME_SIZE" --rf "$RF" --durability "$DURABILITY" ${WAL_SIZE:+--wal-size "$WAL_SIZE"} "$VOLUME"
fi
"$BLOCKD" volume info --master "$MASTER" "$VOLUME"

name=blockd-attach-$VOLUME
unit "$name" "blockd keeper of $VOLUME on $DEVICE" \
	"$BLOCKD attach nbd --master $MASTER --device $DEVICE --connections 2 $(tls_flags client) $VOLUME"
start "$name"
dev=$(basename "$DEVICE")
attached() { [ "$(cat "/sys/block/$dev/size" 2>/dev/null || echo 0)" != 0 ]; }
if ! wait_for 120 attached; then
	[ -f "$STATE/$name.log" ] && tail -20 "$STATE/$name.log"
	have_systemd && journalctl -u "$name" -n 20 --no-pager
	exit 1
fi
log "$VOLUME attached at $DEVICE (backend $(cat /sys/block/$dev/backend 2>/dev/null))"

if ! dumpe2fs -h "$DEVICE" >/dev/null 2>&1; then
	log "mkfs.ext4 $DEVICE"
	mkfs.ext4 -q -F "$DEVICE"
fi
mkdir -p "$MNT"
mountpoint -q "$MNT" 2>/dev/null || grep -q " $MNT " /proc/mounts || mount -t ext4 "$DEVICE" "$MNT"
log "mounted at $MNT; fio check"
fio --name=blockd-check --directory="$MNT" --size="$FIO_SIZE" --rw=randwrite --bs=4k \
	--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_fatal=1 \
	>"$STATE/fio.out"
grep -E 'WRITE:|READ:' "$STATE/fio.out" || true
log "fio check passed (crc32c verify; full output in $STATE/fio.out)"
echo "BLOCKD-CLIENT-OK $MNT"
