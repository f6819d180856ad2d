#!/usr/bin/env bash
# Quick-start command 2: sets up (scripts/env.sh) and runs the test suite. Extra arguments go to
# pytest. Exits non-zero if any test fails (and if none ran).
set -euo pipefail
. "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
