// Package nbdkern runs the kernel NBD path in a Debian 6.12 guest
// (tests/vm/vmtest): Debian's nbd-client and `blockd attach nbd` against a
// server inside the guest, mkfs/mount/verify, a server kill -9 under writes
// with the keeper reconnecting by itself, and failover.
package nbdkern

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// prelude is sourced by every guest script.
const prelude = `
waitfor() { # waitfor SECONDS CMD...: poll until CMD succeeds
	n=$(( $1 * 10 )); shift
	while ! "$@" 2>/dev/null; do
		n=$((n-1)); [ $n -gt 0 ] || { echo "waitfor timed out: $*"; return 1; }
		sleep 0.1
	done
}
listening() { # listening PORT: a TCP socket listens on PORT
	grep -q "$(printf ':%04X 00000000:0000 0A' $1)" /proc/net/tcp
}
start_server() { # start the NBD server in the background; SERVER is its pid
	$SERVER_CMD >>/tmp/server.log 2>&1 &
	SERVER=$!
	waitfor 120 listening 10809 || { cat /tmp/server.log; return 1; }
	# blockd serve creates vol0 after it starts listening: wait for it
	[ -z "$SERVER_READY" ] || waitfor 120 $SERVER_READY || { cat /tmp/server.log; return 1; }
	echo "server up (pid $SERVER)"
}
fs_write() { # fs_write DIR PREFIX N: N files of random data, checksums in /tmp/PREFIX.sums
	for i in $(seq 1 $3); do
		dd if=/dev/urandom of=$1/$2$i bs=64k count=$((i*4)) 2>/dev/null
	done
	(cd $1 && sha256sum $2* > /tmp/$2.sums)
}
fs_verify() { # fs_verify DIR PREFIX
	(cd $1 && sha256sum -c /tmp/$2.sums) >/tmp/verify.out || { cat /tmp/verify.out; return 1; }
	echo "verified $(wc -l </tmp/$2.sums) files $2*"
}
fs_roundtrip() { # mkfs, mount, write, umount, e2fsck -fn, remount, verify
	mkfs.ext4 -q -F $1
	mkdir -p /mnt/v
	mount -t ext4 $1 /mnt/v
	fs_write /mnt/v rt 6
	umount /mnt/v
	e2fsck -fn $1
	mount -t ext4 $1 /mnt/v
	fs_verify /mnt/v rt
	umount /mnt/v
}
attach() { # attach [ARGS...]: blockd attach nbd in the background; DEV and KEEPER
	rm -f /tmp/dev
	blockd attach nbd $ATTACH_ARGS "$@" vol0 >/tmp/dev 2>>/tmp/attach.log &
	KEEPER=$!
	n=600
	while ! test -s /tmp/dev; do
		kill -0 $KEEPER 2>/dev/null || { echo "attach exited"; cat /tmp/attach.log; return 1; }
		n=$((n-1)); [ $n -gt 0 ] || { echo "attach timed out"; cat /tmp/attach.log; return 1; }
		sleep 0.1
	done
	DEV=$(cat /tmp/dev)
	test -b $DEV
	echo "attached $DEV (keeper $KEEPER, backend $(cat /sys/block/$(basename $DEV)/backend))"
}
`

type server struct {
	name       string
	binaries   map[string]string
	cmd        string // SERVER_CMD
	ready      string // SERVER_READY: a command that succeeds once vol0 is served
	attachArgs string // how attach finds the server
}

var (
	srvOnce sync.Once
	srv     server
)

// guestServer is `blockd serve` (master + volume server in one process)
// inside the guest.
func guestServer(t *testing.T) server {
	t.Helper()
	vmtest.Require(t)
	blockd := vmtest.BuildBlockd(t)
	srvOnce.Do(func() {
		srv = server{
			name:       "blockd serve",
			binaries:   map[string]string{"/usr/local/bin/blockd": blockd},
			cmd:        "blockd serve --log-file - --data /tmp/bd --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:256MiB",
			ready:      "blockd volume info --master 127.0.0.1:9333 --timeout 5s vol0",
			attachArgs: "--master 127.0.0.1:9333",
		}
	})
	return srv
}

func boot(t *testing.T, s server, script string) vmtest.Result {
	t.Helper()
	return vmtest.Boot(t, vmtest.Guest{
		Binaries:  s.binaries,
		Files:     map[string][]byte{"/etc/passwd": []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")},
		Env:       map[string]string{"SERVER_CMD": s.cmd, "SERVER_READY": s.ready, "ATTACH_ARGS": s.attachArgs},
		Script:    prelude + script,
		MemoryMiB: 2048,
		Timeout:   8 * time.Minute,
	})
}

func expect(t *testing.T, res vmtest.Result, markers ...string) {
	t.Helper()
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d (console in the log above)", res.ExitCode)
	}
	for _, m := range markers {
		if !strings.Contains(res.Output, m) {
			t.Errorf("console lacks %q", m)
		}
	}
	for _, bad := range []string{"EXT4-fs error", "Buffer I/O error", "I/O error, dev nbd", "write failed"} {
		if strings.Contains(res.Console, bad) {
			t.Errorf("console has %q", bad)
		}
	}
}

