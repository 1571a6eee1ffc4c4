#!/usr/bin/env bash
# Runs every fuzz target in the repository for the given time (default 30s).
# A target fails on a finding (a failing input is written to its testdata).
# Go's fuzzing engine sometimes reports "context deadline exceeded" when its
# time runs out while a worker is still busy with an input; such a run, with
# no finding, is retried once.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${1:-30s}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for f in $(grep -rl --include='*_test.go' '^func Fuzz' . | sort); do
	pkg=./$(dirname "${f#./}")
	for fn in $(grep -o '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //'); do
		echo "fuzz $pkg $fn ($fuzztime)"
		for attempt in 1 2; do
			if go test -run='^$' -fuzz="^$fn\$" -fuzztime="$fuzztime" "$pkg" >"$log" 2>&1; then
				tail -n 2 "$log"
				break
			fi
			cat "$log"
			if grep -q -e 'Failing input written' -e 'panic:' "$log" ||
				! grep -q 'context deadline exceeded' "$log" || [ "$attempt" = 2 ]; then
				exit 1
			fi
			echo "fuzz: $fn: the engine's time ran out mid-input without a finding; retrying once"
		done
	done
done
