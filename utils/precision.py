"""The optimiser step of "pure fp16" training (``solver.precision: fp16-pure``), as the published T2L code does it.

The published loop keeps the model's linear weights in fp16 and, for every step, casts them and their gradients
to fp32, runs AdamW, and rounds the weights back to fp16; there is no loss scaling. :class:`Fp16MasterStep` does
the same with fixed fp32 copies that the optimiser owns, so that the model's parameters never change dtype (which
DistributedDataParallel needs): before each step the copies take the fp16 values and the gradients, after it the
model takes the rounded results and the copies are reset to them. Parameters that are fp32 already (the temporal
tokens) are stepped directly, as in the published code.
"""
from __future__ import annotations

from typing import Iterable

import torch


class Fp16MasterStep:
    """fp32 stand-ins for the fp16 trainable parameters; build the optimiser over :meth:`swap`'s groups."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]]):
        self.pairs = []  # (model parameter, fp32 copy the optimiser steps)
        self.stand_in = {}
        for _, p in named_params:
            if p.dtype == torch.float16:
                copy = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, copy))
                self.stand_in[id(p)] = copy

    def swap(self, groups: list[dict]) -> list[dict]:
        """Optimiser parameter groups with every fp16 parameter replaced by its fp32 copy."""
        return [{**g, "params": [self.stand_in.get(id(p), p) for p in g["params"]]} for g in groups]

    def before_step(self) -> None:
        """The copies take the model's current fp16 values and its gradients (cast to fp32)."""
        with torch.no_grad():
            for p, copy in self.pairs:
                copy.copy_(p)
                copy.grad = None if p.grad is None else p.grad.float()

    def after_step(self) -> None:
        """The model takes the stepped values rounded to fp16; the copies keep exactly those rounded values."""
        with torch.no_grad():
            for p, copy in self.pairs:
                p.copy_(copy)
                copy.copy_(p)
                copy.grad = None
