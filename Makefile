# tcpha: TCP handoff load balancing. `make demo` shows it, `make test` proves it.
GO      ?= go
BIN     := bin
PREFIX  ?= /usr/local
export PATH := $(PATH):/usr/sbin:/sbin
# A Go older than go.mod's (Debian's, from backports) fetches the pinned
# toolchain through the module proxy; Debian's go.env says "local".
export GOTOOLCHAIN ?= auto

.PHONY: all build demo test unit bench bench-https fuzz check deps install uninstall clean

all: build

# The version the binaries report (-version): the git description.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X tcpha/internal/version.Version=$(VERSION)" -o $(BIN)/ ./cmd/...

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
	$(GO) test -race -count=1 -short ./admin/... ./agent/... ./backends/... ./be/... ./config/... ./fe/... ./handoff/... ./handover/... ./phttp/...

check:
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { gofmt -l .; echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

# tcpha beside HAProxy and nginx on one namespace cluster: rewrites
# docs/benchmarks.md and docs/benchmarks.png (about ten minutes). The
# micro-benchmarks of the pure packages come first.
bench: deps build
	$(GO) test -run '^$$' -bench . -benchmem ./handoff/... ./phttp/... ./frontend/... ./backends/...
	$(BIN)/tcpha-bench -agent $(BIN)/tcpha-agent -out docs/benchmarks.md -chart docs/benchmarks.png

# The HTTPS workloads (j), (k), (l) alone (about three minutes): rewrites
# the HTTPS part of docs/benchmarks.md and keeps the rest. NOTE="..." is
# said next to the figures (e.g. how busy the machine was).
bench-https: deps build
	$(BIN)/tcpha-bench -agent $(BIN)/tcpha-agent -only j,k,l -out docs/benchmarks.md -note "$(NOTE)"

MANDIR  ?= $(PREFIX)/share/man
SYSTEMD ?= /etc/systemd/system

# Binaries and man pages go under PREFIX; the unit goes to SYSTEMD
# (/etc/systemd/system, where systemd looks whatever PREFIX is) with its
# paths rewritten to PREFIX. The config holds the cluster secret: it is
# installed 0640 and, installed by root, root:root, so only root reads it
# (no group is created; chgrp gives it to a group of your own). An existing
# config is kept.
install: build
	install -D -m 0755 $(BIN)/tcpha-agent $(DESTDIR)$(PREFIX)/sbin/tcpha-agent
	install -D -m 0755 $(BIN)/tcphactl $(DESTDIR)$(PREFIX)/bin/tcphactl
	install -d $(DESTDIR)$(SYSTEMD)
	sed 's|/usr/local|$(PREFIX)|g' systemd/tcpha-agent.service > $(DESTDIR)$(SYSTEMD)/tcpha-agent.service
	chmod 0644 $(DESTDIR)$(SYSTEMD)/tcpha-agent.service
	install -D -m 0644 man/tcpha-agent.8 $(DESTDIR)$(MANDIR)/man8/tcpha-agent.8
	install -D -m 0644 man/tcphactl.8 $(DESTDIR)$(MANDIR)/man8/tcphactl.8
	install -D -m 0644 man/tcpha.conf.5 $(DESTDIR)$(MANDIR)/man5/tcpha.conf.5
	test -e $(DESTDIR)/etc/tcpha/tcpha.conf || install -D -m 0640 etc/tcpha.conf $(DESTDIR)/etc/tcpha/tcpha.conf

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/sbin/tcpha-agent $(DESTDIR)$(PREFIX)/bin/tcphactl $(DESTDIR)$(SYSTEMD)/tcpha-agent.service \
		$(DESTDIR)$(MANDIR)/man8/tcpha-agent.8 $(DESTDIR)$(MANDIR)/man8/tcphactl.8 $(DESTDIR)$(MANDIR)/man5/tcpha.conf.5

clean:
	rm -rf $(BIN)
