"""Label-noise models: transition matrices and seeded label corruption.

A noise model is a row-stochastic matrix T with T[i, j] = P(noisy label = j | clean label = i).
This module builds the matrices of the paper (uniform, pair flips, the three binary cases),
validates any matrix a user brings, and draws noisy labels from clean ones with a seeded
generator, reporting what was actually realised (the noise rate and the empirical T), since on a
few hundred labels those differ visibly from the nominal ones. It needs only numpy (not
scikit-learn): ``import dmi_ext`` does not import it, and the op never depends on it.
"""

from typing import NamedTuple, Sequence, Tuple, Union

import numpy as np

# Rows of a transition matrix may miss 1 by this much (float32 matrices, sums of decimals).
ROW_SUM_TOLERANCE = 1e-6

Seed = Union[int, np.random.Generator, None]


class NoisyLabels(NamedTuple):
    """Noisy labels drawn from clean ones, with what the draw actually realised."""

    labels: np.ndarray  # int64, same shape as the clean labels
    noise_rate: float  # fraction of labels that changed
    empirical_transition: np.ndarray  # (C, C) float64: row i = observed P(noisy | clean = i)


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
            or num_classes < 2:
        raise ValueError(f"argument 'num_classes' must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_rate(rate: float, name: str = "rate") -> float:
    try:
        value = float(rate)
    except (TypeError, ValueError):
        raise TypeError(f"argument '{name}' must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"argument '{name}' must be in [0, 1], got {rate!r}")
    return value


def validate_transition_matrix(T, name: str = "T") -> np.ndarray:
    """Returns T as a new float64 array after checking it is a transition matrix.

    Square, at least 2 x 2, finite, non-negative, every row summing to 1 (within 1e-6). The error
    names the argument (``name``) and the offending entry or row.
    """
    try:
        matrix = np.array(T, dtype=np.float64)  # a copy: the caller's array is never touched
    except (TypeError, ValueError) as err:
        raise TypeError(f"argument '{name}' must be a numeric matrix, got {T!r} ({err})") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"argument '{name}' must be a square matrix, got shape {matrix.shape}")
    if matrix.shape[0] < 2:
        raise ValueError(f"argument '{name}' must be at least 2 x 2, got shape {matrix.shape}")
    bad = np.argwhere(~np.isfinite(matrix))
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"argument '{name}' has a non-finite entry {matrix[i, j]} at [{i}, {j}]")
    bad = np.argwhere(matrix < 0)
    if bad.size:
        i, j = bad[0]
        raise ValueError(f"argument '{name}' has a negative entry {matrix[i, j]} at [{i}, {j}]; "
                         "transition probabilities must be >= 0")
    row_sums = matrix.sum(axis=1)
    bad_rows = np.flatnonzero(np.abs(row_sums - 1.0) > ROW_SUM_TOLERANCE)
    if bad_rows.size:
        i = bad_rows[0]
        raise ValueError(f"argument '{name}' row {i} sums to {row_sums[i]:.6g}, not 1; row i must "
                         "be P(noisy label | clean label = i)")
    return matrix


def uniform_noise_matrix(num_classes: int, rate: float) -> np.ndarray:
    """Class-independent noise: 1 - rate on the diagonal, rate / (C - 1) everywhere else.

    Singular at rate = (C - 1) / C, where the noisy label carries no information at all.
    """
    C = _check_num_classes(num_classes)
    r = _check_rate(rate)
    T = np.full((C, C), r / (C - 1))
    np.fill_diagonal(T, 1.0 - r)
    return T


