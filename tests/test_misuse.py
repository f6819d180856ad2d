"""The API under careless use (issue 21): no silent garbage, errors before any work, nothing
half-done. Every error names the argument and the bad value; where it is raised before the first
forward, a spy model shows that no forward ran and that parameters, .grad, BatchNorm statistics
and the generator are as they were."""

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import dmi_ext
import dmi_ext.distributed as dmi_dist

from conftest import make_case


def _case(N=32, C=4, seed=0):
    return make_case("single", N, C, dtype=torch.float32, seed=seed)


# ---- mixed and meta devices ----------------------------------------------------------------------


MIXED = r"arguments 'input' and 'target' must be on the same device, got input on cpu and " \
        r"target on meta"


@pytest.mark.parametrize("call", [
    lambda x, y: dmi_ext.dmi_loss(x, y),
    lambda x, y: dmi_ext.joint_matrix(x, y),
    lambda x, y: dmi_ext.DMILoss()(x, y),
    lambda x, y: dmi_ext.dmi_loss(x.requires_grad_(), y),
    lambda x, y: dmi_ext.DMIAccumulator().loss(lambda t: t, [x], [y]),
])
def test_meta_target_with_cpu_input_raises_the_mixed_device_error(call):
    x, y = _case()
    with pytest.raises(ValueError, match=MIXED):
        call(x, y.to("meta"))


def test_meta_target_never_writes_grad_or_returns_a_loss():
    model = nn.Linear(5, 4)
    acc = dmi_ext.DMIAccumulator()
    x = torch.randn(16, 5)
    y = (torch.arange(16) % 4).to("meta")
    with pytest.raises(ValueError, match=MIXED):
        acc.backward(model, [x], [y])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="after a failed call"):
        acc.finish()


@pytest.mark.parametrize("shape, pattern", [
    ((7,), r"'target' has shape \[7\] but 'input' has shape \[8, 4\]"),
    ((2, 2, 8), r"'target' has shape \[2, 2, 8\]"),
    ((0, 8), r"M = 0"),
])
def test_meta_inputs_run_the_shape_checks(shape, pattern):
    x = torch.empty(8, 4, device="meta")
    y = torch.empty(shape, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=pattern):
        dmi_ext.dmi_loss(x, y)
    with pytest.raises(ValueError, match=pattern):
        dmi_ext.joint_matrix(x, y)


def test_meta_inputs_check_dtypes_and_classes_and_keep_shapes():
    meta = dict(device="meta")
    with pytest.raises(TypeError, match=r"'target' must hold int64 or int32.*float32"):
        dmi_ext.dmi_loss(torch.empty(8, 4, **meta), torch.empty(8, **meta))
    with pytest.raises(ValueError, match=r"C = 1"):
        dmi_ext.dmi_loss(torch.empty(8, 1, **meta), torch.empty(8, dtype=torch.long, **meta))
    with pytest.raises(ValueError, match=r"'eps'.*-1"):
        torch.ops.dmi_ext.dmi(torch.empty(8, 4, **meta), torch.empty(8, dtype=torch.long, **meta),
                              True, True, -1.0, -100, 1, True, False)
    loss = dmi_ext.dmi_loss(torch.empty(3, 8, 4, **meta), torch.empty(3, 8, dtype=torch.long,
                                                                       **meta), reduction="none")
    assert loss.shape == (3,) and loss.device.type == "meta"


# ---- keyword types -------------------------------------------------------------------------------


BAD_KEYWORDS = [
    ("eps", "0.1", "a float"), ("eps", True, "a float"), ("eps", torch.tensor(0.1), "a float"),
    ("ignore_index", True, "an int"), ("ignore_index", 1.0, "an int"),
    ("validate", None, "a bool"), ("validate", 1, "a bool"), ("normalize", None, "a bool"),
    ("from_logits", None, "a bool"), ("from_logits", "yes", "a bool"),
]


@pytest.mark.parametrize("name, value, kind", BAD_KEYWORDS)
@pytest.mark.parametrize("api", ["dmi_loss", "DMILoss", "joint_matrix", "DMIAccumulator",
                                 "distributed"])
