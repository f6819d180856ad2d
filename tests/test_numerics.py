"""Numerical robustness (docs/contract.md, "Singular matrices" and "Precision"): rank-deficient U
of every construction is singular (never NaN, never -inf), near-singular regular U stays exact,
subnormal probabilities are kept, and the loss at N = 10^6 is as accurate as torch's own float32
pipeline."""

import math

import pytest
import torch

import dmi_ext
from dmi_ext import reference as ref

# Both LU paths: Gauss-Jordan up to FUSED_MAX_CLASSES, LAPACK above.
CLASSES = [2, 3, 10, 37, 100, 128, 129, 200]


def every_class_labels(N, C, g):
    y = torch.randint(0, C, (N,), generator=g)
    y[:C] = torch.arange(C)
    return y[torch.randperm(N, generator=g)]


def rank_deficient(construction, C, seed, dtype=torch.float32):
    """(logits, labels) with every class present whose U is singular in exact arithmetic."""
    g = torch.Generator().manual_seed(seed)
    N = 8 * C + 16
    y = every_class_labels(N, C, g)
    scale = [0.0, 0.3, 3.0][seed % 3]
    if construction == "constant":  # the network ignores its input
        x = (torch.randn(C, generator=g) * scale).expand(N, C).clone()
    elif construction == "few_outputs":  # the network's output takes r < C distinct values
        r = max(1, C // 3)
        outputs = torch.randn(r, C, generator=g) * max(scale, 1.0)
        x = outputs[torch.randint(0, r, (N,), generator=g)]
    elif construction == "class_outputs":  # one output per class, two classes share theirs
        per_class = torch.randn(C, C, generator=g) * max(scale, 1.0)
        per_class[1] = per_class[0]
        x = per_class[y]
    elif construction == "equal_columns":  # two classes always predicted alike
        x = torch.randn(N, C, generator=g) * max(scale, 1.0)
        x[:, C - 1] = x[:, 0]
    elif construction == "duplicate_rows":  # two classes labelling the same predictions
        half = torch.randn(N // 2, C, generator=g) * max(scale, 1.0)
        x = torch.cat([half, half])
        yh = every_class_labels(N // 2, C, g)
        y = torch.cat([yh, yh])
        y[N // 2:][yh == 0] = 1  # class 1's rows in the 2nd half repeat class 0's of the 1st
        y[N // 2:][yh == 1] = 0
    else:
        raise ValueError(construction)
    return x.to(dtype), y


CONSTRUCTIONS = ["constant", "few_outputs", "class_outputs", "equal_columns", "duplicate_rows"]


def loss_info_grad(x, y, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss, info = dmi_ext.dmi_loss(x, y, return_info=True, **kw)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), info, grad


@pytest.mark.parametrize("C", CLASSES)
@pytest.mark.parametrize("construction", CONSTRUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_is_singular(construction, C, dtype):
    if construction == "class_outputs" and C == 2:
        pytest.skip("two classes sharing one output is the constant case")
    for seed in range(3):
        x, y = rank_deficient(construction, C, seed, dtype)
        for eps in (0.0, 1e-3):
            loss, info, grad = loss_info_grad(x, y, eps=eps)
            assert bool(info.singular), (construction, C, seed, loss)
            want = torch.tensor(math.inf if eps == 0 else -math.log(eps), dtype=loss.dtype)
            assert torch.equal(loss, want)
            assert torch.equal(grad, torch.zeros_like(grad))
        assert bool(ref.is_singular(ref.joint_matrix(x.double(), y)))


@pytest.mark.parametrize("C", [10, 100, 200])
@pytest.mark.parametrize("construction", ["constant", "few_outputs", "class_outputs"])
def test_slightly_perturbed_is_regular_and_exact(construction, C):
    """The same constructions plus a small random perturbation: regular, equal to the reference."""
    x, y = rank_deficient(construction, C, 1, torch.float64)
    x = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    loss, info, grad = loss_info_grad(x, y)
    assert not info.singular and torch.isfinite(loss) and torch.isfinite(grad).all()
    xr = x.clone().requires_grad_(True)
    loss_ref = ref.dmi_loss(xr, y)
    (grad_ref,) = torch.autograd.grad(loss_ref, xr)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-7, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5 * grad_ref.abs().max().item())


@pytest.mark.parametrize("C", [10, 150])
def test_one_singular_matrix_among_batched_and_sources(C):
    g = torch.Generator().manual_seed(0)
    N = 8 * C + 16
    # B problems: problem 1 has a constant output.
    x = torch.randn(3, N, C, generator=g)
    x[1] = x[1, 0]
    y = torch.stack([every_class_labels(N, C, g) for _ in range(3)])
    loss, info, grad = loss_info_grad(x, y, reduction="none")
    assert info.singular.tolist() == [False, True, False]
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and torch.isfinite(grad).all()
    # M sources over one input: source 1 labels duplicated predictions with two classes.
    xd, y1 = rank_deficient("duplicate_rows", C, 0)
    y0 = every_class_labels(len(y1), C, g)
    loss, info, grad = loss_info_grad(xd, torch.stack([y0, y1, y0.flip(0)]), reduction="none")
    assert info.singular.tolist() == [False, True, False]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_issue_reproducers():
    """The three cases that gave NaN, -inf and a gradient of 1e16."""
    x = torch.zeros(1000, 100)
    y = torch.arange(1000) % 100
    cases = [(x, y)]
    torch.manual_seed(36)
    C = 100
    b = torch.randn(C)
    N = 8 * C + 16
    y = torch.randint(0, C, (N,))
    y[:C] = torch.arange(C)
    cases.append((b.expand(N, C).clone(), y))
    torch.manual_seed(0)
    x = torch.randn(10, 10)
    x[3] = x[7]
    cases.append((x, torch.arange(10)))
    for x, y in cases:
        loss, info, grad = loss_info_grad(x, y)
        assert loss.item() == math.inf and bool(info.singular)
        assert torch.equal(grad, torch.zeros_like(grad))
        assert ref.dmi_loss(x.double(), y).item() == math.inf


def test_subnormal_probabilities_are_kept():
    """exp(-90) and exp(-91) are subnormal floats: the loss is the reference's, for any N."""
    x = torch.tensor([[0.0, -90.0]] * 8 + [[0.0, -91.0]] * 8)
    y = torch.tensor([0] * 8 + [1] * 8)
    want = ref.dmi_loss(x, y).item()
    loss, info, grad = loss_info_grad(x, y)
    assert not info.singular and abs(loss.item() - want) <= 1e-5 * want
    assert torch.isfinite(grad).all()
    short, _, _ = loss_info_grad(x[[0, 8]], y[[0, 8]])  # the scalar short-tile path
    assert abs(short.item() - want) <= 1e-5 * want
    # The softmax keeps what torch.softmax keeps.
    sums, _ = torch.ops.dmi_ext.joint(x[:, None, :], torch.zeros(16, 1, dtype=torch.long), True,
                                      -100, True)
    torch.testing.assert_close(sums[:, 0, :].float(), x.softmax(-1), rtol=2e-7, atol=0)


def test_gradient_beyond_float_range_is_finite():
    """Probabilities ~1e-44 make |U^-1| ~1e43, past float32: the backward still gives a finite,
    correct gradient (it switches to float64 tables)."""
    x = torch.tensor([[0.0, -100.0]] * 8 + [[0.0, -101.0]] * 8)
    y = torch.tensor([0] * 8 + [1] * 8)
    loss, info, grad = loss_info_grad(x, y)
    xr = x.double().requires_grad_(True)
    # The reference from the same float32 probabilities (their rounding dominates here).
    U = torch.zeros(2, 2, dtype=torch.float64).index_add_(0, y, x.softmax(-1).double()) / 16
    assert not info.singular and torch.isfinite(grad).all()
    assert abs(loss.item() + torch.linalg.slogdet(U).logabsdet.item()) <= 1e-5 * loss.item()
    loss_ref = ref.dmi_loss(xr, y)
    (grad_ref,) = torch.autograd.grad(loss_ref, xr)
    # float32 probabilities of ~1e-44 carry a few bits: a few per cent from the float64 gradient
    # (a table saturated at the float range, or inf, would be far off or NaN).
    torch.testing.assert_close(grad.double(), grad_ref, rtol=5e-2, atol=5e-2)


def test_subnormal_joint_matrix_lu():
    """A subnormal U: finite, exact loss (the equilibration keeps it in range), not NaN."""
    sums = torch.eye(3, dtype=torch.float64) * 5e-324
    loss, lad, singular, _ = torch.ops.dmi_ext.lu_loss(sums, torch.tensor(1), False, 0.0)
    assert not singular and lad.item() == pytest.approx(3 * math.log(5e-324), rel=1e-12)
    assert loss.item() == -lad.item()


def softmax_errors(x):
    """Signed errors, in units of 2^-23 p, of the op's probabilities and torch.softmax's."""
    B, C = x.shape
    sums, _ = torch.ops.dmi_ext.joint(x[:, None, :], torch.zeros(B, 1, dtype=torch.long), True,
                                      -100, True)
    exact = x.double().softmax(-1)
    unit = exact * 2.0**-23
    return (sums[:, 0, :] - exact) / unit, (x.softmax(-1).double() - exact) / unit


@pytest.mark.parametrize("kind", ["clustered", "spread"])
def test_softmax_accurate_and_unbiased(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "clustered":
        x = torch.randn(10, generator=g) * 2 + 0.1 * torch.randn(100_000, 10, generator=g)
    else:
        x = torch.randn(100_000, 10, generator=g) * 3
    ours, torchs = softmax_errors(x)
    assert ours.mean(0).abs().max() <= 0.1  # bias per class, in units of 2^-23 p
    assert ours.abs().max() <= torchs.abs().max() + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("C", [2, 10])
def test_precision_clustered_logits_at_a_million_rows(C):
    """Loss error against the float64 reference at most twice that of torch's float32 pipeline
    (float32 softmax, float64 accumulation, slogdet), or 1e-6 relative."""
    torch.manual_seed(8)
    N = 1_000_000
    y = torch.randint(0, C, (N,))
    x = torch.randn(C) * 2 + 0.1 * torch.randn(N, C)
    want = ref.dmi_loss(x.double(), y).item()
    U = torch.zeros(C, C, dtype=torch.float64).index_add_(0, y, x.softmax(-1).double()) / N
    torch_err = abs(-torch.linalg.slogdet(U).logabsdet.item() - want)
    err = abs(dmi_ext.dmi_loss(x, y).item() - want)
    assert err <= max(2 * torch_err, 1e-6 * abs(want)), (err, torch_err, want)
