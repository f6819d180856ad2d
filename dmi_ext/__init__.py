"""dmi_ext: a fast, exact and safe L_DMI loss for PyTorch.

L_DMI = -log|det U|, U the joint matrix of a classifier's predictions and (noisy) labels, is
robust to any invertible label-noise transition (Xu et al., NeurIPS 2019). This package computes
it with one fused C++/CUDA op: softmax and the joint-matrix accumulation in one pass, a float64
LU for log|det U|, and a handwritten backward. ``dmi_ext.reference`` is the same maths in plain
torch, for tests. ``dmi_ext.distributed`` (the loss over the global batch of a data-parallel job)
is imported on first use, so that importing dmi_ext never needs torch.distributed.
"""

from . import reference
from ._ops import FUSED_MAX_CLASSES, WITH_CUDA
from .functional import DMIInfo, dmi_loss, joint_matrix
from .loss import DMILoss
from .accumulate import DMIAccumulator, DMIResult, should_step
from .sampler import ClassCoveringBatchSampler

__all__ = ["dmi_loss", "joint_matrix", "DMILoss", "DMIInfo", "reference", "FUSED_MAX_CLASSES",
           "WITH_CUDA"]
__all__ += ["DMIAccumulator", "DMIResult", "should_step"]
__all__ += ["ClassCoveringBatchSampler"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
