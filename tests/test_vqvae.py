"""VQ-VAE tokenizer: shapes, exact codebook decoding, EMA, dead-code restarts (learned codebook),
FSQ (implicit codebook), the stride-2 stem, a short training run."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from einops import rearrange

from models.tokenizer import ImageTokenizer
from models.vqvae import PRESETS, VQVAE, VQVAEConfig, num_params, tiny


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared CPU several intra-op threads fight other processes and run many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_frames(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: low-frequency colour gradients plus two soft-edged ellipses,
    a stand-in for natural frames (smooth regions, a few edges) that costs nothing to make."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    frames = []
    for _ in range(n):
        img = r(3, 1, 1) * 0.6 + 0.2
        for _ in range(2):
            freq, phase, angle = 0.5 + 2.5 * r(1), 2 * math.pi * r(1), math.pi * r(1)
            wave = torch.sin(2 * math.pi * freq * (xx * torch.cos(angle) + yy * torch.sin(angle)) + phase)
            img = img + 0.15 * (r(3, 1, 1) * 2 - 1) * wave
        for _ in range(2):
            cy, cx, ry, rx = r(1), r(1), 0.1 + 0.25 * r(1), 0.1 + 0.25 * r(1)
            inside = 1 - ((yy - cy) / ry) ** 2 - ((xx - cx) / rx) ** 2
            mask = torch.sigmoid(inside * 20)
            img = img * (1 - mask) + r(3, 1, 1) * mask
        frames.append(img.clamp(0, 1))
    return torch.stack(frames)


def vq_tiny(**kw) -> VQVAEConfig:
    """The tiny preset's network with a learned codebook of 512 32-d codes (EMA, k-means init,
    dead-code restarts; settings for short runs)."""
    vq = {"quantizer": "vq", "fsq_levels": (), "codebook_size": 512, "codebook_dim": 32, "ema_decay": 0.9, "kmeans_iters": 5,
          "dead_code_threshold": 0.5}
    return dataclasses.replace(tiny(), **(vq | kw))


def psnr(mse: float) -> float:
    return -10 * math.log10(mse)


def tokenizer_psnr(model: VQVAE, frames: torch.Tensor) -> float:
    model.eval()
    recon = model.decode(model.encode(frames))
    model.train()
    return psnr(torch.mean((recon - frames) ** 2).item())


@pytest.mark.parametrize(
    "mults,stem,size",
    [((1, 2), 1, (32, 32)), ((1, 2, 2), 1, (64, 64)), ((1, 2, 2), 1, (32, 48)), ((1, 1, 2, 2), 1, (64, 32)),
     ((1, 2), 2, (64, 64)), ((1, 2), 2, (32, 48))],
)
@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_token_shapes_and_range(mults, stem, size, quantizer):
    torch.manual_seed(0)
    q = {"quantizer": "fsq", "fsq_levels": (4, 4, 4)} if quantizer == "fsq" else {"quantizer": "vq", "fsq_levels": (), "codebook_size": 64}
    cfg = dataclasses.replace(tiny(), channel_mults=mults, stem_stride=stem, **q)
    model = VQVAE(cfg).eval()
    d = stem * 2 ** len(mults)
    assert model.downsample == d and model.codebook_size == 64
    images = smooth_frames(4, size=max(size), seed=1)[..., : size[0], : size[1]]
    tokens = model.encode(images)
    assert tokens.shape == (4, size[0] // d, size[1] // d)
    assert tokens.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < model.codebook_size
    recon = model.decode(tokens)
    assert recon.shape == images.shape
    assert recon.min() >= 0 and recon.max() <= 1


def test_rejects_sizes_not_multiple_of_downsample():
    model = VQVAE(tiny())
    assert model.downsample == 8
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.rand(1, 3, 36, 32))


def test_decode_uses_exact_codebook_vectors():
    torch.manual_seed(0)
    model = VQVAE(vq_tiny())
    frames = smooth_frames(8, seed=2)
    model(frames)  # k-means init and one EMA step, so the codebook is data-dependent
    model.eval()
    tokens = model.encode(frames)
    codes = rearrange(model.codebook[tokens], "b h w d -> b d h w")  # manual lookup
    expected = ((model.decoder(codes) + 1) / 2).clamp(0, 1)
    assert torch.equal(model.decode(tokens), expected)
    # The eval forward pass quantises to the same tokens and reconstruction.
    out = model(frames)
    assert torch.equal(out.indices, tokens)
    assert torch.equal(out.reconstruction.clamp(0, 1), expected)


def test_encode_never_updates_codebook_even_in_training_mode():
    torch.manual_seed(0)
    model = VQVAE(vq_tiny())
    model(smooth_frames(8, seed=3))
    before = model.codebook.clone()
    model.train()
    model.encode(smooth_frames(8, seed=4))
    assert torch.equal(model.codebook, before)


def test_loss_is_recon_plus_weighted_commitment_and_codebook_gets_no_gradient():
    torch.manual_seed(0)
    model = VQVAE(vq_tiny())
    model(smooth_frames(16, seed=4))  # k-means init on other latents, so codes are not the inputs
    out = model(smooth_frames(8, seed=5))
    expected = out.recon_loss + model.config.commitment_weight * out.commit_loss
    assert torch.allclose(out.loss, expected)
    assert out.commit_loss > 0
    assert all(p.data_ptr() != model.codebook.data_ptr() for p in model.parameters())
    out.loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # straight-through reaches the encoder
    assert 1 <= out.perplexity <= model.codebook_size and 0 < out.usage <= 1


def _nearest(latents: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = rearrange(latents, "b d h w -> (b h w) d")  # (N, D)
    return flat, torch.cdist(flat, codebook).argmin(dim=1)  # (N,)


def test_ema_moves_codes_toward_assigned_inputs():
    torch.manual_seed(0)
    model = VQVAE(vq_tiny(dead_code_threshold=0.0, ema_decay=0.8))
    model(smooth_frames(16, seed=6))  # k-means init on another batch
    frames = smooth_frames(16, seed=7)
    with torch.no_grad():
        flat, assign = _nearest(model.encode_latents(frames), model.codebook)
        used = assign.unique()
        means = torch.stack([flat[assign == k].mean(0) for k in used])  # (U, D)
        before = (model.codebook[used] - means).norm(dim=1)
        out = model(frames)  # training mode: one EMA update, no optimiser step
        after = (model.codebook[used] - means).norm(dim=1)
    assert torch.equal(rearrange(out.indices, "b h w -> (b h w)"), assign)
    moved = before > 1e-4  # codes already at their mean have nowhere to go
    assert moved.sum() > 10
    assert (after[moved] < before[moved]).all()
    assert after[moved].mean() < 0.9 * before[moved].mean()


def test_dead_codes_are_restarted_onto_the_data():
    def run(threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, VQVAE]:
        torch.manual_seed(0)
        cfg = vq_tiny(kmeans_init=False, dead_code_threshold=threshold)
        model = VQVAE(cfg)  # random init: most codes are never the nearest to any latent
        batches = [smooth_frames(8, seed=10 + i) for i in range(4)]
        with torch.no_grad():
            initial = model.codebook.clone()
            used = torch.cat([_nearest(model.encode_latents(b), initial)[1] for b in batches]).unique()
            dead = torch.ones(model.codebook_size, dtype=torch.bool)
            dead[used] = False
            for b in batches:
                model(b)
        return initial, dead, model.codebook.clone(), model, batches

    initial, dead, final, model, batches = run(threshold=1.0)
    assert dead.sum() > model.codebook_size // 4
    moved = (final[dead] - initial[dead]).norm(dim=1)
    assert (moved > 1e-3).all()
    # Restarted codes are sampled encoder outputs (each restart also resets its EMA count, so a code
    # still unused is restarted again from a later batch), far closer to the data than the init.
    with torch.no_grad():
        flat, _ = _nearest(model.encode_latents(torch.cat(batches)), final)
    gap_before = torch.cdist(initial[dead], flat).min(dim=1).values.median()
    gap_after = torch.cdist(final[dead], flat).min(dim=1).values.median()
    print(f"dead codes: {int(dead.sum())}, median distance to nearest latent {gap_before:.3f} -> {gap_after:.4f}")
    assert gap_after < 0.25 * gap_before

    # Without restarts the same dead codes stay (almost) where they were.
    initial0, dead0, final0, _, _ = run(threshold=0.0)
    assert torch.equal(dead0, dead)
    assert (final0[dead] - initial0[dead]).norm(dim=1).max() < 1e-3


def test_short_training_run_beats_mean_frame_baseline():
    """Fit a 32-frame set (a tokenizer is fit to its data set): tokenised PSNR must rise and beat
    predicting the data set's mean frame for every frame."""
    torch.manual_seed(0)
    frames = smooth_frames(32, seed=100)
    baseline = psnr(torch.mean((frames.mean(0, keepdim=True) - frames) ** 2).item())
    model = VQVAE(tiny())
    with torch.no_grad():
        model(frames[:16])  # k-means init
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = [tokenizer_psnr(model, frames)]
    for step in range(150):
        out = model(frames[torch.randint(0, len(frames), (8,))])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            history.append(tokenizer_psnr(model, frames))
    print(f"tokenised PSNR every 50 steps: {[round(p, 2) for p in history]} dB; mean frame {baseline:.2f} dB")
    assert all(later > earlier for earlier, later in itertools.pairwise(history))
    assert history[-1] > history[0] + 2
    assert history[-1] > baseline + 1


