# The two commands a newcomer needs are in README.md:
#   go run ./cmd/blockd serve     (run blockd)
#   make test                     (install test tools, then run every test)

GO ?= go
TEST_TIMEOUT ?= 80m

.PHONY: test deps unit e2e vet bench fuzz build

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

fuzz:
	$(GO) test ./wal -run '^$$' -fuzz FuzzDecode -fuzztime 60s
	$(GO) test ./wal -run '^$$' -fuzz FuzzScan -fuzztime 60s
	$(GO) test ./replication -run '^$$' -fuzz FuzzMsgReader -fuzztime 60s
	$(GO) test ./replication -run '^$$' -fuzz FuzzReceiverRecord -fuzztime 60s
	$(GO) test ./nbd -run '^$$' -fuzz '^FuzzServerTLSRequired$$' -fuzztime 60s
	$(GO) test ./nbd -run '^$$' -fuzz '^FuzzServerTLSSession$$' -fuzztime 60s
