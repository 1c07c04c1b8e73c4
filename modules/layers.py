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


DROP_PATH_MODES = ("positions", "samples")


def drop_path(x: torch.Tensor, rate: float, training: bool, mode: str = "samples") -> torch.Tensor:
    """Stochastic depth on a residual branch x (B, N, ...), the kept values rescaled by 1 / (1 - rate).

    mode "samples": the whole branch is dropped for a random subset of the samples (dim 0), the usual stochastic
    depth. mode "positions": a random subset of the token positions (dim 1) is dropped for every sample at once:
    what the published T2L code does, because it applies timm's per-sample rule to a sequence-first tensor.
    """
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    if mode == "samples":
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    elif mode == "positions":
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    else:
        raise ValueError(f"drop path mode must be one of {DROP_PATH_MODES}, got {mode!r}")
    mask = x.new_empty(shape).bernoulli_(keep)
    return x * mask / keep
