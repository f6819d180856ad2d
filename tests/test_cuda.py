"""The CUDA kernels beyond the device-parametrized tests (issue 3): CPU and CUDA agree on the same
inputs, forward+backward never synchronises with the host (validate=False), a CUDA graph replays
the eager result, runs are bitwise identical, and the partial last block, several blocks per
matrix and C at and above the fused limit all give the reference. Every test skips without a GPU.

Which path synchronises: only validate=True, which reads the kernels' error record (first bad
label, first non-probability row) back to the host once per forward; validate=False reads nothing.
"""

import pytest
import torch

import dmi_ext
from dmi_ext import reference as ref

from conftest import CUDA, KINDS, make_case

pytestmark = pytest.mark.skipif(not CUDA, reason="no CUDA device")

FUSED = dmi_ext.FUSED_MAX_CLASSES
ops = torch.ops.dmi_ext


def forward_backward(x, y, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss, info = dmi_ext.dmi_loss(x, y, return_info=True, **kw)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss)
    (grad,) = torch.autograd.grad(loss, x, up)
    return loss.detach(), info, grad


# Shapes that exercise the kernels' geometry: one block, several blocks per matrix with a partial
# last tile and block, batched one-block-per-matrix, many label sources, each size class of the
# in-register LU (C <= 32, <= 64, <= 128) and the library LU above the fused limit.
GEOMETRY = [
    ("single", 300, 10), ("single", 70_001, 10), ("single", 5_003, 100), ("single", 3_001, FUSED),
    ("single", 2_000, FUSED + 1), ("batched", 257, 33), ("batched", 129, 64), ("sources", 9_999, 7),
    ("sources", 1_000, 100), ("batched", 500, 200),
]


