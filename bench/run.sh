#!/usr/bin/env bash
# NBD benchmark: fio's nbd engine against blockd, and against the NBD
# servers people use today, on the same machine, in one run, alternating.
#
#   bash bench/run.sh            (or: make bench)
#
# Servers (each on its own port, own data under $BENCH_DIR, same filesystem):
#   blockd    `blockd serve` (the engine: WAL, group commit, flusher)
#   nbdfile   blockd's nbd package over a plain file (bench/nbdfile): the
#             protocol layer alone, same backing as nbdkit file
#   nbdkit    `nbdkit file`
#   qemu-nbd  `qemu-nbd -f raw -t`
# and, for write+flush QD1, a raw local file (fio psync, fdatasync=1).
#
# Workloads: 4k randwrite QD32, 4k randread QD32, 1M seq write QD8,
# 4k write+flush QD1, 4k write+flush 8 jobs (QD1 each), and a database's
# pattern: 4k random 70% read / 30% write at QD32 with a flush every 32
# writes.
# For every run the server's CPU time (utime+stime from /proc/PID/stat) is
# divided by the I/Os done: µs of server CPU per I/O. The CPU is counted
# until the server is idle again after fio ends (at most SETTLE_MAX s), so
# work a server defers (blockd's flusher copying the WAL to the extent) is
# charged to the workload that caused it. The server's peak RSS (VmHWM,
# reset before each run) is recorded too; the 4k randwrite one is printed.
#
# With NULL=1 (default) it also compares the protocol layers alone: blockd's
# nbd package over a null device (bench/nbdfile -null) against `nbdkit null`,
# 4k randwrite/randread QD32, CPU per I/O.
#
# With TLS=1 (default) it also measures NBD over TLS with fio's nbd engine:
# 4k randwrite QD32 and 1M seq write QD8 against blockd plain, blockd with
# TLS (`blockd tls init` certificates), `nbdkit file` plain and `nbdkit
# --tls=require --tls-verify-peer` with the same certificates, alternating
# in the same run, with the same CPU/IO accounting (nbdkit's own TLS/plain
# ratio shows what TLS costs the client, fio and gnutls, on this machine). fio's URI cannot carry
# tls-certificates (libnbd refuses local file access in URIs unless the
# program allows it, and fio does not), so the client certificate goes
# where libnbd looks by default: $HOME/.pki/libnbd, with HOME set for fio
# only; as root libnbd looks only in /etc/pki/libnbd, so fio then runs
# under `unshare --user` (a user namespace, where it is not uid 0).
#
# Environment: RUNTIME (s per run, default 10), ROUNDS (default 2), REGION
# (bytes of the export touched, default 256MiB), SIZE (export size in
# bytes, default 1GiB; the memory goal is stated for 10GiB), SETTLE_MAX (s,
# default 30), WORKLOADS (default: all), BLOCKD_BIN (a prebuilt blockd to
# use instead of building ./cmd/blockd), BLOCKD_BASE_BIN (another blockd,
# e.g. built at the commit before a change: it runs as the server
# "blockd-base" beside "blockd", alternating with it in the same run, and
# the tables end with blockd / blockd-base for every workload; the pair is
# what a before/after comparison on a noisy machine needs), BENCH_DIR
# (default /var/tmp/blockd-bench), BENCH_PORT_BASE (default 10950: the
# servers listen on it and the 10 ports above it, their APIs 100 higher;
# two runs at once need bases 20 apart), SERVERS (default "blockd nbdfile nbdkit
# qemu-nbd", plus blockd-base with BLOCKD_BASE_BIN; "none" runs only the
# null and TLS comparisons),
# BLOCKD_FLAGS (extra `blockd serve` flags for the server "blockd" only,
# e.g. --direct-io; with BLOCKD_BASE_BIN set to the same binary the pair
# compares the flag in one run),
# PROFILE=1 writes CPU profiles of nbdfile and blockd (if it supports
# BLOCKD_CPUPROFILE) under $BENCH_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${RUNTIME:-10}
ROUNDS=${ROUNDS:-2}
REGION=${REGION:-$((256 << 20))}
SIZE=${SIZE:-$((1 << 30))}
SETTLE_MAX=${SETTLE_MAX:-30}
BENCH_DIR=${BENCH_DIR:-/var/tmp/blockd-bench}
SERVERS=${SERVERS:-"blockd nbdfile nbdkit qemu-nbd"}
PROFILE=${PROFILE:-0}
NULL=${NULL:-1}
TLS=${TLS:-1}
CLK_TCK=$(getconf CLK_TCK)
[ "$SERVERS" = none ] && SERVERS=""
if [ -n "${BLOCKD_BASE_BIN:-}" ] && [[ " $SERVERS " != *" blockd-base "* ]] && [[ " $SERVERS " == *" blockd "* ]]; then
  SERVERS=${SERVERS/blockd/blockd blockd-base}
