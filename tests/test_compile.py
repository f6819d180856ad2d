"""Registration (contract §1, issue 2): opcheck on every op, torch.compile(fullgraph=True) of a model
that uses DMILoss without graph breaks, and agreement with eager."""

import pytest
import torch

import dmi_ext

from conftest import KINDS, make_case

ops = torch.ops.dmi_ext


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1])
@pytest.mark.parametrize("need_grad_table, save_probs", [(True, False), (False, False),
                                                         (True, True)])
def test_opcheck_dmi(device, kind, requires_grad, reduction, need_grad_table, save_probs):
    x, y = make_case(kind, 12, 3, n_ignored=2, device=device)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(ops.dmi.default, (x, y, True, True, 0.0, -100, reduction, True,
                                            need_grad_table, save_probs))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_joint_and_lu(device, kind, requires_grad):
    x, y = make_case(kind, 12, 3, from_logits=False, device=device)
    x.requires_grad_(requires_grad)
    torch.library.opcheck(ops.joint.default, (x, y, False, -100, True))
    sums, counts = ops.joint.default(x.detach(), y, False, -100, True)
    sums.requires_grad_(requires_grad)
    torch.library.opcheck(ops.lu_loss.default, (sums, counts, True, 1e-3))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("save_probs", [False, True])
def test_opcheck_backward(device, kind, save_probs):
    x, y = make_case(kind, 12, 3, device=device)
    loss, _, _, table, probs = ops.dmi.default(x, y, True, True, 0.0, -100, 1, True, True,
                                               save_probs)
    torch.library.opcheck(ops.dmi_backward.default,
                          (torch.ones_like(loss), x, y, table, True, -100, 1, probs))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_backward_into(device, kind):
    x, y = make_case(kind, 12, 3, dtype=torch.float32, device=device)
    loss, _, _, table, probs = ops.dmi.default(x, y, True, True, 0.0, -100, 1, True, True, True)
    if probs.numel() == 0:
        pytest.skip("this device keeps no probabilities (the backward recomputes them)")
    torch.library.opcheck(ops.dmi_backward_into.default,
                          (torch.ones_like(loss), x, y, table, -100, 1, probs))


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.loss = dmi_ext.DMILoss()

    def forward(self, x, y):
        return self.loss(self.body(x), y)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(device, backend):
    torch.manual_seed(0)
    net = Net().to(device).double()
    x = torch.randn(64, 8, dtype=torch.float64, device=device)
    y = (torch.arange(64, device=device) % 4)

    def step(model):
        model.zero_grad()
        loss = model(x, y)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = step(net)
    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=backend, dynamic=False)
    c_loss, c_grads = step(compiled)
    torch.testing.assert_close(c_loss, eager_loss, rtol=1e-10, atol=1e-10)
    for g, e in zip(c_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
