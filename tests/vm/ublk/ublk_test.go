// Package ublk_test runs the ublk frontend against the real ublk_drv in a
// Debian 6.12 guest (tests/vm/vmtest): filesystem round trips, fio
// verification, restart with user recovery, detach under load, and a
// ublk-vs-NBD benchmark.
package ublk_test

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tests/vm/vmtest"
)

// prelude is sourced by every guest script: it starts helpers that wait
// for conditions instead of sleeping blindly.
const prelude = `
on_exit() {
	rc=$?
	[ $rc -eq 0 ] && return
	echo "guest script failed ($rc); server logs:"
	tail -n 30 /tmp/*.log 2>/dev/null
	# A device left without a server would block the harness's final sync.
	for b in /dev/ublkb*; do [ -e "$b" ] && timeout 30 ublkserve --force --detach $b; done
	return 0
}
trap on_exit EXIT
waitfor() { # waitfor SECONDS CMD...: poll until CMD succeeds
	local left=$(( $1 * 10 )); shift
	while ! "$@" 2>/dev/null; do
		left=$((left-1)); [ $left -gt 0 ] || { echo "waitfor timed out: $*"; return 1; }
		sleep 0.1
	done
}
ready_or_dead() { test -s /tmp/ready || ! kill -0 $SERVER; }
serve() { # serve LOG ARGS...: start ublkserve in the background, wait until ready
	local log=$1; shift
	rm -f /tmp/ready
	ublkserve --ready /tmp/ready "$@" >>$log 2>&1 &
	SERVER=$!
	waitfor 60 ready_or_dead || { cat $log; return 1; }
	test -s /tmp/ready || { echo "ublkserve exited:"; cat $log; return 1; }
	DEV=$(cat /tmp/ready)
	echo "serving $DEV (pid $SERVER)"
}
`

func boot(t *testing.T, script string, tools ...string) vmtest.Result {
	t.Helper()
	vmtest.Require(t)
	for _, tool := range tools {
		testenv.RequireTool(t, tool)
	}
	return vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve")},
		Tools:    tools,
		Script:   prelude + script,
		Timeout:  5 * time.Minute,
	})
}

func expect(t *testing.T, res vmtest.Result, markers ...string) {
	t.Helper()
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d", res.ExitCode)
	}
	for _, m := range markers {
		if !strings.Contains(res.Output, m) {
			t.Errorf("console lacks %q", m)
		}
	}
}

// TestUblkExt4 formats /dev/ublkbN, writes files with checksums, checks the
// filesystem with e2fsck -fn and verifies the data after a remount and after
// the device is deleted and served again from the same backing file.
func TestUblkExt4(t *testing.T) {
	res := boot(t, `
# an unprivileged caller gets a clear error
if ublkserve --uid 65534 --file /tmp/x.img --size 16M 2>/tmp/unpriv.err; then echo "unprivileged serve succeeded"; exit 1; fi
cat /tmp/unpriv.err
serve /tmp/s1.log --engine /tmp/vol --size 256M
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
serve /tmp/s2.log --engine /tmp/vol
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/u
(cd /mnt/u && md5sum -c /tmp/sums)
umount /mnt/u
kill -TERM $SERVER; wait $SERVER
cat /tmp/s1.log /tmp/s2.log
echo UBLK-EXT4-OK
`)
	expect(t, res, "UBLK-EXT4-OK", "deleted ok", "permission denied: creating ublk devices needs root")
}

