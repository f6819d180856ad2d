"""DMIAccumulator (the loss of a large batch from micro-batches, in two passes) against
dmi_ext.dmi_loss on the concatenated batch, in float64: loss, info and parameter gradients of a
model with dropout, for the three shapes, with ignore_index, every reduction, under 2 gloo ranks
x 2 micro-batches with DDP; the memory bound; should_step; the documented examples."""

import copy
import doctest
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import dmi_ext
import dmi_ext.accumulate

from conftest import KINDS, make_case
from spawn_ranks import assert_scenario_ok, run_scenarios, spawn_rank_reports

dist = torch.distributed
RTOL = 1e-10
ROOT = Path(__file__).resolve().parents[1]


def assert_close(actual, expected, rtol=RTOL):
    """Relative closeness in float64; atol scaled by the largest entry (gradients have zeros)."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


class DropoutNet(nn.Module):
    """(..., D) features -> (..., C) logits, with dropout between the layers (float64)."""

    def __init__(self, D, C, p=0.3):
        super().__init__()
        self.hidden = nn.Linear(D, 16, dtype=torch.float64)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(16, C, dtype=torch.float64)

    def forward(self, x):
        return self.out(self.drop(torch.tanh(self.hidden(x))))


def features_case(kind, N, C, D=5, n_ignored=0, seed=0, ignore_index=-100):
    """Features (N, D) or (B, N, D) and targets of a shape kind (every class present)."""
    _, y = make_case(kind, N, C, n_ignored=n_ignored, seed=seed, ignore_index=ignore_index)
    g = torch.Generator().manual_seed(seed + 1)
    lead = (y.shape[0],) if kind == "batched" else ()
    return torch.randn(*lead, y.shape[-1], D, generator=g, dtype=torch.float64), y


def split_rows(x, y, sizes):
    """Micro-batches along the row dimension: dim -2 of the features, dim -1 of the targets."""
    return list(x.split(sizes, dim=-2)), list(y.split(sizes, dim=-1))


def reference_grads(model, xs, ys, seed, grad=None, **kw):
    """dmi_loss on the concatenated logits of the micro-batches, run in order from ``seed``."""
    torch.manual_seed(seed)
    logits = torch.cat([model(x) for x in xs], dim=-2)
    loss, info = dmi_ext.dmi_loss(logits, torch.cat(ys, dim=-1), return_info=True, **kw)
    loss.backward(grad)
    return loss.detach(), info, {n: p.grad.clone() for n, p in model.named_parameters()}


def accumulator_grads(model, xs, ys, seed, grad=None, **kw):
    torch.manual_seed(seed)
    loss, info = dmi_ext.DMIAccumulator(**kw).backward(model, xs, ys, grad_loss=grad)
    return loss, info, {n: p.grad.clone() for n, p in model.named_parameters()}


CASES = [  # (kind, keywords, n_ignored)
    *[(kind, {"reduction": red}, 0) for kind in KINDS for red in ("mean", "sum", "none")],
    *[(kind, {}, 7) for kind in KINDS],  # ignore_index rows
    ("single", {"normalize": False, "eps": 1e-3}, 0),
    ("sources", {"ignore_index": -1, "reduction": "sum"}, 5),
]


@pytest.mark.parametrize("kind,kw,n_ignored", CASES)
def test_two_pass_gradient_is_the_concatenated_batch_gradient(kind, kw, n_ignored):
    C = 4
    x, y = features_case(kind, 40, C, n_ignored=n_ignored, seed=3,
                         ignore_index=kw.get("ignore_index", -100))
    xs, ys = split_rows(x, y, [9, 16, 1, x.shape[-2] - 26])  # uneven, one of a single row
    torch.manual_seed(0)
    model = DropoutNet(x.shape[-1], C)
    twin = copy.deepcopy(model)
    grad = None
    if kw.get("reduction") == "none":
        grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        grad = grad[0] if kind == "single" else grad[:ys[0].shape[0]]
    ref_loss, ref_info, ref = reference_grads(model, xs, ys, seed=11, grad=grad, **kw)
    loss, info, got = accumulator_grads(twin, xs, ys, seed=11, grad=grad, **kw)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss)
    assert_close(info.logabsdet, ref_info.logabsdet)
    assert torch.equal(info.singular, ref_info.singular) and not info.singular.any()
    for name in ref:
        assert ref[name].abs().max() > 0, name
        assert_close(got[name], ref[name])


def test_dropout_needs_the_replayed_rng():
    """Without replaying the generator states the masks of pass 2 differ, and so does the
    gradient: the replay is what makes it the gradient of the loss."""
    x, y = features_case("single", 64, 4, seed=5)
    xs, ys = split_rows(x, y, 16)
    torch.manual_seed(0)
    model = DropoutNet(5, 4, p=0.5)
    _, _, ref = reference_grads(copy.deepcopy(model), xs, ys, seed=2)
    _, _, replayed = accumulator_grads(copy.deepcopy(model), xs, ys, seed=2)
    _, _, unreplayed = accumulator_grads(copy.deepcopy(model), xs, ys, seed=2,
                                         preserve_rng_state=False)
    assert_close(replayed["hidden.weight"], ref["hidden.weight"])
    assert not torch.allclose(unreplayed["hidden.weight"], ref["hidden.weight"], rtol=1e-3)


def test_caller_generator_advances_as_for_one_forward():
    x, y = features_case("single", 32, 4, seed=6)
    xs, ys = split_rows(x, y, 8)
    torch.manual_seed(0)
    model = DropoutNet(5, 4)
    torch.manual_seed(9)
    with torch.no_grad():
        for x_k in xs:
            model(x_k)
    after_forward = torch.get_rng_state()
    torch.manual_seed(9)
    dmi_ext.DMIAccumulator().backward(model, xs, ys)
    assert torch.equal(torch.get_rng_state(), after_forward)


def test_inputs_and_targets_are_not_modified():
    x, y = features_case("sources", 30, 4, n_ignored=3, seed=7)
    xs, ys = split_rows(x, y, 10)
    before = [t.clone() for t in xs + ys]
    model = DropoutNet(5, 4)
    dmi_ext.DMIAccumulator().backward(model, xs, ys)
    assert all(torch.equal(a, b) for a, b in zip(xs + ys, before))


def test_class_missing_from_a_micro_batch_but_not_the_batch():
    """Each micro-batch alone is singular (it holds 2 of 4 classes); the batch is not."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.cat([torch.arange(20) % 2, 2 + torch.arange(20) % 2])
    xs, ys = split_rows(x, y, 20)
    model = DropoutNet(5, 4)
    for x_k, y_k in zip(xs, ys):
        assert dmi_ext.dmi_loss(model(x_k), y_k, return_info=True)[1].singular
    ref_loss, _, ref = reference_grads(copy.deepcopy(model), xs, ys, seed=1)
    loss, info, got = accumulator_grads(copy.deepcopy(model), xs, ys, seed=1)
    assert torch.isfinite(loss) and not info.singular
    assert_close(loss, ref_loss)
    for name in ref:
        assert_close(got[name], ref[name])


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_singular_batch_skips_the_second_pass_and_should_step_says_so(eps):
    """A class absent from every micro-batch: loss +inf (or -log eps), singular, no gradient
    written (pass 2 is skipped: the gradient is exactly 0), and should_step is False."""
    x, y = features_case("single", 32, 4, seed=9)
    y = y.clamp(max=2)  # class 3 never appears
    xs, ys = split_rows(x, y, 16)
    model = DropoutNet(5, 4)
    calls = []
    loss, info = dmi_ext.DMIAccumulator(eps=eps).backward(
        lambda item: calls.append(1) or model(item), xs, ys)
    assert bool(info.singular)
    assert len(calls) == 2  # pass 1 only
    assert all(p.grad is None for p in model.parameters())
    expected = float("inf") if eps == 0 else -torch.log(torch.tensor(eps)).item()
    assert loss.item() == pytest.approx(expected)
    assert not dmi_ext.should_step(loss, info)


