"""Decision rules for a trained model, chosen from noisy validation labels only.

L_DMI's model may rank the samples well and still put its arg-max boundary in the wrong place:
for two classes, |det| of the joint matrix of hard predictions against noisy labels is Youden's J,
which is blind to the class prior. Two rules move the boundary; neither reads a clean label.

**Two classes: the threshold rule** (``choose_threshold``, what ``--dmi-rule auto`` does for
C = 2). Sort the validation samples by the margin m = z_1 - z_0. If the model ranks well, the
clean classes are the two sides of one cut in that order, and each side's noisy labels are draws
from one row of T: the noisy-label rate changes at the cut. Two estimates of the cut:

- *change point*: the posterior median of the cut under a two-segment model of the noisy labels
  (each side's label rate integrated out under a uniform prior: a Beta-binomial likelihood),
  with a uniform prior on the threshold's value, so that a cut between two samples weighs with
  the gap between their margins (a cut inside a dense run of margins is unlikely a priori);
- *mixture*: a two-component Gaussian mixture of the margins whose components emit the noisy
  labels through a 2 x 2 channel (fitted by EM, class 1 the component with the larger mean),
  cut where the two weighted components cross.

The first reads the labels along the ranking, the second also the shape of the margins' two
clusters; each fails on its own runs (a chance run of labels; clusters far from Gaussian), rarely
on the same. The rule keeps the one whose threshold lies where the validation margins are
sparser (a Gaussian kernel density estimate): the boundary between two classes a model separates
lies in a valley of its scores. Measured in docs/toolkit.md.

**Any number of classes: offsets through an estimate of T** (``choose_offsets``, the rule
``estimated-T``; what ``auto`` does for C > 2 where the validation split is large enough).
Per-class offsets b added to the logits (prediction argmax(z + b)) are picked to maximise the
estimated clean accuracy

    trace(joint(h, noisy) · T̂⁻¹)      (joint(h, noisy) = joint(h, clean) · T when h is
                                        independent of the noise given the clean class),

with T̂ the row-normalised joint matrix of the current predictions against the noisy labels
(what T would be if the predictions were the clean labels). Starting from the arg-max, it
alternates: estimate T̂, maximise over b (coordinate ascent, each class's offset exactly over
the points where a validation prediction changes), repeat. The estimate is noisy on a few
hundred labels (T̂ has C² entries), so ``choose_offsets`` can require a number of validation
labels per entry of T̂, and a positive det T̂, before it applies the offsets. Two bootstrap
criteria were measured and dropped (docs/toolkit.md): the share of resamples whose refitted
rule gains trusted every run, pair flips included, where the offsets cost 5 points (the gain is
measured through the T̂ of the offsets themselves); the share of refits that side with the
offsets rejected the runs where they gain 40-60 points as often as those where they lose.
"""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

ROUNDS = 5  # T̂ re-estimations; the measured rule settles within three
SWEEPS = 2  # coordinate-ascent passes over the classes per T̂


def _joint(pred: np.ndarray, noisy: np.ndarray, C: int) -> np.ndarray:
    joint = np.zeros((C, C))
    np.add.at(joint, (pred, noisy), 1.0)
    return joint / len(noisy)


def _T_hat(pred: np.ndarray, noisy: np.ndarray, C: int) -> Optional[np.ndarray]:
    """T̂: the row-normalised joint matrix of the predictions (as stand-ins for clean labels)
    against the noisy labels; None if a class is never predicted."""
    joint = _joint(pred, noisy, C)
    rows = joint.sum(axis=1, keepdims=True)
    return None if (rows <= 0).any() else joint / rows


def _inverse_estimate(pred: np.ndarray, noisy: np.ndarray, C: int) -> Optional[np.ndarray]:
    """T̂⁻¹; None if T̂ is singular (a class never predicted, or rows that say the same)."""
    T_hat = _T_hat(pred, noisy, C)
    if T_hat is None or abs(np.linalg.det(T_hat)) < 1e-6:
        return None
    return np.linalg.inv(T_hat)


