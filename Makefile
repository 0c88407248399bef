# tcpha: TCP handoff load balancing. `make demo` shows it, `make test` proves it.
GO      ?= go
BIN     := bin
PREFIX  ?= /usr/local
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: all build demo test unit bench fuzz check deps install uninstall clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

deps:
	@bash scripts/deps.sh

# The built-in demo: a namespace cluster (client, FE, two BEs with nginx).
demo: deps build
	$(BIN)/tcpha-demo -agent $(BIN)/tcpha-agent

# Unit tests and the namespace integration tests (these need root).
test: deps check
	$(GO) test -race -count=1 -timeout 14m ./...

# Every fuzz target for FUZZTIME each (default 30s; e.g. FUZZTIME=10m, or
# FUZZTIME=10000000x for a number of executions).
fuzz:
	@bash scripts/fuzz.sh

# Unit tests only: no root, no namespaces.
unit:
	$(GO) test -race -count=1 -short ./agent/... ./backends/... ./handoff/... ./phttp/...

check:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

# tcpha beside HAProxy and nginx on one namespace cluster: rewrites
# docs/benchmarks.md and docs/benchmarks.png (about ten minutes). The
# micro-benchmarks of the pure packages come first.
bench: deps build
	$(GO) test -run '^$$' -bench . -benchmem ./handoff/... ./phttp/... ./backends/...
	$(BIN)/tcpha-bench -agent $(BIN)/tcpha-agent -out docs/benchmarks.md -chart docs/benchmarks.png

install: build
	install -D -m 0755 $(BIN)/tcpha-agent $(DESTDIR)$(PREFIX)/sbin/tcpha-agent
	install -D -m 0755 $(BIN)/tcphactl $(DESTDIR)$(PREFIX)/bin/tcphactl
	install -D -m 0644 systemd/tcpha-agent.service $(DESTDIR)/etc/systemd/system/tcpha-agent.service
	test -e $(DESTDIR)/etc/tcpha/tcpha.conf || install -D -m 0644 etc/tcpha.conf $(DESTDIR)/etc/tcpha/tcpha.conf

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/sbin/tcpha-agent $(DESTDIR)$(PREFIX)/bin/tcphactl $(DESTDIR)/etc/systemd/system/tcpha-agent.service

clean:
	rm -rf $(BIN)