// TestUblkFioVerify runs fio with crc32c verification directly on the
// device, several jobs at QD32 with mixed block sizes, then verifies the
// same data a second way: through /dev/nbd0 served by the same process
// from the same backing store.
func TestUblkFioVerify(t *testing.T) {
	res := boot(t, `
serve /tmp/s.log --engine /tmp/vol --size 256M --nbd 127.0.0.1:10809
common="--filename=$DEV --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=4 --size=24M --offset_increment=32M --bsrange=4k-128k --verify=crc32c --verify_fatal=1 --group_reporting"
fio --name=w --rw=randwrite $common --do_verify=1 --output-format=terse > /tmp/fio1.out 2>/tmp/fio1.err
echo "fio randwrite+verify errors: $(tail -1 /tmp/fio1.out | cut -d';' -f5)"
fio --name=w --rw=randwrite $common --verify_only --output-format=terse > /tmp/fio2.out 2>&1
echo "fio verify_only on ublk: ok"
nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096
fio --name=w --rw=randwrite $(echo $common | sed s,$DEV,/dev/nbd0,) --verify_only --output-format=terse > /tmp/fio3.out 2>&1
echo "fio verify_only through nbd: ok"
nbd-client -d /dev/nbd0
# trim and write-zeroes reach the device: the range reads back as zeroes
dd if=/dev/urandom of=$DEV bs=1M count=4 seek=100 oflag=direct 2>/dev/null
/usr/sbin/blkdiscard -o $((100<<20)) -l $((2<<20)) $DEV
/usr/sbin/blkdiscard -z -o $((102<<20)) -l $((2<<20)) $DEV
test "$(dd if=$DEV bs=1M count=4 skip=100 iflag=direct 2>/dev/null | md5sum)" = "$(dd if=/dev/zero bs=1M count=4 2>/dev/null | md5sum)"
echo "discard and write-zeroes read back as zeroes"
kill -TERM $SERVER; wait $SERVER
grep -c ublk_io_error /tmp/s.log || true
echo UBLK-FIO-OK
`, "fio", "blkdiscard")
	expect(t, res, "UBLK-FIO-OK", "fio randwrite+verify errors: 0", "discard and write-zeroes read back as zeroes")
}

// writerScript starts a background writer on the mounted filesystem: each
// file is written with fsync and its checksum recorded; any I/O error
// makes it print WRITE-ERROR and exit 1.
const writerScript = `
start_writer() {
	rm -f /tmp/stop /tmp/wsums
	( i=0
	  while [ ! -e /tmp/stop ]; do
		i=$((i+1))
		dd if=/dev/urandom of=/mnt/u/w$i bs=16k count=8 conv=fsync 2>/tmp/dd.err || { echo "WRITE-ERROR file $i: $(cat /tmp/dd.err)"; exit 1; }
		md5sum /mnt/u/w$i >> /tmp/wsums || { echo "READ-ERROR file $i"; exit 1; }
	  done
	  echo "writer wrote $i files" ) &
	WRITER=$!
}
nfiles() { [ -f /tmp/wsums ] && wc -l < /tmp/wsums || echo 0; }
more_files() { [ $(nfiles) -ge $1 ]; }
`

// TestUblkRestartRecovery kills the serving process (SIGKILL) while ext4
// is mounted and being written to, recovers the device from a new process,
// then does a planned restart (Release + Recover). The writer must see no
// error, the kernel must log no I/O error, and data and fsck must be
// intact afterwards.
func TestUblkRestartRecovery(t *testing.T) {
	res := boot(t, writerScript+`
serve /tmp/s1.log --engine /tmp/vol --size 256M --id 0
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/u && mount -t ext4 $DEV /mnt/u
start_writer
# and deep-queue direct I/O with verification, so requests are in flight at every restart
fio --name=rv --filename=/mnt/u/fio.dat --size=32M --direct=1 --ioengine=libaio --iodepth=16 --rw=randwrite --bs=4k \
	--verify=crc32c --verify_fatal=1 --time_based --runtime=25 --verify_backlog=512 --output-format=terse >/tmp/fio.out 2>/tmp/fio.err &
FIO=$!
waitfor 60 more_files 10
n=$(nfiles)
kill -KILL $SERVER; wait $SERVER 2>/dev/null || true
echo "killed server after $n files"
test -b /dev/ublkb0
serve /tmp/s2.log --engine /tmp/vol --id 0 --recover
waitfor 60 more_files $((n+10))
n=$(nfiles)
kill -USR1 $SERVER; wait $SERVER
echo "released server after $n files"
serve /tmp/s3.log --engine /tmp/vol --id 0 --recover
waitfor 60 more_files $((n+10))
n=$(nfiles)
kill -KILL $SERVER; wait $SERVER 2>/dev/null || true
echo "killed server again after $n files"
serve /tmp/s4.log --engine /tmp/vol --id 0 --recover
waitfor 60 more_files $((n+10))
touch /tmp/stop
wait $WRITER
wait $FIO || { echo "FIO-FAILED"; cat /tmp/fio.err; exit 1; }
echo "fio across restarts: errors $(tail -1 /tmp/fio.out | cut -d';' -f5)"
sync
dmesg > /tmp/dmesg
if grep -iE 'I/O error|EXT4-fs error|Buffer I/O|journal' /tmp/dmesg | grep -v 'mounted filesystem'; then echo "KERNEL-IO-ERRORS"; exit 1; fi
umount /mnt/u
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/u
md5sum -c /tmp/wsums > /tmp/check.out || { grep -v ': OK' /tmp/check.out; exit 1; }
echo "verified $(wc -l < /tmp/check.out) files"
umount /mnt/u
kill -TERM $SERVER; wait $SERVER
grep -h 'ublk_recovery' /tmp/s2.log /tmp/s3.log /tmp/s4.log
echo UBLK-RESTART-OK
`, "fio")
	expect(t, res, "UBLK-RESTART-OK", "ublk_recovery_done", "fio across restarts: errors 0")
	if strings.Contains(res.Output, "WRITE-ERROR") || strings.Contains(res.Output, "KERNEL-IO-ERRORS") || strings.Contains(res.Output, "FIO-FAILED") {
		t.Fatalf("I/O errors reached the filesystem")
	}
}

