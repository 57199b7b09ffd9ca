package nbdkern

import (
	"testing"

	"github.com/blockd/blockd/tests/vm/vmtest"
)

// tlsPrelude makes the certificates (blockd tls init) before the server
// starts: the CA, server "local" (what blockd serve presents), client
// "alice" and, under a second CA, client "mallory" whom the server must
// not trust.
const tlsPrelude = `
PKI=/tmp/pki
blockd tls init --dir $PKI --server local --client alice >/tmp/tlsinit.log 2>&1 || { cat /tmp/tlsinit.log; exit 1; }
blockd tls init --dir /tmp/otherpki --client mallory >/dev/null 2>&1
A=$PKI/clients/alice
export BLOCKD_TLS_CERT=$A/client-cert.pem BLOCKD_TLS_KEY=$A/client-key.pem BLOCKD_TLS_CA=$A/ca-cert.pem
ls $PKI/servers/local $A
`

// tlsServer is blockd serve with credentials: every port (NBD and the
// master API) requires TLS and a client certificate from the cluster CA.
// SERVER_READY and attach use alice's credentials (BLOCKD_TLS_* above).
func tlsServer(t *testing.T) server {
	t.Helper()
	vmtest.Require(t)
	d := "/tmp/pki/servers/local"
	return server{
		name:     "blockd serve (TLS)",
		binaries: map[string]string{"/usr/local/bin/blockd": vmtest.BuildBlockd(t)},
		cmd: "blockd serve --log-file - --data /tmp/bd --nbd 127.0.0.1:10809 --api 127.0.0.1:9333 --volume vol0:256MiB" +
			" --tls-cert " + d + "/server-cert.pem --tls-key " + d + "/server-key.pem --tls-ca " + d + "/ca-cert.pem",
		ready:      "blockd volume info --master 127.0.0.1:9333 --timeout 5s vol0",
		attachArgs: "--master 127.0.0.1:9333",
	}
}

// TestTLSNBDClientExt4: Debian's nbd-client 3.24 (GnuTLS, its own
// userspace TLS proxy in front of the kernel driver) with alice's
// certificate attaches /dev/nbd0 from the TLS-only blockd serve; ext4 round
// trip and e2fsck. Then the refusals, each with the client's output:
// a plain nbd-client (the server answers NBD_REP_ERR_TLS_REQD), a
// certificate from another CA, and a plain blockd attach.
func TestTLSNBDClientExt4(t *testing.T) {
	s := tlsServer(t)
	res := boot(t, s, tlsPrelude+`
start_server
TLSARGS="-certfile $A/client-cert.pem -keyfile $A/client-key.pem -cacertfile $A/ca-cert.pem -tlshostname 127.0.0.1"
waitfor 60 nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 $TLSARGS
echo "nbd0 over TLS: size $(cat /sys/block/nbd0/size) sectors"
test "$(cat /sys/block/nbd0/size)" = 524288
fs_roundtrip /dev/nbd0
nbd-client -d /dev/nbd0
echo TLS-NBDCLIENT-OK

# (c) refusals: each fails, the device stays unconfigured, the output names the reason
refused() { # refused NAME CMD...: CMD must fail; its output is printed
	n=$1; shift
	if "$@" >/tmp/refused.out 2>&1; then echo "$n: NOT refused"; cat /tmp/refused.out; exit 1; fi
	echo "--- $n refused, output:"; cat /tmp/refused.out; echo "--- end"
}
refused nbd-client-plain nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol0 -b 4096
grep -q 'TLS required: send NBD_OPT_STARTTLS first' /tmp/refused.out
test "$(cat /sys/block/nbd1/size)" = 0
refused nbd-client-other-ca nbd-client 127.0.0.1 10809 /dev/nbd1 -N vol0 -b 4096 \
	-certfile /tmp/otherpki/clients/mallory/client-cert.pem -keyfile /tmp/otherpki/clients/mallory/client-key.pem \
	-cacertfile $A/ca-cert.pem -tlshostname 127.0.0.1
test "$(cat /sys/block/nbd1/size)" = 0
# nbd-client 3.24 does not print the TLS alert; the server logs the reason
grep -q 'nbd_tls_refused.*client certificate rejected: x509: certificate signed by unknown authority' /tmp/server.log
refused blockd-attach-plain env -u BLOCKD_TLS_CERT -u BLOCKD_TLS_KEY -u BLOCKD_TLS_CA blockd attach nbd --nbd 127.0.0.1:10809 --wait 2s --device /dev/nbd1 vol0
grep -q 'blockd: attach: .*the server requires TLS: TLS required: send NBD_OPT_STARTTLS first (give --tls-cert, --tls-key, --tls-ca)' /tmp/refused.out
test "$(cat /sys/block/nbd1/size)" = 0
# the server stayed up through the refusals and still serves alice
nbd-client 127.0.0.1 10809 /dev/nbd0 -N vol0 -b 4096 $TLSARGS
nbd-client -d /dev/nbd0
grep -iE 'tls|refus|handshake' /tmp/server.log | tail -8
echo TLS-REFUSALS-OK
`)
	expect(t, res, "TLS-NBDCLIENT-OK", "TLS-REFUSALS-OK", "verified 6 files rt")
}

// TestTLSAttachSurvivesServerKill: blockd attach nbd with alice's
// certificate (the keeper negotiates TLS and proxies it to the kernel over
// a socketpair); ext4 round trip; then kill -9 and restart of blockd serve
// under a mounted, written filesystem: the keeper reconnects with a new TLS
// handshake, synced files read back and e2fsck is clean.
func TestTLSAttachSurvivesServerKill(t *testing.T) {
	s := tlsServer(t)
	res := boot(t, s, tlsPrelude+`
start_server
attach --connections 2 --timeout 10s --give-up 3m --tls-cert $A/client-cert.pem --tls-key $A/client-key.pem --tls-ca $A/ca-cert.pem
test "$(cat /sys/block/$(basename $DEV)/backend)" = vol0
fs_roundtrip $DEV
echo TLS-ATTACH-ROUNDTRIP-OK
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
before_restart=$(wc -l </tmp/server.log)
sleep 1
start_server
waitfor 180 grep -q nbd_reconnected /tmp/attach.log || { cat /tmp/attach.log; exit 1; }
# the restarted server saw new TLS handshakes from alice (the keeper renegotiated)
tail -n +$((before_restart+1)) /tmp/server.log | grep 'nbd_tls_established.*client=alice'
echo "keeper reconnected over TLS"
sleep 2
touch /tmp/stop
wait $WRITER
fs_write /mnt/v after 3
sync
echo 3 > /proc/sys/vm/drop_caches
fs_verify /mnt/v before
fs_verify /mnt/v after
umount /mnt/v
e2fsck -fn $DEV
mount -t ext4 $DEV /mnt/v
fs_verify /mnt/v rt
fs_verify /mnt/v before
fs_verify /mnt/v after
umount /mnt/v
blockd detach $DEV
wait $KEEPER
echo "keeper exit $?"
grep -E 'nbd_(link_dead|reconnect|reconnected|reconnect_failed)|tls' /tmp/attach.log | head -20
echo TLS-ATTACH-KILL-OK
`)
	expect(t, res, "TLS-ATTACH-ROUNDTRIP-OK", "TLS-ATTACH-KILL-OK", "keeper reconnected over TLS", "keeper exit 0",
		"verified 6 files rt", "verified 4 files before", "verified 3 files after")
}
