"""Stochastic depth ("drop path", Huang et al. 2016) for residual blocks, as timm's DropPath that
mae_st and HVM-1 fine-tune with (mae_st models_vit.py, util/video_vit.py Block).

In training mode each sample's residual branch is dropped with probability p and the kept ones
are scaled by 1 / (1 - p), so the expected output is unchanged; in eval mode, or at p = 0, the
branch passes through untouched and no random number is drawn (a model built with p = 0 trains
exactly as one without the module). Rates grow linearly with depth, from 0 at the first block
to the configured rate at the last (`drop_path_rates`: mae_st's
`torch.linspace(0, drop_path_rate, depth)`).
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Per-block drop probabilities of a `depth`-block stack: linear from 0 to `rate`."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {rate}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]


class DropPath(nn.Module):
    """Drops whole samples of residual branches in training; identity in eval mode and at p = 0."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, *branches: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Each of `branches` (batch first, one batch) with the same samples dropped: a VIMPAC
        layer's token grid and its [CLS] are one sample's residual stream, so they drop together.
        One branch in, one tensor out; several in, a tuple out."""
        if not branches:
            raise ValueError("DropPath needs at least one branch")
        if self.training and self.p > 0.0:
            first = branches[0]
            scale = first.new_empty(first.shape[0]).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
            branches = tuple(b * scale.view(-1, *([1] * (b.ndim - 1))) for b in branches)
        return branches[0] if len(branches) == 1 else branches

    def extra_repr(self) -> str:
        return f"p={self.p:g}"
