"""The 100-class benchmark of docs/many_classes.md: digits-pairs, tens-digit flips at rate r.

Compares CE, FW, GCE, LCCN and DMI as the toolkit trains them (batch 128: with 100 classes
nearly every batch of 128 misses a class, so L_DMI is +inf and the batch is skipped) against two
ways of giving L_DMI a usable U: a large virtual batch done in micro-batches of 128 with
``dmi_ext.DMIAccumulator``, and batches of 128 drawn by ``dmi_ext.ClassCoveringBatchSampler``.
Every DMI variant starts from the same CE warm-up and keeps the epoch with the lowest L_DMI on
the noisy validation split (of the whole split: 67 pairs per class). Writes results.json,
results.md and accuracy.png to --out; one thread, so the same seeds give the same numbers.

    python scripts/many_classes.py --out docs/results/many_classes         # 5 seeds
    python scripts/many_classes.py --seeds 1 --out /tmp/mc                 # a quick look
"""

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dmi_ext  # noqa: E402
from dmi_ext.toolkit.data import load_dataset, make_splits, noise_transition  # noqa: E402
from dmi_ext.toolkit.methods import METHODS, new_model, run_method, warm_up  # noqa: E402
from dmi_ext.toolkit.models import predict_logits  # noqa: E402
from dmi_ext.toolkit.train import (Batches, Phase, TrainConfig, accuracy,  # noqa: E402
                                   derived_seed, finite_or_inf, fit)


def dmi_criterion(logits, y) -> float:
    return float(dmi_ext.dmi_loss(logits, y))


