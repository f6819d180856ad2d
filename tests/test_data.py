"""dmi_ext.toolkit.data: bundled digits, user files, stratified noisy splits."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dmi_ext.toolkit.noise import binary_case_matrix, pair_flip_matrix  # noqa: E402
from dmi_ext.toolkit.data import (DIGIT_PAIRS, load_dataset, make_splits,  # noqa: E402
                                  noise_transition, stratified_indices)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_builtin_datasets(digits):
    assert digits.x.shape == (1797, 8, 8) and digits.num_classes == 10
    binary = load_dataset("digits-binary")
    assert binary.num_classes == 2
    assert np.sum(binary.y == 0) == 178  # digit 0 is class 0, the 10 % class
    assert np.array_equal(binary.y == 0, digits.y == 0)


def test_split_is_stratified_disjoint_and_seeded(digits):
    train, val, test = stratified_indices(digits.y, 0.2, 0.2, seed=3)
    assert len(np.intersect1d(train, val)) == len(np.intersect1d(train, test)) == 0
    assert len(train) + len(val) + len(test) == len(digits.y)
    for part in (val, test):
        assert len(part) == pytest.approx(0.2 * len(digits.y), abs=1)
        share = np.bincount(digits.y[part], minlength=10) / len(part)
        assert np.max(np.abs(share - np.bincount(digits.y) / len(digits.y))) < 0.01
    again = stratified_indices(digits.y, 0.2, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again))
    assert not np.array_equal(train, stratified_indices(digits.y, 0.2, 0.2, seed=4)[0])


def test_noise_on_train_and_validation_only(digits):
    splits = make_splits(digits, pair_flip_matrix(10, DIGIT_PAIRS, 0.7), seed=0)
    assert (splits.test.y == splits.test.clean_y).all()
    for part in (splits.train, splits.val):
        assert 0.2 < part.noise_rate < 0.36  # 4 of 10 classes flip at 0.7: 0.28 expected
        flipped = part.clean_y[part.y != part.clean_y]
        assert set(flipped.tolist()) <= {7, 3, 5, 4}
    # standardised with training statistics: the training features are centred
    assert float(splits.train.x.mean(0).abs().max()) < 1e-4
    assert float(splits.test.x.mean(0).abs().max()) > 1e-3


def test_same_seed_same_splits_and_noise(digits):
    T = binary_case_matrix(3, 0.5)
    binary = load_dataset("digits-binary")
    a, b = make_splits(binary, T, seed=7), make_splits(binary, T, seed=7)
    assert (a.train.y == b.train.y).all() and (a.val.x == b.val.x).all()
    assert not (a.train.y == make_splits(binary, T, seed=8).train.y).all()


def test_npz_round_trip_with_label_remapping(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 5))
    y = np.array([3, 7] * 20)
    path = tmp_path / "mine.npz"
    np.savez(path, X=x, y=y)
    data = load_dataset(str(path))
    assert data.class_names == ("3", "7")
    assert np.array_equal(data.y, (y == 7).astype(np.int64))
    assert np.allclose(data.x, x.astype(np.float32))


def test_csv_with_and_without_header(tmp_path):
    rows = [[0.5, 1.0, 0], [1.5, 2.0, 1], [2.5, 3.0, 1]]
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(str(v) for v in row) for row in rows))
    headed = tmp_path / "headed.csv"
    headed.write_text("a,b,label\n" + plain.read_text())
    for path in (plain, headed):
        data = load_dataset(str(path))
        assert data.x.shape == (3, 2) and list(data.y) == [0, 1, 1]


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, pattern", [
    (lambda d: _write(d / "bad.csv", "1,2,0\n3,x,1\n"), r"bad.csv: line 2: 'x' is not a number"),
    (lambda d: _write(d / "ragged.csv", "1,2,0\n3,1\n"), r"line 2 has 2 columns, expected 3"),
    (lambda d: _write(d / "frac.csv", "1,2,0.5\n3,4,1\n"), r"labels must be integers, found 0.5"),
    (lambda d: _write(d / "one.csv", "1,2,0\n3,4,0\n"), r"at least 2 distinct classes"),
    (lambda d: _write(d / "empty.csv", ""), r"the CSV file is empty"),
    (lambda d: _write(d / "header.csv", "a,b,y\n"), r"has a header but no data rows"),
    (lambda d: _write(d / "junk.npz", "not a zip"), r"junk.npz: not a readable .npz archive"),
    (lambda d: _write(d / "data.txt", "1,2"), r"'data' must be one of .* or a .npz / .csv file"),
    (lambda d: str(d / "missing.csv"), r"no such file"),
])
def test_bad_files_are_rejected_with_a_clear_message(tmp_path, make, pattern):
    with pytest.raises((ValueError, FileNotFoundError), match=pattern):
        load_dataset(make(tmp_path))


@pytest.mark.parametrize("arrays, pattern", [
    ({"X": np.zeros((4, 2))}, r"needs arrays 'X' and 'y', found \['X'\]"),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1, None, 1], dtype=object)}, r"Python objects"),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1, 0])}, r"'X' has 4 rows but 'y' has 3"),
    ({"X": np.full((4, 2), np.inf), "y": np.array([0, 1, 0, 1])}, r"non-finite value in row 0"),
    ({"X": np.zeros(4), "y": np.array([0, 1, 0, 1])}, r"'X' must be a numeric array"),
    ({"X": np.zeros((4, 2)), "y": np.zeros((4, 2))}, r"'y' must be 1-D"),
])
def test_bad_npz_contents_are_rejected(tmp_path, arrays, pattern):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=pattern):
        load_dataset(str(path))


def test_noise_transition_checks_the_class_count():
    with pytest.raises(ValueError, match=r"noise 'binary3' is for 2 classes, the data has 10"):
        noise_transition("binary3", 10, 0.5)
    with pytest.raises(ValueError, match=r"'transition' is 2 x 2 but the data has 10 classes"):
        noise_transition("matrix", 10, 0.0, matrix=np.eye(2))
    with pytest.raises(ValueError, match=r"'noise' must be one of"):
        noise_transition("gaussian", 10, 0.5)
    assert np.array_equal(noise_transition("none", 3, 0.9), np.eye(3))


def test_too_few_samples_per_class_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.npz"
    np.savez(path, X=np.zeros((5, 2)), y=np.array([0, 0, 0, 0, 1]))
    data = load_dataset(str(path))
    with pytest.raises(ValueError, match=r"cannot split 5 samples.*smallest class has 1"):
        make_splits(data, np.eye(2), seed=0)


def test_standardize_floor_keeps_nearly_constant_features_small(digits):
    T = np.eye(10)
    plain = make_splits(digits, T, seed=0, inputs="standardize")
    floored = make_splits(digits, T, seed=0)  # the default
    # A border pixel that is almost always blank: standardising blows its rare ink up to 33
    # standard deviations (66 on the test part); with the floor no feature exceeds 13.
    assert float(plain.train.x.abs().max()) > 20.0
    assert float(floored.train.x.abs().max()) < 15.0
    # Features with a real spread are standardised as before, and everything is centred.
    spread = plain.feature_scale > 0.25 * np.sqrt(np.mean(np.where(
        plain.feature_scale == 1.0, 0.0, plain.feature_scale) ** 2))
    assert np.array_equal(floored.feature_scale[spread], plain.feature_scale[spread])
    assert float(floored.train.x.mean(0).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="argument 'inputs' must be one of"):
        make_splits(digits, T, seed=0, inputs="whiten")
