// Package csi runs blockd's CSI driver in the Debian 6.12 guest
// (tests/vm/vmtest), where the kernel nbd driver exists: a master, a
// volume server and `blockd csi --mode both` in the guest; the
// Kubernetes CSI sanity suite (csi/sanity_test.go, built as a static test
// binary) with its node service tests, snapshots and clones included;
// then an end-to-end life of a volume through the driver (csie2e), with a
// snapshot and volumes made from it.
package csi

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

var (
	testBinOnce sync.Once
	testBin     string
	testBinErr  error
)

// sanityBinary builds the csi package's tests as a static binary.
func sanityBinary(t *testing.T) string {
	t.Helper()
	testBinOnce.Do(func() {
		gomod, err := exec.Command("go", "env", "GOMOD").Output()
		if err != nil {
			testBinErr = err
			return
		}
		dir, err := os.MkdirTemp("", "csi-sanity-bin")
		if err != nil {
			testBinErr = err
			return
		}
		testBin = filepath.Join(dir, "csi.test")
		cmd := exec.Command("go", "test", "-c", "-trimpath", "-o", testBin, "./csi")
		cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			testBinErr = err
			t.Logf("go test -c ./csi:\n%s", out)
		}
	})
	if testBinErr != nil {
		t.Fatalf("build the sanity binary: %v", testBinErr)
	}
	return testBin
}

const script = `
waitfor() { # waitfor SECONDS CMD...
	n=$(( $1 * 10 )); shift
	while ! "$@" 2>/dev/null; do
		n=$((n-1)); [ $n -gt 0 ] || { echo "waitfor timed out: $*"; return 1; }
		sleep 0.1
	done
}
dump() { for f in /tmp/master.log /tmp/server.log /tmp/csi.log /tmp/tmaster.log /tmp/tserver.log /tmp/tcsi.log; do [ -f $f ] || continue; echo "==== $f"; tail -n 150 $f; done; echo "==== nbd events"; grep -hE 'msg=nbd_|csi_keeper' /tmp/csi.log /tmp/tcsi.log 2>/dev/null | tail -n 80; }
trap 'rc=$?; [ $rc = 0 ] || dump' EXIT

M=127.0.0.1:9333
blockd master --data /tmp/m --api $M --lease-ttl 3s >/tmp/master.log 2>&1 &
waitfor 60 blockd volume list --master $M >/dev/null
blockd server --id s1 --data /tmp/s1 --master $M --listen 127.0.0.1:9701 --nbd 127.0.0.1:10801 --http 127.0.0.1:9780 --capacity 1GiB >/tmp/server.log 2>&1 &
waitfor 60 sh -c "blockd volume list --master $M >/dev/null && grep -q server_registered /tmp/master.log"
blockd csi --mode both --endpoint unix:///tmp/csi/csi.sock --node-id guest-node --master $M >/tmp/csi.log 2>&1 &
CSI=$!
waitfor 30 test -S /tmp/csi/csi.sock
echo "driver up (pid $CSI)"

BLOCKD_CSI_SANITY_ENDPOINT=unix:///tmp/csi/csi.sock /usr/local/bin/csi.test -test.run '^TestSanity$' -test.v -test.timeout 20m >/tmp/sanity.out 2>&1 || { tail -n 400 /tmp/sanity.out; echo SANITY-FAILED; exit 1; }
grep -E '^\s+sanity_test.go:[0-9]+: sanity (counts|skipped|failed)' /tmp/sanity.out
echo SANITY-OK

csie2e --endpoint unix:///tmp/csi/csi.sock
noneattached() { for b in /sys/block/nbd*/backend; do v=$(cat $b 2>/dev/null || true); [ -z "$v" ] || { echo "left attached: $b $v"; return 1; }; done; }
noneattached

# A driver restart (an upgrade of the DaemonSet): the mounted volume keeps
# its I/O while no driver runs, and the new process unstages it.
csie2e --endpoint unix:///tmp/csi/csi.sock --phase restart1
kill $CSI; wait $CSI || true
grep -q csi_device_left_attached /tmp/csi.log
dd if=/dev/urandom of=/tmp/e2e/rtarget/during bs=64k count=16 2>/dev/null
sync
sha256sum /tmp/e2e/rtarget/during | sed 's, /tmp/e2e/rtarget/, ,' >> /tmp/e2e/restart.sums
echo "wrote through the mount with no driver running"
blockd csi --mode both --endpoint unix:///tmp/csi/csi.sock --node-id guest-node --master $M >>/tmp/csi.log 2>&1 &
CSI=$!
waitfor 30 test -S /tmp/csi/csi.sock
csie2e --endpoint unix:///tmp/csi/csi.sock --phase restart2
noneattached
kill $CSI; wait $CSI || true
grep -c csi_volume_staged /tmp/csi.log

# A TLS-only cluster (its NBD server refuses sessions without STARTTLS)
# and a driver with a client certificate.
blockd tls init --dir /tmp/pki --master m1 --server t1 --client node >/dev/null
tlsflags() { echo "--tls-cert /tmp/pki/$1/$2-cert.pem --tls-key /tmp/pki/$1/$2-key.pem --tls-ca /tmp/pki/ca-cert.pem"; }
T=127.0.0.1:9433
blockd master --data /tmp/tm --api $T --lease-ttl 3s $(tlsflags masters/m1 server) >/tmp/tmaster.log 2>&1 &
waitfor 60 grep -q leader_elected /tmp/tmaster.log
blockd server --id t1 --data /tmp/t1 --master $T --listen 127.0.0.1:9711 --nbd 127.0.0.1:10811 --http 127.0.0.1:9781 --capacity 1GiB $(tlsflags servers/t1 server) >/tmp/tserver.log 2>&1 &
waitfor 60 grep -q server_registered /tmp/tmaster.log
blockd csi --mode both --endpoint unix:///tmp/tcsi/csi.sock --node-id guest-node --master $T $(tlsflags clients/node client) >/tmp/tcsi.log 2>&1 &
TCSI=$!
waitfor 30 test -S /tmp/tcsi/csi.sock
csie2e --endpoint unix:///tmp/tcsi/csi.sock --phase tls
noneattached
kill $TCSI; wait $TCSI || true
# A request that failed or hung on an nbd device fails the run here, so
# that the trap prints the logs (the kernel's lines alone do not say why).
if dmesg | grep -E "I/O error, dev nbd|blocked for more than" >/tmp/kerr; then cat /tmp/kerr; echo "kernel: nbd requests failed or hung"; exit 1; fi
echo CSI-GUEST-OK
`

