"""digits-pairs: 100 classes of two digit images side by side, pooled splits, tens-digit flips."""

import numpy as np
import pytest

pytest.importorskip("sklearn")

from dmi_ext.toolkit.cli import main  # noqa: E402
from dmi_ext.toolkit.data import (DigitPairs, digit_flip_matrix, load_dataset,  # noqa: E402
                                  make_splits, noise_transition)


@pytest.fixture(scope="module")
def pairs():
    return load_dataset("digits-pairs")


def test_pairs_are_drawn_from_disjoint_digit_pools(pairs):
    assert isinstance(pairs, DigitPairs) and pairs.num_classes == 100
    data, (train, val, test) = pairs.compose(seed=3, val_fraction=0.2, test_fraction=0.2)
    assert data.x.shape[1:] == (8, 16)
    # every class equally often in every part (200 / 67 / 67 per class by default)
    for rows, per_class in ((train, 200), (val, 67), (test, 67)):
        assert (np.bincount(data.y[rows], minlength=100) == per_class).all()
    # the label is 10 a + b of the left and right digit: each half is an image of that digit
    digits = {img.tobytes(): int(d) for img, d in zip(pairs.digits.x, pairs.digits.y)}
    left, right = data.x[train[::97], :, :8], data.x[train[::97], :, 8:]
    labels = data.y[train[::97]]
    assert [digits[a.tobytes()] * 10 + digits[b.tobytes()] for a, b in zip(left, right)] \
        == labels.tolist()

    def images(rows):
        return {h.tobytes() for h in np.concatenate([data.x[rows, :, :8], data.x[rows, :, 8:]])}

    # no half of a test (or validation) pair is a half of a training pair, though digits repeat
    # across pairs within a part
    assert not images(test) & images(train) and not images(val) & images(train)
    assert len(images(train)) < 2 * len(train)


def test_splits_noise_and_determinism(pairs):
    T = noise_transition("digitflip", 100, 0.5)
    a = make_splits(pairs, T, seed=1)
    b = make_splits(pairs, T, seed=1)
    assert a.num_classes == 100 and a.sample_shape == (8, 16)
    assert (a.train.x == b.train.x).all() and (a.train.y == b.train.y).all()
    assert (a.test.y == a.test.clean_y).all()  # test labels stay clean
    # only the tens digit of 7x, 3x, 5x, 4x flips, to 1x, 8x, 6x, 9x: 40 % of the classes at
    # rate 0.5 -> about 20 % of the labels
    flipped = a.train.y != a.train.clean_y
    assert 0.17 < float(flipped.double().mean()) < 0.23
    src, dst = a.train.clean_y[flipped].numpy(), a.train.y[flipped].numpy()
    assert (src % 10 == dst % 10).all()
    assert set(zip((src // 10).tolist(), (dst // 10).tolist())) == {(7, 1), (3, 8), (5, 6),
                                                                     (4, 9)}


def test_digit_flip_matrix():
    T = digit_flip_matrix(0.3)
    assert T.shape == (100, 100) and np.allclose(T.sum(1), 1)
    assert T[72, 12] == pytest.approx(0.3) and T[72, 72] == pytest.approx(0.7)
    assert T[12, 12] == 1.0 and T[27, 27] == 1.0  # units digits never flip
    with pytest.raises(ValueError, match="digits-pairs"):
        noise_transition("digitflip", 10, 0.3)


def test_cli_train_on_digits_pairs(capsys):
    code = main(["train", "--noise", "digitflip", "--rate", "0.5", "--method", "dmi",
                 "--seeds", "1", "--ce-epochs", "1", "--dmi-epochs", "1",
                 "--dmi-batch-size", "4096", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "dmi on digits-pairs, noise digitflip r = 0.5" in out
