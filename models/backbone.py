"""The VIMPAC backbone: a transformer over a (T, H, W) grid of VQ-VAE tokens.

As in the paper (Sec. 3, Appendix C.1, Table 3, Table 13) and checked against the authors' code:

- Token embedding over the codebook plus two special ids, [PAD] = n_codes and [MASK] = n_codes + 1.
  [CLS] is not a token but a learned vector.
- Factorized positional embedding pos_T + pos_H + pos_W (and one for [CLS]), then LayerNorm.
- Post-LayerNorm layers (BERT style; Table 13 shows post-LN beats pre-LN here). Each layer is a
  sequence of attention blocks given by `layout`, then a GELU MLP. The default layout "T,H|W" is a
  temporal block, then one spatial block whose heads are split half over the height axis and half
  over the width axis, outputs concatenated and projected once.
- [CLS] is prepended to every 1-D attention row (TimeSformer's trick, as the authors do) and its
  outputs are averaged over the rows, so it sees the whole clip after one layer.
- Padded positions ([PAD] ids, frames beyond a short video's end) are masked as keys.
- Fine-tuning may add stochastic depth (`drop_path`, models/drop_path.py), as mae_st and HVM-1
  fine-tune their ViTs: every residual branch of layer i (its attention blocks and its MLP) is
  dropped per sample with probability drop_path x i / (L - 1); a sample's [CLS] and token grid
  drop together. 0 (the default) is the paper's model.

Layouts of Table 13 for ablations: "TxHxW" (full attention), "T,HxW" (divided space-time),
"T,H,W" (axial), "T,H|W" (ours). A pattern names the axes its rows run along; "|" splits one
block's heads between patterns that share the output projection; "," starts a new block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.drop_path import DropPath, drop_path_rates

# Token axes of a (B, T, H, W, D) tensor, by pattern letter.
_AXES = {"T": 1, "H": 2, "W": 3}


@dataclass
class BackboneConfig:
    n_codes: int = 8192  # tokenizer codebook size (DALL-E's dVAE: 8192)
    n_layers: int = 6
    dim: int = 512
    n_heads: int = 8
    head_dim: int = 64  # attention width = n_heads * head_dim (large-half: 16 x 32 = 512 < dim)
    mlp_dim: int = 2048
    frames: int = 5  # T of the positional table (pretraining: 5; fine-tuning: 10)
    grid: int = 16  # H = W of the positional tables (S / 8: 128 px -> 16)
    layout: str = "T,H|W"
    norm: str = "post"  # "post" (BERT, the paper's choice) or "pre" (ViT/GPT) for Table 13's ablation
    dropout: float = 0.1
    init_std: float = 0.02  # BERT initialisation
    ln_eps: float = 1e-12  # BERT's LayerNorm epsilon, as the authors use
    drop_path: float = 0.0  # stochastic depth of the last layer, linear in depth (0: the paper's model)

    def __post_init__(self) -> None:
        blocks = parse_layout(self.layout)
        if self.norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {self.norm!r}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        for patterns in blocks:
            if self.n_heads % len(patterns):
                raise ValueError(f"layout block {'|'.join(patterns)!r} splits {self.n_heads} heads into {len(patterns)} equal parts: impossible")

    @property
    def pad_id(self) -> int:
        return self.n_codes

    @property
    def mask_id(self) -> int:
        return self.n_codes + 1

    @property
    def vocab_size(self) -> int:
        return self.n_codes + 2

    @property
    def attn_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BackboneConfig":
        return config_from_dict(cls, data, "backbone")


def config_from_dict(cls, data: dict, what: str):
    """A config dataclass from a checkpoint's dict, naming keys it does not know (a checkpoint
    written by another version) instead of failing on an unexpected keyword."""
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} config keys: {', '.join(unknown)}")
    return cls(**data)


def parse_layout(layout: str) -> list[list[str]]:
    """"T,H|W" -> [["T"], ["H", "W"]]; each pattern is a set of axes in T, H, W order."""
    blocks = []
    for block in layout.replace(" ", "").split(","):
        patterns = []
        for pattern in block.split("|"):
            axes = pattern.split("x")
            if not pattern or any(a not in _AXES for a in axes) or len(set(axes)) != len(axes):
                raise ValueError(f"bad attention pattern {pattern!r} in layout {layout!r}: use T, H, W joined by 'x'")
            patterns.append("x".join(sorted(axes, key=_AXES.__getitem__)))
        blocks.append(patterns)
    if not blocks:
        raise ValueError("empty layout")
    return blocks


# Table 3 presets. Parameter counts (backbone, embeddings included, heads excluded):
# small 29.4M, base 119.7M, large-half 210.1M; tests/test_backbone.py checks them.
def small() -> BackboneConfig:
    return BackboneConfig(n_layers=6, dim=512, n_heads=8, head_dim=64, mlp_dim=2048)


def base() -> BackboneConfig:
    return BackboneConfig(n_layers=12, dim=768, n_heads=12, head_dim=64, mlp_dim=3072)


def large_half() -> BackboneConfig:
    """BERT-large shape with halved attention head size and MLP width (Appendix C.1, after [15])."""
    return BackboneConfig(n_layers=24, dim=1024, n_heads=16, head_dim=32, mlp_dim=2048)


def tiny() -> BackboneConfig:
    """CPU tests and the demo: 64 px frames -> 8x8 tokens, 512 codes, 2 layers x 128."""
    return BackboneConfig(n_codes=512, n_layers=2, dim=128, n_heads=4, head_dim=32, mlp_dim=512, frames=5, grid=8)


def micro() -> BackboneConfig:
    """Unit tests: the smallest model that still has every part."""
    return BackboneConfig(n_codes=32, n_layers=2, dim=32, n_heads=4, head_dim=8, mlp_dim=64, frames=4, grid=4, dropout=0.0)


PRESETS: dict[str, Callable[[], BackboneConfig]] = {
    "small": small, "base": base, "large_half": large_half, "tiny": tiny, "micro": micro,
}


class MultiPatternAttention(nn.Module):
    """One attention block: its heads split evenly between `patterns`, one shared output projection.

    Each pattern attends along its axes only (rows of the grid), with [CLS] prepended to every row;
    [CLS] outputs are averaged over rows. With `norm="post"`: x <- LN(x + DropPath(Proj(Attn(x)))).
    """

    def __init__(self, cfg: BackboneConfig, patterns: list[str], drop_path: float = 0.0):
        super().__init__()
        self.patterns = patterns
        self.axes = [tuple(_AXES[a] for a in p.split("x")) for p in patterns]
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.heads_per_pattern = cfg.n_heads // len(patterns)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.attn_dim)  # the patterns' q, k, v projections, fused
        self.proj = nn.Linear(cfg.attn_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        self.drop_path = DropPath(drop_path)
        self.pre_norm = cfg.norm == "pre"

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cls_qkv: torch.Tensor,
                keep: torch.Tensor | None, axes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k, v: (B, T, H, W, h, d) of this pattern's heads; cls_qkv: (B, 3, h, d);
        keep: (B, T, H, W) True where a key is a real token. Returns (B, T, H, W, h, d), (B, h, d)."""
        b, t, hh, ww, nh, hd = q.shape
        rows = [a for a in (1, 2, 3) if a not in axes]
        order = (0, *rows, *axes, 4, 5)
        shape = q.shape
        n_rows = b * math.prod([shape[a] for a in rows])
        length = math.prod([shape[a] for a in axes])

        def to_rows(x: torch.Tensor) -> torch.Tensor:
            return x.permute(order).reshape(n_rows, length, nh, hd)  # (N, L, h, d)

        cls_rows = cls_qkv.repeat_interleave(n_rows // b, dim=0).unsqueeze(2)  # (N, 3, 1, h, d)
        q, k, v = (torch.cat([cls_rows[:, i], to_rows(x)], dim=1).transpose(1, 2) for i, x in enumerate((q, k, v)))  # (N, h, 1+L, d)
        mask = None
        if keep is not None:
            keys = keep.permute((0, *rows, *axes)).reshape(n_rows, length)  # (N, L)
            keys = torch.cat([keys.new_ones(n_rows, 1), keys], dim=1)  # [CLS] is always a valid key
            mask = keys[:, None, None, :]  # (N, 1, 1, 1+L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2)  # (N, 1+L, h, d)
        cls_out = out[:, 0].reshape(b, n_rows // b, nh, hd).mean(1)  # (B, h, d): [CLS] averaged over rows
        grid = out[:, 1:].reshape(*[shape[a] for a in order[:-2]], nh, hd)
        inverse = [order.index(i) for i in range(6)]
        return grid.permute(inverse), cls_out

    def forward(self, x: torch.Tensor, cls: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, H, W, D), cls: (B, D), keep: (B, T, H, W) bool or None (no padding)."""
        b, t, h, w, _ = x.shape
        xin, cin = (self.norm(x), self.norm(cls)) if self.pre_norm else (x, cls)
        n_patterns = len(self.axes)
        qkv = self.qkv(xin).view(b, t, h, w, 3, n_patterns, self.heads_per_pattern, self.head_dim)  # (B, T, H, W, 3, P, h, d)
        cls_qkv = self.qkv(cin).view(b, 3, n_patterns, self.heads_per_pattern, self.head_dim)  # (B, 3, P, h, d)
        # unbind, not slicing: the backward of each slice (q, k, v and [CLS] of every pattern) writes a
        # zero-filled gradient of qkv's full size and adds into it; unbind's backward stacks the parts.
        grids, clss = [], []
        for axes, part, cls_part in zip(self.axes, qkv.unbind(5), cls_qkv.unbind(2)):
            q, k, v = part.unbind(4)  # each (B, T, H, W, h, d)
            g, c = self._attend(q, k, v, cls_part, keep, axes)
            grids.append(g)
            clss.append(c)
        grid = torch.cat(grids, dim=-2).reshape(b, t, h, w, -1)  # (B, T, H, W, A): heads concatenated
        cls_att = torch.cat(clss, dim=-2).reshape(b, -1)  # (B, A)
        x_out, cls_out = self.drop_path(self.dropout(self.proj(grid)), self.dropout(self.proj(cls_att)))
        if self.pre_norm:
            return x + x_out, cls + cls_out
        return self.norm(x + x_out), self.norm(cls + cls_out)


class MLP(nn.Module):
    """The layer's GELU MLP, applied to the token grid and to [CLS] (one drop-path draw for both)."""

    def __init__(self, cfg: BackboneConfig, drop_path: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.pre_norm = cfg.norm == "pre"

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(F.gelu(self.fc1(self.norm(x) if self.pre_norm else x))))

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_out, cls_out = self.drop_path(self._branch(x), self._branch(cls))
        if self.pre_norm:
            return x + x_out, cls + cls_out
        return self.norm(x + x_out), self.norm(cls + cls_out)


class Layer(nn.Module):
    def __init__(self, cfg: BackboneConfig, drop_path: float = 0.0):
        super().__init__()
        self.attention = nn.ModuleList(MultiPatternAttention(cfg, patterns, drop_path) for patterns in parse_layout(cfg.layout))
        self.mlp = MLP(cfg, drop_path)

    def forward(self, x: torch.Tensor, cls: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.attention:
            x, cls = block(x, cls, keep)
        return self.mlp(x, cls)


class VideoTransformer(nn.Module):
    """tokens (B, T, H, W) int -> ([CLS] (B, D), hidden states (B, T, H, W, D))."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.cls = nn.Parameter(torch.zeros(d))
        self.pos_cls = nn.Parameter(torch.zeros(d))
        self.pos_t = nn.Parameter(torch.zeros(cfg.frames, d))
        self.pos_h = nn.Parameter(torch.zeros(cfg.grid, d))
        self.pos_w = nn.Parameter(torch.zeros(cfg.grid, d))
        self.embed_norm = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg, rate) for rate in drop_path_rates(cfg.drop_path, cfg.n_layers))
        # Pre-LN needs a final LayerNorm on the residual stream; post-LN ends with one already.
        self.final_norm = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.norm == "pre" else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls, std=std)
        nn.init.normal_(self.pos_cls, std=std)
        # Three tables are summed: each gets std/sqrt(3) so the sum has the usual scale.
        for table in (self.pos_t, self.pos_h, self.pos_w):
            nn.init.normal_(table, std=std / math.sqrt(3))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens: (B, T, H, W) ids; pad_mask: (B, T, H, W) True at padded positions
        (default: tokens == [PAD]). Returns cls (B, D) and hidden (B, T, H, W, D)."""
        b, t, h, w = tokens.shape
        cfg = self.config
        if t > cfg.frames or h > cfg.grid or w > cfg.grid:
            raise ValueError(
                f"input {t}x{h}x{w} tokens exceeds the positional tables ({cfg.frames}x{cfg.grid}x{cfg.grid}); "
                "interpolate them with resize_positions() first"
            )
        if pad_mask is None:
            pad_mask = tokens == cfg.pad_id
        # No padding in the batch: no mask, so SDPA can use its fastest kernels.
        keep = ~pad_mask if bool(pad_mask.any()) else None
        pos = self.pos_t[:t, None, None] + self.pos_h[None, :h, None] + self.pos_w[None, None, :w]  # (T, H, W, D)
        x = self.dropout(self.embed_norm(self.embedding(tokens) + pos))  # (B, T, H, W, D)
        # Dropout after the expansion: each clip draws its own [CLS] dropout mask, as every token
        # of x does (one mask shared by the batch would correlate the clips' [CLS] noise).
        cls = self.dropout(self.embed_norm(self.cls + self.pos_cls).expand(b, -1))  # (B, D)
        for layer in self.layers:
            x, cls = layer(x, cls, keep)
        return self.final_norm(cls), self.final_norm(x)

    @torch.no_grad()
    def resize_positions(self, frames: int | None = None, grid: int | None = None) -> None:
        """Linearly interpolate the positional tables to a new T and/or H = W (Appendix C.1, as
        ViT does): the paper pretrains at 5 x 128 px and continues / fine-tunes at 10 x 256 px."""

        def resize(table: torch.Tensor, n: int) -> nn.Parameter:
            if table.shape[0] == n:
                return nn.Parameter(table.clone())
            x = table.t().unsqueeze(0)  # (1, D, L)
            return nn.Parameter(F.interpolate(x.float(), size=n, mode="linear", align_corners=False)[0].t().to(table.dtype))

        if frames is not None:
            self.pos_t = resize(self.pos_t.data, frames)
            self.config.frames = frames
        if grid is not None:
            self.pos_h = resize(self.pos_h.data, grid)
            self.pos_w = resize(self.pos_w.data, grid)
            self.config.grid = grid


def load_state_resized(model: VideoTransformer, state: dict[str, torch.Tensor]) -> None:
    """Load a backbone state dict whose positional tables may have another T or grid,
    interpolating them to the model's (ValueError naming the mismatch for anything else)."""
    own = model.state_dict()
    src_frames, src_grid = state["pos_t"].shape[0], state["pos_h"].shape[0]
    frames, grid = model.config.frames, model.config.grid
    if (src_frames, src_grid) != (frames, grid):
        model.resize_positions(src_frames, src_grid)
    mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and k not in ("pos_t", "pos_h", "pos_w") and v.shape != own[k].shape]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        parts = mismatched + [f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
        raise ValueError("backbone checkpoint does not match the model: " + "; ".join(parts[:6]))
    model.load_state_dict(state)
    model.resize_positions(frames, grid)


def flops_per_clip(cfg: BackboneConfig, t: int, h: int, w: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the backbone on one clip: the matmuls of every
    linear layer and of attention scores/values, [CLS] included. Used for model FLOPs utilisation."""
    n = t * h * w
    d, a, m = cfg.dim, cfg.attn_dim, cfg.mlp_dim
    sizes = {"T": t, "H": h, "W": w}
    total = 0.0
    for patterns in parse_layout(cfg.layout):
        total += 2 * (n + 1) * (d * 3 * a + a * d)  # qkv and output projection
        for p in patterns:
            length = 1 + math.prod(sizes[x] for x in p.split("x"))
            rows = n // (length - 1)
            heads = cfg.n_heads // len(patterns)
            total += 2 * 2 * rows * length * length * heads * cfg.head_dim  # QK^T and AV per row
    total += 2 * (n + 1) * 2 * d * m  # MLP
    return cfg.n_layers * total
