"""The near-constant network case of the README (Precision): the loss error of dmi_ext, of
torch's float32 pipeline and of a correctly rounded float32 softmax against the float64
reference, at N = 10^6, C = 10, seeds 0-11 (one thread; about a minute).

Run: python scripts/near_constant_precision.py
"""
import statistics

import torch

import dmi_ext

torch.set_num_threads(1)
N, C = 10**6, 10
rows = []
for seed in range(12):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    # a network whose output barely depends on its input: spread ~ a few float32 ulps of the logits
    x = (base + 4e-7 * torch.randn(N, C, generator=g)
         + 2e-7 * torch.nn.functional.one_hot(y, C)).float()
    ref = dmi_ext.reference.dmi_loss(x.double(), y).item()
    ours = dmi_ext.dmi_loss(x, y).item()
    # torch's float32 pipeline: float32 softmax, float64 sums, slogdet
    P = x.softmax(-1).double()
    U = torch.zeros(C, C, dtype=torch.float64).index_add_(0, y, P) / N
    torch_loss = -torch.linalg.slogdet(U).logabsdet.item()
    # the floor of any float32-softmax pipeline: the float64 softmax rounded once to float32
    Pr = x.double().softmax(-1).float().double()
    Ur = torch.zeros(C, C, dtype=torch.float64).index_add_(0, y, Pr) / N
    rounded = -torch.linalg.slogdet(Ur).logabsdet.item()
    e = lambda v: abs(v - ref) / abs(ref)
    rows.append((seed, ref, e(ours), e(torch_loss), e(rounded)))
    print(f"seed {seed}: loss {ref:.6g}  ours {e(ours):.2e}  torch {e(torch_loss):.2e}  "
          f"correctly-rounded f32 softmax {e(rounded):.2e}  "
          f"ours/torch {e(ours) / e(torch_loss):.2f}  ours/rounded {e(ours) / e(rounded):.2f}",
          flush=True)
r = [a[2] / a[3] for a in rows]; q = [a[2] / a[4] for a in rows]; t = [a[3] / a[4] for a in rows]
print("ours/torch median", statistics.median(r), "max", max(r))
print("ours/rounded median", statistics.median(q), "max", max(q))
print("torch/rounded median", statistics.median(t), "max", max(t))
