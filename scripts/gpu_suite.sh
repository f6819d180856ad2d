#!/usr/bin/env bash
# The GPU acceptance run of issue 25 (point 5), for a machine with a CUDA GPU, nvcc,
# compute-sanitizer and a CUDA torch (the lent H100/H200). One call, stages in this order:
#   build     pip install --no-build-isolation -e . for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0),
#             with every core
#   test      pytest with the CUDA cases: tests/test_cuda.py and every device-parametrized test
#   sanitize  compute-sanitizer memcheck, racecheck, synccheck and initcheck over
#             benchmarks/cuda_sanitize.py --quick (small shapes; every kernel, dtype, size class)
#   shapes    every launch shape of issue 25 in a fresh process, the same shapes in one process
#             in an order that would lower a shared memory attribute, lu_loss over > 65535 matrices
#             (scripts/gpu_checks.py shapes / order)
#   stress    two streams, multi-block shapes, 20 rounds bitwise equal; CUDA graph replay
#   bench     benchmarks/cuda_bench.py against the GPU rows of SPEC §8
# Stages can be named to run a subset (`scripts/gpu_suite.sh test shapes`); default all.
# Logs go to $OUT (the device tool's output folder), else benchmarks/results/: gpu_suite.log (device
# name, driver, torch and nvcc versions, each stage's status and time) and one log per stage.
# Exits non-zero if any stage failed. `DRY=1 scripts/gpu_suite.sh` checks the script on a machine
# without a GPU: the Python stages run on the CPU op (--device cpu), the rest is echoed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${OUT:-$root/benchmarks/results}
mkdir -p "$out"
log=$out/gpu_suite.log
stages=${*:-build test sanitize shapes stress bench}
python=${PYTHON:-python3}
dry=${DRY:-0}
device=cuda
[ "$dry" = 1 ] && device=cpu
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
status=0

say() { echo "$*" | tee -a "$log"; }
run_stage() {  # name, logfile, command...
  local name=$1 file=$2
  shift 2
  local t0=$SECONDS
  if [ "$dry" = 1 ] && [ "$1" != "$python" ]; then
    echo "(dry) $*" > "$file"
  else
    "$@" > "$file" 2>&1
  fi
  local rc=$?
  say "[gpu-suite] $name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (exit $rc)") in $((SECONDS - t0)) s; log $(basename "$file")"
  tail -n 5 "$file" | sed 's/^/    /' | tee -a "$log"
  [ $rc -eq 0 ] || status=1
}
sanitize() {  # tool
  run_stage "$1" "$out/$1.log" compute-sanitizer --tool "$1" --error-exitcode 1 \
    "$python" benchmarks/cuda_sanitize.py --quick
}

: > "$log"
say "[gpu-suite] $(date -u +%FT%TZ) stages: $stages$([ "$dry" = 1 ] && echo ' (dry run on the CPU)')"
say "[gpu-suite] git $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [ "$dry" != 1 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[gpu-suite] gpu: /' | tee -a "$log"
  nvcc --version 2>&1 | tail -n 2 | sed 's/^/[gpu-suite] /' | tee -a "$log"
fi
"$python" -c "import torch, sys; print('[gpu-suite] python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee -a "$log"

# torch's CUDA headers include cuBLAS/cuSOLVER headers; when the toolkit lacks them, take them
# from the CUDA wheels next to torch (as scripts/cuda_compile_check.sh does).
if [ "$dry" != 1 ]; then
  cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}
  if [ -z "${DMI_EXT_CUDA_INCLUDE:-}" ] && [ ! -f "$cuda_home/include/cublas_v2.h" ]; then
    wheel_include=$("$python" -c "import os, torch; p = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia', 'cu13', 'include'); print(p if os.path.isdir(p) else '')")
    if [ -n "$wheel_include" ]; then export DMI_EXT_CUDA_INCLUDE=$wheel_include; fi
  fi
fi

for stage in $stages; do
  case $stage in
    build)
      run_stage build "$out/build.log" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
        NVCC_APPEND_FLAGS="-Xptxas=-v" "$python" -m pip install -v --no-build-isolation --no-deps -e .
      if [ "$dry" != 1 ]; then
        "$python" -c "import dmi_ext; assert dmi_ext.WITH_CUDA, 'built without CUDA'; print('[gpu-suite] dmi_ext with CUDA kernels')" 2>&1 | tee -a "$log" || status=1
      fi
      ;;
    test)
      if [ "$dry" = 1 ]; then
        run_stage test "$out/pytest.log" "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py
      else
        run_stage test "$out/pytest.log" "$python" -m pytest -q -p no:cacheprovider -x tests/test_cuda.py tests/test_op.py tests/test_errors.py tests/test_numerics.py
      fi
      ;;
    sanitize)
      for tool in memcheck racecheck synccheck initcheck; do sanitize $tool; done
      ;;
    shapes)
      run_stage shapes "$out/shapes.log" "$python" scripts/gpu_checks.py shapes --device $device
      run_stage order "$out/order.log" "$python" scripts/gpu_checks.py order --device $device
      ;;
    stress)
      run_stage stress "$out/stress.log" "$python" scripts/gpu_checks.py stress --device $device
      run_stage graph "$out/graph.log" "$python" scripts/gpu_checks.py graph --device $device
      ;;
    bench)
      if [ "$dry" = 1 ]; then
        run_stage bench "$out/cuda_bench.log" echo "cuda_bench.py needs a GPU"
      else
        run_stage bench "$out/cuda_bench.log" "$python" benchmarks/cuda_bench.py --json "$out/cuda_bench.json"
        sed -n '/^$/,$p' "$out/cuda_bench.log" | tee -a "$log"
      fi
      ;;
    *)
      say "[gpu-suite] unknown stage '$stage' (build, test, sanitize, shapes, stress, bench)"
      status=1
      ;;
  esac
done
say "[gpu-suite] $([ $status -eq 0 ] && echo 'ALL PASS' || echo 'SOME STAGE FAILED')"
exit $status
