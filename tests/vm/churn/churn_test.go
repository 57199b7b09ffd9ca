// Package churn attaches and detaches one volume over and over in a Debian
// 6.12 guest (tests/vm/vmtest), with the real kernel drivers: `blockd
// attach nbd` (the keeper, /dev/nbdN) and `blockd attach ublk` (the
// foreground ublk server, or /dev/ublkbN hosted by the serve process
// itself) take turns against one `blockd serve`. Every cycle writes a region and makes it durable (a FUA write or
// an fsync), some cycles kill -9 the keeper, the ublk process or the
// server in between, and every attach first reads the whole used area back
// and compares it with a reference copy of everything flushed so far. At
// the end no device may be left attached and the kernel log must hold no
// I/O error, hung task or oops.
package churn

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/internal/testenv"
	"github.com/blockd/blockd/tests/vm/vmtest"
)

// The guest script. Regions are 64 KiB; cycle i rewrites region i%REGIONS
// (fio FUA writes of a per-cycle pattern, or dd of random data and an
// fsync), the server-kill cycles also keep a writer on the BG regions
// across the kill. /tmp/ref.img (tmpfs) holds what the device must read.
//
// Cycle i, by i%10 ("ublk": `attach ublk --control none`, the foreground
// process serves the device over NBD; "hosted": plain `attach ublk`, which
// finds serve's control socket in the working directory and has the serve
// process host the device itself):
//
//	1 nbd plain
//	2 ublk plain
//	3 nbd kill -9 keeper (the device goes on without it), blockd detach
//	4 ublk kill -9 of its process, then attach --recover
//	5 hosted plain (the next serve restart must not bring the detached
//	  device back)
//	6 ublk kill -9 serve under synced writes
//	7 nbd kill -9 serve under synced writes
//	8 ublk kill -9 of its process, then blockd detach of the orphan device
//	9 hosted kill -9 serve under synced writes (the restarted serve
//	  recovers the device)
//	0 nbd plain
const guestScript = `
on_exit() {
	rc=$?
	[ $rc -eq 0 ] && return 0
	echo "CHURN FAILED (exit $rc) in cycle ${i:-0}; logs follow"
	for f in /tmp/serve.log /tmp/attach.log /tmp/writer.err; do
		[ -f $f ] && { echo "=== tail $f"; tail -n 60 $f; }
	done
	echo "=== devices"; ls /dev/nbd* /dev/ublk* 2>/dev/null | tr '\n' ' '; echo
	for b in /sys/block/nbd*/backend; do [ -f $b ] && echo "$b: $(cat $b)"; done
	echo "=== processes"; ps 2>/dev/null | grep -E 'blockd|fio|dd' | grep -v grep
	# a device left without a server would block the harness's final sync
	for b in /dev/ublkb*; do [ -e "$b" ] && timeout 30 blockd detach --force $b; done
	for b in /sys/block/nbd*/backend; do [ -f $b ] && b=${b%/backend} && timeout 30 blockd detach --force /dev/${b##*/}; done
	return 0
}
trap on_exit EXIT
waitfor() { # waitfor SECONDS CMD...: poll until CMD succeeds
	n=$(( $1 * 10 )); shift
	while ! "$@" 2>/dev/null; do
		n=$((n-1)); [ $n -gt 0 ] || { echo "waitfor timed out: $*"; return 1; }
		sleep 0.1
	done
}
M="--master 127.0.0.1:9333"
starts=0
serve_up() { [ "$(grep -c 'blockd is serving volume' /tmp/serve.out)" -ge $starts ] || ! kill -0 $SERVE; }
start_serve() {
	starts=$((starts+1))
	blockd serve --log-file /tmp/serve.log --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:256MiB >>/tmp/serve.out 2>&1 &
	SERVE=$!
	waitfor 120 serve_up
	kill -0 $SERVE || { echo "serve exited"; cat /tmp/serve.out; return 1; }
}
kill_serve() { kill -9 $SERVE; wait $SERVE 2>/dev/null || true; }
cd /tmp # serve's data directory ./blockd-data: attach ublk finds its control socket

REG=65536
AREA=$((REGIONS + BG)) # regions compared
dd if=/dev/zero of=/tmp/ref.img bs=$REG count=$AREA 2>/dev/null
verify() { # the device reads what was flushed, byte for byte
	dd if=$DEV of=/tmp/cur.img bs=$REG count=$AREA iflag=direct 2>/tmp/dd.err || { cat /tmp/dd.err; return 1; }
	cmp /tmp/cur.img /tmp/ref.img || { echo "CHURN cycle $i: $DEV does not read back what was flushed"; return 1; }
}
write_region() { # write_region R: rewrite region R durably, and the reference
	if [ $(( (i / 2) % 2 )) -eq 0 ]; then
		# O_DIRECT|O_SYNC writes: REQ_FUA on the device
		p=$(printf 'c%06d' $i)
		fio --name=fua --filename=$DEV --rw=write --bs=$REG --size=$REG --offset=$(($1 * REG)) \
			--direct=1 --sync=1 --ioengine=psync --scramble_buffers=0 --buffer_pattern=0x$(printf '%s\n' "$p" | od -An -tx1 | tr -d ' \n') \
			--output-format=terse >/tmp/fio.out 2>&1 || { cat /tmp/fio.out; return 1; }
		yes "$p" | head -c $REG >/tmp/chunk
		fua=$((fua + 1))
	else
		dd if=/dev/urandom of=/tmp/chunk bs=$REG count=1 2>/dev/null
		dd if=/tmp/chunk of=$DEV bs=$REG seek=$1 oflag=direct conv=fsync 2>/tmp/dd.err || { cat /tmp/dd.err; return 1; }
		fsyncs=$((fsyncs + 1))
	fi
	dd if=/tmp/chunk of=/tmp/ref.img bs=$REG seek=$1 conv=notrunc 2>/dev/null
}
start_writer() { # synced writes on the BG regions until /tmp/stop
	rm -f /tmp/stop /tmp/writer.done
	dd if=/dev/urandom of=/tmp/bg bs=$REG count=$BG 2>/dev/null
	( n=0; while [ ! -f /tmp/stop ]; do
		dd if=/tmp/bg of=$DEV bs=$REG seek=$REGIONS oflag=direct conv=fsync 2>>/tmp/writer.err || { echo "CHURN writer: write $n failed"; exit 1; }
		n=$((n+1))
	  done; echo $n >/tmp/writer.done ) &
	WRITER=$!
}
stop_writer() {
	touch /tmp/stop
	wait $WRITER || { echo "CHURN cycle $i: the writer failed across the kill"; tail -3 /tmp/writer.err; return 1; }
	dd if=/tmp/bg of=/tmp/ref.img bs=$REG seek=$REGIONS conv=notrunc 2>/dev/null
	echo "CHURN cycle $i: writer made $(cat /tmp/writer.done) synced writes across the kill"
}
serve_kill_under_writes() {
	start_writer
	sleep 0.3
	p0=$(pending)
	kill_serve
	start_serve
	# a device detached through serve is forgotten: no recovery of it
	[ -n "$HOSTED" ] || [ "$(pending)" = "$p0" ] || { echo "CHURN cycle $i: the restarted serve wants to recover a detached device"; return 1; }
	# the client reconnects by itself; the writer must go on without an error
	sleep 1.5
	stop_writer
	serve_kills=$((serve_kills + 1))
}
no_device_left() {
	for b in /sys/block/nbd*/backend; do
		[ -f $b ] && { echo "CHURN cycle $i: $b still there ($(cat $b))"; return 1; }
	done
	for c in /dev/ublkc* /dev/ublkb*; do
		[ -e $c ] && { echo "CHURN cycle $i: $c still there"; return 1; }
	done
	return 0
}

attach_nbd() {
	: >/tmp/dev
	blockd attach nbd $M --connections 2 --timeout 5s --give-up 90s vol0 >/tmp/dev 2>>/tmp/attach.log &
	KEEPER=$!
	waitfor 60 sh -c "test -s /tmp/dev || ! kill -0 $KEEPER" || return 1
	DEV=$(cat /tmp/dev)
	test -b "$DEV" || { echo "attach nbd exited"; return 1; }
}
attach_ublk() { # attach_ublk [ARGS...]
	: >/tmp/dev
	blockd attach ublk $M --control none --give-up 90s "$@" vol0 >/tmp/dev 2>>/tmp/attach.log &
	ATT=$!
	waitfor 60 sh -c "test -s /tmp/dev || ! kill -0 $ATT" || return 1
	DEV=$(cat /tmp/dev)
	test -b "$DEV" || { echo "attach ublk exited"; return 1; }
}
attach_hosted() {
	blockd attach ublk $M vol0 >/tmp/dev 2>>/tmp/attach.log || { echo "CHURN cycle $i: attach ublk (hosted) failed"; return 1; }
	DEV=$(cat /tmp/dev)
	test -b "$DEV"
	grep -q msg=ublk_served /tmp/serve.log
}
detach_hosted() {
	blockd detach $DEV 2>>/tmp/attach.log || { echo "CHURN cycle $i: blockd detach $DEV (hosted) failed"; return 1; }
	test ! -e $DEV || { echo "CHURN cycle $i: $DEV still there after detach"; return 1; }
}
pending() { grep -c msg=ublk_recovery_pending /tmp/serve.log || true; }
detach() { # detach PID: blockd detach $DEV, its process exits 0
	blockd detach $DEV 2>>/tmp/attach.log || { echo "CHURN cycle $i: blockd detach $DEV failed"; return 1; }
	rc=0; wait $1 || rc=$?
	[ $rc -eq 0 ] || { echo "CHURN cycle $i: the process serving $DEV exited $rc after detach"; return 1; }
}

start_serve
fua=0; fsyncs=0; serve_kills=0; client_kills=0; recovers=0; orphans=0; hosted=0
t0=$(date +%s)
i=1
while [ $i -le $CYCLES ]; do
	r=$((i % REGIONS))
	c0=$(date +%s)
	case $((i % 10)) in
	1|0) attach_nbd; verify; write_region $r; detach $KEEPER;;
	3)   attach_nbd; verify; write_region $r
	     kill -9 $KEEPER; wait $KEEPER 2>/dev/null || true; client_kills=$((client_kills + 1))
	     # the kernel still holds the sockets: the device works without its keeper
	     verify
	     blockd detach $DEV 2>>/tmp/attach.log;;
	7)   attach_nbd; verify; serve_kill_under_writes; verify; write_region $r; detach $KEEPER;;
	2)   attach_ublk; verify; write_region $r; detach $ATT;;
	4|8) attach_ublk; verify; write_region $r
	     ID=${DEV#/dev/ublkb}
	     kill -9 $ATT; wait $ATT 2>/dev/null || true; client_kills=$((client_kills + 1))
	     test -b $DEV || { echo "CHURN cycle $i: $DEV went away with its process (no user recovery)"; exit 1; }
	     if [ $((i % 10)) -eq 4 ]; then
	         attach_ublk --id $ID --recover
	         [ "$DEV" = /dev/ublkb$ID ] || { echo "CHURN cycle $i: recovered as $DEV, not ublkb$ID"; exit 1; }
	         verify; detach $ATT; recovers=$((recovers + 1))
	     else
	         blockd detach $DEV 2>>/tmp/attach.log; orphans=$((orphans + 1))
	     fi;;
	6)   attach_ublk; verify; serve_kill_under_writes; verify; write_region $r; detach $ATT;;
	5)   attach_hosted; verify; write_region $r; detach_hosted; hosted=$((hosted + 1));;
	9)   attach_hosted; verify; write_region $r
	     u0=$(grep -c msg=ublk_recovered /tmp/serve.log || true)
	     HOSTED=1; serve_kill_under_writes; HOSTED=
	     [ "$(grep -c msg=ublk_recovered /tmp/serve.log)" -gt "$u0" ] || { echo "CHURN cycle $i: the restarted serve did not recover $DEV"; exit 1; }
	     verify; detach_hosted; hosted=$((hosted + 1));;
	esac
	no_device_left
	times="$times $i:$(( $(date +%s) - c0 ))"
	if [ $BUDGET -gt 0 ] && [ $i -ge 10 ] && [ $(( $(date +%s) - t0 )) -ge $BUDGET ] && [ $i -lt $CYCLES ]; then
		echo "CHURN time budget of ${BUDGET}s spent: stopping after $i of $CYCLES cycles"
		break
	fi
	i=$((i + 1))
done
[ $i -le $CYCLES ] || i=$CYCLES
# a last attach reads everything back once more
attach_nbd; verify
# control: a write the reference does not know of must be caught
dd if=/dev/urandom of=$DEV bs=4k count=1 seek=$((REGIONS * 16 + 5)) oflag=direct conv=fsync 2>/dev/null
if verify >/dev/null; then echo "CHURN control: an unknown write went unnoticed"; exit 1; fi
echo "CHURN control: an unknown write is caught"
detach $KEEPER; no_device_left
echo "CHURN seconds per cycle:$times"
echo "CHURN $i cycles in $(( $(date +%s) - t0 ))s: $fua FUA writes, $fsyncs fsyncs, $client_kills client kills ($recovers ublk recoveries, $orphans orphan detaches), $hosted hosted ublk devices, $serve_kills server kills; every attach read back what was flushed"
if dmesg | grep -E 'Buffer I/O error|blocked for more than|Oops|I/O error, dev|BUG:|WARNING:' >/tmp/bad; then
	echo "CHURN kernel log:"; cat /tmp/bad; exit 1
fi
grep -E 'nbd_(link_dead|reconnected|reconnect_failed|give_up)|ublk_(recover|detached)' /tmp/attach.log | cut -c1-160 | tail -n 12
kill -TERM $SERVE; wait $SERVE || true
echo CHURN-OK
`

