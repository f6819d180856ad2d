"""GPU speed of dmi_ext against docs/contract.md §8, forward + backward, measured with CUDA events.

For each shape it times, side by side in one process, dmi_ext.dmi_loss and "native" (softmax ->
one_hot -> matmul -> slogdet with autograd, float32, the composition a user would write; batched
through bmm and batched slogdet), each as the median of many runs after a warm-up, rotating over
several input sets so that repeated runs do not just hit the L2 cache. The bandwidth case
(N = 4e6, C = 10) also reports bytes moved (forward reads input and target; backward reads them
again and writes the gradient) over the device's measured copy bandwidth (a large device-to-device
copy, bytes read + written).

Prints a table (ratios against the docs/contract.md §8 targets) and writes JSON with the device name and
torch version: $OUT/cuda_bench.json, or benchmarks/results/cuda_bench.json when OUT is unset.
"""

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import dmi_ext


def time_ms(fn, inputs, warmup, runs):
    """Median milliseconds of fn(inputs[i % len]) between CUDA events, one event pair per run."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for i in range(runs):
        args = inputs[i % len(inputs)]
        starts[i].record()
        fn(*args)
        ends[i].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return statistics.median(times), min(times)


def ours_fwd_bwd(x, y):
    loss = dmi_ext.dmi_loss(x, y, validate=False)
    torch.autograd.grad(loss, x)


def ours_fwd_bwd_validated(x, y):
    loss = dmi_ext.dmi_loss(x, y)
    torch.autograd.grad(loss, x)


def ours_fwd(x, y):
    with torch.no_grad():
        dmi_ext.dmi_loss(x, y, validate=False)


def native_fwd_bwd(x, y):
    C = x.shape[-1]
    p = torch.softmax(x, -1)
    onehot = F.one_hot(y, C).to(p.dtype)
    U = onehot.transpose(-1, -2) @ p
    loss = -torch.linalg.slogdet(U)[1].mean()
    torch.autograd.grad(loss, x)


def copy_bandwidth_gbs(nbytes=2 * 1024**3, runs=20):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda a, b: b.copy_(a), [(src, dst)], 3, runs)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_inputs(lead, N, C, sets, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(sets):
        x = torch.randn(*lead, N, C, device="cuda", generator=g).requires_grad_(True)
        # Every class present (N >= C): U is invertible, as native's slogdet backward needs.
        keys = torch.rand(*lead, N, device="cuda", generator=g)
        y = (keys.argsort(-1) % C).to(torch.int64)
        out.append((x, y))
    return out


def sets_beyond_l2(bytes_per_set):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(8, 1 + (3 * l2) // max(bytes_per_set, 1)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="timed runs per measurement")
    parser.add_argument("--json", default=None, help="output path (default: $OUT or benchmarks/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("cuda_bench: no CUDA device; nothing measured")
        return 0
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = args.json or os.path.join(out_dir, "cuda_bench.json")
    props = torch.cuda.get_device_properties(0)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda, "sms": props.multi_processor_count,
            "l2_bytes": props.L2_cache_size, "runs": args.runs}
    copy_gbs = copy_bandwidth_gbs()
    meta["copy_bandwidth_GBps"] = copy_gbs
    print(f"{meta['device']}  torch {meta['torch']}  copy bandwidth {copy_gbs:.0f} GB/s", flush=True)

    rows = []
    # docs/contract.md §8: >= 10x native at N <= 4096, C <= 100 (single matrix).
    for N in (128, 1024, 4096):
        for C in (10, 100):
            inputs = make_inputs((), N, C, sets=4)
            ours, _ = time_ms(ours_fwd_bwd, inputs, 20, args.runs)
            ours_v, _ = time_ms(ours_fwd_bwd_validated, inputs, 20, args.runs)
            native, _ = time_ms(native_fwd_bwd, inputs, 20, args.runs)
            rows.append({"case": f"N={N} C={C}", "target": "speedup>=10", "ours_ms": ours,
                         "ours_validated_ms": ours_v, "native_ms": native,
                         "speedup": native / ours, "pass": native / ours >= 10})
            print(rows[-1], flush=True)
    # docs/contract.md §8: >= 10x native batched slogdet at B = 1024, N = 128.
    for C in (10, 100):
        inputs = make_inputs((1024,), 128, C, sets=sets_beyond_l2(1024 * 128 * C * 12))
        ours, _ = time_ms(ours_fwd_bwd, inputs, 10, args.runs)
        native, _ = time_ms(native_fwd_bwd, inputs, 10, args.runs)
        rows.append({"case": f"B=1024 N=128 C={C}", "target": "speedup>=10", "ours_ms": ours,
                     "native_ms": native, "speedup": native / ours, "pass": native / ours >= 10})
        print(rows[-1], flush=True)
    # docs/contract.md §8: >= 80% of the measured copy bandwidth at N = 4e6, C = 10 (bytes read + written).
    N, C = 4_000_000, 10
    inputs = make_inputs((), N, C, sets=sets_beyond_l2(N * C * 4))
    x_bytes, y_bytes = N * C * 4, N * 8
    ours, _ = time_ms(ours_fwd_bwd, inputs, 5, max(20, args.runs // 4))
    fwd, _ = time_ms(ours_fwd, inputs, 5, max(20, args.runs // 4))
    native, _ = time_ms(native_fwd_bwd, inputs, 3, 20)
    moved = 2 * (x_bytes + y_bytes) + x_bytes
    gbs = moved / (ours * 1e-3) / 1e9
    rows.append({"case": "N=4e6 C=10", "target": "bandwidth>=0.8*copy", "ours_ms": ours,
                 "forward_ms": fwd, "forward_GBps": (x_bytes + y_bytes) / (fwd * 1e-3) / 1e9,
                 "native_ms": native, "speedup": native / ours, "bytes": moved, "GBps": gbs,
                 "fraction_of_copy": gbs / copy_gbs, "pass": gbs / copy_gbs >= 0.8})
    print(rows[-1], flush=True)

    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    print(f"\n{meta['device']}, torch {meta['torch']}, CUDA events, median of runs; JSON: {path}")
    print(f"{'case':22s} {'ours ms':>9s} {'native ms':>10s} {'ratio':>8s}  target")
    for r in rows:
        ratio = r.get("fraction_of_copy", r["speedup"])
        unit = "of copy" if "fraction_of_copy" in r else "x"
        print(f"{r['case']:22s} {r['ours_ms']:9.4f} {r['native_ms']:10.4f} {ratio:8.2f} {unit:8s}"
              f" {r['target']:22s} {'PASS' if r['pass'] else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
