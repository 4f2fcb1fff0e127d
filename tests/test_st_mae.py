"""ST-MAE (models/st_mae.py): masking semantics, the reference sizes, tubelet layout, an encoder
that sees only the visible tokens, the loss on masked tubelets only, and learning on CPU."""

from __future__ import annotations

import pytest
import torch

from models.st_mae import PRESETS, STMAE, STMAEConfig, huge, micro, random_mask


def _cfg(**overrides) -> STMAEConfig:
    return STMAEConfig(**{**micro().to_dict(), **overrides})


@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.95])
@pytest.mark.parametrize("tube", [False, True])
def test_every_clip_masks_the_same_count_and_tubes_repeat_over_time(ratio, tube):
    grid = (4, 8, 8)
    g = torch.Generator().manual_seed(0)
    mask = random_mask(16, grid, ratio, tube=tube, generator=g)
    per_step = 64 if tube else 256
    masked = per_step - max(1, int(per_step * (1 - ratio)))
    assert mask.shape == (16, 256)
    assert (mask.sum(1) == masked * (4 if tube else 1)).all()
    by_time = mask.view(16, 4, 64)
    same_every_step = (by_time == by_time[:, :1]).all(dim=(1, 2))
    assert same_every_step.all() if tube else not same_every_step.any()
    assert len({tuple(m.tolist()) for m in mask}) == 16  # each clip its own mask
    again = random_mask(16, grid, ratio, tube=tube, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_reference_sizes():
    """ViT-B/16, L/16 and HVM-1's H/14 encoders; the reference decoder 512 x 4 x 16."""
    expected = {"base": (768, 12, 12, 16, 86.39), "large": (1024, 24, 16, 16, 304.10), "huge": (1280, 32, 16, 14, 631.53)}
    for name, (dim, depth, heads, patch, millions) in expected.items():
        cfg = PRESETS[name]()
        assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.tubelet, cfg.frames) == (dim, depth, heads, patch, 2, 16)
        assert (cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads) == (512, 4, 16)
        with torch.device("meta"):
            assert STMAE(cfg).encoder_params() / 1e6 == pytest.approx(millions, abs=0.01)
    with torch.device("meta"):  # HVM-1's "633M": the 448 px model, whose spatial table is 4x longer
        at_448 = STMAE(STMAEConfig(**{**huge().to_dict(), "img_size": 448})).encoder_params()
    assert round(at_448 / 1e6) == 633


def test_a_token_is_the_tubelet_that_patchify_cuts():
    """The Conv3d's token order and receptive field agree with patchify's (t, h, w) order, so the
    loss compares each prediction with its own tubelet."""
    model = STMAE(_cfg())
    with torch.no_grad():
        model.patch_embed.weight.fill_(1.0)
        model.patch_embed.bias.zero_()
    videos = torch.randn(2, 3, 4, 16, 16)
    summed = model.patch_embed(videos)[:, 0].flatten(1)  # (B, L): each token's pixel sum
    torch.testing.assert_close(summed, model.patchify(videos).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.unpatchify(model.patchify(videos)), videos)


@pytest.mark.parametrize("pos_embed", ["learned", "sinusoid"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_the_encoder_sees_only_visible_tokens_and_the_loss_only_masked_ones(pos_embed, cls_token):
    torch.manual_seed(0)
    model = STMAE(_cfg(pos_embed=pos_embed, cls_token=cls_token, mask_ratio=0.75)).eval()
    videos = torch.randn(2, 3, 4, 16, 16)
    mask = random_mask(2, model.cfg.grid, 0.75, generator=torch.Generator().manual_seed(1))
    keep = (~mask).nonzero()[:, 1].view(2, -1)
    states = model.encode(videos, keep)
    assert states.shape == (2, int(cls_token) + keep.shape[1], 32)
    # Whatever the masked tubelets hold, the encoder's output is the same.
    patches = model.patchify(videos)
    noisy = model.unpatchify(torch.where(mask[..., None], torch.randn_like(patches), patches))
    torch.testing.assert_close(model.encode(noisy, keep), states)
    out = model(videos, mask=mask)
    per_token = (out["pred"] - out["target"]).pow(2).mean(-1)
    torch.testing.assert_close(out["loss"], per_token[mask].mean())


def test_norm_pix_loss_normalises_each_target_tubelet():
    model = STMAE(_cfg(norm_pix_loss=True))
    out = model(torch.rand(2, 3, 4, 16, 16) * 5 + 3)
    target = out["target"]
    torch.testing.assert_close(target.mean(-1), torch.zeros(target.shape[:2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.ones(target.shape[:2]), atol=1e-3, rtol=1e-3)


def _moving_squares(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, 4, 16, 16) clips: a coloured 6-px square moving 2 px per frame over a dark background."""
    clips = torch.full((n, 3, 4, 16, 16), -1.0)
    for i in range(n):
        colour = torch.rand(3, generator=generator) * 2
        y, x = (int(v) for v in torch.randint(0, 10, (2,), generator=generator))
        dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
        for t in range(4):
            yy, xx = min(max(y + 2 * t * dy, 0), 10), min(max(x + 2 * t * dx, 0), 10)
            clips[i, :, t, yy : yy + 6, xx : xx + 6] = colour[:, None, None]
    return clips


def test_micro_st_mae_learns_beyond_the_trivial_predictor_on_cpu():
    """600 steps (8 s): the masked-tubelet loss on fresh clips falls clearly below the loss of
    predicting the training clips' mean tubelet everywhere (0.45 vs 0.54 when written)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = STMAE(_cfg(mask_ratio=0.75))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(600):
        loss = model(_moving_squares(16, g), generator=g)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        held_out = _moving_squares(64, torch.Generator().manual_seed(99))
        out = model(held_out, generator=torch.Generator().manual_seed(5))
        mean_tubelet = model.patchify(_moving_squares(256, torch.Generator().manual_seed(7))).mean((0, 1))
        trivial = (out["target"] - mean_tubelet).pow(2).mean(-1)[out["mask"]].mean()
    assert float(out["loss"]) < 0.9 * float(trivial)
