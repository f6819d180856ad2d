#!/usr/bin/env bash
# Quick-start command 1, the main job: sets up (scripts/env.sh), then
#   1. reproduces the paper's headline on scikit-learn's digits with label noise (the quick grid
#      of `python -m dmi_ext reproduce`: CE vs FW, GCE, LCCN and DMI), table and plot in runs/;
#   2. measures the fused op against native PyTorch on the shapes of the contract's speed rows, docs/contract.md §8 (this machine).
# Extra arguments go to `reproduce`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
out=runs
python -m dmi_ext reproduce --quick "$@"
python -m benchmarks.report --budget 1 --out "$out/speed"
echo "results: $out/reproduce-quick (table, JSON, plot) and $out/speed (speed report)"
