"""The five training methods of the paper, as losses and label hooks for the one training loop.

CE: cross-entropy on the noisy labels. GCE: generalised cross-entropy (Zhang & Sabuncu 2018),
trained from scratch. FW, LCCN and DMI start from the CE model (the warm-up, which is also the CE
result): FW (Patrini et al. 2017) estimates T from anchor points of the warm-up model (or is
given the true T) and trains on ``-log (softmax(z) @ T)[y]``; LCCN (Yao et al. 2019) Gibbs-samples
latent clean labels under a Dirichlet prior on T and trains on the samples; DMI trains with
L_DMI from ``dmi_ext`` (the paper's protocol: CE pre-training, then L_DMI). Every phase keeps its
epoch with the best criterion on the noisy validation split: its own loss for CE, GCE, FW and
DMI, and for LCCN the likelihood of the noisy labels under its current T.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import DMILoss, joint_matrix
from .data import Splits
from .decision import choose_offsets, choose_threshold
from .models import build_model, predict_logits
from .parallel import rank_and_world
from .train import (Batches, Phase, PhaseLog, TrainConfig, accuracy, derived_seed, fit,
                    process_device)

METHODS = ("ce", "fw", "gce", "lccn", "dmi")
WARM_STARTED = ("ce", "fw", "lccn", "dmi")  # methods whose result builds on the CE warm-up
FW_TRANSITIONS = ("anchor", "anchor-filtered", "known")
ANCHOR_PERCENTILE = 97.0
DMI_STARTS = ("best", "final")
DMI_RULES = ("argmax", "estimated-T", "auto")
# 'auto' trusts T̂ from this many validation labels per entry (digits: 90 for 2 classes, 3.6
# for 10, where the offsets cost 5 points on pair flips r = 0.7)
MIN_LABELS_PER_ENTRY = 25.0


class GeneralizedCrossEntropy(nn.Module):
    """L_q = mean over the batch of (1 - p_y^q) / q; q -> 0 is cross-entropy, q = 1 is MAE."""

    def __init__(self, q: float = 0.7):
        super().__init__()
        if not 0.0 < q <= 1.0:
            raise ValueError(f"argument 'q' must be in (0, 1], got {q!r}")
        self.q = q

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        log_p_y = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        return ((1.0 - torch.exp(self.q * log_p_y)) / self.q).mean()


def forward_corrected_nll(logits: Tensor, target: Tensor, log_transition: Tensor) -> Tensor:
    """Mean of -log sum_k softmax(z)_k T[k, y]: the noisy-label likelihood under T.

    Computed as a logsumexp of log-probabilities, so tiny probabilities and zero entries of T
    (log 0 = -inf) stay exact and finite wherever some clean class can produce the label.
    """
    log_p = F.log_softmax(logits, dim=1)
    return -torch.logsumexp(log_p + log_transition[:, target].T.to(log_p.dtype), dim=1).mean()


class ForwardCorrectedCrossEntropy(nn.Module):
    """FW's loss: cross-entropy of the noisy label against softmax(z) @ T."""

    def __init__(self, transition):
        super().__init__()
        T = torch.as_tensor(np.asarray(transition, dtype=np.float64))
        self.register_buffer("log_transition", torch.log(T))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return forward_corrected_nll(logits, target, self.log_transition)


def anchor_transition(noisy_posterior: np.ndarray, filter_outliers: bool = False) -> np.ndarray:
    """Patrini et al.'s estimate of T from a model of p(noisy label | x) on training samples.

    Row i is the predicted noisy-label distribution of the anchor of class i: the sample with the
    highest p(i | x), or with ``filter_outliers`` the highest one below the 97th percentile (the
    very top is often an overconfident outlier). Rows of a softmax sum to 1, so the result is a
    transition matrix.
    """
    probs = np.asarray(noisy_posterior, dtype=np.float64)
    T = np.empty((probs.shape[1], probs.shape[1]))
    for i in range(probs.shape[1]):
        scores = probs[:, i]
        if filter_outliers:
            cutoff = np.percentile(scores, ANCHOR_PERCENTILE, method="higher")
            scores = np.where(scores >= cutoff, -np.inf, scores)
            if not np.isfinite(scores).any():  # every score ties at the top: nothing to filter
                scores = probs[:, i]
        T[i] = probs[np.argmax(scores)]
    return T


