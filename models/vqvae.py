"""A convolutional VQ-VAE image tokenizer (satisfies `models.tokenizer.ImageTokenizer`).

Encoder: conv stem, then one stage per entry of `channel_mults` (residual blocks, then a stride-2
conv), so the grid is downsampled by 2**stages; a 1x1 conv maps to `codebook_dim` channels.
Quantizer: `vector_quantize_pytorch.VectorQuantize` (EMA codebook, k-means init from the first
batch, dead-code restarts, commitment loss). The codebook is updated by EMA, never by gradient;
gradients reach the encoder through the library's rotation trick (a straight-through variant).
Decoder: mirror of the encoder with nearest-neighbour upsampling.

Pixels enter in [0, 1] and are mapped to [-1, 1] inside; `recon_loss` is the MSE measured on the
[0, 1] scale, so PSNR in dB is `-10 * log10(recon_loss)`.

Quantizer `fsq` instead: finite scalar quantisation (`vector_quantize_pytorch.FSQ`, Mentzer et al.
2023): each of the `len(fsq_levels)` latent channels is bounded and rounded to one of its levels,
the codebook is every combination (`prod(fsq_levels)` codes), nothing is learned in it and nothing
can die; the gradient passes the rounding straight through.

Presets: `tiny()` for CPUs and the demo (FSQ, stride-2 stem), `small()` for small data, `base()`
paper-scale (8x, 8192 codes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from vector_quantize_pytorch import FSQ, VectorQuantize


@dataclass
class VQVAEConfig:
    image_channels: int = 3
    base_width: int = 128  # channels of the stem; stage i has base_width * channel_mults[i]
    channel_mults: tuple[int, ...] = (1, 2, 4)  # one per stride-2 stage: downsample = 2**len
    num_res_blocks: int = 2  # residual blocks per stage (encoder and decoder alike)
    codebook_size: int = 8192
    codebook_dim: int = 64  # low-dimensional codes keep more of a large codebook in use
    commitment_weight: float = 0.25  # beta of van den Oord et al. 2017
    ema_decay: float = 0.99
    kmeans_init: bool = True  # initialise the codebook by k-means on the first batch's latents
    kmeans_iters: int = 10
    dead_code_threshold: float = 2.0  # restart a code whose EMA count per batch falls below this
    stem_stride: int = 1  # 2: a stride-2 stem and a pixel-shuffle output, no blocks at full resolution
    mid_blocks: int = 1  # residual blocks at the token resolution, after the encoder and before the decoder
    quantizer: str = "vq"  # "vq": learned codebook (EMA, k-means init); "fsq": finite scalar quantisation
    fsq_levels: tuple[int, ...] = ()  # FSQ: levels per latent channel; codebook_size = prod, codebook_dim = len

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)  # JSON/YAML configs give lists
        self.fsq_levels = tuple(self.fsq_levels)
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.quantizer == "fsq":
            if not self.fsq_levels or min(self.fsq_levels) < 3:
                raise ValueError(f"fsq needs fsq_levels of at least 3 each, got {self.fsq_levels}")
            # The codebook is implicit: every combination of levels is a code.
            self.codebook_size = math.prod(self.fsq_levels)
            self.codebook_dim = len(self.fsq_levels)


def tiny() -> VQVAEConfig:
    """CPUs, tests and the demo: 8x (64 px -> 8x8 tokens), 512 codes (FSQ levels 8 x 8 x 8).

    A stride-2 stem (no block at 64 px) and widths 32 -> 64 at 32/16/8 px; finite scalar
    quantisation instead of a learned codebook, which needs no codebook to converge and has no
    dead codes, so a few hundred CPU steps go into the encoder and decoder. Against the
    previous tiny (16-32 wide at every resolution, learned 512-code codebook) on the demo's
    held-out frames: PSNR 8-10 dB above the mean frame instead of 2-4, and it encodes about
    twice as fast (docs/tokenizer.md has the figures).
    """
    return VQVAEConfig(
        base_width=32,
        channel_mults=(1, 2),
        num_res_blocks=1,
        stem_stride=2,
        quantizer="fsq",
        fsq_levels=(8, 8, 8),
    )


def small() -> VQVAEConfig:
    """Small data sets (a few thousand frames): 8x, 1024 codes."""
    return VQVAEConfig(
        base_width=64,
        channel_mults=(1, 2, 2),
        num_res_blocks=1,
        codebook_size=1024,
        codebook_dim=64,
        ema_decay=0.95,
        dead_code_threshold=1.0,
    )


def base() -> VQVAEConfig:
    """Paper scale: 8x downsampling (128 px -> 16x16 tokens), 8192 codes as in VIMPAC."""
    return VQVAEConfig()


PRESETS: dict[str, Callable[[], VQVAEConfig]] = {"tiny": tiny, "small": small, "base": base}


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W) on the [0, 1] scale, not clamped (loss gradient)
    indices: torch.Tensor  # (B, h, w) int64
    loss: torch.Tensor  # recon_loss + commitment_weight * commit_loss
    recon_loss: torch.Tensor  # MSE on the [0, 1] scale
    commit_loss: torch.Tensor  # MSE between encoder output and its (detached) code, unweighted
    perplexity: torch.Tensor  # exp(entropy) of the batch's code histogram
    usage: torch.Tensor  # fraction of the codebook used in the batch


def _norm(channels: int) -> nn.GroupNorm:
    # 32 groups as in VQGAN where the width allows. Narrow presets keep >= 4 channels per group:
    # one channel per group is instance norm, which erases each map's mean (the frame's colours).
    return nn.GroupNorm(math.gcd(32, max(channels // 4, 1)), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.block = nn.Sequential(
            _norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            _norm(out_ch), nn.SiLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = cfg.base_width
        # stem_stride 2: a 4x4 stride-2 conv sees each 2x2 pixel block once, so no block runs at
        # full resolution, where narrow convolutions and norms cost the most time per FLOP.
        stem = nn.Conv2d(cfg.image_channels, ch, 3, padding=1) if cfg.stem_stride == 1 else nn.Conv2d(cfg.image_channels, ch, 4, stride=2, padding=1)
        layers: list[nn.Module] = [stem]
        for mult in cfg.channel_mults:
            out = cfg.base_width * mult
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out))
                ch = out
            layers.append(nn.Conv2d(ch, ch, 4, stride=2, padding=1))  # halves H and W
        layers += [ResBlock(ch, ch) for _ in range(cfg.mid_blocks)]
        layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.codebook_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, D, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = cfg.base_width * cfg.channel_mults[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.codebook_dim, ch, 3, padding=1)]
        layers += [ResBlock(ch, ch) for _ in range(cfg.mid_blocks)]
        for mult in reversed(cfg.channel_mults):
            out = cfg.base_width * mult
            # Blocks before the upsample (as in VQGAN): full resolution only sees the narrowest width.
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, out))
                ch = out
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        if cfg.stem_stride == 1:
            layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.image_channels, 3, padding=1)]
        else:  # each position predicts its 2x2 pixel block (pixel shuffle), mirroring the stride-2 stem
            layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.image_channels * 4, 3, padding=1), nn.PixelShuffle(2)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, D, h, w) -> (B, C, H, W) on the [-1, 1] scale


class VQVAE(nn.Module):
    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = config or VQVAEConfig()
        cfg = self.config
        self.codebook_size = cfg.codebook_size
        self.downsample = cfg.stem_stride * 2 ** len(cfg.channel_mults)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.fsq = cfg.quantizer == "fsq"
        if self.fsq:
            # Each latent channel is bounded and rounded to one of its levels: no codebook to learn,
            # no dead codes, no commitment loss; the gradient passes straight through the rounding.
            self.quantizer = FSQ(levels=list(cfg.fsq_levels), channel_first=True)
            return
        # dim == codebook_dim: the library adds no projections, so the decoder sees the codebook
        # vectors themselves and decode(encode(x)) is an exact lookup.
        self.quantizer = VectorQuantize(
            dim=cfg.codebook_dim,
            codebook_size=cfg.codebook_size,
            decay=cfg.ema_decay,
            commitment_weight=cfg.commitment_weight,
            kmeans_init=cfg.kmeans_init,
            kmeans_iters=cfg.kmeans_iters,
            threshold_ema_dead_code=cfg.dead_code_threshold,
            accept_image_fmap=True,  # (B, D, h, w) in, (B, D, h, w) and (B, h, w) out
            rotation_trick=True,
        )

    @classmethod
    def from_config(cls, config: dict | VQVAEConfig) -> VQVAE:
        if isinstance(config, VQVAEConfig):
            return cls(config)
        known = {f.name for f in fields(VQVAEConfig)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"unknown VQVAEConfig keys: {sorted(unknown)}")
        return cls(VQVAEConfig(**config))

    def config_dict(self) -> dict:
        return asdict(self.config)

    @property
    def codebook(self) -> torch.Tensor:
        if self.fsq:
            return self.quantizer.implicit_codebook  # (K, D): every combination of levels
        return self.quantizer.codebook  # (K, D)

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output before quantisation: (B, C, H, W) in [0, 1] -> (B, D, h, w)."""
        self._check_size(images)
        return self.encoder(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        z = self.encode_latents(images)  # (B, D, h, w)
        if self.fsq:
            z_q, indices = self.quantizer(z)  # (B, D, h, w), (B, h, w)
            indices = indices.long()
            commit = z.new_zeros(())  # the bound keeps latents in range: nothing to commit to
        else:
            # In training mode the library updates the codebook by EMA and restarts dead codes here.
            z_q, indices, _, breakdown = self.quantizer(z, return_loss_breakdown=True)  # (B, D, h, w), (B, h, w)
            if self.training:
                commit = breakdown.commitment
            else:
                # The library computes no losses in eval mode; report the same quantity for validation.
                commit = F.mse_loss(z, z_q.detach())
        recon = (self.decoder(z_q) + 1) / 2  # (B, C, H, W) on the [0, 1] scale
        recon_loss = F.mse_loss(recon, images)
        loss = recon_loss + self.config.commitment_weight * commit
        perplexity, usage = self._code_stats(indices)
        return VQVAEOutput(recon, indices, loss, recon_loss, commit, perplexity, usage)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> (B, H/d, W/d) int64 code indices; never updates the codebook.

        With k-means init, the first batch a fresh model ever sees initialises the codebook.
        """
        z = self.encode_latents(images)  # (B, D, h, w)
        if self.fsq:
            return self.quantizer(z)[1].long()  # (B, h, w)
        _, indices, _ = self.quantizer(z, freeze_codebook=True)  # (B, h, w)
        return indices.long()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code indices -> (B, C, h*d, w*d) in [0, 1] (clamped)."""
        if self.fsq:
            z_q = self.quantizer.indices_to_codes(indices)  # (B, D, h, w): the levels each index names
        else:
            z_q = self.quantizer.get_output_from_indices(indices)  # (B, D, h, w): exact codebook rows
        return ((self.decoder(z_q) + 1) / 2).clamp(0, 1)

    def _check_size(self, images: torch.Tensor) -> None:
        h, w = images.shape[-2:]
        if images.ndim != 4 or h % self.downsample or w % self.downsample:
            raise ValueError(f"expected (B, C, H, W) with H, W multiples of {self.downsample}, got {tuple(images.shape)}")

    def _code_stats(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(indices.reshape(-1), minlength=self.codebook_size).float()  # (K,)
        probs = counts / counts.sum()
        entropy = -(probs * torch.log(probs.clamp_min(1e-10))).sum()
        return entropy.exp(), (counts > 0).float().mean()


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
