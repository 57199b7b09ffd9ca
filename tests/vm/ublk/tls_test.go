package ublk_test

import (
	"strings"
	"testing"
	"time"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// TestTLSAttachUblk: `blockd serve` with the certificates of `blockd tls
// init` requires TLS and a client certificate of its CA on every port;
// `blockd attach ublk` with alice's certificate (--tls-cert, --tls-key,
// --tls-ca; asking the master over HTTPS, reaching NBD with STARTTLS)
// serves /dev/ublkbN in the foreground (--control none: never the local
// server-hosted path). ext4 is made, mounted, written and synced; then
// the strangers are refused while the device stays mounted: another CA's
// client certificate at NBD and at the master API, and no certificate at
// all, and a client trusting only its own CA (which refuses the server), each with one line that names the cause, the server logging it,
// and no device left behind. Then blockd serve is killed with SIGKILL under
// a writer and restarted: the attach process's NBD client renegotiates
// STARTTLS and a new TLS session (the restarted server logs alice's
// handshake), I/O resumes, every synced file reads back after the page
// cache is dropped, e2fsck -fn is clean, and detach ends attach with 0.
func TestTLSAttachUblk(t *testing.T) {
	vmtest.Require(t)
	res := vmtest.Boot(t, vmtest.Guest{
		Binaries: map[string]string{
			"/usr/local/bin/blockd":    vmtest.BuildBlockd(t),
			"/usr/local/bin/ublkserve": vmtest.GoBuild(t, "./tests/vm/ublk/ublkserve"),
		},
		MemoryMiB: 2048,
		Timeout:   8 * time.Minute,
		Script: prelude + writerScript + `
PKI=/tmp/pki
blockd tls init --dir $PKI --server local --client alice >/tmp/tlsinit.log 2>&1 || { cat /tmp/tlsinit.log; exit 1; }
blockd tls init --dir /tmp/otherpki --client mallory >/dev/null 2>&1
S=$PKI/servers/local A=$PKI/clients/alice M=/tmp/otherpki/clients/mallory
ALICE="--tls-cert $A/client-cert.pem --tls-key $A/client-key.pem --tls-ca $A/ca-cert.pem"
# mallory trusts both CAs (so she accepts the server and presents her
# certificate); mallory-alone trusts only her own CA
cat $M/ca-cert.pem $A/ca-cert.pem > /tmp/both-ca.pem
MALLORY="--tls-cert $M/client-cert.pem --tls-key $M/client-key.pem --tls-ca /tmp/both-ca.pem"
MALLORY_ALONE="--tls-cert $M/client-cert.pem --tls-key $M/client-key.pem --tls-ca $M/ca-cert.pem"
starts=0
serve_up() { [ "$(grep -c 'blockd is serving volume' /tmp/serve.log)" -ge $starts ] || ! kill -0 $SERVE; }
start_serve() {
	starts=$((starts+1))
	blockd serve --log-file - --data /tmp/bd --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:256MiB \
		--tls-cert $S/server-cert.pem --tls-key $S/server-key.pem --tls-ca $S/ca-cert.pem >>/tmp/serve.log 2>&1 &
	SERVE=$!
	waitfor 120 serve_up
	kill -0 $SERVE || { echo "serve exited"; tail -n 40 /tmp/serve.log; exit 1; }
	echo "serve started over TLS (pid $SERVE)"
}
start_serve
grep -q 'over TLS (client certificates required)' /tmp/serve.log

attached() { test -s /tmp/attach.out || ! kill -0 $ATT; }
blockd attach ublk vol0 --master 127.0.0.1:9333 --control none --give-up 3m $ALICE >/tmp/attach.out 2>/tmp/attach.log &
ATT=$!
waitfor 120 attached
DEV=$(cat /tmp/attach.out)
test -b "$DEV" || { cat /tmp/attach.log; tail -n 20 /tmp/serve.log; exit 1; }
echo "attached over TLS at $DEV"
grep 'msg=ublk_nbd_connected' /tmp/attach.log
grep -q 'nbd_tls_established.*client=alice' /tmp/serve.log && echo "serve saw alice's TLS session"
mkfs.ext4 -q -F $DEV
mkdir -p /mnt/u && mount -t ext4 $DEV /mnt/u
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/u/f$i bs=64k count=$((i*8)) 2>/dev/null; done
(cd /mnt/u && md5sum f* > /tmp/fsums)
sync
echo "wrote and synced $(wc -l < /tmp/fsums) files"

# The strangers, while the device is mounted. Each attach must fail with a
# one-line error naming the cause, the server logs the reason, and no
# second ublk device is left.
refused() { # refused NAME WANT ARGS...: blockd attach ublk ARGS must fail; its error line must contain WANT
	local n=$1 want=$2; shift 2
	if env -u BLOCKD_TLS_CERT -u BLOCKD_TLS_KEY -u BLOCKD_TLS_CA blockd attach ublk vol0 --control none --wait 0s "$@" >/tmp/r.out 2>/tmp/r.err; then
		echo "$n: NOT refused"; cat /tmp/r.out /tmp/r.err; exit 1
	fi
	grep '^blockd: ' /tmp/r.err > /tmp/r.line || { echo "$n: no error line"; cat /tmp/r.err; exit 1; }
	[ "$(wc -l < /tmp/r.line)" = 1 ] || { echo "$n: error is not one line"; cat /tmp/r.err; exit 1; }
	grep -qF "$want" /tmp/r.line || { echo "$n: error lacks '$want'"; cat /tmp/r.err; exit 1; }
	test ! -s /tmp/r.out
	[ "$(ls /dev/ublkb* | wc -l)" = 1 ] || { echo "$n: left a device"; ls /dev/ublkb*; exit 1; }
	echo "REFUSED $n: $(cat /tmp/r.line)"
}
refused other-ca-nbd 'remote error: tls: unknown certificate authority' --nbd 127.0.0.1:10809 $MALLORY
waitfor 20 grep -q 'nbd_tls_refused.*client certificate rejected: x509: certificate signed by unknown authority' /tmp/serve.log
echo "SERVER-LOG other-ca-nbd: $(grep 'nbd_tls_refused' /tmp/serve.log | tail -1)"
refused other-ca-api 'unknown certificate authority' --master 127.0.0.1:9333 $MALLORY
waitfor 20 grep -q 'api_tls_refused.*certificate signed by unknown authority' /tmp/serve.log
echo "SERVER-LOG other-ca-api: $(grep 'api_tls_refused' /tmp/serve.log | tail -1)"
refused other-ca-server 'server certificate: x509: certificate signed by unknown authority' --nbd 127.0.0.1:10809 $MALLORY_ALONE
waitfor 20 grep -q 'nbd_tls_refused.*remote error: tls: bad certificate' /tmp/serve.log
echo "SERVER-LOG other-ca-server: $(grep 'nbd_tls_refused' /tmp/serve.log | tail -1)"
refused no-cert-nbd 'the server requires TLS: TLS required: send NBD_OPT_STARTTLS first (give --tls-cert, --tls-key, --tls-ca)' --nbd 127.0.0.1:10809
waitfor 20 grep -q 'nbd_tls_required' /tmp/serve.log
echo "SERVER-LOG no-cert-nbd: $(grep 'nbd_tls_required' /tmp/serve.log | tail -1)"
refused no-cert-api 'requires TLS: give --tls-cert' --master 127.0.0.1:9333
echo "SERVER-LOG no-cert-api: $(grep 'api_tls_refused' /tmp/serve.log | tail -1)"
kill -0 $SERVE && kill -0 $ATT && echo "serve and attach survived the strangers"
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/u && md5sum -c /tmp/fsums >/dev/null) && echo "files read back after the refusals"

# kill -9 of blockd serve under a writer; the attach process reconnects
# with a new STARTTLS and TLS handshake.
start_writer
waitfor 60 more_files 3
n=$(nfiles)
before=$(wc -l < /tmp/serve.log)
kill -KILL $SERVE; wait $SERVE 2>/dev/null || true
echo "killed serve after $n files"
sleep 1
start_serve
waitfor 180 grep -q msg=ublk_nbd_reconnected /tmp/attach.log || { tail -n 20 /tmp/attach.log; exit 1; }
tail -n +$((before+1)) /tmp/serve.log | grep -q 'nbd_tls_established.*client=alice' && echo "the restarted serve saw a new TLS session from alice"
waitfor 120 more_files $((n+5))
echo "I/O resumed over TLS: writer at $(nfiles) files"
touch /tmp/stop
wait $WRITER
sync
echo 3 > /proc/sys/vm/drop_caches
(cd /mnt/u && md5sum -c /tmp/fsums >/dev/null && md5sum -c /tmp/wsums > /tmp/check.out) || { grep -v ': OK' /tmp/check.out; exit 1; }
echo "verified $(wc -l < /tmp/check.out) writer files and $(wc -l < /tmp/fsums) synced files"
dmesg > /tmp/dmesg
if grep -iE 'I/O error|EXT4-fs error|Buffer I/O' /tmp/dmesg; then echo "KERNEL-IO-ERRORS"; exit 1; fi
umount /mnt/u
e2fsck -fn $DEV
blockd detach $DEV
wait $ATT
echo "attach exited with $?"
test ! -e $DEV
grep -E 'msg=ublk_nbd_(connected|connection_lost|reconnect_failed|reconnected)' /tmp/attach.log | head -8
kill -TERM $SERVE; wait $SERVE
echo TLS-ATTACH-UBLK-OK
`,
	})
	expect(t, res, "TLS-ATTACH-UBLK-OK", "serve saw alice's TLS session", "REFUSED other-ca-nbd", "REFUSED other-ca-api", "REFUSED other-ca-server",
		"REFUSED no-cert-nbd", "REFUSED no-cert-api", "serve and attach survived the strangers", "files read back after the refusals",
		"the restarted serve saw a new TLS session from alice", "I/O resumed over TLS", "attach exited with 0")
	if strings.Contains(res.Output, "WRITE-ERROR") || strings.Contains(res.Output, "READ-ERROR") {
		t.Fatalf("I/O errors reached the writer")
	}
	t.Logf("guest time %v", res.Duration)
}
