"""What the benchmarks compare, and on which shapes: shared by the pytest-benchmark suite
(test_speed.py) and the side-by-side report (report.py).

Every variant maps (logits, labels) to a scalar L_DMI (mean over the matrices) with autograd:
  native   softmax -> one_hot -> matmul -> slogdet: what a PyTorch user writes
  official the paper's code: float32 det of the unnormalised U, + 1e-3 (a different value)
  tuned    plain torch without the N x C one-hot: index_add of the probability rows, slogdet
  fused    dmi_ext.dmi_loss
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import dmi_ext


def _joint_one_hot(p, y, C):
    onehot = F.one_hot(y, C).to(p.dtype)
    return onehot.mT @ p  # (.., C, N) @ (.., N, C); (M, N, C) one-hots broadcast over one p


def native(z, y):
    C = z.shape[-1]
    U = _joint_one_hot(torch.softmax(z, -1), y, C) / y.shape[-1]
    return -torch.linalg.slogdet(U).logabsdet.mean()


def official(z, y):
    C = z.shape[-1]
    U = _joint_one_hot(torch.softmax(z.float(), -1), y, C)
    return -torch.log(torch.abs(torch.det(U)) + 0.001).mean()


def tuned(z, y):
    C = z.shape[-1]
    p = torch.softmax(z, -1)
    N = y.shape[-1]
    G = y.numel() // N
    matrix = torch.arange(G, device=y.device).repeat_interleave(N)  # matrix of each label
    rows = p.reshape(-1, C) if p.dim() == 3 else p.repeat(G, 1)  # M sources share p
    U = torch.zeros(G * C, C, dtype=p.dtype, device=p.device)
    U = U.index_add(0, matrix * C + y.reshape(-1), rows).view(G, C, C) / N
    return -torch.linalg.slogdet(U).logabsdet.mean()


def fused(z, y):
    return dmi_ext.dmi_loss(z, y)


VARIANTS = {"native": native, "official": official, "tuned": tuned, "fused": fused}


@dataclass(frozen=True)
class Shape:
    """N rows, C classes; B independent problems or M label sources (at most one of them)."""

    N: int
    C: int
    B: int = 0
    M: int = 0

    @property
    def name(self) -> str:
        lead = f"B={self.B} " if self.B else f"M={self.M} " if self.M else ""
        return f"{lead}N={self.N} C={self.C}"

    @property
    def elements(self) -> int:
        return max(self.B, 1) * self.N * self.C

    def make(self, device="cpu", dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        lead = (self.B,) if self.B else ()
        z = torch.randn(*lead, self.N, self.C, generator=g, dtype=dtype)
        labels = (self.B or self.M or 1, self.N)
        y = torch.randint(0, self.C, labels, generator=g)
        if not (self.B or self.M):
            y = y[0]
        return z.to(device), y.to(device)


NS = [128, 1024, 8192, 65536, 10**6]
CS = [2, 10, 14, 100, 1000]


def full_grid():
    """The issue's grid, without shapes that cannot be meant: fewer rows than classes (U is then
    always singular) or over 10^7 elements (native's one-hot alone would be gigabytes)."""
    shapes = [Shape(N, C) for N in NS for C in CS if C <= N and N * C <= 10**7]
    shapes += [Shape(128, C, B=B) for B in (256, 1024) for C in (10, 100)]
    shapes += [Shape(N, 10, M=8) for N in (1024, 8192)]
    return shapes


def quick_grid():
    """The shapes of the contract's CPU speed rows (docs/contract.md §8), plus one of each kind."""
    return [Shape(128, 10), Shape(1024, 10), Shape(8192, 10), Shape(8192, 100),
            Shape(128, 10, B=256), Shape(10**6, 10), Shape(8192, 10, M=8)]


def smoke_grid():
    """A few small shapes for CI, so the suites cannot rot."""
    return [Shape(128, 10), Shape(1024, 100), Shape(128, 10, B=16), Shape(256, 4, M=3)]


# Above this many input elements agreement is not checked: native's float64 one-hot gets large.
AGREEMENT_MAX_ELEMENTS = 2 * 10**6


def check_agreement(shape, device="cpu"):
    """native, tuned and fused compute the same loss (official differs by design)."""
    z, y = shape.make(device, dtype=torch.float64)
    ref = native(z, y)
    for name in ("tuned", "fused"):
        got = VARIANTS[name](z, y)
        if not math.isclose(got.item(), ref.item(), rel_tol=1e-8, abs_tol=1e-8):
            raise AssertionError(f"{name} gives {got.item()} but native {ref.item()} on {shape.name}")
