#!/usr/bin/env bash
# Every node: install the blockd binary (uploaded to /tmp/blockd) and the
# tools the cluster uses.
source "$(dirname "$0")/lib.sh"

SRC=${BLOCKD_SRC:-/tmp/blockd}
if [ -z "$ROOT" ] && command -v apt-get >/dev/null; then
	export DEBIAN_FRONTEND=noninteractive
	need=()
	for p in e2fsprogs fio nbd-client; do dpkg-query -W -f='${Status}' $p 2>/dev/null | grep -q 'ok installed' || need+=($p); done
	if ((${#need[@]})); then
		log "apt-get install ${need[*]}"
		apt-get update -qq
		apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
	fi
fi
if [ "$SRC" != "$BLOCKD" ]; then
	install -D -m 0755 "$SRC" "$BLOCKD"
fi
"$BLOCKD" --help >/dev/null
mkdir -p "$STATE"
log "blockd installed at $BLOCKD"
