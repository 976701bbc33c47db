"""Energy models.

Sign convention (the seed tutorial's): a model returns ``f(x) = -E(x)``, one score per sample.
High score = low energy = likely under the model. Samplers therefore descend ``E``, i.e. they
follow ``+grad f``; the gradient they clip and step along is ``g = grad_x sum(-f(x))``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Swish", "CNNModel"]


class Swish(nn.Module):
    """Swish(x) = x * sigmoid(x): smooth, so input gradients are not sparse (unlike ReLU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


class CNNModel(nn.Module):
    """The seed's small CNN scoring 1x28x28 images in [-1, 1]; returns f(x) = -E(x), shape (N,).

    With ``hidden_features=32`` it has 76,993 parameters. The first convolution pads by 4 so the
    28x28 input behaves like a 32x32 one: 16x16 -> 8x8 -> 4x4 -> 2x2 feature maps.
    """

    def __init__(self, hidden_features: int = 32, out_dim: int = 1, in_channels: int = 1) -> None:
        super().__init__()
        if hidden_features < 2 or hidden_features % 2:
            raise ValueError(f"hidden_features must be an even integer >= 2, got {hidden_features!r}")
        if out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim!r}")
        c1, c2, c3 = hidden_features // 2, hidden_features, hidden_features * 2
        self.hidden_features = hidden_features
        self.out_dim = out_dim
        self.in_channels = in_channels
        self.cnn_layers = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5, stride=2, padding=4),  # 16x16
            Swish(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),  # 8x8
            Swish(),
            nn.Conv2d(c2, c3, kernel_size=3, stride=2, padding=1),  # 4x4
            Swish(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),  # 2x2
            Swish(),
            nn.Flatten(),
            nn.Linear(c3 * 4, c3),
            Swish(),
            nn.Linear(c3, out_dim),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"CNNModel expects images of shape (N, {self.in_channels}, 28, 28), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"CNNModel expects a floating-point tensor, got dtype {x.dtype}")
        return self.cnn_layers(x).squeeze(dim=-1)
