#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 120) each, one after the other, and prints
# the executions each made. Nightly and cargo-fuzz: `cargo install cargo-fuzz`. Not run by CI;
# start it in the background: `bash fuzz/run.sh > fuzz.log 2>&1 &`. A finding is written to
# fuzz/artifacts/<target>/ and becomes a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-120}
for target in event_types webhook_verify retry_after destination_guard payload; do
  echo "::: ${target}"
  cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" 2>&1 |
    grep -E "^#[0-9]+\s+DONE|Done [0-9]+ runs|ERROR|panicked|SUMMARY" || true
done
