"""A synthetic demo corpus: one unlabeled pretraining set and two labeled UCF101-style sets.

Everything is procedurally rendered with vectorised numpy and streamed into ffmpeg through
`stages.media.encode_video`, so the same seed and scale give byte-identical files and memory
does not grow with video length.

- `demo-pretrain` ("directory" layout): long videos of 3-5 objects moving over a panning
  background, with a new scene every 3-6 s.
- `demo-motion` (temporally heavy): the class is the direction an object moves. The object
  wraps around the frame edges (a torus) and starts anywhere, so its position in any single
  frame is uniform whatever the class; only frame-to-frame motion gives the label away, and a
  horizontal flip swaps MoveLeft and MoveRight.
- `demo-shapes` (spatially heavy): the class is the shape of a large object, visible in every
  frame; colour, texture, size, orientation and motion are random.

The labeled sets follow UCF101: `videos/<Class>/v_<Class>_gGG_cCC.<ext>` and
`splits/{classInd,trainlistNN,testlistNN}.txt`. A group is one scene (a background): every
class is filmed in every scene, as SSv2's classes share rooms and tables, so a scene says
nothing about the class and memorising training scenes cannot stand in for the task. Splits
hold out whole groups, so every test scene is new.

Backgrounds are smooth (gradients, broad stripes, value noise) and objects flat or gently
shaded in colours far from their background's: at the 64 px the demo tokenizes at, a VQ-VAE
with 8x8-pixel tokens can keep every object's outline and colour (see `_pattern`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stages.media import encode_video

# Part of the parameters stored in corpus.json: bump it whenever rendering changes, so an
# existing corpus made by older code is regenerated instead of silently mixed with new files.
# 2: low-frequency backgrounds, flat or gently shaded objects; 3: 8 x 60 s pretraining, 18 groups,
# 3 s clips, larger moving objects; 4: a group's scene is shared by every class.
GENERATOR_VERSION = 4

FPS = 24
PRETRAIN_SIZE = (120, 160)  # (H, W)
CLIP_SIZE = (96, 128)
# Eight one-minute unlabeled videos; labeled sets of 4 classes x 18 groups x 2 clips of 3 s, so
# each split set holds out 6 groups: 48 test videos per set (a 10-point difference is then more
# than twice the standard error of a difference near 80%), 96 training videos.
PRETRAIN_COUNT = 8
PRETRAIN_SECONDS = 60.0
CLIP_SECONDS = 3.0
GROUPS = 18
CLIPS_PER_GROUP = 2
N_SPLITS = 3

MOTION_CLASSES = ["MoveLeft", "MoveRight", "MoveUp", "MoveDown"]
# Image coordinates: y grows downwards, so "up" is -pi/2.
MOTION_ANGLES = {"MoveLeft": math.pi, "MoveRight": 0.0, "MoveUp": -math.pi / 2, "MoveDown": math.pi / 2}
SHAPE_CLASSES = ["Circle", "Square", "Triangle", "Cross"]

DATASET_NAMES = ("demo-pretrain", "demo-motion", "demo-shapes")


@dataclass
class DemoDataset:
    name: str
    path: Path
    layout: str
    labeled: bool
    flip_sensitive: bool
    classes: list[str]
    n_videos: int


# ----------------------------------------------------------------------------- rendering


def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1]: random values on a coarse grid, smoothstep-interpolated."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    grid = rng.random((gh, gw), dtype=np.float32)
    y = np.arange(h, dtype=np.float32) / cell
    x = np.arange(w, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = y - y0, x - x0
    fy, fx = (fy * fy * (3 - 2 * fy))[:, None], (fx * fx * (3 - 2 * fx))[None, :]
    top = grid[np.ix_(y0, x0)] * (1 - fx) + grid[np.ix_(y0, x0 + 1)] * fx
    bottom = grid[np.ix_(y0 + 1, x0)] * (1 - fx) + grid[np.ix_(y0 + 1, x0 + 1)] * fx
    return top * (1 - fy) + bottom * fy


def _pattern(rng: np.random.Generator, h: int, w: int, solid: float = 0.0) -> np.ndarray:
    """A (h, w) pattern in [0, 1] without fine detail: a linear or radial gradient, broad soft
    stripes or smooth value noise, or (with probability `solid`) a flat 0.5.

    The demo is tokenized at 64 px, where 8x8-pixel tokens from a small codebook (9 bits each for
    the tiny preset's 512 codes) can carry shapes, colours and gradients but not texture a few pixels in period (no
    tokenizer of that size can). So no feature here is finer than about 40 source pixels
    (20-27 px at 64 px, three tokens), and every bit a token has is left for the objects, whose
    outlines and motion are what the classes depend on.
    """
    if rng.random() < solid:
        return np.full((h, w), 0.5, dtype=np.float32)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == 0:  # linear gradient across the whole extent
        p = (u - u.min()) / max(float(u.max() - u.min()), 1.0)
    elif kind == 1:  # radial gradient around a random centre
        r = np.hypot(yy - rng.uniform(0, h), xx - rng.uniform(0, w))
        p = r / max(float(r.max()), 1.0)
    elif kind == 2:  # broad soft stripes
        p = 0.5 + 0.5 * np.sin(2 * math.pi * u / rng.uniform(80, 160) + rng.uniform(0, 2 * math.pi))
    else:  # smooth value noise, stretched towards the full range (never steeper than twice)
        p = _value_noise(rng, h, w, rng.uniform(40, 80))
        p = (p - p.min()) / max(float(p.max() - p.min()), 0.5)
    return p.astype(np.float32)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))


def _segment_distance(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """RGB distance from colour c to the nearest colour on the blend a -> b."""
    ab = b - a
    t = float(np.clip((c - a) @ ab / max(float(ab @ ab), 1e-6), 0.0, 1.0))
    return float(np.linalg.norm(c - (a + t * ab)))


def _palette(rng: np.random.Generator, avoid: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two colours for a pattern, differing in brightness. With `avoid` (a background's two
    colours), both are far from every blend of those, so an object stands out against every
    part of its background, not only against the background's average."""
    for _ in range(200):
        c0 = rng.uniform(0, 255, 3).astype(np.float32)
        c1 = rng.uniform(0, 255, 3).astype(np.float32)
        if avoid is None:
            if abs(_luma(c0) - _luma(c1)) >= 60:
                break
        elif abs(_luma(c0) - _luma(c1)) < 60 and min(_segment_distance(c, *avoid) for c in (c0, c1, (c0 + c1) / 2)) > 90:
            break  # object colours: a gentle shade, both ends far from the background
    return c0, c1


