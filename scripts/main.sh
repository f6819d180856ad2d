#!/usr/bin/env bash
# Quick-start command 1: sets up (scripts/env.sh) and runs the toolkit's quick reproduction of
# the paper on scikit-learn's digits (pair flips and binary case (3), 5 methods, 5 seeds; a few
# minutes on two CPU cores). Prints the table; writes runs/reproduce-quick/results.{json,md} and
# accuracy.png. Extra arguments go to `python -m dmi_ext reproduce --quick`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m dmi_ext reproduce --quick "$@"
