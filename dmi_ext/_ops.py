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


def _matrices(input, target):
    """(number of matrices G, single) for the shapes of SPEC §2."""
    if input.dim() == 2 and target.dim() == 1:
        return 1, True
    if input.dim() == 2:
        return target.shape[0], False  # M label sources
    return input.shape[0], False  # B problems


def _loss_dtype(input):
    return torch.float64 if input.dtype == torch.float64 else torch.float32


@torch.library.register_fake("dmi_ext::joint")
def _joint_fake(input, target, from_logits, ignore_index, validate):
    G, single = _matrices(input, target)
    C = input.shape[-1]
    batch = () if single else (G,)
    return (input.new_empty((*batch, C, C), dtype=torch.float64),
            input.new_empty(batch, dtype=torch.int64))


@torch.library.register_fake("dmi_ext::lu_loss")
def _lu_loss_fake(sums, counts, normalize, eps):
    batch = counts.shape
    return (sums.new_empty(batch), sums.new_empty(batch),
            sums.new_empty(batch, dtype=torch.bool), torch.empty_like(sums))


@torch.library.register_fake("dmi_ext::dmi")
def _dmi_fake(input, target, from_logits, normalize, eps, ignore_index, reduction, validate,
              need_grad_table=True):
    G, single = _matrices(input, target)
    C = input.shape[-1]
    batch = () if single else (G,)
    dtype = _loss_dtype(input)
    loss = input.new_empty(batch if reduction == 0 else (), dtype=dtype)
    return (loss, input.new_empty(batch, dtype=dtype), input.new_empty(batch, dtype=torch.bool),
            input.new_empty((G if need_grad_table else 0, C, C), dtype=torch.float64))


@torch.library.register_fake("dmi_ext::dmi_backward")
def _dmi_backward_fake(grad_loss, input, target, grad_table, from_logits, ignore_index, reduction):
    return torch.empty_like(input, memory_format=torch.contiguous_format)
