"""Loads the compiled op library and registers its fake kernels.

Loading the library (``dmi_ext/_library.py``) runs the ``TORCH_LIBRARY`` blocks of ``csrc/``: the
schemas, the CPU (and CUDA) kernels and the autograd kernels. What is left for Python is the shape-only "fake"
kernel of each op, so that ``torch.compile`` and ``torch.library.opcheck`` can trace through them
without running them. Fake kernels only derive shapes; the real kernels validate values.
"""

import torch

from ._library import load

_C = load()  # registers torch.ops.dmi_ext.* (a built library, or a JIT build of a checkout)

ops = torch.ops.dmi_ext

FUSED_MAX_CLASSES: int = _C.fused_max_classes
WITH_CUDA: bool = _C.with_cuda


_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TARGET_DTYPES = (torch.int64, torch.int32)


def _shape(t) -> str:
    return str(list(t.shape))


def _check_inputs(input, target):
    """(number of matrices G, single): the checks of ``check_inputs`` in csrc/ops.cpp, word for
    word, for the fake kernels. The meta key wins the dispatch when any argument is on the meta
    device, so without them a CPU input with a meta target would skip every check and return
    uninitialised memory."""
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"dmi_ext: argument 'input' must be float16, bfloat16, float32 or "
                        f"float64, got {input.dtype}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"dmi_ext: argument 'target' must hold int64 or int32 class labels, "
                        f"got {target.dtype}")
    _check_same_device(("input", input), ("target", target))
    if input.dim() not in (2, 3):
        raise ValueError(f"dmi_ext: argument 'input' must have shape (N, C) or (B, N, C), got "
                         f"shape {_shape(input)}")
    C, N = input.shape[-1], input.shape[-2]
    if C < 2:
        raise ValueError(f"dmi_ext: argument 'input' has C = {C} classes (its last dimension); "
                         f"DMI needs C >= 2")
    if N < 1:
        raise ValueError(f"dmi_ext: argument 'input' has N = 0 rows (shape {_shape(input)}); "
                         f"the joint matrix of no rows is undefined")
    if input.dim() == 2 and target.dim() in (1, 2):
        if target.shape[-1] != N:
            raise ValueError(f"dmi_ext: argument 'target' has shape {_shape(target)} but 'input' "
                             f"has shape {_shape(input)}: expected target of shape ({N},) or "
                             f"(M, {N})")
        if target.dim() == 1:
            return 1, True
        if target.shape[0] < 1:
            raise ValueError("dmi_ext: argument 'target' has M = 0 label sources")
        return target.shape[0], False
    if input.dim() == 3 and target.dim() == 2:
        if tuple(target.shape) != tuple(input.shape[:2]):
            raise ValueError(f"dmi_ext: argument 'target' has shape {_shape(target)} but 'input' "
                             f"has shape {_shape(input)}: expected target of shape "
                             f"({input.shape[0]}, {N})")
        if input.shape[0] < 1:
            raise ValueError("dmi_ext: argument 'input' has B = 0 matrices")
        return input.shape[0], False
    raise ValueError(f"dmi_ext: argument 'target' has shape {_shape(target)}, which does not "
                     f"pair with input of shape {_shape(input)}: use (N, C) with (N,) or (M, N), "
                     f"or (B, N, C) with (B, N)")


def _check_same_device(*named):
    (first_name, first), *rest = named
    for name, t in rest:
        if t.device != first.device:
            names = " and ".join(f"'{n}'" for n, _ in named)
            got = " and ".join(f"{n} on {t.device}" for n, t in named)
            raise ValueError(f"dmi_ext: arguments {names} must be on the same device, got {got}")


def _check_eps_reduction(eps, reduction):
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"dmi_ext: argument 'eps' must be finite and >= 0, got {eps}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"dmi_ext: argument 'reduction' must be 0 (none), 1 (mean) or 2 (sum), "
                         f"got {reduction}")


def _loss_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.register_fake("dmi_ext::joint")
def _joint_fake(input, target, from_logits, ignore_index, validate):
    G, single = _check_inputs(input, target)
    C = input.shape[-1]
    batch = () if single else (G,)
    return (input.new_empty((*batch, C, C), dtype=torch.float64),
            input.new_empty(batch, dtype=torch.int64))


