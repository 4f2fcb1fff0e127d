"""The fine-tuning model: the VIMPAC backbone, a pooled clip feature, and one linear layer (App. A.2).

"When fine-tuning for action classification task, we add a fully-connected (FC) layer to the
[CLS] output h_CLS. We initialize its weight and bias to zero." With a zero layer every class
starts at the same logit, so fine-tuning starts from a uniform prediction instead of random
scores pushed into the pretrained backbone. Table 4: dropout 0.0 before that layer.

Between the feature and the zero layer sits a BatchNorm without affine parameters (`head_norm =
"batch"`, MAE's linear-probing head). Why (issue 14, docs/learning.md): the paper's zero layer
assumes a [CLS] that contrastive pretraining made informative. A fresh backbone's [CLS] (the
scratch row, or a mask-only model) is nearly the same vector for every clip: post-LN keeps the
[CLS] residual stream, attention at BERT initialisation averages the clip away, and the
per-clip variation is ~0.5% of the vector. The zero layer's gradient is then dominated by that
shared vector, its rows stay parallel to it, the backbone's gradient points along it and the
final LayerNorm projects it out: training sits at ln(C) for thousands of steps. Standardising
each feature over the batch removes the shared vector and scales the per-clip differences to
unit variance, so the first steps are a linear probe and the backbone gets class-specific
gradients; the prediction still starts uniform. Under DDP the statistics span the global batch. `head_norm = "none"` is the paper's bare layer.

`pool = "mean"` uses the mean of the last layer's token states (padding excluded) instead of
[CLS], as MAE/VideoMAE fine-tune: mask-then-predict trains the token states, not [CLS].

`PixelClassifier` is the same head on the ST-MAE encoder (models/st_mae.py) over pixel clips, so
the two backbone families are fine-tuned and compared the same way (issue 17). Both tell the
optimizer which layer a parameter belongs to (`layer_id`, for layer-wise learning-rate decay:
embeddings 0, block i i + 1, final norm and head n_layers + 1, as mae_st's util/lr_decay.py and
BEiT assign them) and which >= 2-D parameters take no weight decay (`no_weight_decay`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneConfig, VideoTransformer, config_from_dict
from models.heads import SyncBatchNorm1d
from models.st_mae import STMAEConfig, STMAEEncoder

POOLS = ("cls", "mean")
HEAD_NORMS = ("batch", "none")
BN_EPS = 1e-6


@dataclass
class ClassifierConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    n_classes: int = 101
    head_dropout: float = 0.0  # "Last FC Dropout" of Table 4
    pool: str = "cls"  # "cls" (the paper) or "mean" (token states averaged)
    head_norm: str = "batch"  # "batch": non-affine BatchNorm before the zero FC; "none": the paper's bare FC

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if self.n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        data = dict(data)
        # Checkpoints written before the head had a norm are the paper's bare zero layer on [CLS].
        data.setdefault("head_norm", "none")
        data.setdefault("pool", "cls")
        return config_from_dict(cls, data, "classifier")


def pool_tokens(hidden: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, T, H, W, D) token states over the positions `keep` marks (B, T, H, W) -> (B, D)."""
    if keep is None:
        return hidden.mean((1, 2, 3))
    weight = keep.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weight).sum((1, 2, 3)) / weight.sum((1, 2, 3)).clamp_min(1)