fi
TLS_WRAP=()
if [ "$TLS" = 1 ] && [ "$(id -u)" = 0 ]; then
  command -v unshare >/dev/null || { echo "bench: unshare missing (util-linux), needed for fio over TLS as root" >&2; exit 1; }
  TLS_WRAP=(unshare --user)
fi

for t in fio nbdkit qemu-nbd nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "bench: $t missing (run scripts/install-deps.sh)" >&2; exit 1; }
done

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/bin"
go build -o "$BENCH_DIR/bin/nbdfile" ./bench/nbdfile
have_blockd=0
if [ -n "${BLOCKD_BIN:-}" ]; then
  cp "$BLOCKD_BIN" "$BENCH_DIR/bin/blockd" # a prebuilt blockd (before/after runs)
fi
if [[ " $SERVERS " == *" blockd-base "* ]]; then
  [ -n "${BLOCKD_BASE_BIN:-}" ] || { echo "bench: server blockd-base needs BLOCKD_BASE_BIN" >&2; exit 1; }
  cp "$BLOCKD_BASE_BIN" "$BENCH_DIR/bin/blockd-base"
fi
if { [ -n "${BLOCKD_BIN:-}" ] || go build -o "$BENCH_DIR/bin/blockd" ./cmd/blockd 2>/dev/null; } &&
  "$BENCH_DIR/bin/blockd" serve --help >/dev/null 2>&1; then
  have_blockd=1
else
  echo "bench: 'blockd serve' is not available yet; skipping the blockd column" >&2
  SERVERS=${SERVERS//blockd/}
fi

P0=${BENCH_PORT_BASE:-10950}
declare -A PORT=([blockd-base]=$((P0 + 10)) [blockd]=$P0 [nbdfile]=$((P0 + 1)) [nbdkit]=$((P0 + 2)) [qemu-nbd]=$((P0 + 3))
  [nbdnull]=$((P0 + 4)) [kitnull]=$((P0 + 5)) [tplain]=$((P0 + 6)) [tblockd]=$((P0 + 7)) [tkit]=$((P0 + 8)) [tkplain]=$((P0 + 9)))
declare -A PID=()
declare -A EXPORT=([blockd-base]=vol0 [blockd]=vol0 [nbdfile]=vol0 [nbdkit]="" [qemu-nbd]=vol0 [nbdnull]=vol0 [kitnull]=""
  [tplain]=vol0 [tblockd]=vol0 [tkit]="" [tkplain]="")

# fio_to SERVER ARGS...: fio's nbd engine at SERVER. The TLS servers get
# nbds:// with the client certificate "bench" in libnbd's default
# directory ($BENCH_DIR/tlshome/.pki/libnbd; see the top).
fio_to() {
  local s=$1
  shift
  case $s in
  tblockd | tkit)
    HOME=$BENCH_DIR/tlshome "${TLS_WRAP[@]}" fio --ioengine=nbd --uri="nbds://127.0.0.1:${PORT[$s]}/${EXPORT[$s]}" "$@"
    ;;
  *) fio --ioengine=nbd --uri="nbd://127.0.0.1:${PORT[$s]}/${EXPORT[$s]}" "$@" ;;
  esac
}

