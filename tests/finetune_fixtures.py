"""A labeled token corpus written straight into a data root: videos and datasets rows as ingest
writes them, downstream-variant token shards as tokenize writes them and, for pixel (ST-MAE)
backbones, frame shards as the frames stage writes them, so the fine-tune stage and the
evaluate flow can run without decoding any video."""

from __future__ import annotations

import json

import numpy as np

from stages.frames.encoding import encode_view, extension
from stages.frames.views import view_names
from test_pretrain_data import write_shard
from warehouse.catalog import Catalog
from warehouse.shards import ShardWriter, commit_shard
from warehouse.tables import now, write_rows

TOKENIZER = "ckpt:aaaaaaaaaaaaaaaa"
CODEBOOK = 64
GRID = (4, 4)


def class_tokens(label: int, vid: int, n: int, n_views: int) -> np.ndarray:
    """Codes that give the class away in every view and frame, with per-video noise."""
    rng = np.random.default_rng(vid)
    base = np.full((n_views, n, *GRID), 8 * label, np.uint16)
    return base + rng.integers(0, 4, size=base.shape).astype(np.uint16)


def labeled_dataset(root, dataset: str, *, classes=("Run", "Jump", "Swim"), per_class: int = 6, n_splits: int = 3,
                    flip_sensitive: bool = False, tokenizer: str = TOKENIZER, first_vid: int = 100, shard_size: int = 8,
                    split_names: bool = False, video_splits=None, labels=None, make_tokens=None,
                    tokens: bool = True) -> dict[str, tuple[str, str, list[str]]]:
    """`per_class` videos per class; in split set k, video i of a class is test when i % 3 == k - 1.
    With split_names, a single train/val split instead. `make_tokens(label, vid, n, n_views)` replaces
    `class_tokens`; `tokens` False writes the catalog rows only (no token shards). Returns
    video_id -> (label, split, splits)."""
    Catalog(root).ensure_tables()
    views = view_names("downstream", flip_sensitive)
    rows, vids, info = [], [], {}
    for c, name in enumerate(classes):
        for i in range(per_class):
            vid = first_vid + c * per_class + i
            video_id = f"v{vid:03d}"
            splits = [("test" if i % 3 == k else "train") for k in range(n_splits)]
            split = ("val" if i % 3 == 0 else "train") if split_names else splits[0] if splits else None
            if video_splits is not None:
                split, splits = video_splits(video_id, split, splits)
            label = labels(video_id, name) if labels is not None else name
            info[video_id] = (label, split, None if split_names else splits)
            rows.append({"dataset": dataset, "video_id": video_id, "source": f"/src/{name}/{video_id}.mp4", "sha256": f"{vid:064x}",
                         "label": label, "split": split, "splits": None if split_names else splits, "status": "ok",
                         "ingested_at": now(), "unit": f"{dataset}-ingest-0"})
            vids.append((vid, c))
    write_rows("videos", rows, root.table_dir("videos", dataset, "ingest-0.parquet"))
    write_rows("shards", [{"stage": "ingest", "dataset": dataset, "unit": f"{dataset}-ingest-0", "path": "", "n_samples": len(rows),
                           "n_failed": 0, "bytes": 0, "created_at": now()}], root.table_dir("shards", "ingest", f"{dataset}-0.parquet"))
    write_rows("datasets", [{"dataset": dataset, "source": "/src", "layout": "manifest", "labeled": True, "flip_sensitive": flip_sensitive,
                             "classes": list(classes), "n_entries": len(rows), "updated_at": now()}],
               root.table_dir("datasets", dataset, "d.parquet"))
    by_vid = dict(vids)
    if not tokens:
        return info
    for number, start in enumerate(range(0, len(vids), shard_size)):
        chunk = [v for v, _ in vids[start : start + shard_size]]
        write_shard(root, dataset, number, chunk, views=views, variant="downstream", tokenizer=tokenizer, grid=GRID, codebook=CODEBOOK,
                    fps=4.0, size=32, make_tokens=lambda vid, n, nv: (make_tokens or class_tokens)(by_vid[vid], vid, n, nv))
    return info


FRAME_COLOURS = np.array([[230, 40, 40], [40, 200, 60], [50, 70, 230], [220, 210, 40]], np.int16)


def class_frames(label: int, vid: int, n: int, size: int) -> np.ndarray:
    """(n, size, size, 3) uint8: the class's colour with per-video noise and a bright square that
    moves across the frames (something temporal to see)."""
    rng = np.random.default_rng(vid)
    frames = FRAME_COLOURS[label % len(FRAME_COLOURS)] + rng.integers(-25, 26, (n, size, size, 3))
    for t in range(n):
        y = x = (t * 2) % max(1, size - 4)
        frames[t, y : y + 4, x : x + 4] = 255
    return frames.clip(0, 255).astype(np.uint8)


def labeled_frames(root, dataset: str, info: dict[str, tuple], classes=("Run", "Jump", "Swim"), *, size: int = 16, n_frames: int = 6,
                   flip_sensitive: bool = False, shard_size: int = 8, variant: str = "downstream", encoding: str = "npy.zst",
                   make_frames=None) -> list[str]:
    """Committed frame shards of `dataset`'s videos (`info` from `labeled_dataset`): every view
    of a video holds `make_frames(label index, vid, n, size)` (default `class_frames`), the
    flipped views mirrored. Returns the shard paths."""
    views = view_names(variant, flip_sensitive)
    index = {c: i for i, c in enumerate(classes)}
    videos = sorted(info)
    paths = []
    for number, start in enumerate(range(0, len(videos), shard_size)):
        rel = f"shards/frames/{dataset}/{variant}-{size}/{number:05d}.tar"
        unit = f"{dataset}-frames-{variant}-{size}-{number}"
        writer = ShardWriter(root.home / rel)
        rows = []
        for video_id in videos[start : start + shard_size]:
            label = index.get(info[video_id][0], 0)
            frames = (make_frames or class_frames)(label, int(video_id[1:]), n_frames, size)
            members = {f"{v}.{extension(encoding)}": encode_view(frames[:, :, ::-1].copy() if v.endswith("_flip") else frames, encoding)
                       for v in views}
            meta = {"video_id": video_id, "dataset": dataset, "views": views, "encoding": encoding, "n_frames": n_frames,
                    "size": size, "fps": 4.0}
            writer.add(video_id, {**members, "json": json.dumps(meta).encode()})
            rows.append({"dataset": dataset, "video_id": video_id, "shard": rel, "fps": 4.0, "size": size, "variant": variant,
                         "n_frames": n_frames, "status": "ok", "views": views, "key": video_id, "encoding": encoding, "unit": unit,
                         "config_hash": "cfg-test", "created_at": now()})
        marker = {"stage": "frames", "dataset": dataset, "unit": unit, "path": rel, "n_samples": len(rows), "n_failed": 0, "bytes": 0,
                  "config_hash": "cfg-test", "created_at": now()}
        commit_shard(writer, "frame_samples", rows, {"count": len(rows)}, marker,
                     root.table_dir("shards", "frames", f"{unit}.parquet"))
        paths.append(rel)
    return paths
