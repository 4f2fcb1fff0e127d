"""The paper's fixed spatial views of a clip (VIMPAC Appendix C, Table 4).

Tokens are extracted once, ahead of training, so spatial augmentation is a fixed set of views
computed here rather than a random crop per step:

- pretraining: one view, ``s100_c``: resize the shorter side to S, center crop S x S.
- downstream: 12 views = 2 resizes (shorter side S and 1.25·S) x 3 crops (top-left, center,
  bottom-right) x horizontal flip. Flip-sensitive datasets (SSv2: left/right motion is the
  label) get only the 6 unflipped views.

Names and order. ``s100_tl, s100_c, s100_br, s125_tl, s125_c, s125_br``, then the same six with
a ``_flip`` suffix. The six unflipped views come first so a flip-sensitive dataset's list is a
prefix of the full one and view indices agree between the two. Names carry no dots: they
become WebDataset member names (``<key>.<view>.<encoding>``), where a dot would move the split
between key and extension. The pretraining view is the same computation as the downstream
``s100_c``, so the two are bit-identical for the same frames.

Geometry. The 1.25·S scale is ``int(round(1.25 * S))`` (S=128 -> 160, S=256 -> 320). A frame is
resized so its shorter side equals the scale, the longer side to ``round_half_up(long * scale /
short)`` (aspect preserved). On that image an S x S crop is taken at top-left ``(0, 0)``, center
``((H - S) // 2, (W - S) // 2)`` or bottom-right ``(H - S, W - S)``. A source smaller than the
scale is upscaled the same way.

Flip is applied after cropping: ``s125_tl_flip`` is exactly ``s125_tl[:, :, ::-1]``. The paper
words it as flipping the raw frames, which would make "top-left of the flipped frame" the
mirror of the top-right region, a region no unflipped view shows. Mirroring the crop keeps the
flipped half a pure mirror of the unflipped half: the two sets cover the same pixels, a person
checking a contact sheet can verify every flipped row against its partner, and the 12 views
remain the paper's 2 x 3 x 2 grid of scales, positions and orientations.

Resizing. Pillow's BILINEAR filter, which widens its support by the reduction factor when
downscaling (the same triangle antialiasing as ``torch.nn.functional.interpolate(...,
antialias=True)``, within 1 level on uint8). Candidates, ms per frame to a shorter side of 160
(one core of the AMD EPYC dev machine, Pillow 13, PyAV 18, torch 2.13, smooth content):

=================  ======  ============  =========  ================  ==============
source             Pillow  Pillow gap=2  PyAV AREA  PyAV AREA exact*  torch uint8 aa
=================  ======  ============  =========  ================  ==============
1080x1920          8.6     4.3           4.0-6.0    3.2               5.6
240x320            0.96    0.95          0.56       -                 0.76
100x120 (upscale)  0.46    0.38          0.46       -                 12.9
=================  ======  ============  =========  ================  ==============

(*) ``AREA | BITEXACT | ACCURATE_RND``.

Whole ``make_views`` calls, ms per source frame (both resizes, every crop and mirror; best of
several runs on a shared machine, so +-20%): 1080p source 8.4-10 (pretrain) and 18-19
(downstream, S=128 or 160); 240p source 0.5-0.9 and 1.7-3; a 640x426 h264 video 4.5-4.9
(downstream).

Pillow is chosen for determinism, at a known cost. It resamples in fixed-point integer
arithmetic on a single C code path with no run-time CPU dispatch, so a Pillow version gives the
same bytes on any machine and thread count, which a content-addressed cache relies on.
swscale is 2.5x faster at 1080p and has a ``BITEXACT`` flag, but it selects SIMD kernels per
CPU at run time and its exactness rests on every kernel honouring that flag; torch's uint8
antialias kernel has an AVX2 path beside a generic one and is slow when upscaling. The cost
is bounded: a 30 FPS 1080p h264 source decodes at about 3 ms per frame here, so each 2 FPS
sample already costs about 45 ms of decoding (15 source frames) against 10 ms of extra resize
for the 12 downstream views. ``reducing_gap`` (box pre-shrink) is left off: it saves about
4 ms on a 1080p frame but moves pixels by up to 4 levels away from the exact filter.

Every frame is processed on its own, so a caller may split a long clip along time, compute
views per chunk and concatenate: the result is identical to one call.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

ViewKind = Literal["pretrain", "downstream"]

# Scale name -> factor applied to S. Names stay dot-free (see module docstring).
SCALES: dict[str, float] = {"s100": 1.0, "s125": 1.25}
CROPS: tuple[str, ...] = ("tl", "c", "br")
FLIP_SUFFIX = "_flip"
PRETRAIN_VIEW = "s100_c"

_RESAMPLE = Image.Resampling.BILINEAR


class ViewSpec(NamedTuple):
    """One fixed view: its name, the shorter-side scale name, crop position and flip."""

    name: str
    scale: str
    crop: str
    flip: bool


def _spec(scale: str, crop: str, flip: bool) -> ViewSpec:
    return ViewSpec(f"{scale}_{crop}{FLIP_SUFFIX if flip else ''}", scale, crop, flip)


def view_specs(kind: ViewKind, flip_sensitive: bool = False) -> list[ViewSpec]:
    """The views of `kind`, in storage order (unflipped six, then their mirrors)."""
    if kind == "pretrain":
        return [_spec("s100", "c", False)]
    if kind != "downstream":
        raise ValueError(f"unknown view kind {kind!r}; expected 'pretrain' or 'downstream'")
    flips = (False,) if flip_sensitive else (False, True)
    return [_spec(scale, crop, flip) for flip in flips for scale in SCALES for crop in CROPS]


def view_names(kind: ViewKind, flip_sensitive: bool = False) -> list[str]:
    """Names of the views of `kind`: 1 for pretraining, 12 downstream, 6 if flip-sensitive."""
    return [s.name for s in view_specs(kind, flip_sensitive)]


def parse_view_name(name: str) -> ViewSpec:
    """The spec behind a view name, e.g. ``"s125_br_flip"``; ValueError for unknown names."""
    for spec in view_specs("downstream"):
        if spec.name == name:
            return spec
    raise ValueError(f"unknown view name {name!r}; expected one of {view_names('downstream')}")


def scaled_size(size: int, scale: str) -> int:
    """Shorter side for a scale name: ``int(round(factor * size))`` (S=128: s125 -> 160).

    Python rounds halves to even, which only matters when S = 2 mod 4 (S=10: s125 -> 12).
    """
    return int(round(SCALES[scale] * size))


def _resized_hw(h: int, w: int, short: int) -> tuple[int, int]:
    # Integer round-half-up, so the size never depends on float rounding of the ratio.
    if h <= w:
        return short, (2 * w * short + h) // (2 * h)
    return (2 * h * short + w) // (2 * w), short


def crop_offset(h: int, w: int, size: int, crop: str) -> tuple[int, int]:
    """(top, left) of an S x S crop at position `crop` in an H x W image."""
    if crop == "tl":
        return 0, 0
    if crop == "c":
        return (h - size) // 2, (w - size) // 2
    if crop == "br":
        return h - size, w - size
    raise ValueError(f"unknown crop {crop!r}; expected one of {CROPS}")


def _check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    if min(frames.shape[:3]) < 1:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {frames.shape}")


def _resize_frame(frame: np.ndarray, h: int, w: int, image: Image.Image | None = None) -> np.ndarray:
    """`frame` resized to (h, w); `image` is the same frame already wrapped by Pillow, if any."""
    if frame.shape[:2] == (h, w):
        return frame
    return np.asarray((image or Image.fromarray(frame)).resize((w, h), _RESAMPLE))


def resize_short_side(frames: np.ndarray, short: int) -> np.ndarray:
    """Resize (T, H, W, 3) uint8 frames so the shorter side is `short`, aspect preserved.

    Antialiased bilinear (Pillow), deterministic; frames already at that size come back
    unchanged (copied).
    """
    _check_frames(frames)
    if short < 1:
        raise ValueError(f"short side must be >= 1, got {short}")
    h, w = _resized_hw(frames.shape[1], frames.shape[2], short)
    out = np.empty((frames.shape[0], h, w, 3), dtype=np.uint8)
    for t, frame in enumerate(frames):
        out[t] = _resize_frame(frame, h, w)
    return out


def make_views(frames: np.ndarray, size: int, kind: ViewKind, flip_sensitive: bool = False) -> dict[str, np.ndarray]:
    """Fixed views of a clip: name -> (T, size, size, 3) uint8, C-contiguous, in view_names order.

    `frames` is (T, H, W, 3) uint8 RGB of any aspect and size; each frame is resized once per
    scale and every crop and mirror is cut from that one resized frame, so memory beyond the
    outputs is a single resized frame.
    """
    _check_frames(frames)
    if size < 1:
        raise ValueError(f"view size must be >= 1, got {size}")
    specs = view_specs(kind, flip_sensitive)
    t_len, src_h, src_w = frames.shape[:3]
    out = {s.name: np.empty((t_len, size, size, 3), dtype=np.uint8) for s in specs}
    plans = []
    for scale in dict.fromkeys(s.scale for s in specs):
        h, w = _resized_hw(src_h, src_w, scaled_size(size, scale))
        cuts = [(out[s.name], *crop_offset(h, w, size, s.crop), s.flip) for s in specs if s.scale == scale]
        plans.append((h, w, cuts))
    for t in range(t_len):
        # Wrapping a frame for Pillow copies it (1.5 ms at 1080p): do it once for both scales.
        image = Image.fromarray(frames[t]) if any((h, w) != (src_h, src_w) for h, w, _ in plans) else None
        for h, w, cuts in plans:
            resized = _resize_frame(frames[t], h, w, image)
            for dest, top, left, flip in cuts:
                view = resized[top : top + size, left : left + size]
                dest[t] = view[:, ::-1] if flip else view
    return out
