"""Runs the real CUDA kernels of csrc/cuda/ on the CPU, one OS thread per CUDA thread
(emulator.h), and checks them against the float64 reference and the CPU op: a correctness check
for sessions without a GPU. It does not replace the GPU run (scripts/gpu_suite.sh).

The .cu sources are rewritten only where plain C++ cannot take them (kernel launch syntax,
dynamic shared memory, stream/device calls) and compiled together with csrc/ops.cpp into a module
that registers the ops as torch.ops.dmi_ext_emu on CPU tensors: the same host planning, the same
kernels, the same autograd wiring. Needs the CUDA torch of scripts/cuda_compile_check.sh:

    .venv-cuda/bin/python tests/cuda_emulation/run.py          # after the compile check

Steps: the launch planner's host-side test (plan_test.cpp, over a wide grid of shapes against the
driver's rules); then the emulated kernels, built with AddressSanitizer and run in a child process
with libasan preloaded, on the geometry cases, the launch shapes of issue 25, the numerics cases
of tests/test_numerics.py and equal-column cases. `--plan` runs the planner test alone (no
torch needed), `--no-asan` builds without the sanitizer.
"""

import ast
import math
import importlib.util
import itertools
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(ROOT, "build", "cuda-emulation")


def rewrite_shared(text, keys):
    """`__shared__ T a[n], b;` -> one per-block emulator variable per name (emulator.h)."""
    def one(match):
        type_, names = match.group(1), match.group(2)
        out = []
        for name in names.split(","):
            name = name.strip()
            base, dims = re.match(r"(\w+)((?:\[[^\]]*\])*)$", name).groups()
            out.append(f"auto& {base} = emu::shared_var<{type_}{dims}>({next(keys)});")
        return " ".join(out)
    return re.sub(r"__shared__\s+([\w:<>]+)\s+([^;()]+);", one, text)