def _texture(rng: np.random.Generator, h: int, w: int, avoid: tuple[np.ndarray, np.ndarray] | None = None,
             solid: float = 0.0) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A (h, w, 3) float32 texture in [0, 255] and its two colours."""
    c0, c1 = _palette(rng, avoid)
    p = _pattern(rng, h, w, solid)[..., None]
    return c0 * (1 - p) + c1 * p, (c0, c1)


def _shape_alpha(kind: str, radius: float, angle: float, aspect: float = 1.0) -> np.ndarray:
    """Anti-aliased (s, s) coverage of a shape centred in a square sprite, from a signed
    distance (negative inside) so edges are one pixel soft at any rotation."""
    s = int(math.ceil(2 * radius)) + 3
    c = (s - 1) / 2
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    x, y = xx - c, yy - c
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    if kind in ("Circle", "disc"):
        d = np.hypot(u, v) - radius
    elif kind == "ellipse":
        a, b = radius, radius * aspect
        d = (np.hypot(u / a, v / b) - 1) * min(a, b)
    elif kind in ("Square", "rect"):
        half = radius / math.sqrt(2) if kind == "Square" else radius
        d = np.maximum(np.abs(u) - half, np.abs(v) - half * aspect)
    elif kind == "Triangle":
        # Equilateral: three edges at distance radius/2 (the inradius) from the centre.
        d = np.max([u * math.cos(t) + v * math.sin(t) for t in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))], axis=0) - radius / 2
    elif kind == "Cross":
        arm = radius * 0.32
        d = np.minimum(np.maximum(np.abs(u) - radius, np.abs(v) - arm), np.maximum(np.abs(u) - arm, np.abs(v) - radius))
    else:
        raise ValueError(f"unknown shape {kind!r}")
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


class _Sprite:
    """A textured shape; drawn with its centre at `pos` (x, y)."""

    def __init__(self, alpha: np.ndarray, rgb: np.ndarray, pos: np.ndarray, vel: np.ndarray):
        self.alpha = alpha[..., None]
        self.premul = rgb * self.alpha
        self.size = alpha.shape[0]
        self.pos = pos.astype(np.float64)
        self.vel = vel.astype(np.float64)

    def draw(self, frame: np.ndarray, pos: np.ndarray | None = None) -> None:
        x, y = self.pos if pos is None else pos
        top, left = int(round(y - self.size / 2)), int(round(x - self.size / 2))
        h, w = frame.shape[:2]
        y0, y1 = max(top, 0), min(top + self.size, h)
        x0, x1 = max(left, 0), min(left + self.size, w)
        if y0 >= y1 or x0 >= x1:
            return
        sy, sx = slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)
        region = frame[y0:y1, x0:x1]
        region[...] = (region * (1 - self.alpha[sy, sx]) + self.premul[sy, sx] + 0.5).astype(np.uint8)

    def bounce(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Move one frame, reflecting off the box [lo, hi] for the centre."""
        self.pos += self.vel
        for k in range(2):
            if self.pos[k] < lo[k] or self.pos[k] > hi[k]:
                self.vel[k] = -self.vel[k]
                self.pos[k] = np.clip(self.pos[k], lo[k], hi[k])


