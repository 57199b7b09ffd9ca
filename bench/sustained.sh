#!/usr/bin/env bash
# Sustained random writes at disk speed: `blockd serve` under fio's nbd
# engine for DURATION (default 10 minutes), 4k random writes at QD32 over
# the whole export, so the WAL fills, wraps and is drained by the flusher
# many times over. It fails when any write took 1 s or more, or when fio
# saw an error; it prints the write latency percentiles, the IOPS of every
# minute, and the server's peak RSS.
#
#   bash bench/sustained.sh                 (or: make sustained)
#   DURATION=60 bash bench/sustained.sh     a short look
#
# Environment: DURATION (s, 600), SIZE (export bytes, 4GiB: larger than
# the WAL, so writes cannot stay in it), BS (4k), IODEPTH (32), MAX_LAT_MS
# (1000), BLOCKD_BIN (a prebuilt blockd), BENCH_DIR
# (/var/tmp/blockd-sustained).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-600}
SIZE=${SIZE:-$((4 << 30))}
BS=${BS:-4k}
IODEPTH=${IODEPTH:-32}
MAX_LAT_MS=${MAX_LAT_MS:-1000}
BENCH_DIR=${BENCH_DIR:-/var/tmp/blockd-sustained}
PORT=10970

for t in fio nbdinfo python3; do
  command -v "$t" >/dev/null || { echo "sustained: $t missing (run scripts/install-deps.sh)" >&2; exit 1; }
done
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/bin"
if [ -n "${BLOCKD_BIN:-}" ]; then
  cp "$BLOCKD_BIN" "$BENCH_DIR/bin/blockd"
else
  go build -o "$BENCH_DIR/bin/blockd" ./cmd/blockd
fi

"$BENCH_DIR/bin/blockd" serve --data "$BENCH_DIR/data" --nbd "127.0.0.1:$PORT" \
  --api "127.0.0.1:$((PORT + 100))" --volume "vol0:$SIZE" --log-file "$BENCH_DIR/blockd.log" >"$BENCH_DIR/serve.out" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null || true; wait $SERVE 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  nbdinfo --size "nbd://127.0.0.1:$PORT/vol0" >/dev/null 2>&1 && break
  kill -0 $SERVE 2>/dev/null || { cat "$BENCH_DIR/serve.out"; exit 1; }
  sleep 0.1
done
echo 5 >"/proc/$SERVE/clear_refs" 2>/dev/null || true

echo "sustained: 4k random writes QD$IODEPTH over $((SIZE >> 20)) MiB for ${DURATION}s (blockd serve, fio's nbd engine)"
rc=0
fio --name=sustained --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/vol0" --rw=randwrite --bs="$BS" \
  --iodepth="$IODEPTH" --size="$SIZE" --time_based --runtime="$DURATION" \
  --write_iops_log="$BENCH_DIR/iops" --log_avg_msec=60000 \
  --output-format=json --output="$BENCH_DIR/fio.json" >/dev/null || rc=$?
rss=$(awk '/^VmHWM:/{print $2}' "/proc/$SERVE/status")
kill -0 $SERVE 2>/dev/null || { echo "sustained: blockd serve died"; tail -n 40 "$BENCH_DIR/blockd.log"; exit 1; }

python3 - "$BENCH_DIR/fio.json" "$BENCH_DIR" "$MAX_LAT_MS" "$rss" "$rc" <<'EOF'
import glob, json, sys
j = json.load(open(sys.argv[1]))
d, max_ms, rss, rc = sys.argv[2], float(sys.argv[3]), sys.argv[4], int(sys.argv[5])
w = j["jobs"][0]["write"]
err = j["jobs"][0].get("error", 0)
lat = w["clat_ns"]
pct = lat.get("percentile", {})
def ms(ns): return ns / 1e6
print(f"writes: {w['total_ios']} in {j['jobs'][0]['job_runtime'] / 1000:.0f} s, {w['iops']:.0f} IOPS, {w['bw'] / 1024:.1f} MiB/s")
print("latency ms: " + ", ".join(f"p{float(k):g} {ms(v):.2f}" for k, v in pct.items()
                               if k in ("50.000000", "99.000000", "99.900000", "99.990000"))
      + f", max {ms(w['lat_ns']['max']):.1f} (submission to completion)")
per_min = []
for f in sorted(glob.glob(d + "/iops_iops*.log")):
    for line in open(f):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2:
            per_min.append(int(parts[1]))
if per_min:
    print("IOPS per minute: " + " ".join(str(v) for v in per_min))
print(f"blockd peak RSS: {int(rss) // 1024} MiB")
bad = []
if rc != 0 or err != 0:
    bad.append(f"fio exit {rc}, error {err}")
if ms(w["lat_ns"]["max"]) >= max_ms:
    bad.append(f"slowest write {ms(w['lat_ns']['max']):.0f} ms (limit {max_ms:.0f} ms)")
if bad:
    print("sustained: FAILED: " + "; ".join(bad))
    sys.exit(1)
print(f"sustained: ok, no error and no write of {max_ms:.0f} ms or more")
EOF
