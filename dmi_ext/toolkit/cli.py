"""``python -m dmi_ext``: the ``train`` and ``reproduce`` commands.

``train`` runs one method on one noise setting for several seeds and prints the clean test
accuracy (mean ± std), in one process or data-parallel in ``--nproc`` processes; ``reproduce``
runs the paper's grid on digits (or on a user's file) and writes a JSON file, a markdown table and
a plot. Both expose every ``TrainConfig`` hyperparameter as an option (``--device`` among them),
fix the number of CPU threads (same seed, same threads -> same numbers), show progress bars, and
check every setting, file and output path before anything is trained.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__
from .data import (DIGIT_FLIP, DIGIT_PAIRS, INPUT_SCALINGS, NOISE_KINDS, DataNote,
                   align_test_set, default_pairs, load_dataset, make_splits, noise_transition)
from .methods import DMI_RULES, DMI_STARTS, FW_TRANSITIONS, METHODS, run_method
from .models import MODELS
from .parallel import rank_and_world, run_data_parallel
from .reproduce import FULL_GRID, QUICK_GRID, Grid, phase_records, reproduce
from .train import DEVICES, TrainConfig, resolve_device

NOISE_CHOICES = ("none", *NOISE_KINDS, DIGIT_FLIP, "matrix")
CHOICES = {"model": MODELS, "fw_transition": FW_TRANSITIONS, "inputs": INPUT_SCALINGS,
           "dmi_start": DMI_STARTS, "dmi_rule": DMI_RULES, "device": DEVICES}


def _pairs(text: str) -> Tuple[Tuple[int, int], ...]:
    """'7:1,3:8' -> ((7, 1), (3, 8))."""
    try:
        return tuple(tuple(int(k) for k in pair.split(":", 1)) for pair in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected pairs like '7:1,3:8', got {text!r}") from None


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also NaN
        raise argparse.ArgumentTypeError(f"a noise rate must be a number in [0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


# TrainConfig fields and what they must satisfy, checked before anything is trained.
POSITIVE_INTS = ("hidden", "layers", "batch_size", "dmi_batch_size")
NON_NEGATIVE_INTS = ("ce_epochs", "gce_epochs", "fw_epochs", "lccn_epochs", "dmi_epochs")
POSITIVE_FLOATS = ("ce_lr", "gce_lr", "fw_lr", "lccn_lr", "dmi_lr", "lccn_alpha")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_config(config: TrainConfig) -> None:
    """Every hyperparameter a run would fail on, or silently misuse, named by its flag."""
    for name in POSITIVE_INTS:
        if getattr(config, name) < 1:
            raise ValueError(f"argument {_flag(name)} must be >= 1, got {getattr(config, name)}")
    for name in NON_NEGATIVE_INTS:
        if getattr(config, name) < 0:
            raise ValueError(f"argument {_flag(name)} must be >= 0, got {getattr(config, name)}")
    for name in POSITIVE_FLOATS:
        if not getattr(config, name) > 0.0:  # also NaN
            raise ValueError(f"argument {_flag(name)} must be > 0, got {getattr(config, name)}")
    if not config.weight_decay >= 0.0:
        raise ValueError(f"argument --weight-decay must be >= 0, got {config.weight_decay}")
    if not 0.0 < config.gce_q <= 1.0:
        raise ValueError(f"argument --gce-q must be in (0, 1], got {config.gce_q}")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 < getattr(config, name) < 1.0:
            raise ValueError(f"argument {_flag(name)} must be in (0, 1), got "
                             f"{getattr(config, name)}")
    if config.val_fraction + config.test_fraction >= 1.0:
        raise ValueError(f"arguments --val-fraction + --test-fraction must be < 1, got "
                         f"{config.val_fraction} + {config.test_fraction}")


def _check_output_file(flag: str, path: Optional[str]) -> None:
    """Fails now, not after the training, when ``path`` cannot be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"argument {flag}: {path!r} is a directory, expected a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"argument {flag}: directory {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"argument {flag}: directory {folder!r} is not writable")


