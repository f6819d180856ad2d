"""Data-parallel training on one machine: the process launcher and the global-batch forms of a
phase's loss and label hook.

``run_data_parallel`` spawns N processes joined in a gloo group (NCCL on GPUs, one per process). Every process holds the whole
dataset with the same seeded split, noise and initial weights, and takes its share of every
mini-batch (``Batches(..., rank=, world=)``), so the union of the ranks' b-th batches is the b-th
batch of a one-process run. ``for_global_batch`` is what ``fit`` trains with: the model under
``DistributedDataParallel``, the loss of the global batch (L_DMI through ``dmi_ext.distributed``,
any other loss, a mean over rows, through ``GlobalBatchMean``) and a label hook that sees the
gathered global batch (``GlobalBatchRelabel``, for LCCN's sampler). Each of them returns the same
value on every rank and gives parameter gradients that, after DDP's averaging, are those of one
process on the global batch; a run with N processes therefore differs from a one-process run only
in the order of floating-point sums. Validation, epoch selection and testing need no
communication: every rank evaluates the same weights on the same data.
"""

import os
import pickle
import tempfile
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .. import DMILoss

RESULT_FILE = "rank0-result.pickle"


def rank_and_world() -> Tuple[int, int]:
    """This process's rank and the number of processes; (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GlobalBatchMean(nn.Module):
    """A loss that is a mean over rows (cross-entropy, GCE, FW), taken over the global batch.

    The value is the mean over every rank's rows, the same on every rank (so a non-finite loss is
    skipped by all ranks or none). The gradient flows through this rank's rows only, scaled by
    W * n_rank / n_global: after DDP divides the sum over ranks by W, that is the gradient of the
    global mean even when the ranks' shares differ by a row (a batch size the world does not
    divide). One all-reduce of two numbers per call.
    """

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        local_mean = self.loss(input, target)
        rows = len(target)
        totals = torch.tensor([float(local_mean.detach()) * rows, rows], dtype=torch.float64,
                              device=input.device)  # NCCL reduces on the GPU only
        dist.all_reduce(totals)
        global_sum, global_rows = totals.tolist()
        scaled = local_mean * (dist.get_world_size() * rows / global_rows)
        # Value of the global mean, gradient of `scaled`.
        return scaled + (global_sum / global_rows - scaled.detach())


def global_batch_loss(loss: nn.Module) -> nn.Module:
    """The training loss over the global batch: ``dmi_ext.distributed.DMILoss`` with the same
    options for L_DMI (its joint matrix is summed over ranks), ``GlobalBatchMean`` otherwise."""
    if isinstance(loss, DMILoss):
        import dmi_ext.distributed

        return dmi_ext.distributed.DMILoss(
            from_logits=loss.from_logits, normalize=loss.normalize, eps=loss.eps,
            ignore_index=loss.ignore_index, reduction=loss.reduction, validate=loss.validate)
    return GlobalBatchMean(loss)


class GlobalBatchRelabel:
    """A label hook run on the whole global batch, identically on every rank.

    Gathers every rank's detached logits, labels and row indices in rank order (which is the
    global batch's order, since each rank holds a contiguous slice of it), calls the hook on
    them, and returns this rank's slice of its answer. A stateful, random hook such as LCCN's
    Gibbs sampler thus makes the same draws with the same generator on every rank, as one process
    would on the whole batch, and its state stays identical across ranks. Two all-gathers per
    call (the ranks' row counts, then their rows).
    """

    def __init__(self, relabel: Callable[[Tensor, Tensor, Tensor], Tensor]):
        self.relabel = relabel

    def __call__(self, logits: Tensor, target: Tensor, index: Tensor) -> Tensor:
        rank, world = rank_and_world()
        rows = torch.tensor([len(index)], device=logits.device)
        counts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(counts, rows)
        counts = [int(count) for count in counts]
        # One float64 buffer per rank (exact for float32 logits and for indices below 2**53):
        # logits, label, row index; zero rows pad it to the largest share.
        packed = torch.zeros(max(counts), logits.shape[1] + 2, dtype=torch.float64,
                             device=logits.device)
        packed[:len(index), :-2] = logits
        packed[:len(index), -2] = target
        packed[:len(index), -1] = index
        parts = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(parts, packed)
        batch = torch.cat([part[:count] for part, count in zip(parts, counts)])
        targets = self.relabel(batch[:, :-2].to(logits.dtype), batch[:, -2].long(),
                               batch[:, -1].long())
        start = sum(counts[:rank])
        return targets[start:start + len(index)]


def for_global_batch(model: nn.Module, loss: nn.Module, relabel: Optional[Callable]):
    """(model to train through, loss, label hook) for ``fit``: as given in one process; in a
    data-parallel run, ``DistributedDataParallel(model)``, ``global_batch_loss(loss)`` and
    ``GlobalBatchRelabel(relabel)``. The DDP wrapper shares ``model``'s parameters."""
    if rank_and_world()[1] == 1:
        return model, loss, relabel
    return (DistributedDataParallel(model), global_batch_loss(loss),
            None if relabel is None else GlobalBatchRelabel(relabel))


def run_data_parallel(nproc: int, fn: Callable, *args, backend: str = "gloo"):
    """Runs ``fn(*args)`` in ``nproc`` spawned processes joined in a ``backend`` group (gloo for
    the CPU, nccl for GPUs: rank k then uses GPU k); returns what it returned on rank 0.

    ``fn`` and ``args`` must be picklable (``fn`` a module-level function). The group meets
    through a file store in a temporary directory, so concurrent runs never collide on a port.
    If any process fails, the others are terminated and the error is raised here.
    """
    if nproc < 2:
        raise ValueError(f"argument 'nproc' must be >= 2 to spawn processes, got {nproc}")
    with tempfile.TemporaryDirectory(prefix="dmi_ext-nproc-") as run_dir:
        torch.multiprocessing.start_processes(_rank_main,
                                              args=(nproc, run_dir, fn, args, backend),
                                              nprocs=nproc, start_method="spawn")
        with open(os.path.join(run_dir, RESULT_FILE), "rb") as handle:
            return pickle.load(handle)  # written by our own rank 0 just now


def _rank_main(rank: int, nproc: int, run_dir: str, fn: Callable, args: tuple,
               backend: str = "gloo") -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(run_dir, 'store')}",
                            rank=rank, world_size=nproc)
    try:
        result = fn(*args)
        if rank == 0:
            with open(os.path.join(run_dir, RESULT_FILE), "wb") as handle:
                pickle.dump(result, handle)
        dist.barrier()  # no rank tears the group down while another is still using it
    finally:
        dist.destroy_process_group()
