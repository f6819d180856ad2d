"""Shared fixtures: the device matrix (CUDA cases skip cleanly without a GPU) and case builders."""

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def full_rank_labels(n_kept, C, generator):
    """n_kept labels in [0, C) with every class present (so U is non-singular almost surely)."""
    assert n_kept >= C
    y = torch.arange(n_kept) % C
    return y[torch.randperm(n_kept, generator=generator)]


def make_case(kind, N, C, *, dtype=torch.float64, from_logits=True, n_ignored=0, M=3, B=3,
              ignore_index=-100, seed=0, device="cpu"):
    """Random (input, target) of one of the three shapes of contract §2.

    N rows are kept per matrix (all classes present) and n_ignored more carry ignore_index.
    """
    g = torch.Generator().manual_seed(seed)
    rows = N + n_ignored
    lead = (B,) if kind == "batched" else ()
    x = torch.randn(*lead, rows, C, generator=g, dtype=torch.float64)
    if not from_logits:  # probability rows that are not a softmax of anything in particular
        x = torch.rand(*lead, rows, C, generator=g, dtype=torch.float64) + 0.05
        x = x / x.sum(-1, keepdim=True)
    n_targets = {"single": None, "batched": B, "sources": M}[kind]

    def one_target():
        t = torch.cat([full_rank_labels(N, C, g), torch.full((n_ignored,), ignore_index)])
        return t[torch.randperm(rows, generator=g)]

    y = one_target() if n_targets is None else torch.stack([one_target() for _ in range(n_targets)])
    return x.to(device=device, dtype=dtype), y.to(device)


KINDS = ["single", "batched", "sources"]