// TestCSIInGuest runs the sanity suite (node service included) and the
// end-to-end volume life inside the guest.
func TestCSIInGuest(t *testing.T) {
	vmtest.Require(t)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{
			"/usr/local/bin/blockd":   vmtest.BuildBlockd(t),
			"/usr/local/bin/csi.test": sanityBinary(t),
			"/usr/local/bin/csie2e":   vmtest.GoBuild(t, "./tests/vm/csi/csie2e"),
		},
		Tools:     []string{"resize2fs"},
		Script:    script,
		MemoryMiB: 2048,
		Timeout:   25 * time.Minute,
	})
	if res.ExitCode != 0 {
		t.Fatalf("guest script failed with exit code %d (console in the log above)", res.ExitCode)
	}
	for _, m := range []string{"SANITY-OK", "E2E-OK all", "E2E-OK restart1", "E2E-OK restart2", "CSI-GUEST-OK",
		"expanded while mounted", "files intact across the driver restart",
		"snapshot clone: the files are there", "pvc-e2e-from-snap: staged", "pvc-e2e-from-vol: staged",
		"E2E-OK tls", "tls: the volume's life over TLS"} {
		if !strings.Contains(res.Output, m) {
			t.Errorf("console lacks %q", m)
		}
	}
	if m := regexp.MustCompile(`sanity counts \(node service true\): passed=(\d+) skipped=(\d+) failed=(\d+)`).FindStringSubmatch(res.Output); m == nil {
		t.Error("console lacks the sanity counts")
	} else {
		t.Logf("guest sanity: passed=%s skipped=%s failed=%s", m[1], m[2], m[3])
		if m[3] != "0" {
			t.Errorf("sanity failures: %s", m[3])
		}
	}
	for _, bad := range []string{"EXT4-fs error", "Buffer I/O error", "I/O error, dev nbd"} {
		if strings.Contains(res.Console, bad) {
			t.Errorf("console has %q", bad)
		}
	}
}
