#!/usr/bin/env bash
# Installs what the demo and the tests need, if it is missing, from
# Debian's packages (the list below). Needs root, like them.
set -euo pipefail
need=()
# iptables ships the xtables NFQUEUE module nft needs to print the compat
# queue rule as `queue num N`; haproxy is the bench's comparison; keepalived
# moves the VIP between two FEs ([fe] vip = keepalived, etc/keepalived.conf);
# openssl makes the TLS tests' certificates; systemd-analyze checks the unit;
# promtool (prometheus) checks /metrics; hping3 floods SYNs at the FE with
# [fe] accept = be (tests/accept_test.go).
for pair in nft:nftables keepalived:keepalived hping3:hping3 openssl:openssl systemd-analyze:systemd ip:iproute2 nginx:nginx-light curl:curl wrk:wrk tcpdump:tcpdump iptables:iptables haproxy:haproxy man:man-db make:make promtool:prometheus; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
# nginx's stream module (ssl_preread) is the HTTPS bench's nginx
# passthrough; Debian builds it as a module of its own.
[[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || need+=(libnginx-mod-stream)
# Go: any Go from 1.21 on builds tcpha, fetching go.mod's toolchain through
# the module proxy (GOTOOLCHAIN=auto, which the Makefile sets). Debian 12's
# own Go is 1.19; bookworm-backports has golang-1.23.
go_minor() { go env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p'; }
need_go=
minor=$(go_minor || true)
if ! command -v go >/dev/null 2>&1 || ((${minor:-0} < 21)); then
	need_go=golang-1.23-go
fi
if ((${#need[@]} == 0)) && [[ -z $need_go ]]; then
	exit 0
fi
if [[ $(id -u) != 0 ]]; then
	echo "missing packages: ${need[*]} (run as root to install them)" >&2
	exit 1
fi
((${#need[@]} == 0)) || echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packaged nginx service from starting: the tests run
# their own nginx inside namespaces.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod +x /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
if ((${#need[@]} > 0)); then
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [[ -n $need_go ]]; then
	echo "installing: $need_go from bookworm-backports (it fetches the Go toolchain go.mod names)"
	echo 'deb http://deb.debian.org/debian bookworm-backports main' >/etc/apt/sources.list.d/tcpha-backports.list
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends -t bookworm-backports "$need_go" >/dev/null
	ln -sf /usr/lib/go-1.23/bin/go /usr/local/bin/go
	GOTOOLCHAIN=auto go version
fi
