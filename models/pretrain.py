"""The VIMPAC pretraining model: backbone + token head + contrastive head, and the objective
L = L_mask + alpha * gamma * L_cl of eq. (6).

Objectives (Table 7): "mp+cl" (the paper's), "mp" (alpha = 0: no contrastive head is built),
"cl" (contrastive only: no token head; feed unmasked clips).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from models.backbone import BackboneConfig, VideoTransformer, config_from_dict
from models.heads import ContrastiveHead, TokenHead
from models.losses import info_nce, masked_token_loss

OBJECTIVES = ("mp+cl", "mp", "cl")


@dataclass
class PretrainModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    objective: str = "mp+cl"
    alpha: float = 1.0  # contrastive loss weight (Table 16)
    temperature: float = 0.2  # gamma of eq. (4)-(6)
    cl_hidden: int = 2048  # contrastive head: 2 x 2048 (small), 3 x 4096 (large-half)
    cl_layers: int = 2
    cl_dim: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def uses_mask(self) -> bool:
        return self.objective in ("mp+cl", "mp")

    @property
    def uses_contrastive(self) -> bool:
        return self.objective in ("mp+cl", "cl") and self.alpha > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainModelConfig":
        return config_from_dict(cls, data, "pretrain")


class VIMPACPretrainer(nn.Module):
    def __init__(self, cfg: PretrainModelConfig):
        super().__init__()
        self.config = cfg
        b = cfg.backbone
        self.backbone = VideoTransformer(b)
        self.token_head = TokenHead(b.dim, self.backbone.embedding, b.n_codes, b.ln_eps, b.init_std) if cfg.uses_mask else None
        self.contrastive_head = (
            ContrastiveHead(b.dim, cfg.cl_hidden, cfg.cl_dim, cfg.cl_layers, b.init_std) if cfg.uses_contrastive else None
        )

    def head_params(self) -> int:
        """Parameters of the heads, the tied embedding not counted twice."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in backbone)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None, predict: torch.Tensor | None = None,
                video_index: torch.Tensor | None = None, pad_mask: torch.Tensor | None = None,
                mask_norm: float | torch.Tensor | None = None, cl_scale: float = 1.0) -> dict[str, torch.Tensor]:
        """inputs, targets, predict, pad_mask: (B, 2, T, H, W), the two clips of each video
        (masked ids, original ids, where to predict, where padded); video_index: (B,).

        Returns "loss" (what to backpropagate) and detached statistics: mask_ce_sum, mask_correct,
        n_predicted, cl_loss, cl_acc.
        """
        b, two = inputs.shape[:2]
        if two != 2:
            raise ValueError(f"expected two clips per video, got inputs of shape {tuple(inputs.shape)}")

        def clips(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(0, 1).reshape(2 * b, *x.shape[2:])  # (2B, T, H, W): all c_i, then all c'_i

        cls, hidden = self.backbone(clips(inputs), None if pad_mask is None else clips(pad_mask))  # (2B, D), (2B, T, H, W, D)
        loss = hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        out: dict[str, torch.Tensor] = {}
        if self.token_head is not None:
            if targets is None or predict is None:
                raise ValueError("the mask-then-predict objective needs targets and predict masks")
            where = clips(predict)
            logits = self.token_head(hidden[where])  # (N, V): only masked positions are decoded
            mask_loss, ce_sum, correct = masked_token_loss(logits, clips(targets)[where], mask_norm)
            loss = loss + mask_loss
            out.update(mask_ce_sum=ce_sum, mask_correct=correct.detach(), n_predicted=where.sum().detach())
        if self.contrastive_head is not None:
            feats = self.contrastive_head(cls)  # (2B, E)
            cl_loss, cl_acc = info_nce(feats[:b], feats[b:], self.config.temperature, video_index)
            weight = self.config.alpha * self.config.temperature
            loss = loss + weight * cl_scale * cl_loss
            out.update(cl_loss=cl_loss.detach(), cl_acc=cl_acc.detach())
        out["loss"] = loss
        return out
