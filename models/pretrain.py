"""The VIMPAC pretraining model: backbone + token head + contrastive head, and the objective
L = L_mask + alpha * gamma * L_cl of eq. (6).

Objectives (Table 7): "mp+cl" (the paper's), "mp" (alpha = 0: no contrastive head is built),
"cl" (contrastive only: no token head; unmasked clips unless cl_input is "masked").

Contrastive input (Table 12, `cl_input`): "masked", the paper's default with mask-then-predict,
shares one forward of the masked clips between both heads (Sec. 3.3: "the contrastive learning
loss using the same block-masked inputs"); "unmasked" runs a second forward of the intact clips
for the contrastive head while mask-then-predict keeps the masked one.

The heads and losses run in fp32 with autocast off: under bf16 autocast an fp32 input is cast
back to bf16 by every matmul, so the token logits and the contrastive similarities would be
rounded to 8 significant bits (~1e-2 on a logit of a few units) before the softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from models.backbone import BackboneConfig, VideoTransformer, config_from_dict
from models.heads import ContrastiveHead, TokenHead
from models.losses import info_nce, masked_token_loss, upcast

OBJECTIVES = ("mp+cl", "mp", "cl")
CL_INPUTS = ("masked", "unmasked")


@dataclass
class PretrainModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    objective: str = "mp+cl"
    alpha: float = 1.0  # contrastive loss weight (Table 16)
    temperature: float = 0.2  # gamma of eq. (4)-(6)
    cl_hidden: int = 2048  # contrastive head: 2 x 2048 (small), 3 x 4096 (large-half)
    cl_layers: int = 2
    cl_dim: int = 256
    # Clips the contrastive head sees (Table 12); None: the objective's default, which is also what
    # a checkpoint written before this field trained with.
    cl_input: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.cl_input is None:
            self.cl_input = default_cl_input(self.objective)
        if self.cl_input not in CL_INPUTS:
            raise ValueError(f"cl_input must be one of {', '.join(CL_INPUTS)}, got {self.cl_input!r}")

    @property
    def uses_mask(self) -> bool:
        return self.objective in ("mp+cl", "mp")

    @property
    def uses_contrastive(self) -> bool:
        return self.objective in ("mp+cl", "cl") and self.alpha > 0

    @property
    def masks_inputs(self) -> bool:
        """Whether the clips are masked before the forward: for mask-then-predict, or for
        contrastive learning alone on masked clips (Table 12's second row)."""
        return self.uses_mask or (self.uses_contrastive and self.cl_input == "masked")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainModelConfig":
        return config_from_dict(cls, data, "pretrain")


def default_cl_input(objective: str) -> str:
    """The paper's contrastive input per objective (Table 12, defaults underlined): the masked
    clips with mask-then-predict (69.4 on UCF101, the MP+CL row of Table 7), the intact clips for
    contrastive learning alone (57.1, Table 7's CL row; masking them costs 1.6)."""
    return "unmasked" if objective == "cl" else "masked"


def _fp32(x: torch.Tensor) -> torch.autocast:
    """Autocast off on x's device: inside autocast, .float() inputs alone would be cast back."""
    return torch.autocast(x.device.type, enabled=False)


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
                mask_norm: float | torch.Tensor | None = None, cl_scale: float = 1.0,
                return_hits: bool = False) -> dict[str, torch.Tensor]:
        """inputs, targets, predict, pad_mask: (B, 2, T, H, W), the two clips of each video
        (masked ids, original ids, where to predict, where padded); video_index: (B,).

        With cl_input "unmasked" the contrastive head sees a forward of `targets`, the intact
        clips (of `inputs` when no targets are given: contrastive learning alone on clips that
        were never masked).

        Returns "loss" (what to backpropagate) and detached statistics: mask_ce_sum, mask_correct,
        n_predicted, cl_loss, cl_acc; with `return_hits` also mask_hits, (N,) bool: which predicted
        positions were right, in the order of the (2B, T, H, W) clips' masked positions.
        """
        b, two = inputs.shape[:2]
        if two != 2:
            raise ValueError(f"expected two clips per video, got inputs of shape {tuple(inputs.shape)}")

        def clips(x: torch.Tensor) -> torch.Tensor:
            return x.transpose(0, 1).reshape(2 * b, *x.shape[2:])  # (2B, T, H, W): all c_i, then all c'_i

        pad = None if pad_mask is None else clips(pad_mask)
        intact_cl = self.contrastive_head is not None and self.config.cl_input == "unmasked" and targets is not None
        if self.token_head is not None or not intact_cl:
            cls, hidden = self.backbone(clips(inputs), pad)  # (2B, D), (2B, T, H, W, D)
        if intact_cl:
            # Table 12's "CL-Mask" unticked: [CLS] of a second forward, on the intact clips.
            cls, _ = self.backbone(clips(targets), pad)  # (2B, D)
        loss = cls.new_zeros((), dtype=torch.float64 if cls.dtype == torch.float64 else torch.float32)
        out: dict[str, torch.Tensor] = {}
        if self.token_head is not None:
            if targets is None or predict is None:
                raise ValueError("the mask-then-predict objective needs targets and predict masks")
            where = clips(predict)
            with _fp32(hidden):
                logits = self.token_head(upcast(hidden[where]))  # (N, V): only masked positions are decoded
                mask_loss, ce_sum, correct = masked_token_loss(logits, clips(targets)[where], mask_norm)
            loss = loss + mask_loss
            out.update(mask_ce_sum=ce_sum, mask_correct=correct.detach(), n_predicted=where.sum().detach())
            if return_hits:
                out["mask_hits"] = (logits.argmax(-1) == clips(targets)[where]).detach()
        if self.contrastive_head is not None:
            with _fp32(cls):
                feats = self.contrastive_head(upcast(cls))  # (2B, E)
                cl_loss, cl_acc = info_nce(feats[:b], feats[b:], self.config.temperature, video_index)
            weight = self.config.alpha * self.config.temperature
            loss = loss + weight * cl_scale * cl_loss
            out.update(cl_loss=cl_loss.detach(), cl_acc=cl_acc.detach())
        out["loss"] = loss
        return out
