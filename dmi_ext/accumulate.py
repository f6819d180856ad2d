"""The exact L_DMI of a batch too large for one graph, from micro-batches, and when to step.

L_DMI is a function of the joint matrix U, a sum over rows, and the gradient of a row needs only
the inverse of the whole batch's U. So a large ("virtual") batch can be done in two passes
with the memory of one micro-batch's graph: pass 1 runs the model on every micro-batch without a
graph and sums their joint matrices (``torch.ops.dmi_ext.joint``); the loss and the grad table of
the whole batch come from ``torch.ops.dmi_ext.lu_loss``; pass 2 runs each micro-batch again with
a graph and back-propagates its rows of the exact gradient (``torch.ops.dmi_ext.dmi_backward``
with the whole batch's table). Random layers replay the randomness of pass 1 (the CPU and CUDA
generator states are saved per micro-batch and restored, as ``torch.utils.checkpoint`` does).
Under an initialised process group the summed U is also summed over the ranks with the one
all-reduce of ``dmi_ext.distributed`` (ranks x micro-batches), with the same gradient scale.

``should_step`` says whether a batch's loss carries a gradient worth an optimizer step (not when
U is singular: loss +inf or -log eps, gradient 0, and a step would only replay momentum).
"""

import contextlib
from typing import Callable, Iterable, List, NamedTuple, Optional, Union

import torch
from torch import Tensor

from ._ops import ops
from .functional import DMIInfo, _reduction_code


class DMIResult(NamedTuple):
    """What ``DMIAccumulator.loss`` / ``backward`` return: the loss of the whole batch (detached,
    float32, or float64 for float64 logits) and its ``DMIInfo`` (log|det U|, singular)."""

    loss: Tensor
    info: DMIInfo


def should_step(loss: Tensor, info: Optional[DMIInfo] = None) -> bool:
    """Whether an optimizer step should follow this batch's backward.

    False when the loss is not finite (+inf: U singular with eps = 0; NaN: non-finite input), or
    when ``info`` (from ``return_info=True`` or ``DMIAccumulator``) flags any matrix as singular
    (with eps > 0 the loss is a finite -log(eps), but the gradient is still 0). Skipping matters
    because a zero gradient is not a no-op for the optimizer: momentum, Adam's moments and weight
    decay still move the weights. One host sync (a GPU -> CPU read) per call.

    Check it before ``backward`` and skip the optimizer step and, with a ``GradScaler``, its
    ``step`` and ``update`` too (``update`` needs a preceding ``step``)::

        loss, info = dmi_ext.dmi_loss(logits, labels, return_info=True)
        if dmi_ext.should_step(loss, info):
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    With several matrices (B or M shapes) one singular matrix skips the whole batch; to train on
    the others, use ``reduction="none"`` and back-propagate ``loss[~info.singular].sum()``.
    """
    if info is not None and bool(info.singular.any()):
        return False
    return bool(torch.isfinite(loss).all())


def _cuda_devices(item) -> List[int]:
    """The CUDA devices whose generators a forward on ``item`` may draw from: those of its CUDA
    tensors (as ``torch.utils.checkpoint`` records) and the current device, where CUDA is
    initialised (a model on the GPU fed CPU tensors)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    leaves = torch.utils._pytree.tree_leaves(item)
    devices = {t.get_device() for t in leaves if isinstance(t, Tensor) and t.is_cuda}
    devices.add(torch.cuda.current_device())
    return sorted(devices)


class _RNGState:
    """The generator states at the start of one micro-batch's forward, to replay it."""

    def __init__(self, item):
        self.cpu = torch.get_rng_state()
        self.devices = _cuda_devices(item)
        self.device_states = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replay(self):
        # fork_rng puts the surrounding states back afterwards: the caller's generators advance
        # once for the whole backward, as they would for one forward.
        with torch.random.fork_rng(devices=self.devices, device_type="cuda"):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.device_states):
                torch.cuda.set_rng_state(state, device)
            yield