wait_port() { # port
  for _ in $(seq 1 300); do
    nbdinfo --size "nbds://127.0.0.1:$1/?tls-certificates=$BENCH_DIR/pki/clients/bench" >/dev/null 2>&1 && return 0
    nbdinfo --size "nbds://127.0.0.1:$1/vol0?tls-certificates=$BENCH_DIR/pki/clients/bench" >/dev/null 2>&1 && return 0
    nbdinfo --size "nbd://127.0.0.1:$1/" >/dev/null 2>&1 && return 0
    nbdinfo --size "nbd://127.0.0.1:$1/vol0" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: server on port $1 did not come up" >&2
  return 1
}

start_server() { # name
  local s=$1 d="$BENCH_DIR/$1" p=${PORT[$1]}
  mkdir -p "$d"
  case $s in
  blockd | blockd-base)
    BLOCKD_CPUPROFILE=$([ "$PROFILE" = 1 ] && echo "$d/cpu.pprof" || true) \
      "$BENCH_DIR/bin/$s" serve --data "$d/data" --nbd "127.0.0.1:$p" \
      --api "127.0.0.1:$((p + 100))" --volume "vol0:$SIZE" \
      $([ "$s" = blockd ] && echo "${BLOCKD_FLAGS:-}") >"$d/log" 2>&1 &
    ;;
  nbdfile)
    "$BENCH_DIR/bin/nbdfile" -file "$d/disk.img" -size "$SIZE" -listen "127.0.0.1:$p" \
      $([ "$PROFILE" = 1 ] && echo "-cpuprofile $d/cpu.pprof") >"$d/log" 2>&1 &
    ;;
  nbdkit)
    truncate -s "$SIZE" "$d/disk.img"
    nbdkit -f -p "$p" -i 127.0.0.1 file "$d/disk.img" >"$d/log" 2>&1 &
    ;;
  nbdnull)
    "$BENCH_DIR/bin/nbdfile" -null -size "$SIZE" -listen "127.0.0.1:$p" >"$d/log" 2>&1 &
    ;;
  kitnull)
    nbdkit -f -p "$p" -i 127.0.0.1 null "$SIZE" >"$d/log" 2>&1 &
    ;;
  tplain)
    "$BENCH_DIR/bin/blockd" serve --data "$d/data" --nbd "127.0.0.1:$p" \
      --api "127.0.0.1:$((p + 100))" --volume "vol0:$SIZE" >"$d/log" 2>&1 &
    ;;
  tblockd)
    local c="$BENCH_DIR/pki/servers/local"
    "$BENCH_DIR/bin/blockd" serve --data "$d/data" --nbd "127.0.0.1:$p" \
      --api "127.0.0.1:$((p + 100))" --volume "vol0:$SIZE" \
      --tls-cert "$c/server-cert.pem" --tls-key "$c/server-key.pem" --tls-ca "$c/ca-cert.pem" >"$d/log" 2>&1 &
    ;;
  tkplain)
    truncate -s "$SIZE" "$d/disk.img"
    nbdkit -f -p "$p" -i 127.0.0.1 file "$d/disk.img" >"$d/log" 2>&1 &
    ;;
  tkit)
    truncate -s "$SIZE" "$d/disk.img"
    nbdkit -f -p "$p" -i 127.0.0.1 --tls=require --tls-certificates="$BENCH_DIR/pki/servers/local" \
      --tls-verify-peer file "$d/disk.img" >"$d/log" 2>&1 &
    ;;
  qemu-nbd)
    truncate -s "$SIZE" "$d/disk.img"
    qemu-nbd -f raw -t -b 127.0.0.1 -p "$p" -x vol0 -e 32 "$d/disk.img" >"$d/log" 2>&1 &
    ;;
  esac
  PID[$s]=$!
  wait_port "$p"
}

