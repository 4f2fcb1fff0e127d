"""Spatiotemporal masked autoencoder (ST-MAE) over pixels: HVM-1's pretraining (seed 000).

Read against the reference code (facebookresearch/mae_st models_mae.py, MCG-NJU/VideoMAE,
eminorhan/hvm-1) and written anew:

- A ViT over tubelets: a Conv3d with kernel = stride = (u, p, p) cuts a (3, T, S, S) clip into
  (T/u) x (S/p) x (S/p) tokens ((2, 16, 16) at 224 px in the reference; (2, 8, 8) for the tiny
  preset at 64 px).
- Positions: separate learned spatial and temporal tables plus one for [CLS] (mae_st's
  `sep_pos_embed` and `cls_embed`, HVM-1's setting), or a fixed 1-D sinusoid over the flattened
  tokens (VideoMAE): `pos_embed`.
- Pre-norm blocks (LayerNorm eps 1e-6, GELU MLP x4) on F.scaled_dot_product_attention.
- The encoder sees only the visible tokens; the decoder (512 wide x 4 deep x 16 heads in the
  reference recipes) gets them back at their places, a shared learned [MASK] vector everywhere
  else, its own positions, and predicts every tubelet's u*p*p*3 pixels.
- Masking per clip: `random` (mae_st: any tokens) or `tube` (VideoMAE: the same spatial
  positions in every time step), ratio 0.9 (HVM-1 at 224 px; 0.95 at 448 px).
- Loss: mean squared error per tubelet, averaged over the masked tubelets only; `norm_pix_loss`
  normalises each target tubelet by its own mean and variance first (MAE; HVM-1 runs it off).
- Fine-tuning and probes use the encoder alone (`STMAEEncoder`, which STMAE extends with the
  decoder; `load_encoder_state` reads a pretrained STMAE's weights into it), optionally with
  stochastic depth in its blocks (`drop_path`, linear in depth, mae_st models_vit.py: 0.1 when
  fine-tuning, never when pretraining).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from models.drop_path import DropPath, drop_path_rates


@dataclass
class STMAEConfig:
    img_size: int = 224
    patch_size: int = 16
    tubelet: int = 2  # frames per token (u)
    frames: int = 16
    in_chans: int = 3
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    decoder_dim: int = 512
    decoder_depth: int = 4
    decoder_heads: int = 16
    pos_embed: str = "learned"  # "learned": separate spatial + temporal + [CLS] tables (mae_st); "sinusoid" (VideoMAE)
    cls_token: bool = True
    masking: str = "random"  # "random" (mae_st) or "tube" (VideoMAE)
    mask_ratio: float = 0.9
    norm_pix_loss: bool = False
    ln_eps: float = 1e-6
    drop_path: float = 0.0  # encoder stochastic depth of the last block, linear in depth (fine-tuning only)

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.frames % self.tubelet:
            raise ValueError(f"frames {self.frames} is not a multiple of the tubelet length {self.tubelet}")
        if self.dim % self.heads or self.decoder_dim % self.decoder_heads:
            raise ValueError("dim and decoder_dim must be multiples of their head counts")
        if self.pos_embed not in ("learned", "sinusoid"):
            raise ValueError(f"pos_embed must be 'learned' or 'sinusoid', got {self.pos_embed!r}")
        if self.masking not in ("random", "tube"):
            raise ValueError(f"masking must be 'random' or 'tube', got {self.masking!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (T, H, W)."""
        return self.frames // self.tubelet, self.img_size // self.patch_size, self.img_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        return self.tubelet * self.patch_size**2 * self.in_chans

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "STMAEConfig":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown ST-MAE config keys: {', '.join(unknown)}")
        return cls(**data)


# Encoder sizes as in ViT / mae_st (B/16, L/16, H/14); the decoder is the reference's 512 x 4 x 16.
def base() -> STMAEConfig:
    return STMAEConfig(patch_size=16, dim=768, depth=12, heads=12)


