"""A PNG contact sheet of stored views, for a person to check crops, scales and flips by eye.

Layout, top to bottom: for each video, one row per view in the order given; each row is a
label strip (``"video_id / view_name"`` in Pillow's built-in bitmap font, so no font files are
needed) above up to `max_frames` evenly spaced frames of the view, left to right in time.
Frames are separated by ``GAP`` pixels, videos by an extra ``VIDEO_GAP`` with a faint rule, and the
whole sheet
has a ``MARGIN`` border, on a dark background so frame edges stay visible. Frames are pasted at
their stored size, never rescaled, so what the sheet shows is exactly what was stored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MARGIN = 4
GAP = 2
VIDEO_GAP = 8
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)
RULE = (110, 110, 110)


def frame_indices(n_frames: int, max_frames: int) -> list[int]:
    """Up to `max_frames` evenly spaced indices into `n_frames`, first and last included."""
    n = min(n_frames, max_frames)
    if n <= 0:
        return []
    # Spacing is >= 1 when n <= n_frames, so rounding never repeats an index.
    return [int(i) for i in np.round(np.linspace(0, n_frames - 1, n))]


def _check(video_id: str, name: str, frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}"
        raise ValueError(f"{video_id} / {name}: expected (T, H, W, 3) uint8 frames, got {got}")
    if frames.shape[0] < 1:
        raise ValueError(f"{video_id} / {name}: no frames")


def contact_sheet(rows: list[tuple[str, dict[str, np.ndarray]]], path: str | Path, *, max_frames: int = 8, label_height: int = 14) -> Path:
    """Write a PNG grid of `rows` = [(video_id, {view_name: (T, S, S, 3) uint8})] to `path`."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    lines = [(vid, name, frames) for vid, views in rows for name, frames in views.items()]
    if not lines:
        raise ValueError("contact_sheet: nothing to draw (no videos or no views)")
    for vid, name, frames in lines:
        _check(vid, name, frames)

    font = ImageFont.load_default_imagefont()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = 0
    for vid, name, frames in lines:
        n = len(frame_indices(frames.shape[0], max_frames))
        strip = n * frames.shape[2] + (n - 1) * GAP
        text = int(np.ceil(measure.textlength(f"{vid} / {name}", font=font)))
        width = max(width, strip, text)
    height = sum(label_height + frames.shape[1] + GAP for _, _, frames in lines) - GAP
    height += VIDEO_GAP * (len(rows) - 1)

    sheet = Image.new("RGB", (width + 2 * MARGIN, height + 2 * MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = MARGIN
    for i, (vid, views) in enumerate(rows):
        if i:
            # A faint rule in the middle of the gap marks where the next video starts.
            rule = y + VIDEO_GAP // 2 - 1
            draw.line([(MARGIN, rule), (MARGIN + width - 1, rule)], fill=RULE)
            y += VIDEO_GAP
        for name, frames in views.items():
            # Bitmap glyphs are about 11 px tall: centre them in the label strip.
            draw.text((MARGIN, y + max(0, (label_height - 11) // 2)), f"{vid} / {name}", fill=TEXT, font=font)
            top = y + label_height
            for k, t in enumerate(frame_indices(frames.shape[0], max_frames)):
                sheet.paste(Image.fromarray(np.ascontiguousarray(frames[t])), (MARGIN + k * (frames.shape[2] + GAP), top))
            y = top + frames.shape[1] + GAP
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, "PNG")
    return path
