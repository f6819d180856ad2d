"""``DMILoss``: the ``nn.Module`` form of ``dmi_loss``, shaped like ``nn.CrossEntropyLoss``.

The module is scriptable (``torch.jit.script(DMILoss())``): the scripted forward calls the
registered op directly with the keywords checked once at construction.
"""

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_eps, check_int
from .functional import _reduction_code, dmi_loss


class DMILoss(nn.Module):
    """L_DMI as a module: ``DMILoss()(logits, labels)``. Keywords as in ``dmi_ext.dmi_loss``."""

    from_logits: bool
    normalize: bool
    eps: float
    ignore_index: int
    reduction: str
    validate: bool
    reduction_code: int

    def __init__(self, *, from_logits: bool = True, normalize: bool = True, eps: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", validate: bool = True):
        super().__init__()
        # Checked here, so that a bad keyword fails at construction, not at the first batch.
        self.from_logits = check_bool("from_logits", from_logits)
        self.normalize = check_bool("normalize", normalize)
        self.eps = check_eps(eps)
        self.ignore_index = check_int("ignore_index", ignore_index)
        self.reduction_code = _reduction_code(reduction)
        self.reduction = reduction
        self.validate = check_bool("validate", validate)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return torch.ops.dmi_ext.dmi(input, target, self.from_logits, self.normalize,
                                         self.eps, self.ignore_index, self.reduction_code,
                                         self.validate, False)[0]
        return dmi_loss(input, target, from_logits=self.from_logits, normalize=self.normalize,
                        eps=self.eps, ignore_index=self.ignore_index, reduction=self.reduction,
                        validate=self.validate)

    def extra_repr(self) -> str:
        return (f"from_logits={self.from_logits}, normalize={self.normalize}, eps={self.eps}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
