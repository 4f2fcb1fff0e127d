"""Multi-view evaluation (VIMPAC Sec. 4.1, App. C): every held-out video is scored on n uniformly
spaced temporal clips x 3 spatial crops (center only for flip-sensitive datasets) and the softmax
probabilities are averaged. Every view's probabilities are kept, so a result can be re-fused
under another protocol from the catalog without running the model again.

Reading is sequential over the evaluation split's token shards (no shuffling, no workers): each
video is decoded once and all its views go through the model together. Under DDP every rank
scores the videos whose position in the split is its rank modulo the world size, and rank 0
gathers the scores.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import webdataset as wds

from stages.evaluate.metrics import Protocol, clip_starts
from stages.finetune.splits import EvalVideo, SplitSelection
from stages.pretrain.data import TokenShard
from warehouse.layout import DataRoot


@dataclass
class EvalScores:
    videos: list[EvalVideo]  # in split order, those that could be scored
    views: list[str]  # names of the V axis: "<clip>/<crop view>"
    scores: np.ndarray  # (N, V, C) float32 softmax probabilities
    errors: list[str] = field(default_factory=list)


def _clips(tokens: np.ndarray, starts: list[int], clip_len: int, pad_id: int) -> np.ndarray:
    """(n, h, w) tokens of one view -> (len(starts), T, h, w), padded where the video is short."""
    n, h, w = tokens.shape
    out = np.full((len(starts), clip_len, h, w), pad_id, np.int64)
    valid = min(n, clip_len)
    for i, s in enumerate(starts):
        out[i, :valid] = tokens[s : s + valid]
    return out


@torch.no_grad()
def score_videos(model: torch.nn.Module, root: DataRoot, selection: SplitSelection, protocol: Protocol, *, clip_len: int,
                 pad_id: int, device: torch.device, amp: bool, batch_size: int, rank: int = 0, world: int = 1) -> EvalScores:
    """Softmax scores of every view of every evaluation video this rank owns, in split order."""
    model.eval()
    mine = {v.key: v for i, v in enumerate(selection.eval) if i % world == rank}
    views = protocol.view_names()
    per_video = len(views)
    done: dict[str, np.ndarray] = {}
    errors: list[str] = []
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        clips = torch.from_numpy(np.concatenate([c for _, c in pending]))  # (B * V, T, H, W)
        probs = []
        for chunk in clips.split(max(batch_size, 1)):
            chunk = chunk.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(chunk)
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        scores = torch.cat(probs).view(len(pending), per_video, -1).numpy()
        for (key, _), s in zip(pending, scores):
            done[key] = s
        pending.clear()

    for key, tokens, stored in read_token_videos(root, selection.eval_shards, mine, errors):
        try:
            missing = [c for c in protocol.crops if c not in stored]
            if missing:
                raise ValueError(f"views {', '.join(missing)} are not stored (stored: {', '.join(stored)}); "
                                 "tokenize the downstream variant or evaluate with center crops only")
            starts = clip_starts(int(tokens.shape[1]), clip_len, protocol.clips)
        except ValueError as e:
            errors.append(f"sample {key}: {e}")
            continue
        # Clip-major, as Protocol.view_names(): clip i's crops are adjacent.
        per_crop = [_clips(tokens[stored.index(c)], starts, clip_len, pad_id) for c in protocol.crops]  # each (clips, T, h, w)
        pending.append((key, np.stack(per_crop, axis=1).reshape(per_video, clip_len, *tokens.shape[2:])))
        if len(pending) * per_video >= batch_size:
            flush()
    flush()

    return gather_scores(selection, done, errors, views, per_video, world)


def gather_scores(selection: SplitSelection, done: dict[str, np.ndarray], errors: list[str], views: list[str], per_video: int,
                  world: int) -> EvalScores:
    """Every rank's per-video view scores (and errors) gathered, in the split's evaluation order;
    both backbone families end their multi-view evaluation here."""
    if world > 1:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (done, errors))
        done = {k: v for part, _ in gathered for k, v in part.items()}
        errors = [e for _, errs in gathered for e in errs]
    videos = [v for v in selection.eval if v.key in done]
    n_classes = len(selection.classes)
    scores = np.stack([done[v.key] for v in videos]).astype(np.float32) if videos else np.zeros((0, per_video, n_classes), np.float32)
    return EvalScores(videos, views, scores, errors)


def read_token_videos(root: DataRoot, shards: list[TokenShard], wanted: dict[str, object], errors: list[str]
                      ) -> Iterator[tuple[str, np.ndarray, list[str]]]:
    """(key, tokens (n_views, n, h, w), stored view names) of every sample of `shards` whose
    "dataset/key" is in `wanted`, each once, in shard order. A wanted value with a `shard`
    attribute (EvalVideo) is looked for in that shard only. Unreadable shards and samples, and
    wanted videos that never showed up, are described in `errors`, never raised: one bad video
    costs its own score, not the evaluation."""
    seen: set[str] = set()
    for shard in shards:
        path = str(root.absolute(shard.path))
        todo = {k for k, v in wanted.items() if getattr(v, "shard", shard.path) == shard.path} - seen
        if not todo:
            continue

        def handler(exn: BaseException, path: str = path) -> bool:
            errors.append(f"token shard {path}: {type(exn).__name__}: {str(exn.args[0]) if exn.args else ''}")
            return True

        for sample in wds.tarfile_to_samples(handler=handler)(iter([{"url": path}])):
            key = f"{shard.dataset}/{sample.get('__key__')}"
            if key not in todo:
                continue
            seen.add(key)
            try:
                meta = json.loads(sample["json"])
                tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)  # (n_views, n, h, w)
                stored = list(meta["views"])
                if tokens.ndim != 4 or tokens.shape[0] != len(stored):
                    raise ValueError(f"tokens of shape {tokens.shape} do not match the {len(stored)} stored views")
            except (KeyError, ValueError, TypeError) as e:
                errors.append(f"token shard {path}: sample {key}: {e}")
                continue
            yield key, tokens, stored
    for key in sorted(set(wanted) - seen):
        video = wanted[key]
        where = f"token shard {root.absolute(video.shard)}" if hasattr(video, "shard") else "the token shards"
        errors.append(f"{where}: sample {key} could not be read; video {getattr(video, 'video_id', key)} is not evaluated")
