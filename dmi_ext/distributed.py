"""L_DMI over the global batch of a data-parallel job (torch.distributed, e.g. under DDP).

The joint matrix of the global batch is the sum of the ranks' unnormalised joint matrices, so one
all-reduce of every rank's sums and kept-row counts (C*C + 1 numbers per matrix, plus one number
that carries failed input checks) gives every rank the same global U, the same loss and the same
grad table. Each rank then computes the gradient of its own rows from that table, with no second
collective. Because DDP averages the ranks' parameter gradients, each rank's local gradient is
multiplied by the world size by default (``grad_reduce="mean"``), so that after DDP's all-reduce
the parameter gradients equal those of one process on the concatenated batch. Without an
initialised process group (or with a group of one process) this is exactly ``dmi_ext.dmi_loss``.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ._ops import ops
from .functional import DMIInfo, _reduction_code
from .functional import dmi_loss as _single_process_dmi_loss
from .loss import DMILoss as _SingleProcessDMILoss

# What the ranks do with their parameter gradients after backward -> the factor each rank's
# local gradient is multiplied by: DDP (and FSDP) average over the W ranks, hence W.
_GRAD_REDUCES = ("mean", "sum")


def _check_grad_reduce(grad_reduce: str) -> None:
    if grad_reduce not in _GRAD_REDUCES:
        raise ValueError(
            f"dmi_ext: argument 'grad_reduce' must be 'mean' (gradients averaged over ranks, as "
            f"DDP does) or 'sum', got {grad_reduce!r}")


def _reduction_group(process_group) -> Optional["dist.ProcessGroup"]:
    """The group to sum the joint matrices over, or None where the loss is single-process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    world = dist.get_world_size(process_group)
    if world < 0:
        raise ValueError(
            f"dmi_ext: this process (global rank {dist.get_rank()}) is not a member of argument "
            f"'process_group'")
    return process_group if world > 1 else None


def _joint_matrices_shape(input: Tensor, target: Tensor) -> Optional[tuple]:
    """The shape of the joint sums for these shapes (SPEC §2), or None where none can be read."""
    if input.dim() not in (2, 3) or target.dim() not in (1, 2):
        return None
    C = input.shape[-1]
    if input.dim() == 2 and target.dim() == 1:
        return (C, C)
    return (target.shape[0] if input.dim() == 2 else input.shape[0], C, C)


def _local_joint(input: Tensor, target: Tensor, from_logits: bool, ignore_index: int,
                 validate: bool):
    """This rank's joint sums and counts, and the error of its input checks (or None).

    On a failed check the sums are zeros of the right shape, so that the rank still takes part in
    the collective (and the other ranks fail instead of hanging); ``_sum_over_ranks`` raises the
    error after it. A shape that cannot even be read raises at once.
    """
    try:
        sums, counts = ops.joint.default(input, target, from_logits, ignore_index, validate)
        return sums, counts, None
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        shape = _joint_matrices_shape(input, target)
        if shape is None:
            raise
        sums = torch.zeros(shape, dtype=torch.float64, device=input.device)
        counts = torch.zeros(shape[:-2], dtype=torch.int64, device=input.device)
        return sums, counts, error


def _sum_over_ranks(sums: Tensor, counts: Tensor, local_error, group, validate: bool):
    """The group's joint sums and counts: one all-reduce of [sums, counts, failed-check flag].

    Raises ``local_error`` (this rank's failed check) after the collective; a failure on another
    rank raises a ValueError (``validate=True``) or makes the sums NaN (``validate=False``, no
    host sync).
    """
    failed = torch.full((1,), float(local_error is not None), dtype=torch.float64,
                        device=sums.device)
    # One buffer, one collective: [sums, counts, number of ranks whose checks failed].
    # Counts are exact in float64 up to 2**53 rows.
    packed = torch.cat([sums.reshape(-1), counts.reshape(-1).to(torch.float64), failed])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    if local_error is not None:
        raise local_error
    n_sums = sums.numel()
    global_sums = packed[:n_sums].view(sums.shape)
    global_counts = packed[n_sums:-1].round().to(torch.int64).view(counts.shape)
    ranks_failed = packed[-1]
    if validate:
        # A host sync, as the label checks of validate=True already are on a GPU.
        n_failed = int(ranks_failed.item())
        if n_failed > 0:
            raise ValueError(
                f"dmi_ext: the input checks of the distributed DMI loss failed on {n_failed} "
                f"other rank(s) of the process group (see the error raised there); the loss "
                f"of the global batch is undefined")
    else:
        # No sync: as for a bad label with validate=False, the loss becomes NaN instead.
        global_sums = global_sums + torch.where(ranks_failed > 0, float("nan"), 0.0)
    return global_sums, global_counts


def _grad_multiplier(group, grad_reduce: str) -> int:
    """What each rank's local gradient is multiplied by: W when the ranks' gradients are then
    averaged (DDP), 1 when they are summed."""
    return dist.get_world_size(group) if grad_reduce == "mean" else 1


