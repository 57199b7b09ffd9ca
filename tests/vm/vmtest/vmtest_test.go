package vmtest_test

import (
	"strings"
	"testing"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// TestBootSmoke boots the guest, checks the drivers and tools are there, and
// that the script's exit status comes back.
func TestBootSmoke(t *testing.T) {
	res := vmtest.Boot(t, vmtest.Guest{
		Files: map[string][]byte{"/etc/hello": []byte("hello from the host\n")},
		Env:   map[string]string{"GREETING": "it's me"},
		Script: `
grep -q '^nbd ' /proc/modules
grep -q '^ublk_drv ' /proc/modules
grep -q '^ext4 ' /proc/modules
test -b /dev/nbd0
test -c /dev/ublk-control
cat /etc/hello
echo "env: $GREETING"
nbd-client --help 2>&1 | head -1 || true
mkfs.ext4 -V 2>&1 | head -1
# ext4 on a loop device works end to end
dd if=/dev/zero of=/tmp/img bs=1M count=32 2>/dev/null
losetup /dev/loop0 /tmp/img
mkfs.ext4 -q /dev/loop0
mkdir -p /mnt/x && mount -t ext4 /dev/loop0 /mnt/x && echo data > /mnt/x/f && umount /mnt/x
e2fsck -fn /dev/loop0
exit 7
`,
	})
	if res.ExitCode != 7 {
		t.Fatalf("exit code %d, want 7", res.ExitCode)
	}
	for _, want := range []string{"hello from the host", "env: it's me"} {
		if !strings.Contains(res.Output, want) {
			t.Errorf("console lacks %q", want)
		}
	}
}

// TestFioInGuest checks that an extra dynamically linked tool (fio, with its
// many shared libraries) runs in the guest, on a loop device with the
// io_uring and libaio engines.
func TestFioInGuest(t *testing.T) {
	res := vmtest.Boot(t, vmtest.Guest{
		Tools: []string{"fio"},
		Script: `
dd if=/dev/zero of=/tmp/img bs=1M count=16 2>/dev/null
losetup /dev/loop0 /tmp/img
fio --name=v --filename=/dev/loop0 --rw=randwrite --bs=4k --size=4m --ioengine=io_uring --iodepth=4 --direct=1 --verify=crc32c --output-format=terse >/tmp/fio.out
echo "fio terse fields: $(tr ';' '\n' </tmp/fio.out | wc -l)"
fio --name=v --filename=/dev/loop0 --rw=read --bs=64k --size=4m --ioengine=libaio --direct=1 --output-format=terse >/dev/null
echo fio-ok
`,
	})
	if res.ExitCode != 0 || !strings.Contains(res.Output, "fio-ok") {
		t.Fatalf("fio in guest failed: exit %d", res.ExitCode)
	}
}

// TestScriptOutputDropsKernelLines feeds the console CI saw, where the
// kernel printed into the middle of the script's "writer stopped by an
// error".
func TestScriptOutputDropsKernelLines(t *testing.T) {
	console := "[    8.810430] Buffer I/O error on device ublkb0, logical block 37385\n" +
		"writer stopped b[    8.813065] Buffer I/O error on dev ublkb0, logical block 33, lost async page write\n" +
		"y an error\n" +
		"[    8.813832] Buffer I/O error on dev ublkb0, logical block 35, lost async page write\n" +
		"detached /dev/ublkb0\n" +
		"<<<vmtest-ex[    8.9] not a kernel stamp\n" +
		"array [1] ok\n"
	want := "writer stopped by an error\ndetached /dev/ublkb0\n<<<vmtest-ex[    8.9] not a kernel stamp\narray [1] ok\n"
	if got := vmtest.ScriptOutput(console); got != want {
		t.Fatalf("ScriptOutput:\n%q\nwant\n%q", got, want)
	}
}
