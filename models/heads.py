"""Pretraining heads (Appendix C.1): the token head of BERT, tied to the input embedding, and
the contrastive MLP head with BatchNorm over [CLS]."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.losses import gather_with_grad, upcast


class TokenHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder tied to the input embedding with its own bias.

    Only the codebook rows of the embedding are decoded: [PAD] and [MASK] are never targets.
    Callers pass hidden states of the masked positions only, so logits are never computed
    for the ~85% of positions that carry no loss (the authors' code computes them all).
    """

    def __init__(self, dim: int, embedding: nn.Embedding, n_codes: int, ln_eps: float = 1e-12, init_std: float = 0.02):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.embedding = embedding  # shared with the backbone, not a copy
        self.n_codes = n_codes
        self.bias = nn.Parameter(torch.zeros(n_codes))
        nn.init.normal_(self.dense.weight, std=init_std)
        nn.init.zeros_(self.dense.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, D) -> logits (N, n_codes)."""
        x = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(x, self.embedding.weight[: self.n_codes], self.bias)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose training statistics span the global batch of all ranks.

    nn.SyncBatchNorm only runs on accelerators; this one uses autograd-aware all-reduces, so the
    same code is exact under DDP on CPU (gloo) and GPU (NCCL). Outside a process group it is
    plain BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = upcast(x)
        n = torch.tensor([x.shape[0]], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n])  # (2C + 1,)
        stats = gather_with_grad(stats[None]).sum(0)  # an all-reduce that gradients flow through
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c : 2 * c] / count - mean * mean).clamp_min(0)  # biased, as BatchNorm normalises
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * count / (count - 1).clamp_min(1), alpha=m)
            self.num_batches_tracked.add_(1)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class ContrastiveHead(nn.Module):
    """MLP over [CLS] with BatchNorm, as SimCLR: (Linear, BN, ReLU) x (layers - 1), then a
    bias-free Linear to `out_dim` (256). Paper: 3 layers x 4096 for large-half; 2 x 2048 small."""

    def __init__(self, dim: int, hidden: int = 2048, out_dim: int = 256, layers: int = 2, init_std: float = 0.02):
        super().__init__()
        mods: list[nn.Module] = []
        width = dim
        for _ in range(layers - 1):
            mods += [nn.Linear(width, hidden), SyncBatchNorm1d(hidden), nn.ReLU()]
            width = hidden
        mods.append(nn.Linear(width, out_dim, bias=False))
        self.mlp = nn.Sequential(*mods)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.mlp(cls)