def _loss_dtype(input_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if input_dtype == torch.float64 else torch.float32


def _reduced(loss: Tensor, reduction: int, dtype: torch.dtype) -> Tensor:
    """The per-matrix float64 losses reduced by the op's reduction code, in the loss dtype."""
    if reduction == 0:
        return loss.to(dtype)
    out = loss.sum()
    if reduction == 1:
        out = out / loss.numel()
    return out.to(dtype)


class _GlobalBatchDMI(torch.autograd.Function):
    """Forward: local joint sums -> one all-reduce -> loss of the global batch. Backward: this
    rank's rows from the global grad table, times the gradient multiplier."""

    @staticmethod
    def forward(ctx, input, target, group, from_logits, normalize, eps, ignore_index, reduction,
                validate, grad_multiplier):
        sums, counts, local_error = _local_joint(input, target, from_logits, ignore_index,
                                                 validate)
        global_sums, global_counts = _sum_over_ranks(sums, counts, local_error, group, validate)

        loss, logabsdet, singular, grad_table = ops.lu_loss.default(
            global_sums, global_counts, normalize, eps)
        dtype = _loss_dtype(input.dtype)
        out = _reduced(loss, reduction, dtype)

        ctx.save_for_backward(input, target, grad_table)
        ctx.from_logits = from_logits
        ctx.ignore_index = ignore_index
        ctx.reduction = reduction
        ctx.grad_multiplier = grad_multiplier
        logabsdet = logabsdet.to(dtype)
        ctx.mark_non_differentiable(logabsdet, singular)
        return out, logabsdet, singular

    @staticmethod
    def backward(ctx, grad_loss, _grad_logabsdet, _grad_singular):
        input, target, grad_table = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            # Scale the upstream gradient in float64 so that a multiplier like 3 adds no rounding.
            grad_loss = grad_loss.to(torch.float64) * ctx.grad_multiplier
            grad_input = ops.dmi_backward.default(grad_loss, input, target, grad_table,
                                                  ctx.from_logits, ctx.ignore_index,
                                                  ctx.reduction)
        return grad_input, None, None, None, None, None, None, None, None, None


def dmi_loss(
    input: Tensor,
    target: Tensor,
    *,
    process_group=None,
    grad_reduce: str = "mean",
    from_logits: bool = True,
    normalize: bool = True,
    eps: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    validate: bool = True,
    return_info: bool = False,
):
    """L_DMI of the global batch: U summed over the ranks of ``process_group``.

    Every rank passes its own rows (input and target shaped as for ``dmi_ext.dmi_loss``; the
    number of rows may differ between ranks, the number of matrices and of classes may not) and
    gets the same loss, that of the concatenated batch. The call is a collective: every rank of
    the group must make it, in the same order. ``process_group=None`` means the default group
    when one is initialised, else no distribution at all: then, and for a group of one process,
    this is exactly ``dmi_ext.dmi_loss``.

    grad_reduce: what happens to the parameter gradients across ranks after backward. 'mean'
    (DDP, FSDP): each rank's gradient is multiplied by the world size, so the average is the
    gradient of the global loss. 'sum' (you all-reduce gradients with SUM yourself, or want each
    rank's share): no multiplier, the ranks' gradients sum to that of the global loss. The
    upstream gradient of the loss must be the same on every rank (it is, when every rank
    back-propagates the same objective). Other keywords as in ``dmi_ext.dmi_loss``; with
    ``return_info=True`` the ``DMIInfo`` is that of the global matrices.
    """
    _check_grad_reduce(grad_reduce)
    group = _reduction_group(process_group)
    if group is None:
        return _single_process_dmi_loss(
            input, target, from_logits=from_logits, normalize=normalize, eps=eps,
            ignore_index=ignore_index, reduction=reduction, validate=validate,
            return_info=return_info)
    grad_multiplier = _grad_multiplier(group, grad_reduce)
    loss, logabsdet, singular = _GlobalBatchDMI.apply(
        input, target, group, from_logits, normalize, float(eps), ignore_index,
        _reduction_code(reduction), validate, grad_multiplier)
    if return_info:
        return loss, DMIInfo(logabsdet, singular)
    return loss


class DMILoss(_SingleProcessDMILoss):
    """``dmi_ext.DMILoss`` over the global batch: ``DMILoss(process_group=...)(logits, labels)``.

    Keywords as in ``dmi_ext.distributed.dmi_loss``; the group is looked up at each call, so a
    module built before ``init_process_group`` uses the default group once it exists.
    """

    def __init__(self, *, process_group=None, grad_reduce: str = "mean", **loss_keywords):
        super().__init__(**loss_keywords)
        _check_grad_reduce(grad_reduce)
        self.process_group = process_group
        self.grad_reduce = grad_reduce

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return dmi_loss(input, target, process_group=self.process_group,
                        grad_reduce=self.grad_reduce, from_logits=self.from_logits,
                        normalize=self.normalize, eps=self.eps,
                        ignore_index=self.ignore_index, reduction=self.reduction,
                        validate=self.validate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grad_reduce={self.grad_reduce!r}"
