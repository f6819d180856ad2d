#!/usr/bin/env bash
# The GPU acceptance run of issue 3, for a machine with a CUDA GPU, nvcc, compute-sanitizer and a
# CUDA torch (the lent H100/H200: torch 2.11 + CUDA 13.0, Python 3.12, no internet). In one call:
#   build     pip install --no-build-isolation -e .   (CPU + CUDA kernels, for the GPU present)
#   test      the pytest suite, CUDA cases included (tests/test_cuda.py and every device-
#             parametrized test)
#   sanitize  compute-sanitizer memcheck and racecheck over benchmarks/cuda_sanitize.py
#   bench     benchmarks/cuda_bench.py (SPEC §8 targets, CUDA events, JSON)
# Stages can be named to run a subset (e.g. `scripts/gpu_suite.sh test sanitize`); default all.
# Logs go to $OUT (the device tool's output folder), else benchmarks/results/: gpu_suite.log
# (device name, torch version, each stage's status), pytest.log, memcheck.log, racecheck.log,
# cuda_bench.log and cuda_bench.json. Exits non-zero if any stage failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/benchmarks/results}
mkdir -p "$out"
log=$out/gpu_suite.log
stages=${*:-build test sanitize bench}
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
status=0

say() { echo "$*" | tee -a "$log"; }
run_stage() {  # name, logfile, command...
  local name=$1 file=$2
  shift 2
  local t0=$SECONDS
  "$@" > "$file" 2>&1
  local rc=$?
  say "[gpu-suite] $name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - t0)) s; log $(basename "$file")"
  tail -n 5 "$file" | sed 's/^/    /' | tee -a "$log"
  [ $rc -eq 0 ] || status=1
}

: > "$log"
say "[gpu-suite] $(date -u +%FT%TZ) stages: $stages"
say "[gpu-suite] git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[gpu-suite] gpu: /' | tee -a "$log"
"$python" -c "import torch, sys; print('[gpu-suite] python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee -a "$log"
nvcc --version 2>&1 | tail -n 2 | sed 's/^/[gpu-suite] /' | tee -a "$log"

# torch's CUDA headers include cuBLAS/cuSOLVER headers; when the toolkit lacks them, take them
# from the CUDA wheels next to torch (as scripts/cuda_compile_check.sh does).
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
if [ -z "${DMI_EXT_CUDA_INCLUDE:-}" ] && [ ! -f "$cuda_home/include/cublas_v2.h" ]; then
  wheel_include=$("$python" -c "import os, torch; p = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'); print(p if os.path.isdir(p) else '')")
  if [ -n "$wheel_include" ]; then export DMI_EXT_CUDA_INCLUDE=$wheel_include; fi
fi

for stage in $stages; do
  case $stage in
    build)
      run_stage build "$out/build.log" env MAX_JOBS="$(nproc)" "$python" -m pip install -v --no-build-isolation --no-deps -e .
      "$python" -c "import dmi_ext; assert dmi_ext.WITH_CUDA, 'built without CUDA'; print('[gpu-suite] dmi_ext with CUDA kernels')" 2>&1 | tee -a "$log" || status=1
      ;;
    test)
      run_stage test "$out/pytest.log" "$python" -m pytest -q -p no:cacheprovider tests
      ;;
    sanitize)
      run_stage memcheck "$out/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 1 \
        "$python" benchmarks/cuda_sanitize.py
      run_stage racecheck "$out/racecheck.log" compute-sanitizer --tool racecheck --error-exitcode 1 \
        "$python" benchmarks/cuda_sanitize.py --quick
      ;;
    bench)
      run_stage bench "$out/cuda_bench.log" "$python" benchmarks/cuda_bench.py --json "$out/cuda_bench.json"
      sed -n '/^$/,$p' "$out/cuda_bench.log" | tee -a "$log"
      ;;
    *)
      say "[gpu-suite] unknown stage '$stage' (build, test, sanitize, bench)"
      status=1
      ;;
  esac
done
say "[gpu-suite] $([ $status -eq 0 ] && echo 'ALL PASS' || echo 'SOME STAGE FAILED')"
exit $status
