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
rows of the contract (docs/contract.md §8) that the grid covers, each with its verdict. Then (CPU)
one training step of the toolkit's MLP and CNN on digits-shaped input, cross-entropy against
L_DMI at the toolkit's batch sizes, with the issue's verdict (L_DMI within 1.1x of CE for the
MLP); skipped when the toolkit's optional dependencies are missing. It writes
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


def omp_note() -> str:
    """The OpenMP wait policy when one is set. On a loaded machine it decides the multi-threaded
    timings of PyTorch's own ops: spinning worker threads (the default) then compete with the
    thread that has the work (once: torch.softmax of 128 x 10 on 2 threads 12 ms, 26 us with
    OMP_WAIT_POLICY=passive)."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    return f", OMP_WAIT_POLICY={policy}" if policy else ""


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
    ce_target = y.reshape(-1)
    if y.dim() == 2 and z.dim() == 2:  # M label sources: cross-entropy against each of them
        ce_input = lambda x: x.expand(y.shape[0], *x.shape).reshape(-1, C)  # noqa: E731
    else:
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


# The training-step section: the toolkit's networks on digits-shaped input (8 x 8 images, 10
# classes), one optimiser step with cross-entropy against one with L_DMI.
STEP_SAMPLE_SHAPE = (8, 8)
STEP_CLASSES = 10
STEP_MODELS = ("mlp", "cnn")
# The acceptance (issue 23): L_DMI within 1.1x of cross-entropy for the MLP.
STEP_BOUND = 1.1


def toolkit_config():
    """The toolkit's defaults (dmi_ext.toolkit.train.TrainConfig), or None when the toolkit's
    optional dependencies (numpy, ...) are missing: the rest of the report runs without it."""
    try:
        from dmi_ext.toolkit.models import build_model
        from dmi_ext.toolkit.train import TrainConfig
    except ImportError as e:
        print(f"  training-step section skipped: the toolkit does not import ({e})",
              file=sys.stderr)
        return None
    return TrainConfig(), build_model


def step_callables(model_name, config, build_model, seed=0):
    """(loss, batch size) -> one training step as the toolkit runs it (zero_grad, forward, loss,
    backward, Adam step), for cross-entropy at both of the toolkit's batch sizes and L_DMI at both:
    --batch-size (CE's) and --dmi-batch-size (L_DMI's). Random data of digits' shape: the shapes
    set the cost. Every class appears in every batch, so L_DMI is finite."""
    import dmi_ext

    fns = {}
    for batch in sorted({config.batch_size, config.dmi_batch_size}):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *STEP_SAMPLE_SHAPE, generator=g)
        y = torch.randint(0, STEP_CLASSES, (batch,), generator=g)
        y[:STEP_CLASSES] = torch.arange(STEP_CLASSES)
        for loss_name, loss_fn, lr in (("cross-entropy", F.cross_entropy, config.ce_lr),
                                       ("L_DMI", dmi_ext.dmi_loss, config.dmi_lr)):
            torch.manual_seed(seed)
            model = build_model(model_name, STEP_SAMPLE_SHAPE, STEP_CLASSES, config.hidden)
            model.train()
            optimizer = torch.optim.Adam(model.parameters(), lr=lr,
                                         weight_decay=config.weight_decay, foreach=True)

            def step(model=model, optimizer=optimizer, loss_fn=loss_fn, x=x, y=y):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()

            fns[(loss_name, batch)] = step
    return fns


def run_steps(budget_s, models=STEP_MODELS):
    """The training-step rows: per model, CE and L_DMI at each of the toolkit's batch sizes, all
    four timed in one interleaved measurement. None when the toolkit does not import."""
    found = toolkit_config()
    if found is None:
        return None
    config, build_model = found
    timer = Timer("cpu")
    rows = []
    for name in models:
        fns = step_callables(name, config, build_model)
        medians, rounds = measure({f"{loss} {batch}": fn for (loss, batch), fn in fns.items()},
                                  timer, budget_s)
        for batch in sorted({b for _, b in fns}):
            rows.append({"model": name, "batch": batch, "rounds": rounds,
                         "median_s": {"cross-entropy": medians[f"cross-entropy {batch}"],
                                      "L_DMI": medians[f"L_DMI {batch}"]}})
        print(f"  measured training step {name}", file=sys.stderr, flush=True)
    return {"batch_size": config.batch_size, "dmi_batch_size": config.dmi_batch_size,
            "hidden": config.hidden, "rows": rows}


def step_table(steps):
    lines = ["| model | batch | cross-entropy ms | L_DMI ms | L_DMI/CE |", "|---|---|---|---|---|"]
    for r in steps["rows"]:
        m = r["median_s"]
        lines.append(f"| {r['model']} | {r['batch']} | {ms(m['cross-entropy'])} | "
                     f"{ms(m['L_DMI'])} | **{m['L_DMI'] / m['cross-entropy']:.2f}** |")
    return "\n".join(lines)


def step_verdicts(steps):
    """The issue's acceptance row for every MLP batch size, then, per model, what an epoch costs
    per sample at the toolkit's own batch sizes (CE at --batch-size, L_DMI at --dmi-batch-size)."""
    lines = []
    for r in steps["rows"]:
        if r["model"] != "mlp":
            continue
        got = r["median_s"]["L_DMI"] / r["median_s"]["cross-entropy"]
        lines.append(f"- L_DMI within {STEP_BOUND}x of CE for the MLP: batch {r['batch']}, "
                     f"L_DMI/CE = {got:.2f} -> "
                     + ("met" if got <= STEP_BOUND else f"MISSED by {got / STEP_BOUND:.2f}x"))
    ce_b, dmi_b = steps["batch_size"], steps["dmi_batch_size"]
    for name in dict.fromkeys(r["model"] for r in steps["rows"]):
        by_batch = {r["batch"]: r["median_s"] for r in steps["rows"] if r["model"] == name}
        ce, dmi = by_batch[ce_b]["cross-entropy"] / ce_b, by_batch[dmi_b]["L_DMI"] / dmi_b
        lines.append(f"- {name}, per sample at the toolkit's batch sizes (CE at {ce_b}, L_DMI at "
                     f"{dmi_b}): CE {ce * 1e6:.2f} us, L_DMI {dmi * 1e6:.2f} us, "
                     f"L_DMI/CE = {dmi / ce:.2f}")
    return "\n".join(lines)


