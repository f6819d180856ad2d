"""Data for the experiments: bundled digits, user files, noise settings, and the noisy splits.

A ``Dataset`` is features plus clean integer labels 0..C-1. It comes from scikit-learn's bundled
``load_digits`` (no download: the 10-class task, or the binary task "digit 0 vs the rest", a 10 % /
90 % split like the paper's bags vs clothes; ``digits-pairs``, 100 classes of two digits side by
side) or from a user's ``.npz`` / ``.csv`` file.
``make_splits`` cuts it into stratified train / validation / test parts, standardises the
features with training statistics, and corrupts the training and validation labels (never the
test labels) with a transition matrix from ``noise_transition``.
"""

import csv
import dataclasses
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .noise import (binary_case_matrix, corrupt_labels, pair_flip_matrix, uniform_noise_matrix,
                     validate_transition_matrix)

BUILTIN_DATASETS = ("digits", "digits-binary", "digits-pairs")

# Digit pairs that look alike, flipped like the paper's CIFAR-10 pairs (truck -> automobile, ...).
DIGIT_PAIRS = ((7, 1), (3, 8), (5, 6), (4, 9))

# noise kind -> the built-in dataset it is meant for (the binary cases need two classes).
NOISE_KINDS = {
    "uniform": "digits",
    "pairflip": "digits",
    "binary1": "digits-binary",
    "binary2": "digits-binary",
    "binary3": "digits-binary",
}
# Noise for digits-pairs (outside the paper's grid): the tens digit a of 10a + b flips to its
# pair's destination (7 -> 1, ...) with rate r.
DIGIT_FLIP = "digitflip"


class DataNote(UserWarning):
    """Something the loader changed in a user's file; the CLI prints it as a ``note:`` line."""


class Dataset(NamedTuple):
    """Features (N, *sample_shape) float32, clean labels (N,) int64 in [0, C), class names."""

    x: np.ndarray
    y: np.ndarray
    class_names: Tuple[str, ...]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Part:
    """One split: standardised features, the labels to learn from, and the clean labels."""

    x: torch.Tensor  # float32 (n, *sample_shape)
    y: torch.Tensor  # int64 (n,): noisy for train / validation, clean for test
    clean_y: torch.Tensor  # int64 (n,)

    @property
    def noise_rate(self) -> float:
        return float((self.y != self.clean_y).double().mean()) if len(self.y) else 0.0


@dataclass(frozen=True)
class Splits:
    train: Part
    val: Part
    test: Part
    transition: np.ndarray  # the T the labels were drawn from
    class_names: Tuple[str, ...]
    # x_scaled = (x - feature_shift) / feature_scale, from the training part (``inputs``)
    feature_shift: Optional[np.ndarray] = None
    feature_scale: Optional[np.ndarray] = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_shape(self) -> Tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    def to(self, device) -> "Splits":
        """The same splits with every tensor on ``device`` (self when they are there already)."""
        if self.train.x.device == torch.device(device):
            return self
        moved = [Part(*(t.to(device) for t in (p.x, p.y, p.clean_y)))
                 for p in (self.train, self.val, self.test)]
        return dataclasses.replace(self, train=moved[0], val=moved[1], test=moved[2])


