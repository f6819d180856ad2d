"""Property-based tests: over random shapes, label patterns (absent classes, ignored rows,
fewer rows than classes) and keywords, the op equals the float64 reference, never gives NaN for
finite input, and its loss obeys the invariances of contract §3."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmi_ext
from dmi_ext import reference as ref


@st.composite
def cases(draw):
    kind = draw(st.sampled_from(["single", "batched", "sources"]))
    C = draw(st.integers(2, 12))
    N = draw(st.integers(1, 40))
    G = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    lead = (G,) if kind == "batched" else ()
    scale = draw(st.sampled_from([0.1, 1.0, 5.0]))
    x = torch.randn(*lead, N, C, generator=gen, dtype=torch.float64) * scale
    n_labels = (G, N) if kind != "single" else (N,)
    # A random subset of classes in use: absent classes make U singular.
    used = torch.randperm(C, generator=gen)[: draw(st.integers(1, C))]
    y = used[torch.randint(0, len(used), n_labels, generator=gen)]
    y = torch.where(torch.rand(n_labels, generator=gen) < draw(st.sampled_from([0.0, 0.2])), -100, y)
    kw = dict(
        from_logits=draw(st.booleans()),
        normalize=draw(st.booleans()),
        eps=draw(st.sampled_from([0.0, 1e-3, 0.5])),
        reduction="none",
    )
    if not kw["from_logits"]:
        x = x.softmax(-1)
    return x, y, kw


@settings(max_examples=150, deadline=None)
@given(cases())
def test_matches_reference(case):
    x, y, kw = case
    xr = x.clone().requires_grad_(True)
    loss_ref = ref.dmi_loss(xr, y, **kw)
    xo = x.clone().requires_grad_(True)
    loss, info = dmi_ext.dmi_loss(xo, y, return_info=True, **kw)
    assert not torch.isnan(loss).any()
    torch.testing.assert_close(info.singular, ref.is_singular(ref.joint_matrix(
        x, y, from_logits=kw["from_logits"], normalize=kw["normalize"])))
    finite = torch.isfinite(loss_ref)
    assert torch.equal(finite, torch.isfinite(loss))
    torch.testing.assert_close(loss[finite], loss_ref[finite], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss[~finite], loss_ref[~finite])
    # Gradients of finite losses only: an infinite loss has a zero gradient in both.
    up = torch.where(finite, 1.0, 0.0).double()
    (g_ref,) = torch.autograd.grad(loss_ref, xr, up)
    (g,) = torch.autograd.grad(loss, xo, up)
    assert torch.isfinite(g).all()
    scale = max(g_ref.abs().max().item(), 1e-12)
    # Ill-conditioned U (tiny det) amplifies rounding in both: compare relative to the largest.
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5 * scale)


@settings(max_examples=40, deadline=None)
@given(cases(), st.integers(0, 2**31 - 1))
def test_row_order_and_label_permutation_invariance(case, seed):
    """Shuffling rows leaves U unchanged; relabelling classes permutes U's rows, so |det U| and the
    loss are unchanged."""
    x, y, kw = case
    gen = torch.Generator().manual_seed(seed)
    N, C = x.shape[-2], x.shape[-1]
    perm_rows = torch.randperm(N, generator=gen)
    relabel = torch.randperm(C, generator=gen)
    y2 = torch.where(y >= 0, relabel[y.clamp(min=0)], y)
    base = dmi_ext.dmi_loss(x, y, **kw)
    shuffled = dmi_ext.dmi_loss(x[..., perm_rows, :], y[..., perm_rows], **kw)
    relabelled = dmi_ext.dmi_loss(x, y2, **kw)
    torch.testing.assert_close(shuffled, base, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(relabelled, base, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1))
def test_normalisation_shifts_loss_by_c_log_n(C, seed):
    """contract §3: with eps = 0, scaling U by 1/n changes the loss by C log n, not the gradient."""
    gen = torch.Generator().manual_seed(seed)
    N = 4 * C
    x = torch.randn(N, C, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.arange(N) % C
    l_norm = dmi_ext.dmi_loss(x, y, normalize=True)
    (g_norm,) = torch.autograd.grad(l_norm, x)
    l_raw = dmi_ext.dmi_loss(x, y, normalize=False)
    (g_raw,) = torch.autograd.grad(l_raw, x)
    torch.testing.assert_close(l_norm - l_raw, torch.tensor(C * math.log(N), dtype=torch.float64))
    torch.testing.assert_close(g_norm, g_raw, rtol=1e-8, atol=1e-10)