def _check_output_dir(flag: str, path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise ValueError(f"argument {flag}: cannot create directory {path!r} "
                         f"({err.strerror})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"argument {flag}: directory {path!r} is not writable")


def noise_warning(T: np.ndarray, kind: str, rate: float) -> Optional[str]:
    """Why L_DMI cannot learn from labels drawn with T, or None when it can."""
    C = T.shape[0]
    if abs(np.linalg.det(T)) < 1e-9:
        what = f"--noise {kind}" + (f" --rate {rate}" if kind not in ("matrix", "none") else "")
        return (f"warning: {what}: the transition matrix is singular (det T = 0), so the noisy "
                "labels lose information that no method can recover; L_DMI's guarantee needs an "
                "invertible T")
    if kind == "uniform" and rate > (C - 1) / C:
        return (f"warning: --noise uniform --rate {rate}: above (C - 1) / C = {(C - 1) / C:.3g} "
                "every other class is more likely than the true one; L_DMI cannot tell the "
                "classes from a permutation of them, and the noisy labels favour a wrong one")
    return None


def _resolve_device(args: argparse.Namespace) -> str:
    device = resolve_device(args.device)
    nproc = getattr(args, "nproc", 1)
    if device == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"argument --nproc: {nproc} processes on --device cuda need {nproc} "
                         f"GPUs, torch sees {torch.cuda.device_count()}")
    return device


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hyperparameters (defaults chosen on validation data)")
    for spec in dataclasses.fields(TrainConfig):
        kind = type(spec.default)
        group.add_argument("--" + spec.name.replace("_", "-"), dest=spec.name, type=kind,
                           default=spec.default, choices=CHOICES.get(spec.name),
                           metavar=None if spec.name in CHOICES else kind.__name__.upper(),
                           help=f"{spec.metadata['help']} (default: {spec.default})")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="CPU threads for torch (default: 1); the same seed and thread "
                             "count give the same numbers")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show progress bars (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dmi_ext",
        description="Train on noisy labels with L_DMI and the paper's baselines (CE, FW, GCE, "
                    "LCCN), and reproduce the paper's experiments on scikit-learn's digits.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train", help="one method, one noise setting, several seeds",
        description="Train one method on one noise setting for several seeds and print the "
                    "clean test accuracy (mean ± std). Noise is applied to the training and "
                    "validation labels, never to the test labels.")
    train.add_argument("--method", choices=METHODS, default="dmi",
                       help="ce: cross-entropy; fw: forward correction; gce: generalised CE; "
                            "lccn: latent labels by Gibbs sampling; dmi: CE warm-up then L_DMI "
                            "(default: dmi)")
    train.add_argument("--data", default=None,
                       help="'digits' (10 classes), 'digits-binary' (digit 0 = class 0, 10 %%, "
                            "vs the rest = class 1), 'digits-pairs' (two digits side by side, "
                            "label 10 a + b: 100 classes), or a .npz file with arrays X and y "
                            "or a .csv file (label in the last column, optional header row). "
                            "Default: digits-binary for the binary noise kinds, digits-pairs "
                            "for digitflip, digits otherwise")
    train.add_argument("--noise", choices=NOISE_CHOICES, default="pairflip",
                       help="uniform: r spread over the other classes; pairflip: each --pairs "
                            "source flips to its destination with rate r; binary1/2/3: the "
                            "paper's binary cases (1) symmetric, (2) class 0 -> 1, (3) class "
                            "1 -> 0; digitflip: the tens digit of a digits-pairs label flips "
                            "like --pairs; matrix: the --transition file; none: clean (default: "
                            "pairflip)")
    train.add_argument("--rate", type=_rate, default=0.7, help="noise rate r in [0, 1] "
                                                               "(default: 0.7)")
    train.add_argument("--pairs", type=_pairs, default=None,
                       help="pair flips as source:destination, comma-separated (default: "
                            + ",".join(f"{a}:{b}" for a, b in DIGIT_PAIRS) + " on digits; "
                            "0:1,2:3,... on other data, the last class of an odd count to 0)")
    train.add_argument("--test-data", default=None, metavar="FILE",
                       help="a clean test set (.npz or .csv, the same classes and features as "
                            "--data); --data is then split into training and validation only")
    train.add_argument("--save-model", default=None, metavar="FILE",
                       help="save the trained models (one per seed, the state dicts with the "
                            "decision rule folded in), the feature scaling and the config with "
                            "torch.save")
    train.add_argument("--transition", default=None,
                       help="for --noise matrix: a .npy or .csv file with the C x C matrix "
                            "T[i, j] = P(noisy j | clean i)")
    train.add_argument("--seeds", type=_positive_int, default=5,
                       help="number of seeds (each: its own split, noise and initialisation; "
                            "default: 5)")
    train.add_argument("--first-seed", type=int, default=0, help="seeds run from this one "
                                                                 "(default: 0)")
    train.add_argument("--out", default=None, help="also write the per-seed results to this "
                                                   "JSON file")
    train.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                       help="train data-parallel in N processes spawned on this machine "
                            "(torch.distributed with gloo on the CPU, NCCL with --device cuda, "
                            "one GPU per process; the model under "
                            "DistributedDataParallel, L_DMI over the global batch). "
                            "--batch-size and --dmi-batch-size stay the global batch (for L_DMI, "
                            "the rows U is formed over), of which each process takes an equal "
                            "share (to a row), so the results equal one process's up to "
                            "floating-point rounding; --threads applies to each process "
                            "(default: 1, no process group)")
    _add_run_options(train)
    _add_config_options(train)

    repro = commands.add_parser(
        "reproduce", help="the paper's grid on digits: JSON, markdown table, plot",
        description="Run methods x noise kinds x noise rates x seeds on digits (or --data "
                    "FILE) and write "
                    "results.json, results.md (a table per noise kind) and accuracy.png (test "
                    "accuracy against r, one panel per noise kind). The full grid is 5 methods x "
                    "5 noise kinds x r = 0.0..0.9 x 5 seeds; --quick runs pair flips and binary "
                    "case (3) at r = 0, 0.5, 0.7, 0.9 with the same 5 seeds.")
    repro.add_argument("--quick", action="store_true", help="the reduced grid (a few minutes)")
    repro.add_argument("--data", default=None, metavar="FILE",
                       help="run the grid on this .npz / .csv file instead of digits: every noise "
                            "kind on it (default noise kinds: uniform and pairflip, and the "
                            "binary cases for two classes)")
    repro.add_argument("--test-data", default=None, metavar="FILE",
                       help="a clean test set for --data (the same classes and features)")
    repro.add_argument("--pairs", type=_pairs, default=None,
                       help="pair flips of --noise pairflip (default: as for train)")
    repro.add_argument("--out", default=None, help="output directory (default: runs/reproduce, "
                                                   "or runs/reproduce-quick with --quick)")
    repro.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                       help="methods to run (default: all of the grid)")
    repro.add_argument("--noise", nargs="+", choices=tuple(NOISE_KINDS), default=None,
                       help="noise kinds to run (default: all of the grid, or those that fit "
                            "--data's classes)")
    repro.add_argument("--rates", nargs="+", type=_rate, default=None,
                       help="noise rates to run (default: those of the grid)")
    repro.add_argument("--seeds", type=_positive_int, default=None,
                       help="number of seeds, 0..N-1 (default: 5)")
    _add_run_options(repro)
    _add_config_options(repro)
    return parser


