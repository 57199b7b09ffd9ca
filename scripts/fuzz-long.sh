#!/usr/bin/env bash
# Runs every fuzz target of the module for FUZZTIME each (default 10m),
# one after the other, keeps the new corpus entries in each package's
# testdata/fuzz/NAME, and prints each target's execution count. Exits
# non-zero if any target failed (a crasher is saved by go test under
# testdata/fuzz/NAME as usual).
#
#   FUZZTIME=30s bash scripts/fuzz-long.sh        # a quick pass
#   FUZZ_ONLY=FuzzMasterAPI,FuzzReader bash scripts/fuzz-long.sh
#   FUZZTIME=2m FUZZTIME_FuzzReader=10m bash scripts/fuzz-long.sh   # one target longer
#   FUZZ_NICE=19 ...                           # on a shared machine
set -u
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-10m}
KEEP_CORPUS=${KEEP_CORPUS:-1}
cache="$($GO env GOCACHE)/fuzz"
module=$($GO list -m)
summary=()
failed=0
# Every "func FuzzX(" in a _test.go file, as "dir name".
targets=$(grep -rn --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(' . |
	sed -E 's#^\./(.*)/[^/]*_test\.go:[0-9]+:func (Fuzz[A-Za-z0-9_]*)\(.*#\1 \2#' | sort -u)
if [ -z "$targets" ]; then
	echo "no fuzz targets found" >&2
	exit 1
fi
while read -r dir name; do
	if [ -n "${FUZZ_ONLY:-}" ] && [[ ",$FUZZ_ONLY," != *",$name,"* ]]; then
		continue
	fi
	pkg="$module/$dir"
	ovr="FUZZTIME_$name"
	ft=${!ovr:-$FUZZTIME}
	echo "==== $pkg $name for $ft"
	log=$(mktemp)
	began=$(date +%s)
	nice -n "${FUZZ_NICE:-0}" $GO test "./$dir" -run '^$' -fuzz "^${name}\$" -fuzztime "$ft" 2>&1 | tee "$log"
	rc=${PIPESTATUS[0]}
	took=$(($(date +%s) - began))
	execs=$(grep -oE 'execs: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+')
	if [ "$rc" -ne 0 ]; then
		failed=1
		summary+=("$name ($dir): FAILED after ${execs:-?} execs in ${took}s (see testdata/fuzz/$name)")
	else
		summary+=("$name ($dir): ok, ${execs:-?} execs in ${took}s (fuzztime $ft), 0 panics")
	fi
	if [ "$KEEP_CORPUS" = 1 ] && [ -d "$cache/$pkg/$name" ]; then
		mkdir -p "$dir/testdata/fuzz/$name"
		n=0
		for f in "$cache/$pkg/$name"/*; do
			b=$(basename "$f")
			if [ ! -e "$dir/testdata/fuzz/$name/$b" ]; then
				cp "$f" "$dir/testdata/fuzz/$name/$b"
				n=$((n + 1))
			fi
		done
		summary[${#summary[@]}-1]+=", $n new corpus entries kept in $dir/testdata/fuzz/$name"
	fi
	rm -f "$log"
done <<<"$targets"
echo "==== fuzz-long summary (FUZZTIME=$FUZZTIME)"
printf '%s\n' "${summary[@]}"
exit $failed