// TestUblkDetachUnderLoad detaches the device (STOP_DEV + DEL_DEV from
// another process, as blockd detach does) while fio hammers it: fio ends
// with errors instead of hanging, the server exits, the node disappears.
// A mounted device is refused without force.
func TestUblkDetachUnderLoad(t *testing.T) {
	res := boot(t, `
serve /tmp/s.log --engine /tmp/vol --size 256M
fio --name=load --filename=$DEV --direct=1 --ioengine=io_uring --iodepth=32 --numjobs=2 --rw=randrw --bs=4k --time_based --runtime=120 --output-format=terse > /tmp/fio.out 2>&1 &
FIO=$!
sleep 2
ublkserve --detach $DEV
echo "detach returned"
wait $FIO || echo "fio ended with status $?"
wait $SERVER
echo "server exited with $?"
test ! -e $DEV
test ! -e /dev/ublkc0
# mounted: refused without force
serve /tmp/s2.log --engine /tmp/vol
mkfs.ext4 -q -F $DEV && mkdir -p /mnt/u && mount -t ext4 $DEV /mnt/u
if ublkserve --detach $DEV; then echo "detach of a mounted device succeeded"; exit 1; fi
umount /mnt/u
ublkserve --detach $DEV
wait $SERVER
# mounted and written to, forced: returns, the writer gets errors, umount works
serve /tmp/s3.log --engine /tmp/vol
mount -t ext4 $DEV /mnt/u
( while dd if=/dev/urandom of=/mnt/u/w bs=64k count=16 conv=fsync 2>/dev/null; do :; done; echo "writer stopped by an error" ) &
W=$!
sleep 1
ublkserve --force --detach $DEV
wait $SERVER
echo "forced: server exited with $?"
wait $W
umount /mnt/u || umount -l /mnt/u
waitfor 30 test ! -e /dev/ublkc0
echo "device number freed"
echo UBLK-DETACH-OK
`, "fio")
	expect(t, res, "UBLK-DETACH-OK", "detach returned", "server exited with 0", "is mounted at /mnt/u",
		"writer stopped by an error", "forced: server exited with 0", "device number freed")
}