@torch.library.register_fake("dmi_ext::lu_loss")
def _lu_loss_fake(sums, counts, normalize, eps):
    if sums.dtype != torch.float64:
        raise TypeError(f"dmi_ext: argument 'sums' must be float64, got {sums.dtype}")
    if counts.dtype != torch.int64:
        raise TypeError(f"dmi_ext: argument 'counts' must be int64, got {counts.dtype}")
    _check_same_device(("sums", sums), ("counts", counts))
    if sums.dim() < 2 or sums.shape[-1] != sums.shape[-2] or sums.shape[-1] < 2:
        raise ValueError(f"dmi_ext: argument 'sums' must have shape (..., C, C) with C >= 2, "
                         f"got {_shape(sums)}")
    if tuple(counts.shape) != tuple(sums.shape[:-2]):
        raise ValueError(f"dmi_ext: argument 'counts' has shape {_shape(counts)} but 'sums' has "
                         f"shape {_shape(sums)}: expected counts of shape {list(sums.shape[:-2])}")
    _check_eps_reduction(eps, 0)
    batch = counts.shape
    return (sums.new_empty(batch), sums.new_empty(batch),
            sums.new_empty(batch, dtype=torch.bool), torch.empty_like(sums))


@torch.library.register_fake("dmi_ext::dmi")
def _dmi_fake(input, target, from_logits, normalize, eps, ignore_index, reduction, validate,
              need_grad_table=True, save_probs=False):
    G, single = _check_inputs(input, target)
    _check_eps_reduction(eps, reduction)
    C = input.shape[-1]
    batch = () if single else (G,)
    dtype = _loss_dtype(input)
    loss = input.new_empty(batch if reduction == 0 else (), dtype=dtype)
    # The saved softmax, in the loss dtype: only the CPU kernel keeps it (csrc/dmi.h), from
    # logits when asked; otherwise the (0,) placeholder.
    keep = save_probs and from_logits and input.device.type == "cpu"
    probs = input.new_empty(input.shape if keep else (0,), dtype=dtype)
    return (loss, input.new_empty(batch, dtype=dtype), input.new_empty(batch, dtype=torch.bool),
            input.new_empty((G if need_grad_table else 0, C, C), dtype=torch.float64), probs)


@torch.library.register_fake("dmi_ext::dmi_backward_into")
def _dmi_backward_into_fake(grad_loss, input, target, grad_table, ignore_index, reduction, probs):
    _dmi_backward_fake(grad_loss, input, target, grad_table, True, ignore_index, reduction, probs)
    if probs.dtype != input.dtype or not probs.is_contiguous():
        raise TypeError(f"dmi_ext: argument 'probs' of dmi_backward_into must be contiguous and of "
                        f"input's dtype ({input.dtype}), got {probs.dtype}")
    if probs.shape != input.shape:
        raise ValueError(f"dmi_ext: argument 'probs' has shape {_shape(probs)}, expected "
                         f"input's shape {_shape(input)}")


@torch.library.register_fake("dmi_ext::dmi_backward")
def _dmi_backward_fake(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction,
                       probs=None):
    G, _ = _check_inputs(input, target)
    _check_eps_reduction(0.0, reduction)
    C = input.shape[-1]
    if grad_table.dtype != torch.float64:
        raise TypeError(f"dmi_ext: argument 'grad_table' must be float64, got {grad_table.dtype}")
    if grad_table.numel() != G * C * C or grad_table.shape[-1] != C:
        raise ValueError(f"dmi_ext: argument 'grad_table' has shape {_shape(grad_table)}, "
                         f"expected ({G}, {C}, {C})")
    if grad_loss.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dmi_ext: argument 'grad_loss' must be float32 or float64, got "
                        f"{grad_loss.dtype}")
    expected = G if reduction == 0 else 1
    if grad_loss.numel() != expected:
        raise ValueError(f"dmi_ext: argument 'grad_loss' has {grad_loss.numel()} elements, "
                         f"expected {expected}")
    _check_same_device(("grad_loss", grad_loss), ("grad_table", grad_table), ("input", input))
    if probs is not None and not (probs.dim() == 1 and probs.shape[0] == 0):  # not the placeholder
        want = _loss_dtype(input)
        if probs.dtype != want:
            raise TypeError(f"dmi_ext: argument 'probs' must be {want} for {input.dtype} input "
                            f"(the forward's saved softmax), got {probs.dtype}")
        if probs.shape != input.shape:
            raise ValueError(f"dmi_ext: argument 'probs' has shape {_shape(probs)}, expected "
                             f"input's shape {_shape(input)}")
        _check_same_device(("probs", probs), ("input", input))
    return torch.empty_like(input, memory_format=torch.contiguous_format)
