#!/usr/bin/env bash
# A volume server: registers with the master and serves NBD.
source "$(dirname "$0")/lib.sh"

SERVER_ID=${SERVER_ID:?}
SERVER_IP=${SERVER_IP:?}
MASTER=${MASTER:?}
REPL_PORT=${REPL_PORT:-7000}
NBD_PORT=${NBD_PORT:-10809}
install_tls "$PKI_SHARE/servers/$SERVER_ID"
unit "blockd-server" "blockd volume server $SERVER_ID" \
	"$BLOCKD server --data $STATE/server --master $MASTER --id $SERVER_ID --listen $SERVER_IP:$REPL_PORT --nbd $SERVER_IP:$NBD_PORT $(tls_flags server)"
start blockd-server
wait_for 120 port_open "$SERVER_IP:$NBD_PORT"
log "server $SERVER_ID up: nbd $SERVER_IP:$NBD_PORT, replication $SERVER_IP:$REPL_PORT (TLS)"
