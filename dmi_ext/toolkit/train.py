"""The one training loop every method runs, and the hyperparameters it reads.

A method is one or more ``Phase``s: a loss module, an optional label hook (LCCN trains on sampled
labels instead of the given ones), and a validation criterion (lower is better, computed on the
noisy validation split). ``fit`` runs a phase over a loader of ``(x, y, index)`` batches and keeps
the weights of the epoch with the best criterion, counting the starting weights as epoch 0. In a
data-parallel run (a process group of several processes) the same loop trains through DDP on
each rank's share of every batch, with the loss and the label hook lifted to the global batch
(``parallel.for_global_batch``); validation and selection stay local, on identical weights.
"""

import copy
import math
import zlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import should_step
from .models import predict_logits
from .parallel import for_global_batch, rank_and_world

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are a nicety, never a requirement
    tqdm = None


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Hyperparameters of every method; the CLI exposes each field as --field-name.

    Defaults were chosen on validation data (see docs/toolkit.md), never on test data.
    """

    device: str = _option("auto", "where to train: 'cpu', 'cuda' (the model, the data, the losses "
                                  "and LCCN's sampler on the GPU; L_DMI through the fused CUDA "
                                  "op; with --nproc, GPU k for process k, joined by NCCL) or "
                                  "'auto' (cuda when torch sees a GPU)")
    model: str = _option("mlp", "network: 'mlp' (any data) or 'cnn' (image-shaped data)")
    hidden: int = _option(128, "width of the hidden layers")
    layers: int = _option(2, "hidden layers of the MLP")
    inputs: str = _option("standardize-floor", "feature scaling, from the training split: "
                                               "'standardize-floor' (each feature centred and "
                                               "divided by its std, or by a quarter of the RMS "
                                               "of all features' stds if that is larger, so that "
                                               "nearly constant features are not blown up), "
                                               "'standardize' (each feature to mean 0, std 1) or "
                                               "'scale' (all features divided by the largest |x|)")
    batch_size: int = _option(128, "mini-batch size for CE, FW, GCE and LCCN (the last partial "
                                   "batch is spread over the others, so batches hold at least "
                                   "this; with --nproc, the rows of all processes together)")
    weight_decay: float = _option(1e-4, "Adam weight decay, all phases")
    ce_epochs: int = _option(40, "epochs of cross-entropy: the CE method, and the warm-up that "
                                 "FW, LCCN and DMI start from")
    ce_lr: float = _option(1e-3, "Adam learning rate of cross-entropy")
    gce_epochs: int = _option(40, "epochs of GCE (trained from scratch)")
    gce_lr: float = _option(3e-3, "Adam learning rate of GCE")
    gce_q: float = _option(0.7, "GCE exponent q: L = (1 - p_y^q) / q")
    fw_epochs: int = _option(15, "epochs of forward-corrected training after the warm-up")
    fw_lr: float = _option(1e-3, "Adam learning rate of FW")
    fw_transition: str = _option("anchor", "FW's T: 'anchor' (highest p(class|x) sample per class), "
                                           "'anchor-filtered' (97th percentile instead of the "
                                           "maximum) or 'known' (the true T)")
    lccn_epochs: int = _option(15, "epochs of LCCN (Gibbs-sampled labels) after the warm-up")
    lccn_lr: float = _option(1e-3, "Adam learning rate of LCCN")
    lccn_alpha: float = _option(1.0, "LCCN's Dirichlet prior on each row of T (pseudo-counts)")
    dmi_epochs: int = _option(30, "epochs of L_DMI after the warm-up")
    dmi_lr: float = _option(1e-3, "Adam learning rate of L_DMI")
    dmi_start: str = _option("best", "the CE warm-up epoch L_DMI starts from: 'best' (by "
                                     "validation cross-entropy, the CE result) or 'final'")
    dmi_rule: str = _option("auto", "DMI's decision rule: 'argmax', 'estimated-T' (per-class "
                                      "offsets that maximise the clean accuracy estimated "
                                      "through T from the noisy validation labels) or 'auto' "
                                      "(2 classes: the threshold where the noisy validation "
                                      "labels change rate along the model's ranking, by a "
                                      "change point and a label-emitting mixture, whichever "
                                      "lies where the scores are sparser; more classes: the "
                                      "estimated-T offsets where the validation split has at "
                                      "least 25 labels per entry of T and det T-hat > 0)")
    dmi_batch_size: int = _option(256, "mini-batch size of L_DMI (small batches make the joint "
                                       "matrix badly conditioned; the paper uses 128 or 256; "
                                       "with --nproc, the global batch U is formed over)")
    val_fraction: float = _option(0.2, "fraction of the data held out for (noisy) validation")
    test_fraction: float = _option(0.2, "fraction of the data held out for (clean) testing")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Phase:
    """One stretch of training with one loss; what a method plugs into ``fit``."""

    name: str
    loss: nn.Module  # (logits, targets) -> scalar
    epochs: int
    lr: float
    # (detached logits, given labels, row indices) -> training targets; None: the given labels.
    relabel: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None
    # (validation logits, noisy validation labels) -> float, lower is better; None: the loss.
    criterion: Optional[Callable[[Tensor, Tensor], float]] = None


@dataclass
class PhaseLog:
    """What ``fit`` saw: per-epoch mean training loss and validation criterion (index 0 = start)."""

    name: str
    best_epoch: int
    best_criterion: float
    train_loss: List[Optional[float]]  # None where no batch was trained on
    val_criterion: List[float]
    skipped_batches: int  # batches whose loss was not finite (L_DMI of a batch missing a class)


class Batches:
    """Shuffled mini-batches ``(x, y, index)`` over in-memory tensors, one seeded order per epoch.

    ``len(x) // batch_size`` batches of near-equal size (at least ``batch_size`` rows each, all
    rows used every epoch): a short last batch would give L_DMI a badly conditioned matrix.
    With ``world`` > 1 processes, every rank draws the same order and yields its contiguous
    slice (``rank`` of ``world`` near-equal slices) of each of these batches, so the ranks'
    slices of the b-th batch, in rank order, are exactly the b-th batch of one process.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int, *, rank: int = 0,
                 world: int = 1):
        if batch_size < 1:
            raise ValueError(f"argument 'batch_size' must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"argument 'rank' must be in [0, world = {world}), got {rank}")
        if min(batch_size, len(x)) < world:
            raise ValueError(f"argument 'batch_size': batches of {min(batch_size, len(x))} rows "
                             f"cannot be shared by {world} processes (each needs a row)")
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rank, self.world = rank, world
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, len(self.x) // self.batch_size)

    def __iter__(self) -> Iterable[Tuple[Tensor, Tensor, Tensor]]:
        order = torch.randperm(len(self.x), generator=self.generator)
        for batch in order.tensor_split(len(self)):
            index = batch.tensor_split(self.world)[self.rank]
            index = index.to(self.x.device)
            yield self.x[index], self.y[index], index


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """'cpu' or 'cuda' for a ``--device`` value; 'cuda' without a usable GPU is an error."""
    if name not in DEVICES:
        raise ValueError(f"argument --device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"argument --device: 'cuda' asked for, but torch {torch.__version__} sees "
                         f"no GPU (CUDA build: {torch.version.cuda}); use --device cpu or auto")
    return name


def process_device(name: str) -> torch.device:
    """The device of this process for a ``--device`` value: GPU k for rank k of a CUDA run."""
    device = resolve_device(name)
    if device == "cuda":
        return torch.device("cuda", rank_and_world()[0] % torch.cuda.device_count())
    return torch.device("cpu")


def derived_seed(seed: int, purpose: str) -> int:
    """An independent, reproducible seed for one purpose (a phase's batch order, a sampler)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(purpose.encode())]).generate_state(1)[0])


def finite_or_inf(value: float) -> float:
    """NaN and -inf count as the worst value (+inf), so selection never picks them."""
    return value if math.isfinite(value) else math.inf


def fit(model: nn.Module, phase: Phase, loader: Iterable, val_x: Tensor, val_y: Tensor, *,
        weight_decay: float = 0.0, progress: bool = False,
        final_state: Optional[dict] = None) -> PhaseLog:
    """Trains ``model`` in place for ``phase.epochs`` epochs; leaves it at the best epoch.

    Under a process group of several processes, ``loader`` yields this rank's share of each
    batch and every rank must call ``fit`` alike; the validation criterion uses ``phase.loss``
    as given, on the whole validation split, so every rank selects the same epoch.
    ``final_state``: a dict that receives a copy of the last epoch's weights.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=phase.lr, weight_decay=weight_decay,
                                 foreach=True)
    criterion = phase.criterion or (lambda logits, y: float(phase.loss(logits, y)))
    replica, train_loss, relabel = for_global_batch(model, phase.loss, phase.relabel)

    def validate() -> float:
        model.eval()
        return finite_or_inf(criterion(predict_logits(model, val_x), val_y))

    val_history = [validate()]
    train_history: List[Optional[float]] = [None]  # no training before epoch 1
    best_epoch, best_state = 0, copy.deepcopy(model.state_dict())
    skipped = 0
    epochs = range(1, phase.epochs + 1)
    if progress and tqdm is not None:
        epochs = tqdm(epochs, desc=phase.name, leave=False)
    for epoch in epochs:
        model.train()
        total, count = 0.0, 0
        for x, y, index in loader:
            logits = replica(x)
            targets = y if relabel is None else relabel(logits.detach(), y, index)
            loss = train_loss(logits, targets)
            if not should_step(loss):
                # L_DMI is +inf with a zero gradient when a class is missing from the batch:
                # there is nothing to learn from it, and an Adam step would only replay momentum.
                # (The loss is that of the global batch, so every rank skips alike.)
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            count += 1
        train_history.append(total / count if count else None)  # None: every batch skipped
        val_history.append(validate())
        if val_history[-1] < val_history[best_epoch]:
            best_epoch, best_state = epoch, copy.deepcopy(model.state_dict())
        if progress and tqdm is not None:
            epochs.set_postfix(train=train_history[-1], val=f"{val_history[-1]:.4g}")
    if final_state is not None:
        final_state.update(copy.deepcopy(model.state_dict()))
    model.load_state_dict(best_state)
    return PhaseLog(phase.name, best_epoch, val_history[best_epoch], train_history, val_history,
                    skipped)


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Percentage of rows whose arg-max logit is the label."""
    model.eval()
    return 100.0 * float((predict_logits(model, x).argmax(dim=1) == y).double().mean())