def test_should_step():
    finite = torch.tensor(1.5)
    assert dmi_ext.should_step(finite)
    assert not dmi_ext.should_step(torch.tensor(float("inf")))
    assert not dmi_ext.should_step(torch.tensor(float("nan")))
    regular = dmi_ext.DMIInfo(torch.tensor([0.1, 0.2]), torch.tensor([False, False]))
    one_singular = dmi_ext.DMIInfo(torch.tensor([0.1, -float("inf")]), torch.tensor([False, True]))
    assert dmi_ext.should_step(finite, regular)
    assert not dmi_ext.should_step(finite, one_singular)  # eps > 0: finite loss, zero gradient
    logits = torch.randn(8, 3)
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # class 2 absent
    loss, info = dmi_ext.dmi_loss(logits, labels, eps=1e-3, return_info=True)
    assert torch.isfinite(loss) and not dmi_ext.should_step(loss, info)


def test_low_level_steps_match_backward():
    """reset / accumulate / finish / input_grad: the building blocks give the same gradients."""
    x, y = features_case("batched", 30, 4, seed=10)
    xs, ys = split_rows(x, y, 10)
    model = nn.Linear(5, 4, dtype=torch.float64)
    twin = copy.deepcopy(model)
    acc = dmi_ext.DMIAccumulator()
    with torch.no_grad():
        for x_k, y_k in zip(xs, ys):
            acc.accumulate(model(x_k), y_k)
    loss, _ = acc.finish()
    for x_k, y_k in zip(xs, ys):
        logits = model(x_k)
        logits.backward(acc.input_grad(logits, y_k))
    ref_loss, _, ref = reference_grads(twin, xs, ys, seed=0)
    assert_close(loss, ref_loss)
    for name, p in model.named_parameters():
        assert_close(p.grad, ref[name])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_loss_scales_and_dtypes(dtype):
    """grad_loss multiplies the gradient (float64: to 1e-10); float32 logits give a float32
    loss and gradients close to the one-graph float32 run (U summed in another order, and U is
    ill-conditioned at initialisation, so rounding is amplified: 1e-3)."""
    x, y = features_case("single", 64, 5, seed=12)
    xs, ys = split_rows(x.to(dtype), y, 16)
    torch.manual_seed(0)
    model = nn.Linear(5, 5, dtype=dtype)
    twin = copy.deepcopy(model)
    loss, _ = dmi_ext.DMIAccumulator().backward(model, xs, ys, grad_loss=3.0)
    assert loss.dtype == dtype
    logits = torch.cat([twin(x_k) for x_k in xs])
    (3.0 * dmi_ext.dmi_loss(logits, torch.cat(ys))).backward()
    rtol = RTOL if dtype == torch.float64 else 1e-3
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == dtype
        assert_close(p.grad, q.grad, rtol=rtol)