// TestNBDClientExt4 is scenario 1: Debian's nbd-client with 2 connections.
func TestNBDClientExt4(t *testing.T) {
	s := guestServer(t)
	res := boot(t, s, `
start_server
# the port may open before the volume is served: retry until it negotiates
waitfor 60 nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -C 2 -b 4096
echo "nbd0 size $(cat /sys/block/nbd0/size) sectors, block $(cat /sys/block/nbd0/queue/logical_block_size)"
fs_roundtrip /dev/nbd0
nbd-client -d /dev/nbd0
echo SCENARIO1-OK
`)
	expect(t, res, "SCENARIO1-OK", "verified 6 files rt")
}

// TestAttachExt4 is scenario 2: blockd attach nbd, the same round trip,
// plus the clear errors (busy device, unknown volume, detach while
// mounted) and a clean detach that ends the keeper with status 0.
func TestAttachExt4(t *testing.T) {
	s := guestServer(t)
	res := boot(t, s, `
start_server
attach --connections 2
test "$(cat /sys/block/$(basename $DEV)/backend)" = vol0
fs_roundtrip $DEV

# the device is busy: a second attach onto it fails clearly
if blockd attach nbd $ATTACH_ARGS --device $DEV vol0 >/dev/null 2>/tmp/err; then echo "second attach succeeded"; exit 1; fi
cat /tmp/err; grep -q busy /tmp/err
# an unknown volume fails clearly, and leaves no device behind
if blockd attach nbd $ATTACH_ARGS nosuchvol >/dev/null 2>/tmp/err; then echo "attach of unknown volume succeeded"; exit 1; fi
cat /tmp/err; grep -q 'unknown volume' /tmp/err
# a non-root caller is refused clearly
if su nobody -s /bin/sh -c "blockd attach nbd $ATTACH_ARGS vol0" >/dev/null 2>/tmp/err; then echo "non-root attach succeeded"; exit 1; fi
cat /tmp/err; grep -q 'needs root' /tmp/err
# detach refuses while mounted
mount -t ext4 $DEV /mnt/v
if blockd detach $DEV 2>/tmp/err; then echo "detach while mounted succeeded"; exit 1; fi
cat /tmp/err; grep -q mounted /tmp/err
fs_verify /mnt/v rt
umount /mnt/v

blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
test "$(cat /sys/block/$(basename $DEV)/size)" = 0
cat /tmp/attach.log
echo SCENARIO2-OK
`)
	expect(t, res, "SCENARIO2-OK", "keeper exit 0", "verified 6 files rt")
}

// TestAttachSurvivesServerKill is scenario 3: kill -9 of the server while
// the filesystem is mounted and being written; the server restarts on the
// same data; the keeper reconnects by itself; writes continue without
// errors; synced files are intact and e2fsck is clean.
func TestAttachSurvivesServerKill(t *testing.T) {
	s := guestServer(t)
	res := boot(t, s, `
start_server
attach --connections 2 --timeout 10s --give-up 3m
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/v
mount -t ext4 $DEV /mnt/v
fs_write /mnt/v before 4
sync
( i=0; while [ ! -f /tmp/stop ]; do
	i=$((i+1))
	dd if=/dev/urandom of=/mnt/v/w$((i%8)) bs=64k count=4 conv=fsync 2>/tmp/writer.err || { echo "writer: write failed ($i): $(tail -1 /tmp/writer.err)"; break; }
  done; echo "writer: $i writes" ) &
WRITER=$!
sleep 2
kill -9 $SERVER
wait $SERVER || true
echo "server killed"
sleep 1
start_server
waitfor 180 grep -q nbd_reconnected /tmp/attach.log || { cat /tmp/attach.log; exit 1; }
echo "keeper reconnected"
sleep 2
touch /tmp/stop
wait $WRITER
fs_write /mnt/v after 3
sync
fs_verify /mnt/v before
umount /mnt/v
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/v
fs_verify /mnt/v before
fs_verify /mnt/v after
umount /mnt/v
blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
grep -E 'nbd_(link_dead|reconnect|reconnected|reconnect_failed)' /tmp/attach.log | head -20
echo SCENARIO3-OK
`)
	expect(t, res, "SCENARIO3-OK", "keeper reconnected", "keeper exit 0", "verified 4 files before", "verified 3 files after")
}