class LatentLabelSampler:
    """LCCN: Gibbs sampling of latent clean labels z under a Dirichlet(alpha) prior on T's rows.

    State: one latent label per training row and the counts n[z, noisy]. T is integrated out:
    P(noisy = j | z = i) = (n[i, j] + alpha) / (n[i, :].sum() + C alpha). For a batch, the
    sampler removes the batch's own counts, draws z ~ p(z | x) T[z, noisy] with p(z | x) the
    network's current softmax, and puts the new counts back; the network then trains on z.
    It starts from the warm-up model: T is first estimated from its soft confusion with the
    noisy labels, and z drawn once for every row.
    """

    def __init__(self, warm_probs: Tensor, noisy: Tensor, alpha: float, seed: int):
        if not alpha > 0.0:
            raise ValueError(f"argument 'alpha' must be > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.num_classes = warm_probs.shape[1]
        self.validated_transitions: List[Tensor] = []
        self.generator = torch.Generator(device=warm_probs.device).manual_seed(seed)
        # joint_matrix rows are labels and columns predictions: transposed, n[z, noisy].
        soft_counts = joint_matrix(warm_probs, noisy, from_logits=False, normalize=False).T
        self.counts = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64,
                                  device=warm_probs.device)
        self.latent = self._draw(warm_probs.double(), noisy, self._smoothed(soft_counts))
        self.counts.index_put_((self.latent, noisy), torch.ones_like(noisy, dtype=torch.float64),
                               accumulate=True)

    def _smoothed(self, counts: Tensor) -> Tensor:
        counts = counts + self.alpha
        return counts / counts.sum(dim=1, keepdim=True)

    def transition(self) -> Tensor:
        """The posterior-mean T given the current latent labels (float64, rows sum to 1)."""
        return self._smoothed(self.counts)

    def _draw(self, probs: Tensor, noisy: Tensor, transition: Tensor) -> Tensor:
        weights = probs * transition[:, noisy].T  # p(z | x) P(noisy | z), unnormalised
        return torch.multinomial(weights, 1, generator=self.generator).squeeze(1)

    def __call__(self, logits: Tensor, noisy: Tensor, index: Tensor) -> Tensor:
        ones = torch.ones_like(index, dtype=torch.float64)
        self.counts.index_put_((self.latent[index], noisy), -ones, accumulate=True)
        z = self._draw(torch.softmax(logits.double(), dim=1), noisy, self.transition())
        self.counts.index_put_((z, noisy), ones, accumulate=True)
        self.latent[index] = z
        return z

    def criterion(self, logits: Tensor, noisy: Tensor) -> float:
        """Validation criterion: the noisy labels' likelihood under the current T (which is
        recorded, so that the T of the kept epoch can be reported)."""
        transition = self.transition()
        self.validated_transitions.append(transition)
        return float(forward_corrected_nll(logits, noisy, torch.log(transition)))


@dataclass
class RunResult:
    """One method on one noisy split: clean test accuracy and how training went."""

    method: str
    seed: int
    test_accuracy: float  # percent, on the clean test labels
    phases: List[PhaseLog]
    estimated_transition: Optional[List[List[float]]] = None  # FW's and LCCN's T
    decision: Optional[dict] = None  # DMI's decision rule, when one was asked for
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)  # as tested


def new_model(splits: Splits, config: TrainConfig, seed: int) -> nn.Module:
    """The initial network of a run, on ``config.device``; its weights depend on ``seed`` only
    (drawn on the CPU, so every device starts from the same weights)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global generator as it was
        torch.manual_seed(seed)
        model = build_model(config.model, splits.sample_shape, splits.num_classes,
                            config.hidden, config.layers)
    return model.to(process_device(config.device))


def train_phase(model: nn.Module, phase: Phase, splits: Splits, config: TrainConfig, seed: int,
                batch_size: int, progress: bool = False,
                final_state: Optional[dict] = None) -> PhaseLog:
    """One phase on the training split, selected on the validation split; the batch order
    depends on the seed and the phase's name only (in a data-parallel run, each rank takes its
    share of every batch)."""
    rank, world = rank_and_world()
    loader = Batches(splits.train.x, splits.train.y, batch_size, derived_seed(seed, phase.name),
                     rank=rank, world=world)
    return fit(model, phase, loader, splits.val.x, splits.val.y,
               weight_decay=config.weight_decay, progress=progress, final_state=final_state)


@dataclass
class WarmStart:
    """The CE warm-up: its best epoch's weights (the CE result, the start of FW and LCCN), its
    last epoch's weights (where DMI starts with ``dmi_start='final'``) and its log."""

    best: dict
    final: dict
    log: PhaseLog


def warm_up(splits: Splits, config: TrainConfig, seed: int, progress: bool = False) -> WarmStart:
    """The CE model: the CE result and the start of FW, LCCN and DMI."""
    splits = splits.to(process_device(config.device))
    model = new_model(splits, config, seed)
    final: dict = {}
    log = train_phase(model, Phase("ce", nn.CrossEntropyLoss(), config.ce_epochs, config.ce_lr),
                      splits, config, seed, config.batch_size, progress, final_state=final)
    return WarmStart(model.state_dict(), final, log)


