"""The paper's experiments on digits: methods x noise kinds x noise rates x seeds, and the reports.

``run_grid`` trains every method on every setting (one CE warm-up per setting and seed, shared
by CE, FW, LCCN and DMI, as in the paper where they start from the CE model) and returns one
record per run. ``summarise``, ``markdown_table`` and ``plot_accuracy`` turn the records into the
mean and standard deviation over seeds, a markdown table per noise kind, and a figure of test
accuracy against the noise rate with one panel per noise kind, like the paper's figures.
"""

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__
from .data import DIGIT_PAIRS, NOISE_KINDS, load_dataset, make_splits, noise_transition
from .methods import METHODS, WARM_STARTED, run_method, warm_up
from .train import TrainConfig, process_device, tqdm

RATES = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 ... 0.9, as in the paper


@dataclass(frozen=True)
class Grid:
    methods: Tuple[str, ...]
    noise_kinds: Tuple[str, ...]
    rates: Tuple[float, ...]
    seeds: Tuple[int, ...]
    data: Optional[str] = None  # a user's file for every noise kind; None: digits
    test_data: Optional[str] = None  # its clean test file, if any
    pairs: Optional[Tuple[Tuple[int, int], ...]] = None  # pair flips on ``data``

    @property
    def settings(self) -> int:
        return len(self.noise_kinds) * len(self.rates) * len(self.seeds)


FULL_GRID = Grid(METHODS, tuple(NOISE_KINDS), RATES, tuple(range(5)))
# The headline of the paper in a few minutes: the class-dependent noise where L_DMI should win.
# Same seeds and settings as the full grid, so its numbers are a subset of the full run's.
QUICK_GRID = Grid(METHODS, ("pairflip", "binary3"), (0.0, 0.5, 0.7, 0.9), tuple(range(5)))

NOISE_TITLES = {
    "uniform": "uniform noise (digits, 10 classes)",
    "pairflip": "pair flips " + ", ".join(f"{a}→{b}" for a, b in DIGIT_PAIRS) + " (digits)",
    "binary1": "binary case (1): symmetric (digit 0 vs rest)",
    "binary2": "binary case (2): 0 → rest (digit 0 vs rest)",
    "binary3": "binary case (3): rest → 0 (digit 0 vs rest)",
}
BINARY_CASES = {"binary1": "(1): symmetric", "binary2": "(2): 0 → 1", "binary3": "(3): 1 → 0"}


def noise_titles(grid: Grid) -> Dict[str, str]:
    """A heading per noise kind: the digits grid's, or for a user's file its name and pairs."""
    if grid.data is None:
        return NOISE_TITLES
    name = os.path.basename(grid.data)
    pairs = ", ".join(f"{a}→{b}" for a, b in grid.pairs or ())
    return {"uniform": f"uniform noise ({name})", "pairflip": f"pair flips {pairs} ({name})",
            **{kind: f"binary case {case} ({name})" for kind, case in BINARY_CASES.items()}}


METHOD_LABELS = {"ce": "CE", "fw": "FW", "gce": "GCE", "lccn": "LCCN", "dmi": "DMI"}


