"""The interface every image tokenizer offers the pipeline (trained VQ-VAE or DALL-E dVAE).

Frames go in as float tensors in [0, 1], shape (B, 3, H, W), H and W multiples of
`downsample`; tokens come out as int64 code indices, shape (B, H/downsample, W/downsample).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ImageTokenizer(Protocol):
    codebook_size: int  # number of codes; token ids are in [0, codebook_size)
    downsample: int  # pixels per token along each side (8 for the paper's 128 px -> 16x16)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, H/d, W/d) int64 code indices."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int64 code indices -> (B, 3, h*d, w*d) float in [0, 1]."""
        ...
