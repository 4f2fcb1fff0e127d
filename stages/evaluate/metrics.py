"""Downstream evaluation maths: test-time view protocols, score fusion and accuracy metrics.

VIMPAC App. C evaluates a video on `n` uniformly spaced temporal clips x 3 spatial crops
(top-left, center and bottom-right at the base scale; the center crop only for flip-sensitive
datasets such as SSv2, where a crop's position is part of the label's meaning), averages the
softmax probabilities over those views and reports top-1 accuracy (also top-5 and the mean
per-class accuracy). Every view's probabilities are stored per video (the catalog's
`predictions` view), so `fuse` / `metrics_from_predictions` can re-score a finished evaluation
under another protocol (center crop only, fewer clips) without running the model again.

A stored view is named ``"<clip index>/<crop view name>"``, e.g. ``"3/s100_br"``; crop view
names are those of `stages.frames.views` (``s100_tl``, ``s100_c``, ``s100_br`` at the base scale).

Only numpy (and Pillow for `confusion_png`) is needed here; pyarrow is imported lazily by
`metrics_from_predictions`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa

CROPS3: tuple[str, ...] = ("s100_tl", "s100_c", "s100_br")
CENTER: tuple[str, ...] = ("s100_c",)

# A crop name must not contain the separators used in view names ("/") and protocol names
# ("+", "x<digits>"), and must start with a letter so "1-center" / "3" stay reserved.
_CROP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.]*")
_PROTOCOL_NAME = re.compile(r"(?P<clips>[0-9]+)x(?P<crops>.+)")


# ---------------------------------------------------------------------------------------------
# View protocols
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """A test-time view protocol: the first `clips` temporal clips x the named crop views.

    The name is compact and round-trips through `parse`: ``"10x3"`` (the paper's 3 crops),
    ``"2x1-center"`` (center crop only) or ``"4xs100_tl+s100_c"`` (any other crop list).
    """

    clips: int
    crops: tuple[str, ...]

    def __post_init__(self) -> None:
        if isinstance(self.clips, bool) or not isinstance(self.clips, (int, np.integer)) or self.clips < 1:
            raise ValueError(f"a protocol needs clips >= 1 (an integer), got {self.clips!r}")
        if isinstance(self.crops, str):
            raise ValueError(f"crops must be a sequence of crop view names, not the string {self.crops!r}")
        crops = tuple(self.crops)
        if not crops:
            raise ValueError("a protocol needs at least one crop view")
        bad = [c for c in crops if not isinstance(c, str) or not _CROP_NAME.fullmatch(c)]
        if bad:
            raise ValueError(f"invalid crop view names {bad!r}: expected names like 's100_c' (a letter, then letters, digits, '_' or '.')")
        dupes = sorted({c for c in crops if crops.count(c) > 1})
        if dupes:
            raise ValueError(f"crop views listed more than once: {dupes}")
        # Frozen dataclass: normalise a list argument to a tuple so protocols hash and compare.
        object.__setattr__(self, "clips", int(self.clips))
        object.__setattr__(self, "crops", crops)

    @property
    def name(self) -> str:
        if self.crops == CENTER:
            return f"{self.clips}x1-center"
        if self.crops == CROPS3:
            return f"{self.clips}x3"
        return f"{self.clips}x" + "+".join(self.crops)

    @property
    def n_views(self) -> int:
        return self.clips * len(self.crops)

    def describe(self) -> str:
        """E.g. "10 temporal clips x 3 crops (s100_tl, s100_c, s100_br), softmax averaged"."""
        clips = f"{self.clips} temporal clip{'s' if self.clips != 1 else ''}"
        crops = f"{len(self.crops)} crop{'s' if len(self.crops) != 1 else ''} ({', '.join(self.crops)})"
        return f"{clips} x {crops}, softmax averaged"

    def view_names(self) -> list[str]:
        """The stored view names this protocol averages, clip-major: "0/s100_tl", "0/s100_c", ..."""
        return [f"{clip}/{crop}" for clip in range(self.clips) for crop in self.crops]

    def selection(self) -> dict[str, tuple]:
        """Keyword arguments selecting this protocol's views: ``fuse(scores, views, **p.selection())``."""
        return {"clips": tuple(range(self.clips)), "crops": self.crops}

    @classmethod
    def paper(cls, clips: int, flip_sensitive: bool) -> Protocol:
        """VIMPAC App. C: 3 crops, or the center crop alone for flip-sensitive datasets."""
        return cls(clips, CENTER if flip_sensitive else CROPS3)

    @classmethod
    def parse(cls, text: str) -> Protocol:
        """The protocol named `text` (the inverse of `name`)."""
        m = _PROTOCOL_NAME.fullmatch(text.strip()) if isinstance(text, str) else None
        if m is None:
            raise ValueError(
                f"not a view protocol name: {text!r}; expected '<clips>x3', '<clips>x1-center' "
                "or '<clips>x<crop>+<crop>...', e.g. '10x3', '2x1-center', '4xs100_tl+s100_c'"
            )
        clips, crops = int(m["clips"]), m["crops"]
        if crops == "3":
            return cls(clips, CROPS3)
        if crops == "1-center":
            return cls(clips, CENTER)
        try:
            return cls(clips, tuple(crops.split("+")))
        except ValueError as e:
            raise ValueError(f"not a view protocol name: {text!r} ({e})") from None


def clip_starts(n_frames: int, clip_len: int, clips: int) -> list[int]:
    """Start frames of `clips` test clips of `clip_len` frames, uniformly spaced over the video.

    SlowFast's test-time sampling (``get_start_end_idx`` with offsets), as used by VIMPAC
    App. C: with ``delta = max(n_frames - clip_len, 0)``, one clip starts at ``round(delta / 2)``
    (the middle of the video) and clip ``i`` of several at ``round(delta * i / (clips - 1))``,
    so the first clip starts at frame 0 and the last ends on the last frame.

    Rounding is half-up, done in integers so it never depends on float error (Python's
    ``round`` would round halves to even): 16 frames, clips of 5, one clip -> ``[6]``
    (delta / 2 = 5.5). A video shorter than `clip_len` gives zeros; the loader pads it.
    """
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if clip_len < 1:
        raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if clips < 1:
        raise ValueError(f"clips must be >= 1, got {clips}")
    delta = max(n_frames - clip_len, 0)
    if clips == 1:
        return [(delta + 1) // 2]
    # floor(delta * i / (clips - 1) + 1/2) without floats.
    return [(2 * delta * i + clips - 1) // (2 * (clips - 1)) for i in range(clips)]


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------


def parse_view(view: str) -> tuple[int, str]:
    """``"3/s100_br"`` -> ``(3, "s100_br")``."""
    clip, sep, crop = view.partition("/") if isinstance(view, str) else ("", "", "")
    if not sep or not clip.isdigit() or not crop:
        raise ValueError(f"invalid view name {view!r}: expected '<clip index>/<crop view name>', e.g. '0/s100_c'")
    return int(clip), crop


def fuse(
    view_scores: np.ndarray,
    views: Sequence[str],
    *,
    clips: Iterable[int] | None = None,
    crops: Iterable[str] | None = None,
) -> np.ndarray:
    """Average per-view probabilities over a selection of views (VIMPAC App. C multi-view test).

    `view_scores` is (N videos, V views, C classes) of softmax probabilities, its V axis named
    by `views` (``"<clip>/<crop>"``). Views whose clip index is in `clips` and whose crop is in
    `crops` are averaged (None selects every stored clip / crop), giving (N, C) float64.

    The selection must ask only for stored clips and crops, and, when `clips` or `crops` is
    given, every (clip, crop) pair it spans must be stored: averaging over an incomplete grid
    would silently weigh some clips or crops more than others, i.e. be another protocol.
    """
    scores = np.asarray(view_scores)
    if scores.ndim != 3:
        raise ValueError(f"view_scores must be (videos, views, classes), got shape {scores.shape}")
    views = list(views)
    if scores.shape[1] != len(views):
        raise ValueError(f"view_scores has {scores.shape[1]} views but {len(views)} view names were given")
    if not views:
        raise ValueError("no views stored: nothing to fuse")
    dupes = sorted({v for v in views if views.count(v) > 1})
    if dupes:
        raise ValueError(f"view names listed more than once: {dupes}")
    parsed = [parse_view(v) for v in views]
    if clips is None and crops is None:
        return scores.mean(axis=1, dtype=np.float64)

    stored_clips = sorted({c for c, _ in parsed})
    stored_crops = list(dict.fromkeys(k for _, k in parsed))
    want_clips = stored_clips if clips is None else sorted(set(_as_int(c) for c in clips))
    want_crops = stored_crops if crops is None else list(dict.fromkeys(crops))
    if not want_clips:
        raise ValueError("empty view selection: clips selects no clip")
    if not want_crops:
        raise ValueError("empty view selection: crops selects no crop")
    missing_clips = [c for c in want_clips if c not in stored_clips]
    missing_crops = [k for k in want_crops if k not in stored_crops]
    if missing_clips or missing_crops:
        parts = []
        if missing_clips:
            parts.append(f"clips {missing_clips} (stored: {stored_clips})")
        if missing_crops:
            parts.append(f"crops {missing_crops} (stored: {stored_crops})")
        raise ValueError("the view selection asks for views that were not stored: " + "; ".join(parts))
    index = {pc: i for i, pc in enumerate(parsed)}
    missing_views = [f"{c}/{k}" for c in want_clips for k in want_crops if (c, k) not in index]
    if missing_views:
        raise ValueError(f"the view selection spans views that were not stored: {missing_views}")
    picked = [index[(c, k)] for c in want_clips for k in want_crops]
    return scores[:, picked, :].mean(axis=1, dtype=np.float64)


def _as_int(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"clip indices must be integers, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_labels(labels, n_classes: int, what: str = "labels") -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"no {what}: cannot compute metrics over zero videos")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what} must be integer class indices, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= n_classes)
    if bad.any():
        values = sorted(set(arr[bad].tolist()))
        shown = values[:10] + (["..."] if len(values) > 10 else [])
        raise ValueError(f"{what} outside [0, {n_classes}): {shown} ({int(bad.sum())} of {arr.size} videos)")
    return arr.astype(np.int64, copy=False)


def _check_probs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be (videos, classes), got shape {p.shape}")
    if p.shape[0] == 0:
        raise ValueError("no videos: cannot compute metrics over zero videos")
    if p.shape[1] == 0:
        raise ValueError("probabilities have zero classes")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values")
    y = _check_labels(labels, p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} rows of probabilities but {y.shape[0]} labels")
    return p, y


def _ranks_of_true(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """0-based rank of each video's true class; ties go to the lower class index."""
    true = p[np.arange(len(y)), y][:, None]
    cls = np.arange(p.shape[1])[None, :]
    ahead = (p > true) | ((p == true) & (cls < y[:, None]))
    return ahead.sum(axis=1)


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of videos whose true class is among the `k` highest scores.

    `k` larger than the number of classes counts as all classes (accuracy 1). Ties are broken
    deterministically by class index, the lower index ranking first (like ``np.argmax``), so
    a video whose true class ties with a lower-indexed class for the last place is wrong.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    p, y = _check_probs(probs, labels)
    k = min(int(k), p.shape[1])
    return float(np.mean(_ranks_of_true(p, y) < k))


def predictions_of(probs: np.ndarray) -> np.ndarray:
    """Top-1 class per video (ties: the lowest class index, consistent with `topk_accuracy`)."""
    return np.asarray(probs).argmax(axis=1)


def mean_class_accuracy(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> float:
    """Mean over the classes present in `labels` of their top-1 accuracy.

    Classes with no evaluated video are left out (their accuracy is undefined), so on a
    class-imbalanced set this weighs every present class equally where top-1 weighs videos.
    """
    p, y = _check_probs(probs, labels)
    if p.shape[1] != n_classes:
        raise ValueError(f"probabilities have {p.shape[1]} classes but n_classes is {n_classes}")
    correct = predictions_of(p) == y
    videos = np.bincount(y, minlength=n_classes)
    hits = np.bincount(y, weights=correct, minlength=n_classes)
    present = videos > 0
    return float(np.mean(hits[present] / videos[present]))


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    y = _check_labels(labels, n_classes)
    pred = _check_labels(predictions, n_classes, "predictions")
    if y.shape != pred.shape:
        raise ValueError(f"{y.shape[0]} labels but {pred.shape[0]} predictions")
    return np.bincount(y * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes).astype(np.int64)


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> list[dict]:
    """One dict per class: class, index, videos, correct, accuracy (None for a class with no videos)."""
    matrix = confusion_matrix(labels, predictions, len(classes))
    videos = matrix.sum(axis=1)
    correct = np.diag(matrix)
    return [
        {
            "class": name,
            "index": i,
            "videos": int(videos[i]),
            "correct": int(correct[i]),
            "accuracy": float(correct[i] / videos[i]) if videos[i] else None,
        }
        for i, name in enumerate(classes)
    ]


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> dict[str, float]:
    """The reported metrics (VIMPAC App. C): top-1, top-5 (k capped at C) and mean-class accuracy."""
    p, y = _check_probs(probs, labels)
    if p.shape[1] != n_classes:
        raise ValueError(f"probabilities have {p.shape[1]} classes but n_classes is {n_classes}")
    ranks = _ranks_of_true(p, y)
    return {
        "top1": float(np.mean(ranks < 1)),
        "top5": float(np.mean(ranks < min(5, n_classes))),
        "mean_class": mean_class_accuracy(p, y, n_classes),
    }


def metrics_from_predictions(
    rows: pa.Table,
    n_classes: int,
    *,
    clips: Iterable[int] | None = None,
    crops: Iterable[str] | None = None,
) -> dict[str, float]:
    """Re-fuse stored per-view scores and score them: `classification_metrics` of `fuse(...)`.

    `rows` has the catalog's `predictions` columns ``label_index``, ``views`` (list<string>)
    and ``view_scores`` (list<list<float>>, one probability vector per view), e.g.
    ``Catalog(home).query("SELECT label_index, views, view_scores FROM predictions WHERE eval_id = ?", [eid])``.
    A row whose views are stored in another order is reordered to the first row's order.
    """
    import pyarrow.compute as pc

    missing = [c for c in ("label_index", "views", "view_scores") if c not in rows.column_names]
    if missing:
        raise ValueError(f"predictions rows lack columns {missing} (have {rows.column_names})")
    n = rows.num_rows
    if n == 0:
        raise ValueError("no prediction rows: cannot compute metrics over zero videos")
    for name in ("label_index", "views", "view_scores"):
        nulls = rows.column(name).null_count
        if nulls:
            raise ValueError(f"{nulls} prediction rows have no {name}")
    views_per_row = rows.column("views").to_pylist()
    views = views_per_row[0]
    v = len(views)
    outer = rows.column("view_scores").combine_chunks()
    lengths = pc.list_value_length(outer).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != np.array([len(r) for r in views_per_row]))
    if bad.size:
        raise ValueError(f"prediction rows {bad[:10].tolist()} have a different number of view_scores than views")
    if np.any(lengths != v):
        raise ValueError(f"prediction rows store different numbers of views ({sorted(set(lengths.tolist()))}); expected {v} per row")
    inner = outer.flatten()
    if inner.null_count:
        raise ValueError(f"{inner.null_count} stored view score vectors are null")
    widths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    if np.any(widths != n_classes):
        raise ValueError(f"view score vectors have {sorted(set(widths.tolist()))} classes; expected n_classes = {n_classes}")
    values = inner.flatten().to_numpy(zero_copy_only=False)
    scores = np.asarray(values, dtype=np.float64).reshape(n, v, n_classes)
    for r, row_views in enumerate(views_per_row):
        if row_views != views:
            if sorted(row_views) != sorted(views):
                raise ValueError(f"prediction row {r} stores views {row_views}, row 0 stores {views}")
            scores[r] = scores[r, [row_views.index(name) for name in views]]
    labels = rows.column("label_index").to_numpy()
    return classification_metrics(fuse(scores, views, clips=clips, crops=crops), labels, n_classes)


# ---------------------------------------------------------------------------------------------
# Confusion matrix picture
# ---------------------------------------------------------------------------------------------

# A white -> dark blue ramp (ColorBrewer "Blues") for the row-normalised share of videos.
_RAMP_AT = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array([(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)], dtype=np.float64)
_EMPTY_ROW = (235, 228, 216)  # a true class with no videos: no share to colour (a warm grey, unlike any ramp or text colour)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_GRID = (200, 200, 200)
_MARGIN = 10
_MAX_SIDE = 3600  # the matrix part never exceeds this many pixels per side
_COUNTS_UP_TO = 30  # classes: counts written in cells
_NAMES_UP_TO = 60  # classes: class names on the axes
_NAME_CHARS = 28  # longer class names are shortened with "..."


def _colours(shares: np.ndarray, empty_rows: np.ndarray) -> np.ndarray:
    rgb = np.stack([np.interp(shares, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    rgb[empty_rows] = _EMPTY_ROW
    return np.round(rgb).astype(np.uint8)


def _short(name: str) -> str:
    return name if len(name) <= _NAME_CHARS else name[: _NAME_CHARS - 3] + "..."


def confusion_png(matrix: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Render a confusion matrix as a PNG heat map with Pillow; returns the path written.

    Colour is the share of the true class's videos (row-normalised), so rare and common
    classes read alike; rows of classes with no videos are grey. Up to 30 classes the counts
    are written in the cells, up to 60 the class names label the axes (rows: true, columns:
    predicted), and above that the matrix alone is drawn, a few pixels per cell and at most
    3600 px a side (cells are averaged together beyond that), so it stays quick for any C.
    """
    from PIL import Image, ImageDraw, ImageFont

    m = np.asarray(matrix)
    c = len(classes)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {m.shape}")
    if m.shape[0] != c:
        raise ValueError(f"the matrix has {m.shape[0]} classes but {c} class names were given")
    if c == 0:
        raise ValueError("cannot draw a confusion matrix of zero classes")
    if np.any(m < 0):
        raise ValueError("a confusion matrix holds counts; it has negative entries")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    totals = m.sum(axis=1, keepdims=True).astype(np.float64)
    shares = np.divide(m, totals, out=np.zeros(m.shape, dtype=np.float64), where=totals > 0)
    empty = np.broadcast_to(totals == 0, m.shape)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        return right - left, bottom - top

    line_h = text_size("Hg")[1] + 4
    header = []
    if title:
        header.append(title)
    header.append("rows: true class, columns: predicted class; colour: share of the true class's videos")
    header_h = line_h * len(header) + _MARGIN

    names = c <= _NAMES_UP_TO
    counts = c <= _COUNTS_UP_TO
    if counts:
        cell = max(22, max(text_size(str(int(v)))[0] for v in (m.max(), 0)) + 8)
    elif names:
        cell = 14
    else:
        cell = max(1, 1200 // c)

    block = 1
    if c * cell > _MAX_SIDE:
        # More classes than pixels: average blocks of cells so the picture stays bounded.
        block = math.ceil(c / _MAX_SIDE)
        pad = block * math.ceil(c / block) - c
        padded = np.pad(shares, ((0, pad), (0, pad)))
        k = padded.shape[0] // block
        shares = padded.reshape(k, block, k, block).mean(axis=(1, 3))
        empty = np.zeros(shares.shape, dtype=bool)
    rgb = _colours(shares, empty)
    heat = Image.fromarray(rgb, "RGB").resize((rgb.shape[1] * cell, rgb.shape[0] * cell), Image.NEAREST)
    side = heat.width

    labels = [f"{i}: {_short(str(n))}" for i, n in enumerate(classes)] if names else []
    label_w = max((text_size(s)[0] for s in labels), default=0) + (8 if names else 0)
    width = max(_MARGIN * 2 + label_w + side, _MARGIN * 2 + max(text_size(s)[0] for s in header))
    height = header_h + side + label_w + _MARGIN
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(header):
        draw.text((_MARGIN, _MARGIN // 2 + i * line_h), line, fill=_TEXT, font=font)
    x0, y0 = _MARGIN + label_w, header_h
    canvas.paste(heat, (x0, y0))

    if names:
        for i, label in enumerate(labels):
            w, h = text_size(label)
            # Row names right-aligned against the matrix, vertically centred on their row.
            draw.text((x0 - 4 - w, y0 + i * cell + (cell - h) // 2 - 1), label, fill=_TEXT, font=font)
            # Column names under the matrix, turned to read upwards and ending at its edge.
            strip = Image.new("L", (label_w, cell), 0)
            ImageDraw.Draw(strip).text((label_w - 4 - w, (cell - h) // 2 - 1), label, fill=255, font=font)
            turned = strip.rotate(90, expand=True)
            canvas.paste(Image.new("RGB", turned.size, _TEXT), (x0 + i * cell, y0 + side), turned)
        for i in range(c + 1):
            draw.line([(x0 + i * cell, y0), (x0 + i * cell, y0 + side)], fill=_GRID)
            draw.line([(x0, y0 + i * cell), (x0 + side, y0 + i * cell)], fill=_GRID)
    else:
        draw.rectangle([x0 - 1, y0 - 1, x0 + side, y0 + side], outline=_GRID)
    if counts:
        for r in range(c):
            for col in range(c):
                v = int(m[r, col])
                if v == 0:
                    continue
                text = str(v)
                w, h = text_size(text)
                ink = (255, 255, 255) if shares[r, col] > 0.5 else _TEXT
                draw.text((x0 + col * cell + (cell - w) // 2, y0 + r * cell + (cell - h) // 2 - 1), text, fill=ink, font=font)
    canvas.save(path, format="PNG", optimize=False)
    return path