stop_servers() {
  for s in "${!PID[@]}"; do kill -TERM "${PID[$s]}" 2>/dev/null || true; done
  for s in "${!PID[@]}"; do wait "${PID[$s]}" 2>/dev/null || true; done
}
trap stop_servers EXIT

cpu_ticks() { # pid -> utime+stime (ticks)
  awk '{print $14 + $15}' "/proc/$1/stat"
}

wchar() { # pid -> bytes written by write(2)/pwrite(2) so far
  awk '/^wchar:/{print $2}' "/proc/$1/io"
}

# settle PID: wait until the process uses (almost) no CPU and writes
# (almost) nothing for 0.5 s (blockd's flusher is done copying the WAL to the
# extent, whose fdatasyncs use little CPU), or SETTLE_MAX seconds.
settle() {
  local t0 t1 w0 w1 i
  t0=$(cpu_ticks "$1")
  w0=$(wchar "$1")
  for ((i = 0; i < SETTLE_MAX * 2; i++)); do
    sleep 0.5
    t1=$(cpu_ticks "$1")
    w1=$(wchar "$1")
    ((t1 - t0 <= 1 && w1 - w0 < (1 << 20))) && return 0
    t0=$t1 w0=$w1
  done
}

# run_fio NAME SERVER ARGS... -> prints "iops cpu_us_per_io peak_rss_kib"
run_fio() {
  local wl=$1 s=$2
  shift 2
  local out="$BENCH_DIR/$s/$wl.json"
  local c0 c1 pid=${PID[$s]}
  settle "$pid"
  # Reset the peak RSS (VmHWM) so it covers this run only.
  echo 5 >"/proc/$pid/clear_refs" 2>/dev/null || true
  c0=$(cpu_ticks "$pid")
  fio_to "$s" --name="$wl" --size="$REGION" --time_based --runtime="$RUNTIME" --output-format=json --output="$out" "$@" >/dev/null
  settle "$pid"
  c1=$(cpu_ticks "$pid")
  local rss
  rss=$(awk '/^VmHWM:/{print $2}' "/proc/$pid/status")
  python3 - "$out" "$((c1 - c0))" "$CLK_TCK" "$rss" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
ios = sum(jb["read"]["total_ios"] + jb["write"]["total_ios"] for jb in j["jobs"])
iops = sum(jb["read"]["iops"] + jb["write"]["iops"] for jb in j["jobs"])
ticks, hz = int(sys.argv[2]), int(sys.argv[3])
print(f"{iops:.0f} {ticks / hz * 1e6 / max(ios, 1):.2f} {sys.argv[4]}")
EOF
}

declare -A WL_ARGS=(
  [randwrite]="--rw=randwrite --bs=4k --iodepth=32"
  [randread]="--rw=randread --bs=4k --iodepth=32"
  [seqwrite]="--rw=write --bs=1M --iodepth=8"
  [flushqd1]="--rw=randwrite --bs=4k --iodepth=1 --fsync=1"
  [flush8j]="--rw=randwrite --bs=4k --iodepth=1 --fsync=1 --numjobs=8 --group_reporting"
  [mixed]="--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --fsync=32"
)
WORKLOADS=${WORKLOADS:-"randwrite randread seqwrite flushqd1 flush8j mixed"}

# prefill SERVER: write the region once, so reads hit written data
# everywhere and no server is measured allocating its first blocks.
prefill() {
  fio_to "$1" --name=prefill --rw=write --bs=1M --iodepth=8 --size="$REGION" --output-format=terse >/dev/null
}
for s in $SERVERS; do start_server "$s"; done
for s in $SERVERS; do prefill "$s"; done