def _random_object(rng: np.random.Generator, kind: str, radius: float, bg: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A shape's coverage and colours: flat half the time, else gently shaded, and far in
    colour from every part of the background `bg` (its two colours)."""
    alpha = _shape_alpha(kind, radius, rng.uniform(0, 2 * math.pi), aspect=rng.uniform(0.5, 1.0))
    rgb, _ = _texture(rng, alpha.shape[0], alpha.shape[1], avoid=bg, solid=0.5)
    return alpha, rgb


def _pretrain_frames(rng: np.random.Generator, n_frames: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = size
    pad = 24
    emitted = 0
    while emitted < n_frames:
        length = min(n_frames - emitted, int(round(rng.uniform(3, 6) * FPS)))
        canvas, bg_colours = _texture(rng, h + 2 * pad, w + 2 * pad)
        canvas = (canvas + 0.5).astype(np.uint8)
        # The camera pans linearly between two offsets inside the padded canvas.
        start, end = rng.integers(0, 2 * pad + 1, 2), rng.integers(0, 2 * pad + 1, 2)
        objects = []
        for _ in range(int(rng.integers(3, 6))):
            kind = str(rng.choice(["disc", "ellipse", "rect", "Triangle", "Cross"]))
            alpha, rgb = _random_object(rng, kind, rng.uniform(12, 28), bg_colours)
            pos = rng.uniform([0, 0], [w, h])
            speed, heading = rng.uniform(0.3, 3.0), rng.uniform(0, 2 * math.pi)
            objects.append(_Sprite(alpha, rgb, pos, speed * np.array([math.cos(heading), math.sin(heading)])))
        lo, hi = np.zeros(2), np.array([w, h], dtype=np.float64)
        for i in range(length):
            oy, ox = np.rint(start + (end - start) * (i / max(1, length - 1))).astype(int)
            frame = canvas[oy : oy + h, ox : ox + w].copy()
            for ob in objects:
                ob.draw(frame)
                ob.bounce(lo, hi)
            yield frame
        emitted += length


def _motion_frames(group_rng: np.random.Generator, rng: np.random.Generator, cls: str, n_frames: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = size
    # Static background, shared by the group: the only thing that moves is the object.
    bg, bg_colours = _texture(group_rng, h, w)
    bg = (bg + 0.5).astype(np.uint8)
    kind = str(rng.choice(["disc", "ellipse", "rect", "Triangle", "Cross"]))
    # 11-16 px in radius at the demo's 64 px, moving 0.5-1.3 tokens per sampled frame: big enough
    # to survive an 8x8-pixel tokenizer (at 4-7 px it was erased).
    alpha, rgb = _random_object(rng, kind, rng.uniform(16, 24), bg_colours)
    heading = MOTION_ANGLES[cls] + rng.uniform(-0.25, 0.25)
    speed = rng.uniform(1.5, 3.0)
    sprite = _Sprite(alpha, rgb, rng.uniform([0, 0], [w, h]), speed * np.array([math.cos(heading), math.sin(heading)]))
    torus = np.array([w, h], dtype=np.float64)
    for _ in range(n_frames):
        frame = bg.copy()
        # Drawn at every periodic copy so an object crossing an edge shows on both sides.
        for dx in (-w, 0, w):
            for dy in (-h, 0, h):
                sprite.draw(frame, sprite.pos + (dx, dy))
        sprite.pos = (sprite.pos + sprite.vel) % torus
        yield frame


def _shape_frames(group_rng: np.random.Generator, rng: np.random.Generator, cls: str, n_frames: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    h, w = size
    pad = 12
    canvas, bg_colours = _texture(group_rng, h + 2 * pad, w + 2 * pad)
    canvas = (canvas + 0.5).astype(np.uint8)
    start, end = rng.integers(0, 2 * pad + 1, 2), rng.integers(0, 2 * pad + 1, 2)
    radius = rng.uniform(18, 30)
    alpha, rgb = _random_object(rng, cls, radius, bg_colours)
    half = alpha.shape[0] / 2
    lo, hi = np.array([half, half]), np.array([w - half, h - half])
    speed, heading = rng.uniform(0.3, 2.0), rng.uniform(0, 2 * math.pi)
    sprite = _Sprite(alpha, rgb, rng.uniform(lo, hi), speed * np.array([math.cos(heading), math.sin(heading)]))
    for i in range(n_frames):
        oy, ox = np.rint(start + (end - start) * (i / max(1, n_frames - 1))).astype(int)
        frame = canvas[oy : oy + h, ox : ox + w].copy()
        sprite.draw(frame)
        sprite.bounce(lo, hi)
        yield frame


# ----------------------------------------------------------------------------- corpus


def _rng(seed: int, *key: object) -> np.random.Generator:
    """A generator keyed by seed and a path of names/indices; crc32 because hash() of a str
    changes between Python processes."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(words)


@dataclass
class _Job:
    path: Path
    frames: Callable[[], Iterator[np.ndarray]]
    codec: str
    dataset: str
    label: str = ""
    group: int = 0


def _counts(scale: float) -> tuple[int, int, int]:
    """(pretrain videos, groups per class, clips per group) for a scale. Above 1 only groups
    grow, so counts stay linear in the scale; at least 3 groups so each of the 3 splits can
    hold out a different one."""
    clips = min(CLIPS_PER_GROUP, max(1, round(CLIPS_PER_GROUP * scale)))
    return max(1, round(PRETRAIN_COUNT * scale)), max(N_SPLITS, round(GROUPS * scale)), clips


def _pretrain_jobs(root: Path, seed: int, count: int, seconds: float) -> list[_Job]:
    n_frames = max(1, int(round(seconds * FPS)))
    # One VP9 .webm and one H.264 .mkv (when there are enough videos); the rest H.264 .mp4.
    formats = {1: ("webm", "vp9"), 2: ("mkv", "h264")}
    jobs = []
    for i in range(count):
        ext, codec = formats.get(i, ("mp4", "h264"))
        jobs.append(_Job(root / f"pretrain_{i:03d}.{ext}", lambda i=i: _pretrain_frames(_rng(seed, "demo-pretrain", i), n_frames, PRETRAIN_SIZE), codec, "demo-pretrain"))
    return jobs


def _clip_name(cls: str, group: int, clip: int, ext: str) -> str:
    return f"{cls}/v_{cls}_g{group:02d}_c{clip:02d}.{ext}"


def _labeled_jobs(
    root: Path, name: str, classes: list[str], render: Callable[..., Iterator[np.ndarray]], seed: int, groups: int, clips: int, special: dict[tuple[int, int, int], tuple[str, str]]
) -> list[_Job]:
    n_frames = int(round(CLIP_SECONDS * FPS))
    jobs = []
    for ci, cls in enumerate(classes):
        for g in range(1, groups + 1):
            for c in range(1, clips + 1):
                ext, codec = special.get((ci, g, c), ("mp4", "h264"))

                def frames(ci=ci, cls=cls, g=g, c=c):
                    # The scene is keyed by the group alone (not the class): with a scene per
                    # (class, group), 96 training clips were told apart by their backgrounds and
                    # models memorised them instead of the motion (docs/learning.md).
                    return render(_rng(seed, name, "group", g), _rng(seed, name, "clip", ci, g, c), cls, n_frames, CLIP_SIZE)

                jobs.append(_Job(root / "videos" / _clip_name(cls, g, c, ext), frames, codec, name, cls, g))
    return jobs


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def _write_splits(root: Path, classes: list[str], jobs: list[_Job], groups: int) -> None:
    """UCF101-style split files: split k holds out fold k of the groups (groups past the last
    full fold are always in train, as UCF101's groups 22-25 are)."""
    splits = root / "splits"
    splits.mkdir(parents=True, exist_ok=True)
    _write_text(splits / "classInd.txt", "".join(f"{i} {cls}\n" for i, cls in enumerate(classes, 1)))
    fold = groups // N_SPLITS
    videos = root / "videos"
    for k in range(1, N_SPLITS + 1):
        held_out = range((k - 1) * fold + 1, k * fold + 1)
        train, test = [], []
        for job in jobs:
            rel = job.path.relative_to(videos).as_posix()
            if job.group in held_out:
                test.append(f"{rel}\n")
            else:
                train.append(f"{rel} {classes.index(job.label) + 1}\n")
        _write_text(splits / f"trainlist{k:02d}.txt", "".join(train))
        _write_text(splits / f"testlist{k:02d}.txt", "".join(test))


def _manifest(out_dir: Path, params: dict, datasets: list[DemoDataset], complete: bool) -> None:
    entries = [{**asdict(d), "path": d.path.relative_to(out_dir).as_posix()} for d in datasets]
    _write_text(out_dir / "corpus.json", json.dumps({"params": params, "complete": complete, "datasets": entries}, indent=2) + "\n")


def _read_params(manifest: Path) -> dict | None:
    try:
        return json.loads(manifest.read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def load_demo_corpus(out_dir: str | Path) -> list[DemoDataset]:
    """The datasets listed in `out_dir/corpus.json`, with absolute paths."""
    out_dir = Path(out_dir)
    data = json.loads((out_dir / "corpus.json").read_text())
    if not data.get("complete"):
        raise RuntimeError(f"{out_dir}: the demo corpus is incomplete; run generate_demo_corpus again")
    return [DemoDataset(**{**d, "path": out_dir / d["path"]}) for d in data["datasets"]]


def generate_demo_corpus(
    out_dir: str | Path,
    scale: float = 1.0,
    seed: int = 0,
    *,
    progress: Callable[[str], None] | None = None,
    pretrain_seconds: float = PRETRAIN_SECONDS,
    workers: int | None = None,
) -> list[DemoDataset]:
    """Render the demo corpus into `out_dir` and describe it in `out_dir/corpus.json`.

    `scale` multiplies the number of videos (pretraining videos, and groups and clips per
    group of the labeled sets), never the length of a clip. `pretrain_seconds` shortens the
    pretraining videos for tests; `workers` bounds how many videos render at once.

    Reruns are cheap: videos already on disk are kept when corpus.json records the same seed,
    pretrain_seconds and generator version (every file is written atomically, so one that
    exists is whole). A different scale adds and removes videos only; any other change
    deletes the three dataset folders and renders them again. Files in the dataset folders
    that the corpus does not list are removed.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    params = {"generator_version": GENERATOR_VERSION, "seed": int(seed), "scale": float(scale), "pretrain_seconds": float(pretrain_seconds)}

    n_pretrain, groups, clips = _counts(scale)
    roots = {name: out_dir / name for name in DATASET_NAMES}
    pretrain = _pretrain_jobs(roots["demo-pretrain"], seed, n_pretrain, pretrain_seconds)
    motion = _labeled_jobs(roots["demo-motion"], "demo-motion", MOTION_CLASSES, _motion_frames, seed, groups, clips, {})
    # The container mix of the labeled sets lives in demo-shapes: the first clip of Square and Triangle.
    shapes = _labeled_jobs(roots["demo-shapes"], "demo-shapes", SHAPE_CLASSES, _shape_frames, seed, groups, clips, {(1, 1, 1): ("webm", "vp9"), (2, 1, 1): ("mkv", "h264")})
    datasets = [
        DemoDataset("demo-pretrain", roots["demo-pretrain"], "directory", False, False, [], len(pretrain)),
        DemoDataset("demo-motion", roots["demo-motion"], "ucf101", True, True, list(MOTION_CLASSES), len(motion)),
        DemoDataset("demo-shapes", roots["demo-shapes"], "ucf101", True, False, list(SHAPE_CLASSES), len(shapes)),
    ]
    jobs = pretrain + motion + shapes

    old_params = _read_params(out_dir / "corpus.json")
    # A video's bytes depend on the seed, the code and its own name, never on how many others
    # there are: after a scale change the files both corpora share are already right, so only
    # the others are added or removed. Any other change (or files of unknown origin) means
    # rendering everything again.
    content_key = {k: v for k, v in params.items() if k != "scale"}
    old_key = {k: v for k, v in (old_params or {}).items() if k != "scale"}
    if old_key != content_key and any(r.exists() for r in roots.values()):
        say(f"demo corpus: parameters changed ({old_params} -> {params}); regenerating")
        for r in roots.values():
            shutil.rmtree(r, ignore_errors=True)
    # Recorded before rendering, so a crashed run resumes only under the same parameters.
    _manifest(out_dir, params, datasets, complete=False)

    expected = {j.path for j in jobs}
    for r in roots.values():
        # Removes videos beyond the current scale and leftovers of a run killed mid-encode
        # (encode_video deletes its temporary file only when it sees an exception).
        for f in sorted(r.rglob("*")):
            if f.is_file() and f not in expected and f.parent != r / "splits":
                f.unlink()
        for d in sorted((d for d in r.rglob("*") if d.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
    todo = [j for j in jobs if not j.path.exists()]
    if len(todo) < len(jobs):
        say(f"demo corpus: {len(jobs) - len(todo)} of {len(jobs)} videos already present")
    for j in todo:
        j.path.parent.mkdir(parents=True, exist_ok=True)

    # Rendering is numpy and encoding a separate ffmpeg process, so two jobs at a time keep
    # two cores busy; jobs are ordered longest first (the pretraining videos).
    n_workers = workers or max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        futures = {pool.submit(encode_video, j.frames(), j.path, fps=FPS, codec=j.codec): j for j in todo}
        try:
            for done, fut in enumerate(as_completed(futures), 1):
                fut.result()
                job = futures[fut]
                say(f"{job.dataset}: {job.path.relative_to(out_dir).as_posix()} ({done}/{len(todo)})")
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    _write_splits(roots["demo-motion"], MOTION_CLASSES, motion, groups)
    _write_splits(roots["demo-shapes"], SHAPE_CLASSES, shapes, groups)
    _manifest(out_dir, params, datasets, complete=True)
    return datasets
