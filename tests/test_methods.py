"""The methods' losses against hand-computed values, the LCCN sampler, and the training loop."""

import math

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

import dmi_ext  # noqa: E402
from dmi_ext.toolkit.data import load_dataset, make_splits, noise_transition  # noqa: E402
from dmi_ext.toolkit.methods import (METHODS, ForwardCorrectedCrossEntropy,  # noqa: E402
                                     GeneralizedCrossEntropy, LatentLabelSampler,
                                     anchor_transition, run_method, warm_up)
from dmi_ext.toolkit.train import Phase, TrainConfig, fit  # noqa: E402

# Two rows whose softmax is (0.25, 0.75) and (0.75, 0.25).
LOGITS = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], dtype=torch.float64)


def test_gce_hand_computed():
    target = torch.tensor([1, 1])  # p_y = 0.75, then 0.25
    expected = ((1 - 0.75 ** 0.7) / 0.7 + (1 - 0.25 ** 0.7) / 0.7) / 2
    assert float(GeneralizedCrossEntropy(0.7)(LOGITS, target)) == pytest.approx(expected)
    # q = 1 is the mean absolute error 1 - p_y
    assert float(GeneralizedCrossEntropy(1.0)(LOGITS, target)) == pytest.approx(0.5)


def test_forward_correction_hand_computed():
    T = [[0.8, 0.2], [0.1, 0.9]]
    target = torch.tensor([0, 1])
    # row 0: p = (0.25, 0.75), label 0: 0.25 * 0.8 + 0.75 * 0.1 = 0.275
    # row 1: p = (0.75, 0.25), label 1: 0.75 * 0.2 + 0.25 * 0.9 = 0.375
    expected = -(math.log(0.275) + math.log(0.375)) / 2
    assert float(ForwardCorrectedCrossEntropy(T)(LOGITS, target)) == pytest.approx(expected)


def test_forward_correction_with_identity_is_cross_entropy_and_zeros_stay_finite():
    target = torch.tensor([1, 0])
    loss = ForwardCorrectedCrossEntropy(np.eye(2))(LOGITS, target)
    assert float(loss) == pytest.approx(float(nn.functional.cross_entropy(LOGITS, target)))
    logits = LOGITS.clone().requires_grad_()
    loss = ForwardCorrectedCrossEntropy([[1.0, 0.0], [0.3, 0.7]])(logits, target)
    loss.backward()
    # row 0, label 1: only class 1 can produce it: -log(0.75 * 0.7); row 1, label 0: 0.75 + 0.25 * 0.3
    assert float(loss.detach()) == pytest.approx(-(math.log(0.75 * 0.7) + math.log(0.75 + 0.25 * 0.3)) / 2)
    assert torch.isfinite(logits.grad).all()


def test_dmi_loss_hand_computed():
    # U = (1/2) [[0.25, 0.75], [0.75, 0.25]] (row = label): |det U| = |0.0625 - 0.5625| / 4
    loss = dmi_ext.DMILoss()(LOGITS, torch.tensor([0, 1]))
    assert float(loss) == pytest.approx(-math.log(0.125))


def test_anchor_points_and_the_percentile_filter():
    p0 = np.arange(100) / 100.0
    probs = np.stack([p0, 1.0 - p0], axis=1)
    # class 0's anchor is the row with p0 = 0.99, class 1's the row with p0 = 0
    assert np.allclose(anchor_transition(probs), [[0.99, 0.01], [0.0, 1.0]])
    # filtered: the rows at or above the 97th percentile are skipped (0.97, 0.98, 0.99 for
    # class 0; 1.0 and 0.99 for class 1), the best of the rest is the anchor
    assert np.allclose(anchor_transition(probs, filter_outliers=True),
                       [[0.96, 0.04], [0.03, 0.97]])


def _sampler_with_background():
    """Row 0 (p = (1, 0), noisy 0) plus 20 rows whose latent labels give n = [[8, 2], [2, 8]]."""
    z = [0] + [0] * 10 + [1] * 10
    noisy = [0] + [0] * 8 + [1] * 2 + [0] * 2 + [1] * 8
    probs = nn.functional.one_hot(torch.tensor(z), 2).double()
    return LatentLabelSampler(probs, torch.tensor(noisy), alpha=1.0, seed=0), torch.tensor(noisy)


