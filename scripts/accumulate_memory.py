"""Memory and time of DMIAccumulator against one graph over the whole batch (docs/many_classes.md).

Each variant runs in a fresh process (so peak RSS is its own): a forward + backward of L_DMI over
N rows through an MLP (D -> H -> H -> C, dropout), either as one graph (``dmi_loss(model(x), y)``)
or with ``DMIAccumulator`` in micro-batches of M rows. Reported per variant: the peak bytes of
tensors saved for backward (the activations graphs hold, counted with saved_tensors_hooks), the
growth of the process's peak RSS over its state just before the step, and the median time of a
few steps. One thread.

    python scripts/accumulate_memory.py              # N = 8192, M = 512 and 1024, H = 2048
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class SavedBytes:
    def __init__(self):
        self.alive = self.peak = 0

    def __enter__(self):
        meter = self

        class Saved:
            def __init__(self, t):
                self.t, self.nbytes = t, t.numel() * t.element_size()
                meter.alive += self.nbytes
                meter.peak = max(meter.peak, meter.alive)

            def __del__(self):
                meter.alive -= self.nbytes

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def child(args):
    import dmi_ext

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.D, args.H), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(args.H, args.H), nn.ReLU(), nn.Linear(args.H, args.C))
    x = torch.randn(args.N, args.D)
    y = torch.arange(args.N) % args.C

    def step():
        if args.micro == 0:
            dmi_ext.dmi_loss(model(x), y).backward()
        else:
            dmi_ext.DMIAccumulator().backward(model, x.split(args.micro), y.split(args.micro))

    # A small step first: library start-up (MKL, the op's first call) is not the step's memory.
    dmi_ext.DMIAccumulator().backward(model, x[:256].split(128), y[:256].split(128))
    dmi_ext.dmi_loss(model(x[:256]), y[:256]).backward()
    model.zero_grad(set_to_none=True)
    base = rss_mib()
    with SavedBytes() as saved:
        step()
    grown = rss_mib() - base
    times = []
    for _ in range(args.repeats):
        model.zero_grad()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"micro": args.micro, "saved_mib": saved.peak / 2**20,
                      "rss_growth_mib": grown, "seconds": statistics.median(times)}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--N", type=int, default=8192)
    parser.add_argument("--D", type=int, default=64)
    parser.add_argument("--H", type=int, default=2048)
    parser.add_argument("--C", type=int, default=100)
    parser.add_argument("--micro", type=int, nargs="+", default=[0, 1024, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.micro = args.micro[0]
        return child(args)
    print(f"N = {args.N}, MLP {args.D} -> {args.H} -> {args.H} -> {args.C} with dropout, "
          f"float32, 1 thread, torch {torch.__version__}")
    print("| variant | saved for backward, peak MiB | peak RSS growth MiB | seconds per step |")
    print("|---|---|---|---|")
    for micro in args.micro:
        out = subprocess.run([sys.executable, __file__, "--child", "--N", str(args.N),
                              "--D", str(args.D), "--H", str(args.H), "--C", str(args.C),
                              "--micro", str(micro), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        name = "one graph" if micro == 0 else f"DMIAccumulator, micro-batches of {micro}"
        print(f"| {name} | {r['saved_mib']:.1f} | {r['rss_growth_mib']:.1f} | "
              f"{r['seconds']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