def test_keywords_of_the_wrong_type_raise_type_error(api, name, value, kind):
    x, y = _case()
    pattern = rf"argument '{name}' must be {kind}, got {repr(value)[:12]}"
    if api == "joint_matrix" and name == "eps":
        pytest.skip("joint_matrix has no eps")
    with pytest.raises(TypeError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        if api == "dmi_loss":
            dmi_ext.dmi_loss(x, y, **{name: value})
        elif api == "DMILoss":
            dmi_ext.DMILoss(**{name: value})
        elif api == "joint_matrix":
            dmi_ext.joint_matrix(x, y, **{name: value})
        elif api == "DMIAccumulator":
            dmi_ext.DMIAccumulator(**{name: value})
        else:
            dmi_dist.dmi_loss(x, y, **{name: value})


def test_return_info_and_preserve_rng_state_are_bools():
    x, y = _case()
    with pytest.raises(TypeError, match=r"'return_info' must be a bool, got None"):
        dmi_ext.dmi_loss(x, y, return_info=None)
    with pytest.raises(TypeError, match=r"'preserve_rng_state' must be a bool, got 0"):
        dmi_ext.DMIAccumulator(preserve_rng_state=0)


def test_good_keyword_types_still_pass():
    x, y = _case()
    a = dmi_ext.dmi_loss(x, y, eps=1, ignore_index=np.int64(-100), validate=np.bool_(True))
    b = dmi_ext.dmi_loss(x, y, eps=1.0, ignore_index=-100, validate=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, pattern", [
    ({"batch_size": True}, r"'batch_size' must be an int, got True"),
    ({"batch_size": 8.0}, r"'batch_size' must be an int, got 8.0"),
    ({"seed": "3"}, r"'seed' must be an int, got '3'"),
    ({"seed": 1.9}, r"'seed' must be an int, got 1.9"),
    ({"num_replicas": True, "rank": 0}, r"'num_replicas' must be an int, got True"),
    ({"num_replicas": 2, "rank": False}, r"'rank' must be an int, got False"),
])
def test_sampler_keyword_types(kw, pattern):
    kw = {"batch_size": 8, **kw}
    with pytest.raises(TypeError, match=pattern):
        dmi_ext.ClassCoveringBatchSampler(torch.arange(64) % 4, **kw)


