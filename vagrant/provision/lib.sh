# Shared helpers for the provisioning scripts (sourced).
#
# Every path is under $ROOT (default /), so the same scripts run on a Vagrant
# VM and, in CI, several "nodes" side by side inside one QEMU guest
# (tests/vm/nbdkern). Services are systemd units; where systemd is not PID 1
# (the CI guest) the unit's ExecStart line is run in the background instead,
# so the unit files themselves are exercised.
set -euo pipefail

ROOT=${ROOT:-}
BLOCKD=${BLOCKD:-/usr/local/bin/blockd}
UNITDIR=$ROOT/etc/systemd/system
STATE=$ROOT/var/lib/blockd
# TLS: the master node makes the certificates (blockd tls init; the CA key
# stays in its $STATE/pki) and publishes each other node's own directory
# under $PKI_SHARE (the Vagrantfile carries it from the master to the
# others); a node installs its own into $TLS_DIR.
PKI_SHARE=${PKI_SHARE:-/tmp/blockd-pki}
TLS_DIR=$ROOT/etc/blockd/tls

# tls_flags KIND: the --tls-* flags for this node's certificate (KIND server or client).
tls_flags() { echo "--tls-cert $TLS_DIR/$1-cert.pem --tls-key $TLS_DIR/$1-key.pem --tls-ca $TLS_DIR/ca-cert.pem"; }

# install_tls DIR: install this node's certificate directory (from $PKI_SHARE).
install_tls() {
	if ! wait_for 300 test -f "$1/ca-cert.pem"; then log "no certificates at $1: provision the master first"; return 1; fi
	mkdir -p "$TLS_DIR"
	cp "$1"/*.pem "$TLS_DIR"/
	chmod 0600 "$TLS_DIR"/*-key.pem
	log "TLS certificate of $(basename "$1") installed in $TLS_DIR"
}

log() { echo "provision[$(hostname 2>/dev/null || echo node)${ROOT:+:$ROOT}]: $*"; }

have_systemd() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# unit NAME DESCRIPTION EXECSTART [AFTER]: write a systemd unit.
unit() {
	local name=$1 desc=$2 exec=$3 after=${4:-network-online.target}
	mkdir -p "$UNITDIR"
	cat >"$UNITDIR/$name.service" <<UNIT
[Unit]
Description=$desc
Wants=network-online.target
After=$after

[Service]
ExecStart=$exec
Restart=on-failure
RestartSec=2
KillSignal=SIGTERM
TimeoutStopSec=60
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT
}

# start NAME: enable and start the unit (or run its ExecStart without systemd).
start() {
	local name=$1
	if have_systemd; then
		systemctl daemon-reload
		systemctl enable --now "$name.service"
		return
	fi
	local exec
	exec=$(sed -n 's/^ExecStart=//p' "$UNITDIR/$name.service")
	mkdir -p "$STATE"
	if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then
		log "$name already running (pid $(cat "$STATE/$name.pid"))"
		return
	fi
	log "no systemd: running $name: $exec"
	# shellcheck disable=SC2086
	if command -v setsid >/dev/null 2>&1; then
		setsid $exec </dev/null >>"$STATE/$name.log" 2>&1 &
	else
		$exec </dev/null >>"$STATE/$name.log" 2>&1 &
	fi
	echo $! >"$STATE/$name.pid"
}

# wait_for SECONDS CMD...: poll until CMD succeeds, at most SECONDS.
wait_for() {
	local deadline=$(( $(date +%s) + $1 )); shift
	until "$@" >/dev/null 2>&1; do
		if [ "$(date +%s)" -ge $deadline ]; then log "timed out waiting for: $*"; return 1; fi
		sleep 0.5
	done
}

# port_open HOST:PORT: something listens there.
port_open() {
	local host=${1%:*} port=${1##*:}
	if command -v nc >/dev/null 2>&1 && nc -h 2>&1 | grep -q -- ' -z'; then
		nc -z "$host" "$port"
	else
		(exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
	fi
}
