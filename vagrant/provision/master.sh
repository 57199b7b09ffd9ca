#!/usr/bin/env bash
# The master: makes the cluster's certificates, then runs a single-node raft
# master (add --peers/--join for three) in TLS mode.
source "$(dirname "$0")/lib.sh"

MASTER_IP=${MASTER_IP:?}
API=${MASTER_API:-$MASTER_IP:9333}
SERVERS=${SERVERS:?}        # the volume servers: "ID=IP ID=IP ..."
CLIENTS=${CLIENTS:-client}  # client identities: "NAME ..."

# blockd tls init reuses the CA in --dir and never overwrites an identity,
# so re-provisioning keeps the certificates.
pki=$STATE/pki
mkdir -p "$pki"
"$BLOCKD" tls init --dir "$pki" --master master --host "$MASTER_IP" --host localhost --host 127.0.0.1 >/dev/null
for s in $SERVERS; do
	"$BLOCKD" tls init --dir "$pki" --server "${s%%=*}" --host "${s#*=}" >/dev/null
done
for c in $CLIENTS; do
	"$BLOCKD" tls init --dir "$pki" --client "$c" >/dev/null
done
# publish the nodes' own directories, never the CA key
for d in "$pki"/servers/* "$pki"/clients/*; do
	dst=$PKI_SHARE/$(basename "$(dirname "$d")")/$(basename "$d")
	mkdir -p "$dst"
	cp "$d"/*.pem "$dst"/
done
install_tls "$pki/masters/master"
log "certificates in $pki (CA key: $pki/ca-key.pem); published to $PKI_SHARE"

unit blockd-master "blockd master" "$BLOCKD master --data $STATE/master --api $API $(tls_flags server)"
start blockd-master
wait_for 120 "$BLOCKD" volume list --master "$API" --timeout 5s \
	--tls-cert "$pki/clients/${CLIENTS%% *}/client-cert.pem" --tls-key "$pki/clients/${CLIENTS%% *}/client-key.pem" --tls-ca "$pki/ca-cert.pem"
log "master up at $API (TLS)"