def rewrite_cuda(text, keys):
    text = text.replace("extern __shared__ __align__(16) unsigned char smem[];",
                        "unsigned char* smem = emu::dynamic_shared();")
    text = rewrite_shared(text, keys)
    text = re.sub(r"(\w+)<<<(.*?)>>>\((.*?)\);", r"emu::launch(\1, \2, \3);", text, flags=re.S)
    text = text.replace("at::cuda::getDeviceProperties(device)", "emu_props()")
    text = text.replace("at::cuda::getCurrentCUDAStream()", "cudaStream_t{}")
    text = text.replace("cudaMemsetAsync(", "emu_memset(").replace("cudaFuncSetAttribute(", "emu_set_attribute(")
    text = text.replace("cudaFuncGetAttributes(", "emu_func_attributes(").replace("cudaGetDevice(", "emu_get_device(")
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
// The emulated device of emulator.h.
inline const cudaDeviceProp* emu_props() {
  static const cudaDeviceProp props = [] {
    cudaDeviceProp p{};
    p.multiProcessorCount = emu::kMultiprocessors;
    p.maxThreadsPerBlock = 1024;
    p.maxGridSize[0] = 2147483647;
    p.maxGridSize[1] = p.maxGridSize[2] = 65535;
    p.sharedMemPerBlock = emu::kSmemPerBlock;
    p.sharedMemPerBlockOptin = emu::kSmemPerBlockOptin;
    p.sharedMemPerMultiprocessor = emu::kSmemPerMultiprocessor;
    p.reservedSharedMemPerBlock = emu::kReservedSmemPerBlock;
    p.maxThreadsPerMultiProcessor = emu::kMaxThreadsPerMultiprocessor;
    p.maxBlocksPerMultiProcessor = 32;
    p.regsPerMultiprocessor = 65536;
    return p;
  }();
  return &props;
}
inline cudaError_t emu_memset(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }
inline cudaError_t emu_get_device(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t emu_func_attributes(cudaFuncAttributes* a, const void*) {
  *a = cudaFuncAttributes{};
  a->sharedSizeBytes = emu::kStaticSmemBound;
  a->numRegs = emu::kRegisters;
  a->maxThreadsPerBlock = 1024;
  return cudaSuccess;
}
inline cudaError_t emu_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) std::abort();
  return emu::set_max_dynamic(kernel, static_cast<size_t>(value));
}
namespace emu {
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  launch(kernel, grid, block, smem, args...);
}
}  // namespace emu
"""


def compiler():
    return os.environ.get("CXX", "g++")


def asan_runtime():
    return subprocess.run([compiler(), "-print-file-name=libasan.so"], capture_output=True,
                          text=True, check=True).stdout.strip()


def run_plan_test():
    """Compiles and runs the planner test (pure C++, launch_plan.h), under AddressSanitizer."""
    os.makedirs(BUILD, exist_ok=True)
    exe = os.path.join(BUILD, "plan_test")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plan_test.cpp")
    header = os.path.join(CSRC, "cuda", "launch_plan.h")
    if not os.path.exists(exe) or os.path.getmtime(exe) < max(os.path.getmtime(source), os.path.getmtime(header)):
        subprocess.run([compiler(), "-std=c++20", "-O2", "-g", "-fsanitize=address,undefined",
                        "-fno-sanitize-recover=undefined", "-I", CSRC, source, "-o", exe], check=True)
    return subprocess.run([exe]).returncode


def build(asan):
    import torch
    from torch.utils.cpp_extension import load

    os.makedirs(BUILD, exist_ok=True)
    keys = itertools.count(1)

    def write(path, text):
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)

    # The headers the .cu files include, rewritten next to the combined source (found first).
    for name in ("lu_cuda.cuh", "tiles_cuda.cuh"):
        write(os.path.join(BUILD, name), rewrite_cuda(open(os.path.join(CSRC, "cuda", name)).read(), keys))
    parts = [PRELUDE, rewrite_ops(open(os.path.join(CSRC, "ops.cpp")).read())]
    for name in ("joint_cuda.cu", "lu_cuda.cu", "dmi_cuda.cu", "backward_cuda.cu"):
        parts.append(f"// ---- {name}\n" + rewrite_cuda(open(os.path.join(CSRC, "cuda", name)).read(), keys))
    parts.append("PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}\n")
    source = os.path.join(BUILD, "emulated.cpp")
    write(source, "\n".join(parts))
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    name = "dmi_ext_emulated_asan" if asan else "dmi_ext_emulated"
    load(name=name, sources=[source], build_directory=BUILD,
         extra_include_paths=[CSRC, os.path.join(CSRC, "cuda"), os.path.dirname(os.path.abspath(__file__)),
                              "/usr/local/cuda-13.0/include", cuda_include],
         extra_cflags=["-O1", "-g0", "-std=c++20", "-pthread", "-w"] + sanitize,
         extra_ldflags=["-pthread"] + sanitize, verbose=False, is_python_module=False)
    return os.path.join(BUILD, name + ".so")


def load_numerics_cases():
    """every_class_labels, rank_deficient, CONSTRUCTIONS and CLASSES of tests/test_numerics.py,
    taken from its source (the module itself imports the compiled package)."""
    path = os.path.join(ROOT, "tests", "test_numerics.py")
    tree = ast.parse(open(path).read())
    wanted = {"every_class_labels", "rank_deficient", "CONSTRUCTIONS", "CLASSES"}
    body = [node for node in tree.body
            if (isinstance(node, ast.FunctionDef) and node.name in wanted)
            or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in wanted for t in node.targets))]
    import torch
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=body, type_ignores=[]), path, "exec"), namespace)
    return namespace


def run_cases(library):
    import torch

    torch.ops.load_library(library)
    # The plain-torch reference, loaded by path: the package would load its compiled _C.
    spec = importlib.util.spec_from_file_location("dmi_reference", os.path.join(ROOT, "dmi_ext", "reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    emu = torch.ops.dmi_ext_emu
    counts = {"cases": 0, "failures": 0, "last": time.time()}

    def report(ok, name):
        counts["cases"] += 1
        counts["failures"] += not ok
        now = time.time()
        print(f"{'ok ' if ok else 'BAD'} {name} [{now - counts['last']:.1f} s]", flush=True)
        counts["last"] = now

    def loss_grad(x, y, up, **kw):
        x = x.detach().clone().requires_grad_(True)
        loss, lad, singular, table, _ = emu.dmi(x, y, kw.get("from_logits", True),
                                                kw.get("normalize", True), kw.get("eps", 0.0),
                                                -100, 0, kw.get("validate", True))
        (grad,) = torch.autograd.grad(loss, x, up)
        return loss.detach(), singular, grad

    def check(name, x, y, **kw):
        """Loss, gradient and singular flags against the float64 reference."""
        single = y.dim() == 1
        G = 1 if single else y.shape[0]
        up = torch.rand(() if single else (G,), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        opts = {k: v for k, v in kw.items() if k in ("from_logits", "normalize", "eps")}
        loss, singular, grad = loss_grad(x, y, up, **kw)
        xr = x.double().detach().clone().requires_grad_(True)
        loss_ref = ref.dmi_loss(xr, y, reduction="none", **opts)
        U = ref.joint_matrix(x.double(), y, from_logits=opts.get("from_logits", True),
                             normalize=opts.get("normalize", True))
        singular_ref = ref.is_singular(U)
        finite = ~singular_ref if opts.get("eps", 0.0) > 0 else torch.isfinite(loss_ref)
        (grad_ref,) = torch.autograd.grad(loss_ref, xr, up * finite)
        tol = kw.get("tol") or (1e-9 if x.dtype == torch.float64 else (3e-5 if x.dtype == torch.float32 else 3e-2))
        ok = torch.equal(singular.reshape(singular_ref.shape), singular_ref)
        ok = ok and torch.equal(torch.isfinite(loss), torch.isfinite(loss_ref.detach()))
        ok = ok and torch.allclose(loss.double(), loss_ref.detach(), rtol=tol, atol=tol, equal_nan=True)
        # Singular matrices: zero gradient (docs/contract.md §5); the rest against the reference.
        ok = ok and bool(torch.isfinite(grad).all())
        if not bool(finite.all()):
            _, _, grad_masked = loss_grad(x, y, up * finite.to(up.dtype), **kw)
            ok = ok and torch.equal(grad, grad_masked)  # the singular ones add exactly zero
        else:
            grad_masked = grad
        scale = max(grad_ref.abs().max().item(), 1e-30)
        gtol = kw.get("grad_tol") or tol
        ok = ok and torch.allclose(grad_masked.double(), grad_ref, rtol=gtol, atol=gtol * scale)
        ok = ok and grad.dtype == x.dtype and grad.is_contiguous()
        report(ok, name + (f" (singular {singular.flatten().tolist()})" if bool(singular.any()) else ""))

    g = torch.Generator().manual_seed(0)

    def labels(shape, C, ignore=0.1):
        y = torch.arange(int(torch.tensor(shape).prod())).reshape(shape) % C
        y = y.flatten()[torch.randperm(y.numel(), generator=g)].reshape(shape)
        return torch.where(torch.rand(shape, generator=g) < ignore, -100, y)

    t0 = time.time()
    print("-- geometry: one block; several blocks per matrix with a partial last tile (4 emulated SMs);"
          " batched; sources; each LU size class; above the fused limit; dtypes; probabilities", flush=True)
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

    print("-- launch shapes of issue 25 (dynamic shared memory in (48 KB - static, 48 KB])", flush=True)
    for dtype, N, C in ((torch.float64, 330, 10), (torch.float32, 1000, 15), (torch.float32, 5000, 14),
                        (torch.float32, 100, 20), (torch.float32, 200, 14), (torch.float32, 20000, 14)):
        check(f"single N={N} C={C} {str(dtype)[6:]}", torch.randn(N, C, generator=g, dtype=dtype), labels((N,), C))
    check("sources M=3 N=300 C=76", torch.randn(300, 76, generator=g), labels((3, 300), 76))

    print("-- reduced losses (the loss ticket), joint and lu_loss ops, validation errors", flush=True)
    x = torch.randn(3, 700, 5, generator=g, dtype=torch.float64)
    y = labels((3, 700), 5)
    for red, expect in ((1, ref.dmi_loss(x, y).item()), (2, ref.dmi_loss(x, y, reduction="sum").item())):
        got = emu.dmi(x, y, True, True, 0.0, -100, red, True)[0].item()
        report(abs(got - expect) <= 1e-9 * abs(expect), f"reduction {red}: {got} vs {expect}")
    sums, cnt = emu.joint(x, y, True, -100, True)
    ok = torch.allclose(sums / cnt[:, None, None], ref.joint_matrix(x, y), rtol=1e-12, atol=1e-12)
    out = emu.lu_loss(sums, cnt, True, 1e-3)
    ok = ok and torch.allclose(out[0], ref.dmi_loss(x, y, eps=1e-3, reduction="none"), rtol=1e-10)
    report(ok, "joint and lu_loss ops")
    y_bad = y.clone()
    y_bad[2, 611] = 17
    try:
        emu.dmi(x, y_bad, True, True, 0.0, -100, 1, True)
        report(False, "no error for a bad label")
    except IndexError as e:
        report("label 17 at [2, 611]" in str(e), f"bad label raised: {str(e).splitlines()[0]}")
    loss = emu.dmi(x, y_bad, True, True, 0.0, -100, 0, False)[0]
    report(bool(torch.isnan(loss[2])) and bool(torch.isfinite(loss[:2]).all()),
           "unvalidated bad label poisons only its matrix")
    try:
        emu.dmi(x, y, False, True, 0.0, -100, 1, True)
        report(False, "no error for logits passed as probabilities")
    except ValueError as e:
        report(True, f"not-a-probability raised: {str(e).splitlines()[0][:90]}")

    print("-- numerics (tests/test_numerics.py): rank-deficient constructions are singular with zero"
          " gradient; perturbed ones regular and exact", flush=True)
    nc = load_numerics_cases()
    for construction in nc["CONSTRUCTIONS"]:
        for C in (3, 10, 37, 129) + ((128,) if construction == "equal_columns" else ()):
            if construction == "class_outputs" and C == 2:
                continue
            x, y = nc["rank_deficient"](construction, C, C % 3)
            for eps in (0.0, 1e-3) if C < 100 else (0.0,):
                up = torch.tensor(1.0, dtype=torch.float64)
                loss, singular, grad = loss_grad(x, y, up, eps=eps)
                want = torch.tensor(math.inf if eps == 0 else -math.log(eps), dtype=loss.dtype)
                ok = bool(singular) and torch.equal(loss, want) and torch.equal(grad, torch.zeros_like(grad))
                ok = ok and bool(ref.is_singular(ref.joint_matrix(x.double(), y)))
                report(ok, f"{construction} C={C} eps={eps}: singular, loss {loss.item():.6g}")
    for construction in ("constant", "few_outputs", "class_outputs"):
        for C in (10, 100, 200) if construction == "constant" else (10, 150):
            x, y = nc["rank_deficient"](construction, C, 1, torch.float64)
            x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
            check(f"perturbed {construction} C={C}: regular", x, y, tol=1e-7, grad_tol=1e-5)
    for C in (10, 130):  # one singular matrix among batched problems and among label sources
        N = 8 * C + 16
        x = torch.randn(3, N, C, generator=g)
        x[1] = x[1, 0]
        y = torch.stack([nc["every_class_labels"](N, C, g) for _ in range(3)])
        check(f"batched C={C}, problem 1 constant", x, y)
        xd, y1 = nc["rank_deficient"]("duplicate_rows", C, 0)
        y0 = nc["every_class_labels"](len(y1), C, g)
        check(f"sources C={C}, source 1 duplicated", xd, torch.stack([y0, y1, y0.flip(0)]))
    torch.manual_seed(36)
    b = torch.randn(100)
    yr = torch.randint(0, 100, (816,))
    yr[:100] = torch.arange(100)
    torch.manual_seed(0)
    x10 = torch.randn(10, 10)
    x10[3] = x10[7]
    for name, x, y in (("zeros N=1000 C=100", torch.zeros(1000, 100), torch.arange(1000) % 100),
                       ("constant C=100", b.expand(816, 100).clone(), yr),
                       ("equal rows C=10", x10, torch.arange(10))):
        loss, singular, grad = loss_grad(x, y, torch.tensor(1.0, dtype=torch.float64))
        report(loss.item() == float("inf") and bool(singular) and torch.equal(grad, torch.zeros_like(grad)),
               f"issue reproducer {name}: loss {loss.item()}")
    xs = torch.tensor([[0.0, -90.0]] * 8 + [[0.0, -91.0]] * 8)
    ys = torch.tensor([0] * 8 + [1] * 8)
    check("subnormal probabilities (exp(-90), exp(-91))", xs, ys, tol=1e-5)
    check("subnormal probabilities, two rows", xs[[0, 8]], ys[[0, 8]], tol=1e-5)
    sums, _ = emu.joint(xs[:, None, :], torch.zeros(16, 1, dtype=torch.long), True, -100, True)
    report(torch.allclose(sums[:, 0, :].float(), xs.softmax(-1), rtol=2e-7, atol=0),
           "per-row softmax shift keeps subnormal probabilities as torch.softmax")
    xw = torch.tensor([[0.0, -100.0]] * 8 + [[0.0, -101.0]] * 8)
    loss, singular, grad = loss_grad(xw, ys, torch.tensor(1.0, dtype=torch.float64))
    xr = xw.double().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(ref.dmi_loss(xr, ys), xr)
    report(not bool(singular) and bool(torch.isfinite(grad).all())
           and torch.allclose(grad.double(), grad_ref, rtol=5e-2, atol=5e-2),
           "gradient beyond the float range: float64 backward, finite and correct")
    # U^-1 beyond the float64 range (float64 logits ~713 apart): exact loss, gradient 0, not
    # singular; C = 3 takes the fused LU, C = 130 the library LU (dmi_math.h, table_overflowed).
    for C in (3, 130):
        xo = torch.randn(16 * C, C, generator=g, dtype=torch.float64)
        xo[:, 2] -= 713
        yo = torch.arange(16 * C) % C
        loss, singular, grad = loss_grad(xo, yo, torch.tensor(1.0, dtype=torch.float64))
        want = ref.dmi_loss(xo, yo)
        report(not bool(singular) and torch.allclose(loss, want, rtol=1e-9, atol=0)
               and torch.equal(grad, torch.zeros_like(grad)),
               f"U^-1 beyond float64 (C={C}): exact loss, gradient 0, not singular")
    out = emu.lu_loss(torch.eye(3, dtype=torch.float64) * 5e-324, torch.tensor(1), False, 0.0)
    report(not bool(out[2]) and abs(out[1].item() - 3 * -744.4400719213812) < 1e-9 * 2233,
           f"subnormal U: log|det| {out[1].item()}")

    print("-- equal logit columns x[:, 5] = x[:, 2] (rank-deficient U): singular, as the CPU op", flush=True)
    for C in (6, 10, 16, 33, 64, 100, 128, 150):
        N = 8 * C + 16
        x = torch.randn(N, C, generator=g)
        x[:, 5] = x[:, 2]
        check(f"equal columns C={C}", x, nc["every_class_labels"](N, C, g))
        if C <= 33:
            check(f"equal columns C={C} eps=1e-3 float64", x.double(), nc["every_class_labels"](N, C, g), eps=1e-3)

    print("-- determinism", flush=True)
    x = torch.randn(3001, 10, generator=g)
    y = labels((3001,), 10)
    a = loss_grad(x, y, torch.tensor(1.0))
    b = loss_grad(x, y, torch.tensor(1.0))
    report(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]), "bitwise repeatable (blocks in another order)")
    print(f"{counts['cases']} cases, {counts['failures']} failure(s), {time.time() - t0:.0f} s", flush=True)
    return 1 if counts["failures"] else 0


def main():
    args = sys.argv[1:]
    asan = "--no-asan" not in args and "--plan" not in args
    if asan and os.environ.get("DMI_EMULATOR_ASAN") != "1":
        # The module is instrumented and the interpreter is not: the sanitizer's runtime must be
        # loaded first, so this process starts again with it preloaded (the build runs under it too).
        # libstdc++ right after it, so that its exception interceptors find the real __cxa_throw.
        stdcxx = subprocess.run([compiler(), "-print-file-name=libstdc++.so.6"], capture_output=True,
                                text=True, check=True).stdout.strip()
        env = dict(os.environ, DMI_EMULATOR_ASAN="1", LD_PRELOAD=f"{asan_runtime()}:{stdcxx}",
                   ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0")
        return subprocess.run([sys.executable, os.path.abspath(__file__), *args], env=env).returncode
    t0 = time.time()
    rc = run_plan_test()
    print(f"[emulator] planner test: {'PASS' if rc == 0 else 'FAIL'} in {time.time() - t0:.0f} s", flush=True)
    if "--plan" in args or rc:
        return rc
    t0 = time.time()
    library = build(asan)
    print(f"[emulator] built {os.path.basename(library)}{' with AddressSanitizer' if asan else ''}"
          f" in {time.time() - t0:.0f} s", flush=True)
    return run_cases(library)


if __name__ == "__main__":
    sys.exit(main())
