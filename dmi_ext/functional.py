"""The public functional API: ``dmi_loss`` and ``joint_matrix`` (docs/contract.md §1).

Thin wrappers over ``torch.ops.dmi_ext``: they check the keywords' types, translate them into the
op's arguments and shape the results; all maths, value checks and gradients live in the compiled
op. ``dmi_loss`` reaches the op through its direct binding (``dmi_ext._C.dmi_loss``, the same
dispatcher call without torch.ops' argument boxing) for plain tensors outside torch.compile and
torch function modes, and through ``torch.ops`` otherwise.
"""

from typing import Literal, NamedTuple, Tuple, Union, overload

import torch
from torch import Tensor

from ._checks import check_bool, check_eps, check_int, check_tensor
from ._ops import _C, ops

_is_compiling = torch.compiler.is_compiling
_torch_function_mode_enabled = torch._C._is_torch_function_mode_enabled

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INF = float("inf")


class DMIInfo(NamedTuple):
    """Per-matrix diagnostics of a DMI loss call (shape () for one matrix, else (G,))."""

    logabsdet: Tensor  # log|det U|, -inf where U is singular
    singular: Tensor  # bool: U is singular by the rule of docs/contract.md (e.g. a class absent)


def _reduction_code(reduction: str) -> int:
    try:
        return _REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(
            f"dmi_ext: argument 'reduction' must be 'mean', 'sum' or 'none', got {reduction!r}"
        ) from None


def _check_loss_keywords(from_logits, normalize, eps, ignore_index, reduction, validate):
    """The op's scalar arguments from the public keywords, each of its documented type."""
    return (check_bool("from_logits", from_logits), check_bool("normalize", normalize),
            check_eps(eps), check_int("ignore_index", ignore_index), _reduction_code(reduction),
            check_bool("validate", validate))


def _explain_dispatch_error(error: Exception, *tensors) -> BaseException:
    """The dispatcher's "Could not run 'dmi_ext::dmi' with arguments from the 'SparseCPU'
    backend" (or a nested tensor's "NestedTensorImpl doesn't support sizes") for a sparse,
    quantized or nested tensor, as an error naming the argument; any other error as it is.
    Checked only after the op failed, so that the common call pays nothing for it."""
    for name, tensor in tensors:
        try:
            check_tensor(name, tensor)
        except TypeError as explained:
            return explained
    return error


@overload
def dmi_loss(input: Tensor, target: Tensor, *, from_logits: bool = ..., normalize: bool = ...,
             eps: float = ..., ignore_index: int = ..., reduction: str = ...,
             validate: bool = ..., return_info: Literal[False] = ...) -> Tensor: ...


@overload
def dmi_loss(input: Tensor, target: Tensor, *, from_logits: bool = ..., normalize: bool = ...,
             eps: float = ..., ignore_index: int = ..., reduction: str = ...,
             validate: bool = ..., return_info: Literal[True]) -> Tuple[Tensor, DMIInfo]: ...


@overload
def dmi_loss(input: Tensor, target: Tensor, *, from_logits: bool = ..., normalize: bool = ...,
             eps: float = ..., ignore_index: int = ..., reduction: str = ...,
             validate: bool = ..., return_info: bool) -> Union[Tensor, Tuple[Tensor, DMIInfo]]:
    ...


def dmi_loss(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = True,
    normalize: bool = True,
    eps: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    validate: bool = True,
    return_info: bool = False,
) -> Union[Tensor, Tuple[Tensor, DMIInfo]]:
    """L_DMI = -log(|det U| + eps), U the C x C joint matrix of predictions and labels.

    input: logits (or probabilities if ``from_logits=False``) of shape (N, C) or (B, N, C).
    target: int64/int32 labels of shape (N,), (B, N) with a (B, N, C) input, or (M, N) for M
    label sources over one (N, C) input. Labels equal to ``ignore_index`` are left out.
    normalize: U = (1/n) sum (the paper's U); ``normalize=False, eps=1e-3`` is the official
    code's ``-log(|det(onehot^T softmax)| + 0.001)``. reduction over matrices: 'mean' | 'sum' |
    'none'. validate: check labels (and probabilities) and raise on bad values; with
    ``validate=False`` a bad label makes its matrix's loss NaN instead. ``return_info=True``
    returns ``(loss, DMIInfo)`` with log|det U| and the singular flag per matrix.
    """
    # Plain tensors outside torch.compile and torch function modes take the op's direct binding,
    # the same dispatcher call without torch.ops' argument boxing (issue 23: a fifth of a
    # forward + backward at N = 128). Anything that torch.ops would route through Python (a
    # tensor subclass, a mode, tracing) takes torch.ops. is_compiling comes first: under
    # torch.compile it is a constant, and the rest is never traced.
    plain = (not _is_compiling() and type(input) is Tensor and type(target) is Tensor
             and not _torch_function_mode_enabled())
    # Keywords of exactly their documented types are checked inline; anything else goes through
    # the full checks (conversions, errors). Each helper call costs a Python frame: after other
    # work has run (a training step, the report's interleaved variants) the helpers took about
    # 3 us of a 25 us forward at N = 128.
    if (plain and return_info is False and (from_logits is True or from_logits is False)
            and (normalize is True or normalize is False) and (validate is True or validate is False)
            and type(eps) is float and 0.0 <= eps < _INF and type(ignore_index) is int
            and type(reduction) is str and reduction in _REDUCTIONS):
        args = (from_logits, normalize, eps, ignore_index, _REDUCTIONS[reduction], validate)
    else:
        args = _check_loss_keywords(from_logits, normalize, eps, ignore_index, reduction, validate)
        return_info = check_bool("return_info", return_info)
    # need_grad_table=False: the op's autograd kernel asks for the table itself when a gradient
    # can follow; otherwise (no_grad, inference_mode, no input requiring grad) the inverse is
    # skipped.
    try:
        if plain:
            if not return_info:
                return _C.dmi_loss(input, target, *args)
            loss, logabsdet, singular = _C.dmi_loss_info(input, target, *args)
        else:
            loss, logabsdet, singular = ops.dmi.default(input, target, *args, False)[:3]
    except (NotImplementedError, RuntimeError) as error:
        raise _explain_dispatch_error(error, ("input", input), ("target", target)) from None
    if return_info:
        return loss, DMIInfo(logabsdet, singular)
    return loss


def joint_matrix(
    input: Tensor,
    target: Tensor,
    *,
    from_logits: bool = True,
    normalize: bool = True,
    ignore_index: int = -100,
    validate: bool = True,
) -> Tensor:
    """The joint matrix U (row = label, column = prediction) in float64, differentiable.

    Shape (C, C) for one matrix, else (G, C, C). With ``normalize`` each U is divided by its
    number of kept rows (a matrix with no kept rows is all zero).
    """
    from_logits = check_bool("from_logits", from_logits)
    normalize = check_bool("normalize", normalize)
    ignore_index = check_int("ignore_index", ignore_index)
    validate = check_bool("validate", validate)
    try:
        sums, counts = ops.joint.default(input, target, from_logits, ignore_index, validate)
    except (NotImplementedError, RuntimeError) as error:
        raise _explain_dispatch_error(error, ("input", input), ("target", target)) from None
    if not normalize:
        return sums
    return sums / counts.clamp(min=1).to(sums.dtype)[..., None, None]