declare -A SUM_IOPS=() SUM_CPU=() MAX_RSS=() N=()
for r in $(seq 1 "$ROUNDS"); do
  for wl in $WORKLOADS; do
    # Alternate the order every round so no server always runs first.
    order=$SERVERS
    if ((r % 2 == 0)); then order=$(echo "$SERVERS" | tr ' ' '\n' | tac | tr '\n' ' '); fi
    for s in $order; do
      read -r iops cpu rss < <(run_fio "$wl" "$s" ${WL_ARGS[$wl]})
      echo "round $r $wl $s: $iops IOPS, $cpu µs CPU/IO, peak RSS $((rss / 1024)) MiB" >&2
      SUM_IOPS[$wl.$s]=$(python3 -c "print(${SUM_IOPS[$wl.$s]:-0} + $iops)")
      SUM_CPU[$wl.$s]=$(python3 -c "print(${SUM_CPU[$wl.$s]:-0} + $cpu)")
      ((rss > ${MAX_RSS[$wl.$s]:-0})) && MAX_RSS[$wl.$s]=$rss
      N[$wl.$s]=$((${N[$wl.$s]:-0} + 1))
    done
  done
  # The raw local file for the QD1 write+flush comparison.
  [ -n "$SERVERS" ] && [[ " $WORKLOADS " == *" flushqd1 "* ]] || continue
  mkdir -p "$BENCH_DIR/raw"
  fio --name=raw --ioengine=psync --filename="$BENCH_DIR/raw/file" --size="$REGION" \
    --rw=randwrite --bs=4k --fdatasync=1 --time_based --runtime="$RUNTIME" \
    --output-format=json --output="$BENCH_DIR/raw/flushqd1.json" >/dev/null
  raw=$(jq '.jobs[0].write.iops' "$BENCH_DIR/raw/flushqd1.json")
  echo "round $r flushqd1 raw-file: $raw IOPS" >&2
  SUM_IOPS[flushqd1.raw]=$(python3 -c "print(${SUM_IOPS[flushqd1.raw]:-0} + $raw)")
  N[flushqd1.raw]=$((${N[flushqd1.raw]:-0} + 1))
done

# Protocol layers alone: null devices.
declare -A NULL_IOPS=() NULL_CPU=()
if [ "$NULL" = 1 ]; then
  start_server nbdnull
  start_server kitnull
  for r in $(seq 1 "$ROUNDS"); do
    for wl in randwrite randread; do
      for s in nbdnull kitnull; do
        read -r iops cpu _ < <(run_fio "$wl" "$s" ${WL_ARGS[$wl]})
        echo "round $r $wl $s: $iops IOPS, $cpu µs CPU/IO" >&2
        NULL_IOPS[$wl.$s]=$(python3 -c "print(${NULL_IOPS[$wl.$s]:-0} + $iops / $ROUNDS)")
        NULL_CPU[$wl.$s]=$(python3 -c "print(${NULL_CPU[$wl.$s]:-0} + $cpu / $ROUNDS)")
      done
    done
  done
fi

# NBD over TLS: fio's nbd engine, same runs and accounting as above.
declare -A TLS_IOPS=() TLS_CPU=()
TLS_SERVERS="tplain tblockd tkplain tkit"
if [ "$TLS" = 1 ] && [ "$have_blockd" = 1 ]; then
  "$BENCH_DIR/bin/blockd" tls init --dir "$BENCH_DIR/pki" --server local --client bench >/dev/null
  mkdir -p "$BENCH_DIR/tlshome/.pki"
  cp -r "$BENCH_DIR/pki/clients/bench" "$BENCH_DIR/tlshome/.pki/libnbd"
  for s in $TLS_SERVERS; do start_server "$s"; done
  for s in $TLS_SERVERS; do prefill "$s"; done
  for r in $(seq 1 "$ROUNDS"); do
    for wl in randwrite seqwrite; do
      order=$TLS_SERVERS
      if ((r % 2 == 0)); then order=$(echo "$TLS_SERVERS" | tr ' ' '\n' | tac | tr '\n' ' '); fi
      for s in $order; do
        read -r iops cpu _ < <(run_fio "$wl" "$s" ${WL_ARGS[$wl]})
        echo "round $r tls $wl $s: $iops IOPS, $cpu µs CPU/IO" >&2
        TLS_IOPS[$wl.$s]=$(python3 -c "print(${TLS_IOPS[$wl.$s]:-0} + $iops / $ROUNDS)")
        TLS_CPU[$wl.$s]=$(python3 -c "print(${TLS_CPU[$wl.$s]:-0} + $cpu / $ROUNDS)")
      done
    done
  done