def estimated_accuracy(scores: np.ndarray, noisy: np.ndarray, offsets: np.ndarray,
                       T_inverse: np.ndarray) -> float:
    """trace(joint(argmax(scores + offsets), noisy) · T̂⁻¹) = mean of T̂⁻¹[noisy, prediction]."""
    pred = np.argmax(scores + offsets, axis=1)
    return float(T_inverse[noisy, pred].mean())


def _best_offset(scores: np.ndarray, noisy: np.ndarray, offsets: np.ndarray, k: int,
                 T_inverse: np.ndarray) -> float:
    """The offset of class k that maximises the estimated accuracy, the others fixed."""
    others = scores + offsets
    others[:, k] = -np.inf
    rival = others.argmax(axis=1)
    # Row i is predicted k iff b > margin_i (ties: the rival wins, as argmax takes the first).
    margin = others[np.arange(len(noisy)), rival] - scores[:, k]
    gain_if_k = T_inverse[noisy, k] - T_inverse[noisy, rival]
    order = np.argsort(margin, kind="stable")
    margin, gain_if_k = margin[order], gain_if_k[order]
    # Candidate b just above margin[m - 1]: rows 0..m-1 go to k; b below every margin: none does.
    totals = np.concatenate([[0.0], np.cumsum(gain_if_k)])
    candidates = np.concatenate([[margin[0] - 1.0],
                                 (margin + np.append(margin[1:], margin[-1] + 2.0)) / 2.0])
    # Keep the current offset when it ties the best (the boundary moves only for a real gain).
    current = totals[np.searchsorted(margin, offsets[k], side="left")]
    # A count inside a run of tied margins is not reachable by any b.
    reachable = np.concatenate([[True], np.append(margin[:-1] < margin[1:], True)])
    best = int(np.argmax(np.where(reachable, totals, -np.inf)))
    return float(offsets[k]) if totals[best] <= current + 1e-12 else float(candidates[best])


def fit_offsets(scores: np.ndarray, noisy: np.ndarray, rounds: int = ROUNDS) -> np.ndarray:
    """Per-class offsets from validation scores (log-probabilities, N x C) and noisy labels."""
    n, C = scores.shape
    offsets = np.zeros(C)
    for _ in range(rounds):
        T_inverse = _inverse_estimate(np.argmax(scores + offsets, axis=1), noisy, C)
        if T_inverse is None:
            break
        before = offsets.copy()
        for _ in range(SWEEPS):
            for k in range(1 if C == 2 else 0, C):  # C = 2: one threshold, on class 1
                offsets[k] = _best_offset(scores, noisy, offsets, k, T_inverse)
        if np.array_equal(before, offsets):
            break
    return offsets


def estimated_gain(scores: np.ndarray, noisy: np.ndarray, offsets: np.ndarray) -> float:
    """Estimated clean accuracy of the offsets minus the arg-max's, both through the T̂ of the
    offsets' predictions (0 when that T̂ is singular)."""
    C = scores.shape[1]
    T_inverse = _inverse_estimate(np.argmax(scores + offsets, axis=1), noisy, C)
    if T_inverse is None:
        return 0.0
    return (estimated_accuracy(scores, noisy, offsets, T_inverse)
            - estimated_accuracy(scores, noisy, np.zeros(C), T_inverse))


@dataclass
class Decision:
    """What ``choose_offsets`` decided, for the record."""

    offsets: np.ndarray  # added to the logits at prediction time (zeros: the arg-max)
    applied: bool
    gain: float  # estimated gain of the fitted offsets over the arg-max, validation split
    labels_per_entry: float  # validation labels per entry of T̂: n / C²
    det_T_hat: float  # det of the T̂ of the offsets' predictions


