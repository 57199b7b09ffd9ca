#!/usr/bin/env bash
# The master: a single-node raft master (add --peers/--join for three).
source "$(dirname "$0")/lib.sh"

MASTER_IP=${MASTER_IP:?}
API=${MASTER_API:-$MASTER_IP:9333}
unit blockd-master "blockd master" "$BLOCKD master --data $STATE/master --api $API"
start blockd-master
wait_for 120 "$BLOCKD" volume list --master "$API" --timeout 5s
log "master up at $API"