def large() -> STMAEConfig:
    return STMAEConfig(patch_size=16, dim=1024, depth=24, heads=16)


def huge() -> STMAEConfig:
    """HVM-1's backbone: ViT-H/14 over 2-frame tubelets of 16 frames at 224 px; 631.5M encoder
    parameters (632.5M at 448 px, HVM-1's "633M")."""
    return STMAEConfig(patch_size=14, dim=1280, depth=32, heads=16)


def tiny() -> STMAEConfig:
    """CPU and the demo: 64 px, (2, 8, 8) tubelets of 8 frames -> 4 x 8 x 8 tokens."""
    return STMAEConfig(img_size=64, patch_size=8, tubelet=2, frames=8, dim=128, depth=4, heads=4,
                       decoder_dim=128, decoder_depth=2, decoder_heads=4)


def micro() -> STMAEConfig:
    """Unit tests: the smallest model that still has every part."""
    return STMAEConfig(img_size=16, patch_size=4, tubelet=2, frames=4, dim=32, depth=2, heads=4,
                       decoder_dim=32, decoder_depth=1, decoder_heads=4)


PRESETS: dict[str, Callable[[], STMAEConfig]] = {"micro": micro, "tiny": tiny, "base": base, "large": large, "huge": huge}

DECODER_PREFIXES = ("decoder", "mask_token")  # state-dict entries of the decoder (pretraining only)


def sinusoid_table(n: int, dim: int) -> torch.Tensor:
    """(n, dim) fixed sin/cos positions over a flat index (VideoMAE's table)."""
    position = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.float()


def random_mask(batch: int, grid: tuple[int, int, int], ratio: float, *, tube: bool = False,
                generator: torch.Generator | None = None, device: torch.device | None = None) -> torch.Tensor:
    """(B, T*H*W) bool, True where a token is masked. Every clip masks the same number of tokens:
    L - int(L * (1 - ratio)) for random masking, and with `tube` the same spatial positions at every
    time step (H*W - int(H*W * (1 - ratio)) of them)."""
    t, h, w = grid
    n = h * w if tube else t * h * w
    keep = max(1, int(n * (1.0 - ratio)))
    noise = torch.rand(batch, n, generator=generator, device=generator.device if generator is not None else device).to(device)
    mask = torch.ones(batch, n, dtype=torch.bool, device=device)
    mask.scatter_(1, noise.argsort(1)[:, :keep], False)
    if tube:
        mask = mask[:, None, :].expand(batch, t, n).reshape(batch, t * n)
    return mask