// TestAttachGivesUp: with the server gone for good, the keeper gives up
// after --give-up, disconnects the device so that pending and new I/O fail
// with EIO instead of hanging, and exits non-zero.
func TestAttachGivesUp(t *testing.T) {
	s := guestServer(t)
	res := boot(t, s, `
start_server
attach --connections 1 --timeout 5s --give-up 8s
dd if=/dev/urandom of=$DEV bs=4k count=16 oflag=direct 2>/dev/null
kill -9 $SERVER
wait $SERVER || true
echo "server killed for good"
start=$(date +%s)
if dd if=/dev/urandom of=$DEV bs=4k count=16 oflag=direct 2>/tmp/dd.err; then echo "write after give-up succeeded"; exit 1; fi
echo "write failed after $(( $(date +%s) - start ))s: $(tail -1 /tmp/dd.err)"
rc=0; wait $KEEPER || rc=$?
echo "keeper exit $rc"
test $rc -ne 0
grep -E 'nbd_give_up' /tmp/attach.log
# the device is released (disconnected, size 0), not left hanging
waitfor 30 sh -c "test \"\$(cat /sys/block/$(basename $DEV)/size)\" = 0"
echo GIVEUP-OK
`)
	if res.ExitCode != 0 || !strings.Contains(res.Output, "GIVEUP-OK") {
		t.Fatalf("give-up scenario failed: exit %d", res.ExitCode)
	}
}

// TestAttachFollowsFailover is scenario 4: a master and two volume servers
// in the guest, a volume with RF=2 sync_all, mounted through blockd attach;
// the primary is killed; the master promotes the in-sync replica; the keeper
// finds the new primary and reconnects; files synced before the kill read
// back intact through it. The old primary left the acting set in the same
// decision that promoted the replica, and RF=2 defaults to min_copies 1, so
// synced writes go on at once on the new primary alone (nothing waits for
// the dead server). The old primary is then restarted, catches up as a
// stale replica, re-enters the set, and more synced writes, umount and
// e2fsck -fn follow.
func TestAttachFollowsFailover(t *testing.T) {
	vmtest.Require(t)
	blockd := vmtest.BuildBlockd(t)
	s := server{
		name:       "cluster",
		binaries:   map[string]string{"/usr/local/bin/blockd": blockd},
		attachArgs: "--master 127.0.0.1:9333",
	}
	res := boot(t, s, `
M="--master 127.0.0.1:9333"
blockd master --data /tmp/m --api 127.0.0.1:9333 >/tmp/master.log 2>&1 &
waitfor 120 listening 9333 || { cat /tmp/master.log; exit 1; }
S1CMD="blockd server --data /tmp/s1 $M --id s1 --listen 127.0.0.1:7001 --nbd 127.0.0.1:10801"
S2CMD="blockd server --data /tmp/s2 $M --id s2 --listen 127.0.0.1:7002 --nbd 127.0.0.1:10802"
$S1CMD >>/tmp/s1.log 2>&1 &
S1=$!
$S2CMD >>/tmp/s2.log 2>&1 &
S2=$!
waitfor 120 listening 10801 || { cat /tmp/s1.log; exit 1; }
waitfor 120 listening 10802 || { cat /tmp/s2.log; exit 1; }
waitfor 60 blockd volume create $M --size 256MiB --rf 2 --durability sync_all --wal-size 64MiB vol0 || { cat /tmp/master.log; exit 1; }
info() { blockd volume info $M -o json vol0 | tr -d ' \n'; }
primary_nbd() { info | grep -o '"primary":{[^}]*}' | grep -o '"nbd_addr":"[^"]*"' | cut -d'"' -f4; }
in_sync() { info | grep -q '"state":"InSync"'; }
has_primary() { test -n "$(primary_nbd)"; }
moved() { p=$(primary_nbd); test -n "$p" && test "$p" != "$OLD"; }
waitfor 120 has_primary || { blockd volume info $M vol0; exit 1; }
attach --connections 2 --timeout 10s --give-up 4m
mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 $DEV
mkdir -p /mnt/v
mount -t ext4 -o noatime $DEV /mnt/v
fs_write /mnt/v before 4
sync
waitfor 120 in_sync || { blockd volume info $M vol0; exit 1; }
blockd volume info $M vol0
OLD=$(primary_nbd)
case $OLD in *:10801) VICTIM=$S1; VCMD=$S1CMD; VLOG=/tmp/s1.log;; *:10802) VICTIM=$S2; VCMD=$S2CMD; VLOG=/tmp/s2.log;; *) echo "unknown primary $OLD"; exit 1;; esac
kill -9 $VICTIM
echo "killed primary at $OLD"
waitfor 240 moved || { blockd volume info $M vol0; tail -30 /tmp/master.log; exit 1; }
NEW=$(primary_nbd)
echo "new primary: $NEW"
waitfor 240 grep -q "nbd_reconnected.*addr=$NEW" /tmp/attach.log || { cat /tmp/attach.log; exit 1; }
echo "keeper followed the new primary"
# the synced files, read through the new primary (not the page cache)
echo 3 > /proc/sys/vm/drop_caches
fs_verify /mnt/v before
# synced writes go on while the old primary is still dead
fs_write /mnt/v during 2
sync
echo "synced writes while the old primary is dead"
# the old primary comes back as a stale replica, catches up and re-enters the set
$VCMD >>$VLOG 2>&1 &
waitfor 240 in_sync || { blockd volume info $M vol0; tail -30 $VLOG; exit 1; }
in_set() { info | grep -o '"acting_set":\[[^]]*\]' | grep -q ','; }
waitfor 240 in_set || { blockd volume info $M vol0; tail -30 /tmp/master.log; exit 1; }
blockd volume info $M vol0
fs_write /mnt/v after 2
sync
umount /mnt/v
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/v
fs_verify /mnt/v before
fs_verify /mnt/v during
fs_verify /mnt/v after
umount /mnt/v
blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
grep -E 'nbd_(primary|link_dead|reconnected|reconnect_failed)' /tmp/attach.log | tail -20
echo SCENARIO4-OK
`)
	expect(t, res, "SCENARIO4-OK", "keeper followed the new primary", "synced writes while the old primary is dead", "keeper exit 0", "verified 4 files before", "verified 2 files during", "verified 2 files after")
}

