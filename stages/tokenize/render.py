"""Tokens back to pixels: a PNG of a video's frames decoded through the tokenizer's decoder
(for checking a tokenizer by eye, and later the paper's reconstruction figures)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from stages.config import ConfigError
from stages.frames.contact_sheet import contact_sheet
from stages.tokenize.stage import LoadedTokenizer
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.shards import read_samples


def token_sample(root: DataRoot, dataset: str, video_id: str, tokenizer: str | None = None) -> tuple[np.ndarray, dict]:
    """The (views, T, h, w) tokens and metadata of one video's latest token sample."""
    sql = "SELECT shard, key, tokenizer FROM token_samples WHERE dataset = ? AND video_id = ?"
    params = [dataset, video_id]
    if tokenizer:
        sql += " AND tokenizer = ?"
        params.append(tokenizer)
    rows = Catalog(root).rows(sql + " ORDER BY created_at DESC LIMIT 1", params)
    if not rows:
        raise ConfigError(f"no tokens for {dataset}/{video_id}" + (f" from tokenizer {tokenizer}" if tokenizer else ""))
    shard, key, _ = rows[0]
    sample = read_samples(root.absolute(shard))[key]
    return np.load(io.BytesIO(sample["tokens.npy"])), json.loads(sample["json"])


@torch.no_grad()
def render_tokens(
    root: DataRoot, dataset: str, video_id: str, tokenizer: LoadedTokenizer, out: str | Path, *,
    views: list[str] | None = None, max_frames: int = 8,
) -> Path:
    tokens, meta = token_sample(root, dataset, video_id, tokenizer.identity)
    if int(tokens.max()) >= tokenizer.model.codebook_size:
        raise ConfigError(f"tokens of {video_id} use codes beyond tokenizer {tokenizer.identity}'s codebook")
    names = views or meta["views"]
    decoded: dict[str, np.ndarray] = {}
    for name in names:
        if name not in meta["views"]:
            raise ConfigError(f"{video_id} has no view {name!r}; it has {', '.join(meta['views'])}")
        t = torch.from_numpy(tokens[meta["views"].index(name)].astype(np.int64)).to(tokenizer.device)  # (T, h, w)
        images = tokenizer.model.decode(t).clamp(0, 1).mul(255).round().byte()  # (T, 3, S, S)
        decoded[name] = images.permute(0, 2, 3, 1).cpu().numpy()  # (T, S, S, 3)
    return contact_sheet([(f"{video_id} (decoded)", decoded)], out, max_frames=max_frames)
