"""Runs the real CUDA kernels of csrc/cuda/ on the CPU, one OS thread per CUDA thread
(emulator.h), and checks them against the float64 reference and the CPU op: a correctness check
for sessions without a GPU. It does not replace the GPU run (scripts/gpu_suite.sh).

The .cu sources are rewritten only where plain C++ cannot take them (kernel launch syntax,
dynamic shared memory, stream/device calls) and compiled together with csrc/ops.cpp into a module
that registers the ops as torch.ops.dmi_ext_emu on CPU tensors: the same host planning, the same
kernels, the same autograd wiring. Needs the CUDA torch of scripts/cuda_compile_check.sh:

    .venv-cuda/bin/python tests/cuda_emulation/run.py          # after the compile check
"""

import importlib.util
import os
import re
import sys

import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "cuda-emulation")


def rewrite_cuda(text):
    text = text.replace("extern __shared__ __align__(16) unsigned char smem[];",
                        "unsigned char* smem = emu::dynamic_smem.data();")
    text = re.sub(r"(\w+)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\1, \2, \3);", text, flags=re.S)
    text = text.replace("at::cuda::getCurrentDeviceProperties()", "emu_props()")
    text = text.replace("at::cuda::getCurrentCUDAStream()", "cudaStream_t{}")
    text = text.replace("cudaMemsetAsync(", "emu_memset(").replace("cudaFuncSetAttribute(", "emu_noop(")
    text = text.replace("cudaOccupancyMaxActiveBlocksPerMultiprocessor(", "emu_occupancy(")
    text = re.sub(r"const c10::cuda::CUDAGuard guard\([^;]*\);", "", text)
    text = text.replace("at::cuda::currentStreamCaptureStatus() == at::cuda::CaptureStatus::None", "true")
    text = re.sub(r"#include <(ATen/cuda|c10/cuda)/[^>]*>\n", "", text)
    text = text.replace('#include "../dmi.h"', '#include "dmi.h"')
    text = text.replace('#include "../dmi_math.h"', '#include "dmi_math.h"')
    text = text.replace("TORCH_LIBRARY_IMPL(dmi_ext, CUDA, m)", "TORCH_LIBRARY_IMPL(dmi_ext_emu, CPU, m)")
    return text


def rewrite_ops(text):
    text = text.replace("TORCH_LIBRARY(dmi_ext, m)", "TORCH_LIBRARY(dmi_ext_emu, m)")
    text = text.replace("TORCH_LIBRARY_IMPL(dmi_ext, Autograd, m)", "TORCH_LIBRARY_IMPL(dmi_ext_emu, Autograd, m)")
    return text.replace('findSchemaOrThrow("dmi_ext::', 'findSchemaOrThrow("dmi_ext_emu::')


PRELUDE = r"""
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/extension.h>
#include <torch/library.h>
#include "emulator.h"
#undef C10_CUDA_CHECK
#define C10_CUDA_CHECK(x) (void)(x)
#undef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0
// A small device: few SMs, so a few thousand rows already take several blocks per matrix.
inline const cudaDeviceProp* emu_props() {
  static const cudaDeviceProp props = [] {
    cudaDeviceProp p{};
    p.multiProcessorCount = 4;
    p.maxThreadsPerMultiProcessor = 2048;
    p.sharedMemPerMultiprocessor = 233472;
    p.sharedMemPerBlockOptin = 232448;
    return p;
  }();
  return &props;
}
inline cudaError_t emu_memset(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
template <typename... A> cudaError_t emu_noop(A...) { return cudaSuccess; }
template <typename K> cudaError_t emu_occupancy(int* blocks, K, int, size_t) { *blocks = 2; return cudaSuccess; }
namespace emu {
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  launch(kernel, grid, block, smem, args...);
}
}  // namespace emu
"""