class _HeadClassifier(nn.Module):
    """The head both families share: pooled feature -> [BatchNorm] -> dropout -> zero FC. A
    subclass adds its backbone and `features(inputs, *args) -> (B, D)`."""

    norm: nn.Module
    dropout: nn.Dropout
    fc: nn.Linear

    def _add_head(self, dim: int, n_classes: int, head_norm: str, head_dropout: float) -> None:
        self.norm = SyncBatchNorm1d(dim, affine=False, eps=BN_EPS) if head_norm == "batch" else nn.Identity()
        self.dropout = nn.Dropout(head_dropout)
        self.fc = nn.Linear(dim, n_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def normalise(self, feature: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.BatchNorm1d) and self.training and feature.shape[0] == 1:
            # A batch of one has no spread to standardise by: use the running statistics.
            return F.batch_norm(feature, self.norm.running_mean, self.norm.running_var, training=False, eps=self.norm.eps)
        return self.norm(feature)

    def forward(self, inputs: torch.Tensor, *args) -> torch.Tensor:
        feature = self.features(inputs, *args)  # (B, D)
        return self.fc(self.dropout(self.normalise(feature.float())))  # (B, C)

    @staticmethod
    def _layer_of(name: str, prefix: str, embeddings: tuple[str, ...], blocks: str, n_layers: int) -> int:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            if rest.startswith(embeddings):
                return 0
            if rest.startswith(blocks):
                return int(rest[len(blocks):].split(".", 1)[0]) + 1
        return n_layers + 1


class VideoClassifier(_HeadClassifier):
    """tokens (B, T, H, W) -> class logits (B, n_classes)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        self.backbone = VideoTransformer(cfg.backbone)
        self._add_head(cfg.backbone.dim, cfg.n_classes, cfg.head_norm, cfg.head_dropout)

    def features(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled clip feature (B, D) the head reads."""
        cls, hidden = self.backbone(tokens, pad_mask)  # (B, D), (B, T, H, W, D)
        if self.config.pool == "cls":
            return cls
        keep = ~(pad_mask if pad_mask is not None else tokens == self.config.backbone.pad_id)
        return pool_tokens(hidden, keep)

    @property
    def n_layers(self) -> int:
        return self.config.backbone.n_layers

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers (what `compile_layers` compiles one by one)."""
        return self.backbone.layers

    def layer_id(self, name: str) -> int:
        """0: token embedding, [CLS], positions and their LayerNorm; i + 1: layer i; n_layers + 1:
        the final norm and the head."""
        return self._layer_of(name, "backbone.", ("embedding.", "cls", "pos_", "embed_norm."), "layers.", self.n_layers)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the 1-D rule: [CLS] and its position are vectors, the positional tables matrices (BERT)."""
        return set()


@dataclass
class PixelClassifierConfig:
    encoder: STMAEConfig = field(default_factory=STMAEConfig)
    n_classes: int = 101
    head_dropout: float = 0.0
    pool: str = "cls"  # "cls" or "mean" (token states averaged)
    head_norm: str = "batch"

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):
            self.encoder = STMAEConfig.from_dict(self.encoder)
        if self.n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pool == "cls" and not self.encoder.cls_token:
            raise ValueError("pool 'cls' needs an encoder with a [CLS] token; this ST-MAE has none: use pool 'mean'")
        if self.head_norm not in HEAD_NORMS:
            raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {self.head_norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PixelClassifierConfig":
        return config_from_dict(cls, data, "pixel classifier")


class PixelClassifier(_HeadClassifier):
    """Normalised pixel clips (B, 3, T, S, S) -> class logits (B, n_classes), on the ST-MAE encoder."""

    def __init__(self, cfg: PixelClassifierConfig):
        super().__init__()
        self.config = cfg
        self.encoder = STMAEEncoder(cfg.encoder)
        self._add_head(cfg.encoder.dim, cfg.n_classes, cfg.head_norm, cfg.head_dropout)

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """[CLS] or the mean of the token states (B, D): every token visible."""
        return self.encoder.features(videos, self.config.pool)

    @property
    def n_layers(self) -> int:
        return self.config.encoder.depth

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.blocks

    def layer_id(self, name: str) -> int:
        """0: tubelet embedding, [CLS] and positions; i + 1: block i; n_layers + 1: the final norm and the head."""
        return self._layer_of(name, "encoder.", ("patch_embed.", "cls_token", "pos."), "blocks.", self.n_layers)

    def no_weight_decay(self) -> set[str]:
        """[CLS] and the learned positions, (1, N, D) tensors the 1-D rule misses (mae_st's no_weight_decay list)."""
        return {name for name, _ in self.named_parameters() if name == "encoder.cls_token" or name.startswith("encoder.pos.")}
