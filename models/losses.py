"""Pretraining losses: masked-token cross-entropy and the symmetric InfoNCE of eq. (4)-(5).

Both are written so that data-parallel training over R ranks (DDP averages gradients) equals
single-process training on the global batch: each rank returns R times its share of the global
loss, and the contrastive features are all-gathered with gradient, so every clip meets every
other clip of the global batch as a negative (Sec. 3.2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's part.
    Ranks must pass the same shape."""
    rank, size = world()
    if size == 1:
        return x
    # The backward of this all-gather is a summing reduce-scatter: each rank's part receives
    # the gradient that every rank's loss sends it.
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for losses and statistics; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _gather_ids(x: torch.Tensor) -> torch.Tensor:
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def info_nce(f: torch.Tensor, f2: torch.Tensor, temperature: float = 0.2,
             video_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """L_cl of eq. (5): (1/n) sum_i L(i) + (1/n) sum_i L'(i), with n the global batch.

    f, f2: (n_local, E) features of the two clips of each local video; they are L2-normalised
    here. For clip c_i the positive is c'_i; the negatives are every other clip of the global
    batch, from both views (eq. 4), and symmetrically for c'_i (eq. 20). When `video_index`
    says two batch entries are the same video (a resampled small corpus), their clips are
    dropped from each other's negatives rather than pushed apart.

    Returns (loss scaled for DDP, i.e. world_size * this rank's share of L_cl; top-1 accuracy of
    finding the positive among the candidates, over this rank's 2 * n_local queries).
    """
    rank, size = world()
    n_local = f.shape[0]
    f = F.normalize(upcast(f), dim=-1)
    f2 = F.normalize(upcast(f2), dim=-1)
    all_f, all_f2 = gather_with_grad(f), gather_with_grad(f2)  # (N, E) each
    n = all_f.shape[0]
    offset = rank * n_local
    keys = torch.cat([all_f, all_f2], dim=0)  # (2N, E): columns 0..N-1 are c_k, N..2N-1 are c'_k
    queries = torch.cat([f, f2], dim=0)  # (2n, E)
    # Autocast would cast the fp32 features back to bf16 for the matmul: similarities of
    # L2-normalised features rounded to 8 bits, then divided by gamma = 0.2 before the softmax.
    with torch.autocast(f.device.type, enabled=False):
        logits = queries @ keys.t() / temperature  # (2n, 2N)

    g = torch.arange(n_local, device=f.device) + offset  # global index of each local video
    own = torch.cat([g, g + n])  # column of each query itself (excluded: k != i in eq. 4)
    positive = torch.cat([g + n, g])  # column of its pair
    rows = torch.arange(2 * n_local, device=f.device)
    excluded = torch.zeros_like(logits, dtype=torch.bool)
    excluded[rows, own] = True
    if video_index is not None:
        all_ids = _gather_ids(video_index.to(f.device))
        ids = torch.cat([all_ids, all_ids])  # (2N,) video of each column
        query_ids = torch.cat([video_index, video_index]).to(f.device)  # (2n,)
        excluded |= query_ids[:, None] == ids[None, :]
        excluded[rows, positive] = False
    logits = logits.masked_fill(excluded, float("-inf"))
    per_query = F.cross_entropy(logits, positive, reduction="none")  # (2n,)
    loss = per_query.sum() * size / n
    accuracy = (logits.argmax(dim=1) == positive).float().mean()
    return loss, accuracy


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, normalizer: float | torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over masked positions only. logits (N, V), targets (N,).

    `normalizer` is the number of predicted tokens the loss is averaged over; under gradient
    accumulation and DDP the trainer passes (masked tokens in the whole effective global batch)
    / world_size, so k micro-batches on R ranks give exactly the gradient of one big batch.
    Returns (loss, summed cross-entropy, number of correct predictions).
    """
    ce = F.cross_entropy(upcast(logits), targets, reduction="sum")
    norm = normalizer if normalizer is not None else max(1, targets.numel())
    correct = (logits.argmax(dim=-1) == targets).sum()
    return ce / norm, ce.detach(), correct
