#!/usr/bin/env bash
# The group core's seeded simulation over many seeds, in release mode
# (cluster-glue/tests/simulation.rs): prints what it counted, or the first
# failing seed with the line that replays it.
#   benches/simulate.sh [seeds, default 100000] [first seed, default 1]
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${1:-100000}
first=${2:-1}
start=$(date +%s)
SIM_SEEDS=$seeds SIM_FIRST=$first cargo test --release -p crossmirror-cluster-glue --test simulation \
  -- many_seeds --exact --nocapture
echo "simulate: $seeds seeds from $first in $(( $(date +%s) - start )) s"
