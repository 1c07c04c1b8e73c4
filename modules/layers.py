"""The small trainable pieces T2L adds to CLIP: the adapter, and stochastic depth for residual branches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Adapter(nn.Module):
    """Bottleneck adapter: ``up(GELU(down(x)))``, added to the residual stream by the caller.

    ``up`` starts at zero so that at initialisation the adapter changes nothing and T2L equals CLIP.
    The published checkpoints call ``down``/``up`` ``D_fc1``/``D_fc2``.
    """

    def __init__(self, width: int, ratio: float = 0.25):
        super().__init__()
        hidden = int(width * ratio)
        if hidden < 1:
            raise ValueError(f"adapter ratio {ratio} leaves no hidden units for width {width}")
        self.down = nn.Linear(width, hidden)
        self.up = nn.Linear(hidden, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))  # exact (erf) GELU, as published


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole branch for a random subset of the samples (dim 0), rescale the rest."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep
