package ublk_test

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tests/vm/vmtest"
)

// TestBlockdServeHostsUblk: when the volume's primary is the local
// `blockd serve`, `blockd attach ublk vol0` (run in serve's directory, so
// it finds ./blockd-data/server/control.sock) has the serve process itself
// create and serve /dev/ublkbN on its engine and exits at once. ext4 is
// made, mounted and written to with checksums by a writer loop while the
// serve process is killed with SIGKILL and restarted, then stopped with
// SIGTERM and restarted (same data directory): each new process recovers
// the device (user recovery, reissue), the writer sees no error, the kernel
// logs none, and the data and e2fsck -fn are intact. `blockd detach`
// removes the device through the server, which forgets it.
func TestBlockdServeHostsUblk(t *testing.T) {
	vmtest.Require(t)
	testenv.RequireTool(t, "fio")
	res := vmtest.Boot(t, vmtest.Guest{
		Tools: []string{"fio"},
		Binaries: map[string]string{
			"/usr/local/bin/blockd":    vmtest.BuildBlockd(t),
			"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve"),
		},
		MemoryMiB: 2048,
		Timeout:   10 * time.Minute,
		Script: prelude + writerScript + `
cd /tmp
starts=0
serve_up() { [ "$(grep -c 'blockd is serving volume' /tmp/serve.log)" -ge $starts ] || ! kill -0 $SERVE; }
start_serve() {
	starts=$((starts+1))
	blockd serve --log-file - --volume vol0:256MiB >>/tmp/serve.log 2>&1 &
	SERVE=$!
	waitfor 180 serve_up
	kill -0 $SERVE || { echo "serve exited"; tail -n 40 /tmp/serve.log; exit 1; }
	echo "serve started (pid $SERVE)"
}
recovered() { [ "$(grep -c 'msg=ublk_recovered' /tmp/serve.log)" -ge $1 ]; }
holders() { # processes holding /dev/ublkcN open
	for p in /proc/[0-9]*; do
		ls -l $p/fd 2>/dev/null | grep -q "/dev/ublkc$ID" && echo ${p#/proc/}
	done; true
}
start_serve
blockd attach ublk vol0 >/tmp/attach.out 2>/tmp/attach.log
echo "attach exited with $?"
DEV=$(cat /tmp/attach.out)
test -b "$DEV" || { cat /tmp/attach.log; exit 1; }
ID=${DEV#/dev/ublkb}
echo "attached at $DEV"
grep -q 'msg=ublk_local_attached' /tmp/attach.log && echo "attach used the local server"
grep -q 'msg=ublk_served' /tmp/serve.log && echo "serve hosts the device"
h=$(holders)
echo "ublkc$ID held by: $h (serve is $SERVE)"
[ "$h" = "$SERVE" ] && echo "only the serve process serves the device"
cat blockd-data/server/ublk.json
blockd attach ublk vol0 >/tmp/attach2.out 2>>/tmp/attach.log
[ "$(cat /tmp/attach2.out)" = "$DEV" ] && echo "second attach returns the same device"
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/u && mount -t ext4 $DEV /mnt/u
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/u/f$i bs=64k count=$((i*16)) 2>/dev/null; done
(cd /mnt/u && md5sum f* > /tmp/fsums)
sync
start_writer
# and deep-queue direct I/O with verification, so requests are in flight
# (and reissued) at every restart
fio --name=rv --filename=/mnt/u/fio.dat --size=32M --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
	--verify=crc32c --verify_fatal=1 --time_based --runtime=45 --verify_backlog=512 --output-format=terse >/tmp/fio.out 2>/tmp/fio.err &
FIO=$!
waitfor 120 more_files 10
n=$(nfiles)
kill -KILL $SERVE; wait $SERVE 2>/dev/null || true
echo "killed serve after $n files"
test -b $DEV
start_serve
waitfor 180 recovered 1
waitfor 180 more_files $((n+10))
n=$(nfiles)
echo "recovered after SIGKILL; writer at $n files"
kill -TERM $SERVE; wait $SERVE
echo "serve exited with $? after SIGTERM (device released)"
test -b $DEV
start_serve
waitfor 180 recovered 2
waitfor 180 more_files $((n+10))
echo "recovered after a planned restart"
[ "$(holders)" = "$SERVE" ] && echo "the new serve process serves the device"
touch /tmp/stop
wait $WRITER
echo "writer wrote $(nfiles) files without error"
wait $FIO || { echo "FIO-FAILED"; cat /tmp/fio.err; exit 1; }
echo "fio across restarts: errors $(tail -1 /tmp/fio.out | cut -d';' -f5)"
sync
dmesg > /tmp/dmesg
if grep -iE 'I/O error|EXT4-fs error|Buffer I/O|journal' /tmp/dmesg | grep -v 'mounted filesystem'; then echo "KERNEL-IO-ERRORS"; exit 1; fi
umount /mnt/u
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/u
(cd /mnt/u && md5sum -c /tmp/fsums >/dev/null && md5sum -c /tmp/wsums > /tmp/check.out) || { grep -v ': OK' /tmp/check.out; exit 1; }
echo "verified $(wc -l < /tmp/check.out) files after restarts"
if blockd detach $DEV 2>/tmp/detach.err; then echo "detach of a mounted device succeeded"; exit 1; fi
cat /tmp/detach.err
umount /mnt/u
blockd detach $DEV
test ! -e $DEV
echo "detached"
grep -q '"devices": \[\]' blockd-data/server/ublk.json && echo "server forgot the device"
grep 'msg=ublk_deleted' /tmp/serve.log
kill -TERM $SERVE; wait $SERVE
echo "serve exited with $?"
grep -E 'msg=ublk_(served|recovered|recovery_start|recovery_done|released|deleted)' /tmp/serve.log
echo BLOCKD-SERVE-UBLK-OK
`,
	})
	expect(t, res, "BLOCKD-SERVE-UBLK-OK", "attach exited with 0", "attach used the local server",
		"serve hosts the device", "only the serve process serves the device", "second attach returns the same device",
		"recovered after SIGKILL", "serve exited with 0 after SIGTERM", "recovered after a planned restart",
		"the new serve process serves the device", "without error", "fio across restarts: errors 0", "is mounted at /mnt/u", "detached",
		"server forgot the device", "serve exited with 0")
	if strings.Contains(res.Output, "WRITE-ERROR") || strings.Contains(res.Output, "KERNEL-IO-ERRORS") || strings.Contains(res.Output, "FIO-FAILED") {
		t.Fatalf("I/O errors reached the filesystem")
	}
}

