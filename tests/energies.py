"""Small energy models for tests: closed-form gradients and a second architecture."""

import torch
from torch import nn


class Quadratic(nn.Module):
    """f(x) = -a/2 ||x - mu||^2 per sample, so g = grad_x sum(-f) = a (x - mu) exactly."""

    def __init__(self, mu: torch.Tensor, a: float):
        super().__init__()
        self.mu = nn.Parameter(mu.clone())
        self.a = a

    def forward(self, x):
        return -0.5 * self.a * ((x - self.mu) ** 2).flatten(1).sum(1)


class MLPEnergy(nn.Module):
    """A second architecture on flat vectors: Linear-SiLU-Linear-SiLU-Linear, with dropout and batch norm so
    that eval mode matters."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.SiLU(),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)