class Block(nn.Module):
    """Pre-norm transformer block; `drop_path` drops each residual branch per sample in training."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float, drop_path: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        x = x + self.drop_path(self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")))
        return x + self.drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class _Positions(nn.Module):
    """Token positions for a (T, H, W) grid plus [CLS]: learned separate tables or a fixed sinusoid."""

    def __init__(self, kind: str, grid: tuple[int, int, int], dim: int):
        super().__init__()
        t, h, w = grid
        self.kind, self.grid = kind, grid
        if kind == "learned":
            self.spatial = nn.Parameter(torch.zeros(1, h * w, dim))
            self.temporal = nn.Parameter(torch.zeros(1, t, dim))
            self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        else:
            self.register_buffer("table", sinusoid_table(t * h * w, dim)[None], persistent=False)

    def tokens(self) -> torch.Tensor:  # (1, L, D), in (t, h, w) order
        if self.kind == "sinusoid":
            return self.table
        t = self.grid[0]
        return self.spatial.repeat(1, t, 1) + self.temporal.repeat_interleave(self.spatial.shape[1], dim=1)

    def cls_position(self) -> torch.Tensor | float:
        return self.cls if self.kind == "learned" else 0.0


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, L, D) at ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


class STMAEEncoder(nn.Module):
    """The ST-MAE's encoder: tubelet embedding, positions, [CLS], pre-norm blocks, final norm.
    `encode` and `features` are the backbone of fine-tuning and probes (all tokens visible).

    `init` False leaves the weights to a subclass that adds modules and initialises everything
    once, in mae_st's order (STMAE: the same seed gives the same model as before the split)."""

    def __init__(self, cfg: STMAEConfig, *, init: bool = True):
        super().__init__()
        self.cfg = cfg
        u, p = cfg.tubelet, cfg.patch_size
        self.patch_embed = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=(u, p, p), stride=(u, p, p))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.pos = _Positions(cfg.pos_embed, cfg.grid, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.ln_eps, rate)
                                    for rate in drop_path_rates(cfg.drop_path, cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        if init:
            self.reset_parameters()

    def _tokens(self) -> tuple[nn.Parameter | None, ...]:
        return (self.cls_token,)

    def _position_tables(self) -> tuple[_Positions, ...]:
        return (self.pos,)

    def reset_parameters(self) -> None:
        """mae_st's initialisation: truncated normal 0.02 for tokens and learned positions, Xavier
        uniform for the linear layers and the (flattened) tubelet projection."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for param in self._tokens():
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        for positions in self._position_tables():
            if positions.kind == "learned":
                for param in (positions.spatial, positions.temporal, positions.cls):
                    nn.init.trunc_normal_(param, std=0.02)

    def encode(self, videos: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, S, S) -> (B, [1 +] K, D) normalised states of [CLS] (if any) and the kept
        tokens `keep` (B, K) (all tokens when None)."""
        x = rearrange(self.patch_embed(videos), "b d t h w -> b (t h w) d")  # (B, L, D)
        x = x + self.pos.tokens()
        if keep is not None:
            x = _gather(x, keep)
        if self.cls_token is not None:
            x = torch.cat([(self.cls_token + self.pos.cls_position()).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def features(self, videos: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, D): [CLS] (`cls`) or the mean of the token states (`mean`), no masking."""
        x = self.encode(videos)
        if pool == "cls" and self.cls_token is not None:
            return x[:, 0]
        return x[:, 1:].mean(1) if self.cls_token is not None else x.mean(1)


class STMAE(STMAEEncoder):
    """ST-MAE: `forward` returns the masked-tubelet loss; `encode` and `features` are the
    backbone for fine-tuning and probes (all tokens visible)."""

    def __init__(self, cfg: STMAEConfig):
        super().__init__(cfg, init=False)
        self.decoder_embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_cls = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim)) if cfg.cls_token else None
        self.decoder_pos = _Positions(cfg.pos_embed, cfg.grid, cfg.decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio, cfg.ln_eps) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(cfg.decoder_dim, eps=cfg.ln_eps)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, cfg.patch_dim)
        self.reset_parameters()

    def _tokens(self) -> tuple[nn.Parameter | None, ...]:
        return (self.cls_token, self.decoder_cls)

    def _position_tables(self) -> tuple[_Positions, ...]:
        return (self.pos, self.decoder_pos)

    def reset_parameters(self) -> None:
        """The encoder's rule over encoder and decoder alike, then N(0, 0.02) for [MASK] (mae_st)."""
        super().reset_parameters()
        nn.init.normal_(self.mask_token, std=0.02)

    def encoder_params(self) -> int:
        """Parameters of the encoder (what fine-tuning keeps): everything but the decoder."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith(DECODER_PREFIXES))

    # ----------------------------------------------------------------------------- pixels

    def patchify(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, C, T, S, S) -> (B, L, u*p*p*C), tokens in (t, h, w) order."""
        u, p = self.cfg.tubelet, self.cfg.patch_size
        return rearrange(videos, "b c (t u) (h p) (w q) -> b (t h w) (u p q c)", u=u, p=p, q=p)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        t, h, w = self.cfg.grid
        u, p = self.cfg.tubelet, self.cfg.patch_size
        return rearrange(patches, "b (t h w) (u p q c) -> b c (t u) (h p) (w q)", t=t, h=h, w=w, u=u, p=p, q=p)

    # ----------------------------------------------------------------------------- model

    def decode(self, latent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Encoder states of the kept tokens -> (B, L, u*p*p*C) predictions for every token."""
        b = latent.shape[0]
        x = self.decoder_embed(latent)
        if self.cls_token is not None:
            cls, x = x[:, :1], x[:, 1:]
        full = self.mask_token.to(x.dtype).expand(b, self.cfg.n_tokens, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, x.shape[-1]), x)  # visible tokens back at their places
        full = full + self.decoder_pos.tokens()
        if self.cls_token is not None:
            full = torch.cat([cls + self.decoder_cls + self.decoder_pos.cls_position(), full], dim=1)
        for block in self.decoder_blocks:
            full = block(full)
        pred = self.decoder_pred(self.decoder_norm(full))
        return pred[:, 1:] if self.cls_token is not None else pred

    def forward(self, videos: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """videos (B, C, T, S, S), normalised. `mask` (B, L) bool (True = masked; each clip the
        same count), drawn by `cfg.masking` when None. Returns loss, pred (B, L, P), mask, target."""
        cfg = self.cfg
        if mask is None:
            mask = random_mask(videos.shape[0], cfg.grid, cfg.mask_ratio, tube=cfg.masking == "tube",
                               generator=generator, device=videos.device)
        keep = (~mask).nonzero()[:, 1].view(videos.shape[0], -1)  # (B, K), ascending
        pred = self.decode(self.encode(videos, keep), keep)
        target = self.patchify(videos)
        if cfg.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_token = (pred.float() - target.float()).pow(2).mean(-1)  # (B, L)
        weights = mask.float()
        loss = (per_token * weights).sum() / weights.sum().clamp_min(1.0)
        return {"loss": loss, "pred": pred, "mask": mask, "target": target}


def load_encoder_state(encoder: STMAEEncoder, state: dict[str, torch.Tensor]) -> None:
    """Load a pretrained ST-MAE's weights (an STMAE state dict; its decoder entries are left out)
    into `encoder`. A learned temporal table is interpolated linearly when the encoder's clip has
    another number of tubelet steps than pretraining (as backbone.resize_positions does for
    VIMPAC's tables); anything else that does not match raises ValueError naming it."""
    state = {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}
    own = encoder.state_dict()
    temporal = "pos.temporal"
    if temporal in state and temporal in own and state[temporal].shape != own[temporal].shape:
        table = state[temporal].transpose(1, 2)  # (1, D, T)
        state[temporal] = F.interpolate(table.float(), size=own[temporal].shape[1], mode="linear",
                                        align_corners=False).transpose(1, 2).to(state[temporal].dtype)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        parts = mismatched + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        raise ValueError("ST-MAE checkpoint does not match the encoder: " + "; ".join(parts[:6]))
    encoder.load_state_dict(state)


def flops_per_clip(cfg: STMAEConfig, visible: int | None = None) -> float:
    """Forward matmul FLOPs of one clip's encoder on `visible` tokens (all when None) and the
    decoder on all of them (2 per multiply-add), for throughput figures."""
    def blocks(n: int, d: int, depth: int) -> float:
        return depth * (2 * n * d * (4 * d + 2 * cfg.mlp_ratio * d) + 4 * n * n * d)
    n_vis = cfg.n_tokens if visible is None else visible
    embed = 2 * cfg.n_tokens * cfg.patch_dim * cfg.dim
    return embed + blocks(n_vis + 1, cfg.dim, cfg.depth) + blocks(cfg.n_tokens + 1, cfg.decoder_dim, cfg.decoder_depth) \
        + 2 * cfg.n_tokens * cfg.decoder_dim * cfg.patch_dim + 2 * (n_vis + 1) * cfg.dim * cfg.decoder_dim