// TestServerHostedUblkDemoted: in a two-server cluster, the primary's
// server hosts /dev/ublkbN for a volume; after the volume is promoted on
// the other server, the old primary's device fails writes promptly (EPERM
// from the lease gate, an I/O error in the guest), it never hangs them,
// and `blockd detach` (through that server's control socket) removes it.
// Then the new primary's server hosts a device and is killed; the volume
// fails back while it is down, and the restarted server (now a replica)
// takes its recorded device over with failing I/O rather than leaving the
// queued write hanging.
func TestServerHostedUblkDemoted(t *testing.T) {
	vmtest.Require(t)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{
			"/usr/local/bin/blockd":    vmtest.BuildBlockd(t),
			"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve"),
		},
		MemoryMiB: 2048,
		Timeout:   10 * time.Minute,
		Script: prelude + `
cd /tmp
blockd master --data /tmp/m --api 127.0.0.1:9333 >/tmp/m.log 2>&1 &
start_server() { # start_server N: server sN, its pid in PID_sN
	blockd server --id s$1 --data /tmp/s$1 --master 127.0.0.1:9333 --listen 127.0.0.1:970$1 --nbd 127.0.0.1:1080$1 >>/tmp/s$1.log 2>&1 &
	eval PID_s$1=$!
}
start_server 1
start_server 2
created() { blockd volume create dv --size 64MiB --rf 2 --durability best_effort >/dev/null; }
waitfor 120 created
info() { blockd volume info dv -o json | tr -d ' \n'; }
primary() { info | sed -n 's/.*"primary":{"server_id":"\([^"]*\)".*/\1/p'; }
healthy() { info | grep -q '"status":"healthy"'; }
waitfor 120 healthy
P=$(primary)
case "$P" in s1) R=s2;; s2) R=s1;; *) echo "no primary: $P"; info; exit 1;; esac
echo "primary $P, replica $R"
DEV=$(blockd attach ublk dv --control /tmp/$P/control.sock 2>/tmp/attach.log)
test -b "$DEV" || { cat /tmp/attach.log; exit 1; }
grep -q 'msg=ublk_local_attached' /tmp/attach.log && echo "hosted by the primary's server"
dd if=/dev/urandom of=/tmp/blk bs=64k count=16 2>/dev/null
dd if=/tmp/blk of=$DEV bs=64k oflag=direct 2>/dev/null && echo "write while primary ok"
blockd volume promote dv --target $R --force
moved() { [ "$(primary)" = "$R" ]; }
waitfor 120 moved
demoted() { grep -q 'msg=primary_demoted' /tmp/$P.log; }
waitfor 120 demoted
set +e
timeout 120 dd if=/tmp/blk of=$DEV bs=64k oflag=direct 2>/tmp/dd.err
rc=$?
set -e
cat /tmp/dd.err
echo "write after demotion: exit $rc"
[ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "write after demotion failed without hanging"
BLOCKD_CONTROL=/tmp/$P/control.sock blockd detach $DEV
test ! -e $DEV && echo "detached after demotion"

# The hosting server is killed and the volume fails over while it is down:
# restarted as a replica, it takes the recorded device over after
# BLOCKD_UBLK_RECOVERY_WAIT with failing I/O instead of leaving the queued
# write hanging forever.
waitfor 120 healthy
DEV=$(blockd attach ublk dv --control /tmp/$R/control.sock 2>>/tmp/attach.log)
test -b "$DEV"
dd if=/tmp/blk of=$DEV bs=64k oflag=direct 2>/dev/null && echo "write on the new primary's device ok"
eval kill -KILL \$PID_$R
moved_back() { [ "$(primary)" = "$P" ]; }
waitfor 120 moved_back
echo "failed over back to $P while $R is down"
export BLOCKD_UBLK_RECOVERY_WAIT=15s
start_server ${R#s}
unset BLOCKD_UBLK_RECOVERY_WAIT
set +e
timeout 300 dd if=/tmp/blk of=$DEV bs=64k oflag=direct 2>/tmp/dd2.err
rc=$?
set -e
cat /tmp/dd2.err
echo "write while the restarted server is not primary: exit $rc"
[ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "queued write failed without hanging"
grep 'msg=ublk_recovery_not_primary' /tmp/$R.log && echo "restarted replica took the device over"
BLOCKD_CONTROL=/tmp/$R/control.sock blockd detach $DEV
test ! -e $DEV && echo "detached on the replica"
echo UBLK-DEMOTED-OK
`,
	})
	expect(t, res, "UBLK-DEMOTED-OK", "hosted by the primary's server", "write while primary ok",
		"write after demotion failed without hanging", "detached after demotion",
		"write on the new primary's device ok", "queued write failed without hanging",
		"restarted replica took the device over", "detached on the replica")
}

