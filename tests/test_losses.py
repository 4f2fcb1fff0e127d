"""InfoNCE against eq. (4)-(5) written out, the masked-only token head, accumulation invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import backbone as B
from models.losses import info_nce, masked_token_loss
from models.masking import block_mask, corrupt
from models.pretrain import PretrainModelConfig, VIMPACPretrainer


def direct_eq_4_5(f, f2, gamma, same=None):
    """Eq. (4) and (20) term by term, in float64; `same[i][k]` drops k from i's negatives."""
    f, f2 = F.normalize(f.double(), dim=-1), F.normalize(f2.double(), dim=-1)
    n = f.shape[0]
    same = same or [[False] * n for _ in range(n)]
    total = 0.0
    for q, pos_set, other_set in ((f, f2, f), (f2, f, f2)):  # L(i) then L'(i)
        for i in range(n):
            num = math.exp(float(q[i] @ pos_set[i]) / gamma)
            den = sum(math.exp(float(q[i] @ other_set[k]) / gamma) for k in range(n) if k != i and not same[i][k])
            den += sum(math.exp(float(q[i] @ pos_set[k]) / gamma) for k in range(n) if k == i or not same[i][k])
            total += -math.log(num / den) / n
    return total


@pytest.mark.parametrize("n,gamma", [(2, 0.2), (6, 0.2), (9, 0.07)])
def test_info_nce_equals_equations_4_and_5(n, gamma):
    torch.manual_seed(n)
    f, f2 = torch.randn(n, 16), torch.randn(n, 16)
    loss, acc = info_nce(f, f2, gamma)
    assert abs(float(loss) - direct_eq_4_5(f, f2, gamma)) < 1e-4
    assert 0.0 <= float(acc) <= 1.0


def test_info_nce_is_symmetric():
    torch.manual_seed(1)
    f, f2 = torch.randn(7, 16), torch.randn(7, 16)
    assert torch.allclose(info_nce(f, f2)[0], info_nce(f2, f)[0], atol=1e-6)


def test_repeated_videos_are_not_negatives_of_each_other():
    torch.manual_seed(2)
    f, f2 = torch.randn(5, 8), torch.randn(5, 8)
    ids = torch.tensor([10, 11, 10, 12, 13])  # entries 0 and 2 are the same video
    same = [[bool(ids[i] == ids[k]) and i != k for k in range(5)] for i in range(5)]
    loss, _ = info_nce(f, f2, 0.2, video_index=ids)
    assert abs(float(loss) - direct_eq_4_5(f, f2, 0.2, same)) < 1e-4
    distinct, _ = info_nce(f, f2, 0.2, video_index=torch.arange(5))
    assert abs(float(distinct) - direct_eq_4_5(f, f2, 0.2)) < 1e-4


def test_perfect_features_give_full_accuracy_and_low_loss():
    f = torch.eye(8)
    loss, acc = info_nce(f, f.clone(), 0.05)
    assert float(acc) == 1.0 and float(loss) < 1e-3


def masked_batch(cfg, b: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, predict) of b videos x 2 clips of random codes, 3 mask blocks per clip."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.n_codes, (b, 2, cfg.frames, cfg.grid, cfg.grid), generator=gen)
    mask = block_mask((2 * b, cfg.frames, cfg.grid, cfg.grid), 3, gen).view(2, b, *tokens.shape[2:]).transpose(0, 1)
    inputs, predict = corrupt(tokens, mask, pad_id=cfg.pad_id, mask_id=cfg.mask_id, n_codes=cfg.n_codes)
    return inputs, tokens, predict


def test_logits_at_masked_positions_only_give_the_full_logits_loss():
    torch.manual_seed(0)
    model = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), objective="mp")).eval()
    cfg = model.config.backbone
    inputs, targets, predict = masked_batch(cfg, 3, 0)
    with torch.no_grad():
        out = model(inputs, targets, predict)
        flat = inputs.transpose(0, 1).reshape(6, *inputs.shape[2:])
        _, hidden = model.backbone(flat)
        full = model.token_head(hidden.reshape(-1, cfg.dim))  # logits everywhere, as the authors' code
        labels = targets.transpose(0, 1).reshape(-1).masked_fill(~predict.transpose(0, 1).reshape(-1), -100)
        reference = F.cross_entropy(full, labels, ignore_index=-100)
    assert torch.allclose(out["loss"], reference, atol=1e-6)
    assert int(out["n_predicted"]) == int(predict.sum())


def test_accumulating_micro_batches_equals_one_big_batch():
    """k micro-batches, each normalised by the whole batch's predicted-token count, give the
    gradient of one batch of k times the size (no BatchNorm: the mask objective only)."""
    torch.manual_seed(0)
    model = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), objective="mp"))
    cfg = model.config.backbone
    micro = [masked_batch(cfg, 2, s) for s in range(3)]
    big = [torch.cat(parts) for parts in zip(*micro)]

    model.zero_grad()
    model(*big)["loss"].backward()
    reference = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total = sum(int(p.sum()) for _, _, p in micro)
    for inputs, targets, predict in micro:
        model(inputs, targets, predict, mask_norm=total)["loss"].backward()
    for p, ref in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, ref, atol=1e-6, rtol=1e-4)


def test_objectives_build_only_the_heads_they_use():
    mp = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), objective="mp"))
    cl = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), objective="cl", cl_hidden=16))
    zero = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), alpha=0.0))
    assert mp.contrastive_head is None and mp.token_head is not None
    assert cl.token_head is None and cl.contrastive_head is not None
    assert zero.contrastive_head is None
    tokens = torch.randint(0, 32, (4, 2, 4, 4, 4))
    out = cl(tokens, video_index=torch.arange(4))
    assert "cl_loss" in out and "mask_ce_sum" not in out


def test_masked_token_loss_counts():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    loss, ce, correct = masked_token_loss(logits, torch.tensor([0, 1, 1]))
    assert int(correct) == 2 and torch.isclose(loss, ce / 3)
