// Package powercut cuts the power below the file system that holds a
// blockd data directory, with the real kernel's dm-flakey in the 6.12
// guest (the xfstests way): `blockd serve` runs on ext4 on dm-flakey on a
// loop device; a client writes tagged blocks and flushes; the table is
// switched to drop_writes (every write from then on silently lost, as in a
// power cut) or error_writes (every write fails with EIO); blockd is
// killed, the file system unmounted, the table restored, the file system
// mounted (journal recovery), blockd restarted, and every flushed write
// must read back whole. A control cycle at the end counts the flushes
// acknowledged after a cut, and must find them lost.
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

// TestPowerCutDMFlakey boots the guest once and runs the cycles.
func TestPowerCutDMFlakey(t *testing.T) {
	if testing.Short() {
		t.Skip("VM test")
	}
	vmtest.Require(t)
	testenv.RequireTool(t, "dmsetup")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	img, err := vmtest.Prepare(ctx)
	cancel()
	if err != nil {
		t.Fatalf("prepare guest image: %v", err)
	}
	files := fetchDMModules(t, img.KernelVersion)
	files["/root/lib.sh"] = []byte(libSh)
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
		Tools:     []string{"dmsetup"},
		Env:       map[string]string{"CYCLES": strconv.Itoa(cycles), "BASESEED": strconv.FormatInt(seed, 10)},
		Script:    guestScript,
		MemoryMiB: 1536,
		Timeout:   time.Duration(cycles)*90*time.Second + 2*time.Minute,
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
	if !strings.Contains(res.Output, "POWERCUT control: flushes acknowledged after the cut found lost") {
		t.Fatalf("the control cycle did not run")
	}
}
