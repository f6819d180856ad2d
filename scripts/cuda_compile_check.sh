#!/usr/bin/env bash
# CI step: compiles the CUDA kernels (csrc/cuda/*.cu) for sm_90 against the CUDA build of torch,
# on a machine that has nvcc but no GPU, so a .cu that does not compile fails CI. Without nvcc it
# says so and exits 0.
#
# The CUDA torch (torch==2.14.1, CUDA 13.0) lives in its own virtual environment, .venv-cuda
# (DMI_EXT_CUDA_VENV overrides), created on first use; the wheel set's nvidia/cu13/include supplies
# the cuBLAS/cuSOLVER headers that torch's CUDA headers include. The build goes to
# build/cuda-check/ and never touches the CPU extension built in place (dmi_ext/_C*.so).
# Afterwards it checks that the library holds sm_90 code and, loaded into the CUDA torch, registers
# a CUDA kernel for each of the four ops.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v nvcc >/dev/null 2>&1; then
  echo "[cuda-check] nvcc not found: skipping the CUDA compile check"
  exit 0
fi
if [ -z "${CUDA_HOME:-}" ]; then
  for dir in /usr/local/cuda-13.0 /usr/local/cuda; do
    if [ -x "$dir/bin/nvcc" ]; then CUDA_HOME=$dir; break; fi
  done
fi
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
export CUDA_HOME

venv=${DMI_EXT_CUDA_VENV:-$root/.venv-cuda}
torch_version=2.14.1
if [ ! -x "$venv/bin/python" ]; then
  echo "[cuda-check] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
export PATH="$venv/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$torch_version' or torch.version.cuda is None)" 2>/dev/null; then
  echo "[cuda-check] installing torch==$torch_version (CUDA) into $venv"
  python -m pip install -q "torch==$torch_version" numpy ninja setuptools wheel pybind11
fi
include=$(python -c "import os, torch; p = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'); print(p if os.path.isdir(p) else '')")
if [ -n "$include" ]; then export DMI_EXT_CUDA_INCLUDE=$include; fi

out=$root/build/cuda-check
echo "[cuda-check] nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), CUDA_HOME=$CUDA_HOME, torch $(python -c 'import torch; print(torch.__version__)'), sm_90"
mkdir -p "$out"
# ptxas -v reports registers, stack frame and spill bytes per kernel for every unit it compiles;
# the report is kept per kernel in $out/ptxas.json, so a unit not recompiled keeps its numbers.
NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -Xptxas=-v" DMI_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=${MAX_JOBS:-2} python setup.py -q build_ext --build-temp "$out/temp" --build-lib "$out/lib" \
  > "$out/build.log" 2>&1 || { cat "$out/build.log" >&2; echo "[cuda-check] FAILED: the build" >&2; exit 1; }
grep -v "^ptxas info\|bytes stack frame\|^$" "$out/build.log" | grep -i "error\|warning" | head -n 20 || true
library=$(ls "$out"/lib/dmi_ext/_C*.so)
# cuobjdump: the toolkit's, else the copy in the triton wheel that torch depends on.
cuobjdump=$(command -v cuobjdump || true)
for candidate in "$CUDA_HOME/bin/cuobjdump" "$(python -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"; do
  if [ -z "$cuobjdump" ] && [ -x "$candidate" ]; then cuobjdump=$candidate; fi
done
if [ -n "$cuobjdump" ]; then
  elves=$("$cuobjdump" --list-elf "$library")
  for unit in joint_cuda dmi_cuda lu_cuda backward_cuda; do
    if ! grep -q "$unit.sm_90.cubin" <<<"$elves"; then
      echo "[cuda-check] FAILED: no sm_90 code for $unit.cu in $library" >&2
      exit 1
    fi
  done
  # Registers, shared memory, stack and spill bytes per kernel, for the record (a small spill is
  # a number to watch, not a failure).
  "$cuobjdump" --dump-resource-usage "$library" > "$out/resource_usage.txt"
  python - "$out" <<'PY'
import json, os, re, subprocess, sys

out = sys.argv[1]
record = os.path.join(out, "ptxas.json")
spills = json.load(open(record)) if os.path.exists(record) else {}
name = None
for line in open(os.path.join(out, "build.log")):
    m = re.search(r"Function properties for (\S+)", line)
    if m:
        name = m.group(1)
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        spills[name] = [int(g) for g in m.groups()]
        name = None
json.dump(spills, open(record, "w"), indent=0, sort_keys=True)
usage = open(os.path.join(out, "resource_usage.txt")).read()
rows = re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                       text=True).stdout.splitlines() if rows else []
print(f"[cuda-check] {len(rows)} kernels (sm_90): registers, static shared memory, stack, spill stores/loads (bytes)")
spilling = 0
for (mangled, reg, stack, shared, local), pretty in sorted(zip(rows, names), key=lambda r: r[1]):
    s = spills.get(mangled)
    spill = f"{s[1]}/{s[2]}" if s else "?"
    spilling += bool(s and (s[1] or s[2]))
    pretty = re.sub(r"\bdmi_ext::cuda::(\(anonymous namespace\)::)?", "", pretty)
    print(f"[cuda-check]   REG {reg:>3}  SHARED {shared:>5}  STACK {stack:>4}  SPILL {spill:>9}  {pretty[:120]}")
print(f"[cuda-check] kernels that spill: {spilling} of {len(rows)}")
PY
else
  echo "[cuda-check] no cuobjdump: the sm_90 check of the library is skipped"
fi
python - "$library" <<'PY'
import sys

import torch

torch.ops.load_library(sys.argv[1])
missing = [op for op in ("joint", "lu_loss", "dmi", "dmi_backward")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dmi_ext::{op}", "CUDA")]
if missing:
    sys.exit(f"[cuda-check] FAILED: no CUDA kernel registered for {missing}")
print("[cuda-check] OK: csrc/cuda/*.cu compiled for sm_90; CUDA kernels registered for "
      "joint, lu_loss, dmi, dmi_backward")
PY