class DMIAccumulator:
    """L_DMI of a large batch from micro-batches: the exact loss and gradient, bounded memory.

    One call does both passes::

        acc = dmi_ext.DMIAccumulator()
        loss, info = acc.backward(model, x.split(256), y.split(256))  # parameter .grad += dL/dθ
        if dmi_ext.should_step(loss, info):
            optimizer.step()
        optimizer.zero_grad()

    ``loss`` is L_DMI of the concatenated batch and the parameter gradients are exactly those of
    ``dmi_ext.dmi_loss(torch.cat([model(x_k) for x_k in ...]), y).backward()`` (to rounding),
    while only one micro-batch's graph exists at a time. The cost is a second forward of every
    micro-batch. A runnable example::

        >>> import torch, dmi_ext
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(),
        ...                             torch.nn.Dropout(0.1), torch.nn.Linear(64, 100))
        >>> x, y = torch.randn(4096, 20), torch.arange(4096) % 100   # 100 classes
        >>> acc = dmi_ext.DMIAccumulator()
        >>> loss, info = acc.backward(model, x.split(512), y.split(512))
        >>> bool(info.singular), model[0].weight.grad.shape
        (False, torch.Size([64, 20]))

    Keywords: those of ``dmi_ext.dmi_loss`` (``from_logits``, ``normalize``, ``eps``,
    ``ignore_index``, ``reduction``, ``validate``), and:

    - ``process_group``, ``grad_reduce``: as in ``dmi_ext.distributed.dmi_loss``. With an
      initialised process group (the default group, or the one given) of several processes,
      the summed U is all-reduced over its ranks between the two passes: the loss is that of all
      ranks' micro-batches together, and each rank's gradient is scaled for DDP's average
      (``"mean"``) or left as its share (``"sum"``). Every rank must call, with the same number
      of matrices and classes (the number of micro-batches and rows may differ).
    - ``preserve_rng_state`` (default True): replay each micro-batch's CPU and CUDA generator
      states in pass 2, so that dropout draws the same masks as in pass 1. Without it, a model
      with random layers gets a gradient that is not that of the loss.

    Micro-batches: ``inputs`` and ``targets`` are equal-length iterables (lists, tuples,
    ``tensor.split(k)``); both are read twice, so generators are materialised into lists (the
    inputs are kept, the activations are not). Each input item is passed as ``forward(item)``
    (use a lambda for several arguments). Logits are (n_k, C), or (B, n_k, C) with (B, n_k)
    targets; with M label sources, targets are (M, n_k), e.g. ``y.split(k, dim=1)``.

    The model's forward must be a deterministic function of its input, parameters and generator
    states (true of ordinary layers and dropout). BatchNorm in training mode normalises each
    micro-batch by its own statistics (the gradient is exact for that model) and updates its
    running statistics in both passes, as under ``torch.utils.checkpoint``. When ``forward`` has
    a ``no_sync`` method (``DistributedDataParallel``, FSDP), every micro-batch but the last runs
    under it, so gradients are all-reduced once. With every matrix singular the gradient is 0:
    pass 2 is skipped and no ``.grad`` is touched.

    The low-level steps, for loops of your own: ``reset()``, ``accumulate(logits, target)`` per
    micro-batch (no graph needed), ``finish()`` -> ``DMIResult``, then ``input_grad(logits,
    target)`` per micro-batch: that micro-batch's rows of the gradient, for
    ``logits.backward(grad)``.
    """

    def __init__(self, *, from_logits: bool = True, normalize: bool = True, eps: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", validate: bool = True,
                 process_group=None, grad_reduce: str = "mean", preserve_rng_state: bool = True):
        eps = float(eps)
        if not 0.0 <= eps < float("inf"):
            raise ValueError(f"dmi_ext: argument 'eps' must be finite and >= 0, got {eps}")
        self.reduction_code = _reduction_code(reduction)
        from .distributed import _check_grad_reduce

        _check_grad_reduce(grad_reduce)
        self.from_logits = from_logits
        self.normalize = normalize
        self.eps = eps
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.validate = validate
        self.process_group = process_group
        self.grad_reduce = grad_reduce
        self.preserve_rng_state = preserve_rng_state
        self.reset()

    def __repr__(self) -> str:
        return (f"DMIAccumulator(from_logits={self.from_logits}, normalize={self.normalize}, "
                f"eps={self.eps}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, grad_reduce={self.grad_reduce!r})")

    # ---- the low-level steps ------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the accumulated batch (``loss`` and ``backward`` call it first)."""
        self._sums: Optional[Tensor] = None
        self._counts: Optional[Tensor] = None
        self._dtype: Optional[torch.dtype] = None
        self._micro_batches = 0
        self._local_error: Optional[BaseException] = None
        self._group = None
        self._grad_table: Optional[Tensor] = None
        self._result: Optional[DMIResult] = None

    def accumulate(self, input: Tensor, target: Tensor) -> None:
        """Adds one micro-batch's joint sums and kept-row counts (read without a graph)."""
        if self._grad_table is not None:
            raise RuntimeError("dmi_ext: DMIAccumulator.accumulate after finish(); call reset() "
                               "to start a new batch")
        if self._micro_batches == 0:
            self._group = self._process_group()
        input = input.detach()
        with torch.no_grad():
            if self._group is None:
                sums, counts = ops.joint.default(input, target, self.from_logits,
                                                 self.ignore_index, self.validate)
            else:
                # A failed check is raised after the all-reduce in finish(), so that the other
                # ranks fail too instead of hanging.
                from .distributed import _local_joint

                sums, counts, error = _local_joint(input, target, self.from_logits,
                                                   self.ignore_index, self.validate)
                if error is not None and self._local_error is None:
                    self._local_error = error
        if self._sums is None:
            self._sums, self._counts, self._dtype = sums, counts, input.dtype
        else:
            if sums.shape != self._sums.shape:
                raise ValueError(
                    f"dmi_ext: micro-batch {self._micro_batches} (input shape "
                    f"{tuple(input.shape)}, target shape {tuple(target.shape)}) has joint "
                    f"matrices of shape {tuple(sums.shape)}, but the earlier micro-batches "
                    f"have {tuple(self._sums.shape)}: every micro-batch needs the same number of "
                    f"matrices and classes")
            self._sums = self._sums + sums  # never in place: the first sums are the op's output
            self._counts = self._counts + counts
        self._micro_batches += 1

    def finish(self) -> DMIResult:
        """The loss of everything accumulated (summed over the ranks, if any) and its info; keeps
        the grad table for ``input_grad``."""
        if self._result is not None:
            return self._result
        if self._micro_batches == 0:
            raise ValueError("dmi_ext: DMIAccumulator.finish with no micro-batch accumulated "
                             "(argument 'inputs' was empty?)")
        sums, counts = self._sums, self._counts
        if self._group is not None:
            from .distributed import _sum_over_ranks

            sums, counts = _sum_over_ranks(sums, counts, self._local_error, self._group,
                                           self.validate)
        from .distributed import _loss_dtype, _reduced

        loss, logabsdet, singular, grad_table = ops.lu_loss.default(
            sums, counts, self.normalize, self.eps)
        dtype = _loss_dtype(self._dtype)
        self._grad_table = grad_table
        self._result = DMIResult(_reduced(loss, self.reduction_code, dtype),
                                 DMIInfo(logabsdet.to(dtype), singular))
        return self._result

    def input_grad(self, input: Tensor, target: Tensor,
                   grad_loss: Union[None, float, Tensor] = None) -> Tensor:
        """This micro-batch's rows of the gradient of the whole batch's loss (after ``finish``),
        in the dtype of ``input``; times ``grad_loss`` (the upstream gradient of the loss, 1 by
        default; a (G,) tensor with ``reduction="none"``) and, under a process group with
        ``grad_reduce="mean"``, times the world size."""
        if self._grad_table is None:
            raise RuntimeError("dmi_ext: DMIAccumulator.input_grad before finish()")
        upstream = self._upstream(grad_loss, input.device)
        with torch.no_grad():
            return ops.dmi_backward.default(upstream, input.detach(), target, self._grad_table,
                                            self.from_logits, self.ignore_index,
                                            self.reduction_code)

    # ---- both passes --------------------------------------------------------------------------

    def loss(self, forward: Callable, inputs: Iterable, targets: Iterable) -> DMIResult:
        """Pass 1 only: the loss of the whole batch, without a graph (e.g. for validation)."""
        inputs, targets = self._micro_batch_lists(inputs, targets)
        self._first_pass(forward, inputs, targets, record_rng=False)
        return self.finish()

    def backward(self, forward: Callable, inputs: Iterable, targets: Iterable, *,
                 grad_loss: Union[None, float, Tensor] = None) -> DMIResult:
        """Both passes: returns the loss of the whole batch and accumulates its exact gradient
        into the parameters' ``.grad`` (as ``loss.backward()`` would; ``grad_loss`` as in
        ``loss.backward(gradient)``, e.g. ``scaler.get_scale()`` under a ``GradScaler``)."""
        inputs, targets = self._micro_batch_lists(inputs, targets)
        states = self._first_pass(forward, inputs, targets, record_rng=self.preserve_rng_state)
        result = self.finish()
        if bool(result.info.singular.all()):
            return result  # the gradient is exactly 0 (and the same on every rank)
        no_sync = getattr(forward, "no_sync", None)
        last = len(inputs) - 1
        for k, (item, target) in enumerate(zip(inputs, targets)):
            sync = no_sync() if no_sync is not None and k < last else contextlib.nullcontext()
            replay = states[k].replay() if states else contextlib.nullcontext()
            with sync:
                with replay:
                    logits = forward(item)
                logits.backward(self.input_grad(logits, target, grad_loss))
        return result

    # ---- helpers ------------------------------------------------------------------------------

    def _process_group(self):
        """The group to sum U over, or None (no process group, or a group of one process)."""
        if self.process_group is None and not (torch.distributed.is_available()
                                               and torch.distributed.is_initialized()):
            return None
        from .distributed import _reduction_group

        return _reduction_group(self.process_group)

    def _upstream(self, grad_loss, device) -> Tensor:
        if grad_loss is None:
            if self.reduction_code == 0:
                raise ValueError(
                    "dmi_ext: with reduction='none' the loss has one value per matrix; pass "
                    "argument 'grad_loss' (a tensor of that shape), as loss.backward(gradient) "
                    "would need")
            grad_loss = 1.0
        # float64, so that a multiplier like 3 adds no rounding (as in dmi_ext.distributed).
        upstream = torch.as_tensor(grad_loss, dtype=torch.float64, device=device)
        if self._group is not None and self.grad_reduce == "mean":
            from .distributed import _grad_multiplier

            upstream = upstream * _grad_multiplier(self._group, self.grad_reduce)
        return upstream

    @staticmethod
    def _micro_batch_lists(inputs, targets):
        inputs, targets = list(inputs), list(targets)
        if len(inputs) != len(targets):
            raise ValueError(f"dmi_ext: arguments 'inputs' and 'targets' must hold the same "
                             f"number of micro-batches, got {len(inputs)} and {len(targets)}")
        return inputs, targets

    def _first_pass(self, forward, inputs, targets, record_rng: bool) -> List[_RNGState]:
        if not inputs:
            raise ValueError("dmi_ext: argument 'inputs' holds no micro-batch")
        self.reset()
        states = []
        with torch.no_grad():
            for item, target in zip(inputs, targets):
                if record_rng:
                    states.append(_RNGState(item))
                self.accumulate(forward(item), target)
        return states
