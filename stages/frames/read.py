"""Reading frame shards back: what the tokenizer and tokenize stages consume.

Shards are selected through the catalog (committed shards only, one frames variant), then
streamed with WebDataset. Each item is one video: its metadata and, per view, a
(T, S, S, 3) uint8 array.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import webdataset as wds

from stages.frames.encoding import decode_view
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot


@dataclass(frozen=True)
class FrameShard:
    dataset: str
    path: str  # tar, relative to the data root
    unit: str  # the frames shard's unit key (lineage for anything derived from it)
    fps: float
    size: int
    variant: str
    config_hash: str
    n_ok: int  # samples present in the tar (status ok or partial)


@dataclass
class VideoFrames:
    key: str
    meta: dict
    views: dict[str, np.ndarray]  # view name -> (T, S, S, 3) uint8


def frame_shards(root: DataRoot, dataset: str, *, variant: str | None = None, size: int | None = None,
                 fps: float | None = None) -> list[FrameShard]:
    """Committed frame shards of a dataset, optionally of one variant/size/fps, in order."""
    sql = """SELECT dataset, shard, unit, fps, size, variant, config_hash,
                    count(*) FILTER (WHERE status <> 'failed') AS n_ok
             FROM frame_samples WHERE dataset = ?"""
    params: list = [dataset]
    for column, value in (("variant", variant), ("size", size), ("fps", fps)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
    sql += " GROUP BY ALL ORDER BY shard"
    return [FrameShard(*row) for row in Catalog(root).rows(sql, params)]


def read_shard(root: DataRoot, shard: FrameShard | str, *, views: list[str] | None = None) -> Iterator[VideoFrames]:
    """Every sample of one shard, in tar order. A damaged tar raises a ValueError naming it."""
    path = root.absolute(shard.path if isinstance(shard, FrameShard) else shard)
    if not Path(path).exists():
        raise ValueError(f"frame shard {path} is missing")
    dataset = wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    try:
        for sample in dataset:
            meta = json.loads(sample["json"])
            wanted = views or meta["views"]
            decoded = {}
            for name in wanted:
                ext = next((k for k in sample if k.startswith(name + ".")), None)
                if ext is None:
                    raise ValueError(f"frame shard {path}: sample {sample['__key__']} has no view {name!r}")
                try:
                    decoded[name] = decode_view(sample[ext], meta["encoding"])
                except ValueError as e:
                    raise ValueError(f"frame shard {path}: sample {sample['__key__']} view {name}: {e}") from e
            yield VideoFrames(sample["__key__"], meta, decoded)
    except (OSError, EOFError, KeyError, json.JSONDecodeError, tarfile.TarError) as e:
        raise ValueError(f"frame shard {path} is damaged: {type(e).__name__}: {e}") from e
