#!/usr/bin/env bash
# What the volume server's metrics cost on the write path, end to end:
# two `blockd serve` on the same disk, one with metrics and one with
# --no-server-metrics, 4k random writes at QD32 through fio's nbd engine,
# alternated round by round. Prints IOPS of each round and the ratio of
# the medians (goal: on/off >= 0.95).
set -euo pipefail
RUNTIME=${RUNTIME:-8}
ROUNDS=${ROUNDS:-3}
BLOCKD=${BLOCKD:-}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
if [ -z "$BLOCKD" ]; then
	go build -o "$dir/blockd" ./cmd/blockd
	BLOCKD=$dir/blockd
fi
start() { # start NAME NBDPORT APIPORT [FLAGS...]
	local name=$1 nbd=$2 api=$3
	shift 3
	"$BLOCKD" serve --data "$dir/$name" --nbd 127.0.0.1:$nbd --api 127.0.0.1:$api --volume vol0:1GiB "$@" >"$dir/$name.out" 2>&1 &
	for _ in $(seq 1 100); do
		nbdinfo "nbd://127.0.0.1:$nbd/vol0" >/dev/null 2>&1 && return 0
		sleep 0.2
	done
	echo "serve $name did not start:" >&2
	cat "$dir/$name.out" >&2
	exit 1
}
start on 10931 9931
start off 10932 9932 --no-server-metrics
curl -sf http://127.0.0.1:9931/metrics | grep -q '^blockd_volume_requests_total' || { echo "metrics missing on the metered serve" >&2; exit 1; }
if curl -sf http://127.0.0.1:9932/metrics | grep -q '^blockd_volume_requests_total'; then
	echo "the unmetered serve still meters I/O" >&2
	exit 1
fi
run() { # run NBDPORT -> IOPS
	fio --name=w --ioengine=nbd --uri="nbd://127.0.0.1:$1/vol0" --rw=randwrite --bs=4k --iodepth=32 \
		--size=256m --time_based --runtime="$RUNTIME" --output-format=json --output="$dir/fio.json" >/dev/null
	python3 -c 'import json,sys; print(int(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$dir/fio.json"
}
on=() off=()
for r in $(seq 1 "$ROUNDS"); do
	if [ $((r % 2)) = 1 ]; then
		a=$(run 10931) b=$(run 10932)
	else
		b=$(run 10932) a=$(run 10931)
	fi
	on+=("$a") off+=("$b")
	echo "round $r: metrics on $a IOPS, off $b IOPS"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
mon=$(median "${on[@]}") moff=$(median "${off[@]}")
echo "4k randwrite QD32 (fio nbd engine), median of $ROUNDS rounds of ${RUNTIME}s: metrics on $mon IOPS, off $moff IOPS, on/off $(python3 -c "print(round($mon/$moff,3))")"
