"""dmi_ext.toolkit.noise: transition matrices, their validation, and seeded label corruption."""

import numpy as np
import pytest
import torch

from dmi_ext.toolkit.noise import (binary_case_matrix, corrupt_labels, empirical_transition_matrix,
                           pair_flip_matrix, uniform_noise_matrix, validate_transition_matrix)

PAIRS = ((7, 1), (3, 8), (5, 6), (4, 9))


def test_uniform_matrix_entries():
    T = uniform_noise_matrix(4, 0.3)
    assert np.allclose(np.diag(T), 0.7)
    assert np.allclose(T[~np.eye(4, dtype=bool)], 0.1)
    assert np.allclose(T.sum(axis=1), 1.0)


def test_pair_flip_matrix_entries():
    T = pair_flip_matrix(10, PAIRS, 0.7)
    for source, destination in PAIRS:
        assert T[source, source] == pytest.approx(0.3)
        assert T[source, destination] == pytest.approx(0.7)
    for clean_class in (0, 1, 2, 6, 8, 9):  # no pair's source: untouched
        assert np.array_equal(T[clean_class], np.eye(10)[clean_class])
    assert np.allclose(T.sum(axis=1), 1.0)


def test_binary_cases_match_the_paper():
    r = 0.4
    assert np.allclose(binary_case_matrix(1, r), [[0.8, 0.2], [0.2, 0.8]])
    assert np.allclose(binary_case_matrix(2, r), [[0.6, 0.4], [0.0, 1.0]])
    assert np.allclose(binary_case_matrix(3, r), [[1.0, 0.0], [0.4, 0.6]])


@pytest.mark.parametrize("T, r, expected_rate", [
    (uniform_noise_matrix(10, 0.3), 0.3, 0.3),
    (pair_flip_matrix(10, PAIRS, 0.6), 0.6, 0.4 * 0.6),  # 4 of 10 balanced classes flip
    (binary_case_matrix(3, 0.7), 0.7, 0.5 * 0.7),  # half the labels are class 1
])
def test_realised_rate_and_empirical_matrix_are_close_to_nominal(T, r, expected_rate):
    C = T.shape[0]
    clean = np.repeat(np.arange(C), 20_000)
    noisy = corrupt_labels(clean, T, seed=0)
    assert noisy.noise_rate == pytest.approx(expected_rate, abs=0.01)
    assert np.max(np.abs(noisy.empirical_transition - T)) < 0.02
    assert noisy.noise_rate == pytest.approx(np.mean(noisy.labels != clean))


def test_zero_probability_labels_are_never_drawn():
    T = binary_case_matrix(3, 0.9)  # class 0 never becomes class 1
    clean = np.zeros(50_000, dtype=np.int64)
    assert np.all(corrupt_labels(clean, T, seed=1).labels == 0)
    # a zero-probability last column, in a row that sums to 1 only within the tolerance
    T = np.array([[0.1, 0.2, 0.7 - 1e-12, 0.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    assert corrupt_labels(np.zeros(50_000, dtype=np.int64), T, seed=2).labels.max() == 2


def test_same_seed_same_labels_and_inputs_untouched():
    T = uniform_noise_matrix(5, 0.5)
    clean = np.arange(1000) % 5
    before = clean.copy()
    first = corrupt_labels(clean, T, seed=42).labels
    assert np.array_equal(first, corrupt_labels(clean, T, seed=42).labels)
    assert not np.array_equal(first, corrupt_labels(clean, T, seed=43).labels)
    assert np.array_equal(clean, before)
    # torch input and a numpy Generator: the same draw as the integer seed
    from_torch = corrupt_labels(torch.from_numpy(clean), T, np.random.default_rng(42)).labels
    assert np.array_equal(first, from_torch)


def test_generator_is_advanced_so_successive_draws_differ():
    rng = np.random.default_rng(0)
    clean = np.zeros(100, dtype=np.int64)
    T = uniform_noise_matrix(3, 0.5)
    assert not np.array_equal(corrupt_labels(clean, T, rng).labels,
                              corrupt_labels(clean, T, rng).labels)


def test_empirical_matrix_rows_of_absent_classes_are_zero():
    E = empirical_transition_matrix([0, 0, 2], [0, 1, 2], 3)
    assert np.allclose(E, [[0.5, 0.5, 0], [0, 0, 0], [0, 0, 1]])


@pytest.mark.parametrize("T, pattern", [
    ([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], r"'T' must be a square matrix, got shape \(2, 3\)"),
    ([1.0, 0.0], r"'T' must be a square matrix, got shape \(2,\)"),
    ([[1.0]], r"'T' must be at least 2 x 2"),
    ([[1.2, -0.2], [0.0, 1.0]], r"'T' has a negative entry -0.2 at \[0, 1\]"),
    ([[0.5, 0.4], [0.0, 1.0]], r"'T' row 0 sums to 0.9, not 1"),
    ([[0.5, 0.5], [np.nan, 1.0]], r"'T' has a non-finite entry nan at \[1, 0\]"),
    ([["a", "b"], ["c", "d"]], r"'T' must be a numeric matrix"),
])
def test_bad_matrices_are_rejected_naming_the_argument(T, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        validate_transition_matrix(T)


def test_validation_names_the_callers_argument_and_copies():
    with pytest.raises(ValueError, match=r"'transition' row 1 sums to 1.5"):
        validate_transition_matrix([[1.0, 0.0], [0.5, 1.0]], name="transition")
    T = np.eye(3)
    checked = validate_transition_matrix(T)
    checked[0, 0] = 5.0
    assert T[0, 0] == 1.0


@pytest.mark.parametrize("call, pattern", [
    (lambda: uniform_noise_matrix(1, 0.1), r"'num_classes' must be an integer >= 2, got 1"),
    (lambda: uniform_noise_matrix(3, 1.5), r"'rate' must be in \[0, 1\], got 1.5"),
    (lambda: uniform_noise_matrix(3, float("nan")), r"'rate' must be in \[0, 1\], got nan"),
    (lambda: pair_flip_matrix(4, [(0, 4)], 0.2), r"'pairs' has class 4 in \(0, 4\)"),
    (lambda: pair_flip_matrix(4, [(2, 2)], 0.2), r"'pairs' flips class 2 to itself"),
    (lambda: pair_flip_matrix(4, [(0, 1), (0, 2)], 0.2), r"'pairs' lists source class 0 twice"),
    (lambda: binary_case_matrix(4, 0.2), r"'case' must be 1, 2 or 3, got 4"),
    (lambda: corrupt_labels([0, 3], np.eye(3)), r"'labels' has label 3 outside \[0, 3\)"),
    (lambda: corrupt_labels([0.0, 1.0], np.eye(3)), r"'labels' must hold integers"),
    (lambda: corrupt_labels([0, 1], np.eye(2), seed="x"), r"'seed' must be an int"),
])
def test_bad_arguments_are_rejected_naming_the_argument(call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call()