def _config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{spec.name: getattr(args, spec.name)
                          for spec in dataclasses.fields(TrainConfig)})


def _setup(args: argparse.Namespace) -> bool:
    """Fixes threads and determinism; returns whether to show progress bars."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    return sys.stderr.isatty() if args.progress is None else args.progress


def _load_transition(path: str) -> np.ndarray:
    if path is None:
        raise SystemExit("error: --noise matrix needs --transition FILE")
    try:
        return np.load(path, allow_pickle=False) if path.endswith(".npy") else \
            np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot read --transition {path!r}: {err}") from None


def _check_nproc(nproc: int, method: str, config: TrainConfig) -> None:
    """Every process needs a share of every batch: fail before spawning anything."""
    sizes = {"--batch-size": config.batch_size}
    if method == "dmi":
        sizes["--dmi-batch-size"] = config.dmi_batch_size
    too_small = [f"{option} {size}" for option, size in sizes.items() if size < nproc]
    if too_small:
        raise ValueError(f"argument --nproc: {nproc} processes share every batch, so batches "
                         f"need at least {nproc} rows, got " + " and ".join(too_small))


def _train_seeds(args: argparse.Namespace, dataset, T: np.ndarray, config: TrainConfig,
                 test=None) -> List[dict]:
    """Every seed of a ``train`` command, in this process (one rank of a data-parallel run, or
    the only process); one row per seed, and a line per seed printed by rank 0."""
    rank, _ = rank_and_world()
    progress = _setup(args) and rank == 0
    rows: List[dict] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        splits = make_splits(dataset, T, seed, config.val_fraction, config.test_fraction,
                             config.inputs, test)
        start = time.perf_counter()
        result = run_method(args.method, splits, config, seed, progress=progress)
        rows.append({"seed": seed, "test_accuracy": result.test_accuracy,
                     "train_noise_rate": splits.train.noise_rate,
                     "best_epochs": {log.name: log.best_epoch for log in result.phases},
                     "phases": phase_records(result.phases),
                     "estimated_transition": result.estimated_transition,
                     "decision": result.decision,
                     "seconds": time.perf_counter() - start})
        if args.save_model and rank == 0:
            rows[-1]["_model"] = {"state_dict": {k: v.cpu() for k, v in
                                                 result.model.state_dict().items()},
                                  "feature_shift": splits.feature_shift,
                                  "feature_scale": splits.feature_scale}
        if rank == 0:
            print(f"seed {seed}: test accuracy {result.test_accuracy:.2f} % (training labels "
                  f"{100 * splits.train.noise_rate:.1f} % noisy, best epochs "
                  + ", ".join(f"{k} {v}" for k, v in rows[-1]["best_epochs"].items()) + ")",
                  flush=True)
    return rows


def _load_test_data(path: Optional[str], dataset):
    if path is None:
        return None
    try:
        test = load_dataset(path)
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"argument --test-data: {err}") from None
    return align_test_set(dataset, test)


def command_train(args: argparse.Namespace) -> int:
    # Everything is checked before anything is trained: settings, files, outputs, device.
    config = _config(args)
    check_config(config)
    _check_output_file("--out", args.out)
    _check_output_file("--save-model", args.save_model)
    config = dataclasses.replace(config, device=_resolve_device(args))
    data = args.data or {**NOISE_KINDS, DIGIT_FLIP: "digits-pairs"}.get(args.noise, "digits")
    dataset = load_dataset(data)  # bad files fail here, before torch is configured
    test = _load_test_data(args.test_data, dataset)
    matrix = _load_transition(args.transition) if args.noise == "matrix" else None
    pairs = args.pairs or default_pairs(dataset)
    T = noise_transition(args.noise, dataset.num_classes, args.rate, pairs, matrix)
    warning = noise_warning(T, args.noise, args.rate)
    if warning:
        print(warning, file=sys.stderr)
    _check_nproc(args.nproc, args.method, config)
    if args.nproc == 1:
        rows = _train_seeds(args, dataset, T, config, test)
    else:
        rows = run_data_parallel(args.nproc, _train_seeds, args, dataset, T, config, test,
                                 backend="nccl" if config.device == "cuda" else "gloo")
    models = [row.pop("_model") for row in rows if "_model" in row]
    accuracies = np.array([row["test_accuracy"] for row in rows])
    setting = args.noise if args.noise in ("none", "matrix") else f"{args.noise} r = {args.rate}"
    processes = f" ({args.nproc} processes)" if args.nproc > 1 else ""
    print(f"{args.method} on {dataset.name}, noise {setting}: test accuracy "
          f"{accuracies.mean():.2f} ± {accuracies.std():.2f} % over {len(rows)} seeds"
          + processes)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"dmi_ext_version": __version__, "method": args.method, "data": data,
                       "test_data": args.test_data, "noise": args.noise, "rate": args.rate,
                       "transition": T.tolist(), "nproc": args.nproc,
                       "config": config.to_dict(), "runs": rows}, handle, indent=1)
    if args.save_model:
        torch.save({"dmi_ext_version": __version__, "method": args.method,
                    "config": config.to_dict(), "class_names": list(dataset.class_names),
                    "seeds": [row["seed"] for row in rows], "models": models}, args.save_model)
        print(f"wrote {args.save_model}")
    return 0


def _grid_noise_kinds(args: argparse.Namespace, base: Grid, dataset) -> Tuple[str, ...]:
    """The noise kinds of a reproduce run: as asked, else the grid's, else (with --data) those
    that fit the file's classes."""
    if args.noise:
        return tuple(args.noise)
    if args.data is None:
        return base.noise_kinds
    binary = ("binary1", "binary2", "binary3") if dataset.num_classes == 2 else ()
    return ("uniform", "pairflip", *binary)


