"""``DMILoss``: the ``nn.Module`` form of ``dmi_loss``, shaped like ``nn.CrossEntropyLoss``."""

from torch import Tensor, nn

from .functional import _reduction_code, dmi_loss


class DMILoss(nn.Module):
    """L_DMI as a module: ``DMILoss()(logits, labels)``. Keywords as in ``dmi_ext.dmi_loss``."""

    def __init__(self, *, from_logits: bool = True, normalize: bool = True, eps: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", validate: bool = True):
        super().__init__()
        _reduction_code(reduction)  # fail at construction, not at the first batch
        if not eps >= 0.0:
            raise ValueError(f"dmi_ext: argument 'eps' must be finite and >= 0, got {eps!r}")
        self.from_logits = from_logits
        self.normalize = normalize
        self.eps = float(eps)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.validate = validate

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return dmi_loss(input, target, from_logits=self.from_logits, normalize=self.normalize,
                        eps=self.eps, ignore_index=self.ignore_index, reduction=self.reduction,
                        validate=self.validate)

    def extra_repr(self) -> str:
        return (f"from_logits={self.from_logits}, normalize={self.normalize}, eps={self.eps}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
