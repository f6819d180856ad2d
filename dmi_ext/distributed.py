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
from ._checks import check_bool
from .functional import DMIInfo, _check_loss_keywords, _explain_dispatch_error, _reduction_code
from .functional import dmi_loss as _single_process_dmi_loss
from .loss import DMILoss as _SingleProcessDMILoss

# What the ranks do with their parameter gradients after backward -> the factor each rank's
# local gradient is multiplied by: DDP (and FSDP) average over the W ranks, hence W.
_GRAD_REDUCES = ("mean", "sum")


def _check_grad_reduce(grad_reduce: str) -> None:
    if not isinstance(grad_reduce, str) or grad_reduce not in _GRAD_REDUCES:
        raise ValueError(
            f"dmi_ext: argument 'grad_reduce' must be 'mean' (gradients averaged over ranks, as "
            f"DDP does) or 'sum', got {grad_reduce!r}")


def _check_process_group_type(process_group) -> None:
    # new_group() gives non-members a sentinel, not a group: let it through to the membership
    # check, which names it.
    if process_group is not None and not isinstance(process_group, dist.ProcessGroup) \
            and process_group is not dist.GroupMember.NON_GROUP_MEMBER:
        raise TypeError(f"dmi_ext: argument 'process_group' must be a "
                        f"torch.distributed.ProcessGroup or None (the default group), got "
                        f"{process_group!r} ({type(process_group).__name__})")


def _reduction_group(process_group) -> Optional["dist.ProcessGroup"]:
    """The group to sum the joint matrices over, or None where the loss is single-process."""
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    _check_process_group_type(process_group)
    if not dist.is_initialized():
        raise ValueError("dmi_ext: argument 'process_group' was given, but no process group is "
                         "initialised (call torch.distributed.init_process_group first)")
    world = dist.get_world_size(process_group)
    if world < 0:
        raise ValueError(
            f"dmi_ext: this process (global rank {dist.get_rank()}) is not a member of argument "
            f"'process_group'")
    return process_group if world > 1 else None


_LOCAL_ERRORS = (ValueError, TypeError, IndexError, RuntimeError, NotImplementedError)


def _collective_device(group, tensor: Optional[Tensor]) -> torch.device:
    """Where this rank's buffers for the group's collectives live: the data's device if it has
    data, else the one the backend needs (NCCL: the current CUDA device)."""
    if tensor is not None:
        return tensor.device
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The joint-matrix shape (G, C) the ranks of each group last agreed on. Every rank makes the same
# sequence of collectives, so every rank holds the same entry: it sizes the one combined
# all-reduce of the next call.
_AGREED_SHAPES: dict = {}


def _header(world: int, me: int, local_error, shape) -> Tensor:
    """[failed flag per rank, G, C, G^2, C^2], summed over the ranks: any flag set means a rank
    failed, and W * sum(G^2) == sum(G)^2 holds exactly when every rank has the same G (and so
    for C)."""
    header = torch.zeros(world + 4, dtype=torch.float64)
    if local_error is not None:
        header[me] = 1.0
    else:
        G, C = shape
        header[world:] = torch.tensor([G, C, G * G, C * C], dtype=torch.float64)
    return header


def _agreed_shape(header: Tensor, world: int, me: int, local_error, shape) -> tuple:
    """The (G, C) every rank has, from the summed header; raises on every rank when a rank
    failed (its own error there, a ValueError naming it elsewhere) or the shapes differ."""
    if local_error is not None:
        raise local_error
    failed = [r for r in range(world) if header[r] > 0]
    if failed:
        raise ValueError(
            f"dmi_ext: the input checks of the distributed DMI loss failed on rank(s) {failed} "
            f"of the process group (see the error raised there); the loss of the global batch "
            f"is undefined")
    g, c, g2, c2 = header[world:].tolist()
    if world * g2 != g * g or world * c2 != c * c:
        raise ValueError(
            f"dmi_ext: the ranks of the process group disagree on the joint matrices: this rank "
            f"(rank {me}) has {shape[0]} matrices of {shape[1]} classes, the ranks' mean is "
            f"{g / world:g} matrices of {c / world:g} classes; every rank needs the same G and "
            f"C (only the number of rows may differ)")
    return int(round(g / world)), int(round(c / world))


