"""The synthetic demo corpus: determinism, UCF101 layout, decodability, and that the motion set
needs motion (single frames carry no label, frame-to-frame displacement does)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from stages.demo_data import (CLIP_SECONDS, CLIP_SIZE, CLIPS_PER_GROUP, FPS, GROUPS, PRETRAIN_COUNT, PRETRAIN_SIZE, DemoDataset, _motion_frames,
                              _palette, _pattern, _pretrain_frames, _rng, _segment_distance, _shape_frames, _texture, generate_demo_corpus,
                              load_demo_corpus)

PRETRAIN_SECONDS = 3.0  # keeps the pretraining videos short; labeled clips always have CLIP_SECONDS
CLIP_FRAMES = round(CLIP_SECONDS * FPS)
VIDEO_EXTS = {".mp4", ".webm", ".mkv"}


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _videos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in VIDEO_EXTS)


def _decode(path: Path) -> tuple[np.ndarray, str]:
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context.name
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return frames, codec


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[DemoDataset]]:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    return out, generate_demo_corpus(out, scale=1.0, seed=0, pretrain_seconds=PRETRAIN_SECONDS)


@pytest.fixture(scope="module")
def small_seed1(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "small1"
    generate_demo_corpus(out, scale=0.1, seed=1, pretrain_seconds=PRETRAIN_SECONDS)
    return out


def _by_name(datasets: list[DemoDataset]) -> dict[str, DemoDataset]:
    return {d.name: d for d in datasets}


def test_same_seed_is_byte_identical_and_another_seed_differs(corpus, small_seed1, tmp_path):
    out, _ = corpus
    again = tmp_path / "again"
    generate_demo_corpus(again, scale=1.0, seed=0, pretrain_seconds=PRETRAIN_SECONDS, workers=1)
    first = _hashes(out)
    assert first == _hashes(again)

    other = _hashes(small_seed1)
    shared = [k for k in other if Path(k).suffix in VIDEO_EXTS]
    assert len(shared) >= 25
    assert all(k in first for k in shared)
    assert all(first[k] != other[k] for k in shared)


def test_manifest_describes_the_datasets(corpus):
    out, datasets = corpus
    data = json.loads((out / "corpus.json").read_text())
    assert data["complete"] is True
    assert data["params"]["seed"] == 0 and data["params"]["scale"] == 1.0
    assert [d["path"] for d in data["datasets"]] == ["demo-pretrain", "demo-motion", "demo-shapes"]
    assert load_demo_corpus(out) == datasets
    ds = _by_name(datasets)
    assert ds["demo-pretrain"].layout == "directory" and not ds["demo-pretrain"].labeled and ds["demo-pretrain"].classes == []
    assert ds["demo-motion"].flip_sensitive and not ds["demo-shapes"].flip_sensitive
    for d in datasets:
        assert d.n_videos == len(_videos(d.path))


def test_pretrain_set_is_flat_with_one_webm_and_one_mkv(corpus):
    _, datasets = corpus
    root = _by_name(datasets)["demo-pretrain"].path
    files = sorted(root.iterdir())
    assert len(files) == PRETRAIN_COUNT and all(f.is_file() for f in files)
    assert sorted(f.suffix for f in files) == [".mkv"] + [".mp4"] * (PRETRAIN_COUNT - 2) + [".webm"]


def _read_split(root: Path, k: int) -> tuple[list[tuple[str, int]], list[str]]:
    lines = (root / "splits" / f"trainlist{k:02d}.txt").read_text().splitlines()
    train = [(rel, int(idx)) for rel, idx in (line.split(" ") for line in lines)]
    test = (root / "splits" / f"testlist{k:02d}.txt").read_text().splitlines()
    return train, test


def _group(rel: str) -> int:
    return int(re.fullmatch(r"(\w+)/v_\1_g(\d\d)_c\d\d\.\w+", rel).group(2))


@pytest.mark.parametrize("name", ["demo-motion", "demo-shapes"])
def test_ucf101_layout_and_splits(corpus, name):
    _, datasets = corpus
    ds = _by_name(datasets)[name]
    videos = ds.path / "videos"
    assert sorted(p.name for p in videos.iterdir()) == sorted(ds.classes)
    class_ind = [line.split(" ") for line in (ds.path / "splits" / "classInd.txt").read_text().splitlines()]
    assert [(int(i), c) for i, c in class_ind] == [(i, c) for i, c in enumerate(ds.classes, 1)]
    all_videos = {p.relative_to(videos).as_posix() for p in _videos(videos)}
    tests = []
    for k in (1, 2, 3):
        train, test = _read_split(ds.path, k)
        train_paths = {rel for rel, _ in train}
        assert train_paths.isdisjoint(test)
        assert train_paths | set(test) == all_videos
        for rel, idx in train:
            assert ds.classes[idx - 1] == rel.split("/")[0]
        assert {rel.split("/")[0] for rel in train_paths} == set(ds.classes)
        # Whole groups are held out: no group is on both sides of a split.
        assert {_group(r) for r in train_paths}.isdisjoint({_group(r) for r in test})
        assert test
        tests.append(set(test))
    assert tests[0].isdisjoint(tests[1]) and tests[1].isdisjoint(tests[2]) and tests[0].isdisjoint(tests[2])


def test_every_video_decodes_with_expected_size_length_and_codec(corpus):
    out, datasets = corpus
    seen_codecs = {}
    for ds in datasets:
        size = (120, 160) if ds.name == "demo-pretrain" else (96, 128)
        n_expected = round(PRETRAIN_SECONDS * FPS) if ds.name == "demo-pretrain" else CLIP_FRAMES
        for path in _videos(ds.path):
            frames, codec = _decode(path)
            assert frames.shape[1:] == (*size, 3), path
            assert abs(len(frames) - n_expected) <= 1, (path, len(frames))
            assert codec == ("vp9" if path.suffix == ".webm" else "h264"), (path, codec)
            assert frames.std() > 10, f"{path} looks blank"
            seen_codecs.setdefault(ds.name, []).append(path.suffix)
    for name in ("demo-pretrain", "demo-shapes"):
        assert seen_codecs[name].count(".webm") == 1 and seen_codecs[name].count(".mkv") == 1
    assert set(seen_codecs["demo-motion"]) == {".mp4"}


def _object_mask(frames: np.ndarray) -> np.ndarray:
    """(T, H, W) object pixels: the motion set's background is static, so the per-pixel
    temporal median is the background and the object is what differs from it."""
    f = frames.astype(np.float32)
    return np.abs(f - np.median(f, axis=0)).max(axis=-1) > 40


def _object_track(mask: np.ndarray) -> np.ndarray:
    """(T, 2) object centre (x, y) as angles on the frame torus; circular means handle an
    object split across an edge."""
    t, h, w = mask.shape
    ang_x = np.exp(2j * np.pi * np.arange(w) / w)
    ang_y = np.exp(2j * np.pi * np.arange(h) / h)
    cx = (mask.sum(axis=1) * ang_x).sum(axis=1)
    cy = (mask.sum(axis=2) * ang_y).sum(axis=1)
    assert (mask.sum(axis=(1, 2)) > 20).mean() > 0.9, "object not found in most frames"
    return np.stack([np.angle(cx), np.angle(cy)], axis=1)


def _direction(track: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Mean displacement per frame in pixels (x, y), unwrapped across edges."""
    step = np.angle(np.exp(1j * np.diff(track, axis=0)))
    return step.mean(axis=0) * np.array([size[1], size[0]]) / (2 * np.pi)


