"""Masking for the mask-then-predict task (Sec. 3.1, Appendix B.1, Tables 2, 8, 9, 15).

Block masking: the union of `n_blocks` cuboids per clip. A cuboid's lengths are uniform in
[1, floor(2T/3)] x [1, H/2] x [1, W/2] and its position is uniform among those that fit. The
temporal bound is floor(2T/3), as in the authors' code (`l * 2 // 3`): the appendix says "round
up", but only the floor reproduces Table 2 (5 frames, 16x16, 5 blocks -> 14.5%).

Tube masking (VideoMAE, Tong et al. 2022, Sec. 3.3) is offered beside it: the same random
rectangles in (H, W), each spanning every frame. The paper's cuboids span at most 2/3 of the
frames, so a masked token can often be copied from the same position in a visible frame (the
trivial solution its Appendix and Table 8 discuss); a tube hides a position in all frames, so
filling it takes the spatial context and, where something moves through it, the motion.

The number of blocks is chosen per resolution as the one whose induced ratio is closest to
15% (BERT's ratio). `induced_ratio` computes that ratio exactly: one cuboid covers position
(t, h, w) with probability p_T(t) p_H(h) p_W(w), so n independent cuboids cover it with
probability 1 - (1 - p_T p_H p_W)^n.

Everything is vectorised over the batch and the blocks (no Python loop per sample or block),
so masks are cheap to make in data-loader workers.
"""

from __future__ import annotations

import torch


def _axis_max_len(size: int, temporal: bool) -> int:
    return max(1, (2 * size) // 3 if temporal else size // 2)


def _axis_cover_prob(size: int, max_len: int) -> torch.Tensor:
    """P(position i lies in [start, start + len)) for len ~ U{1..max_len}, start ~ U{0..size-len}."""
    i = torch.arange(size, dtype=torch.float64)
    p = torch.zeros(size, dtype=torch.float64)
    for length in range(1, max_len + 1):
        starts = size - length + 1
        lo = torch.clamp(i - length + 1, min=0)  # first start covering i
        hi = torch.clamp(i, max=starts - 1)  # last start covering i
        p += (hi - lo + 1).clamp(min=0) / starts
    return p / max_len


def induced_ratio(t: int, h: int, w: int, n_blocks: int, tube: bool = False) -> float:
    """Expected fraction of masked tokens under block masking (Table 2), exactly; with `tube`,
    under tube masking (every block spans all frames)."""
    pt = torch.ones(t, dtype=torch.float64) if tube else _axis_cover_prob(t, _axis_max_len(t, True))
    ph = _axis_cover_prob(h, _axis_max_len(h, False))
    pw = _axis_cover_prob(w, _axis_max_len(w, False))
    p = pt[:, None, None] * ph[None, :, None] * pw[None, None, :]  # (T, H, W)
    return float((1 - (1 - p) ** n_blocks).mean())


def blocks_for_ratio(t: int, h: int, w: int, target: float = 0.15, max_blocks: int = 64, tube: bool = False) -> int:
    """The block count whose induced ratio is closest to `target` (Appendix B.1, bold in Table 2)."""
    return min(range(1, max_blocks + 1), key=lambda n: abs(induced_ratio(t, h, w, n, tube) - target))


def block_mask(shape: tuple[int, int, int, int], n_blocks: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T, H, W) bool: True where a token is masked; each sample gets its own `n_blocks` cuboids."""
    b, t, h, w = shape
    sizes = torch.tensor([t, h, w], device=device)
    max_len = torch.tensor([_axis_max_len(t, True), _axis_max_len(h, False), _axis_max_len(w, False)], device=device)
    u = torch.rand((2, b, n_blocks, 3), generator=generator, device=device)
    length = 1 + (u[0] * max_len).long()  # (B, n, 3) uniform in [1, max_len]
    start = (u[1] * (sizes - length + 1)).long()  # (B, n, 3) uniform in [0, size - length]
    end = start + length

    def axis(i: int, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device)
        return (pos >= start[..., i, None]) & (pos < end[..., i, None])  # (B, n, size)

    in_t, in_h, in_w = axis(0, t), axis(1, h), axis(2, w)
    cuboids = in_t[:, :, :, None, None] & in_h[:, :, None, :, None] & in_w[:, :, None, None, :]  # (B, n, T, H, W)
    return cuboids.any(dim=1)


def tube_mask(shape: tuple[int, int, int, int], n_blocks: int, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, T, H, W) bool: the union of `n_blocks` rectangles per sample (lengths and positions drawn
    as block masking draws them in H and W), each masked in every frame."""
    b, t, h, w = shape
    spatial = block_mask((b, 1, h, w), n_blocks, generator, device)  # (B, 1, H, W): a 1-frame cuboid is a rectangle
    return spatial.expand(b, t, h, w).contiguous()


def iid_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """Each token masked independently with probability `ratio` (the paper's i.i.d. baseline)."""
    return torch.rand(shape, generator=generator, device=device) < ratio


def corrupt(tokens: torch.Tensor, mask: torch.Tensor, *, pad_id: int, mask_id: int, n_codes: int,
            replacement: str = "mask", generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a mask: returns (inputs, predict).

    `predict` marks the positions the loss is computed on: masked and not [PAD]. With
    replacement="mask" every such position becomes [MASK] (the paper's setting); with "bert",
    80% become [MASK], 10% a random code and 10% keep their token (BERT's rule, per token).
    """
    predict = mask & (tokens != pad_id)
    inputs = tokens.clone()
    if replacement == "mask":
        inputs[predict] = mask_id
        return inputs, predict
    if replacement != "bert":
        raise ValueError(f"replacement must be 'mask' or 'bert', got {replacement!r}")
    u = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    random_codes = torch.randint(0, n_codes, tokens.shape, generator=generator, device=tokens.device)
    inputs = torch.where(predict & (u < 0.8), torch.full_like(tokens, mask_id), inputs)
    inputs = torch.where(predict & (u >= 0.8) & (u < 0.9), random_codes, inputs)
    return inputs, predict


def copy_prediction(tokens: torch.Tensor, predict: torch.Tensor, pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The copy-paste answer to mask-then-predict: every masked token guessed as the token at
    the same (h, w) in the nearest frame where that position is visible (earlier frame on a tie).

    The paper's Appendix notes that copying neighbouring tokens already reconstructs much of a
    masked video, and Table 8 ties i.i.d. masking's higher mask accuracy to that trivial solution.
    Accuracy on the masked tokens this guess gets wrong measures what a model learned beyond copying
    (motion, object shape); on the demo it was the number that showed pretraining had not learned
    the dynamics (docs/learning.md).

    tokens, predict, pad: (B, T, H, W). Returns (guess, has_guess): guess is -1 where no frame
    shows the position (every frame masked or padded there) and outside `predict`.
    """
    t = tokens.shape[1]
    visible = ~predict if pad is None else ~predict & ~pad
    guess = torch.full_like(tokens, -1)
    found = torch.zeros_like(predict)
    frames = torch.arange(t, device=tokens.device)
    for distance in range(1, t):
        for source in (frames - distance, frames + distance):
            inside = (source >= 0) & (source < t)  # (T,)
            src = source.clamp(0, t - 1)
            take = predict & ~found & visible[:, src] & inside.view(1, t, 1, 1)
            guess = torch.where(take, tokens[:, src], guess)
            found = found | take
    return guess, found