def train_virtual_batch(model, splits, config, seed, virtual, micro, epochs, lr):
    """L_DMI over virtual batches of ``virtual`` rows, each done in micro-batches of ``micro``
    rows with DMIAccumulator; Adam; the epoch with the lowest validation L_DMI is kept."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.weight_decay,
                                 foreach=True)
    accumulator = dmi_ext.DMIAccumulator()
    batches = Batches(splits.train.x, splits.train.y, virtual, derived_seed(seed, "dmi-virtual"))

    def validate():
        model.eval()
        return finite_or_inf(dmi_criterion(predict_logits(model, splits.val.x), splits.val.y))

    history = [validate()]
    best_epoch, best_state, skipped = 0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, epochs + 1):
        model.train()
        for x, y, _ in batches:
            optimizer.zero_grad(set_to_none=True)
            loss, info = accumulator.backward(model, x.split(micro), y.split(micro))
            if not dmi_ext.should_step(loss, info):
                skipped += 1
                continue
            optimizer.step()
        history.append(validate())
        if history[-1] < history[best_epoch]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return {"best_epoch": best_epoch, "skipped_batches": skipped, "val_dmi": history}


class CoveringLoader:
    """(x, y, index) batches from ClassCoveringBatchSampler, a new draw every epoch."""

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y = x, y
        self.sampler = dmi_ext.ClassCoveringBatchSampler(y, batch_size, seed=seed)
        self.epoch = 0

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.sampler:
            index = torch.as_tensor(batch)
            yield self.x[index], self.y[index], index


def run_seed(seed, rate, config, args):
    dataset = load_dataset("digits-pairs")
    T = noise_transition("digitflip", dataset.num_classes, rate)
    splits = make_splits(dataset, T, seed, config.val_fraction, config.test_fraction)
    out = {"seed": seed, "train_noise_rate": splits.train.noise_rate}
    start = time.perf_counter()
    warm = warm_up(splits, config, seed)
    out["seconds_warm_up"] = time.perf_counter() - start
    for method in METHODS:
        start = time.perf_counter()
        result = run_method(method, splits, config, seed, warm_start=warm)
        out[method] = result.test_accuracy
        out[f"{method}_seconds"] = time.perf_counter() - start
        if method == "dmi":
            out["dmi_skipped_batches"] = result.phases[-1].skipped_batches
            out["dmi_batches"] = config.dmi_epochs * max(1, len(splits.train.y)
                                                         // config.dmi_batch_size)
    # L_DMI on a virtual batch, in micro-batches of 128
    model = new_model(splits, config, seed)
    model.load_state_dict(warm[0])
    start = time.perf_counter()
    log = train_virtual_batch(model, splits, config, seed, args.virtual_batch, 128,
                              args.virtual_epochs, args.virtual_lr)
    out["dmi_virtual"] = accuracy(model, splits.test.x, splits.test.y)
    out["dmi_virtual_seconds"] = time.perf_counter() - start
    out["dmi_virtual_log"] = log
    # L_DMI on class-covering batches
    for size in args.covering_batch:
        model = new_model(splits, config, seed)
        model.load_state_dict(warm[0])
        loader = CoveringLoader(splits.train.x, splits.train.y, size,
                                derived_seed(seed, "dmi-covering"))
        start = time.perf_counter()
        phase_log = fit(model, Phase("dmi", dmi_ext.DMILoss(), config.dmi_epochs,
                                     config.dmi_lr),
                        loader, splits.val.x, splits.val.y, weight_decay=config.weight_decay)
        key = f"dmi_covering_{size}"
        out[key] = accuracy(model, splits.test.x, splits.test.y)
        out[f"{key}_seconds"] = time.perf_counter() - start
        out[f"{key}_skipped_batches"] = phase_log.skipped_batches
        out[f"{key}_batches"] = len(loader) * config.dmi_epochs
        out[f"{key}_best_epoch"] = phase_log.best_epoch
    out["ce_best_epoch"] = warm[1].best_epoch
    return out


BASE_COLUMNS = [("ce", "CE"), ("fw", "FW"), ("gce", "GCE"), ("lccn", "LCCN"),
                ("dmi", "DMI, batch 128"), ("dmi_virtual", "DMI, virtual batch")]


def columns(args):
    return BASE_COLUMNS + [(f"dmi_covering_{size}", f"DMI, class-covering {size}")
                           for size in args.covering_batch]


def write(rows, args, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    COLUMNS = columns(args)
    summary = {key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
               for key, _ in COLUMNS}
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump({"rate": args.rate, "virtual_batch": args.virtual_batch,
                   "virtual_epochs": args.virtual_epochs, "virtual_lr": args.virtual_lr,
                   "covering_batch": args.covering_batch, "torch": torch.__version__,
                   "summary": summary, "runs": rows}, handle, indent=1)
    header = "| digits-pairs, tens digit flipped, r = %.1f | " % args.rate
    lines = [header + " | ".join(name for _, name in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS),
             "| test accuracy (%%), %d seeds | " % len(rows)
             + " | ".join("%.1f ± %.1f" % summary[key] for key, _ in COLUMNS) + " |"]
    nan = sum(not math.isfinite(r[key]) for r in rows for key, _ in COLUMNS)
    skipped = "; ".join(
        f"class-covering {size}: {sum(r[f'dmi_covering_{size}_skipped_batches'] for r in rows)}"
        f" of {sum(r[f'dmi_covering_{size}_batches'] for r in rows)}"
        for size in args.covering_batch)
    lines += ["", f"Virtual batch: {args.virtual_batch} rows in micro-batches of 128 "
              f"({args.virtual_epochs} epochs, Adam lr {args.virtual_lr}). Batches skipped "
              f"(U singular): DMI at batch 128 {sum(r['dmi_skipped_batches'] for r in rows)} "
              f"of {sum(r['dmi_batches'] for r in rows)}; {skipped}. "
              f"Non-finite accuracies: {nan}."]
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 3.6))
    means = [summary[key][0] for key, _ in COLUMNS]
    stds = [summary[key][1] for key, _ in COLUMNS]
    colors = ["#888"] * 5 + ["#c44"] + ["#48c"] * len(args.covering_batch)
    ax.bar(range(len(COLUMNS)), means, yerr=stds, color=colors, capsize=4)
    for k, key in enumerate(key for key, _ in COLUMNS):
        ax.scatter([k] * len(rows), [r[key] for r in rows], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(COLUMNS)),
                  [name.replace(", ", "\n").replace("class-covering ", "class-\ncovering ")
                   for _, name in COLUMNS], fontsize=8)
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title(f"digits-pairs (100 classes), tens digit flipped, r = {args.rate}, "
                 f"{len(rows)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/many_classes")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--virtual-batch", type=int, default=2048)
    parser.add_argument("--virtual-epochs", type=int, default=30)
    parser.add_argument("--virtual-lr", type=float, default=1e-3)
    parser.add_argument("--covering-batch", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--replot", action="store_true",
                        help="rewrite results.md and accuracy.png from --out's results.json")
    args = parser.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as handle:
            saved = json.load(handle)
        for key in ("rate", "virtual_batch", "virtual_epochs", "virtual_lr", "covering_batch"):
            setattr(args, key, saved[key])
        return write(saved["runs"], args, args.out)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    # dmi_batch_size: the batch the baselines train with; inputs: the scaling of the recorded
    # results (docs/many_classes.md), measured before 'standardize-floor' became the default.
    config = TrainConfig(dmi_batch_size=128, inputs="standardize")
    rows = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        rows.append(run_seed(seed, args.rate, config, args))
        print(f"seed {seed} ({time.perf_counter() - start:.0f} s): "
              + ", ".join(f"{name} {rows[-1][key]:.1f}" for key, name in columns(args)),
              flush=True)
        write(rows, args, args.out)
    with open(os.path.join(args.out, "results.md")) as handle:
        print(handle.read())


if __name__ == "__main__":
    main()
