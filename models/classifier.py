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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import BackboneConfig, VideoTransformer, config_from_dict
from models.heads import SyncBatchNorm1d

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


class VideoClassifier(nn.Module):
    """tokens (B, T, H, W) -> class logits (B, n_classes)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        self.backbone = VideoTransformer(cfg.backbone)
        self.norm = SyncBatchNorm1d(cfg.backbone.dim, affine=False, eps=BN_EPS) if cfg.head_norm == "batch" else nn.Identity()
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.fc = nn.Linear(cfg.backbone.dim, cfg.n_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def features(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled clip feature (B, D) the head reads."""
        cls, hidden = self.backbone(tokens, pad_mask)  # (B, D), (B, T, H, W, D)
        if self.config.pool == "cls":
            return cls
        keep = ~(pad_mask if pad_mask is not None else tokens == self.config.backbone.pad_id)
        return pool_tokens(hidden, keep)

    def normalise(self, feature: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.BatchNorm1d) and self.training and feature.shape[0] == 1:
            # A batch of one has no spread to standardise by: use the running statistics.
            return F.batch_norm(feature, self.norm.running_mean, self.norm.running_var, training=False, eps=self.norm.eps)
        return self.norm(feature)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        feature = self.features(tokens, pad_mask)  # (B, D)
        return self.fc(self.dropout(self.normalise(feature.float())))  # (B, C)