def test_errors_name_the_argument():
    model = nn.Linear(5, 4, dtype=torch.float64)
    x, y = features_case("single", 16, 4, seed=13)
    acc = dmi_ext.DMIAccumulator()
    with pytest.raises(ValueError, match="'inputs' and 'targets'.*2 and 1"):
        acc.backward(model, x.split(8), y.split(16))
    with pytest.raises(ValueError, match="'inputs' holds no micro-batch"):
        acc.backward(model, [], [])
    with pytest.raises(ValueError, match="'grad_loss'"):
        dmi_ext.DMIAccumulator(reduction="none").backward(model, [x], [y])
    with pytest.raises(ValueError, match="'reduction'"):
        dmi_ext.DMIAccumulator(reduction="avg")
    with pytest.raises(ValueError, match="'grad_reduce'"):
        dmi_ext.DMIAccumulator(grad_reduce="max")
    with pytest.raises(ValueError, match="'eps'"):
        dmi_ext.DMIAccumulator(eps=-1.0)
    bad = y.clone()
    bad[3] = 7
    with pytest.raises(IndexError, match="'target' holds the label 7"):
        acc.backward(model, [x], [bad])
    with pytest.raises(ValueError, match="micro-batch 1 .* same number of matrices and classes"):
        acc.loss(lambda item: item, [torch.randn(4, 4), torch.randn(4, 3)],
                 [torch.arange(4) % 4, torch.arange(4) % 3])
    fresh = dmi_ext.DMIAccumulator()
    with pytest.raises(RuntimeError, match="before finish"):
        fresh.input_grad(torch.randn(4, 4), torch.arange(4))