def test_lccn_sampler_counts_and_posterior_mean_transition():
    sampler, noisy = _sampler_with_background()
    # one-hot warm-up predictions make the first draw deterministic: z = the warm-up class
    assert sampler.latent.tolist() == [0] + [0] * 10 + [1] * 10
    assert sampler.counts.tolist() == [[9, 2], [2, 8]]
    assert torch.allclose(sampler.transition(),
                          torch.tensor([[10 / 13, 3 / 13], [3 / 12, 9 / 12]], dtype=torch.float64))


def test_lccn_sampler_draws_from_the_conditional():
    sampler, noisy = _sampler_with_background()
    index, label = torch.tensor([0]), noisy[:1]
    logits = torch.zeros(1, 2)  # p(z | x) = (0.5, 0.5)
    draws = torch.cat([sampler(logits, label, index) for _ in range(4000)])
    # without row 0, n = [[8, 2], [2, 8]]: T[:, 0] = (9/12, 3/12), so P(z = 0) = 0.75
    assert float((draws == 0).double().mean()) == pytest.approx(0.75, abs=0.03)
    expected = torch.zeros(2, 2, dtype=torch.float64)
    expected.index_put_((sampler.latent, noisy), torch.ones(21, dtype=torch.float64),
                        accumulate=True)
    assert torch.equal(sampler.counts, expected)  # the counts follow the latent labels


class _FixedBatches:
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_fit_skips_infinite_batches_and_keeps_the_best_finite_epoch():
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x = torch.randn(8, 2)
    complete = (x, torch.tensor([0, 1] * 4), torch.arange(8))
    one_class = (x, torch.zeros(8, dtype=torch.long), torch.arange(8))  # L_DMI = +inf
    criteria = iter([5.0, 3.0, math.inf, math.nan, 4.0])  # epochs 0..4
    snapshots = []

    def criterion(logits, y):
        snapshots.append(model.weight.detach().clone())
        return next(criteria)

    phase = Phase("dmi", dmi_ext.DMILoss(), epochs=4, lr=0.1, criterion=criterion)
    log = fit(model, phase, _FixedBatches([complete, one_class]), x, complete[1])
    assert log.best_epoch == 1 and log.best_criterion == 3.0
    assert log.skipped_batches == 4  # the one-class batch, every epoch
    assert log.val_criterion[2:4] == [math.inf, math.inf]  # NaN counts as the worst
    assert torch.equal(model.weight, snapshots[1])
    assert log.train_loss[0] is None and all(math.isfinite(v) for v in log.train_loss[1:])


@pytest.fixture(scope="module")
def small_run():
    config = TrainConfig(hidden=32, ce_epochs=3, gce_epochs=2, fw_epochs=2, lccn_epochs=2,
                         dmi_epochs=2)
    dataset = load_dataset("digits")
    splits = make_splits(dataset, noise_transition("pairflip", 10, 0.5), seed=0)
    return config, splits


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_without_nan(small_run, method):
    config, splits = small_run
    result = run_method(method, splits, config, seed=0)
    assert 0.0 <= result.test_accuracy <= 100.0
    for log in result.phases:
        assert not any(math.isnan(v) for v in log.val_criterion)
        assert math.isfinite(log.best_criterion)
    if method in ("fw", "lccn"):
        assert np.allclose(np.sum(result.estimated_transition, axis=1), 1.0, atol=1e-3)


def test_same_seed_same_numbers_and_shared_warm_up_changes_nothing(small_run):
    config, splits = small_run
    first = run_method("dmi", splits, config, seed=1)
    again = run_method("dmi", splits, config, seed=1,
                       warm_start=warm_up(splits, config, seed=1))
    assert first.test_accuracy == again.test_accuracy
    assert [log.val_criterion for log in first.phases] == \
        [log.val_criterion for log in again.phases]
    other = run_method("dmi", splits, config, seed=2)
    assert [log.val_criterion for log in first.phases] != \
        [log.val_criterion for log in other.phases]