def build():
    os.makedirs(BUILD, exist_ok=True)
    parts = [PRELUDE, rewrite_ops(open(os.path.join(CSRC, "ops.cpp")).read())]
    for name in ("joint_cuda.cu", "lu_cuda.cu", "dmi_cuda.cu", "backward_cuda.cu"):
        parts.append(f"// ---- {name}\n" + rewrite_cuda(open(os.path.join(CSRC, "cuda", name)).read()))
    parts.append("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}\n")
    source = os.path.join(BUILD, "emulated.cpp")
    text = "\n".join(parts)
    if not os.path.exists(source) or open(source).read() != text:
        with open(source, "w") as f:
            f.write(text)
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    return load(name="dmi_ext_emulated", sources=[source], build_directory=BUILD,
                extra_include_paths=[CSRC, os.path.join(CSRC, "cuda"), os.path.dirname(__file__),
                                     "/usr/local/cuda-13.0/include", cuda_include],
                extra_cflags=["-O1", "-std=c++20", "-pthread", "-w"], extra_ldflags=["-pthread"],
                verbose=False)


def main():
    build()
    # The plain-torch reference, loaded by path: the package would load its compiled _C.
    spec = importlib.util.spec_from_file_location("dmi_reference", os.path.join(ROOT, "dmi_ext", "reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)

    emu = torch.ops.dmi_ext_emu

    def loss_grad(x, y, up, **kw):
        x = x.detach().clone().requires_grad_(True)
        loss, lad, singular, table = emu.dmi(x, y, kw.get("from_logits", True), kw.get("normalize", True),
                                             kw.get("eps", 0.0), -100, 0, kw.get("validate", True))
        (grad,) = torch.autograd.grad(loss, x, up)
        return loss.detach(), singular, grad

    failures = 0

    def check(name, x, y, **kw):
        nonlocal failures
        single = y.dim() == 1
        G = 1 if single else y.shape[0]
        up = torch.rand(() if single else (G,), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        opts = {k: v for k, v in kw.items() if k in ("from_logits", "normalize", "eps")}
        loss, singular, grad = loss_grad(x, y, up, **kw)
        xr = x.double().detach().clone().requires_grad_(True)
        loss_ref = ref.dmi_loss(xr, y, reduction="none", **opts)
        finite = torch.isfinite(loss_ref)
        (grad_ref,) = torch.autograd.grad(loss_ref, xr, up * finite)
        tol = 1e-9 if x.dtype == torch.float64 else (3e-5 if x.dtype == torch.float32 else 3e-2)
        ok = torch.equal(torch.isfinite(loss), finite)
        ok = ok and torch.allclose(loss.double()[finite], loss_ref[finite].detach(), rtol=tol, atol=tol)
        _, _, grad_masked = loss_grad(x, y, up * finite.to(up.dtype), **kw)
        scale = max(grad_ref.abs().max().item(), 1e-30)
        ok = ok and torch.allclose(grad_masked.double(), grad_ref, rtol=tol, atol=tol * scale)
        ok = ok and grad.dtype == x.dtype and grad.is_contiguous()
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}", flush=True)

    g = torch.Generator().manual_seed(0)

    def labels(shape, C, ignore=0.1):
        y = torch.arange(int(torch.tensor(shape).prod())).reshape(shape) % C
        y = y.flatten()[torch.randperm(y.numel(), generator=g)].reshape(shape)
        return torch.where(torch.rand(shape, generator=g) < ignore, -100, y)

    # One block; several blocks per matrix with a partial last tile (the emulated device has 4
    # SMs); batched; sources; each LU size class; above the fused limit; dtypes; probabilities.
    check("single N=37 C=2", torch.randn(37, 2, generator=g), labels((37,), 2))
    check("single N=3001 C=10 (multi-block)", torch.randn(3001, 10, generator=g), labels((3001,), 10))
    check("single N=2000 C=10 float64 unnormalised eps", torch.randn(2000, 10, generator=g, dtype=torch.float64),
          labels((2000,), 10), normalize=False, eps=1e-3)
    check("batched B=3 N=300 C=33", torch.randn(3, 300, 33, generator=g), labels((3, 300), 33))
    check("sources M=4 N=1500 C=7 (publish)", torch.randn(1500, 7, generator=g), labels((4, 1500), 7))
    check("batched B=2 N=400 C=64 float64", torch.randn(2, 400, 64, generator=g, dtype=torch.float64), labels((2, 400), 64))
    check("single N=600 C=100", torch.randn(600, 100, generator=g), labels((600,), 100))
    check("single N=400 C=128 (fused limit)", torch.randn(400, 128, generator=g, dtype=torch.float64), labels((400,), 128))
    check("single N=500 C=130 (library LU)", torch.randn(500, 130, generator=g, dtype=torch.float64), labels((500,), 130))
    check("sources M=2 N=400 C=140 (library LU)", torch.randn(400, 140, generator=g), labels((2, 400), 140))
    check("single N=1000 C=12 float16", torch.randn(1000, 12, generator=g).half(), labels((1000,), 12))
    check("single N=1000 C=12 bfloat16 int32", torch.randn(1000, 12, generator=g).bfloat16(), labels((1000,), 12).int())
    p = torch.softmax(torch.randn(2, 500, 9, generator=g, dtype=torch.float64), -1)
    check("batched probabilities", p, labels((2, 500), 9), from_logits=False)
    wide = torch.randn(3000, 16, generator=g)
    check("strided input", wide[:, ::2], labels((3000,), 8))
    check("column-major input", torch.randn(9, 2500, generator=g).t(), labels((2500,), 9))
    y = labels((3, 800), 6)
    y[1] = torch.where(y[1] == 2, 0, y[1])  # class 2 absent from matrix 1: singular
    check("sources with a singular matrix", torch.randn(800, 6, generator=g), y)

    # Reduced losses (the loss ticket), joint op, lu_loss op, validation errors.
    x = torch.randn(3, 700, 5, generator=g, dtype=torch.float64)
    y = labels((3, 700), 5)
    for red, expect in ((1, ref.dmi_loss(x, y).item()), (2, ref.dmi_loss(x, y, reduction="sum").item())):
        got = emu.dmi(x, y, True, True, 0.0, -100, red, True)[0].item()
        ok = abs(got - expect) <= 1e-9 * abs(expect)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} reduction {red}: {got} vs {expect}")
    sums, counts = emu.joint(x, y, True, -100, True)
    ok = torch.allclose(sums / counts[:, None, None], ref.joint_matrix(x, y), rtol=1e-12, atol=1e-12)
    out = emu.lu_loss(sums, counts, True, 1e-3)
    ok = ok and torch.allclose(out[0], ref.dmi_loss(x, y, eps=1e-3, reduction="none"), rtol=1e-10)
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} joint and lu_loss ops")
    y_bad = y.clone()
    y_bad[2, 611] = 17
    try:
        emu.dmi(x, y_bad, True, True, 0.0, -100, 1, True)
        failures += 1
        print("BAD no error for a bad label")
    except IndexError as e:
        ok = "label 17 at [2, 611]" in str(e)
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} bad label raised: {str(e).splitlines()[0]}")
    loss = emu.dmi(x, y_bad, True, True, 0.0, -100, 0, False)[0]
    ok = bool(torch.isnan(loss[2])) and bool(torch.isfinite(loss[:2]).all())
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} unvalidated bad label poisons only its matrix")
    try:
        emu.dmi(x, y, False, True, 0.0, -100, 1, True)
        failures += 1
        print("BAD no error for logits passed as probabilities")
    except ValueError as e:
        print(f"ok  not-a-probability raised: {str(e).splitlines()[0][:90]}")

    # Determinism: the same inputs twice give bitwise the same loss and gradient.
    x = torch.randn(3001, 10, generator=g)
    y = labels((3001,), 10)
    a = loss_grad(x, y, torch.tensor(1.0))
    b = loss_grad(x, y, torch.tensor(1.0))
    ok = torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} bitwise repeatable")
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
