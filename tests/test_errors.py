"""Bad input (SPEC §7): each case raises, the message names the argument and the bad value, and
the caller's tensors are unchanged afterwards."""

import pytest
import torch

import dmi_ext

from conftest import CUDA


def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _y(*shape, C=4, device="cpu"):
    return torch.randint(0, C, shape, device=device)


BAD = {
    # name: (input, target, kwargs, exception type, regex the message must match)
    "label too large": (_x(8, 4), torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), {}, IndexError,
                        r"'target'.*label 4 at \[4\].*\[0, 4\)"),
    "negative label": (_x(8, 4), torch.tensor([0, 1, -3, 3, 0, 0, 1, 2]), {}, IndexError,
                       r"'target'.*label -3"),
    "bad label in a source": (_x(8, 4), torch.tensor([[0, 1, 2, 3] * 2, [0, 1, 2, 9, 0, 1, 2, 3]]),
                              {}, IndexError, r"'target'.*label 9 at \[1, 3\]"),
    "float target": (_x(8, 4), torch.zeros(8), {}, TypeError, r"'target'.*int64 or int32.*Float"),
    "integer input": (torch.zeros(8, 4, dtype=torch.int64), _y(8), {}, TypeError,
                      r"'input'.*float.*Long"),
    "1-d input": (_x(8), _y(8), {}, ValueError, r"'input'.*\(N, C\).*\[8\]"),
    "4-d input": (_x(2, 2, 8, 4), _y(2, 2, 8), {}, ValueError, r"'input'.*\[2, 2, 8, 4\]"),
    "one class": (_x(8, 1), torch.zeros(8, dtype=torch.long), {}, ValueError, r"C = 1"),
    "no rows": (_x(0, 4), _y(0), {}, ValueError, r"N = 0"),
    "no sources": (_x(8, 4), _y(0, 8), {}, ValueError, r"M = 0"),
    "no batch": (_x(0, 8, 4), _y(0, 8), {}, ValueError, r"B = 0"),
    "target length": (_x(8, 4), _y(7), {}, ValueError, r"'target' has shape \[7\].*\[8, 4\]"),
    "batched target shape": (_x(3, 8, 4), _y(2, 8), {}, ValueError, r"'target' has shape \[2, 8\]"),
    "target rank": (_x(8, 4), _y(2, 2, 8), {}, ValueError, r"'target' has shape \[2, 2, 8\]"),
    "negative eps": (_x(8, 4), _y(8), {"eps": -1.0}, ValueError, r"'eps'.*-1"),
    "nan eps": (_x(8, 4), _y(8), {"eps": float("nan")}, ValueError, r"'eps'.*nan"),
    "bad reduction": (_x(8, 4), _y(8), {"reduction": "avg"}, ValueError, r"'reduction'.*'avg'"),
    "logits as probabilities": (_x(8, 4), _y(8), {"from_logits": False}, ValueError,
                                r"'input' is not a probability vector at row 0"),
    "negative probability": (torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 7 + [[1.2, -0.2, 0.0, 0.0]]),
                             _y(8), {"from_logits": False}, ValueError,
                             r"'input'.*row 7.*min -0.2"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("api", ["dmi_loss", "joint_matrix"])
def test_bad_input_raises_and_names_argument(case, api):
    x, y, kw, exc, pattern = BAD[case]
    if api == "joint_matrix":
        kw = {k: v for k, v in kw.items() if k not in ("eps", "reduction")}
        if case in ("negative eps", "nan eps", "bad reduction"):
            pytest.skip("joint_matrix has no eps or reduction")
    x0, y0 = x.clone(), y.clone()
    with pytest.raises(exc, match=pattern):
        getattr(dmi_ext, api)(x, y, **kw)
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_module_rejects_bad_keywords_at_construction():
    with pytest.raises(ValueError, match="'reduction'"):
        dmi_ext.DMILoss(reduction="batchmean")
    with pytest.raises(ValueError, match="'eps'"):
        dmi_ext.DMILoss(eps=-0.5)


def test_not_a_tensor_names_argument():
    with pytest.raises(TypeError, match="argument 'target' must be a torch.Tensor, got list"):
        dmi_ext.dmi_loss(_x(8, 4), [0, 1, 2, 3, 0, 1, 2, 3])


def test_validation_can_be_switched_off_for_probabilities():
    x = torch.rand(16, 4)  # rows do not sum to 1
    y = torch.arange(16) % 4
    assert torch.isfinite(dmi_ext.dmi_loss(x, y, from_logits=False, validate=False))


def test_float16_probabilities_within_tolerance_pass():
    y = torch.arange(64) % 8
    p = torch.softmax(torch.randn(64, 8), -1).half()  # sums off 1 by float16 rounding
    assert torch.isfinite(dmi_ext.dmi_loss(p, y, from_logits=False))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="'input' and 'target' must be on the same device"):
        dmi_ext.dmi_loss(_x(8, 4, device="cuda"), _y(8))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_cuda_bad_label_raises_with_validation():
    with pytest.raises(IndexError, match=r"'target'.*label 7"):
        dmi_ext.dmi_loss(_x(8, 4, device="cuda"), torch.tensor([0, 1, 2, 3, 7, 0, 1, 2], device="cuda"))
