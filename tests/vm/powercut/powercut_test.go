// Package powercut cuts the power below the file system that holds a
// blockd data directory, with the real kernel's dm-flakey in the 6.12
// guest (the xfstests way): `blockd serve` runs on ext4 on dm-flakey on a
// loop device; a client writes tagged blocks and flushes; the table is
// switched to drop_writes (every write from then on silently lost, as in a
// power cut) or error_writes (every write fails with EIO); blockd is
// killed, the file system unmounted, the table restored, the file system
// mounted (journal recovery), blockd restarted, and every flushed write
// must read back whole. A control cycle at the end counts the flushes
// acknowledged after a cut, and must find them lost. Between the two, a
// fio phase (fioSh) does the same with fio through the kernel's nbd driver
// as the client: fio --verify_only must find every region it wrote and
// fsynced before a cut intact after it.
package powercut

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tests/vm/vmtest"
)

// dmModules are insmod'ed in this order (modprobe --show-depends of
// dm-flakey: dm-mod first).
var dmModules = []string{"dm-mod", "dm-flakey"}

// fetchDMModules returns the decompressed device-mapper modules of the
// guest kernel, cached next to the vmtest cache (vmtest keeps only the
// modules it boots with).
func fetchDMModules(t *testing.T, kver string) map[string][]byte {
	t.Helper()
	dir := filepath.Join(vmtest.CacheDir(), "dm-"+kver)
	ready := filepath.Join(dir, "ready")
	if _, err := os.Stat(ready); err != nil {
		for _, tool := range []string{"apt-get", "dpkg-deb", "xz"} {
			testenv.RequireTool(t, tool)
		}
		tmp, err := os.MkdirTemp(vmtest.CacheDir(), "dmfetch-")
		if err != nil {
			t.Fatal(err)
		}
		defer os.RemoveAll(tmp)
		pkg := "linux-image-" + kver
		cmd := exec.Command("apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", pkg)
		cmd.Dir = tmp
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("apt-get download %s: %v\n%s", pkg, err, out)
		}
		debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
		if len(debs) != 1 {
			t.Fatalf("apt-get download %s left %d .deb files", pkg, len(debs))
		}
		root := filepath.Join(tmp, "root")
		if out, err := exec.Command("dpkg-deb", "-x", debs[0], root).CombinedOutput(); err != nil {
			t.Fatalf("dpkg-deb -x: %v\n%s", err, out)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, m := range dmModules {
			src := filepath.Join(root, "lib", "modules", kver, "kernel", "drivers", "md", m+".ko.xz")
			if _, err := os.Stat(src); err != nil {
				t.Fatalf("the guest kernel %s has no %s module: %v", kver, m, err)
			}
			data, err := exec.Command("xz", "-dc", src).Output()
			if err != nil {
				t.Fatalf("xz -dc %s: %v", src, err)
			}
			if err := os.WriteFile(filepath.Join(dir, m+".ko"), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(ready, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	files := map[string][]byte{}
	for _, m := range dmModules {
		b, err := os.ReadFile(filepath.Join(dir, m+".ko"))
		if err != nil {
			t.Fatal(err)
		}
		files["/root/"+m+".ko"] = b
	}
	return files
}

// The guest script. One boot runs CYCLES cuts on the same data directory,
// alternating drop_writes and error_writes; every cycle starts with a
// verify of everything flushed so far.
const guestScript = `
export DM_DISABLE_UDEV=1
for m in dm-mod dm-flakey; do insmod /root/$m.ko; done
truncate -s 384M /tmp/disk.img
losetup /dev/loop0 /tmp/disk.img
SECT=$(blockdev --getsz /dev/loop0)
export UP="0 $SECT flakey /dev/loop0 0 3600 0"
export DROP="0 $SECT flakey /dev/loop0 0 0 3600 1 drop_writes"
export EIO="0 $SECT flakey /dev/loop0 0 0 3600 1 error_writes"
. /root/lib.sh
dmsetup create flaky --table "$UP"
DEV=/dev/mapper/flaky
[ -b $DEV ] || DEV=/dev/dm-0
mkfs.ext4 -q $DEV
mkdir -p /data
mount $DEV /data
serve() {
	blockd serve --log-file - --data /data/blockd --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:32MiB >>/tmp/serve.log 2>&1 &
	SRV=$!
	pcclient wait
}
i=1
while [ $i -le $CYCLES ]; do
	serve
	pcclient verify -blocks 256
	SEED=$((BASESEED + i))
	AFTERMS=$((1500 + (SEED * 7919) % 3000))
	if [ $((i % 2)) -eq 1 ]; then
		echo "POWERCUT cycle $i: drop_writes after ${AFTERMS}ms"
		pcclient write -blocks 256 -seed $SEED -cut-after ${AFTERMS}ms -cut "sh /root/cut-drop.sh"
	else
		echo "POWERCUT cycle $i: error_writes after ${AFTERMS}ms"
		timeout 90 pcclient write -blocks 256 -seed $SEED -cut "" &
		W=$!
		usleep $((AFTERMS * 1000))
		load "$EIO"
		wait $W || echo "POWERCUT writer exit $?"
	fi
	kill -9 $SRV 2>/dev/null || true
	wait $SRV 2>/dev/null || true
	umount /data || umount -l /data
	load "$UP"
	echo 3 > /proc/sys/vm/drop_caches
	e2fsck -fy $DEV >/tmp/fsck.log 2>&1 || echo "POWERCUT e2fsck exit $? (repaired)"
	mount $DEV /data
	i=$((i + 1))
done
serve
pcclient verify -blocks 256
echo "POWERCUT all $CYCLES cycles verified"
fio_phase
pcclient verify -blocks 256
# Control: the same cut, but the writer goes on counting the flushes the
# server acknowledges after it. Those were dropped below the file system,
# so verify must find lost writes, or the rig cuts nothing.
cp /tmp/pc-state.json /tmp/pc-control.json
pcclient write -blocks 256 -state /tmp/pc-control.json -seed $BASESEED -cut "" &
W=$!
usleep 1000000
load "$DROP"
usleep 1500000
kill -9 $W
kill -9 $SRV
wait $SRV 2>/dev/null || true
umount /data || umount -l /data
load "$UP"
echo 3 > /proc/sys/vm/drop_caches
e2fsck -fy $DEV >/tmp/fsck.log 2>&1 || true
mount $DEV /data
serve
if pcclient verify -blocks 256 -state /tmp/pc-control.json; then
	echo "POWERCUT control: flushes acknowledged after the cut were NOT found lost"
	exit 1
fi
echo "POWERCUT control: flushes acknowledged after the cut found lost, as they must be"
kill -9 $SRV
`

const libSh = `load() { dmsetup suspend --nolockfs flaky && dmsetup load flaky --table "$1" && dmsetup resume flaky; }
`

// fioSh is the fio phase, sourced by the guest script after the cycles
// (serve is running as $SRV): fio, through the kernel's nbd driver and a
// `blockd attach nbd` keeper that stays attached across the cuts, writes a
// region with crc32c verify headers and fsyncs it; right after the fsync,
// while a second fio keeps O_SYNC (FUA) writes going on another region,
// the power is cut (drop_writes, then error_writes in the second round);
// serve is killed, the file system recovered, serve restarted, the keeper
// reconnects by itself, and fio --verify_only must find every block of
// each flushed region (this round's and the earlier one's) intact. As a
// control, in the drop_writes round fio also writes and fsyncs a region
// after the cut: verify_only must find that one lost. The regions (4M..,
// 12M.., load 18M.., control 24M..) lie past pcclient's blocks (the
// first 1 MiB).
const fioSh = `
fio_attach() {
	: >/tmp/nbd.dev
	blockd attach nbd --nbd 127.0.0.1:10809 --connections 2 --timeout 10s --give-up 3m vol0 >/tmp/nbd.dev 2>>/tmp/attach.log &
	KEEPER=$!
	n=1200
	while ! test -s /tmp/nbd.dev; do
		kill -0 $KEEPER 2>/dev/null || { echo "POWERCUT fio: attach nbd exited"; cat /tmp/attach.log; exit 1; }
		n=$((n-1)); [ $n -gt 0 ] || { echo "POWERCUT fio: attach nbd timed out"; cat /tmp/attach.log; exit 1; }
		usleep 100000
	done
	NBD=$(cat /tmp/nbd.dev)
	echo "POWERCUT fio: attached $NBD (fua $(cat /sys/block/${NBD#/dev/}/queue/fua))"
}
flushed_job() { # flushed_job OFFSET ARGS...: the job that writes (and later verifies) a flushed region
	local at=$1; shift
	fio --name=flushed --filename=$NBD --offset=$at --size=6M --rw=randwrite --bsrange=4k-64k \
		--direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
		--output-format=terse "$@"
}
reconnects() { grep -c msg=nbd_reconnected /tmp/attach.log || true; }
fio_cut() { # fio_cut NAME TABLE OFFSET CONTROL [VERIFIED_OFFSET...]
	name=$1; table=$2; off=$3; control=$4; shift 4
	flushed_job $off --do_verify=0 --end_fsync=1 --fsync_on_close=1 >/tmp/fio-w.out 2>&1 || { echo "POWERCUT fio: write phase failed"; cat /tmp/fio-w.out; exit 1; }
	echo "POWERCUT fio $name: region $off+6M written and fsynced (fio errors $(tail -1 /tmp/fio-w.out | cut -d';' -f5))"
	fio --name=load --filename=$NBD --offset=18M --size=6M --rw=randwrite --bs=4k --direct=1 --sync=1 \
		--ioengine=libaio --iodepth=8 --time_based --runtime=60 --output-format=terse >/tmp/fio-load.out 2>&1 &
	FL=$!
	usleep 500000
	load "$table"
	echo "POWERCUT fio $name: cut under FUA load"
	if [ "$control" != - ]; then
		# control: a region written and fsynced after the cut; the server
		# acknowledges it, but it never reached the disk
		flushed_job $control --do_verify=0 --end_fsync=1 >/tmp/fio-c.out 2>&1 || true
	fi
	usleep 1500000
	kill -9 $FL 2>/dev/null || echo "POWERCUT fio $name: the FUA load had stopped by itself: $(grep -m1 'io_u error' /tmp/fio-load.out | cut -c1-100)"
	wait $FL 2>/dev/null || true
	r0=$(reconnects)
	kill -9 $SRV 2>/dev/null || echo "POWERCUT fio $name: serve had exited by itself"
	wait $SRV 2>/dev/null || true
	umount /data || umount -l /data
	load "$UP"
	echo 3 > /proc/sys/vm/drop_caches
	e2fsck -fy $DEV >/tmp/fsck.log 2>&1 || echo "POWERCUT fio $name: e2fsck exit $? (repaired)"
	mount $DEV /data
	serve
	n=1800
	while [ "$(reconnects)" -le "$r0" ]; do
		n=$((n-1)); [ $n -gt 0 ] || { echo "POWERCUT fio: the keeper did not reconnect"; tail -20 /tmp/attach.log; exit 1; }
		usleep 100000
	done
	if [ "$control" != - ]; then
		if flushed_job $control --verify_only >/tmp/fio-cv.out 2>&1; then
			echo "POWERCUT fio control: region $control+6M, fsynced after the cut, verified: the rig cut nothing"; exit 1
		fi
		echo "POWERCUT fio control: region $control+6M, fsynced after the cut, found lost, as it must be"
	fi
	for o in $off "$@"; do
		flushed_job $o --verify_only >/tmp/fio-v.out 2>&1 || { echo "POWERCUT fio $name: verify_only of region $o+6M FAILED: a flushed write was lost"; tail -20 /tmp/fio-v.out; exit 1; }
		echo "POWERCUT fio $name: verify_only of region $o+6M: every block intact"
	done
}
fio_phase() {
	fio_attach
	fio_cut drop_writes "$DROP" 4M 24M
	fio_cut error_writes "$EIO" 12M - 4M
	blockd detach $NBD
	wait $KEEPER || { echo "POWERCUT fio: keeper exit $?"; exit 1; }
	echo "POWERCUT fio phase: flushed regions intact after 2 cuts"
}
`

// TestPowerCutDMFlakey boots the guest once and runs the cycles.
func TestPowerCutDMFlakey(t *testing.T) {
	if testing.Short() {
		t.Skip("VM test")
	}
	vmtest.Require(t)
	testenv.RequireTool(t, "dmsetup")
	testenv.RequireTool(t, "fio")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	img, err := vmtest.Prepare(ctx)
	cancel()
	if err != nil {
		t.Fatalf("prepare guest image: %v", err)
	}
	files := fetchDMModules(t, img.KernelVersion)
	files["/root/lib.sh"] = []byte(libSh + fioSh)
	files["/root/cut-drop.sh"] = []byte(". /root/lib.sh\nload \"$DROP\"\n")
	cycles := 6
	if s := os.Getenv("POWERCUT_CYCLES"); s != "" {
		if cycles, err = strconv.Atoi(s); err != nil {
			t.Fatalf("POWERCUT_CYCLES=%q: %v", s, err)
		}
	}
	seed := time.Now().UnixNano() % 100000
	if s := os.Getenv("POWERCUT_SEED"); s != "" {
		if seed, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("POWERCUT_SEED=%q: %v", s, err)
		}
	}
	t.Logf("POWERCUT seed %d (replay with POWERCUT_SEED=%d), %d cycles", seed, seed, cycles)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{
			"/usr/local/bin/blockd":   vmtest.BuildBlockd(t),
			"/usr/local/bin/pcclient": vmtest.GoBuild(t, "./tests/vm/powercut/pcclient"),
		},
		Files:     files,
		Tools:     []string{"dmsetup", "fio"},
		Env:       map[string]string{"CYCLES": strconv.Itoa(cycles), "BASESEED": strconv.FormatInt(seed, 10)},
		Script:    guestScript,
		MemoryMiB: 1536,
		Timeout:   time.Duration(cycles)*90*time.Second + 4*time.Minute,
	})
	var lines []string
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.Contains(l, "POWERCUT") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	t.Logf("guest ran %v:\n%s", res.Duration.Round(time.Second), strings.Join(lines, "\n"))
	if res.ExitCode != 0 {
		t.Fatalf("guest script exit %d (a flushed write lost, a torn block, or a step failed); seed %d", res.ExitCode, seed)
	}
	if !strings.Contains(res.Output, fmt.Sprintf("POWERCUT all %d cycles verified", cycles)) {
		t.Fatalf("the guest did not report every cycle verified")
	}
	if !strings.Contains(res.Output, "POWERCUT fio phase: flushed regions intact after 2 cuts") ||
		!strings.Contains(res.Output, "POWERCUT fio control: region 24M+6M, fsynced after the cut, found lost") {
		t.Fatalf("the fio phase did not report its flushed regions intact")
	}
	if !strings.Contains(res.Output, "POWERCUT control: flushes acknowledged after the cut found lost") {
		t.Fatalf("the control cycle did not run")
	}
}
