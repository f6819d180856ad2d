"""Drives every CUDA kernel of dmi_ext over all shape kinds for compute-sanitizer (memcheck and
racecheck): one block and several blocks per matrix with a partial last tile and block, batched
one-block-per-matrix, many label sources, each size class of the in-register LU (C <= 32, <= 64,
<= 128 = the fused limit) and the library LU above it, all input dtypes, int32 and int64 targets,
non-contiguous inputs, ignored rows, singular matrices, bad labels with and without validation,
probabilities, the joint and lu_loss ops on their own, forward and backward.

Run: compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/cuda_sanitize.py
     compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/cuda_sanitize.py --quick
Exits non-zero if a result disagrees with the CPU op, so a kernel that runs clean but wrong fails.
"""

import argparse
import sys

import torch

import dmi_ext

ops = torch.ops.dmi_ext
FUSED = dmi_ext.FUSED_MAX_CLASSES


def case(kind, N, C, dtype, *, M=3, B=3, seed=0, from_logits=True, int32=False, ignored=0.1):
    g = torch.Generator().manual_seed(seed)
    lead = (B,) if kind == "batched" else ()
    x = torch.randn(*lead, N, C, generator=g, dtype=torch.float64)
    if not from_logits:
        x = torch.softmax(x, -1)
    shape = {"single": (N,), "batched": (B, N), "sources": (M, N)}[kind]
    y = torch.randint(0, C, shape, generator=g)
    y = torch.where(torch.rand(shape, generator=g) < ignored, -100, y)
    if int32:
        y = y.int()
    return x.to(dtype), y


def run(x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss, info = dmi_ext.dmi_loss(x, y, reduction="none", return_info=True, **kw)
    finite = torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, x, finite.to(loss.dtype))
    return loss.detach(), info.singular, grad


def agree(kind, N, C, dtype, **kw):
    x, y = case(kind, N, C, dtype, **{k: v for k, v in kw.items() if k in ("M", "B", "seed", "from_logits", "int32")})
    opts = {k: v for k, v in kw.items() if k in ("from_logits", "normalize", "eps")}
    cpu = run(x, y, **opts)
    gpu = run(x.cuda(), y.cuda(), **opts)
    tol = {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 5e-2)
    ok = torch.equal(gpu[1].cpu(), cpu[1])
    ok &= torch.allclose(gpu[0].cpu().double(), cpu[0].double(), rtol=tol, atol=tol, equal_nan=True)
    scale = max(cpu[2].double().abs().max().item(), 1e-30)
    ok &= torch.allclose(gpu[2].cpu().double(), cpu[2].double(), rtol=tol, atol=tol * scale, equal_nan=True)
    print(f"{'ok ' if ok else 'BAD'} {kind:8s} N={N:6d} C={C:4d} {str(dtype):15s} {kw}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases (for racecheck)")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    small = args.quick
    n_multi = 700 if small else 2_001  # > 256 rows per block: several blocks per matrix
    cases = [
        ("single", 37, 2, torch.float32, {}),
        ("single", n_multi, 10, torch.float32, {}),
        ("single", n_multi, 10, torch.float16, {"int32": True}),
        ("single", n_multi, 33, torch.bfloat16, {}),
        ("batched", 129, 64, torch.float64, {"from_logits": False}),
        ("sources", n_multi, 7, torch.float32, {"M": 5, "normalize": False, "eps": 1e-3}),
        ("single", 300 if small else 1_000, FUSED, torch.float32, {}),
        ("batched", 200, FUSED, torch.float64, {"B": 2}),
        ("single", 300, FUSED + 1, torch.float32, {}),
        ("sources", 300, FUSED + 20, torch.float32, {"M": 2}),
    ]
    if not small:
        cases += [
            ("single", 100_003, 10, torch.float32, {}),
            ("batched", 128, 100, torch.float32, {"B": 64}),
            ("sources", 5_000, 100, torch.float16, {"M": 2}),
        ]
    ok = True
    for kind, N, C, dtype, kw in cases:
        ok &= agree(kind, N, C, dtype, **kw)

    # Non-contiguous input, column-major target, absent class (singular), all rows ignored.
    x, y = case("sources", n_multi, 6, torch.float32)
    wide = torch.randn(n_multi, 12)
    wide[:, ::2] = x
    for xs, ys in [(wide[:, ::2], y), (x, y.t().contiguous().t())]:
        a, b = run(xs, ys), run(xs.cuda(), ys.cuda())
        ok &= torch.allclose(b[0].cpu(), a[0], rtol=1e-4, atol=1e-4)
    y_sing = torch.where(y == 1, 0, y)
    y_sing[2] = -100
    singular = run(x.cuda(), y_sing.cuda())
    ok &= bool(singular[1].all()) and bool((singular[2] == 0).all())

    # Bad labels: raised with validation, NaN for their matrix without.
    y_bad = y.clone()
    y_bad[1, n_multi - 1] = 99
    try:
        dmi_ext.dmi_loss(x.cuda(), y_bad.cuda())
        ok = False
    except IndexError:
        pass
    loss = dmi_ext.dmi_loss(x.cuda(), y_bad.cuda(), reduction="none", validate=False)
    ok &= bool(torch.isnan(loss[1])) and bool(torch.isfinite(loss[[0, 2]]).all())

    # The stage ops on their own, fused size classes and the library path.
    for C in (10, 50, FUSED, FUSED + 5):
        x, y = case("sources", 400, C, torch.float32, M=2)
        s_cpu, n_cpu = ops.joint.default(x, y, True, -100, True)
        s_gpu, n_gpu = ops.joint.default(x.cuda(), y.cuda(), True, -100, True)
        ok &= torch.equal(n_gpu.cpu(), n_cpu) and torch.allclose(s_gpu.cpu(), s_cpu, rtol=1e-6, atol=1e-6)
        out_cpu = ops.lu_loss.default(s_cpu, n_cpu, True, 0.0)
        out_gpu = ops.lu_loss.default(s_cpu.cuda(), n_cpu.cuda(), True, 0.0)
        ok &= all(torch.allclose(a.cpu().double(), b.double(), rtol=1e-8, atol=1e-10, equal_nan=True)
                  for a, b in zip(out_gpu, out_cpu))
    torch.cuda.synchronize()
    print("all kernels agree with the CPU op" if ok else "MISMATCH against the CPU op", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
