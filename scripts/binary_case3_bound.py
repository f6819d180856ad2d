"""How well can maximising L_DMI's objective do on digits' binary case (3), at best?

Case (3) flips "rest" (class 1, 90 %) to "digit 0" (class 0, 10 %) with rate r. For two classes
det U = P0 P1 (E[q | noisy 0] - E[q | noisy 1]), q = P(predict class 0), so on a training set the
objective is the sum of q_i c_i with c_i = 1/P0 for a noisy 0 and -1/P1 for a noisy 1. A
classifier that tells the ten digits apart (as the networks here do) can give each digit its own
q; the empirical optimum then predicts class 0 for every digit whose c-sum is positive. For a
"rest" digit the c-sum has mean -0.15 and standard deviation 2.3 per sample, so with about 108
training samples per digit a good share of the nine "rest" digits come out positive. This prints
the clean accuracy of that empirical optimum (every digit 0 right, whole "rest" digits wrong)
over many splits: the ceiling of L_DMI on this data, before any optimisation or selection error.
Reads training labels only. Run from the repository root:
    PYTHONPATH=. python scripts/binary_case3_bound.py
"""

import numpy as np
from sklearn.datasets import load_digits

from dmi_ext.toolkit.data import load_dataset, make_splits, noise_transition, stratified_indices

SPLITS = 200


def main():
    digit = load_digits().target
    dataset = load_dataset("digits-binary")
    print("  r   mean accuracy of the empirical L_DMI optimum   P(accuracy >= 85 %)")
    for rate in (0.3, 0.5, 0.7, 0.9):
        accuracies = []
        for seed in range(SPLITS):
            splits = make_splits(dataset, noise_transition("binary3", 2, rate), seed)
            train = stratified_indices(dataset.y, 0.2, 0.2, seed)[0]
            noisy = splits.train.y.numpy()
            p0 = np.mean(noisy == 0)
            c = np.where(noisy == 0, 1.0 / p0, -1.0 / (1.0 - p0))
            wrong = sum(c[digit[train] == d].sum() > 0 for d in range(1, 10))
            share = np.mean(dataset.y == 1)  # the "rest" share of the clean test set
            accuracies.append(100.0 * (1.0 - share * wrong / 9))
        accuracies = np.array(accuracies)
        print(f"{rate:4.1f}   {accuracies.mean():5.1f} %{'':38}{np.mean(accuracies >= 85):.2f}")


if __name__ == "__main__":
    main()
