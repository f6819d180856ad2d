"""The GPU checks of issue 25 that pytest does not hold, for scripts/gpu_suite.sh:

    shapes         every launch shape of issue 25, each in a fresh process (so the kernels'
                   shared memory attributes start unset), forward + backward against the CPU op
    shape I        the I-th of them, in this process
    many           lu_loss over more than 65535 matrices (the library LU's finish grid)
    order          the same shapes in one process, large dynamic shared memory before small and
                   after (the attribute is only ever raised, never lowered by a smaller call)
    stress         two streams, multi-block shapes, 20 rounds: every result bitwise equal to the
                   first
    graph          a CUDA graph of forward + backward replays the eager result bitwise

`--device cpu` runs the same code on the CPU op (a dry run: it checks the script, not the GPU).
Exits non-zero on any mismatch.
"""

import argparse
import subprocess
import sys

import torch

import dmi_ext

# (name, dtype, B, M, N, C): the shapes whose dynamic shared memory fell in (48 KB - static,
# 48 KB] (the fused forward holds about 5.4 KB static, lu_loss about 5.1 KB), Clothing1M's
# C = 14 over N, three label sources at C = 74..78, and the library LU path.
SHAPES = [("f64 N=330 C=10", torch.float64, 0, 1, 330, 10),
          ("f32 N=1000 C=15", torch.float32, 0, 1, 1000, 15),
          ("f32 N=5000 C=14", torch.float32, 0, 1, 5000, 14),
          ("f32 N=100 C=20", torch.float32, 0, 1, 100, 20)]
SHAPES += [(f"f32 N={n} C=14", torch.float32, 0, 1, n, 14) for n in (200, 1000, 20000, 1_000_000)]
SHAPES += [(f"f32 M=3 N=2000 C={c}", torch.float32, 0, 3, 2000, c) for c in range(74, 79)]
SHAPES += [("f32 B=64 N=500 C=128", torch.float32, 64, 1, 500, 128),
           ("f64 B=4 N=3000 C=129 (library LU)", torch.float64, 4, 1, 3000, 129),
           ("f16 N=4096 C=100", torch.float16, 0, 1, 4096, 100),
           ("bf16 M=8 N=8192 C=10", torch.bfloat16, 0, 8, 8192, 10)]


def make(dtype, B, M, N, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*((B,) if B else ()), N, C, generator=g).to(dtype)
    shape = (B, N) if B else ((M, N) if M > 1 else (N,))
    y = torch.randint(0, C, shape, generator=g)
    return x, y


def loss_grad(x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = dmi_ext.dmi_loss(x, y, reduction="none", **kw)
    (grad,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), grad


def check_shape(index, device):
    name, dtype, B, M, N, C = SHAPES[index]
    x, y = make(dtype, B, M, N, C, seed=index)
    loss_cpu, grad_cpu = loss_grad(x, y)
    loss, grad = loss_grad(x.to(device), y.to(device))
    tol = {torch.float64: 1e-9, torch.float32: 2e-5}.get(dtype, 2e-2)
    ok = torch.allclose(loss.cpu().double(), loss_cpu.double(), rtol=tol, atol=tol, equal_nan=True)
    scale = grad_cpu.abs().max().item() or 1.0
    ok = ok and torch.allclose(grad.cpu().double(), grad_cpu.double(), rtol=tol, atol=tol * scale)
    print(f"{'ok ' if ok else 'BAD'} {name}", flush=True)
    return ok


def many_matrices(device):
    """lu_loss with more than 65535 matrices (the finish kernel's grid), on the library path."""
    if device == "cpu":
        G, C = 8, 129
    else:
        G, C = 66_000, 129  # 66000 x 129 x 129 float64: 8.8 GB per tensor
    sums = torch.eye(C, dtype=torch.float64, device=device).expand(G, C, C) * 2.0
    counts = torch.ones(G, dtype=torch.long, device=device)
    loss, lad, singular, table = torch.ops.dmi_ext.lu_loss(sums.contiguous(), counts, True, 0.0)
    ok = bool((lad - C * torch.log(torch.tensor(2.0, dtype=torch.float64, device=device))).abs().max() < 1e-9)
    ok = ok and not bool(singular.any())
    print(f"{'ok ' if ok else 'BAD'} lu_loss G={G} C={C} (library LU, finish grid)", flush=True)
    return ok


def stress(device, rounds=20):
    cases = [make(torch.float32, 0, 1, 1_000_000 if device != "cpu" else 20_000, 10, seed=1),
             make(torch.float32, 0, 3, 200_000 if device != "cpu" else 5_000, 100, seed=2)]
    cases = [(x.to(device), y.to(device)) for x, y in cases]
    want = [loss_grad(x, y) for x, y in cases]
    streams = [torch.cuda.Stream() for _ in range(2)] if device != "cpu" else [None, None]
    ok = True
    for _ in range(rounds):
        got = [None, None]
        for i, (x, y) in enumerate(cases):
            if streams[i] is not None:
                with torch.cuda.stream(streams[i]):
                    got[i] = loss_grad(x, y)
            else:
                got[i] = loss_grad(x, y)
        if device != "cpu":
            torch.cuda.synchronize()
        ok = ok and all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))
    print(f"{'ok ' if ok else 'BAD'} two streams, {rounds} rounds, bitwise equal", flush=True)
    return ok


def graph(device):
    x, y = make(torch.float32, 0, 1, 70_001, 10, seed=3)
    x, y = x.to(device), y.to(device)
    want = loss_grad(x, y, validate=False)
    if device == "cpu":
        got = loss_grad(x, y, validate=False)
    else:
        static_x = x.clone().requires_grad_(True)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the capture
                loss = dmi_ext.dmi_loss(static_x, y, reduction="none", validate=False)
                (grad,) = torch.autograd.grad(loss, static_x, torch.ones_like(loss))
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            loss = dmi_ext.dmi_loss(static_x, y, reduction="none", validate=False)
            (grad,) = torch.autograd.grad(loss, static_x, torch.ones_like(loss))
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        got = (loss.detach(), grad)
    ok = torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    print(f"{'ok ' if ok else 'BAD'} CUDA graph replay equals eager", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["shapes", "shape", "many", "order", "stress", "graph", "all"])
    parser.add_argument("index", nargs="?", type=int)
    parser.add_argument("--device", default="cuda")
    a = parser.parse_args()
    if a.device != "cpu" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for a dry run)")
    ok = True
    if a.command == "shape":
        ok = check_shape(a.index, a.device)
    if a.command == "many":
        ok = many_matrices(a.device)
    if a.command in ("shapes", "all"):
        for i in range(len(SHAPES)):
            r = subprocess.run([sys.executable, __file__, "shape", str(i), "--device", a.device])
            ok = ok and r.returncode == 0
        r = subprocess.run([sys.executable, __file__, "many", "--device", a.device])
        ok = ok and r.returncode == 0
    if a.command in ("order", "all"):
        order = [1, 0, 2, 13, 3, 1]  # near 48 KB, small, near 48 KB, the 128 KB LU stage, small, again
        ok = all([check_shape(i, a.device) for i in order]) and ok
    if a.command in ("stress", "all"):
        ok = stress(a.device) and ok
    if a.command in ("graph", "all"):
        ok = graph(a.device) and ok
    print("gpu_checks:", "PASS" if ok else "FAIL", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