@dataclass(frozen=True)
class DigitPairs:
    """``digits-pairs``: two digit images side by side (8 x 16), class 10 a + b, 100 classes.

    The digit images are split first (stratified train / validation / test pools, by seed), and
    each part's pairs are drawn from its own pool only, so no test pair shares a half with a
    training pair. Each part has the same number of pairs of every class: ``pairs_per_class``
    for training and as many per image for validation and testing (e.g. 200 / 67 / 67 with the
    default 60 / 20 / 20 split).
    """

    digits: Dataset  # the 1797 bundled digit images, labels 0..9
    pairs_per_class: int = 200
    name: str = "digits-pairs"
    class_names: Tuple[str, ...] = tuple(f"{k:02d}" for k in range(100))

    @property
    def num_classes(self) -> int:
        return 100

    def compose(self, seed: int, val_fraction: float,
                test_fraction: float) -> Tuple[Dataset, Tuple[np.ndarray, ...]]:
        """The pairs of one seed, and the rows of its train / validation / test parts."""
        pools = stratified_indices(self.digits.y, val_fraction, test_fraction, seed)
        train_fraction = 1.0 - val_fraction - test_fraction
        rng = np.random.default_rng([seed, 2])  # its own stream, like the noise's
        xs, ys, parts, start = [], [], [], 0
        for pool, fraction in zip(pools, (train_fraction, val_fraction, test_fraction)):
            per_class = max(1, round(self.pairs_per_class * fraction / train_fraction))
            by_digit = [pool[self.digits.y[pool] == d] for d in range(10)]
            label = np.repeat(np.arange(100), per_class)
            halves = []
            for digit_of_label in (label // 10, label % 10):  # left image, right image
                image = np.empty(len(label), dtype=np.int64)
                for d in range(10):
                    rows = np.flatnonzero(digit_of_label == d)
                    image[rows] = by_digit[d][rng.integers(len(by_digit[d]), size=len(rows))]
                halves.append(self.digits.x[image])
            xs.append(np.concatenate(halves, axis=-1))
            ys.append(label)
            parts.append(np.arange(start, start + len(label)))
            start += len(label)
        pairs = Dataset(np.concatenate(xs), np.concatenate(ys), self.class_names, self.name)
        return pairs, tuple(parts)


def digit_flip_matrix(rate: float, pairs: Sequence[Tuple[int, int]] = DIGIT_PAIRS) -> np.ndarray:
    """100 x 100 noise of digits-pairs: the tens digit flips to its pair (row 10 a + b puts
    ``rate`` on 10 a' + b for each pair (a, a')); the units digit stays."""
    return np.kron(pair_flip_matrix(10, pairs, rate), np.eye(10))


def _require_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("the dmi_ext toolkit needs scikit-learn: pip install scikit-learn (or, in "
                          "a dmi_ext checkout, pip install --no-build-isolation -e '.[toolkit]')"
                          ) from None


def load_builtin(name: str) -> Dataset:
    """``digits``: 1797 8 x 8 images, 10 classes. ``digits-binary``: class 0 = digit 0 (10 %),
    class 1 = any other digit (90 %). ``digits-pairs``: see ``DigitPairs``."""
    _require_sklearn()
    from sklearn.datasets import load_digits

    if name not in BUILTIN_DATASETS:
        raise ValueError(f"argument 'name' must be one of {BUILTIN_DATASETS}, got {name!r}")
    digits = load_digits()
    x = digits.images.astype(np.float32)  # (1797, 8, 8), image-shaped so a CNN can use it
    y = digits.target.astype(np.int64)
    if name == "digits":
        return Dataset(x, y, tuple(str(k) for k in range(10)), name)
    if name == "digits-pairs":
        return DigitPairs(Dataset(x, y, tuple(str(k) for k in range(10)), "digits"))
    return Dataset(x, (y != 0).astype(np.int64), ("digit 0", "digits 1-9"), name)


def _labels_from(values: np.ndarray, source: str) -> Tuple[np.ndarray, Tuple[str, ...]]:
    """Maps integer-valued labels to 0..C-1 (sorted), returning the original values as names."""
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            bad = values[~np.isfinite(values) | (values != np.round(values))][0]
            raise ValueError(f"{source}: labels must be integers, found {bad.item()!r}")
        values = values.astype(np.int64)
    elif values.dtype.kind not in "iu":
        raise ValueError(f"{source}: labels must be integers, got dtype {values.dtype}")
    classes, y = np.unique(values, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{source}: labels must have at least 2 distinct classes, found "
                         f"{[int(c) for c in classes]}")
    return y.astype(np.int64).ravel(), tuple(str(int(c)) for c in classes)


def _features_from(x: np.ndarray, n: int, source: str) -> np.ndarray:
    if x.dtype.kind not in "iuf" or x.ndim < 2:
        raise ValueError(f"{source}: 'X' must be a numeric array of shape (N, features) or "
                         f"(N, [channels,] height, width), got dtype {x.dtype} shape {x.shape}")
    if x.shape[0] != n:
        raise ValueError(f"{source}: 'X' has {x.shape[0]} rows but 'y' has {n} labels")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise ValueError(f"{source}: 'X' has a non-finite value in row {row}")
    return x


def _load_npz(path: str) -> Dataset:
    if not zipfile.is_zipfile(path):  # else np.load would try it as a pickle and say so
        raise ValueError(f"{path}: not a readable .npz archive (save it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not {"X", "y"} <= keys:
                raise ValueError(f"{path}: an .npz dataset needs arrays 'X' and 'y', found "
                                 f"{sorted(keys)}")
            x, y = archive["X"], archive["y"]
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise ValueError(f"{path}: holds Python objects; save 'X' and 'y' as plain numeric "
                             "arrays (object arrays are not loaded, for safety)") from None
        raise
    except (OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from None
    if y.ndim != 1:
        raise ValueError(f"{path}: 'y' must be 1-D (one label per row), got shape {y.shape}")
    labels, names = _labels_from(y, path)
    return Dataset(_features_from(x, len(labels), path), labels, names, os.path.basename(path))


def _load_csv(path: str) -> Dataset:
    """Numeric CSV, one sample per row, the label in the last column, an optional header row."""
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise ValueError(f"{path}: the CSV file is empty")

    def numbers(row):
        try:
            return [float(cell) for cell in row]
        except ValueError:
            return None

    first_line, header = 1, None
    if numbers(rows[0]) is None:  # a header
        header, rows, first_line = rows[0], rows[1:], 2
    if not rows:
        raise ValueError(f"{path}: the CSV file has a header but no data rows")
    width = len(rows[0])
    if width < 2:
        raise ValueError(f"{path}: each row needs at least one feature and a label (last "
                         f"column), line {first_line} has {width} column")
    values = np.empty((len(rows), width), dtype=np.float64)
    for k, row in enumerate(rows):
        line = first_line + k
        if len(row) != width:
            raise ValueError(f"{path}: line {line} has {len(row)} columns, expected {width}")
        parsed = numbers(row)
        if parsed is None:
            bad = next(cell for cell in row if numbers([cell]) is None)
            raise ValueError(f"{path}: line {line}: {bad!r} is not a number")
        values[k] = parsed
    unnamed = header is None or header[0].strip() in ("", "Unnamed: 0", "index")
    if unnamed and width >= 3 and len(values) >= 3 and \
            np.array_equal(values[:, 0], np.arange(len(values))):
        # pandas' to_csv writes the row index as an unnamed first column: on a file sorted by
        # class it would give the label away.
        warnings.warn(f"{path}: dropped the first column (0, 1, 2, ..., unnamed: a row index as "
                      "pandas writes it, not a feature)", DataNote, stacklevel=2)
        values = values[:, 1:]
    labels, names = _labels_from(values[:, -1], path)
    return Dataset(_features_from(values[:, :-1], len(labels), path), labels, names,
                   os.path.basename(path))


def load_dataset(source: str) -> Dataset:
    """A built-in dataset by name (``digits``, ``digits-binary``) or a ``.npz`` / ``.csv`` path."""
    if source in BUILTIN_DATASETS:
        return load_builtin(source)
    extension = os.path.splitext(source)[1].lower()
    if extension not in (".npz", ".csv"):
        raise ValueError(f"argument 'data' must be one of {BUILTIN_DATASETS} or a .npz / .csv "
                         f"file, got {source!r}")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"argument 'data': no such file {source!r}")
    return _load_npz(source) if extension == ".npz" else _load_csv(source)


def noise_transition(kind: str, num_classes: int, rate: float,
                     pairs: Sequence[Tuple[int, int]] = DIGIT_PAIRS,
                     matrix: Optional[np.ndarray] = None) -> np.ndarray:
    """The transition matrix of a named noise kind (``NOISE_KINDS``, ``none`` or ``matrix``)."""
    if kind == "none":
        return np.eye(num_classes)
    if kind == "uniform":
        return uniform_noise_matrix(num_classes, rate)
    if kind == "pairflip":
        return pair_flip_matrix(num_classes, pairs, rate)
    if kind in ("binary1", "binary2", "binary3"):
        if num_classes != 2:
            raise ValueError(f"noise {kind!r} is for 2 classes, the data has {num_classes} "
                             "(use --data digits-binary or a two-class file)")
        return binary_case_matrix(int(kind[-1]), rate)
    if kind == DIGIT_FLIP:
        if num_classes != 100:
            raise ValueError(f"noise {kind!r} is for the 100 classes of digits-pairs, the data "
                             f"has {num_classes} (use --data digits-pairs)")
        return digit_flip_matrix(rate, pairs)
    if kind == "matrix":
        if matrix is None:
            raise ValueError("noise 'matrix' needs a transition matrix (--transition FILE)")
        T = validate_transition_matrix(matrix, "transition")
        if T.shape[0] != num_classes:
            raise ValueError(f"argument 'transition' is {T.shape[0]} x {T.shape[0]} but the data "
                             f"has {num_classes} classes")
        return T
    raise ValueError(f"argument 'noise' must be one of "
                     f"{('none', *NOISE_KINDS, DIGIT_FLIP, 'matrix')}, "
                     f"got {kind!r}")


def stratified_indices(y: np.ndarray, val_fraction: float, test_fraction: float,
                       seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / validation / test row indices with each class in the same proportion in each;
    with ``test_fraction`` = 0 the test part is empty (a separate test set is used)."""
    _require_sklearn()
    from sklearn.model_selection import train_test_split

    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0 and not (name == "test_fraction" and value == 0.0):
            raise ValueError(f"argument '{name}' must be in (0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"arguments 'val_fraction' + 'test_fraction' must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    rows = np.arange(len(y))
    try:
        if test_fraction == 0.0:
            rest, test = rows, rows[:0]
        else:
            rest, test = train_test_split(rows, test_size=test_fraction, stratify=y,
                                          random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction),
                                      stratify=y[rest], random_state=seed)
    except ValueError as err:
        counts = np.bincount(y)
        raise ValueError(f"cannot split {len(y)} samples into stratified train / validation / "
                         f"test parts (smallest class has {counts.min()} samples): {err}") from None
    return np.sort(train), np.sort(val), np.sort(test)


INPUT_SCALINGS = ("standardize-floor", "standardize", "scale")
# 'standardize-floor': no feature is divided by less than this share of the features' RMS spread.
SPREAD_FLOOR = 0.25


def default_pairs(dataset) -> Tuple[Tuple[int, int], ...]:
    """The pair flips of ``--noise pairflip`` when ``--pairs`` is not given: the look-alike digits
    on digits (and on the tens digit of digits-pairs), else class 2k -> 2k + 1 (the last class
    of an odd count flips to class 0)."""
    if dataset.name in ("digits", "digits-pairs"):
        return DIGIT_PAIRS
    C = dataset.num_classes
    return tuple((k, (k + 1) % C) for k in range(0, C, 2))


def align_test_set(data: Dataset, test: Dataset, flag: str = "--test-data") -> Dataset:
    """``test`` with its labels renumbered as ``data``'s classes (both files' labels are mapped
    to 0..C-1 by their own sorted values, so the same value may get different numbers)."""
    if isinstance(data, DigitPairs) or isinstance(test, DigitPairs):
        raise ValueError(f"argument {flag}: not available with digits-pairs")
    if test.x.shape[1:] != data.x.shape[1:]:
        raise ValueError(f"argument {flag}: {test.name!r} has samples of shape "
                         f"{test.x.shape[1:]}, the training data {data.x.shape[1:]}")
    index = {name: k for k, name in enumerate(data.class_names)}
    unknown = [name for name in test.class_names if name not in index]
    if unknown:
        raise ValueError(f"argument {flag}: {test.name!r} has label {unknown[0]}, which the "
                         f"training data {data.name!r} does not have (its labels: "
                         f"{', '.join(data.class_names)})")
    mapping = np.array([index[name] for name in test.class_names], dtype=np.int64)
    return Dataset(test.x, mapping[test.y], data.class_names, test.name)


def make_splits(dataset: Dataset, transition, seed: int, val_fraction: float = 0.2,
                test_fraction: float = 0.2, inputs: str = "standardize-floor",
                test: Optional[Dataset] = None) -> Splits:
    """Stratified split, features scaled with training statistics, noisy train / val labels.

    The split, and the noise, depend on ``seed`` only. ``inputs``: 'standardize' gives each
    feature mean 0 and std 1 on the training part (features with no spread there, e.g. the
    always-blank corner pixels of digits, are centred, not scaled); 'standardize-floor' (the
    default) centres each feature and divides it by its std or by ``SPREAD_FLOOR`` times the
    RMS of all features' stds, whichever is larger, so that a nearly constant feature (a border
    pixel of digits, std 0.02 against 4.3 for the RMS) is not blown up into a few huge values;
    'scale' divides every feature by the largest |x| of the training part (digits: x / 16).
    ``test``: a clean test set (as aligned by ``align_test_set``); ``dataset`` is then split into
    training and validation parts only.
    """
    if inputs not in INPUT_SCALINGS:
        raise ValueError(f"argument 'inputs' must be one of {INPUT_SCALINGS}, got {inputs!r}")
    T = validate_transition_matrix(transition, "transition")
    if T.shape[0] != dataset.num_classes:
        raise ValueError(f"argument 'transition' is {T.shape[0]} x {T.shape[0]} but dataset "
                         f"{dataset.name!r} has {dataset.num_classes} classes")
    external = test
    if isinstance(dataset, DigitPairs):  # split the digit images, then pair within each part
        dataset, (train, val, test) = dataset.compose(seed, val_fraction, test_fraction)
    elif external is not None:
        train, val = stratified_indices(dataset.y, val_fraction, 0.0, seed)[:2]
    else:
        train, val, test = stratified_indices(dataset.y, val_fraction, test_fraction, seed)
    if inputs in ("standardize", "standardize-floor"):
        mean = dataset.x[train].mean(axis=0)
        std = dataset.x[train].std(axis=0)
        if inputs == "standardize-floor":
            rms = float(np.sqrt(np.mean(std.astype(np.float64) ** 2)))
            std = np.maximum(std, SPREAD_FLOOR * rms)
        std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
    else:
        largest = float(np.abs(dataset.x[train]).max())
        mean, std = np.float32(0.0), np.float32(largest if largest > 0 else 1.0)
    rng = np.random.default_rng([seed, 1])  # its own stream: the noise does not shift the split

    def part(rows, noisy, source=dataset):
        x = torch.from_numpy((source.x[rows] - mean) / std)
        clean = source.y[rows]
        y = corrupt_labels(clean, T, rng).labels if noisy else clean
        return Part(x, torch.from_numpy(y), torch.from_numpy(clean))

    test_part = part(test, False) if external is None else \
        part(np.arange(len(external.y)), False, external)
    return Splits(part(train, True), part(val, True), test_part, T, dataset.class_names,
                  np.broadcast_to(mean, dataset.x.shape[1:]).copy(),
                  np.broadcast_to(std, dataset.x.shape[1:]).copy())