def step_section(steps):
    """The markdown of the training-step section."""
    if steps is None:
        return ["## One training step", "", "(skipped: the toolkit does not import)"]
    return ["## One training step (zero_grad, forward, loss, backward, Adam)", "",
            f"The toolkit's networks (hidden {steps['hidden']}) on digits-shaped input "
            f"({STEP_SAMPLE_SHAPE[0]} x {STEP_SAMPLE_SHAPE[1]}, {STEP_CLASSES} classes, random "
            f"data), at the toolkit's batch sizes: --batch-size {steps['batch_size']} (CE's), "
            f"--dmi-batch-size {steps['dmi_batch_size']} (L_DMI's).", "",
            step_table(steps), "", step_verdicts(steps)]


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
             f"{torch.get_num_threads()} threads{omp_note()}")
    print(title, file=sys.stderr)
    for shape in shapes:
        if shape.elements <= variants.AGREEMENT_MAX_ELEMENTS:
            variants.check_agreement(shape, args.device)
    rows = run(shapes, args.device, budget)
    steps = run_steps(budget) if args.device == "cpu" else None

    text = [f"# {title}", "", "## Forward + backward (loss.backward())", "",
            table(rows, "forward+backward"), "", "## Forward alone (no_grad)", "",
            table(rows, "forward"), "", "## The contract's CPU rows (docs/contract.md §8)", "",
            verdicts(rows) or "(none in grid)", ""]
    if args.device == "cpu":
        text += step_section(steps)
    report = "\n".join(text)
    print(report)
    os.makedirs(args.out, exist_ok=True)
    grid_name = "full" if args.full else "smoke" if args.smoke else "quick"
    stem = os.path.join(args.out, f"report-{args.device}-{grid_name}-{machine}")
    with open(stem + ".json", "w") as f:
        json.dump({"title": title, "machine": machine, "device": args.device,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "python": platform.python_version(),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows,
                   "training_step": steps}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    plot(rows, stem + ".png", title)
    print(f"\nwrote {stem}.json, .md, .png", file=sys.stderr)


if __name__ == "__main__":
    main()
