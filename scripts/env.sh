# Sourced by scripts/main.sh and scripts/test.sh: everything a fresh machine needs, done once.
#   - a virtual environment in .venv (DMI_EXT_VENV overrides), with torch: the CPU wheel 2.13.0
#     unless that environment already has a torch (then it is kept: CPU or CUDA);
#   - requirements-dev.txt;
#   - the extension, built with `pip install --no-build-isolation -e .` whenever csrc/ or
#     setup.py changed since the last build (a stamp in the venv).
set -euo pipefail
DMI_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DMI_VENV=${DMI_EXT_VENV:-$DMI_ROOT/.venv}
cd "$DMI_ROOT"

if [ ! -x "$DMI_VENV/bin/python" ]; then
  echo "[env] creating $DMI_VENV" >&2
  "${PYTHON:-python3}" -m venv "$DMI_VENV"
fi
# shellcheck disable=SC1091
. "$DMI_VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# This machine's pip config lists local package folders, some empty; pip warns about each.
pip_quiet() { python -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if ! python -c "import torch" 2>/dev/null; then
  echo "[env] installing torch==2.13.0 (CPU)" >&2
  pip_quiet "torch==2.13.0"
fi
req_stamp="$DMI_VENV/.dmi_ext_requirements"
req_hash=$(sha1sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$req_stamp" 2>/dev/null)" != "$req_hash" ]; then
  echo "[env] installing requirements-dev.txt" >&2
  pip_quiet -r requirements-dev.txt
  echo "$req_hash" > "$req_stamp"
fi
build_stamp="$DMI_VENV/.dmi_ext_build"
build_hash=$( (find csrc -type f | sort | xargs sha1sum; sha1sum setup.py pyproject.toml) | sha1sum | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$build_hash" ] || ! python -c "import dmi_ext" 2>/dev/null; then
  echo "[env] building the extension (pip install --no-build-isolation -e .)" >&2
  pip_quiet --no-build-isolation --no-deps -e .
  echo "$build_hash" > "$build_stamp"
fi