def command_reproduce(args: argparse.Namespace) -> int:
    config = _config(args)
    check_config(config)
    config = dataclasses.replace(config, device=_resolve_device(args))
    base = QUICK_GRID if args.quick else FULL_GRID
    dataset = load_dataset(args.data) if args.data else None
    if args.test_data and dataset is None:
        raise ValueError("argument --test-data: needs --data FILE (the digits grid splits its "
                         "own test set)")
    if args.pairs and dataset is None:
        raise ValueError("argument --pairs: needs --data FILE (the digits grid uses its "
                         "look-alike pairs)")
    test = _load_test_data(args.test_data, dataset) if dataset is not None else None
    grid = Grid(tuple(args.methods or base.methods), _grid_noise_kinds(args, base, dataset),
                tuple(args.rates or base.rates),
                tuple(range(args.seeds)) if args.seeds else base.seeds,
                data=args.data, test_data=args.test_data,
                pairs=tuple(args.pairs or default_pairs(dataset)) if dataset else None)
    # Every setting's T now, so that a noise kind the data cannot take fails before training.
    for kind in grid.noise_kinds:
        classes = dataset.num_classes if dataset else load_dataset(NOISE_KINDS[kind]).num_classes
        for rate in grid.rates:
            try:
                T = noise_transition(kind, classes, rate, grid.pairs or DIGIT_PAIRS)
            except ValueError as err:
                raise ValueError(f"argument --noise: {err}") from None
            warning = noise_warning(T, kind, rate)
            if warning:
                print(warning, file=sys.stderr)
    out_dir = args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    _check_output_dir("--out", out_dir)
    progress = _setup(args)
    start = time.perf_counter()
    paths = reproduce(grid, config, out_dir, threads=args.threads, progress=progress,
                      dataset=dataset, test=test)
    with open(paths["results.md"]) as handle:
        print(handle.read())
    print(f"{grid.settings} settings x {len(grid.methods)} methods in "
          f"{time.perf_counter() - start:.0f} s")
    for name, path in paths.items():
        if path is not None:
            print(f"wrote {path}")
    return 0


def _print_note(message, category, *rest, **kwargs) -> None:
    if issubclass(category, DataNote):
        print(f"note: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, *rest, **kwargs)


_show_warning = warnings.showwarning


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _print_note
    try:
        if args.command == "train":
            return command_train(args)
        return command_reproduce(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        # Bad data files and bad settings: the message says what and where; no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = _show_warning