@pytest.mark.parametrize("labels, kw, exc, pattern", [
    ([], {}, ValueError, r"'labels' is empty"),
    (torch.tensor([], dtype=torch.long), {}, ValueError, r"'labels' is empty"),
    (["cat", "dog"] * 8, {}, TypeError, r"'labels' must hold integer class labels, got str.*'cat'"),
    (list(range(16)), {"seed": -1}, ValueError, r"'seed' must be >= 0, got -1"),
    (list(range(16)), {"num_replicas": 2}, ValueError,
     r"'rank' is required with num_replicas=2 when no process group is initialised"),
])
def test_sampler_bad_arguments_fail_at_construction(labels, kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        dmi_ext.ClassCoveringBatchSampler(labels, 4, **kw)


def test_sampler_set_epoch_takes_an_int():
    sampler = dmi_ext.ClassCoveringBatchSampler(torch.arange(16) % 4, 4)
    with pytest.raises(TypeError, match=r"'epoch' must be an int, got '1'"):
        sampler.set_epoch("1")


# ---- unclear messages ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")  # beta / deprecated tensor kinds
@pytest.mark.parametrize("make, pattern", [
    (lambda x: x.to_sparse(), r"'input' has layout torch.sparse_coo.*to_dense"),
    (lambda x: x.to_sparse_csr(), r"'input' has layout torch.sparse_csr.*to_dense"),
    (lambda x: torch.quantize_per_tensor(x, 0.1, 0, torch.qint8), r"'input' is quantized"),
    (lambda x: torch.nested.nested_tensor([x, x]), r"'input' is a nested tensor"),
])
def test_sparse_quantized_nested_inputs_name_the_argument(make, pattern):
    x, y = _case()
    with pytest.raises(TypeError, match=pattern):
        dmi_ext.dmi_loss(make(x), y)
    with pytest.raises(TypeError, match=pattern):
        dmi_ext.joint_matrix(make(x), y)


def test_sparse_target_names_the_argument():
    x, y = _case()
    with pytest.raises(TypeError, match=r"'target' has layout torch.sparse_coo"):
        dmi_ext.dmi_loss(x, y.to_sparse())


def test_half_grad_loss_on_the_op_names_the_argument():
    x, y = _case()
    table = torch.ops.dmi_ext.dmi(x, y, True, True, 0.0, -100, 1, True, True)[3]
    with pytest.raises(TypeError, match=r"'grad_loss' must be float32 or float64.*Half"):
        torch.ops.dmi_ext.dmi_backward(torch.ones((), dtype=torch.half), x, y, table, True,
                                       -100, 1)


def test_should_step_arguments():
    x, y = _case()
    loss, info = dmi_ext.dmi_loss(x, y, return_info=True)
    result = dmi_ext.DMIAccumulator().loss(lambda t: t, [x], [y])
    assert dmi_ext.should_step(result) is True  # the whole DMIResult
    assert dmi_ext.should_step((loss, info)) is True  # what return_info=True gives
    assert dmi_ext.should_step(float("inf")) is False
    assert dmi_ext.should_step(1.5) is True
    with pytest.raises(ValueError, match=r"argument 'loss' is empty"):
        dmi_ext.should_step(torch.tensor([]))
    with pytest.raises(TypeError, match=r"argument 'loss' must be .*got a str"):
        dmi_ext.should_step("1.0")
    with pytest.raises(TypeError, match=r"argument 'info' must be a DMIInfo.*Tensor"):
        dmi_ext.should_step(loss, torch.tensor(False))


def test_process_group_of_the_wrong_type():
    x, y = _case()
    with pytest.raises(TypeError, match=r"'process_group' must be a .*ProcessGroup.*'world'"):
        dmi_dist.dmi_loss(x, y, process_group="world")
    with pytest.raises(TypeError, match=r"'process_group' must be a .*ProcessGroup.*'world'"):
        dmi_dist.DMILoss(process_group="world")
    with pytest.raises(TypeError, match=r"'process_group' must be a .*ProcessGroup.*'world'"):
        dmi_ext.DMIAccumulator(process_group="world")


# ---- DMIAccumulator: checks before work, transactional -------------------------------------------


class Spy(nn.Module):
    """Linear -> BatchNorm -> Dropout -> Linear, counting forwards, optionally failing on the
    n-th one (an out-of-memory error, say) or returning a tuple."""

    def __init__(self, C=4, fail_at=None, error=RuntimeError("CUDA out of memory (simulated)"),
                 as_tuple=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Dropout(0.3),
                                  nn.Linear(16, C))
        self.calls, self.fail_at, self.error, self.as_tuple = 0, fail_at, error, as_tuple

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        out = self.body(x)
        return (out, out) if self.as_tuple else out


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            torch.get_rng_state())


def _assert_untouched(model, before):
    state, grads, rng = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)


def _micro(n=4, rows=16, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows, 5, generator=g) for _ in range(n)]
    ys = [torch.arange(rows) % C for _ in range(n)]
    return xs, ys


def _with_old_grads(model):
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    return model


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _set_last(ys, value, dtype=None):
    ys = [y.clone() for y in ys]
    ys[-1][3] = value
    if dtype is not None:
        ys[-1] = ys[-1].to(dtype)
    return ys


BEFORE_FORWARD = {
    # name: (model change, targets change, accumulator keywords, backward keywords, exc, pattern)
    "negative label in the last micro-batch": (
        None, lambda ys: _set_last(ys, -3), {}, {}, IndexError,
        r"micro-batch 3 \(pass 1\): argument 'target' holds the label -3 at \[3\], negative"),
    "float labels in the last micro-batch": (
        None, lambda ys: ys[:-1] + [ys[-1].float()], {}, {}, TypeError,
        r"micro-batch 3 \(pass 1\): argument 'targets' must hold int64 or int32.*float32"),
    "a target of another rank": (
        None, lambda ys: ys[:-1] + [torch.stack([ys[-1]] * 2)], {}, {}, ValueError,
        r"micro-batch 3 \(pass 1\): argument 'targets' has shape \[2, 16\], but micro-batch 0"),
    "a target that is not a tensor": (
        None, lambda ys: ys[:-1] + [ys[-1].tolist()], {}, {}, TypeError,
        r"micro-batch 3 \(pass 1\): argument 'targets' must hold tensors of labels, got a list"),
    "a frozen model": (
        _frozen, None, {}, {}, ValueError, r"argument 'forward' \(Spy\) has no parameter that "
                                            r"requires grad"),
    "reduction none without grad_loss": (
        None, None, {"reduction": "none"}, {}, ValueError, r"reduction='none'.*'grad_loss'"),
    "grad_loss of the wrong size": (
        None, None, {"reduction": "none"}, {"grad_loss": torch.ones(3)}, ValueError,
        r"'grad_loss' has 3 elements, expected 1"),
    "grad_loss of the wrong type": (
        None, None, {}, {"grad_loss": "1"}, TypeError, r"'grad_loss' must be a float or a "
                                                          r"tensor, got '1'"),
}