fi
stop_servers
trap - EXIT

if [ "$PROFILE" = 1 ]; then
  for s in blockd nbdfile; do
    [ -s "$BENCH_DIR/$s/cpu.pprof" ] && go tool pprof -top -nodecount=25 "$BENCH_DIR/bin/$s" "$BENCH_DIR/$s/cpu.pprof" \
      >"$BENCH_DIR/$s/pprof.txt" 2>/dev/null && echo "bench: profile of $s in $BENCH_DIR/$s/pprof.txt" >&2
  done
fi

# Tables: mean IOPS and mean CPU/IO per server, then every goal ratio
# against its peer in this run (bench/report.py).
: >"$BENCH_DIR/results.md"
if [ -n "$SERVERS" ]; then
  {
    for k in "${!SUM_IOPS[@]}"; do
      echo "$k ${SUM_IOPS[$k]} ${SUM_CPU[$k]:-0} ${N[$k]} ${MAX_RSS[$k]:-0}"
    done
  } | SERVERS="$SERVERS" SIZE="$SIZE" python3 bench/report.py | tee "$BENCH_DIR/results.md"
fi

if [ "$NULL" = 1 ]; then
  {
    echo
    echo "| protocol layer alone (null device) | blockd nbd IOPS | nbdkit null IOPS | blockd nbd CPU µs/IO | nbdkit null CPU µs/IO | CPU ratio |"
    echo "|---|---|---|---|---|---|"
    for wl in randwrite randread; do
      python3 -c "
b, k = ${NULL_CPU[$wl.nbdnull]}, ${NULL_CPU[$wl.kitnull]}
print('| 4k $wl QD32 | %.0f | %.0f | %.1f | %.1f | %.2fx |' % (${NULL_IOPS[$wl.nbdnull]}, ${NULL_IOPS[$wl.kitnull]}, b, k, b / k))"
    done
  } | tee -a "$BENCH_DIR/results.md"
fi

if [ "$TLS" = 1 ] && [ "$have_blockd" = 1 ]; then
  {
    echo
    echo "| NBD over TLS (fio nbd engine) | blockd plain | blockd TLS | nbdkit plain | nbdkit TLS | blockd TLS / plain | nbdkit TLS / plain | blockd TLS / nbdkit TLS | goals | CPU µs/IO blockd plain / TLS, nbdkit plain / TLS |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    for wl in randwrite seqwrite; do
      python3 -c "
p, t, kp, k = ${TLS_IOPS[$wl.tplain]}, ${TLS_IOPS[$wl.tblockd]}, ${TLS_IOPS[$wl.tkplain]}, ${TLS_IOPS[$wl.tkit]}
four = '$wl' == 'randwrite'
name = '4k randwrite QD32' if four else '1M seq write QD8'
unit = (lambda v: '%.0f IOPS' % v) if four else (lambda v: '%.0f MiB/s' % v)
r = lambda a, b: a / max(b, 1e-9)
goals = []
if four:
    goals.append('TLS/plain >= 0.7x ' + ('met' if r(t, p) >= 0.7 else 'MISSED'))
goals.append('/nbdkit TLS >= 1.0x ' + ('met' if r(t, k) >= 1.0 else 'MISSED'))
print('| %s | %s | %s | %s | %s | %.2fx | %.2fx | %.2fx | %s | %.1f / %.1f, %.1f / %.1f |' % (name, unit(p), unit(t), unit(kp), unit(k),
      r(t, p), r(k, kp), r(t, k), ', '.join(goals),
      ${TLS_CPU[$wl.tplain]}, ${TLS_CPU[$wl.tblockd]}, ${TLS_CPU[$wl.tkplain]}, ${TLS_CPU[$wl.tkit]}))"
    done
  } | tee -a "$BENCH_DIR/results.md"
fi
