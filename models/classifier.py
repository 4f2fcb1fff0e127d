"""The fine-tuning model: the VIMPAC backbone plus one linear layer on [CLS] (App. A.2).

"When fine-tuning for action classification task, we add a fully-connected (FC) layer to the
[CLS] output h_CLS. We initialize its weight and bias to zero." With a zero layer every class
starts at the same logit, so the first steps train the classifier from a uniform prediction
instead of from random scores that would push large gradients into the pretrained backbone.
Table 4: dropout 0.0 before that layer, backbone dropout 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from models.backbone import BackboneConfig, VideoTransformer, config_from_dict


@dataclass
class ClassifierConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    n_classes: int = 101
    head_dropout: float = 0.0  # "Last FC Dropout" of Table 4

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if self.n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        if not 0 <= self.head_dropout < 1:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        return config_from_dict(cls, data, "classifier")


class VideoClassifier(nn.Module):
    """tokens (B, T, H, W) -> class logits (B, n_classes)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg
        self.backbone = VideoTransformer(cfg.backbone)
        self.dropout = nn.Dropout(cfg.head_dropout)
        self.fc = nn.Linear(cfg.backbone.dim, cfg.n_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        cls, _ = self.backbone(tokens, pad_mask)  # (B, D)
        return self.fc(self.dropout(cls))  # (B, C)