// TestVagrantProvisioning runs vagrant/provision inside one guest: the
// master, three servers and the client as "nodes" with their own $ROOT and
// 127.0.0.x addresses, through the systemd units' ExecStart lines, up to
// the mounted filesystem and the fio check. It keeps the scripts from
// rotting where no Vagrant exists.
func TestVagrantProvisioning(t *testing.T) {
	vmtest.Require(t)
	files := map[string][]byte{}
	scripts, _ := filepath.Glob("../../../vagrant/provision/*.sh")
	if len(scripts) == 0 {
		t.Fatal("no vagrant/provision scripts found")
	}
	for _, s := range scripts {
		b, err := os.ReadFile(s)
		if err != nil {
			t.Fatal(err)
		}
		files["/opt/provision/"+filepath.Base(s)] = b
	}
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries:  map[string]string{"/usr/local/bin/blockd": vmtest.BuildBlockd(t)},
		Files:     files,
		Tools:     []string{"bash", "fio"},
		MemoryMiB: 2048,
		Timeout:   8 * time.Minute,
		Script: `
P=/opt/provision
export BLOCKD=/usr/local/bin/blockd BLOCKD_SRC=/usr/local/bin/blockd
for n in master s1 s2 s3 client; do ROOT=/tmp/n-$n bash $P/install.sh; done
ROOT=/tmp/n-master MASTER_IP=127.0.0.10 SERVERS="s1=127.0.0.11 s2=127.0.0.12 s3=127.0.0.13" bash $P/master.sh
for i in 1 2 3; do
	ROOT=/tmp/n-s$i SERVER_ID=s$i SERVER_IP=127.0.0.1$i MASTER=127.0.0.10:9333 bash $P/server.sh
done
ROOT=/tmp/n-client MASTER=127.0.0.10:9333 VOLUME=vol0 VOLUME_SIZE=256MiB RF=2 DURABILITY=sync_all WAL_SIZE=64MiB FIO_SIZE=4M bash $P/client.sh
# idempotent: a second run neither recreates nor reformats
ROOT=/tmp/n-client MASTER=127.0.0.10:9333 VOLUME=vol0 VOLUME_SIZE=256MiB RF=2 DURABILITY=sync_all WAL_SIZE=64MiB FIO_SIZE=4M bash $P/client.sh 2>&1 | grep -c mkfs.ext4 | grep -qx 0
cat /tmp/n-client/etc/systemd/system/blockd-attach-vol0.service
# the cluster runs in TLS mode: a client without a certificate is refused
if blockd volume list --master 127.0.0.10:9333 --timeout 5s >/tmp/plain.out 2>&1; then echo "plain client not refused"; exit 1; fi
echo "plain client refused: $(cat /tmp/plain.out)"
grep -q 'tls-' /tmp/n-client/etc/systemd/system/blockd-attach-vol0.service
umount /tmp/n-client/mnt/vol0
blockd detach /dev/nbd0
echo PROVISION-OK
`,
	})
	expect(t, res, "PROVISION-OK", "BLOCKD-CLIENT-OK", "fio check passed")
}