@pytest.mark.parametrize("case", list(BEFORE_FORWARD))
@pytest.mark.parametrize("old_grads", [False, True], ids=["grad None", "grad set"])
def test_accumulator_checks_come_before_the_first_forward(case, old_grads):
    change_model, change_targets, acc_kw, call_kw, exc, pattern = BEFORE_FORWARD[case]
    torch.manual_seed(0)
    model = Spy()
    if old_grads:
        _with_old_grads(model)
    if change_model:
        change_model(model)
    xs, ys = _micro()
    if change_targets:
        ys = change_targets(ys)
    before = _state(model)
    with pytest.raises(exc, match=pattern):
        dmi_ext.DMIAccumulator(**acc_kw).backward(model, xs, ys, **call_kw)
    assert model.calls == 0
    _assert_untouched(model, before)


def test_accumulator_under_no_grad_raises_before_any_forward():
    model, (xs, ys) = Spy(), _micro()
    before = _state(model)
    for context in (torch.no_grad(), torch.inference_mode()):
        with context:
            with pytest.raises(RuntimeError, match=r"under torch.no_grad\(\) or "
                                                   r"torch.inference_mode\(\)"):
                dmi_ext.DMIAccumulator().backward(model, xs, ys)
    assert model.calls == 0
    _assert_untouched(model, before)


def test_label_too_large_in_the_last_micro_batch_is_found_after_one_forward():
    """C is known after the first forward: every micro-batch's labels are checked then, and the
    BatchNorm statistics and the generator that forward advanced are put back."""
    torch.manual_seed(0)
    model = _with_old_grads(Spy())
    xs, ys = _micro()
    ys = _set_last(ys, 9)
    before = _state(model)
    with pytest.raises(IndexError, match=r"micro-batch 3 \(pass 1\): argument 'target' holds "
                                         r"the label 9 at \[3\], outside \[0, 4\)"):
        dmi_ext.DMIAccumulator().backward(model, xs, ys)
    assert model.calls == 1
    _assert_untouched(model, before)


def test_model_returning_a_tuple_names_forward():
    model = Spy(as_tuple=True)
    xs, ys = _micro()
    before = _state(model)
    with pytest.raises(TypeError, match=r"micro-batch 0 \(pass 1\): argument 'forward' must "
                                        r"return the logits tensor, got a tuple"):
        dmi_ext.DMIAccumulator().backward(model, xs, ys)
    _assert_untouched(model, before)


@pytest.mark.parametrize("fail_at", [2, 5, 7, 8], ids=lambda n: f"forward{n}")
@pytest.mark.parametrize("old_grads", [False, True], ids=["grad None", "grad set"])
def test_a_failure_in_either_pass_leaves_everything_as_found(fail_at, old_grads):
    """4 micro-batches: forwards 1-4 are pass 1, 5-8 pass 2 (with backwards in between)."""
    torch.manual_seed(0)
    model = Spy(fail_at=fail_at)
    if old_grads:
        _with_old_grads(model)
    xs, ys = _micro()
    before = _state(model)
    acc = dmi_ext.DMIAccumulator()
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        acc.backward(model, xs, ys)
    where = f"micro-batch {(fail_at - 1) % 4} (pass {1 + (fail_at > 4)})"
    assert where in "\n".join([str(raised.value)] + getattr(raised.value, "__notes__", []))
    _assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="after a failed call.*out of memory"):
        acc.finish()
    # The same accumulator works again after the failure (backward starts afresh).
    model.fail_at = None
    loss, info = acc.backward(model, xs, ys)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