def test_state_dict_round_trip_gives_identical_tokens():
    torch.manual_seed(0)
    model = VQVAE(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for seed in range(3):
        out = model(smooth_frames(8, seed=300 + seed))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    clone = VQVAE.from_config(model.config_dict())
    clone.load_state_dict(model.state_dict())
    clone.eval()
    frames = smooth_frames(8, seed=400)
    assert torch.equal(clone.codebook, model.codebook)
    assert torch.equal(clone.encode(frames), model.encode(frames))
    assert torch.equal(clone.decode(model.encode(frames)), model.decode(model.encode(frames)))


def test_from_config_accepts_lists_and_rejects_unknown_keys():
    cfg = dataclasses.asdict(vq_tiny(stem_stride=1)) | {"channel_mults": [1, 2]}
    model = VQVAE.from_config(cfg)
    assert model.config.channel_mults == (1, 2) and model.downsample == 4
    fsq = VQVAE.from_config(dataclasses.asdict(tiny()) | {"quantizer": "fsq", "fsq_levels": [5, 5, 4]})
    assert fsq.config.fsq_levels == (5, 5, 4) and fsq.codebook_size == 100 and fsq.config.codebook_dim == 3
    with pytest.raises(ValueError, match="unknown"):
        VQVAE.from_config({"codebook_sizes": 10})


def test_bad_quantizer_settings_are_refused():
    with pytest.raises(ValueError, match="quantizer"):
        VQVAEConfig(quantizer="lfq")
    with pytest.raises(ValueError, match="fsq_levels"):
        VQVAEConfig(quantizer="fsq", fsq_levels=())
    with pytest.raises(ValueError, match="fsq_levels"):
        VQVAEConfig(quantizer="fsq", fsq_levels=(8, 2))
    with pytest.raises(ValueError, match="stem_stride"):
        VQVAEConfig(stem_stride=4)


def test_fsq_codes_are_level_grid_points_and_decode_exactly():
    """FSQ: the codebook is every combination of levels (no parameters, no EMA, no commitment
    loss); decode(encode(x)) runs the decoder on exactly the grid point each index names, and the
    training forward pass quantises to the same tokens; the gradient reaches the encoder."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny(), quantizer="fsq", fsq_levels=(5, 4, 3))
    model = VQVAE(cfg)
    assert model.codebook_size == 60 and model.codebook.shape == (60, 3)
    assert torch.unique(model.codebook, dim=0).shape == (60, 3)
    assert model.codebook.abs().max() <= 1
    frames = smooth_frames(8, seed=2)
    out = model(frames)
    assert out.commit_loss == 0 and torch.equal(out.loss, out.recon_loss)
    out.loss.backward()
    assert model.encoder.net[0].weight.grad.abs().sum() > 0  # straight-through rounding
    assert 1 <= out.perplexity <= model.codebook_size and 0 < out.usage <= 1
    model.eval()
    tokens = model.encode(frames)
    assert tokens.dtype == torch.int64 and tokens.min() >= 0 and tokens.max() < 60
    codes = rearrange(model.codebook[tokens], "b h w d -> b d h w")
    assert torch.equal(model.decode(tokens), ((model.decoder(codes) + 1) / 2).clamp(0, 1))
    assert torch.equal(model(frames).indices, tokens)
    # Nothing in the quantizer is state: a round trip through the config and weights gives the same tokens.
    clone = VQVAE.from_config(model.config_dict())
    clone.load_state_dict(model.state_dict())
    assert torch.equal(clone.eval().encode(frames), tokens)


def test_presets_build_and_satisfy_tokenizer_protocol():
    counts = {}
    for name, preset in PRESETS.items():
        cfg = preset()
        assert isinstance(cfg, VQVAEConfig)
        model = VQVAE(cfg)
        assert isinstance(model, ImageTokenizer)
        assert model.downsample == 8
        assert model.codebook.shape == (cfg.codebook_size, cfg.codebook_dim) == (model.codebook_size, cfg.codebook_dim)
        counts[name] = num_params(model)
        print(f"{name}: {counts[name]:,} params, {model.downsample}x, {model.codebook_size} codes")
    assert counts["tiny"] < counts["small"] < counts["base"]
    assert PRESETS["base"]().codebook_size == 8192
