"""Class-covering batches: a batch sampler that puts every class in every batch it can.

L_DMI's joint matrix U has a zero row, and the loss is +inf with a zero gradient, whenever a
label class is missing from the batch. Random batches miss classes often once C is not small
next to the batch size (C = 100, N = 128: about 27 classes absent per batch). This sampler deals
each class's samples round-robin over the epoch's batches, so a class with at least as many
samples as there are batches is in every batch, and each batch holds every class in the data's
proportion to within one sample.
"""

from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from ._checks import check_int


def _label_tensor(labels) -> torch.Tensor:
    """The labels as a 1-d integer tensor, or an error that says what is wrong with them."""
    if not isinstance(labels, torch.Tensor):
        array = np.asarray(labels)
        if array.dtype.kind in "USO":
            example = repr(array.flat[0]) if array.size else "none"
            raise TypeError(f"argument 'labels' must hold integer class labels, got "
                            f"{array.dtype.name} values (e.g. {example}); map them to integers "
                            f"first, e.g. np.unique(labels, return_inverse=True)[1]")
        labels = torch.as_tensor(array)
    if labels.numel() == 0:
        raise ValueError(f"argument 'labels' is empty (shape {tuple(labels.shape)}): there is "
                         f"nothing to sample")
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise ValueError(f"argument 'labels' must be a 1-d sequence of integer labels, got "
                         f"dtype {labels.dtype} and shape {tuple(labels.shape)}")
    return labels


class ClassCoveringBatchSampler(Sampler[List[int]]):
    """Batches of dataset indices with every class in every batch, in the data's proportions.

    ``labels``: the (noisy) label of every sample, the labels U is formed over (int, any values;
    a label equal to ``ignore_index`` is a class of its own here, dealt like the others).
    Each epoch has ``len(labels) // batch_size`` batches (at least one) and uses every sample
    once: batches hold ``batch_size`` samples or a few more (the remainder is spread, not left
    as a short last batch). Class c, with n_c samples, has ``floor(n_c / B)`` or ``ceil(n_c / B)``
    of them in each of the B batches: in every batch when n_c >= B, and its share of each batch
    is its share of the data to within one sample. Which samples go together, which batches get
    the extra ones, and the order of batches and of rows inside a batch are random.

    Seeded: the batches of an epoch depend on ``seed`` and the epoch only; call
    ``set_epoch(epoch)`` at the start of each epoch (as with ``DistributedSampler``) for a new
    draw, otherwise every pass repeats epoch 0's batches.

    Data parallel (``num_replicas`` > 1, e.g. under DDP with ``dmi_ext.distributed``): every
    rank draws the same global batches and yields **its share of every batch** (not disjoint
    batches): the b-th batch is dealt class by class over the ranks, so the ranks' b-th batches
    are disjoint, their union is the global b-th batch, and each share is itself class-covering
    as far as its size allows. ``batch_size`` is the global batch (the rows U is summed over by
    ``dmi_ext.distributed``); shares differ by at most one row. ``num_replicas`` and ``rank``
    default to the initialised process group's, else 1 and 0.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``.
    """

    def __init__(self, labels, batch_size: int, *, seed: int = 0,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None):
        labels = _label_tensor(labels)
        batch_size = check_int("batch_size", batch_size)
        if batch_size < 1:
            raise ValueError(f"argument 'batch_size' must be >= 1, got {batch_size!r}")
        seed = check_int("seed", seed)
        if seed < 0:  # numpy's generators take non-negative seeds only; fail here, not in __iter__
            raise ValueError(f"argument 'seed' must be >= 0, got {seed!r}")
        if num_replicas is not None:
            num_replicas = check_int("num_replicas", num_replicas)
        if rank is not None:
            rank = check_int("rank", rank)
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is not None and rank is None and not group:
            # Defaulting to rank 0 would give every process rank 0's share.
            raise ValueError(f"argument 'rank' is required with num_replicas={num_replicas} when "
                             f"no process group is initialised")
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if group else 1
        if rank is None:
            rank = torch.distributed.get_rank() if group else 0
        if num_replicas < 1:
            raise ValueError(f"argument 'num_replicas' must be >= 1, got {num_replicas!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"argument 'rank' must be in [0, num_replicas = {num_replicas}), "
                             f"got {rank!r}")
        self.batch_size = batch_size
        self.num_batches = max(1, len(labels) // batch_size)
        smallest = len(labels) // self.num_batches
        if smallest < num_replicas:
            raise ValueError(f"argument 'num_replicas': batches of {smallest} samples cannot be "
                             f"shared by {num_replicas} ranks (each needs one)")
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0
        classes, inverse = np.unique(labels.numpy(), return_inverse=True)
        self.classes = classes
        # Each class's sample indices, in index order; shuffled per epoch.
        self._members = [np.flatnonzero(inverse == k) for k in range(len(classes))]

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose batches the next iteration yields (seed the draw with it)."""
        epoch = check_int("epoch", epoch)
        if epoch < 0:
            raise ValueError(f"argument 'epoch' must be >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> List[np.ndarray]:
        """This epoch's batches before they are shared out: index arrays, class-dealt order."""
        rng = np.random.default_rng([self.seed, self.epoch])
        B = self.num_batches
        # Deal a random class order's shuffled members round-robin from a random first batch:
        # sample at position p of the dealt sequence goes to batch (offset + p) mod B, so every
        # class's n_c consecutive positions land in n_c consecutive batches (mod B).
        dealt = np.concatenate([rng.permutation(self._members[k])
                                for k in rng.permutation(len(self._members))])
        batch_of = (rng.integers(B) + np.arange(len(dealt))) % B
        # A stable sort keeps each batch's rows in dealt order, i.e. grouped by class.
        order = np.argsort(batch_of, kind="stable")
        bounds = np.cumsum(np.bincount(batch_of, minlength=B))[:-1]
        batches = np.split(dealt[order], bounds)
        return [batches[b] for b in rng.permutation(B)]

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 1 + self.rank])
        for batch in self.global_batches():
            # Rows are grouped by class, so dealing them round-robin over the ranks shares every
            # class as evenly as the rows allow.
            share = batch[self.rank::self.num_replicas]
            yield rng.permutation(share).tolist()

    def __repr__(self) -> str:
        return (f"ClassCoveringBatchSampler(samples={sum(len(m) for m in self._members)}, "
                f"classes={len(self._members)}, batch_size={self.batch_size}, "
                f"batches={self.num_batches}, seed={self.seed}, rank={self.rank}, "
                f"num_replicas={self.num_replicas})")
