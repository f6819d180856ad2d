"""The loss over the global batch (dmi_ext.distributed) against one process on the concatenated
batch: loss, input and DDP parameter gradients, a class missing on one rank, failed checks, and
the single-process path when no process group exists.

Spawning processes is the slow part (each imports torch), so each world size is spawned once: the
ranks run every scenario below in order, record 'ok' or the traceback per scenario, and one test
per (world size, scenario) reads the record. Every rank builds the same global batch from a seed
and takes its own rows, so the single-process answer is computed locally on each rank.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dmi_ext
import dmi_ext.distributed as dmi_dist

from conftest import KINDS, make_case
from spawn_ranks import assert_scenario_ok, run_scenarios, spawn_rank_reports

dist = torch.distributed
pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

RTOL = 1e-10
SPAWN_TIMEOUT_S = 300


def assert_close(actual, expected, rtol=RTOL):
    """Relative closeness in float64; atol scaled by the largest entry (gradients have zeros)."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def row_bounds(rows, world, uneven):
    """Start and end row of every rank's shard; uneven shards give rank r about (r+1) parts."""
    weights = [r + 1 for r in range(world)] if uneven else [1] * world
    edges = [0]
    for w in weights:
        edges.append(edges[-1] + rows * w // sum(weights))
    edges[-1] = rows
    return edges


def shard(x, y, rank, world, uneven=False):
    """This rank's rows of a global batch: rows are dim -2 of input and dim -1 of target."""
    edges = row_bounds(x.shape[-2], world, uneven)
    lo, hi = edges[rank], edges[rank + 1]
    return x[..., lo:hi, :], y[..., lo:hi]


def loss_and_input_grad(loss_fn, x, y, upstream, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss, info = loss_fn(x, y, return_info=True, **kw)
    (grad,) = torch.autograd.grad(loss, x, upstream)
    return loss.detach(), info, grad


def gather_from_ranks(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


# ---- scenarios, run on every rank of a spawned group ----------------------------------------


LOSS_CASES = [  # (kind, keywords): shapes x reductions x the loss's own options
    *[(kind, {"reduction": red}) for kind in KINDS for red in ("mean", "sum", "none")],
    ("single", {"normalize": False, "eps": 1e-3}),
    ("sources", {"from_logits": False}),
    ("batched", {"ignore_index": 7, "reduction": "none"}),
]


def scenario_loss_equals_single_process(rank, world):
    """Loss and DMIInfo on every rank equal the single-process ones on the concatenated batch
    (uneven shards, ignored rows), and are bitwise the same on every rank."""
    results = []
    for i, (kind, kw) in enumerate(LOSS_CASES):
        x, y = make_case(kind, 60, 5, n_ignored=13, seed=i, from_logits=kw.get("from_logits", True),
                         ignore_index=kw.get("ignore_index", -100))
        expected, expected_info = dmi_ext.dmi_loss(x, y, return_info=True, **kw)
        xr, yr = shard(x, y, rank, world, uneven=True)
        loss, info = dmi_dist.dmi_loss(xr, yr, return_info=True, **kw)
        results.append((kind, kw, loss, info, expected, expected_info, gather_from_ranks(loss)))
    for kind, kw, loss, info, expected, expected_info, on_ranks in results:
        assert loss.shape == expected.shape and loss.dtype == expected.dtype, (kind, kw)
        assert_close(loss, expected)
        assert_close(info.logabsdet, expected_info.logabsdet)
        assert torch.equal(info.singular, expected_info.singular)
        assert all(torch.equal(other, loss) for other in on_ranks), (kind, kw, on_ranks)


def scenario_input_gradient_is_this_ranks_rows(rank, world):
    """The gradient w.r.t. this rank's rows is the matching slice of the single-process gradient,
    times the world size with grad_reduce='mean' and times 1 with 'sum'; float32 input too."""
    cases = [(kind, red, torch.float64) for kind in KINDS for red in ("mean", "none")]
    cases += [("batched", "sum", torch.float32)]
    for i, (kind, reduction, dtype) in enumerate(cases):
        x, y = make_case(kind, 48, 4, n_ignored=9, seed=100 + i, dtype=dtype)
        shape = dmi_ext.dmi_loss(x, y, reduction=reduction).shape
        upstream = torch.rand(shape, generator=torch.Generator().manual_seed(i),
                              dtype=torch.float64)
        _, _, full_grad = loss_and_input_grad(dmi_ext.dmi_loss, x, y, upstream.to(dtype),
                                              reduction=reduction)
        xr, yr = shard(x, y, rank, world, uneven=True)
        expected, _ = shard(full_grad, y, rank, world, uneven=True)
        for grad_reduce, multiplier in (("mean", world), ("sum", 1)):
            _, _, grad = loss_and_input_grad(dmi_dist.dmi_loss, xr, yr, upstream.to(dtype),
                                             reduction=reduction, grad_reduce=grad_reduce)
            assert grad.dtype == dtype and grad.shape == xr.shape
            rtol = RTOL if dtype == torch.float64 else 1e-5
            assert_close(grad, expected * multiplier, rtol=rtol)


class Features(nn.Module):
    """A linear classifier: (..., D) features -> (..., C) logits."""

    def __init__(self, D, C):
        super().__init__()
        self.hidden = nn.Linear(D, 8, dtype=torch.float64)
        self.out = nn.Linear(8, C, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.tanh(self.hidden(x)))


def _ddp_case(kind, seed, C=4, D=6, N=64):
    """Global features and labels of a shape kind, without ignored rows (so CE composes)."""
    _, y = make_case(kind, N, C, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lead = (y.shape[0],) if kind == "batched" else ()
    return torch.randn(*lead, N, D, generator=g, dtype=torch.float64), y


def scenario_ddp_parameter_gradients(rank, world):
    """After DDP's backward (gradients averaged), parameter gradients equal one process's on the
    concatenated batch: DMI alone for each shape, with ignore_index, and DMI + cross-entropy."""
    cases = [(kind, "dmi") for kind in KINDS] + [("single", "dmi+ce"), ("sources", "ignored")]
    outcomes = []
    for i, (kind, objective) in enumerate(cases):
        x, y = _ddp_case(kind, seed=200 + i)
        if objective == "ignored":
            y = y.clone()
            y[..., ::5] = -100
        torch.manual_seed(i)
        model = Features(x.shape[-1], 4)
        single = copy.deepcopy(model)
        ddp = nn.parallel.DistributedDataParallel(model)

        def objective_of(logits, labels, loss_fn):
            loss = loss_fn(logits, labels)
            if objective == "dmi+ce":
                loss = loss + F.cross_entropy(logits, labels)
            return loss

        full = objective_of(single(x), y, dmi_ext.dmi_loss)
        full.backward()
        # Even shards: the per-rank cross-entropy mean averages to the global mean only then.
        xr, yr = shard(x, y, rank, world)
        local = objective_of(ddp(xr), yr, dmi_dist.dmi_loss)
        local.backward()
        outcomes.append((kind, objective, full, local, single, model))
    for kind, objective, full, local, single, model in outcomes:
        if objective == "dmi":
            assert_close(local, full)
        for (name, p_single), p_ddp in zip(single.named_parameters(), model.parameters()):
            assert p_single.grad.abs().max() > 0, name
            assert_close(p_ddp.grad, p_single.grad)


def scenario_class_absent_on_one_rank(rank, world):
    """Rank 0's rows lack class 0, which other ranks hold: rank 0 alone would get log|det| = -inf,
    but with the global U every rank gets the finite global loss and its rows' gradient."""
    C, N = 5, 80
    g = torch.Generator().manual_seed(300)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    edges = row_bounds(N, world, uneven=False)
    y = torch.randint(0, C, (N,), generator=g)
    y[: edges[1]] = torch.randint(1, C, (edges[1],), generator=g)  # rank 0: no class 0
    y[edges[1]] = 0  # the first row of rank 1 has it
    expected_loss, _, full_grad = loss_and_input_grad(dmi_ext.dmi_loss, x, y, torch.tensor(1.0))
    xr, yr = shard(x, y, rank, world)
    local_alone = dmi_ext.dmi_loss(xr, yr)
    loss, info, grad = loss_and_input_grad(dmi_dist.dmi_loss, xr, yr, torch.tensor(1.0),
                                           grad_reduce="sum")
    if rank == 0:
        assert torch.isinf(local_alone), local_alone  # the premise: locally singular
    assert torch.isfinite(expected_loss)
    assert torch.isfinite(loss) and not info.singular
    assert_close(loss, expected_loss)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    assert_close(grad, shard(full_grad, y, rank, world)[0])


def scenario_singular_global_batch(rank, world):
    """A class absent from every rank: +inf loss, singular flag and zero gradient everywhere
    (SPEC §5); with eps > 0 the loss is -log(eps)."""
    x, y = make_case("single", 40, 4, seed=400)
    y = torch.where(y == 3, 2, y)
    xr, yr = shard(x, y, rank, world)
    loss, info, grad = loss_and_input_grad(dmi_dist.dmi_loss, xr, yr, torch.tensor(1.0))
    loss_eps = dmi_dist.dmi_loss(xr, yr, eps=1e-3)
    assert torch.isinf(loss) and loss > 0 and info.singular
    assert torch.equal(grad, torch.zeros_like(grad))
    assert_close(loss_eps, torch.tensor(-math.log(1e-3), dtype=torch.float64))


def scenario_failed_checks_raise_on_every_rank(rank, world):
    """A bad label on the last rank raises there (the op's own message) and on every other rank
    (no hang), and so do zero rows on the last rank and, with validate=False, a float target on
    the last rank. The group is still usable afterwards."""
    x, y = make_case("single", 40, 4, seed=500)
    xr, yr = shard(x, y, rank, world)
    last = rank == world - 1
    bad = yr.clone()
    if last:
        bad[0] = 4
    try:
        dmi_dist.dmi_loss(xr, bad)
        raised = None
    except (ValueError, IndexError) as error:
        raised = error
    try:
        dmi_dist.dmi_loss(xr, yr.double() if last else yr, validate=False)
        float_target = None
    except (TypeError, ValueError) as error:
        float_target = error
    try:
        dmi_dist.dmi_loss(xr[:0] if last else xr, yr[:0] if last else yr)
        no_rows = None
    except ValueError as error:
        no_rows = error
    after = dmi_dist.dmi_loss(xr, yr)
    other = f"failed on rank(s) [{world - 1}]"
    if last:
        assert isinstance(raised, IndexError) and "label 4" in str(raised), raised
        assert isinstance(float_target, TypeError) and "'target'" in str(float_target)
        assert "N = 0 rows" in str(no_rows), no_rows
    else:
        assert isinstance(raised, ValueError) and other in str(raised), raised
        assert isinstance(float_target, ValueError) and other in str(float_target)
        assert other in str(no_rows), no_rows
    assert_close(after, dmi_ext.dmi_loss(x, y))


def _raises_on_every_rank_without_a_stall(group, call, mine, others):
    """``call()`` raises ``mine`` (exception type, message part) on the rank whose input is bad
    and ``others`` everywhere else, well before the group's timeout."""
    import time

    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        call()
    elapsed = time.monotonic() - start
    exc, text = mine if raised.type is mine[0] and mine[1] in str(raised.value) else others
    assert raised.type is exc and text in str(raised.value), repr(raised.value)
    assert elapsed < 15, f"took {elapsed:.1f} s: a stall until the timeout"
    dist.barrier(group)
    return elapsed


def scenario_rank_local_errors_raise_on_every_rank(rank, world):
    """Errors only one rank can see, raised before the all-reduce: an empty micro-batch list,
    logits of another shape, logits that are not a tensor, an input of the wrong rank, another
    number of classes, a bad keyword. Every rank raises, in a group whose timeout (30 s) would
    turn a stall into a different error; each took well under a second here."""
    from datetime import timedelta

    group = dist.new_group(timeout=timedelta(seconds=30))
    last = rank == world - 1
    other = (ValueError, f"failed on rank(s) [{world - 1}]")
    x, y = make_case("single", 24, 4, seed=700)
    xr, yr = shard(x, y, rank, world)
    model = nn.Linear(4, 4, dtype=torch.float64)
    acc = dmi_ext.DMIAccumulator(process_group=group)
    times = [
        _raises_on_every_rank_without_a_stall(
            group, lambda: acc.backward(model, [] if last else [xr], [] if last else [yr]),
            (ValueError, "'inputs' holds no micro-batch"), other),
        _raises_on_every_rank_without_a_stall(
            group, lambda: acc.backward(lambda t: model(t)[..., :3] if last else model(t),
                                        [xr], [yr % 3]),
            (ValueError, "disagree on the joint matrices"),
            (ValueError, "disagree on the joint matrices")),
        _raises_on_every_rank_without_a_stall(
            group, lambda: acc.backward(lambda t: (model(t),) if last else model(t), [xr], [yr]),
            (TypeError, "must return the logits tensor, got a tuple"), other),
        _raises_on_every_rank_without_a_stall(
            group, lambda: dmi_dist.dmi_loss(xr[:, 0] if last else xr, yr, process_group=group),
            (ValueError, "'input' must have shape (N, C) or (B, N, C)"), other),
        _raises_on_every_rank_without_a_stall(
            group, lambda: dmi_dist.dmi_loss(xr[:, :3] if last else xr, yr % 3,
                                             process_group=group),
            (ValueError, "disagree on the joint matrices"),
            (ValueError, "disagree on the joint matrices")),
        _raises_on_every_rank_without_a_stall(
            group, lambda: dmi_dist.dmi_loss(xr, yr, process_group=group,
                                             eps="0.1" if last else 0.1),
            (TypeError, "'eps' must be a float"), other),
    ]
    assert max(times) < 15
    # The group still works, and the accumulator too.
    loss, _ = acc.backward(model, [xr], [yr])
    assert torch.isfinite(loss)


def scenario_process_group_subset(rank, world):
    """A group of ranks 0 and 1: its members get the loss of their two shards; for a world of 2
    it is everyone. A non-member passing the group gets an error naming it."""
    pair = dist.new_group([0, 1])
    x, y = make_case("batched", 50, 3, seed=600)
    xr, yr = shard(x, y, rank, world)
    if rank in (0, 1):
        loss = dmi_dist.DMILoss(process_group=pair, reduction="none")(xr, yr)
        edges = row_bounds(x.shape[-2], world, uneven=False)
        expected = dmi_ext.dmi_loss(x[:, : edges[2]], y[:, : edges[2]], reduction="none")
        assert_close(loss, expected)
    else:
        with pytest.raises(ValueError, match="not a member of argument 'process_group'"):
            dmi_dist.dmi_loss(xr, yr, process_group=pair)
    dist.barrier()


SCENARIOS = {fn.__name__.removeprefix("scenario_"): fn for fn in [
    scenario_loss_equals_single_process,
    scenario_input_gradient_is_this_ranks_rows,
    scenario_ddp_parameter_gradients,
    scenario_class_absent_on_one_rank,
    scenario_singular_global_batch,
    scenario_failed_checks_raise_on_every_rank,
    scenario_rank_local_errors_raise_on_every_rank,
    scenario_process_group_subset,
]}


def _run_rank(rank, world, store_path, report_dir):
    run_scenarios(rank, world, store_path, report_dir, SCENARIOS)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def rank_reports(request, tmp_path_factory):
    """Spawn a gloo group of W processes once; returns W dicts {scenario: 'ok' | traceback}."""
    world = request.param
    tmp = tmp_path_factory.mktemp(f"gloo{world}")
    return spawn_rank_reports(_run_rank, world, tmp, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_on_every_rank(rank_reports, scenario):
    assert_scenario_ok(rank_reports, scenario)


# ---- without a process group -----------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_without_process_group_is_the_single_process_loss(kind):
    """No group initialised: loss, info and gradient are bitwise those of dmi_ext.dmi_loss."""
    assert not dist.is_initialized()
    x, y = make_case(kind, 30, 4, n_ignored=5, dtype=torch.float32)
    upstream = torch.rand(dmi_ext.dmi_loss(x, y, reduction="none").shape)
    expected = loss_and_input_grad(dmi_ext.dmi_loss, x, y, upstream, reduction="none")
    loss, info, grad = loss_and_input_grad(dmi_dist.dmi_loss, x, y, upstream, reduction="none")
    assert torch.equal(loss, expected[0]) and torch.equal(grad, expected[2])
    assert torch.equal(info.logabsdet, expected[1].logabsdet)
    assert torch.equal(info.singular, expected[1].singular)
    module = dmi_dist.DMILoss(reduction="sum", eps=1e-3)
    assert torch.equal(module(x, y), dmi_ext.DMILoss(reduction="sum", eps=1e-3)(x, y))


def test_bad_grad_reduce_names_the_argument():
    x, y = make_case("single", 20, 3)
    with pytest.raises(ValueError, match=r"'grad_reduce'.*'avg'"):
        dmi_dist.dmi_loss(x, y, grad_reduce="avg")
    with pytest.raises(ValueError, match=r"'grad_reduce'.*'avg'"):
        dmi_dist.DMILoss(grad_reduce="avg")


def test_module_repr_and_lazy_import():
    assert "grad_reduce='sum'" in repr(dmi_dist.DMILoss(grad_reduce="sum"))
    assert dmi_ext.distributed is dmi_dist
