"""The maths of SPEC §3-5 in plain torch, float64: the definition the kernels are tested against.

Slow on purpose (one-hot, matmul, slogdet, autograd), and short enough to read at a glance.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def joint_matrix(input: Tensor, target: Tensor, *, from_logits: bool = True,
                 normalize: bool = True, ignore_index: int = -100) -> Tensor:
    P = input.double().softmax(-1) if from_logits else input.double()
    target = target.long()  # compared in int64, as the op does: int32 would wrap ignore_index
    kept = target != ignore_index
    onehot = F.one_hot(torch.where(kept, target, 0), P.shape[-1]).double()
    U = (onehot * kept[..., None]).mT @ P  # (.., C, N) @ (.., N, C): row = label, col = prediction
    if normalize:
        U = U / kept.sum(-1).clamp(min=1)[..., None, None]
    return U


def _pow2_scale(m: Tensor) -> Tensor:
    """The power of two 2^e with m / 2^e in [1, 2); 1 where m is 0."""
    return torch.where(m > 0, torch.ldexp(torch.ones_like(m), torch.frexp(m).exponent - 1),
                       torch.ones_like(m))


def is_singular(U: Tensor) -> Tensor:
    """The singular rule: U with its rows, then its columns, divided by the powers of two that put
    each one's largest entry in [1, 2), has an LU pivot with |pivot| <= C * 2^-44."""
    C = U.shape[-1]
    A = U / _pow2_scale(U.abs().amax(-1))[..., :, None]
    A = A / _pow2_scale(A.abs().amax(-2))[..., None, :]
    LU, _, info = torch.linalg.lu_factor_ex(A)
    pivots = LU.diagonal(dim1=-2, dim2=-1).abs()
    return (info > 0) | (pivots <= C * 2.0**-44).any(-1)


def dmi_loss(input: Tensor, target: Tensor, *, from_logits: bool = True, normalize: bool = True,
             eps: float = 0.0, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    U = joint_matrix(input, target, from_logits=from_logits, normalize=normalize,
                     ignore_index=ignore_index)
    singular = is_singular(U)
    safe = torch.where(singular[..., None, None], torch.eye(U.shape[-1], dtype=U.dtype), U)
    logabsdet = torch.where(singular, -math.inf, torch.linalg.slogdet(safe).logabsdet)
    loss = -torch.logaddexp(logabsdet, torch.tensor(math.log(eps) if eps > 0 else -math.inf,
                                                    dtype=U.dtype))
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


class DMILoss(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return dmi_loss(input, target, **self.kwargs)