def run_grid(grid: Grid, config: TrainConfig, progress: bool = False, dataset=None,
             test=None) -> List[dict]:
    """Trains every method of ``grid`` on every setting; one JSON-ready record per run.

    ``dataset`` (and its clean ``test`` set, if any): the data of every noise kind, loaded from
    ``grid.data``; None: the digits datasets of ``NOISE_KINDS``.
    """
    for method in grid.methods:
        if method not in METHODS:
            raise ValueError(f"argument 'methods' has {method!r}, expected some of {METHODS}")
    for kind in grid.noise_kinds:
        if kind not in NOISE_KINDS:
            raise ValueError(f"argument 'noise' has {kind!r}, expected some of "
                             f"{tuple(NOISE_KINDS)}")
    if dataset is None and grid.data is not None:
        dataset = load_dataset(grid.data)
    if dataset is not None:
        datasets = {NOISE_KINDS[k]: dataset for k in grid.noise_kinds}
    else:
        datasets = {name: load_dataset(name) for name in sorted(set(NOISE_KINDS[k]
                                                                    for k in grid.noise_kinds))}
    records = []
    # Settings with the same matrix (r = 0 of every kind of one dataset) are trained once.
    trained: Dict[Tuple[str, bytes, int], List[dict]] = {}
    bar = tqdm(total=grid.settings, desc="reproduce", disable=not progress) if tqdm else None
    for kind in grid.noise_kinds:
        dataset = datasets[NOISE_KINDS[kind]]
        for rate in grid.rates:
            T = noise_transition(kind, dataset.num_classes, rate, grid.pairs or DIGIT_PAIRS)
            for seed in grid.seeds:
                if bar is not None:
                    bar.set_postfix_str(f"{kind} r={rate} seed={seed}")
                key = (dataset.name, T.tobytes(), seed)
                if key not in trained:
                    trained[key] = _train_setting(dataset, T, seed, grid.methods, config, test)
                records += [{"noise": kind, "rate": rate, **run} for run in trained[key]]
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return records


def _train_setting(dataset, T, seed: int, methods: Sequence[str], config: TrainConfig,
                   test=None) -> List[dict]:
    """Every method on one noisy split, sharing one CE warm-up."""
    splits = make_splits(dataset, T, seed, config.val_fraction, config.test_fraction,
                         config.inputs, test)
    splits = splits.to(process_device(config.device))
    warm = warm_up(splits, config, seed) if set(methods) & set(WARM_STARTED) else None
    runs = []
    for method in methods:
        result = run_method(method, splits, config, seed, warm_start=warm)
        runs.append({
            "seed": seed, "method": method, "dataset": dataset.name,
            "test_accuracy": result.test_accuracy,
            "train_noise_rate": splits.train.noise_rate,
            "val_noise_rate": splits.val.noise_rate,
            "phases": phase_records(result.phases),
            "estimated_transition": result.estimated_transition,
            "decision": result.decision,
        })
    return runs


def finite_or_none(value: float) -> Optional[float]:
    """inf (e.g. every validation matrix singular) and NaN are stored as null."""
    return value if math.isfinite(value) else None


def phase_records(phases) -> List[dict]:
    """The per-epoch curves of a run's phases (index 0: before training), JSON-ready."""
    return [{"name": log.name, "best_epoch": log.best_epoch,
             "best_criterion": finite_or_none(log.best_criterion),
             "skipped_batches": log.skipped_batches,
             "train_loss": [None if v is None else finite_or_none(v) for v in log.train_loss],
             "val_criterion": [finite_or_none(v) for v in log.val_criterion]}
            for log in phases]


def summarise(records: Sequence[dict]) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """noise kind -> rate (as text) -> method -> mean, std (over seeds, ddof 0), n, and the
    mean realised training noise rate."""
    groups: Dict[Tuple[str, float, str], List[dict]] = {}
    for record in records:
        groups.setdefault((record["noise"], record["rate"], record["method"]), []).append(record)
    summary: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for (kind, rate, method), runs in groups.items():
        accuracies = np.array([run["test_accuracy"] for run in runs])
        summary.setdefault(kind, {}).setdefault(f"{rate:.1f}", {})[method] = {
            "mean": float(accuracies.mean()), "std": float(accuracies.std()), "n": len(runs),
            "train_noise_rate": float(np.mean([run["train_noise_rate"] for run in runs])),
        }
    return summary


