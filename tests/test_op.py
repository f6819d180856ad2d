"""The op against its definition (dmi_ext.reference, contract §2-6): values, gradients, shapes,
dtypes, singular matrices, precision at large N, determinism."""

import math

import pytest
import torch
import torch.nn.functional as F

import dmi_ext
from dmi_ext import reference as ref

from conftest import KINDS, make_case


def loss_and_grad(fn, x, y, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, y, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), grad


def assert_matches_reference(x, y, rtol=1e-7, **kw):
    """Loss and gradient of the op equal the float64 reference's, with a random upstream."""
    with torch.no_grad():
        shape = ref.dmi_loss(x.double().cpu(), y.cpu(), **kw).shape
    up = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss_ref, grad_ref = loss_and_grad(ref.dmi_loss, x.double().cpu(), y.cpu(), upstream=up, **kw)
    loss, grad = loss_and_grad(dmi_ext.dmi_loss, x, y, upstream=up, **kw)
    assert loss.shape == loss_ref.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=rtol, atol=rtol)
    scale = grad_ref.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=rtol, atol=max(rtol * scale, 1e-290))


@pytest.mark.parametrize("C", [2, 3, 10, 14, 100, 300])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize,eps", [(True, 0.0), (False, 0.0), (True, 1e-3), (False, 1e-3)])
@pytest.mark.parametrize("from_logits", [True, False])
def test_matches_reference(device, C, kind, normalize, eps, from_logits):
    N = max(4 * C, 40)
    x, y = make_case(kind, N, C, from_logits=from_logits, n_ignored=N // 8, seed=C, device=device)
    assert_matches_reference(x, y, normalize=normalize, eps=eps, from_logits=from_logits,
                             reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_reductions(device, kind, reduction):
    x, y = make_case(kind, 50, 5, device=device)
    assert_matches_reference(x, y, reduction=reduction)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_of_outputs(device, kind):
    x, y = make_case(kind, 30, 4, device=device)
    G = {"single": 1, "batched": 3, "sources": 3}[kind]
    batch = () if kind == "single" else (G,)
    loss, info = dmi_ext.dmi_loss(x, y, reduction="none", return_info=True)
    assert loss.shape == batch and info.logabsdet.shape == batch and info.singular.shape == batch
    assert info.singular.dtype == torch.bool
    assert dmi_ext.dmi_loss(x, y).shape == ()
    U = dmi_ext.joint_matrix(x, y)
    assert U.shape == (*batch, 4, 4) and U.dtype == torch.float64
    torch.testing.assert_close(U.cpu(), ref.joint_matrix(x.cpu(), y.cpu()), rtol=1e-12, atol=1e-12)


def test_ignore_index_custom_value(device):
    x, y = make_case("sources", 40, 6, n_ignored=9, ignore_index=7, device=device)
    assert_matches_reference(x, y, ignore_index=7, reduction="none")


def test_int32_target(device):
    x, y = make_case("batched", 40, 6, n_ignored=3, device=device)
    assert_matches_reference(x, y.int(), reduction="none")


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_input(device, kind):
    x, y = make_case(kind, 60, 7, device=device)
    wide = torch.randn(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=device)
    wide[..., ::2] = x  # x as a strided view, last-dim stride 2
    xs = wide[..., ::2]
    assert not xs.is_contiguous()
    assert_matches_reference(xs, y, reduction="none")
    yt = y.t().contiguous().t() if y.dim() == 2 else y  # column-major target
    assert_matches_reference(xs, yt, reduction="none")
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major input
    assert_matches_reference(xt, y, reduction="none")


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float16, 2e-2),
                                        (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_dtypes(device, kind, dtype, rtol):
    """float16/bfloat16/float32 inputs: the reference is given the same (rounded) inputs, so the
    tolerance only covers the kernel's own float32 arithmetic and the gradient's output rounding."""
    x, y = make_case(kind, 200, 8, dtype=dtype, n_ignored=10, device=device)
    loss, info = dmi_ext.dmi_loss(x, y, reduction="none", return_info=True)
    assert loss.dtype == torch.float32 and info.logabsdet.dtype == torch.float32
    assert_matches_reference(x, y, rtol=rtol, reduction="none")


def test_double_loss_dtype(device):
    x, y = make_case("single", 20, 3, device=device)
    assert dmi_ext.dmi_loss(x, y).dtype == torch.float64


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("normalize,eps", [(True, 0.0), (False, 1e-3)])
def test_gradcheck(device, kind, from_logits, normalize, eps):
    x, y = make_case(kind, 12, 3, from_logits=from_logits, n_ignored=2, device=device)
    x.requires_grad_(True)
    fn = lambda inp: dmi_ext.dmi_loss(inp, y, from_logits=from_logits, normalize=normalize,
                                      eps=eps, reduction="none")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_joint_matrix(device):
    x, y = make_case("sources", 10, 3, n_ignored=2, device=device)
    x.requires_grad_(True)
    for normalize in (True, False):
        fn = lambda inp: dmi_ext.joint_matrix(inp, y, normalize=normalize)
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def official_loss(z, y):
    """The paper's code: float32 det of the unnormalised joint matrix, plus 0.001."""
    U = F.one_hot(y, z.shape[-1]).float().t() @ torch.softmax(z, -1)
    return -torch.log(torch.abs(torch.det(U)) + 0.001)


def test_official_compatibility_where_finite(device):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(128, 10, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    z_off = z.clone().requires_grad_(True)
    official = official_loss(z_off, y)
    official.backward()
    assert torch.isfinite(official)
    loss, grad = loss_and_grad(dmi_ext.dmi_loss, z.to(device), y.to(device), normalize=False,
                               eps=1e-3)
    torch.testing.assert_close(loss.cpu(), official.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.cpu(), z_off.grad, rtol=1e-3, atol=1e-3 * z_off.grad.abs().max().item())


def test_official_compatibility_where_official_overflows(device):
    g = torch.Generator().manual_seed(4)
    y = torch.arange(512) % 40
    z = torch.randn(512, 40, generator=g) + 8 * F.one_hot(y, 40)  # a confident classifier
    assert not torch.isfinite(official_loss(z, y))  # float32 det of a ~1e44 matrix overflows
    loss, grad = loss_and_grad(dmi_ext.dmi_loss, z.to(device), y.to(device), normalize=False,
                               eps=1e-3)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss_ref, grad_ref = loss_and_grad(ref.dmi_loss, z.double(), y, normalize=False, eps=1e-3)
    torch.testing.assert_close(loss.double().cpu(), loss_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-3, atol=1e-3 * grad_ref.abs().max().item())
    # Unnormalised det U ~ N^C: the loss is a large negative number, as the paper's users saw.
    assert loss.item() < -80


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("C", [5, 200])
def test_singular_absent_class(device, kind, eps, C):
    x, y = make_case(kind, 4 * C, C, device=device)
    y = torch.where(y == 1, 0, y)  # class 1 absent everywhere: a zero row of U
    loss, info = dmi_ext.dmi_loss(x, y, eps=eps, reduction="none", return_info=True)
    expected = math.inf if eps == 0 else -math.log(eps)
    assert torch.all(info.singular) and torch.all(info.logabsdet == -math.inf)
    torch.testing.assert_close(loss.double().cpu(), torch.full(loss.shape, expected, dtype=torch.float64))
    x = x.clone().requires_grad_(True)
    dmi_ext.dmi_loss(x, y, eps=eps).backward()
    assert torch.count_nonzero(x.grad) == 0
    assert_matches_reference(x.detach(), y, eps=eps, reduction="none")


def test_singular_matrix_among_regular_ones(device):
    x, y = make_case("batched", 40, 4, device=device)
    y[1] = torch.where(y[1] == 3, 2, y[1])  # only matrix 1 is singular
    x = x.clone().requires_grad_(True)
    loss, info = dmi_ext.dmi_loss(x, y, reduction="none", return_info=True)
    assert info.singular.tolist() == [False, True, False]
    assert torch.isinf(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    dmi_ext.dmi_loss(x, y).backward()  # mean is +inf; the gradient is still finite
    assert torch.isfinite(x.grad).all()
    assert torch.count_nonzero(x.grad[1]) == 0 and torch.count_nonzero(x.grad[0]) > 0


def test_all_rows_ignored_is_singular_not_nan(device):
    x, y = make_case("sources", 20, 3, device=device)
    y[0] = -100
    loss, info = dmi_ext.dmi_loss(x, y, reduction="none", return_info=True)
    assert info.singular.tolist() == [True, False, False] and torch.isinf(loss[0])
    assert not torch.isnan(dmi_ext.joint_matrix(x, y)).any()


def test_near_singular_is_finite_and_exact(device):
    # Two classes whose prediction rows nearly coincide: det U ~ 1e-10, not zero.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.arange(60) % 3
    x[y == 1] = x[y == 0] + 1e-5 * torch.randn(20, 3, generator=g, dtype=torch.float64)
    x, y = x.to(device), y.to(device)
    loss, info = dmi_ext.dmi_loss(x, y, return_info=True)
    assert not info.singular and torch.isfinite(loss) and loss.item() > 15
    _, grad = loss_and_grad(dmi_ext.dmi_loss, x, y)
    assert torch.isfinite(grad).all()
    assert_matches_reference(x, y, rtol=1e-5)


def test_nan_input_gives_nan_loss(device):
    x, y = make_case("batched", 20, 3, device=device)
    x[1, 5, 2] = float("nan")
    loss = dmi_ext.dmi_loss(x, y, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()


def test_unvalidated_bad_label_poisons_only_its_matrix(device):
    x, y = make_case("sources", 20, 3, device=device)
    y[2, 4] = 17
    loss = dmi_ext.dmi_loss(x, y, reduction="none", validate=False)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@pytest.mark.slow
def test_large_n_precision(device):
    """N = 10^6 float32 rows: the loss is within 1e-6 relative of the float64 reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10**6, 10, generator=g) * 2
    y = torch.randint(0, 10, (10**6,), generator=g)
    expected = ref.dmi_loss(x, y).item()
    got = dmi_ext.dmi_loss(x.to(device), y.to(device)).item()
    assert abs(got - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("kind,N", [("single", 200_000), ("batched", 30_000), ("sources", 50_000)])
def test_deterministic(device, kind, N):
    x, y = make_case(kind, N, 10, dtype=torch.float32, n_ignored=100, device=device)
    runs = [loss_and_grad(dmi_ext.dmi_loss, x, y, reduction="none") for _ in range(3)]
    for loss, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_inputs_not_modified(device):
    x, y = make_case("sources", 30, 4, device=device, n_ignored=3)
    x0, y0 = x.clone(), y.clone()
    xg = x.clone().requires_grad_(True)
    dmi_ext.dmi_loss(xg, y).backward()
    dmi_ext.joint_matrix(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(xg.detach(), x0)


def test_module_matches_functional(device):
    x, y = make_case("single", 50, 5, device=device)
    m = dmi_ext.DMILoss(normalize=False, eps=1e-3, reduction="sum")
    assert torch.equal(m(x, y), dmi_ext.dmi_loss(x, y, normalize=False, eps=1e-3, reduction="sum"))
    assert "eps=0.001" in repr(m)


def test_double_backward_raises_clearly(device):
    x, y = make_case("single", 20, 3, device=device)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(dmi_ext.dmi_loss(x, y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_of_very_different_scale(device, dtype):
    """Logit rows far above their neighbours (the kernel shifts a whole tile by one max) and -inf
    entries (masked classes) still give the per-row softmax."""
    x, y = make_case("sources", 300, 6, dtype=dtype, device=device)
    x[::7] += 300.0  # every 7th row sits 300 above the rest of its tile
    x[5::11, 2] = float("-inf")  # some classes masked out
    assert_matches_reference(x, y, rtol=2e-5 if dtype == torch.float32 else 1e-9, reduction="none")


def test_positive_inf_logit_gives_nan_like_softmax(device):
    x, y = make_case("batched", 30, 4, dtype=torch.float32, device=device)
    x[2, 3, 1] = float("inf")  # torch.softmax of this row is NaN
    loss = dmi_ext.dmi_loss(x, y, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


def test_library_lu_after_set_num_threads(tmp_path):
    """Above the fused limit the LU is LAPACK's. torch 2.13's MKL batched LU breaks once
    torch.set_num_threads has been called (pytorch/pytorch#141358): the op must still be right,
    in a process that has called it, for batched and multi-source calls."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "after_set_num_threads.py"
    script.write_text(textwrap.dedent("""
        import torch, dmi_ext
        from dmi_ext import reference as ref
        torch.set_num_threads(torch.get_num_threads())
        g = torch.Generator().manual_seed(0)
        for x, y in [(torch.randn(3, 900, 200, generator=g, dtype=torch.float64),
                      (torch.arange(900) % 200).repeat(3, 1)),
                     (torch.randn(900, 200, generator=g, dtype=torch.float64),
                      torch.stack([torch.randperm(900, generator=g) % 200 for _ in range(2)]))]:
            got = dmi_ext.dmi_loss(x, y, reduction="none")
            xs = x if x.dim() == 3 else x.expand(y.shape[0], -1, -1)
            # the reference one matrix at a time (single-matrix LAPACK calls are not affected)
            want = torch.stack([ref.dmi_loss(xs[i], y[i]) for i in range(y.shape[0])])
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
        print("ok")
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


@pytest.mark.parametrize("C", [10, 100, 200])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_without_gradient_skips_the_inverse(device, C, kind):
    """need_grad_table=False (what dmi_loss asks for under no_grad / inference_mode, or when no
    input requires grad) stops at the LU: the same loss, log|det U| and flags, bit for bit, and an
    empty (0, C, C) table."""
    x, y = make_case(kind, 4 * C, C, dtype=torch.float32, n_ignored=5, device=device)
    y[..., 0] = -100
    full = torch.ops.dmi_ext.dmi.default(x, y, True, True, 1e-3, -100, 0, True, True)
    lean = torch.ops.dmi_ext.dmi.default(x, y, True, True, 1e-3, -100, 0, True, False)
    for a, b in zip(full[:3], lean[:3]):
        assert torch.equal(a, b)
    assert lean[3].shape == (0, C, C) and full[3].shape[1:] == (C, C)
    with torch.inference_mode():
        loss, info = dmi_ext.dmi_loss(x, y, eps=1e-3, reduction="none", return_info=True)
    assert torch.equal(loss, full[0]) and torch.equal(info.logabsdet, full[1])
    # A gradient can follow: the autograd kernel asks for the table whatever the call says.
    xg = x.clone().requires_grad_(True)
    out = torch.ops.dmi_ext.dmi.default(xg, y, True, True, 1e-3, -100, 1, True, False)
    (grad,) = torch.autograd.grad(out[0], xg)
    assert out[3].shape[0] > 0 and torch.isfinite(grad).all()


# The saved softmax (issue 23): from logits the CPU forward keeps P for the backward, which then
# writes the gradient over it when the graph is not retained. Every path gives the same bits as
# the backward op recomputing P from the logits.

def _recomputed_grad(x, y, upstream, reduction):
    """The gradient by the backward op alone, recomputing the softmax from x."""
    with torch.no_grad():
        out = torch.ops.dmi_ext.dmi.default(x, y, True, True, 0.0, -100, reduction, True, True)
    return torch.ops.dmi_ext.dmi_backward.default(upstream.to(out[0].dtype), x, y, out[3], True,
                                                  -100, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("C", [3, 10, 37])
def test_saved_softmax_gives_the_recomputed_gradient(device, dtype, kind, C):
    x, y = make_case(kind, 5 * C, C, dtype=dtype, n_ignored=7, seed=C, device=device)
    reduction = "none" if kind != "single" else "mean"
    code = {"none": 0, "mean": 1}[reduction]
    loss = dmi_ext.dmi_loss(x.clone().requires_grad_(True), y, reduction=reduction)
    up = torch.rand(loss.shape, generator=torch.Generator().manual_seed(2)).to(device)
    want = _recomputed_grad(x, y, up.to(loss.dtype), code)
    xg = x.clone().requires_grad_(True)
    (once,) = torch.autograd.grad(dmi_ext.dmi_loss(xg, y, reduction=reduction), xg, up)
    assert torch.equal(once, want)
    # Retained graph: the first backward reads the saved P, the second may consume it.
    loss = dmi_ext.dmi_loss(xg, y, reduction=reduction)
    (first,) = torch.autograd.grad(loss, xg, up, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xg, up)
    assert torch.equal(first, want) and torch.equal(second, want)


def test_saved_softmax_is_the_softmax_and_only_when_asked():
    x, y = make_case("single", 40, 6, dtype=torch.float32)
    ops = torch.ops.dmi_ext
    out = ops.dmi.default(x, y, True, True, 0.0, -100, 1, True, True, True)
    assert out[4].dtype == torch.float32 and out[4].shape == x.shape
    torch.testing.assert_close(out[4], torch.softmax(x, -1), rtol=2e-6, atol=1e-7)
    assert ops.dmi.default(x, y, True, True, 0.0, -100, 1, True, True, False)[4].shape == (0,)
    p = torch.softmax(x, -1)
    assert ops.dmi.default(p, y, False, True, 0.0, -100, 1, True, True, True)[4].shape == (0,)
    half = ops.dmi.default(x.half(), y, True, True, 0.0, -100, 1, True, True, True)[4]
    assert half.dtype == torch.float32 and half.shape == x.shape
    # Through the autograd kernel the probabilities are kept whatever the call says.
    xg = x.clone().requires_grad_(True)
    assert ops.dmi.default(xg, y, True, True, 0.0, -100, 1, True, False, False)[4].shape == x.shape


def test_backward_never_writes_over_probabilities_someone_holds():
    """torch.ops hands the saved probabilities to the caller too: the backward then leaves them
    alone and returns a new gradient."""
    x, y = make_case("single", 40, 6, dtype=torch.float32)
    xg = x.clone().requires_grad_(True)
    out = torch.ops.dmi_ext.dmi.default(xg, y, True, True, 0.0, -100, 1, True)
    kept = out[4].clone()
    (grad,) = torch.autograd.grad(out[0], xg)
    assert torch.equal(out[4], kept)
    assert grad.data_ptr() != out[4].data_ptr()
    assert torch.equal(grad, _recomputed_grad(x, y, torch.ones(()), 1))


def test_saved_softmax_under_saved_tensor_hooks():
    """Saved-tensor hooks see the probabilities like any saved tensor (here: packed as copies)."""
    x, y = make_case("sources", 40, 6, dtype=torch.float32)
    xg = x.clone().requires_grad_(True)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = dmi_ext.dmi_loss(xg, y)
    assert tuple(x.shape) in [tuple(s) for s in packed]
    (grad,) = torch.autograd.grad(loss, xg)
    assert torch.equal(grad, _recomputed_grad(x, y, torch.ones(()), 1))
