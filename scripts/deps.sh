#!/usr/bin/env bash
# Installs what the demo and the tests need, if it is missing, from
# Debian's packages (the list below). Needs root, like them.
set -euo pipefail
need=()
# iptables ships the xtables NFQUEUE module nft needs to print the compat
# queue rule as `queue num N`; haproxy is the bench's comparison.
for pair in nft:nftables ip:iproute2 nginx:nginx-light curl:curl wrk:wrk tcpdump:tcpdump iptables:iptables haproxy:haproxy; do
	cmd=${pair%%:*} pkg=${pair#*:}
	command -v "$cmd" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]} == 0)); then
	exit 0
fi
if [[ $(id -u) != 0 ]]; then
	echo "missing packages: ${need[*]} (run as root to install them)" >&2
	exit 1
fi
echo "installing: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the packaged nginx service from starting: the tests run
# their own nginx inside namespaces.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
	printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
	chmod +x /usr/sbin/policy-rc.d
	trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