def markdown_table(summary: dict, methods: Sequence[str],
                   titles: Dict[str, str] = NOISE_TITLES) -> str:
    """One table per noise kind: rows = noise rate, columns = methods, mean ± std of test
    accuracy (%) over seeds, the best mean in bold."""
    lines = []
    for kind, by_rate in summary.items():
        lines += [f"### {titles.get(kind, kind)}", "",
                  "| r | realised | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
                  "|---|---|" + "---|" * len(methods)]
        for rate, by_method in sorted(by_rate.items(), key=lambda item: float(item[0])):
            present = [m for m in methods if m in by_method]
            best = max(by_method[m]["mean"] for m in present)
            cells = []
            for method in methods:
                if method not in by_method:
                    cells.append("")
                    continue
                stats = by_method[method]
                text = f"{stats['mean']:.1f} ± {stats['std']:.1f}"
                cells.append(f"**{text}**" if stats["mean"] == best else text)
            realised = by_method[present[0]]["train_noise_rate"]
            lines.append(f"| {rate} | {100 * realised:.1f}% | " + " | ".join(cells) + " |")
        n = next(iter(next(iter(by_rate.values())).values()))["n"]
        lines += ["", f"Test accuracy (%), clean test labels, mean ± std over {n} seeds; "
                      "'realised' is the fraction of training labels the noise changed.", ""]
    return "\n".join(lines)


def plot_accuracy(summary: dict, methods: Sequence[str], path: str,
                  titles: Dict[str, str] = NOISE_TITLES) -> None:
    """Test accuracy against r, one panel per noise kind, one line per method (± std band)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    kinds = list(summary)
    columns = min(3, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows),
                                squeeze=False)
    for axis, kind in zip(axes.flat, kinds):
        rates = sorted(summary[kind], key=float)
        for method in methods:
            points = [(float(r), summary[kind][r][method]) for r in rates
                      if method in summary[kind][r]]
            if not points:
                continue
            x = np.array([p[0] for p in points])
            mean = np.array([p[1]["mean"] for p in points])
            std = np.array([p[1]["std"] for p in points])
            line, = axis.plot(x, mean, marker="o", markersize=3, label=METHOD_LABELS[method],
                              linewidth=2.2 if method == "dmi" else 1.2)
            axis.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        axis.set_title(titles.get(kind, kind), fontsize=9)
        axis.set_xlabel("noise rate r")
        axis.set_ylabel("test accuracy (%)")
        axis.set_ylim(0, 101)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(kinds):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(records: List[dict], grid: Grid, config: TrainConfig, out_dir: str,
                  wall_seconds: float, threads: int) -> Dict[str, Optional[str]]:
    """Writes results.json, results.md and accuracy.png into ``out_dir``; returns their paths
    (the plot's is None, with a note in the table, when matplotlib is not installed)."""
    os.makedirs(out_dir, exist_ok=True)
    summary = summarise(records)
    paths = {name: os.path.join(out_dir, name)
             for name in ("results.json", "results.md", "accuracy.png")}
    environment = {"python": platform.python_version(), "torch": torch.__version__,
                   "machine": platform.machine(), "processor": platform.processor(),
                   "cpu_count": os.cpu_count(), "torch_threads": threads}
    with open(paths["results.json"], "w") as handle:
        json.dump({"dmi_ext_version": __version__, "grid": asdict(grid), "config": config.to_dict(), "environment": environment,
                   "wall_seconds": wall_seconds, "summary": summary, "runs": records},
                  handle, indent=1, allow_nan=False)
    table = markdown_table(summary, grid.methods, noise_titles(grid))
    try:
        plot_accuracy(summary, grid.methods, paths["accuracy.png"], noise_titles(grid))
    except ImportError:
        paths["accuracy.png"] = None
        table += "\n(No plot: matplotlib is not installed.)\n"
    with open(paths["results.md"], "w") as handle:
        handle.write(table)
    return paths


def reproduce(grid: Grid, config: TrainConfig, out_dir: str, *, threads: int,
              progress: bool = False, dataset=None, test=None) -> Dict[str, Optional[str]]:
    start = time.perf_counter()
    records = run_grid(grid, config, progress, dataset, test)
    return write_reports(records, grid, config, out_dir, time.perf_counter() - start, threads)