def run_method(method: str, splits: Splits, config: TrainConfig, seed: int, *,
               warm_start=None, progress: bool = False) -> RunResult:
    """Trains ``method`` on ``splits`` and reports its clean test accuracy.

    ``warm_start``: the ``warm_up`` output for the same splits, config and seed, to share one CE
    run between CE, FW, LCCN and DMI (computed here when not given).
    """
    if method not in METHODS:
        raise ValueError(f"argument 'method' must be one of {METHODS}, got {method!r}")
    splits = splits.to(process_device(config.device))
    model = new_model(splits, config, seed)

    def train(phase: Phase, batch_size: int = config.batch_size) -> PhaseLog:
        return train_phase(model, phase, splits, config, seed, batch_size, progress)

    if method == "gce":
        phases = [train(Phase("gce", GeneralizedCrossEntropy(config.gce_q), config.gce_epochs,
                              config.gce_lr))]
    else:
        if warm_start is None:
            warm_start = warm_up(splits, config, seed, progress)
        start = warm_start.final if method == "dmi" and config.dmi_start == "final" \
            else warm_start.best
        model.load_state_dict(start)
        phases = [warm_start.log]
    estimated, decision = None, None
    if method == "fw":
        estimated = _fw_transition(model, splits, config.fw_transition)
        phases.append(train(Phase("fw", ForwardCorrectedCrossEntropy(estimated).to(
                                      splits.train.x.device),
                                  config.fw_epochs, config.fw_lr)))
    elif method == "lccn":
        sampler = LatentLabelSampler(torch.softmax(predict_logits(model, splits.train.x), 1),
                                     splits.train.y, config.lccn_alpha,
                                     derived_seed(seed, "lccn-sampler"))
        phases.append(train(Phase("lccn", nn.CrossEntropyLoss(), config.lccn_epochs,
                                  config.lccn_lr, relabel=sampler, criterion=sampler.criterion)))
        estimated = sampler.validated_transitions[phases[-1].best_epoch].cpu().numpy()
    elif method == "dmi":
        phases.append(train(Phase("dmi", DMILoss(), config.dmi_epochs, config.dmi_lr),
                            config.dmi_batch_size))
        if config.dmi_rule != "argmax":
            decision = apply_decision_rule(model, splits, config.dmi_rule)
    return RunResult(method, seed, accuracy(model, splits.test.x, splits.test.y), phases,
                     None if estimated is None else np.round(estimated, 4).tolist(), decision,
                     model)


def apply_decision_rule(model: nn.Module, splits: Splits, rule: str) -> dict:
    """Fits the decision rule on the noisy validation split and folds its offsets into the
    model's last bias (so a saved model predicts with them); returns what was decided.

    'auto': for two classes the threshold rule (``decision.choose_threshold``); for more, the
    offsets through T̂ where the validation split has ``MIN_LABELS_PER_ENTRY`` labels per entry
    of T̂ and det T̂ > 0. 'estimated-T': those offsets, always.
    """
    if rule not in DMI_RULES:
        raise ValueError(f"argument 'dmi_rule' must be one of {DMI_RULES}, got {rule!r}")
    scores = torch.log_softmax(predict_logits(model, splits.val.x).double(), dim=1).cpu().numpy()
    noisy = splits.val.y.cpu().numpy()
    if rule == "auto" and scores.shape[1] == 2:
        chosen = choose_threshold(scores, noisy)
        offsets = chosen.offsets
        record = {"rule": "threshold", "applied": bool(chosen.threshold != 0.0),
                  "threshold": round(chosen.threshold, 4), "chosen": chosen.chosen,
                  "change_point": _rounded(chosen.change_point),
                  "mixture": _rounded(chosen.mixture)}
    else:
        decision = choose_offsets(scores, noisy,
                                  min_labels_per_entry=MIN_LABELS_PER_ENTRY if rule == "auto"
                                  else 0, positive_det=rule == "auto")
        offsets = decision.offsets
        record = {"rule": "estimated-T", "applied": bool(decision.applied),
                  "estimated_gain": round(float(decision.gain), 4),
                  "labels_per_entry": round(decision.labels_per_entry, 1),
                  "det_T_hat": round(decision.det_T_hat, 4)}
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.bias += torch.as_tensor(offsets, dtype=last.bias.dtype, device=last.bias.device)
    return {**record, "offsets": np.round(offsets, 4).tolist()}


def _rounded(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 4)


def _fw_transition(model: nn.Module, splits: Splits, how: str) -> np.ndarray:
    if how == "known":
        return splits.transition
    if how not in FW_TRANSITIONS:
        raise ValueError(f"argument 'fw_transition' must be one of {FW_TRANSITIONS}, got {how!r}")
    probs = torch.softmax(predict_logits(model, splits.train.x), dim=1).double().cpu().numpy()
    return anchor_transition(probs, filter_outliers=how == "anchor-filtered")
