"""Side-by-side speed report of the fused DMI op against the alternatives (benchmarks/variants.py),
measured in one process, interleaved, after warm-up, as medians.

    python -m benchmarks.report            # the shapes of the contract's CPU rows (a few minutes)
    python -m benchmarks.report --full     # the whole grid
    python -m benchmarks.report --smoke    # a few small shapes (CI)

For each shape it times forward alone and forward + backward (loss.backward(), as a user calls it)
of every variant, and prints one table: medians, the ratios native/fused and fused/cross-entropy,
two floors, and the peak memory of forward + backward. Cross-entropy is `F.cross_entropy` on the
same logits and labels, the loss a user pays for anyway. The floors: one torch.softmax over the
same input (the op cannot beat reading and exponentiating its input once), and
`input.sum().backward()` (what any autograd op costs here before doing any work). Then the speed
rows of the contract (docs/contract.md §8) that the grid covers, each with its verdict. It writes
JSON, markdown and a PNG plot (speed-up against N, one line per C) to benchmarks/results/, named
after the machine.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks import variants

# docs/contract.md §8, the CPU rows: (what the row says, which rows it covers, mode, the ratio it
# bounds, "max" or "min", the bound). A ratio is (numerator variant, denominator variant).
CONTRACT_ROWS = [
    ("fused <= 1.0x cross-entropy, every shape with C <= 128",
     lambda r: r["C"] <= 128, "forward+backward", ("fused", "cross-entropy"), "max", 1.0),
    ("fused <= 0.5x cross-entropy at C <= 16, N >= 8192",
     lambda r: r["C"] <= 16 and r["N"] >= 8192, "forward+backward", ("fused", "cross-entropy"),
     "max", 0.5),
    ("fused >= 5x faster than native at N >= 8192, C <= 128",
     lambda r: r["C"] <= 128 and r["N"] >= 8192, "forward+backward", ("native", "fused"), "min", 5.0),
    ("fused <= 1.3x the autograd floor at N = 128, C = 10",
     lambda r: r["shape"] == "N=128 C=10", "forward+backward", ("fused", "autograd floor"), "max", 1.3),
    ("forward <= 1.0x one softmax at N = 10^6, C = 10",
     lambda r: r["shape"] == "N=1000000 C=10", "forward", ("fused", "softmax"), "max", 1.0),
]


def machine_name(device: str) -> str:
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1] for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"{name.strip()} {torch.get_num_threads()}t"
    return "-".join(name.lower().replace("(r)", "").replace("(tm)", "").split())


class Timer:
    """Wall time of one call; on CUDA, between events around it."""

    def __init__(self, device):
        self.device = device

    def __call__(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def callables(shape, device):
    """name -> (forward fn, forward+backward fn) for every variant and the two floors, and the
    function that drops the gradient the forward+backward functions accumulate."""
    z, y = shape.make(device)
    zg = z.clone().requires_grad_(True)

    def drop_grad():
        zg.grad = None

    out = {}
    for name, fn in variants.VARIANTS.items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(z, y)

        def fwd_bwd(fn=fn):
            drop_grad()
            fn(zg, y).backward()

        out[name] = (fwd, fwd_bwd)

    def softmax():
        with torch.no_grad():
            torch.softmax(z, -1)

    def autograd_floor():
        drop_grad()
        zg.sum().backward()

    C = z.shape[-1]
    if y.dim() == 2 and z.dim() == 2:  # M label sources: cross-entropy against each of them
        ce_target = y.reshape(-1)
        ce_input = lambda x: x.expand(y.shape[0], *x.shape).reshape(-1, C)  # noqa: E731
    else:
        ce_target = y.reshape(-1)
        ce_input = lambda x: x.reshape(-1, C)  # noqa: E731

    def cross_entropy():
        with torch.no_grad():
            F.cross_entropy(ce_input(z), ce_target)

    def cross_entropy_backward():
        drop_grad()
        F.cross_entropy(ce_input(zg), ce_target).backward()

    out["cross-entropy"] = (cross_entropy, cross_entropy_backward)
    out["softmax"] = (softmax, softmax)
    out["autograd floor"] = (autograd_floor, autograd_floor)
    return out, drop_grad


def measure(fns, timer, budget_s, min_rounds=5, max_rounds=300, warmup_rounds=3):
    """Medians of interleaved rounds: every round calls each function once, in rotated order, so
    that drift (frequency, other load) spreads evenly over the variants. A few untimed rounds come
    first: the first calls of a shape pay for allocator growth and lazy initialisation (once a
    23 ms outlier in a 0.3 ms row)."""
    names = list(fns)
    for _ in range(warmup_rounds):
        for fn in fns.values():
            fn()
    t_round = sum(timer(fns[n]) for n in names)  # the cost of one round, for the budget
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(t_round, 1e-9))))
    samples = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            samples[n].append(timer(fns[n]))
    return {n: statistics.median(s) for n, s in samples.items()}, rounds


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2: the CPU profiler (kineto) prints two lines per use there."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_memory(fn, device, before) -> int:
    """Peak bytes allocated through PyTorch's allocator during fn (forward + backward), above
    what was live when it started; `before` runs first, unmeasured (it frees the last gradient,
    whose release would otherwise offset the new one)."""
    before()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run(shapes, device, budget_s):
    timer = Timer(device)
    rows = []
    for shape in shapes:
        fns, drop_grad = callables(shape, device)
        row = {"shape": shape.name, "N": shape.N, "C": shape.C, "B": shape.B, "M": shape.M}
        for mode, index in (("forward", 0), ("forward+backward", 1)):
            medians, rounds = measure({n: f[index] for n, f in fns.items()}, timer, budget_s)
            row[mode] = {"median_s": medians, "rounds": rounds}
        row["peak_bytes"] = {n: peak_memory(fns[n][1], device, drop_grad)
                             for n in ("native", "fused")}
        rows.append(row)
        print(f"  measured {shape.name}", file=sys.stderr, flush=True)
    return rows


def ms(seconds):
    return f"{seconds * 1e3:.3f}"


def table(rows, mode):
    head = ("| shape | native ms | official ms | tuned ms | fused ms | native/fused | cross-entropy ms "
            "| fused/CE | softmax ms | fused/softmax | autograd floor ms |")
    if mode == "forward+backward":
        head += " peak MiB native | peak MiB fused |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r[mode]["median_s"]
        line = (f"| {r['shape']} | {ms(m['native'])} | {ms(m['official'])} | {ms(m['tuned'])} | "
                f"{ms(m['fused'])} | **{m['native'] / m['fused']:.1f}x** | {ms(m['cross-entropy'])} | "
                f"{m['fused'] / m['cross-entropy']:.2f} | {ms(m['softmax'])} | "
                f"{m['fused'] / m['softmax']:.2f} | {ms(m['autograd floor'])} |")
        if mode == "forward+backward":
            p = r["peak_bytes"]
            line += f" {p['native'] / 2**20:.2f} | {p['fused'] / 2**20:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def verdicts(rows):
    """The contract's CPU speed rows (docs/contract.md §8) against what was measured: one line per
    row and shape it covers, met or missed by how much."""
    lines = []
    for text, covers, mode, (num, den), kind, bound in CONTRACT_ROWS:
        for r in filter(covers, rows):
            m = r[mode]["median_s"]
            got = m[num] / m[den]
            ok = got <= bound if kind == "max" else got >= bound
            miss = got / bound if kind == "max" else bound / got
            lines.append(f"- {text}: {r['shape']}, {mode}: {num}/{den} = {got:.2f} -> "
                         + ("met" if ok else f"MISSED by {miss:.2f}x"))
    return "\n".join(lines)


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    singles = [r for r in rows if not r["B"] and not r["M"]]
    for C in sorted({r["C"] for r in singles}):
        pts = sorted((r["N"], r["forward+backward"]["median_s"]["native"]
                      / r["forward+backward"]["median_s"]["fused"]) for r in singles if r["C"] == C)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"C = {C}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    times = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(times)
    ax.yaxis.set_minor_formatter(times)
    ax.set_xlabel("N (rows per batch)")
    ax.set_ylabel("speed-up over native (forward + backward)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--full", action="store_true", help="the whole grid of the issue")
    grid.add_argument("--smoke", action="store_true", help="a few small shapes (CI)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per shape and mode (default 2, smoke 0.2)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="where the JSON, markdown and PNG go")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    shapes = (variants.full_grid() if args.full else
              variants.smoke_grid() if args.smoke else variants.quick_grid())
    budget = args.budget if args.budget is not None else (0.2 if args.smoke else 2.0)
    machine = machine_name(args.device)
    title = (f"dmi_ext {args.device} report on {machine}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads")
    print(title, file=sys.stderr)
    for shape in shapes:
        if shape.elements <= variants.AGREEMENT_MAX_ELEMENTS:
            variants.check_agreement(shape, args.device)
    rows = run(shapes, args.device, budget)

    text = [f"# {title}", "", "## Forward + backward (loss.backward())", "",
            table(rows, "forward+backward"), "", "## Forward alone (no_grad)", "",
            table(rows, "forward"), "", "## The contract's CPU rows (docs/contract.md §8)", "",
            verdicts(rows) or "(none in grid)"]
    report = "\n".join(text)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    grid_name = "full" if args.full else "smoke" if args.smoke else "quick"
    stem = os.path.join(args.out, f"report-{args.device}-{grid_name}-{machine}")
    with open(stem + ".json", "w") as f:
        json.dump({"title": title, "machine": machine, "device": args.device,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "python": platform.python_version(), "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    plot(rows, stem + ".png", title)
    print(f"\nwrote {stem}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