def choose_offsets(scores: np.ndarray, noisy: np.ndarray, *, min_gain: float = 0.02,
                   min_labels_per_entry: float = 0.0, positive_det: bool = False) -> Decision:
    """Fits the offsets on the validation split and keeps them when their estimated gain
    exceeds ``min_gain``, T̂ rests on at least ``min_labels_per_entry`` labels per entry and,
    with ``positive_det``, det T̂ > 0: the new predictions agree with the noisy labels more than
    they disagree, as under every T of the paper (det T = 1 - r); a negative det means the
    offsets turned the classifier's sense around, which no noise the rule can trust explains."""
    scores = np.asarray(scores, dtype=np.float64)
    noisy = np.asarray(noisy, dtype=np.int64)
    C = scores.shape[1]
    per_entry = len(noisy) / C ** 2
    offsets = fit_offsets(scores, noisy)
    gain = estimated_gain(scores, noisy, offsets)
    T_hat = _T_hat(np.argmax(scores + offsets, axis=1), noisy, C)
    det = 0.0 if T_hat is None else float(np.linalg.det(T_hat))
    applied = bool(gain > min_gain and per_entry >= min_labels_per_entry
                   and (det > 0 or not positive_det))
    return Decision(offsets if applied else np.zeros(C), applied, gain, per_entry, det)


# ---------------------------------------------------------------------------------------------
# Two classes: the threshold rule.

EM_ITERATIONS = 200  # the mixture's EM; it settles within a few dozen on digits


_lgamma = np.vectorize(math.lgamma, otypes=[np.float64])  # without scipy


