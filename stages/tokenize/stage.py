"""The tokenize stage: every stored view of every frame becomes VQ-VAE code indices.

One token shard per committed frame shard (same number), so tokens never require decoding
video again, and switching tokenizer only re-runs this stage:

    shards/tokens/<dataset>/<frames variant dir>--tok-<tokenizer hash>/NNNNN.{tar,parquet,_stats.json}

A sample holds `<key>.tokens.npy`, an integer array (views, T, h, w) (uint16 when the
codebook fits, as the paper's 8192 codes do), and `<key>.json` naming the views, fps, size,
tokenizer and source frame shard. A unit's key hashes the stage's code version, the frame
shard's unit key and the tokenizer's identity (registry version or checkpoint hash), so the
same tokenizer over the same frames does no work.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.tokenizer import ImageTokenizer
from stages.config import ConfigError, DatasetConfig, TokenizeConfig, config_hash
from stages.frames.read import FrameShard, frame_shards, read_shard
from stages import threads
from stages.reporting import Reporter
from stages.units import StageOutcome, UnitRunner, run_units, thread_runner
from warehouse.catalog import Catalog, file_lock
from warehouse.compact import compact_after_run
from warehouse.layout import DataRoot
from warehouse.shards import ShardWriter, commit_shard, stats_path
from warehouse.tables import clean_partials, now

STAGE = "tokenize"
CODE_VERSION = "tokenize-1"


@dataclass(frozen=True)
class LoadedTokenizer:
    model: Any  # an ImageTokenizer (nn.Module)
    identity: str  # e.g. "models:/vimpac-tokenizer-demo/3" or "ckpt:<sha256[:16]>"
    device: str


@dataclass
class TokenUnit:
    frames: FrameShard
    number: str  # NNNNN, the frame shard's number
    unit: str
    out_dir: str  # relative to the data root


@dataclass
class TokenizePlan:
    dataset: DatasetConfig
    config: TokenizeConfig
    tokenizer: str
    pending: list[TokenUnit]
    cached: int
    skipped_frames_failed: int

    def describe(self) -> str:
        text = f"tokenize {self.dataset.name} with {self.tokenizer}: {self.cached} shards cached; "
        text += f"{len(self.pending)} to tokenize" if self.pending else "nothing to do"
        if self.skipped_frames_failed:
            text += f"; {self.skipped_frames_failed} videos failed in the frames stage and are skipped"
        return text


@dataclass
class TokenShardResult:
    unit: str
    tar: str
    n_videos: int
    frames: int
    seconds: float
    failures: list[dict] = field(default_factory=list)


NO_TOKENIZER = "tokenize needs a tokenizer: models:/NAME/VERSION, a checkpoint path or dalle:ENC[,DEC]"


def default_tokenizer(root: DataRoot, dataset: str) -> tuple[str, str]:
    """(tokenizer, why) for `tokenize` run without one: the newest tokenizer this data root
    trained on `dataset`, else the newest it trained at all (from the `runs` catalog). ConfigError,
    with the command that trains one, when the data root has none."""
    rows = Catalog(root).rows(
        """SELECT summary->>'model_uri', summary->>'checkpoint', config->'train_on', finished_at FROM runs
           WHERE stage = 'tokenizer' AND status = 'completed' ORDER BY finished_at DESC, run_id DESC""")
    candidates = []
    for uri, checkpoint, train_on, finished in rows:
        ref = uri or checkpoint
        if not ref:
            continue
        try:
            datasets = json.loads(train_on) if train_on else []
        except ValueError:
            datasets = []
        candidates.append((ref, datasets if isinstance(datasets, list) else [], finished))
    for ref, datasets, finished in candidates:
        if dataset in datasets:
            return ref, f"the newest tokenizer trained on {dataset} in this data root ({finished:%Y-%m-%d %H:%M})"
    if candidates:
        ref, datasets, finished = candidates[0]
        return ref, (f"the newest tokenizer of this data root ({finished:%Y-%m-%d %H:%M}, trained on {', '.join(datasets) or '?'}); "
                     f"none was trained on {dataset}")
    raise ConfigError(f"{NO_TOKENIZER}; this data root has none yet: train one with "
                      f"`vimpac run tokenizer --dataset {dataset}` (or give --tokenizer)")


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _tok_hash(identity: str) -> str:
    return hashlib.sha256(identity.encode()).hexdigest()[:10]


def plan_tokenize(
    root: DataRoot, dataset: DatasetConfig, cfg: TokenizeConfig, tokenizer: LoadedTokenizer, *, force: bool = False
) -> TokenizePlan:
    Catalog(root).ensure_tables()
    shards = frame_shards(root, dataset.name, variant=cfg.variant, size=cfg.size)
    if not shards:
        raise ConfigError(f"tokenize {dataset.name}: no committed frame shards (run `vimpac run frames` first)")
    d = tokenizer.model.downsample
    bad = sorted({s.size for s in shards if s.size % d})
    if bad:
        # Fail before any work: a tokenizer that cannot tile the frames is the wrong one.
        raise ConfigError(
            f"tokenizer {tokenizer.identity} downsamples by {d}, which does not divide frame size(s) {bad} of {dataset.name}"
        )
    failed = Catalog(root).rows(
        "SELECT count(*) FROM frame_samples WHERE dataset = ? AND status = 'failed'", [dataset.name]
    )[0][0]
    pending, cached = token_units(root, dataset.name, cfg, tokenizer.identity, shards, force=force)
    return TokenizePlan(dataset, cfg, tokenizer.identity, pending, cached, int(failed))


def token_shard_path(dataset: str, frames_shard: str, identity: str) -> str:
    """Where the token shard of one frame shard (tar path relative to the data root) goes."""
    frames_dir = Path(frames_shard).parent.name
    return f"shards/tokens/{dataset}/{frames_dir}--tok-{_tok_hash(identity)}/{Path(frames_shard).stem}.tar"


def token_units(root: DataRoot, dataset: str, cfg: TokenizeConfig, identity: str, shards: list[FrameShard], *,
                force: bool = False) -> tuple[list[TokenUnit], int]:
    """(units to tokenize, shards cached) for these frame shards and this tokenizer identity. A
    token shard is done when its stats file exists: the output folder is keyed by the frames
    variant and the tokenizer, so the same tokenizer over the same frames does no work. Reads
    only (`vimpac plan` uses it without a loaded model)."""
    pending, cached = [], 0
    for s in shards:
        path = token_shard_path(dataset, s.path, identity)
        unit = hashlib.sha256(json.dumps([CODE_VERSION, s.unit, identity, config_hash(cfg)]).encode()).hexdigest()[:16]
        done = stats_path(root.home / path).exists()
        if done and not force:
            cached += 1
            continue
        pending.append(TokenUnit(s, Path(path).stem, unit, str(Path(path).parent)))
    return pending, cached


@torch.no_grad()
def encode_frames(tokenizer: LoadedTokenizer, frames: np.ndarray, batch_size: int, amp: bool) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N, h, w) code indices, `batch_size` frames per forward pass."""
    out = []
    device = tokenizer.device
    use_amp = amp and device.startswith("cuda")
    for i in range(0, len(frames), batch_size):
        x = torch.from_numpy(frames[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            out.append(tokenizer.model.encode(x).cpu())  # (B, h, w)
    return torch.cat(out).numpy()


def _read_ahead(videos: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Yield from `videos` while a thread reads and JPEG-decodes the next ones (at most `depth`
    ahead), so the encoder does not wait for them: on an H200 the base tokenizer spent 40% of the
    stage waiting on that (bench/RESULTS.md). A reading error is raised here, in loop order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def fill() -> None:
        try:
            for video in videos:
                if not put((True, video)):
                    return
            put((True, end))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((False, e))

    thread = threading.Thread(target=fill, name="tokenize-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
        getattr(videos, "close", lambda: None)()


def tokenize_shard(
    root: DataRoot, plan: TokenizePlan, tokenizer: LoadedTokenizer, unit: TokenUnit, *, run_id: str
) -> TokenShardResult:
    t0 = time.perf_counter()
    codebook = int(tokenizer.model.codebook_size)
    dtype = np.uint16 if codebook <= 2**16 else np.int32
    tar_path = root.home / unit.out_dir / f"{unit.number}.tar"
    writer = ShardWriter(tar_path)
    rows: list[dict] = []
    frames_total = 0
    created = now()
    cfg_hash = config_hash(plan.config)
    try:
        for video in _read_ahead(read_shard(root, unit.frames)):
            views = video.meta["views"]
            stacked = np.stack([video.views[v] for v in views])  # (V, T, S, S, 3)
            v, t, s = stacked.shape[:3]
            tokens = encode_frames(tokenizer, stacked.reshape(v * t, s, s, 3), plan.config.batch_size, plan.config.amp)
            h, w = tokens.shape[1:]
            tokens = tokens.reshape(v, t, h, w).astype(dtype)  # (V, T, h, w)
            buf = io.BytesIO()
            np.save(buf, tokens, allow_pickle=False)
            meta = {
                "video_id": video.meta["video_id"],
                "dataset": plan.dataset.name,
                "label": video.meta.get("label"),
                "views": views,
                "fps": video.meta["fps"],
                "size": video.meta["size"],
                "n_frames": t,
                "grid": [h, w],
                "tokenizer": tokenizer.identity,
                "codebook_size": codebook,
                "frames_shard": unit.frames.path,
                "frames_unit": unit.frames.unit,
            }
            writer.add(video.key, {"tokens.npy": buf.getvalue(), "json": json.dumps(meta, sort_keys=True).encode()})
            frames_total += v * t
            rows.append(
                {
                    "dataset": plan.dataset.name, "video_id": meta["video_id"], "shard": f"{unit.out_dir}/{unit.number}.tar",
                    "tokenizer": tokenizer.identity, "variant": unit.frames.variant, "n_frames": t, "grid_h": h,
                    "grid_w": w, "n_views": v, "views": views, "fps": meta["fps"], "size": meta["size"],
                    "codebook_size": codebook, "key": video.key, "frames_shard": unit.frames.path,
                    "frames_unit": unit.frames.unit, "status": "ok", "error": None, "unit": unit.unit,
                    "config_hash": cfg_hash, "code_version": CODE_VERSION, "run_id": run_id, "created_at": created,
                }
            )
    except BaseException:
        writer.abort()
        raise
    seconds = time.perf_counter() - t0
    stats = {
        "stage": STAGE, "dataset": plan.dataset.name, "shard": unit.number, "unit": unit.unit, "count": len(rows),
        "frames": frames_total, "tokenizer": tokenizer.identity, "frames_shard": unit.frames.path,
        "frames_unit": unit.frames.unit, "code_version": CODE_VERSION, "seconds": round(seconds, 3),
    }
    marker = {
        "stage": STAGE, "dataset": plan.dataset.name, "unit": unit.unit, "path": f"{unit.out_dir}/{unit.number}.tar",
        "n_samples": len(rows), "n_failed": 0, "bytes": 0, "config_hash": cfg_hash, "code_version": CODE_VERSION,
        "run_id": run_id, "created_at": now(),
    }
    marker_name = f"{plan.dataset.name}--{Path(unit.out_dir).name}--{unit.number}.parquet"
    commit_shard(writer, "token_samples", rows, stats, marker, root.table_dir("shards", STAGE, marker_name))
    return TokenShardResult(unit.unit, f"{unit.out_dir}/{unit.number}.tar", len(rows), frames_total, seconds)


def _tokenize_unit(root: DataRoot, plan: TokenizePlan, tokenizer: LoadedTokenizer, run_id: str, unit: TokenUnit) -> TokenShardResult:
    return tokenize_shard(root, plan, tokenizer, unit, run_id=run_id)


def run_tokenize(
    root: DataRoot,
    dataset: DatasetConfig,
    cfg: TokenizeConfig,
    tokenizer: LoadedTokenizer,
    *,
    run_id: str,
    force: bool = False,
    reporter: Reporter | None = None,
    runner: UnitRunner = thread_runner,
) -> StageOutcome:
    reporter = reporter or Reporter()
    threads.rebalance(reporter.info)  # encoding starts: the process's current share, split among the units in flight
    if not isinstance(tokenizer.model, ImageTokenizer):
        raise ConfigError(f"tokenizer {tokenizer.identity} does not offer encode/decode/codebook_size/downsample")
    with file_lock(root.locks / f"{STAGE}--{dataset.name}.lock"):
        t0 = time.perf_counter()
        plan = plan_tokenize(root, dataset, cfg, tokenizer, force=force)
        clean_partials(root.home / "shards" / "tokens" / dataset.name, "*/.*.partial")
        clean_partials(root.table_dir("shards", STAGE), f".{dataset.name}--*.partial")
        reporter.info(plan.describe())
        reporter.start_progress(sum(u.frames.n_ok for u in plan.pending), f"tokenize {dataset.name}")
        results, errors = run_units(
            runner,
            functools.partial(_tokenize_unit, root, plan, tokenizer, run_id),
            plan.pending,
            workers=cfg.workers,
            name=lambda u: f"tokenize-{dataset.name}-{u.number}",
            describe=lambda u: f"frame shard {u.frames.path}",
            reporter=reporter,
            label=dataset.name,
            progress=lambda rs: {"videos_done": sum(r.n_videos for r in rs), "frames_done": sum(r.frames for r in rs)},
        )
        seconds = time.perf_counter() - t0
        frames = sum(r.frames for r in results)
        summary = {
            "dataset": dataset.name,
            "tokenizer": tokenizer.identity,
            "shards_built": len(results),
            "shards_cached": plan.cached,
            "shard_errors": len(errors),
            "videos": sum(r.n_videos for r in results),
            "frames": frames,
            "skipped_failed_upstream": plan.skipped_frames_failed,
            "seconds": round(seconds, 3),
            "frames_per_s": round(frames / seconds, 2) if seconds > 0 else 0.0,
            "device": tokenizer.device,
            "code_version": CODE_VERSION,
        }
        reporter.info(
            f"tokenize {dataset.name}: {summary['videos']} videos, {frames} frames in {len(results)} shards, "
            f"{summary['frames_per_s']} frames/s on {tokenizer.device}"
        )
        compact_after_run(root, STAGE, dataset.name, info=reporter.info, warning=reporter.warning)
        return StageOutcome(plan, results, errors, summary)


def file_identity(path: str | Path, prefix: str = "ckpt") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{prefix}:{h.hexdigest()[:16]}"


def load_tokenizer(ref: str, *, device: str = "auto") -> LoadedTokenizer:
    """A local tokenizer: a checkpoint of the tokenizer stage, or `dalle:ENC[,DEC]`. Registry
    URIs (models:/...) are resolved to a local checkpoint by the flow, which owns MLflow."""
    device = pick_device(device)
    if ref.startswith("dalle:"):
        from models.dalle_dvae import DalleDVAE

        paths = ref[len("dalle:") :].split(",")
        model = DalleDVAE.from_files(paths[0], paths[1] if len(paths) > 1 else None)
        identity = file_identity(paths[0], "dalle")
    else:
        from stages.tokenizer.train import load_checkpoint

        path = Path(ref)
        if not path.exists():
            raise ConfigError(f"tokenizer checkpoint {path} does not exist")
        try:
            model = load_checkpoint(path)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        identity = file_identity(path)
    return LoadedTokenizer(model.to(device).eval(), identity, device)
