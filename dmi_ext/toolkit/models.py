"""The networks the toolkit trains: a small MLP (default) and a small CNN for image-shaped data.

Both map a batch of samples to C logits; neither has dropout or batch statistics, so a forward
pass uses no randomness and train and eval mode agree (which keeps seeded runs reproducible and
the validation criterion comparable across epochs).
"""

import math
from typing import Sequence

import torch
from torch import nn

MODELS = ("mlp", "cnn")


class MLP(nn.Sequential):
    """Flatten, then ``layers`` hidden ReLU layers of ``hidden`` units, then C logits."""

    def __init__(self, sample_shape: Sequence[int], num_classes: int, hidden: int = 256,
                 layers: int = 2):
        if layers < 1:
            raise ValueError(f"argument 'layers' must be >= 1, got {layers}")
        widths = [math.prod(sample_shape)] + [hidden] * layers
        body = []
        for width_in, width_out in zip(widths, widths[1:]):
            body += [nn.Linear(width_in, width_out), nn.ReLU()]
        super().__init__(nn.Flatten(), *body, nn.Linear(hidden, num_classes))


class SmallCNN(nn.Sequential):
    """Two 3 x 3 convolutions, one 2 x 2 max-pool, a hidden layer of ``hidden`` units, C logits.

    Takes (N, H, W) or (N, channels, H, W) samples; H and W must be at least 2.
    """

    def __init__(self, sample_shape: Sequence[int], num_classes: int, hidden: int = 256):
        if len(sample_shape) not in (2, 3) or min(sample_shape[-2:]) < 2:
            raise ValueError(f"model 'cnn' needs image-shaped samples (H, W) or (channels, H, W), "
                             f"got sample shape {tuple(sample_shape)}; use --model mlp")
        channels = 1 if len(sample_shape) == 2 else sample_shape[0]
        height, width = sample_shape[-2:]
        layers = [nn.Unflatten(1, (1, height))] if len(sample_shape) == 2 else []  # add a channel
        super().__init__(
            *layers,
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (height // 2) * (width // 2), hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )


def build_model(name: str, sample_shape: Sequence[int], num_classes: int,
                hidden: int = 256, layers: int = 2) -> nn.Module:
    """``layers`` counts the MLP's hidden layers (the CNN's layout is fixed)."""
    if name == "mlp":
        return MLP(sample_shape, num_classes, hidden, layers)
    if name == "cnn":
        return SmallCNN(sample_shape, num_classes, hidden)
    raise ValueError(f"argument 'model' must be one of {MODELS}, got {name!r}")


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """Logits for all of x, without gradients, in chunks so that big data fits in memory."""
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(batch_size)])
