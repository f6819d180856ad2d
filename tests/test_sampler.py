"""ClassCoveringBatchSampler: every class with enough samples in every batch, proportions within
one sample, every sample once per epoch, determinism by seed and epoch, and DDP shares."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dmi_ext
from dmi_ext import ClassCoveringBatchSampler


def skewed_labels(seed=0):
    """100 classes with 3 to 60 samples (some fewer than the number of batches), shuffled."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(3, 61, size=100)
    labels = np.repeat(np.arange(100), counts)
    return torch.from_numpy(rng.permutation(labels))


def epoch(sampler, e=0):
    sampler.set_epoch(e)
    return [np.array(b) for b in sampler]


def test_coverage_and_proportions():
    labels = skewed_labels()
    n, B = len(labels), 128
    sampler = ClassCoveringBatchSampler(labels, B, seed=1)
    batches = epoch(sampler)
    nb = n // B
    assert len(batches) == len(sampler) == nb
    # every sample exactly once; sizes B or a little more, within one of each other
    assert sorted(np.concatenate(batches).tolist()) == list(range(n))
    sizes = [len(b) for b in batches]
    assert min(sizes) >= B and max(sizes) - min(sizes) <= 1
    counts = np.bincount(labels.numpy(), minlength=100)
    per_batch = np.stack([np.bincount(labels[b].numpy(), minlength=100) for b in batches])
    # class c: floor(n_c / nb) or ceil(n_c / nb) in every batch
    assert (per_batch >= counts // nb).all() and (per_batch <= -(-counts // nb)).all()
    enough = counts >= nb
    assert enough.sum() > 50 and (~enough).sum() > 5  # both kinds of class are exercised
    assert (per_batch[:, enough] > 0).all()  # every class with enough samples, every batch
    # uniform random batches of the same size miss classes (the problem this solves)
    g = torch.Generator().manual_seed(0)
    random_batch = labels[torch.randperm(n, generator=g)[:B]]
    assert not set(np.flatnonzero(enough).tolist()) <= set(random_batch.tolist())


def test_dataloader_and_every_class_when_the_batch_allows():
    labels = torch.arange(1000) % 100  # 10 per class, batches of 100: exactly one each
    data = TensorDataset(torch.randn(1000, 3), labels)
    loader = DataLoader(data, batch_sampler=ClassCoveringBatchSampler(labels, 100, seed=0))
    seen = 0
    for x, y in loader:
        assert sorted(y.tolist()) == list(range(100))
        seen += len(y)
    assert seen == 1000


def test_determinism_by_seed_and_epoch():
    labels = skewed_labels(2)
    a = ClassCoveringBatchSampler(labels, 64, seed=5)
    b = ClassCoveringBatchSampler(labels, 64, seed=5)
    c = ClassCoveringBatchSampler(labels, 64, seed=6)
    first = epoch(a, 0)
    assert all(np.array_equal(p, q) for p, q in zip(first, epoch(b, 0)))
    assert all(np.array_equal(p, q) for p, q in zip(first, epoch(a, 0)))  # repeatable
    assert not all(np.array_equal(p, q) for p, q in zip(first, epoch(a, 1)))  # new epoch
    assert not all(np.array_equal(p, q) for p, q in zip(first, epoch(c, 0)))  # other seed
    # which samples go together changes, not only the order
    together = {frozenset(p.tolist()) for p in first}
    assert together != {frozenset(p.tolist()) for p in epoch(a, 1)}


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shares_of_every_batch(world):
    labels = skewed_labels(3)
    B = 120
    whole = epoch(ClassCoveringBatchSampler(labels, B, seed=4, num_replicas=1, rank=0))
    shares = [epoch(ClassCoveringBatchSampler(labels, B, seed=4, num_replicas=world, rank=r))
              for r in range(world)]
    assert all(len(s) == len(whole) for s in shares)
    for b, batch in enumerate(whole):
        parts = [shares[r][b] for r in range(world)]
        union = np.concatenate(parts)
        assert len(union) == len(np.unique(union))  # disjoint shares
        assert sorted(union.tolist()) == sorted(batch.tolist())  # union = the global batch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        # each share holds each class's rows of the batch to within one of an even split
        batch_counts = np.bincount(labels[batch].numpy(), minlength=100)
        for part in parts:
            got = np.bincount(labels[part].numpy(), minlength=100)
            assert (got >= batch_counts // world).all()
            assert (got <= -(-batch_counts // world)).all()


def test_with_dmi_loss_no_batch_is_singular():
    """100 classes, batches of 256 drawn by the sampler: U is never singular (a uniform shuffle
    of the same data gives singular batches)."""
    labels = torch.arange(5120) % 100
    logits = torch.randn(5120, 100, generator=torch.Generator().manual_seed(0))
    sampler = ClassCoveringBatchSampler(labels, 256, seed=0)
    for batch in sampler:
        _, info = dmi_ext.dmi_loss(logits[batch], labels[batch], return_info=True)
        assert not info.singular
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(5120, generator=g)[:256]
    assert dmi_ext.dmi_loss(logits[rows], labels[rows], return_info=True)[1].singular


def test_errors_name_the_argument():
    labels = torch.arange(10) % 2
    with pytest.raises(ValueError, match="'batch_size'"):
        ClassCoveringBatchSampler(labels, 0)
    with pytest.raises(ValueError, match="'labels'"):
        ClassCoveringBatchSampler(torch.rand(10), 4)
    with pytest.raises(ValueError, match="'labels' is empty"):
        ClassCoveringBatchSampler(torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="'rank'"):
        ClassCoveringBatchSampler(labels, 4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="'num_replicas'"):
        ClassCoveringBatchSampler(labels, 10, num_replicas=11, rank=0)