def test_a_failed_loss_call_restores_buffers_and_poisons_finish():
    torch.manual_seed(0)
    model = Spy(fail_at=3)
    xs, ys = _micro()
    before = _state(model)
    acc = dmi_ext.DMIAccumulator()
    with pytest.raises(RuntimeError, match="out of memory"):
        acc.loss(model, xs, ys)
    _assert_untouched(model, before)
    with pytest.raises(RuntimeError, match="after a failed call"):
        acc.finish()  # not the loss of micro-batches 0 and 1
    with pytest.raises(ValueError, match=r"'inputs' and 'targets'.*4 and 3"):
        acc.loss(model, xs, ys[:3])
    with pytest.raises(RuntimeError, match="after a failed call"):
        acc.finish()


def test_successful_call_adds_onto_existing_grads():
    torch.manual_seed(0)
    model = Spy()
    xs, ys = _micro()
    model.eval()  # deterministic forwards: the two calls give the same gradient
    dmi_ext.DMIAccumulator().backward(model, xs, ys)
    once = [p.grad.clone() for p in model.parameters()]
    dmi_ext.DMIAccumulator().backward(model, xs, ys)
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g)


def test_a_failure_with_a_plain_callable_says_grads_were_added():
    torch.manual_seed(0)
    model = Spy(fail_at=7)
    xs, ys = _micro()
    with pytest.raises(RuntimeError, match="out of memory") as raised:
        dmi_ext.DMIAccumulator().backward(lambda x: model(x), xs, ys)
    notes = "\n".join(getattr(raised.value, "__notes__", []))
    assert "gradients of micro-batches 0 to 1 were already added to .grad" in notes


def test_low_level_accumulate_failure_poisons_finish():
    x, y = _case()
    acc = dmi_ext.DMIAccumulator()
    acc.accumulate(x, y)
    bad = y.clone()
    bad[0] = 7
    with pytest.raises(IndexError, match=r"micro-batch 1 \(pass 1\).*label 7"):
        acc.accumulate(x, bad)
    with pytest.raises(RuntimeError, match="after a failed call"):
        acc.finish()
    acc.reset()
    acc.accumulate(x, y)
    assert torch.isfinite(acc.finish().loss)


def test_empty_micro_batch_list_and_bad_forward():
    with pytest.raises(ValueError, match="'inputs' holds no micro-batch"):
        dmi_ext.DMIAccumulator().backward(Spy(), [], [])
    with pytest.raises(TypeError, match="'forward' must be callable"):
        dmi_ext.DMIAccumulator().backward("model", *_micro())


# ---- documented limits ---------------------------------------------------------------------------


