"""Where the CPU time goes: each stage of the op called directly (no autograd node, no Python
wrapper), per input element, on one thread and on two, against F.cross_entropy forward + backward
on the same logits.

    python -m benchmarks.kernels                       # N = 8192 (C = 10, 100), N = 10^6 (C = 10)
    python -m benchmarks.kernels --shapes 8192x10 --threads 1 --budget 0.5
    python -m benchmarks.kernels --callgrind           # instruction counts per stage, one thread

Against another build (e.g. a git worktree of an older commit built with `python setup.py
build_ext --inplace`): put that build's dmi_ext first on PYTHONPATH, this benchmarks package
after it; docs/results/speed-issue23.md has such a comparison.

The stages: joint (softmax and the accumulation of the joint matrix U), lu_loss (the LU
factorisation, log|det U| and the grad table, from a given U), dmi (the fused forward: both, with
the grad table a backward needs), dmi_backward (the gradient from the grad table). Then "fused"
= dmi + dmi_backward, what one training step pays in kernels, and "cross-entropy" =
F.cross_entropy(z, y).backward() on the same logits, through autograd as a user calls it.
Timings: wall-clock medians of interleaved rounds after warm-up (benchmarks.report.measure); a
thread count is measured as a block, every stage interleaved within it. The callgrind mode
re-runs this module under valgrind (one thread; a few minutes) and reads the inclusive instruction
count of each stage's CPU entry point; it is robust to the load of a shared machine where timings
are not.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

import dmi_ext  # noqa: F401  (registers torch.ops.dmi_ext)
from benchmarks.report import Timer, measure

SHAPES = [(8192, 10), (8192, 100), (10**6, 10)]
STAGES = ("joint", "lu_loss", "dmi", "dmi_backward")
# Where callgrind finds each stage: the C++ entry point on the CPU (csrc/cpu/), and for
# cross-entropy the Python binding of F.cross_entropy plus the autograd engine's backward.
ENTRY_POINTS = {"joint": ("::joint_cpu(",), "lu_loss": ("::lu_loss_cpu(",),
                "dmi": ("::dmi_cpu(",), "dmi_backward": ("::dmi_backward_cpu(",),
                "cross-entropy": ("::THPVariable_cross_entropy_loss(", "::PythonEngine::execute(")}
IGNORE_INDEX = -100


def parse_shape(text):
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 2:
        raise argparse.ArgumentTypeError(
            f"argument --shapes: expected NxC with N >= 1 and C >= 2 (e.g. 8192x10), got {text!r}")
    return int(match[1]), int(match[2])


def stage_callables(N, C, seed=0):
    """name -> a no-argument function for each stage and for cross-entropy, on the same logits."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    ops = torch.ops.dmi_ext
    # need_grad_table=True where the schema has it: an older build (one from before the numerics
    # change, say, on PYTHONPATH in place of this checkout's dmi_ext) has no such argument.
    # Likewise save_probs (the forward keeps the softmax for the backward, what the autograd
    # kernel asks for): "dmi" and "dmi_backward" are then the two halves of a training step.
    arguments = [a.name for a in ops.dmi.default._schema.arguments]
    flags = tuple(True for name in ("need_grad_table", "save_probs") if name in arguments)
    with torch.no_grad():
        sums, counts = ops.joint.default(z, y, True, IGNORE_INDEX, True)
        out = ops.dmi.default(z, y, True, True, 0.0, IGNORE_INDEX, 1, True, *flags)
    loss, table = out[0], out[3]
    saved = (out[4],) if len(out) > 4 else ()
    grad_loss = torch.ones_like(loss)
    zg = z.clone().requires_grad_(True)

    def cross_entropy():
        zg.grad = None
        F.cross_entropy(zg, y).backward()

    fns = {
        "joint": lambda: ops.joint.default(z, y, True, IGNORE_INDEX, True),
        "lu_loss": lambda: ops.lu_loss.default(sums, counts, True, 0.0),
        "dmi": lambda: ops.dmi.default(z, y, True, True, 0.0, IGNORE_INDEX, 1, True, *flags),
        "dmi_backward": lambda: ops.dmi_backward.default(grad_loss, z, y, table, True,
                                                         IGNORE_INDEX, 1, *saved),
        "cross-entropy": cross_entropy,
    }

    def no_grad(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    return {name: (fn if name == "cross-entropy" else no_grad(fn)) for name, fn in fns.items()}


def measure_shape(N, C, threads, budget_s):
    """{threads: {stage: median seconds}} for one shape; "fused" = dmi + dmi_backward."""
    fns = stage_callables(N, C)
    out = {}
    saved = torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            medians, _ = measure(fns, Timer("cpu"), budget_s)
            medians["fused"] = medians["dmi"] + medians["dmi_backward"]
            out[t] = medians
    finally:
        torch.set_num_threads(saved)
    return out


def table(N, C, medians):
    """Markdown: one row per stage, per thread count ns per element, us per call, and /CE."""
    threads = list(medians)
    head = "| stage | " + " | ".join(f"{t}t ns/elem | {t}t us/call | {t}t /CE" for t in threads) + " |"
    lines = [f"N={N} C={C}", "", head, "|" + "---|" * (1 + 3 * len(threads))]
    for stage in (*STAGES, "fused", "cross-entropy"):
        cells = []
        for t in threads:
            s = medians[t][stage]
            cells.append(f"{s * 1e9 / (N * C):.2f} | {s * 1e6:.1f} | "
                         f"{s / medians[t]['cross-entropy']:.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(shapes, threads, budget_s):
    blocks = []
    for N, C in shapes:
        blocks.append(table(N, C, measure_shape(N, C, threads, budget_s)))
        print(f"  measured N={N} C={C}", file=sys.stderr, flush=True)
    return "\n\n".join(blocks)


# ---- callgrind mode -------------------------------------------------------------------------

CALLGRIND_CALLS = 3  # measured calls of each stage per shape, after one untimed call


def callgrind_child(shapes):
    """Under valgrind: per shape, one warm-up call of each stage, a dump, then CALLGRIND_CALLS
    calls of each, a dump. os.getppid() is the dump trigger (--dump-before=getppid)."""
    torch.set_num_threads(1)
    for N, C in shapes:
        fns = stage_callables(N, C)
        for fn in fns.values():
            fn()
        os.getppid()
        for fn in fns.values():
            for _ in range(CALLGRIND_CALLS):
                fn()
        os.getppid()


def inclusive_counts(path):
    """stage -> inclusive instructions in one callgrind dump, from callgrind_annotate: per name of
    ENTRY_POINTS the largest count of a function whose name holds it (an entry point's own
    lambdas hold its name too, and count less), summed over the names."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                          check=True, capture_output=True, text=True).stdout
    best = {}
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+)\s", line)
        if not m:
            continue
        for names in ENTRY_POINTS.values():
            for name in names:
                if name in line:
                    best[name] = max(best.get(name, 0), int(m[1].replace(",", "")))
    return {stage: sum(best[n] for n in names) for stage, names in ENTRY_POINTS.items()
            if all(n in best for n in names)}


def callgrind(shapes):
    """Runs callgrind_child under valgrind and prints instructions per stage and per element."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        spec = ",".join(f"{N}x{C}" for N, C in shapes)
        cmd = ["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={out}.%p",
               sys.executable, "-m", "benchmarks.kernels", "--callgrind-child", "--shapes", spec]
        print("  " + " ".join(cmd) + "  (minutes)", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(glob.glob(out + ".*.*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        if len(dumps) != 2 * len(shapes):
            raise RuntimeError(f"callgrind wrote {len(dumps)} dumps, expected "
                               f"{2 * len(shapes)} (two per shape): {dumps}")
        stages = (*STAGES, "cross-entropy")
        lines = [f"one thread, instructions per call (mean of {CALLGRIND_CALLS}, after one "
                 "untimed call) and per input element, inclusive of everything each entry point "
                 "calls; cross-entropy: F.cross_entropy's binding + the autograd engine's "
                 "backward", "",
                 "| shape | " + " | ".join(f"{s} instr | {s} /elem" for s in stages) + " |",
                 "|" + "---|" * (1 + 2 * len(stages))]
        for i, (N, C) in enumerate(shapes):
            counts = inclusive_counts(dumps[2 * i + 1])  # the dump after the measured calls
            cells = []
            for stage in stages:
                n = counts.get(stage)
                cells.append("? | ?" if n is None else
                             f"{n / CALLGRIND_CALLS:,.0f} | {n / CALLGRIND_CALLS / (N * C):.1f}")
            lines.append(f"| N={N} C={C} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=lambda s: [parse_shape(p) for p in s.split(",")],
                        default=SHAPES, help="comma-separated NxC (default 8192x10,8192x100,"
                                             "1000000x10)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts, each measured as a block (default 1 2)")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of timing per shape and thread count (default 2)")
    parser.add_argument("--callgrind", action="store_true",
                        help="instruction counts per stage under valgrind instead of timings")
    parser.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bad = [t for t in args.threads if t < 1]
    if bad:
        parser.error(f"argument --threads: thread counts must be >= 1, got {bad[0]}")
    if args.budget <= 0:
        parser.error(f"argument --budget: must be > 0, got {args.budget}")
    if args.callgrind_child:
        callgrind_child(args.shapes)
        return
    if args.callgrind:
        print(callgrind(args.shapes))
        return
    from benchmarks.report import omp_note

    print(f"torch {torch.__version__}{omp_note()}; wall-clock medians of interleaved rounds, per thread count; "
          "ns per input element (N x C), us per call, and the ratio to cross-entropy "
          "forward + backward on the same logits\n")
    print(run(args.shapes, args.threads, args.budget))


if __name__ == "__main__":
    main()