# ---- memory: one micro-batch's graph at a time ------------------------------------------------


def _load_memory_script():
    """scripts/accumulate_memory.py, whose SavedBytes meter this test shares (one definition)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "accumulate_memory.py"
    spec = importlib.util.spec_from_file_location("accumulate_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SavedBytes = _load_memory_script().SavedBytes


def wide_net(C=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Dropout(0.1), nn.Linear(512, 512),
                         nn.ReLU(), nn.Linear(512, C))


def test_memory_is_one_micro_batch_graph():
    """The graph memory of the two-pass run is that of one micro-batch's graph, whatever the
    number of micro-batches (8 here): the one-graph run holds 8 times the activations."""
    x = torch.randn(4096, 8)
    y = torch.arange(4096) % 10
    model = wide_net()
    with SavedBytes() as one_graph:
        dmi_ext.dmi_loss(model(x), y).backward()
    with SavedBytes() as micro:
        dmi_ext.dmi_loss(model(x[:512]), y[:512]).backward()
    with SavedBytes() as two_pass:
        dmi_ext.DMIAccumulator().backward(model, x.split(512), y.split(512))
    # not more than one micro-batch's graph (less by the logits the loss itself saves)
    assert 0.99 * micro.peak <= two_pass.peak <= micro.peak
    # the one-graph run holds 8 micro-batches' activations (and the saved weights once)
    assert one_graph.peak > 6 * two_pass.peak


# ---- the documented examples run --------------------------------------------------------------


def test_docstring_examples():
    result = doctest.testmod(dmi_ext.accumulate, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def _readme_block(marker):
    """The python code block that follows ``marker`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(marker)
    match = re.compile(r"```python\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def test_readme_many_classes_example_runs():
    code = _readme_block("<!-- many-classes example -->")
    namespace = {}
    exec(compile(code, "README.md (many classes)", "exec"), namespace)
    assert namespace["steps"] > 0


# ---- 2 gloo ranks x 2 micro-batches, under DDP -----------------------------------------------


