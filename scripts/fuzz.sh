#!/usr/bin/env bash
# Runs every fuzz target for FUZZTIME (a Go duration, or N x for a number
# of executions), one after the other, and prints each one's executions.
# The corpus each run grows stays in Go's cache; a crasher is written to
# the package's testdata/fuzz and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
time=${FUZZTIME:-30s}
targets=(
	"./handoff/wire FuzzFrame"
	"./handoff/wire FuzzHeld"
	"./handoff/wire FuzzSync"
	"./handoff/ctl FuzzHandshake"
	"./fe FuzzParseMigration"
	"./phttp FuzzRead"
	"./phttp FuzzRoutePath"
	"./phttp FuzzParseRequest"
	"./phttp FuzzParseResponse"
	"./phttp FuzzChunks"
	"./frontend/tlshello FuzzRead"
	"./config FuzzParse"
	"./queue FuzzParse"
	"./queue FuzzStream"
	"./internal/accesslog FuzzAppendLine"
)
for t in "${targets[@]}"; do
	set -- $t
	out=$(go test -run '^$' -fuzz "^$2\$" -fuzztime "$time" "$1" 2>&1) || { echo "$out"; echo "FAIL: $1 $2"; exit 1; }
	execs=$(grep -o 'execs: [0-9]*' <<<"$out" | tail -1)
	printf '%-20s %-18s %s\n' "$1" "$2" "$execs"
done