def _local_joint(input: Tensor, target: Tensor, from_logits: bool, ignore_index: int,
                 validate: bool):
    """This rank's joint sums and counts, and the error of its input checks (or None; then
    the sums are None too)."""
    try:
        sums, counts = ops.joint.default(input, target, from_logits, ignore_index, validate)
        return sums, counts, None
    except (NotImplementedError, RuntimeError) as error:
        return None, None, _explain_dispatch_error(error, ("input", input), ("target", target))
    except _LOCAL_ERRORS as error:
        return None, None, error


def _sum_over_ranks(sums: Optional[Tensor], counts: Optional[Tensor], local_error, group,
                    device: Optional[torch.device] = None):
    """The group's joint sums and counts; raises on every rank when any rank's checks failed
    (``local_error`` here, with ``sums`` None) or the ranks' shapes differ.

    The data buffer's size depends on the shape, and a rank that failed cannot say its shape, so
    the ranks must first agree on it. One all-reduce (SUM) carries both: [header, sums, counts],
    sized by the shape the ranks agreed on last time (``_AGREED_SHAPES``); a rank whose own shape
    differs, or that failed, sends only its header there. Only when the shape changes (the first
    call, or every rank moving to a new G or C together) does a second all-reduce carry the data.
    So the normal path costs what it did before this check: one collective, W + 4 numbers
    longer, and one host read of the header.
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    if device is None:
        device = _collective_device(group, sums)
    shape = None
    if sums is not None:
        shape = (1 if sums.dim() == 2 else sums.shape[0], sums.shape[-1])
    header = _header(world, me, local_error, shape)
    cached = _AGREED_SHAPES.get(group)
    if cached is not None:
        G, C = cached
        packed = torch.zeros(world + 4 + G * C * C + G, dtype=torch.float64, device=device)
        packed[: world + 4] = header.to(device)
        if sums is not None and counts is not None and shape == cached:
            torch.cat([sums.reshape(-1), counts.reshape(-1).to(torch.float64)],
                      out=packed[world + 4:])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        agreed = _agreed_shape(packed[: world + 4].cpu(), world, me, local_error, shape)
        assert sums is not None and counts is not None  # else _agreed_shape raised
        if agreed == cached:
            data = packed[world + 4:]
            return data[: sums.numel()].view(sums.shape), \
                data[sums.numel():].round().to(torch.int64).view(counts.shape)
    else:
        header = header.to(device)
        dist.all_reduce(header, op=dist.ReduceOp.SUM, group=group)
        agreed = _agreed_shape(header.cpu(), world, me, local_error, shape)
        assert sums is not None and counts is not None  # else _agreed_shape raised
    # Every rank has the new shape `agreed`: exchange the data at its size.
    _AGREED_SHAPES[group] = agreed
    # Counts are exact in float64 up to 2**53 rows.
    packed = torch.cat([sums.reshape(-1), counts.reshape(-1).to(torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    n_sums = sums.numel()
    return packed[:n_sums].view(sums.shape), \
        packed[n_sums:].round().to(torch.int64).view(counts.shape)


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
        global_sums, global_counts = _sum_over_ranks(sums, counts, local_error, group)

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
    # Keyword errors are the same on every rank when every rank passes the same keywords; if
    # they do not, the ranks still agree on the error before any data is exchanged.
    try:
        args = _check_loss_keywords(from_logits, normalize, eps, ignore_index, reduction,
                                    validate)
        return_info = check_bool("return_info", return_info)
    except (TypeError, ValueError) as error:
        _sum_over_ranks(None, None, error, group)  # raises it here, and on the other ranks
        raise
    grad_multiplier = _grad_multiplier(group, grad_reduce)
    loss, logabsdet, singular = _GlobalBatchDMI.apply(input, target, group, *args,
                                                      grad_multiplier)
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
        _check_process_group_type(process_group)
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