def scenario_ddp_two_micro_batches(rank, world):
    """Every rank runs 2 uneven micro-batches of its uneven shard through DDP(dropout model);
    after DDP's averaging the parameter gradients equal one process's on the concatenation of
    all ranks' micro-batches (each rank's dropout masks replayed in the reference)."""
    cases = [("single", {}, 0), ("batched", {}, 0), ("sources", {}, 0), ("single", {}, 6),
             ("sources", {"reduction": "sum"}, 5), ("batched", {"reduction": "sum"}, 4)]
    for i, (kind, kw, n_ignored) in enumerate(cases):
        x, y = features_case(kind, 48, 4, n_ignored=n_ignored, seed=300 + i)
        rows = x.shape[-2]
        edges = [0, rows // 3, rows]  # rank 0: a third, rank 1: the rest (world 2)
        assert world == 2
        micro = []  # per rank: its two micro-batches (uneven)
        for r in range(world):
            lo, hi = edges[r], edges[r + 1]
            cut = lo + (hi - lo) // 4 + 1
            micro.append(([x[..., lo:cut, :], x[..., cut:hi, :]], [y[..., lo:cut], y[..., cut:hi]]))
        torch.manual_seed(i)
        model = DropoutNet(x.shape[-1], 4)
        single = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(1000 + rank)
        loss, info = dmi_ext.DMIAccumulator(**kw).backward(ddp, *micro[rank])
        # The reference: every rank's micro-batches with that rank's generator, one graph.
        logits, targets = [], []
        for r in range(world):
            torch.manual_seed(1000 + r)
            logits += [single(x_k) for x_k in micro[r][0]]
            targets += micro[r][1]
        full = dmi_ext.dmi_loss(torch.cat(logits, dim=-2), torch.cat(targets, dim=-1), **kw)
        full.backward()
        assert_close(loss, full.detach())
        assert not info.singular.any()
        for (name, p_single), p_ddp in zip(single.named_parameters(), model.parameters()):
            assert p_single.grad.abs().max() > 0, name
            assert_close(p_ddp.grad, p_single.grad)


def scenario_grad_reduce_sum_and_failed_check(rank, world):
    """grad_reduce='sum': the ranks' gradients sum to the global one; a bad label on rank 1
    raises there and a ValueError on rank 0, after the same all-reduce (no hang)."""
    x, y = features_case("single", 40, 4, seed=400)
    xs, ys = split_rows(x, y, 10)
    mine = slice(2 * rank, 2 * rank + 2)
    torch.manual_seed(0)
    model = nn.Linear(5, 4, dtype=torch.float64)
    single = copy.deepcopy(model)
    dmi_ext.DMIAccumulator(grad_reduce="sum").backward(model, xs[mine], ys[mine])
    dmi_ext.dmi_loss(torch.cat([single(x_k) for x_k in xs]), y).backward()
    for p, q in zip(model.parameters(), single.parameters()):
        total = p.grad.clone()
        dist.all_reduce(total)
        assert_close(total, q.grad)
    bad = [t.clone() for t in ys[mine]]
    if rank == 1:
        bad[1][0] = 9
    expected = ((IndexError, "label 9") if rank == 1
                else (ValueError, r"failed on rank\(s\) \[1\]"))
    with pytest.raises(expected[0], match=expected[1]):
        dmi_ext.DMIAccumulator().backward(model, xs[mine], bad)


def scenario_sampler_shares_from_the_process_group(rank, world):
    """ClassCoveringBatchSampler takes rank and world size from the group; the ranks' shares of
    each batch are disjoint and make up the one-process batch, so the distributed loss over
    them never sees a singular U (100 classes, batches of 256)."""
    import dmi_ext.distributed

    labels = torch.arange(2560) % 100
    sampler = dmi_ext.ClassCoveringBatchSampler(labels, 256, seed=3)
    assert (sampler.rank, sampler.num_replicas) == (rank, world)
    whole = dmi_ext.ClassCoveringBatchSampler(labels, 256, seed=3, num_replicas=1, rank=0)
    logits = torch.randn(2560, 100, generator=torch.Generator().manual_seed(0))
    for share, batch in zip(sampler, whole):
        shares = [None] * world
        dist.all_gather_object(shares, share)
        assert sorted(sum(shares, [])) == sorted(batch)
        _, info = dmi_ext.distributed.dmi_loss(logits[share], labels[share], return_info=True)
        assert not info.singular


SCENARIOS = {f.__name__: f for f in [scenario_ddp_two_micro_batches,
                                     scenario_grad_reduce_sum_and_failed_check,
                                     scenario_sampler_shares_from_the_process_group]}


def _run_rank(rank, world, store_path, report_dir):
    run_scenarios(rank, world, store_path, report_dir, SCENARIOS)


@pytest.fixture(scope="module")
def rank_reports(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    return spawn_rank_reports(_run_rank, 2, tmp_path_factory.mktemp("acc_gloo2"), 300)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks(rank_reports, scenario):
    assert_scenario_ok(rank_reports, scenario)