def _betaln(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log B(a, b), elementwise."""
    return _lgamma(a) + _lgamma(b) - _lgamma(a + b)


def change_point_threshold(margin: np.ndarray, noisy: np.ndarray) -> Optional[float]:
    """The posterior median of the cut between the classes along the sorted margins.

    For a cut after the k-th smallest margin, the noisy labels on each side are Bernoulli draws
    with that side's own rate, integrated out under a uniform prior: likelihood
    B(ones_left + 1, zeros_left + 1) · B(ones_right + 1, zeros_right + 1). The threshold's value
    is uniform a priori, so the cut after the k-th margin has prior weight proportional to the
    gap m_(k+1) - m_(k). None when every margin is equal (no cut to place).
    """
    order = np.argsort(margin, kind="stable")
    m, y = margin[order], noisy[order].astype(np.float64)
    n = len(m)
    gaps = np.diff(m)
    if n < 2 or not (gaps > 0).any():
        return None
    ones_left = np.cumsum(y)[:-1]  # cut after sample k (k = 1 .. n-1): both sides non-empty
    left = np.arange(1, n, dtype=np.float64)
    ones_right = y.sum() - ones_left
    log_post = (_betaln(ones_left + 1, left - ones_left + 1)
                + _betaln(ones_right + 1, (n - left) - ones_right + 1))
    with np.errstate(divide="ignore"):
        log_post = log_post + np.log(gaps)  # a zero gap (tied margins) is no place for a cut
    weight = np.exp(log_post - log_post.max())
    k = int(np.searchsorted(np.cumsum(weight) / weight.sum(), 0.5))
    return float((m[k] + m[k + 1]) / 2.0)


def mixture_threshold(margin: np.ndarray, noisy: np.ndarray,
                      iterations: int = EM_ITERATIONS) -> Optional[float]:
    """Where the two weighted components of a Gaussian mixture of the margins cross.

    Component c has weight pi_c, mean mu_c, spread sigma_c and emits noisy label j with
    probability T[c, j]; EM from the arg-max split (or the median split when the arg-max puts
    everything on one side). None when the fit does not give two components with class 1 to the
    right (mu_0 < mu_1) and a crossing between their means.
    """
    m = margin.astype(np.float64)
    y = noisy.astype(np.int64)
    side = m > 0.0
    if side.all() or not side.any():
        side = m > np.median(m)
        if side.all() or not side.any():
            return None
    resp = np.stack([~side, side], axis=1).astype(np.float64)
    floor = 1e-6 * max(float(m.max() - m.min()), 1e-12)
    for _ in range(iterations):
        weight = resp.sum(axis=0)
        if (weight <= 0).any():
            return None
        pi = weight / len(m)
        mu = (resp * m[:, None]).sum(axis=0) / weight
        sigma = np.sqrt((resp * (m[:, None] - mu) ** 2).sum(axis=0) / weight) + floor
        channel = np.stack([np.bincount(y, weights=resp[:, c], minlength=2)[:2] for c in (0, 1)])
        channel = (channel + 0.5) / (channel + 0.5).sum(axis=1, keepdims=True)
        log_joint = (np.log(pi) - np.log(sigma) - 0.5 * ((m[:, None] - mu) / sigma) ** 2
                     + np.log(channel[:, y].T))
        log_joint -= log_joint.max(axis=1, keepdims=True)
        new = np.exp(log_joint)
        new /= new.sum(axis=1, keepdims=True)
        if np.abs(new - resp).max() < 1e-10:
            resp = new
            break
        resp = new
    if not mu[0] < mu[1]:
        return None
    grid = np.linspace(mu[0], mu[1], 4001)
    log_density = (np.log(pi) - np.log(sigma)
                   - 0.5 * ((grid[:, None] - mu) / sigma) ** 2)  # per component, weighted
    right = np.flatnonzero(log_density[:, 1] > log_density[:, 0])
    return float(grid[right[0]]) if len(right) else None


def score_density(margin: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A Gaussian kernel density estimate of the margins at ``points`` (Silverman's bandwidth)."""
    spread = min(np.std(margin), (np.percentile(margin, 75) - np.percentile(margin, 25)) / 1.34)
    bandwidth = max(1.06 * spread * len(margin) ** -0.2, 1e-12)
    z = (np.asarray(points, dtype=np.float64)[:, None] - margin[None, :]) / bandwidth
    return np.exp(-0.5 * z ** 2).sum(axis=1) / (len(margin) * bandwidth * math.sqrt(2 * math.pi))


@dataclass
class Threshold:
    """What ``choose_threshold`` decided, for the record."""

    offsets: np.ndarray  # [0, -threshold]: predict class 1 iff z_1 - z_0 > threshold
    threshold: float  # 0: the arg-max
    chosen: str  # 'change-point', 'mixture' or 'argmax' (neither estimate exists, the
    # validation labels hold one class only, or a score is not finite)
    change_point: Optional[float]
    mixture: Optional[float]


def choose_threshold(scores: np.ndarray, noisy: np.ndarray) -> Threshold:
    """The threshold rule of the module's docstring for two-class validation scores (N x 2
    logits or log-probabilities) and noisy labels."""
    scores = np.asarray(scores, dtype=np.float64)
    noisy = np.asarray(noisy, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[1] != 2:
        raise ValueError(f"argument 'scores' must have shape (N, 2), got {scores.shape}")
    margin = scores[:, 1] - scores[:, 0]
    # One noisy class only, or a score that is not a number: nothing to read a cut from.
    if np.bincount(noisy, minlength=2).min() == 0 or not np.isfinite(margin).all():
        return Threshold(np.zeros(2), 0.0, "argmax", None, None)
    candidates = {"change-point": change_point_threshold(margin, noisy),
                  "mixture": mixture_threshold(margin, noisy)}
    found = {name: t for name, t in candidates.items() if t is not None}
    if not found:
        chosen, threshold = "argmax", 0.0
    else:
        names = list(found)
        density = score_density(margin, np.array([found[name] for name in names]))
        chosen = names[int(np.argmin(density))]  # ties: the change point (listed first)
        threshold = found[chosen]
    return Threshold(np.array([0.0, -threshold]), threshold, chosen,
                     candidates["change-point"], candidates["mixture"])