@pytest.mark.parametrize("kind,N,C", GEOMETRY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(kind, N, C, dtype):
    x, y = make_case(kind, N, C, dtype=dtype, n_ignored=N // 10, B=3, M=3, seed=N + C)
    up = torch.rand(() if kind == "single" else (3,), generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    loss_cpu, info_cpu, grad_cpu = forward_backward(x, y, up, reduction="none")
    loss_gpu, info_gpu, grad_gpu = forward_backward(x.cuda(), y.cuda(), up, reduction="none")
    assert grad_gpu.dtype == dtype and grad_gpu.device.type == "cuda"
    assert torch.equal(info_gpu.singular.cpu(), info_cpu.singular)
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(info_gpu.logabsdet.cpu(), info_cpu.logabsdet, rtol=tol, atol=tol)
    scale = grad_cpu.abs().max().item()
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_inputs_match_cpu(kind, dtype):
    x, y = make_case(kind, 3_000, 12, dtype=dtype, n_ignored=50)
    loss_cpu, _, grad_cpu = forward_backward(x, y, reduction="none")
    loss_gpu, _, grad_gpu = forward_backward(x.cuda(), y.cuda(), reduction="none")
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=2e-5, atol=2e-5)
    # Both round the same float32 gradient to 16 bits; allow one unit in the last place.
    torch.testing.assert_close(grad_gpu.cpu().float(), grad_cpu.float(),
                               rtol=1e-2, atol=1e-2 * grad_cpu.float().abs().max().item())


# Issue 25: shapes whose dynamic shared memory fell in (48 KB - static, 48 KB] (the driver counts
# static + dynamic against 48 KB without the opt-in), and C = 14 (Clothing1M) over N.
LAUNCH_SHAPES = [("single", 330, 10, torch.float64), ("single", 1_000, 15, torch.float32),
                 ("single", 5_000, 14, torch.float32), ("single", 100, 20, torch.float32),
                 ("single", 200, 14, torch.float32), ("single", 50_000, 14, torch.float32),
                 ("sources", 300, 74, torch.float32), ("sources", 300, 78, torch.float32)]


@pytest.mark.parametrize("kind,N,C,dtype", LAUNCH_SHAPES)
def test_launch_shapes_of_issue_25(kind, N, C, dtype):
    x, y = make_case(kind, N, C, dtype=dtype, n_ignored=3, seed=C)
    loss_cpu, info_cpu, grad_cpu = forward_backward(x, y, reduction="none")
    loss_gpu, info_gpu, grad_gpu = forward_backward(x.cuda(), y.cuda(), reduction="none")
    assert torch.equal(info_gpu.singular.cpu(), info_cpu.singular)
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=tol, atol=tol * grad_cpu.abs().max().item())


@pytest.mark.parametrize("C", [6, 10, 33, 64, 100, FUSED, FUSED + 22])
def test_equal_logit_columns_are_singular_as_on_the_cpu(C):
    """x[:, 5] = x[:, 2]: U has two equal columns, singular by the CPU op's rule on every path."""
    g = torch.Generator().manual_seed(C)
    x = torch.randn(8 * C + 16, C, generator=g)
    x[:, 5] = x[:, 2]
    y = torch.arange(8 * C + 16) % C
    loss_gpu, info_gpu, grad_gpu = forward_backward(x.cuda(), y.cuda())
    assert bool(info_gpu.singular) and loss_gpu.item() == float("inf")
    assert torch.equal(grad_gpu, torch.zeros_like(grad_gpu))


def test_joint_and_lu_loss_ops_match_cpu():
    for kind, N, C in [("sources", 5_000, 10), ("batched", 300, 130)]:
        x, y = make_case(kind, N, C, dtype=torch.float32, n_ignored=7)
        sums_cpu, counts_cpu = ops.joint.default(x, y, True, -100, True)
        sums_gpu, counts_gpu = ops.joint.default(x.cuda(), y.cuda(), True, -100, True)
        assert torch.equal(counts_gpu.cpu(), counts_cpu)
        torch.testing.assert_close(sums_gpu.cpu(), sums_cpu, rtol=1e-6, atol=1e-6)
        for normalize, eps in [(True, 0.0), (False, 1e-3)]:
            out_cpu = ops.lu_loss.default(sums_cpu, counts_cpu, normalize, eps)
            out_gpu = ops.lu_loss.default(sums_cpu.cuda(), counts_cpu.cuda(), normalize, eps)
            for a, b in zip(out_gpu, out_cpu):
                torch.testing.assert_close(a.cpu(), b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_large_n_matches_float64_reference():
    """N = 4e6 float32 rows over hundreds of blocks: still within 1e-6 of the float64 reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4_000_000, 10, generator=g) * 2
    y = torch.randint(0, 10, (4_000_000,), generator=g)
    expected = ref.dmi_loss(x, y).item()
    got = dmi_ext.dmi_loss(x.cuda(), y.cuda()).item()
    assert abs(got - expected) <= 1e-6 * abs(expected)


@pytest.mark.parametrize("kind,N,C", [("single", 4096, 10), ("batched", 128, 100),
                                      ("sources", 4096, 50), ("single", 1000, FUSED + 72)])
@pytest.mark.parametrize("from_logits", [True, False])
def test_no_host_sync_without_validation(kind, N, C, from_logits):
    x, y = make_case(kind, N, C, dtype=torch.float32, from_logits=from_logits, n_ignored=10,
                     device="cuda")
    x.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = dmi_ext.dmi_loss(x, y, from_logits=from_logits, validate=False)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad).all()


def test_validation_syncs_and_raises_only_with_validate():
    x = torch.randn(64, 4, device="cuda")
    y = torch.arange(64, device="cuda") % 4
    y[37] = 9
    with pytest.raises(IndexError, match=r"'target'.*label 9 at \[37\]"):
        dmi_ext.dmi_loss(x, y)
    assert torch.isnan(dmi_ext.dmi_loss(x, y, validate=False))
    p = torch.softmax(torch.randn(64, 4, device="cuda"), -1)
    p[11, 0] += 0.5
    with pytest.raises(ValueError, match=r"'input' is not a probability vector at row 11"):
        dmi_ext.dmi_loss(p, y.remainder(4), from_logits=False)


@pytest.mark.parametrize("kind,N,C,reduction", [("single", 5_000, 10, "mean"),
                                                ("batched", 128, 100, "sum"),
                                                ("sources", 2_000, 20, "none")])
def test_cuda_graph_replay_equals_eager(kind, N, C, reduction):
    x, y = make_case(kind, N, C, dtype=torch.float32, n_ignored=5, device="cuda")
    up = torch.ones((), device="cuda") if reduction != "none" else torch.ones(3, device="cuda")

    def step(inp):
        loss = dmi_ext.dmi_loss(inp, y, reduction=reduction, validate=False)
        (grad,) = torch.autograd.grad(loss, inp, up)
        return loss.detach(), grad

    static_x = x.clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        step(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_grad = step(static_x)

    for seed in range(3):  # new inputs copied into the captured buffer, then replayed
        fresh, _ = make_case(kind, N, C, dtype=torch.float32, n_ignored=5, seed=seed + 10,
                             device="cuda")
        with torch.no_grad():
            static_x.copy_(fresh)
        graph.replay()
        eager_loss, eager_grad = step(fresh.clone().requires_grad_(True))
        assert torch.equal(static_loss, eager_loss)
        assert torch.equal(static_grad, eager_grad)


def test_validate_true_under_capture_raises_clearly():
    x, y = make_case("single", 100, 4, dtype=torch.float32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="'validate'.*captured"):
        with torch.cuda.graph(graph):
            dmi_ext.dmi_loss(x, y)


@pytest.mark.parametrize("kind,N,C", [("single", 1_000_003, 10), ("batched", 20_000, 50),
                                      ("sources", 300_000, 100), ("single", 40_000, FUSED + 22)])
def test_bitwise_deterministic(kind, N, C):
    x, y = make_case(kind, N, C, dtype=torch.float32, n_ignored=1000, device="cuda")
    runs = [forward_backward(x, y, reduction="none") for _ in range(5)]
    for loss, info, grad in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(grad, runs[0][2])
        assert torch.equal(info.logabsdet, runs[0][1].logabsdet)


def test_expanded_upstream_gradient():
    """loss.sum().backward() hands the backward an expanded (stride 0) gradient."""
    x, y = make_case("batched", 200, 6, dtype=torch.float32, device="cuda")
    x.requires_grad_(True)
    dmi_ext.dmi_loss(x, y, reduction="none").sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    dmi_ext.dmi_loss(x2, y, reduction="sum").backward()
    assert torch.equal(x.grad, x2.grad)


def test_runs_on_the_tensors_device_and_stream():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x, y = make_case("single", 500, 5, dtype=torch.float32, device="cuda:1")
    loss = dmi_ext.dmi_loss(x, y)
    assert loss.device == x.device
    torch.testing.assert_close(loss.cpu(), dmi_ext.dmi_loss(x.cpu(), y.cpu()), rtol=1e-5, atol=1e-5)