// BenchmarkServeHostedUblkVsNBD: fio 4k random read and random write at
// QD32 on the /dev/ublkbN that `blockd serve` hosts itself (the engine
// behind the lease gate and the replication primary, no network hop) and
// on /dev/nbd0 attached to the same serve process, interleaved in the same
// guest run; reports IOPS and the ublk/NBD ratio (emulation makes the
// absolute numbers meaningless).
//
//	go test ./tests/vm/ublk -run '^$' -bench ServeHostedUblkVsNBD -benchtime=1x
func BenchmarkServeHostedUblkVsNBD(b *testing.B) {
	vmtest.Require(b)
	testenv.RequireTool(b, "fio")
	for i := 0; i < b.N; i++ {
		res := vmtest.Boot(b, vmtest.Guest{
			Binaries: map[string]string{
				"/usr/local/bin/blockd":    vmtest.BuildBlockd(b),
				"/usr/local/bin/ublkserve": vmtest.GoBuild(b, "./tests/vm/ublk/ublkserve"),
			},
			Tools:     []string{"fio"},
			MemoryMiB: 2048,
			Timeout:   10 * time.Minute,
			Script: prelude + `
cd /tmp
# 256 MiB, the region fio touches: the engine's WAL (twice a small
# volume, at most 1 GiB) must fit the guest's RAM-backed /tmp beside it.
blockd serve --log-file - --volume vol0:256MiB >/tmp/serve.log 2>&1 &
SERVE=$!
up() { grep -q 'blockd is serving volume' /tmp/serve.log || ! kill -0 $SERVE; }
waitfor 180 up
DEV=$(blockd attach ublk vol0 2>/tmp/attach.log)
nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 -C 2 >/dev/null
dd if=/dev/urandom of=$DEV bs=1M count=256 oflag=direct 2>/dev/null
bench() { # bench DEV KIND ROUND
	for rw in randread randwrite; do
		fio --name=b --filename=$1 --direct=1 --ioengine=libaio --iodepth=32 --rw=$rw --bs=4k --size=256M \
			--time_based --runtime=5 --ramp_time=1 --output-format=terse > /tmp/b.out 2>/tmp/b.err
		f=$(tail -1 /tmp/b.out)
		if [ $rw = randread ]; then iops=$(echo "$f" | cut -d';' -f8); else iops=$(echo "$f" | cut -d';' -f49); fi
		echo "BENCH $3 $rw $2 $iops"
	done
}
for r in 1 2 3; do bench $DEV ublk $r; bench /dev/nbd0 nbd $r; done
nbd-client -d /dev/nbd0 >/dev/null
blockd detach $DEV
kill -TERM $SERVE; wait $SERVE
`,
		})
		if res.ExitCode != 0 {
			b.Fatalf("guest failed: exit %d", res.ExitCode)
		}
		iops := map[string]map[string]float64{} // round → rw/kind
		for _, line := range strings.Split(res.Output, "\n") {
			f := strings.Fields(line)
			if len(f) == 5 && f[0] == "BENCH" {
				v, err := strconv.ParseFloat(f[4], 64)
				if err != nil {
					b.Fatalf("bad line %q", line)
				}
				if iops[f[1]] == nil {
					iops[f[1]] = map[string]float64{}
				}
				iops[f[1]][f[2]+"/"+f[3]] = v
			}
		}
		for _, rw := range []string{"randread", "randwrite"} {
			var ratios, us, ns []float64
			for _, m := range iops {
				u, n := m[rw+"/ublk"], m[rw+"/nbd"]
				if u == 0 || n == 0 {
					b.Fatalf("missing %s results: %v", rw, m)
				}
				ratios, us, ns = append(ratios, u/n), append(us, u), append(ns, n)
			}
			b.ReportMetric(median(ratios), rw+"-hosted-ublk/nbd")
			b.Logf("%s 4k QD32: server-hosted ublk median %.0f IOPS, nbd (same serve) median %.0f IOPS, median per-round ratio %.2f (rounds %v)",
				rw, median(us), median(ns), median(ratios), ratios)
		}
	}
}
