"""Type checks of the keyword arguments of the public API, shared by every entry point.

Python would coerce silently (``float('0.1')``, ``True`` as 1, ``None`` as false), and the op's
schema accepts a bool where it wants an int: each keyword takes its documented type and anything
else is a TypeError naming it, raised before any work.
"""

import numbers

import numpy as np
import torch
from torch import Tensor


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


# Each check starts with an exact-type test: these run on every loss call, and the generic
# isinstance tests below cost several times more.


def check_bool(name: str, value) -> bool:
    if value is True or value is False:
        return value
    # numpy.bool_ is not a bool subclass; accept it, it cannot be mistaken for anything else.
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"dmi_ext: argument '{name}' must be a bool, got {_describe(value)}")


def check_int(name: str, value) -> int:
    if type(value) is int:
        return value
    # A bool is an int to Python but never what a caller meant for a label or a size.
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    raise TypeError(f"dmi_ext: argument '{name}' must be an int, got {_describe(value)}")


def check_float(name: str, value) -> float:
    if type(value) is float:
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_, Tensor)):
        return float(value)
    raise TypeError(f"dmi_ext: argument '{name}' must be a float, got {_describe(value)}")


def check_str(name: str, value) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"dmi_ext: argument '{name}' must be a str, got {_describe(value)}")


def check_eps(eps) -> float:
    eps = check_float("eps", eps)
    if not 0.0 <= eps < float("inf"):
        raise ValueError(f"dmi_ext: argument 'eps' must be finite and >= 0, got {eps!r}")
    return eps


def check_tensor(name: str, value) -> Tensor:
    """A dense, strided, unquantized tensor: the only layout the op's kernels read."""
    if not isinstance(value, Tensor):
        raise TypeError(f"dmi_ext: argument '{name}' must be a torch.Tensor, got "
                        f"{type(value).__name__}")
    if value.is_nested:
        raise TypeError(f"dmi_ext: argument '{name}' is a nested tensor; pass a dense tensor "
                        f"(e.g. one call per component, or torch.nested.to_padded_tensor with "
                        f"ignore_index labels for the padding)")
    if value.layout != torch.strided:
        raise TypeError(f"dmi_ext: argument '{name}' has layout {value.layout}; only dense "
                        f"(torch.strided) tensors are supported: call .to_dense() first")
    if value.is_quantized:
        raise TypeError(f"dmi_ext: argument '{name}' is quantized ({value.dtype}); pass a "
                        f"floating-point tensor (e.g. .dequantize())")
    return value
