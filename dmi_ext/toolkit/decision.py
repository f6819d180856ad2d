"""A decision rule for a trained model, chosen from noisy validation labels through an estimate of T.

L_DMI's model may rank the samples well and still put its arg-max boundary in the wrong place:
for two classes, |det| of the joint matrix of hard predictions against noisy labels is Youden's J,
which is blind to the class prior. The rule moves the boundary by per-class offsets b added to
the logits (prediction argmax(z + b)), picked to maximise the estimated clean accuracy

    trace(joint(h, noisy) · T̂⁻¹)      (joint(h, noisy) = joint(h, clean) · T when h is
                                        independent of the noise given the clean class),

with T̂ the row-normalised joint matrix of the current predictions against the noisy labels
(what T would be if the predictions were the clean labels). Starting from the arg-max, it
alternates: estimate T̂, maximise over b (coordinate ascent, each class's offset exactly over
the points where a validation prediction changes), repeat. For C = 2 that is one threshold.

The estimate is noisy on a few hundred labels (T̂ has C² entries), so ``choose_offsets`` can
require a number of validation labels per entry of T̂, and a positive det T̂, before it applies
the offsets. Two
bootstrap criteria were measured and dropped (docs/toolkit.md): the share of resamples whose
refitted rule gains trusted every run, pair flips included, where the offsets cost 5 points (the
gain is measured through the T̂ of the offsets themselves); the share of refits that side with
the offsets rejected the runs where they gain 40-60 points as often as those where they lose.
Only noisy labels are read, never clean ones.
"""

from dataclasses import dataclass
from typing import Optional

import numpy as np

ROUNDS = 5  # T̂ re-estimations; the measured rule settles within three
SWEEPS = 2  # coordinate-ascent passes over the classes per T̂


def _joint(pred: np.ndarray, noisy: np.ndarray, C: int) -> np.ndarray:
    joint = np.zeros((C, C))
    np.add.at(joint, (pred, noisy), 1.0)
    return joint / len(noisy)


def _inverse_estimate(pred: np.ndarray, noisy: np.ndarray, C: int) -> Optional[np.ndarray]:
    """T̂⁻¹ from the predictions as stand-ins for clean labels; None if T̂ is singular (a class
    never predicted, or rows that say the same)."""
    joint = _joint(pred, noisy, C)
    rows = joint.sum(axis=1, keepdims=True)
    if (rows <= 0).any():
        return None
    T_hat = joint / rows
    if abs(np.linalg.det(T_hat)) < 1e-6:
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
    joint = _joint(np.argmax(scores + offsets, axis=1), noisy, C)
    rows = joint.sum(axis=1, keepdims=True)
    det = float(np.linalg.det(joint / rows)) if (rows > 0).all() else 0.0
    applied = bool(gain > min_gain and per_entry >= min_labels_per_entry
                   and (det > 0 or not positive_det))
    return Decision(offsets if applied else np.zeros(C), applied, gain, per_entry, det)
