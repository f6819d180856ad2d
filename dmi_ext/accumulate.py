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
import numbers
from typing import Callable, Iterable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_tensor
from ._ops import ops
from .functional import DMIInfo, _check_loss_keywords, _explain_dispatch_error


class DMIResult(NamedTuple):
    """What ``DMIAccumulator.loss`` / ``backward`` return: the loss of the whole batch (detached,
    float32, or float64 for float64 logits) and its ``DMIInfo`` (log|det U|, singular)."""

    loss: Tensor
    info: DMIInfo


def should_step(loss: Union[Tensor, float, "DMIResult", Tuple[Tensor, DMIInfo]],
                info: Optional[DMIInfo] = None) -> bool:
    """Whether an optimizer step should follow this batch's backward.

    ``loss`` is the loss tensor (or a float), or a whole ``DMIResult`` / ``(loss, info)`` pair.
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
    if info is None and isinstance(loss, tuple) and len(loss) == 2 \
            and isinstance(loss[1], DMIInfo):
        loss, info = loss  # a DMIResult, or the (loss, info) of return_info=True
    if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
        loss = torch.tensor(float(loss))
    if not isinstance(loss, Tensor):
        raise TypeError(f"dmi_ext: argument 'loss' must be the loss tensor (or a float, or a "
                        f"DMIResult), got {_describe_type(loss)}")
    if loss.numel() == 0:
        raise ValueError(f"dmi_ext: argument 'loss' is empty (shape {tuple(loss.shape)}): there "
                         f"is no loss to decide a step on")
    if info is not None and not isinstance(info, DMIInfo):
        raise TypeError(f"dmi_ext: argument 'info' must be a DMIInfo (from return_info=True or "
                        f"DMIAccumulator), got {type(info).__name__}")
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


def _describe_type(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


_REWORDABLE = (ValueError, TypeError, IndexError, RuntimeError)


def _in_micro_batch(error: BaseException, k: int, where: str = "pass 1") -> BaseException:
    """The error with the micro-batch it came from in its message (plain ValueError, TypeError,
    IndexError and RuntimeError, the types of the op's checks) or in a note (any other type,
    e.g. torch.OutOfMemoryError, whose message is left as it is)."""
    where = f"micro-batch {k} ({where})"
    if f"micro-batch {k}" in str(error):
        return error
    if type(error) in _REWORDABLE:
        message = str(error)
        if message.startswith("dmi_ext: "):
            message = message[len("dmi_ext: "):]
        return type(error)(f"dmi_ext: {where}: {message}").with_traceback(error.__traceback__)
    if hasattr(error, "add_note"):
        error.add_note(f"dmi_ext.DMIAccumulator: raised in {where}")
    return error


def _module_of(forward) -> Optional[nn.Module]:
    """The module whose parameters and buffers a call of ``forward`` touches, where known."""
    if isinstance(forward, nn.Module):
        return forward
    owner = getattr(forward, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _label_masks(targets: List[Tensor], bad) -> List[Tensor]:
    # Meta tensors hold no labels to check; the op raises on their device.
    return [bad(t) if t.device.type != "meta" else torch.zeros((), dtype=torch.bool)
            for t in targets]


def _first_bad(masks: List[Tensor]) -> Optional[int]:
    """The index of the first mask with a True entry, with one host read for all of them."""
    if not masks:
        return None
    devices = {m.device for m in masks}
    if len(devices) == 1:
        flags = torch.stack([m.any() for m in masks]).cpu()
    else:
        flags = torch.tensor([bool(m.any()) for m in masks])
    bad = torch.nonzero(flags)
    return int(bad[0]) if len(bad) else None


def _raise_bad_label(targets: List[Tensor], masks: List[Tensor], k: int, ignore_index: int,
                     bound: str) -> None:
    t = targets[k]
    position = torch.nonzero(masks[k])[0].tolist()
    label = int(t[tuple(position)])
    raise IndexError(f"dmi_ext: micro-batch {k} (pass 1): argument 'target' holds the label "
                     f"{label} at {position}, {bound} and not ignore_index ({ignore_index})")


def _check_targets(targets: List, ignore_index: int, validate: bool) -> int:
    """Types, dtypes, shapes and (with ``validate``) negative labels of every micro-batch's
    target, before any forward; returns the number of matrices."""
    first = None
    for k, t in enumerate(targets):
        where = f"dmi_ext: micro-batch {k} (pass 1): argument 'targets'"
        if not isinstance(t, Tensor):
            raise TypeError(f"{where} must hold tensors of labels, got {_describe_type(t)}")
        try:
            check_tensor("targets", t)
        except TypeError as error:
            raise TypeError(f"{where}: {str(error).split(': ', 1)[1]}") from None
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{where} must hold int64 or int32 class labels, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"{where} has shape {list(t.shape)}: expected (n,), or (M, n) / "
                             f"(B, n) for several matrices")
        if first is None:
            first = t
        elif t.dim() != first.dim() or (t.dim() == 2 and t.shape[0] != first.shape[0]):
            raise ValueError(f"{where} has shape {list(t.shape)}, but micro-batch 0 has "
                             f"{list(first.shape)}: every micro-batch needs the same number of "
                             f"matrices (only the number of rows may differ)")
    if validate:
        masks = _label_masks(targets, lambda t: (t < 0) & (t != ignore_index))
        bad = _first_bad(masks)
        if bad is not None:
            _raise_bad_label(targets, masks, bad, ignore_index, "negative")
    assert first is not None  # targets is not empty (checked with inputs)
    return 1 if first.dim() == 1 else first.shape[0]


def _check_label_bound(targets: List[Tensor], classes: int, ignore_index: int) -> None:
    masks = _label_masks(targets, lambda t: (t >= classes) & (t != ignore_index))
    k = _first_bad(masks)
    if k is not None:
        _raise_bad_label(targets, masks, k, ignore_index, f"outside [0, {classes})")


def _check_grad_loss(grad_loss, reduction_code: int, matrices: int):
    if grad_loss is None:
        if reduction_code == 0:
            raise ValueError(
                "dmi_ext: with reduction='none' the loss has one value per matrix; pass "
                "argument 'grad_loss' (a tensor of that shape), as loss.backward(gradient) "
                "would need")
        return None
    if isinstance(grad_loss, Tensor):
        if not grad_loss.dtype.is_floating_point:
            raise TypeError(f"dmi_ext: argument 'grad_loss' must be a floating-point tensor, "
                            f"got {grad_loss.dtype}")
        numel = grad_loss.numel()
    elif isinstance(grad_loss, numbers.Real) and not isinstance(grad_loss, bool):
        numel = 1
    else:
        raise TypeError(f"dmi_ext: argument 'grad_loss' must be a float or a tensor, got "
                        f"{grad_loss!r} ({type(grad_loss).__name__})")
    expected = matrices if reduction_code == 0 else 1
    if numel != expected:
        raise ValueError(f"dmi_ext: argument 'grad_loss' has {numel} elements, expected "
                         f"{expected} (one per matrix with reduction='none', else one)")
    return grad_loss


class _Snapshot:
    """What a failed ``DMIAccumulator`` call puts back: the generators' states, the module's
    buffers (BatchNorm statistics) and, for ``backward``, the ``.grad`` of its parameters.

    ``.grad`` is not copied: before pass 2 each parameter's ``.grad`` is set aside (a reference)
    and set to None, so pass 2 writes fresh gradients; success adds them onto the set-aside ones
    (one add per parameter that had a gradient), failure puts the references back untouched.
    Buffers are cloned (small next to the parameters for ordinary models)."""

    def __init__(self, forward, inputs, grads: bool):
        module = _module_of(forward)
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(inputs)]
        self.owns_grads = grads and module is not None
        with torch.no_grad():
            self.buffers = ([(b, b.clone()) for b in module.buffers()]
                            if module is not None else [])
        self.leaves: List[Tensor] = []
        if grads and module is not None:
            self.leaves = [p for p in module.parameters() if p.requires_grad]
            self.leaves += [x for x in torch.utils._pytree.tree_leaves(inputs)
                            if isinstance(x, Tensor) and x.requires_grad and x.is_leaf]
        self.saved_grads: Optional[List[Optional[Tensor]]] = None

    def detach_grads(self) -> None:
        self.saved_grads = [p.grad for p in self.leaves]
        for p in self.leaves:
            p.grad = None

    def merge_grads(self) -> None:
        if self.saved_grads is None:
            return
        with torch.no_grad():
            for p, old in zip(self.leaves, self.saved_grads):
                if old is None:
                    continue
                if p.grad is not None:
                    old.add_(p.grad)
                p.grad = old
        self.saved_grads = None

    def restore(self) -> None:
        if self.saved_grads is not None:
            for p, old in zip(self.leaves, self.saved_grads):
                p.grad = old
            self.saved_grads = None
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        torch.set_rng_state(self.cpu_rng)
        for device, state in self.cuda_rng:
            torch.cuda.set_rng_state(state, device)


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
        (self.from_logits, self.normalize, self.eps, self.ignore_index, self.reduction_code,
         self.validate) = _check_loss_keywords(from_logits, normalize, eps, ignore_index,
                                               reduction, validate)
        from .distributed import _check_grad_reduce, _check_process_group_type

        _check_grad_reduce(grad_reduce)
        _check_process_group_type(process_group)
        self.reduction = reduction
        self.process_group = process_group
        self.grad_reduce = grad_reduce
        self.preserve_rng_state = check_bool("preserve_rng_state", preserve_rng_state)
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
        self._failed: Optional[str] = None
        self._group = None
        self._grad_table: Optional[Tensor] = None
        self._result: Optional[DMIResult] = None

    def _mark_failed(self, error: BaseException) -> None:
        if self._failed is None:
            self._failed = f"{type(error).__name__}: {error}"

    def _check_not_failed(self, what: str) -> None:
        if self._failed is not None:
            raise RuntimeError(f"dmi_ext: DMIAccumulator.{what} after a failed call "
                               f"({self._failed}); the accumulated batch is incomplete: call "
                               f"reset() and start again")

    def accumulate(self, input: Tensor, target: Tensor) -> None:
        """Adds one micro-batch's joint sums and kept-row counts (read without a graph).

        A failed check raises at once and marks the batch failed (``finish`` then raises until
        ``reset``); under a process group it is raised by ``finish`` instead, on every rank,
        after the ranks have agreed that one failed."""
        self._check_not_failed("accumulate")
        if self._grad_table is not None:
            raise RuntimeError("dmi_ext: DMIAccumulator.accumulate after finish(); call reset() "
                               "to start a new batch")
        if self._micro_batches == 0:
            self._group = self._process_group()
        k = self._micro_batches
        self._micro_batches += 1
        if self._local_error is not None:
            return  # this rank failed already; finish() raises on every rank
        try:
            self._add(k, input, target)
        except Exception as error:
            named = _in_micro_batch(error, k)
            if self._group is None:
                self._failed = f"{type(named).__name__}: {named}"
                raise named from None
            self._local_error = named

    def _add(self, k: int, input, target) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"dmi_ext: argument 'forward' must return the logits tensor, got "
                            f"{_describe_type(input)}; if your model returns several outputs, "
                            f"pass e.g. lambda x: model(x)[0]")
        input = input.detach()
        with torch.no_grad():
            try:
                sums, counts = ops.joint.default(input, target, self.from_logits,
                                                 self.ignore_index, self.validate)
            except (NotImplementedError, RuntimeError) as error:
                raise _explain_dispatch_error(error, ("input", input),
                                              ("target", target)) from None
        if self._sums is None:
            self._sums, self._counts, self._dtype = sums, counts, input.dtype
            return
        if sums.shape != self._sums.shape:
            raise ValueError(
                f"dmi_ext: micro-batch {k} (input shape {tuple(input.shape)}, target shape "
                f"{tuple(target.shape)}) has joint matrices of shape {tuple(sums.shape)}, but "
                f"the earlier micro-batches have {tuple(self._sums.shape)}: every micro-batch "
                f"needs the same number of matrices and classes")
        self._sums = self._sums + sums  # never in place: the first sums are the op's output
        self._counts = self._counts + counts

    def finish(self) -> DMIResult:
        """The loss of everything accumulated (summed over the ranks, if any) and its info; keeps
        the grad table for ``input_grad``. Raises if a call or a micro-batch failed."""
        self._check_not_failed("finish")
        if self._result is not None:
            return self._result
        try:
            return self._finish()
        except Exception as error:
            self._failed = f"{type(error).__name__}: {error}"
            raise

    def _finish(self) -> DMIResult:
        if self._micro_batches == 0 and self._local_error is None:
            error = ValueError("dmi_ext: DMIAccumulator.finish with no micro-batch accumulated "
                               "(argument 'inputs' was empty?)")
            if self._group is None:
                raise error
            self._local_error = error
        sums, counts = self._sums, self._counts
        if self._group is not None:
            from .distributed import _sum_over_ranks

            sums, counts = _sum_over_ranks(
                None if self._local_error is not None else sums, counts, self._local_error,
                self._group)
        elif self._local_error is not None:
            raise self._local_error
        from .distributed import _loss_dtype, _reduced

        loss, logabsdet, singular, grad_table = ops.lu_loss.default(
            sums, counts, self.normalize, self.eps)
        assert self._dtype is not None  # set by the first micro-batch, or an error was raised
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
        self._check_not_failed("input_grad")
        if self._grad_table is None:
            raise RuntimeError("dmi_ext: DMIAccumulator.input_grad before finish()")
        assert self._result is not None  # set together with the grad table
        matrices = self._result.info.singular.numel()
        upstream = self._upstream(_check_grad_loss(grad_loss, self.reduction_code, matrices),
                                  input.device)
        with torch.no_grad():
            return ops.dmi_backward.default(upstream, input.detach(), target, self._grad_table,
                                            self.from_logits, self.ignore_index,
                                            self.reduction_code)

    # ---- both passes --------------------------------------------------------------------------

    def loss(self, forward: Callable, inputs: Iterable, targets: Iterable) -> DMIResult:
        """Pass 1 only: the loss of the whole batch, without a graph (e.g. for validation).

        Every check that needs no forward runs before the first one; a failed call leaves the
        model's buffers (BatchNorm statistics) and the generators as it found them."""
        self.reset()
        inputs, targets = list(inputs), list(targets)
        snapshot = _Snapshot(forward, inputs, grads=False)
        try:
            self._first_pass(forward, inputs, targets, record_rng=False, backward=False)
            return self.finish()
        except BaseException as error:
            snapshot.restore()
            self._mark_failed(error)
            raise

    def backward(self, forward: Callable, inputs: Iterable, targets: Iterable, *,
                 grad_loss: Union[None, float, Tensor] = None) -> DMIResult:
        """Both passes: returns the loss of the whole batch and accumulates its exact gradient
        into the parameters' ``.grad`` (as ``loss.backward()`` would; ``grad_loss`` as in
        ``loss.backward(gradient)``, e.g. ``scaler.get_scale()`` under a ``GradScaler``).

        Transactional when ``forward`` is an ``nn.Module`` (or a bound method of one): every
        check that needs no forward runs before the first one, and a call that fails at any
        point (a bad micro-batch, an out-of-memory error or an interrupt in either pass) leaves
        ``.grad``, the model's buffers (BatchNorm statistics) and the generators as it found
        them. With another callable the parameters are unknown: an error in pass 2 says so."""
        self.reset()
        inputs, targets = list(inputs), list(targets)
        snapshot = _Snapshot(forward, inputs, grads=True)
        try:
            states = self._first_pass(forward, inputs, targets,
                                      record_rng=self.preserve_rng_state, backward=True,
                                      grad_loss=grad_loss)
            result = self.finish()
            if bool(result.info.singular.all()):
                return result  # the gradient is exactly 0 (and the same on every rank)
            snapshot.detach_grads()
            self._second_pass(forward, inputs, targets, states, grad_loss, snapshot)
        except BaseException as error:
            snapshot.restore()
            self._mark_failed(error)
            raise
        snapshot.merge_grads()
        return result

    def _second_pass(self, forward, inputs, targets, states, grad_loss, snapshot) -> None:
        no_sync = getattr(forward, "no_sync", None)
        last = len(inputs) - 1
        for k, (item, target) in enumerate(zip(inputs, targets)):
            sync = no_sync() if no_sync is not None and k < last else contextlib.nullcontext()
            replay = states[k].replay() if states else contextlib.nullcontext()
            try:
                with sync:
                    with replay:
                        logits = forward(item)
                    if not isinstance(logits, Tensor) or not logits.requires_grad:
                        raise RuntimeError(
                            f"dmi_ext: argument 'forward' returned logits that do not require "
                            f"grad in pass 2 ({_describe_type(logits)}): a frozen model, or "
                            f"a forward that detaches its output")
                    logits.backward(self.input_grad(logits, target, grad_loss))
            except Exception as error:
                named = _in_micro_batch(error, k, "pass 2")
                if not snapshot.owns_grads and k > 0 and hasattr(named, "add_note"):
                    named.add_note(
                        f"dmi_ext: the gradients of micro-batches 0 to {k - 1} were already "
                        f"added to .grad ('forward' is not an nn.Module, so its parameters are "
                        f"unknown to DMIAccumulator): zero them before retrying")
                raise named from None

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
            grad_loss = 1.0
        # float64, so that a multiplier like 3 adds no rounding (as in dmi_ext.distributed).
        upstream = torch.as_tensor(grad_loss, dtype=torch.float64, device=device)
        if self._group is not None and self.grad_reduce == "mean":
            from .distributed import _grad_multiplier

            upstream = upstream * _grad_multiplier(self._group, self.grad_reduce)
        return upstream

    def _check_call(self, forward, inputs, targets, backward: bool, grad_loss) -> None:
        """Everything that can be checked before the first forward."""
        if not callable(forward):
            raise TypeError(f"dmi_ext: argument 'forward' must be callable (the model), got "
                            f"{_describe_type(forward)}")
        if len(inputs) != len(targets):
            raise ValueError(f"dmi_ext: arguments 'inputs' and 'targets' must hold the same "
                             f"number of micro-batches, got {len(inputs)} and {len(targets)}")
        if not inputs:
            raise ValueError("dmi_ext: argument 'inputs' holds no micro-batch")
        matrices = _check_targets(targets, self.ignore_index, self.validate)
        if not backward:
            return
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError("dmi_ext: DMIAccumulator.backward needs gradients, but it was "
                               "called under torch.no_grad() or torch.inference_mode(); use "
                               "DMIAccumulator.loss for a loss without gradients")
        _check_grad_loss(grad_loss, self.reduction_code, matrices)
        module = _module_of(forward)
        if module is not None and not any(p.requires_grad for p in module.parameters()) \
                and not any(isinstance(x, Tensor) and x.requires_grad for x in
                            torch.utils._pytree.tree_leaves(inputs)):
            raise ValueError(f"dmi_ext: argument 'forward' ({type(module).__name__}) has no "
                             f"parameter that requires grad, and no input requires grad: "
                             f"there is no gradient to accumulate (a frozen model?)")

    def _first_pass(self, forward, inputs, targets, record_rng: bool, backward: bool,
                    grad_loss=None) -> List[_RNGState]:
        states = []
        self._group = self._process_group()
        try:
            self._check_call(forward, inputs, targets, backward, grad_loss)
        except Exception as error:
            if self._group is None:
                raise
            self._local_error = error  # raised by finish() on every rank
            return states
        with torch.no_grad():
            for k, (item, target) in enumerate(zip(inputs, targets)):
                if record_rng:
                    states.append(_RNGState(item))
                try:
                    logits = forward(item)
                    if k == 0 and self.validate and isinstance(logits, Tensor) \
                            and logits.dim() >= 1:
                        # The labels' upper bound needs C: check every micro-batch now, before
                        # the other forwards.
                        _check_label_bound(targets, logits.shape[-1], self.ignore_index)
                except Exception as error:
                    named = _in_micro_batch(error, k)
                    if self._group is None:
                        raise named from None
                    self._local_error = named
                    return states
                self.accumulate(logits, target)
                if self._local_error is not None:
                    return states
        return states