def pair_flip_matrix(num_classes: int, pairs: Sequence[Tuple[int, int]], rate: float) -> np.ndarray:
    """Class-dependent noise: each (source, destination) pair flips source to destination.

    Row ``source`` keeps 1 - rate on its own class and puts ``rate`` on ``destination``; classes
    that are no pair's source stay clean (the paper's CIFAR-10 pattern). Sources must be distinct.
    """
    C = _check_num_classes(num_classes)
    r = _check_rate(rate)
    T = np.eye(C)
    seen = set()
    for pair in pairs:
        try:
            source, destination = (int(k) for k in pair)
        except (TypeError, ValueError):
            raise ValueError(f"argument 'pairs' must hold (source, destination) class pairs, "
                             f"got {pair!r}") from None
        for k in (source, destination):
            if not 0 <= k < C:
                raise ValueError(f"argument 'pairs' has class {k} in {pair!r}, outside "
                                 f"[0, {C}) for num_classes = {C}")
        if source == destination:
            raise ValueError(f"argument 'pairs' flips class {source} to itself in {pair!r}")
        if source in seen:
            raise ValueError(f"argument 'pairs' lists source class {source} twice")
        seen.add(source)
        T[source, source] = 1.0 - r
        T[source, destination] = r
    return T


def binary_case_matrix(case: int, rate: float) -> np.ndarray:
    """The paper's three binary noise models; class 0 is the 10 % class, class 1 the 90 % class.

    (1) symmetric: [[1 - r/2, r/2], [r/2, 1 - r/2]]; (2) minority to majority: [[1 - r, r], [0, 1]];
    (3) majority to minority: [[1, 0], [r, 1 - r]]. In the paper class 0 is "bags" and class 1
    "clothes"; in case (3) at r > 0.5 most noisy labels say "bags" and cross-entropy learns to
    answer it always.
    """
    r = _check_rate(rate)
    matrices = {
        1: [[1.0 - r / 2, r / 2], [r / 2, 1.0 - r / 2]],
        2: [[1.0 - r, r], [0.0, 1.0]],
        3: [[1.0, 0.0], [r, 1.0 - r]],
    }
    if case not in matrices:
        raise ValueError(f"argument 'case' must be 1, 2 or 3, got {case!r}")
    return np.array(matrices[case], dtype=np.float64)


def _generator(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise TypeError(f"argument 'seed' must be an int, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(seed)


def empirical_transition_matrix(clean, noisy, num_classes: int) -> np.ndarray:
    """Row i = observed frequency of each noisy label among samples whose clean label is i.

    A class with no clean samples has an all-zero row (there is nothing to estimate it from).
    """
    C = _check_num_classes(num_classes)
    clean = np.asarray(clean).ravel()
    noisy = np.asarray(noisy).ravel()
    counts = np.zeros((C, C))
    np.add.at(counts, (clean, noisy), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def corrupt_labels(labels, T, seed: Seed = None) -> NoisyLabels:
    """Draws noisy label j for each clean label i with probability T[i, j].

    ``labels``: integer array-like (numpy or CPU torch) with values in [0, C), C = T.shape[0]; it is
    not modified. ``seed``: an int, a ``numpy.random.Generator`` (advanced by the draw) or None.
    The same seed and inputs give the same noisy labels on every platform (numpy's PCG64).
    """
    T = validate_transition_matrix(T)
    C = T.shape[0]
    clean = np.asarray(labels)
    if clean.dtype.kind not in "iu":
        raise TypeError(f"argument 'labels' must hold integers, got dtype {clean.dtype}")
    if clean.size and (clean.min() < 0 or clean.max() >= C):
        bad = clean.ravel()[(clean.ravel() < 0) | (clean.ravel() >= C)][0]
        raise ValueError(f"argument 'labels' has label {bad} outside [0, {C}) for a {C} x {C} 'T'")
    clean = clean.astype(np.int64)
    u = _generator(seed).random(clean.shape)
    # Inverse-CDF sampling: the noisy label is the number of cumulative probabilities <= u, which
    # skips zero-probability classes. From each row's last positive class on the CDF is set to
    # inf, so a row summing to 1 - 1e-16 cannot spill past it.
    cdf = np.cumsum(T, axis=1)
    last_positive = C - 1 - np.argmax(T[:, ::-1] > 0, axis=1)
    cdf[np.arange(C)[None, :] >= last_positive[:, None]] = np.inf
    noisy = (cdf[clean] <= u[..., None]).sum(axis=-1).astype(np.int64)
    rate = float(np.mean(noisy != clean)) if clean.size else 0.0
    return NoisyLabels(noisy, rate, empirical_transition_matrix(clean, noisy, C))