// BenchmarkUblkVsNBD runs fio 4k random read and random write at QD32 on
// /dev/ublkb0 and on /dev/nbd0 in the same guest, both served by the same
// process from the same blockvol engine volume, and reports IOPS and the
// ublk/NBD ratios, and against the kernel's loop device over a file on
// the same guest file system, the ceiling (emulation makes the absolute
// numbers meaningless). The
// host is shared and noisy, so the measurements are interleaved in rounds
// (ublk with InlineNever, the default, then NBD, then ublk with the modes
// in BLOCKD_BENCH_MODES) and the median of the per-round ratios is
// reported. One guest run per iteration: use
// -benchtime=1x.
//
//	go test ./tests/vm/ublk -run '^$' -bench UblkVsNBD -benchtime=1x
func BenchmarkUblkVsNBD(b *testing.B) {
	runtime := os.Getenv("BLOCKD_BENCH_RUNTIME")
	if runtime == "" {
		runtime = "5"
	}
	rounds := os.Getenv("BLOCKD_BENCH_ROUNDS")
	if rounds == "" {
		rounds = "3"
	}
	// InlineNever is the default; auto and always are the optional modes.
	modes := os.Getenv("BLOCKD_BENCH_MODES")
	if modes == "" {
		modes = "never auto"
	}
	vmtest.Require(b)
	testenv.RequireTool(b, "fio")
	for i := 0; i < b.N; i++ {
		res := vmtest.Boot(b, vmtest.Guest{
			Binaries:  map[string]string{"/usr/local/bin/ublkserve": vmtest.GoBuild(b, "./tests/vm/ublk/ublkserve")},
			Tools:     []string{"fio"},
			Timeout:   15 * time.Minute,
			MemoryMiB: 2048, // the engine's volume and the loop device's file live in RAM
			Env:       map[string]string{"RT": runtime, "ROUNDS": rounds, "MODES": modes},
			Script: prelude + `
bench() { # bench DEV KIND ROUND
	for rw in randread randwrite; do
		fio --name=b --filename=$1 --direct=1 --ioengine=libaio --iodepth=32 --rw=$rw --bs=4k --size=256M \
			--time_based --runtime=$RT --ramp_time=1 --output-format=terse > /tmp/b.out 2>/tmp/b.err
		f=$(tail -1 /tmp/b.out)
		if [ $rw = randread ]; then iops=$(echo "$f" | cut -d';' -f8); else iops=$(echo "$f" | cut -d';' -f49); fi
		echo "BENCH $3 $rw $2 $iops"
	done
}
FIRST=${MODES%% *}
r=0
while [ $r -lt $ROUNDS ]; do
	r=$((r+1))
	for mode in $MODES; do
		export UBLK_INLINE=$mode
		serve /tmp/s.log --engine /tmp/vol --size 512M --wal 128M --nbd 127.0.0.1:10809
		if [ $r = 1 ] && [ $mode = $FIRST ]; then
			# lay the data down once so reads hit written blocks on both paths
			dd if=/dev/urandom of=$DEV bs=1M count=256 oflag=direct 2>/dev/null
		fi
		bench $DEV ublk-$mode $r
		if [ $mode = $FIRST ]; then
			nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 >/dev/null
			bench /dev/nbd0 nbd $r
			nbd-client -d /dev/nbd0 >/dev/null
		fi
		kill -TERM $SERVER; wait $SERVER
	done
	# The ceiling: the kernel's loop device over a file on the same
	# guest file system as the engine's volume.
	[ -f /tmp/loop.img ] || dd if=/dev/urandom of=/tmp/loop.img bs=1M count=256
	losetup /dev/loop0 /tmp/loop.img
	bench /dev/loop0 loop $r
	losetup -d /dev/loop0
done
`,
		})
		if res.ExitCode != 0 {
			b.Fatalf("guest failed: exit %d", res.ExitCode)
		}
		// iops[round][rw+"/"+kind]
		iops := map[string]map[string]float64{}
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
		if len(iops) == 0 {
			b.Fatalf("no results")
		}
		for _, rw := range []string{"randread", "randwrite"} {
			for _, mode := range strings.Fields(modes) {
				kind := "ublk-" + mode
				var ratios, us, ns []float64
				for _, m := range iops {
					u, n := m[rw+"/"+kind], m[rw+"/nbd"]
					if u == 0 || n == 0 {
						b.Fatalf("missing %s %s results: %v", rw, kind, m)
					}
					ratios, us, ns = append(ratios, u/n), append(us, u), append(ns, n)
				}
				b.ReportMetric(median(ratios), rw+"-"+kind+"/nbd")
				b.Logf("%s 4k QD32: %s median %.0f IOPS, nbd median %.0f IOPS, median per-round ratio %.2f (rounds %v)",
					rw, kind, median(us), median(ns), median(ratios), ratios)
				var lr, ls []float64
				for _, m := range iops {
					l := m[rw+"/loop"]
					if l == 0 {
						b.Fatalf("missing %s loop results: %v", rw, m)
					}
					lr, ls = append(lr, m[rw+"/"+kind]/l), append(ls, l)
				}
				b.ReportMetric(median(lr), rw+"-"+kind+"/loop")
				b.Logf("%s 4k QD32: %s against the loop device (median %.0f IOPS): median per-round ratio %.2f (rounds %v)%s",
					rw, kind, median(ls), median(lr), lr, ublkGoal(rw, median(ratios), median(lr)))
			}
		}
	}
}

// ublkGoal states the write goals: ublk at least 2x nbd0 and 0.8x the
// loop device.
func ublkGoal(rw string, vsNBD, vsLoop float64) string {
	if rw != "randwrite" {
		return ""
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "MISSED"
	}
	return fmt.Sprintf("; goals: >= 2x nbd %s, >= 0.8x loop %s", verdict(vsNBD >= 2), verdict(vsLoop >= 0.8))
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