def test_motion_label_is_in_the_motion_not_in_single_frames(corpus):
    _, datasets = corpus
    ds = _by_name(datasets)["demo-motion"]
    unit = {"MoveLeft": (-1, 0), "MoveRight": (1, 0), "MoveUp": (0, -1), "MoveDown": (0, 1)}
    labels, tracks, predicted, flipped = [], [], [], []
    for path in _videos(ds.path / "videos"):
        frames, _ = _decode(path)
        size = frames.shape[1:3]
        mask = _object_mask(frames)
        track = _object_track(mask)
        labels.append(path.parent.name)
        tracks.append(track)
        predicted.append(max(unit, key=lambda c: np.dot(unit[c], _direction(track, size))))
        # Flipping the mask is flipping the frames: the median and threshold are per pixel.
        flip_motion = _direction(_object_track(mask[:, :, ::-1]), size)
        flipped.append(max(unit, key=lambda c: np.dot(unit[c], flip_motion)))
    labels = np.array(labels)
    assert sorted(set(labels)) == sorted(unit)

    # Frame differences give the label for every clip, and a horizontal flip swaps left/right.
    assert (np.array(predicted) == labels).all()
    swap = {"MoveLeft": "MoveRight", "MoveRight": "MoveLeft", "MoveUp": "MoveUp", "MoveDown": "MoveDown"}
    assert flipped == [swap[c] for c in labels]

    # One frame's object position says nothing about the class: at the first, middle and last
    # frame, a leave-one-out nearest-neighbour classifier on the position is near chance (25%).
    for t in (0, CLIP_FRAMES // 2, CLIP_FRAMES - 1):
        feats = np.concatenate([np.cos([tr[t] for tr in tracks]), np.sin([tr[t] for tr in tracks])], axis=1)
        dist = ((feats[:, None] - feats[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        accuracy = (labels[dist.argmin(axis=1)] == labels).mean()
        assert accuracy < 0.5, (t, accuracy)
    # And per class, positions along the motion axis over all frames spread evenly (a small
    # circular resultant), so the average frame does not place the object on one side either.
    for c, axis in (("MoveLeft", 0), ("MoveRight", 0), ("MoveUp", 1), ("MoveDown", 1)):
        pos = np.concatenate([tr[:, axis] for tr, lab in zip(tracks, labels) if lab == c])
        assert np.abs(np.exp(1j * pos).mean()) < 0.25, c


def test_rerun_is_cheap_and_keeps_files(corpus, tmp_path):
    out = tmp_path / "c"
    generate_demo_corpus(out, scale=0.1, seed=0, pretrain_seconds=PRETRAIN_SECONDS)
    before = {p: p.stat().st_mtime_ns for p in _videos(out)}
    messages = []
    generate_demo_corpus(out, scale=0.1, seed=0, pretrain_seconds=PRETRAIN_SECONDS, progress=messages.append)
    assert {p: p.stat().st_mtime_ns for p in _videos(out)} == before
    assert messages == [f"demo corpus: {len(before)} of {len(before)} videos already present"]


def test_changed_scale_or_seed_gives_what_a_fresh_run_gives(corpus, small_seed1, tmp_path):
    full, _ = corpus
    out = tmp_path / "c"
    generate_demo_corpus(out, scale=0.1, seed=0, pretrain_seconds=PRETRAIN_SECONDS)
    small = _hashes(out)
    # A killed run can leave a temporary file behind; it must not survive as a video.
    (out / "demo-pretrain" / ".pretrain_009.partial.mp4").write_bytes(b"junk")

    generate_demo_corpus(out, scale=1.0, seed=0, pretrain_seconds=PRETRAIN_SECONDS)
    assert _hashes(out) == _hashes(full)
    generate_demo_corpus(out, scale=0.1, seed=0, pretrain_seconds=PRETRAIN_SECONDS)
    assert _hashes(out) == small
    generate_demo_corpus(out, scale=0.1, seed=1, pretrain_seconds=PRETRAIN_SECONDS)
    assert _hashes(out) == _hashes(small_seed1)
    generate_demo_corpus(out, scale=0.1, seed=1, pretrain_seconds=2.0)
    frames, _ = _decode(out / "demo-pretrain" / "pretrain_000.mp4")
    assert len(frames) == 48


def test_counts_grow_with_scale(corpus, small_seed1, tmp_path):
    full, small = _by_name(corpus[1]), _by_name(load_demo_corpus(small_seed1))
    assert (full["demo-pretrain"].n_videos, small["demo-pretrain"].n_videos) == (PRETRAIN_COUNT, 1)
    # 4 classes x GROUPS groups x CLIPS_PER_GROUP clips at scale 1; at scale 0.1 at least 3
    # groups, so each split holds out a different one.
    assert full["demo-motion"].n_videos == full["demo-shapes"].n_videos == 4 * GROUPS * CLIPS_PER_GROUP
    assert small["demo-motion"].n_videos == small["demo-shapes"].n_videos == 4 * 3 * 1
    with pytest.raises(ValueError):
        generate_demo_corpus(tmp_path / "bad", scale=0)


def test_rendering_is_deterministic_without_the_encoder():
    """The same generator keys give the same pixels (the byte-identical files above also need a
    deterministic encoder); other keys give other pixels."""
    def pretrain(i):
        return np.stack(list(_pretrain_frames(_rng(0, "demo-pretrain", i), 30, PRETRAIN_SIZE)))

    def clip(render, cls, g, c):
        return np.stack(list(render(_rng(0, "x", "group", g), _rng(0, "x", "clip", g, c), cls, 8, CLIP_SIZE)))

    assert np.array_equal(pretrain(0), pretrain(0)) and not np.array_equal(pretrain(0), pretrain(1))
    for render, cls in ((_motion_frames, "MoveLeft"), (_shape_frames, "Triangle")):
        assert np.array_equal(clip(render, cls, 1, 1), clip(render, cls, 1, 1))
        assert not np.array_equal(clip(render, cls, 1, 1), clip(render, cls, 1, 2))


def test_textures_are_smooth_and_objects_stand_out_from_every_part_of_their_background():
    """At the 64 px the demo is tokenized at, 8x8-pixel tokens can keep gradients and outlines
    but not stripes a few pixels in period: no pattern changes by more than a tenth of its range
    from one source pixel to the next (a feature spans tens of pixels), at background and at
    object size. Object colours are far from every blend of their background's two colours, so
    outlines stay visible wherever an object is."""
    for seed in range(60):
        rng = np.random.default_rng(seed)
        for h, w in ((144, 208), (120, 152), (40, 40), (19, 19)):
            p = _pattern(rng, h, w)
            assert p.shape == (h, w) and p.min() >= 0 and p.max() <= 1
            step = max(np.abs(np.diff(p, axis=0)).max(), np.abs(np.diff(p, axis=1)).max())
            assert step < 0.1, (seed, h, w, step)
        _, bg = _texture(rng, 8, 8)
        c0, c1 = _palette(rng, avoid=bg)
        assert min(_segment_distance(c, *bg) for c in (c0, c1, (c0 + c1) / 2)) > 90, seed
    flat = _pattern(np.random.default_rng(0), 9, 9, solid=1.0)
    assert (flat == 0.5).all()