@pytest.mark.parametrize("C", [3, 130])  # the fused LU, and the LAPACK path above FUSED_MAX_CLASSES
def test_float64_logits_beyond_the_inverse_range_give_a_zero_gradient(C):
    """A class predicted with probabilities below the float64 range (logits ~713 apart): U^-1
    overflows float64; loss and log|det U| are exact and the gradient is 0, never inf or NaN."""
    torch.manual_seed(0)
    y = torch.arange(16 * C) % C
    x = torch.randn(16 * C, C, dtype=torch.float64)
    x[:, 2] -= 713
    x.requires_grad_()
    loss, info = dmi_ext.dmi_loss(x, y, return_info=True)
    loss.backward()
    expected = dmi_ext.reference.dmi_loss(x.detach(), y)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=0)
    assert not info.singular
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_reference_does_not_wrap_int32_labels():
    """The op compares labels with ignore_index in int64; so does the reference (torch would
    cast 2**32 to the int32 of the labels, i.e. 0, and ignore every label 0)."""
    x, y = make_case("single", 30, 3, seed=5)
    big = 2**32
    op = dmi_ext.dmi_loss(x, y.int(), ignore_index=big)
    ref = dmi_ext.reference.dmi_loss(x, y.int(), ignore_index=big)
    torch.testing.assert_close(op, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(ref, dmi_ext.reference.dmi_loss(x, y), rtol=0, atol=0)


# ---- typing and TorchScript ----------------------------------------------------------------------


def test_py_typed_is_shipped():
    import dmi_ext as package

    assert os.path.exists(os.path.join(os.path.dirname(package.__file__), "py.typed"))
    setup = open(os.path.join(os.path.dirname(__file__), "..", "setup.py")).read()
    assert "py.typed" in setup


USER_SCRIPT = """
import torch
import dmi_ext

x, y = torch.randn(8, 3), torch.arange(8) % 3
loss = dmi_ext.dmi_loss(x, y)
loss.backward()
pair = dmi_ext.dmi_loss(x, y, return_info=True)
value, info = pair
flag: torch.Tensor = info.singular
reveal_type(loss)
reveal_type(pair)
criterion = dmi_ext.DMILoss(eps=1e-3)
out: torch.Tensor = criterion(x, y)
acc = dmi_ext.DMIAccumulator()
result = acc.loss(lambda t: t, [x], [y])
ok: bool = dmi_ext.should_step(result.loss, result.info)
"""


@pytest.mark.skipif(shutil.which("mypy") is None and
                    subprocess.run([sys.executable, "-c", "import mypy"],
                                   capture_output=True).returncode != 0,
                    reason="mypy is not installed")
def test_mypy_types_a_user_script(tmp_path):
    script = tmp_path / "user.py"
    script.write_text(textwrap.dedent(USER_SCRIPT))
    bad = tmp_path / "bad.py"
    bad.write_text("import torch, dmi_ext\n"
                   "loss: torch.Tensor = dmi_ext.dmi_loss(torch.randn(8, 3), torch.arange(8) % 3,"
                   " return_info=True)\n")
    run = [sys.executable, "-m", "mypy", "--no-incremental", "--cache-dir", str(tmp_path / "c"),
           "--follow-imports=silent"]
    env = dict(os.environ, MYPYPATH="")
    good = subprocess.run(run + [str(script)], capture_output=True, text=True, env=env)
    assert good.returncode == 0, good.stdout + good.stderr
    assert 'Revealed type is "torch._tensor.Tensor"' in good.stdout
    assert re.search(r'Revealed type is "[Tt]uple\[torch._tensor.Tensor, .*'
                     r'dmi_ext.functional.DMIInfo\]?\]"', good.stdout), good.stdout
    wrong = subprocess.run(run + [str(bad)], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and "Incompatible types in assignment" in wrong.stdout


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torchscript_dmi_loss_module():
    x, y = make_case("batched", 20, 4, seed=3)
    for kw in ({}, {"reduction": "none", "eps": 1e-3, "normalize": False}):
        eager = dmi_ext.DMILoss(**kw)
        scripted = torch.jit.script(eager)
        xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        le, ls = eager(xe, y), scripted(xs, y)
        assert torch.equal(le, ls)
        le.sum().backward()
        ls.sum().backward()
        assert torch.equal(xe.grad, xs.grad)
    scripted = torch.jit.script(dmi_ext.DMILoss())
    with pytest.raises(Exception, match=r"'target' holds the label 9"):
        bad = y.clone()
        bad[0, 0] = 9
        scripted(x, bad)


def test_bad_saved_probabilities_name_the_argument():
    x, y = _case()
    out = torch.ops.dmi_ext.dmi(x, y, True, True, 0.0, -100, 1, True, True, True)
    one = torch.ones((), dtype=out[0].dtype)
    with pytest.raises(TypeError, match=r"'probs' must be .*Double"):
        torch.ops.dmi_ext.dmi_backward(one, x.double(), y, out[3], True, -100, 1, out[4])
    with pytest.raises(ValueError, match=r"'probs' has shape \[3, 4\]"):
        torch.ops.dmi_ext.dmi_backward(one, x, y, out[3], True, -100, 1, out[4][:3, :4])
    with pytest.raises(ValueError, match=r"'probs' has shape"):
        torch.ops.dmi_ext.dmi_backward_into(one, x, y, out[3], -100, 1, torch.empty(0))
    with pytest.raises(TypeError, match=r"'probs' of dmi_backward_into must be"):
        torch.ops.dmi_ext.dmi_backward_into(one, x.half(), y, out[3], -100, 1, out[4])
