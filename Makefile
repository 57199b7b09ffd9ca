# The two commands a newcomer needs are in README.md:
#   go run ./cmd/blockd serve     (run blockd)
#   make test                     (install test tools, then run every test)

GO ?= go
TEST_TIMEOUT ?= 80m
TORTURE_TIMEOUT ?= 150m
FUZZTIME ?= 10m

.PHONY: test deps unit e2e vet bench sustained fuzz fuzz-long torture build

test: deps vet
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

deps:
	bash scripts/install-deps.sh

vet:
	$(GO) vet ./...

build:
	$(GO) build -o bin/blockd ./cmd/blockd

# Only the packages' own tests, no outside tools.
unit:
	$(GO) test -count=1 ./wal/... ./vfs/... ./blockvol/... ./blockdev/...

bench: deps
	bash bench/run.sh
	bash bench/metrics-cost.sh

# 10 minutes of 4k random writes at disk speed: fails on an error or on
# any write of 1 s or more (DURATION=60 for a short look).
sustained: deps
	bash bench/sustained.sh

fuzz:
	$(GO) test ./wal -run '^$$' -fuzz FuzzDecode -fuzztime 60s
	$(GO) test ./wal -run '^$$' -fuzz FuzzScan -fuzztime 60s
	$(GO) test ./replication -run '^$$' -fuzz FuzzMsgReader -fuzztime 60s
	$(GO) test ./replication -run '^$$' -fuzz FuzzReceiverRecord -fuzztime 60s
	$(GO) test ./nbd -run '^$$' -fuzz '^FuzzServerTLSRequired$$' -fuzztime 60s
	$(GO) test ./nbd -run '^$$' -fuzz '^FuzzServerTLSSession$$' -fuzztime 60s
	$(GO) test ./image -run '^$$' -fuzz FuzzReader -fuzztime 60s

# Every fuzz target in the tree (found by grep, so new ones are included)
# for FUZZTIME each; new corpus entries are kept under testdata/fuzz.
# FUZZTIME_FuzzReader=30m gives one target its own time, FUZZ_ONLY=A,B
# runs only those, FUZZ_NICE=19 on a shared machine.
fuzz-long:
	FUZZTIME=$(FUZZTIME) GO=$(GO) bash scripts/fuzz-long.sh

# The long torture: >= 100 failovers (TORTURE_FAILOVERS), every fault kind.
# `go test ./...` runs the short one. Replay a run with TORTURE_SEED=N.
# TORTURE_NETNS=auto: the servers in network namespaces (real partitions)
# where root can make them, TCP proxies otherwise.
TORTURE_NETNS ?= auto
torture:
	TORTURE_LONG=1 TORTURE_NETNS=$(TORTURE_NETNS) $(GO) test -count=1 -v -timeout $(TORTURE_TIMEOUT) -run '^TestTortureLong$$' ./tests/torture/