var doneRe = regexp.MustCompile(`CHURN (\d+) cycles in \d+s`)

// TestAttachDetachChurn runs the cycles in one guest: up to CHURN_CYCLES
// (default 30: three rounds of the ten kinds, about 2 minutes of guest
// time on a 2-core host running other tests), but it stops after the
// cycle that spends CHURN_BUDGET seconds of guest time (default 150; 0:
// no budget), once every kind ran (10 cycles), so that `go test ./...`
// stays bounded on a loaded machine. The cycles done are logged.
func TestAttachDetachChurn(t *testing.T) {
	vmtest.Require(t)
	testenv.RequireTool(t, "fio")
	cycles := 30
	if s := os.Getenv("CHURN_CYCLES"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 10 {
			t.Fatalf("CHURN_CYCLES=%q: want a number >= 10", s)
		}
		cycles = n
	}
	budget := 150
	if s := os.Getenv("CHURN_BUDGET"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 0 {
			t.Fatalf("CHURN_BUDGET=%q: want seconds >= 0", s)
		}
		budget = n
	}
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries:  map[string]string{"/usr/local/bin/blockd": vmtest.BuildBlockd(t)},
		Tools:     []string{"fio"},
		Env:       map[string]string{"CYCLES": strconv.Itoa(cycles), "BUDGET": strconv.Itoa(budget), "REGIONS": "16", "BG": "4"},
		Script:    guestScript,
		MemoryMiB: 2048,
		Timeout:   time.Duration(cycles)*10*time.Second + 3*time.Minute,
	})
	var lines []string
	for _, l := range strings.Split(res.Output, "\n") {
		if strings.Contains(l, "CHURN") {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	t.Logf("guest ran %v:\n%s", res.Duration.Round(time.Second), strings.Join(lines, "\n"))
	if res.ExitCode != 0 {
		t.Fatalf("guest script exit %d (the console above has the blockd logs)", res.ExitCode)
	}
	m := doneRe.FindStringSubmatch(res.Output)
	if !strings.Contains(res.Output, "CHURN-OK") || !strings.Contains(res.Output, "CHURN control: an unknown write is caught") || m == nil {
		t.Fatalf("the guest did not report its cycles done")
	}
	if n, _ := strconv.Atoi(m[1]); n < 10 || n > cycles || (n < cycles && !strings.Contains(res.Output, "CHURN time budget")) {
		t.Fatalf("the guest reports %d cycles done, want %d (or at least 10 with the time budget spent)", n, cycles)
	}
	for _, bad := range []string{"Buffer I/O error", "blocked for more than", "Oops", "I/O error, dev", "BUG:", "WARNING:"} {
		if strings.Contains(res.Console, bad) {
			t.Errorf("kernel log has %q", bad)
		}
	}
}
