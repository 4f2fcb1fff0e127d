"""Train the VQ-VAE image tokenizer on frames drawn from committed frame shards.

Frames stream shard by shard (shard order reshuffled every epoch), pass through a seeded
shuffle buffer and form batches; every epoch's stream depends only on (seed, epoch), so a
resumed run rebuilds the same stream and skips the batches its checkpoint already consumed.
Training runs on the shared engine (stages/engine.py) as `ReconstructionObjective`; logged
figures are averages over each log window (step 1 is logged on its own).

Files live under `<home>/checkpoints/tokenizer/<run_key>/`: `last.pt` (resume point: model,
optimizer, scheduler, RNG states, data position), `final.pt` (the trained tokenizer: model state,
model config, metadata), `eval.json` (per-dataset reconstruction figures) and `grid.png`
(per evaluated dataset, originals over reconstructions). A finished `final.pt` means the run is
done: the same data and config never train twice.

Evaluation (docs/tokenizer.md): for every dataset the tokenizer will encode, a fixed sample of
`EVAL_FRAMES` frames spread over up to `EVAL_VIDEOS` videos, chosen by a hash of the video id. A
training dataset is evaluated on videos held out of training (`holdout_videos`); other datasets
were never trained on. Each dataset's PSNR is reported next to its mean-frame baseline (every
evaluation frame predicted by the mean of that dataset's evaluation frames), with a warning when
the tokenizer does not beat it by `WARN_MARGIN_DB`. Which datasets are evaluated is not part of
the run key: evaluation reads the model, it never changes it.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.vqvae import PRESETS, VQVAE
from stages.checkpoints import KeyedRun, atomic_save, cpu_has_bf16, read_checkpoint, resolve_device, strip_prefixes
from stages.engine import Engine, Objective
from stages.config import TokenizerConfig, config_hash
from stages.frames.read import FrameShard, frame_shards, read_shard
from stages import threads
from stages.pretrain.distributed import DistInfo
from stages.reporting import Reporter
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

# 2: videos held out of training for evaluation, per-dataset evaluation, FSQ / stride-2 tiny preset.
CODE_VERSION = "tokenizer-2"
FORMAT = "vimpac-tokenizer"  # marks our own checkpoint files, so a stray .pt is refused clearly
EVAL_FRAMES = 64  # evaluation frames per dataset
EVAL_VIDEOS = 16  # ... spread over at most this many videos (fewer shards to read)
EVAL_VERSION = 1  # bump when the evaluation's selection or figures change: stored results are redone
WARN_MARGIN_DB = 3.0  # a dataset reconstructed within this much of its mean frame gets a warning
GRID_FRAMES = 8
GRID_GAP = 2


@dataclass
class TrainedTokenizer:
    checkpoint: Path
    model_config: dict
    data_fingerprint: str
    run_key: str
    steps: int
    metrics: dict  # overall figures (training datasets' evaluation frames) and per dataset: psnr/<name>, ...
    grid_png: Path | None
    cached: bool
    evaluation: dict[str, dict] = field(default_factory=dict)  # dataset -> its evaluation (see DatasetEval)
    warnings: list[str] = field(default_factory=list)


def _psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-12))


def _code_stats(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    counts = torch.bincount(indices.reshape(-1).cpu(), minlength=codebook_size).double()  # (K,)
    probs = counts / counts.sum()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
    return float(entropy.exp()), float((counts > 0).double().mean())


def _read_checkpoint(path: str | Path) -> dict:
    return read_checkpoint(path, FORMAT, "tokenizer")


def load_checkpoint(path: str | Path) -> VQVAE:
    """The VQ-VAE saved in one of our checkpoints (final.pt or last.pt), on CPU, in eval mode."""
    ckpt = _read_checkpoint(path)
    try:
        model = VQVAE.from_config(dict(ckpt["model_config"]))
        model.load_state_dict(strip_prefixes(ckpt["model"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"tokenizer checkpoint {path} does not match the VQ-VAE model: {type(e).__name__}: {e}") from e
    return model.eval()


def _select_shards(root: DataRoot, datasets: list[str], size: int | None) -> list[FrameShard]:
    shards = []
    for name in datasets:
        found = [s for s in frame_shards(root, name, size=size) if s.n_ok > 0]
        if not found:
            what = "committed frame shards" + (f" of size {size}" if size is not None else "")
            raise ValueError(f"dataset {name!r} has no {what}; run the frames stage first")
        shards += found
    sizes = sorted({s.size for s in shards})
    if len(sizes) > 1:
        raise ValueError(f"frame shards of {', '.join(datasets)} come in several sizes {sizes}; set tokenizer.size")
    return shards


def _fingerprint(shards: list[FrameShard]) -> str:
    return hashlib.sha256("\n".join(sorted(s.unit for s in shards)).encode()).hexdigest()


def _run_key(cfg: TokenizerConfig, fingerprint: str) -> str:
    blob = json.dumps([CODE_VERSION, config_hash(cfg), fingerprint], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TokenizerRun(KeyedRun):
    """Which training run a config and the committed frames make: its key and folder."""

    shards: list[FrameShard]


def tokenizer_run(root: DataRoot, datasets: list[str], cfg: TokenizerConfig, frame_size: int | None = None) -> TokenizerRun:
    """The run key `train_tokenizer` would use (code version, config, the frame shards' units),
    read-only: no training, nothing written. ValueError when a dataset has no frame shards."""
    shards = _select_shards(root, datasets, cfg.size or frame_size)
    fingerprint = _fingerprint(shards)
    run_key = _run_key(cfg, fingerprint)
    return TokenizerRun(run_key=run_key, data_fingerprint=fingerprint, run_dir=root.home / "checkpoints" / "tokenizer" / run_key,
                        shards=shards)


def _rank(dataset: str, video_id: str) -> str:
    """Where a video stands in a dataset's fixed pseudo-random order (holdout, evaluation)."""
    return hashlib.sha256(f"{dataset}/{video_id}".encode()).hexdigest()


def _videos(root: DataRoot, dataset: str, shards: list[FrameShard]) -> dict[str, FrameShard]:
    """Every usable video of these shards of one dataset -> the first shard holding it."""
    by_unit = {s.unit: s for s in shards if s.dataset == dataset}
    if not by_unit:
        return {}
    rows = Catalog(root).rows(
        "SELECT video_id, unit FROM frame_samples WHERE dataset = ? AND status <> 'failed' AND list_contains(?, unit)",
        [dataset, list(by_unit)])
    order = {u: i for i, u in enumerate(by_unit)}
    found: dict[str, FrameShard] = {}
    for video_id, unit in sorted(rows, key=lambda r: (order[r[1]], r[0])):
        found.setdefault(video_id, by_unit[unit])
    return found


def held_out_videos(root: DataRoot, datasets: list[str], shards: list[FrameShard], count: int) -> dict[str, list[str]]:
    """Per training dataset, the videos training never sees, kept for evaluation: the `count`
    first in the dataset's hash order, but at most a quarter of its videos (none when it has
    fewer than 4: its evaluation is then on training frames, and says so)."""
    held = {}
    for name in datasets:
        ids = list(_videos(root, name, shards))
        held[name] = heapq.nsmallest(min(count, len(ids) // 4), ids, key=lambda v: _rank(name, v))
    return held


def _epoch_batches(root: DataRoot, shards: list[FrameShard], view: str, batch_size: int, buffer_size: int,
                   rng: np.random.Generator, skip: dict[str, list[str]] | None = None) -> Iterator[np.ndarray]:
    """One pass over every frame, shuffled through a buffer: (B, S, S, 3) uint8 batches.
    `skip`: per dataset, video ids left out (held out for evaluation).

    Full batches only, except an epoch smaller than one batch, which yields what it has.
    """
    skipped = {name: set(ids) for name, ids in (skip or {}).items()}

    def frames() -> Iterator[np.ndarray]:
        for i in rng.permutation(len(shards)):
            left_out = skipped.get(shards[i].dataset, ())
            for video in read_shard(root, shards[i], views=[view]):
                if video.meta.get("video_id") in left_out:
                    continue
                yield from video.views[view]  # (S, S, 3) each

    buffer: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    yielded = False
    for frame in frames():
        if len(buffer) < buffer_size:
            buffer.append(frame)
            continue
        j = int(rng.integers(len(buffer)))
        batch.append(buffer[j])
        buffer[j] = frame
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch, yielded = [], True
    for j in rng.permutation(len(buffer)):
        batch.append(buffer[j])
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch, yielded = [], True
    if batch and not yielded:
        yield np.stack(batch)


def _to_tensor(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S) in [0, 1]


def _lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class ReconstructionObjective(Objective):
    """The VQ-VAE's training on the engine: reconstruction + commitment loss of a batch of
    frames; logged figures are averages over the log window."""

    def count(self, batch: dict) -> int:
        return int(batch["frames"].shape[0])

    def loss(self, net: torch.nn.Module, batch: dict, context, k: int) -> tuple[torch.Tensor, dict]:
        frames = batch["frames"].permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S) in [0, 1]
        out = net(frames)
        return out.loss / k, {"loss": float(out.loss.detach()), "recon_loss": float(out.recon_loss.detach()),
                              "commit_loss": float(out.commit_loss.detach()), "usage": float(out.usage),
                              "perplexity": float(out.perplexity)}

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["steps"])
        values = {key: sums[key] / n for key in ("loss", "recon_loss", "commit_loss", "usage", "perplexity")}
        values["psnr"] = _psnr(values["recon_loss"])
        return values


# ----------------------------------------------------------------------------- evaluation


@dataclass
class EvalSample:
    """Which frames evaluate a tokenizer on one dataset (read from the catalog, no pixels)."""

    dataset: str
    held_out: bool  # frames of videos the tokenizer never trained on
    videos: list[tuple[str, FrameShard]]  # (video_id, shard holding it), in the dataset's hash order
    key: str  # identifies the selection: a stored result computed on another one is redone


def eval_sample(root: DataRoot, dataset: str, shards: list[FrameShard], view: str, *, trained_on: bool,
                held_out: list[str]) -> EvalSample:
    """The fixed evaluation sample of a dataset: up to EVAL_VIDEOS videos in the dataset's hash
    order, from its held-out videos if the tokenizer trains on it (or, with none held out, from
    its training videos), else from all its videos."""
    videos = _videos(root, dataset, shards)
    candidates = (held_out or list(videos)) if trained_on else list(videos)
    chosen = heapq.nsmallest(EVAL_VIDEOS, candidates, key=lambda v: _rank(dataset, v))
    picked = [(v, videos[v]) for v in chosen if v in videos]
    blob = json.dumps([EVAL_VERSION, EVAL_FRAMES, view, [(v, s.unit) for v, s in picked]], separators=(",", ":"))
    return EvalSample(dataset, bool(held_out) or not trained_on, picked, hashlib.sha256(blob.encode()).hexdigest()[:16])


def read_eval_frames(root: DataRoot, sample: EvalSample, view: str, n_frames: int = EVAL_FRAMES) -> np.ndarray:
    """(N, S, S, 3) uint8: n_frames spread over the sample's videos (evenly spaced in each video,
    the first videos taking one more when they do not divide evenly), in the sample's order."""
    if not sample.videos:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8)
    n_videos = len(sample.videos)
    quota = {v: n_frames // n_videos + (i < n_frames % n_videos) for i, (v, _) in enumerate(sample.videos)}
    by_shard: dict[str, tuple[FrameShard, set[str]]] = {}
    for video_id, shard in sample.videos:
        by_shard.setdefault(shard.unit, (shard, set()))[1].add(video_id)
    got: dict[str, np.ndarray] = {}
    for shard, wanted in by_shard.values():
        stream = read_shard(root, shard, views=[view])
        for video in stream:
            video_id = video.meta.get("video_id")
            if video_id in wanted and video_id not in got and quota[video_id] > 0:
                frames = video.views[view]  # (T, S, S, 3)
                got[video_id] = frames[np.unique(np.linspace(0, len(frames) - 1, quota[video_id]).round().astype(int))]
            if wanted <= set(got):
                break
        stream.close()  # releases the open shard
    parts = [got[v] for v, _ in sample.videos if v in got]
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), dtype=np.uint8)


@torch.no_grad()
def evaluate_frames(model: VQVAE, frames: np.ndarray, device: torch.device, amp: bool = False,
                    batch_size: int = 64) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction figures of frames (N, S, S, 3) uint8 through encode -> decode, and the
    frames, reconstructions (N, 3, S, S) and tokens (N, h, w). The baseline predicts every frame
    by the mean of these frames."""
    model.eval()
    originals, recons, tokens = [], [], []
    for start in range(0, len(frames), batch_size):
        x = _to_tensor(frames[start : start + batch_size], device)  # (b, 3, S, S)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            t = model.encode(x)  # (b, h, w)
            r = model.decode(t).float()  # (b, 3, S, S), clamped
        originals.append(x)
        recons.append(r)
        tokens.append(t)
    x, r, t = torch.cat(originals), torch.cat(recons), torch.cat(tokens)
    mse = float(torch.mean((r - x) ** 2))
    baseline_mse = float(torch.mean((x.mean(0, keepdim=True) - x) ** 2))
    perplexity, usage = _code_stats(t, model.codebook_size)
    figures = {"frames": len(x), "recon_loss": mse, "psnr": _psnr(mse), "baseline_mse": baseline_mse,
               "baseline_psnr": _psnr(baseline_mse), "usage": usage, "perplexity": perplexity}
    return figures, x, r, t


def _pooled(results: list[dict], tokens: torch.Tensor | None, codebook_size: int) -> dict:
    """Overall figures over several datasets' evaluation frames (each dataset's baseline is its own mean frame)."""
    n = sum(r["frames"] for r in results)
    mse = sum(r["recon_loss"] * r["frames"] for r in results) / max(1, n)
    baseline = sum(r["baseline_mse"] * r["frames"] for r in results) / max(1, n)
    out = {"recon_loss": mse, "psnr": _psnr(mse), "baseline_psnr": _psnr(baseline)}
    if tokens is not None:
        out["perplexity"], out["usage"] = _code_stats(tokens, codebook_size)
    return out


def _write_grid(rows: list[tuple[str, torch.Tensor, torch.Tensor]], path: Path) -> Path:
    """Per dataset a caption, its originals and their reconstructions below; (N, 3, S, S) in [0, 1] each."""
    from PIL import ImageDraw

    s = max(x.shape[-1] for _, x, _ in rows)
    n = max(len(x) for _, x, _ in rows)
    caption = 14
    block = caption + 2 * (s + GRID_GAP)
    sheet = Image.new("RGB", (max(n * s + (n + 1) * GRID_GAP, 360), len(rows) * block + GRID_GAP), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for b, (title, originals, recons) in enumerate(rows):
        top = b * block
        draw.text((GRID_GAP + 2, top + 2), title, fill=(230, 230, 230))
        for row, images in enumerate((originals, recons)):
            pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)
            for i, img in enumerate(pixels):
                sheet.paste(Image.fromarray(img), (GRID_GAP + i * (s + GRID_GAP), top + caption + GRID_GAP + row * (s + GRID_GAP)))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class _Evaluation:
    results: dict[str, dict]  # dataset -> figures + held_out, videos, key
    computed: bool  # False: every result came from eval.json
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # when computed


def _evaluate_datasets(root: DataRoot, run_dir: Path, names: list[str], trained_on: list[str], shards: list[FrameShard],
                       held: dict[str, list[str]], cfg: TokenizerConfig, size: int, get_model, device: torch.device,
                       amp: bool, reporter: Reporter, *, reuse: bool) -> _Evaluation:
    """Evaluate the tokenizer on each named dataset's fixed sample (datasets without frame
    shards of this size are skipped with a warning). With `reuse`, results stored in eval.json
    for the same selections are returned as they are; if any is missing, all are evaluated
    again (a few hundred frames), so grid.png always shows every named dataset."""
    samples: list[EvalSample] = []
    for name in names:
        if name in trained_on:
            ds_shards = [s for s in shards if s.dataset == name]
        else:
            ds_shards = [s for s in frame_shards(root, name, size=size) if s.n_ok > 0]
        if not ds_shards:
            reporter.warning(f"tokenizer: cannot evaluate {name}: it has no committed frame shards of size {size}")
            continue
        samples.append(eval_sample(root, name, ds_shards, cfg.view, trained_on=name in trained_on, held_out=held.get(name, [])))
    store_path = run_dir / "eval.json"
    stored = _read_json(store_path).get("datasets", {}) if reuse else {}
    if reuse and all(stored.get(s.dataset, {}).get("key") == s.key for s in samples):
        return _Evaluation({s.dataset: stored[s.dataset] for s in samples}, computed=False)

    model = get_model()
    results, tokens, rows = {}, {}, []
    for sample in samples:
        frames = read_eval_frames(root, sample, cfg.view)
        if not len(frames):
            reporter.warning(f"tokenizer: cannot evaluate {sample.dataset}: no frames of view {cfg.view!r} in its sample")
            continue
        figures, x, r, t = evaluate_frames(model, frames, device, amp)
        results[sample.dataset] = figures | {"held_out": sample.held_out, "videos": len(sample.videos), "key": sample.key}
        tokens[sample.dataset] = t
        pick = np.unique(np.linspace(0, len(x) - 1, min(GRID_FRAMES, len(x))).round().astype(int))
        title = (f"{sample.dataset}: {figures['psnr']:.1f} dB, mean frame {figures['baseline_psnr']:.1f} dB"
                 + ("" if sample.held_out else " (training frames)"))
        rows.append((title, x[pick], r[pick]))
    if rows:
        _write_grid(rows, run_dir / "grid.png")
    _write_json(store_path, {"version": EVAL_VERSION, "datasets": {**_read_json(store_path).get("datasets", {}), **results}})
    return _Evaluation(results, computed=True, tokens=tokens)


def _report_evaluation(evaluation: _Evaluation, run_key: str, reporter: Reporter) -> list[str]:
    """Per dataset an info line, and a warning (returned too) where the tokenizer barely beats the mean frame."""
    warnings = []
    for name, r in evaluation.results.items():
        gain = r["psnr"] - r["baseline_psnr"]
        where = f"{r['frames']} frames of {r['videos']} " + ("held-out videos" if r["held_out"] else "training videos (too few to hold any out)")
        reporter.info(f"tokenizer eval {name}: PSNR {r['psnr']:.2f} dB, mean-frame baseline {r['baseline_psnr']:.2f} dB "
                      f"({gain:+.2f} dB), {r['usage']:.1%} of codes used; {where}")
        if gain < WARN_MARGIN_DB:
            msg = (f"tokenizer {run_key} reconstructs {name} at {r['psnr']:.1f} dB, within {WARN_MARGIN_DB:g} dB of that dataset's "
                   f"mean frame ({r['baseline_psnr']:.1f} dB): its tokens may lose what the frames show (see grid.png); "
                   f"train the tokenizer longer, on frames like these, or use a larger preset")
            reporter.warning(msg)
            warnings.append(msg)
    return warnings


def _per_dataset_metrics(results: dict[str, dict]) -> dict[str, float]:
    out = {}
    for name, r in results.items():
        out[f"psnr/{name}"] = r["psnr"]
        out[f"baseline_psnr/{name}"] = r["baseline_psnr"]
    return out


def _cached_result(final: Path, grid: Path) -> TrainedTokenizer:
    ckpt = _read_checkpoint(final)
    meta = ckpt["metadata"]
    return TrainedTokenizer(final, dict(ckpt["model_config"]), meta["data_fingerprint"], meta["run_key"],
                            int(meta["steps"]), dict(meta["metrics"]), grid if grid.exists() else None, True)


def _eval_names(datasets: list[str], evaluate_on: list[str] | None) -> list[str]:
    """The training datasets first (the overall figures), then the others, each once."""
    return list(dict.fromkeys([*datasets, *(evaluate_on or [])]))


def train_tokenizer(root: DataRoot, datasets: list[str], cfg: TokenizerConfig, *, reporter: Reporter | None = None,
                    frame_size: int | None = None, force: bool = False, evaluate_on: list[str] | None = None) -> TrainedTokenizer:
    """Train (or resume, or find already trained) the VQ-VAE for these datasets' frames, and
    report its reconstruction on each of `datasets` and `evaluate_on` (the datasets it will
    tokenize). `force` trains again from scratch, replacing what this run key had."""
    reporter = reporter or Reporter()
    if not datasets:
        raise ValueError("train_tokenizer needs at least one dataset")
    threads.rebalance(reporter.info)  # training starts: this thread takes the process's current share of the cores
    planned = tokenizer_run(root, datasets, cfg, frame_size)
    shards, fingerprint, run_key, run_dir = planned.shards, planned.data_fingerprint, planned.run_key, planned.run_dir
    final, last, grid = planned.final, planned.last, run_dir / "grid.png"
    names = _eval_names(datasets, evaluate_on)
    held = held_out_videos(root, datasets, shards, cfg.holdout_videos)
    size = shards[0].size
    device = resolve_device(cfg.device)
    # Evaluation (and the tokenize stage) encode in fp32 on a CPU; training also uses bf16 autocast
    # on a CPU with bf16 units, where the tiny preset's step takes about 0.7 of its fp32 time with
    # the same held-out PSNR (docs/tokenizer.md, "Batch 16 and bf16 on the CPU").
    amp = cfg.amp and device.type == "cuda"
    train_amp = cfg.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))
    if force:
        for path in (final, last, run_dir / "eval.json"):
            path.unlink(missing_ok=True)
    if final.exists():
        reporter.info(f"tokenizer {run_key} already trained: {final}")
        result = _cached_result(final, grid)
        evaluation = _evaluate_datasets(root, run_dir, names, datasets, shards, held, cfg, size,
                                        lambda: load_checkpoint(final).to(device), device, amp, reporter, reuse=True)
        if evaluation.computed:
            reporter.metrics({f"eval_{k}": v for k, v in _per_dataset_metrics(evaluation.results).items()}, step=result.steps)
        result.grid_png = grid if grid.exists() else None
    else:
        result, evaluation = _train(root, datasets, cfg, reporter, planned, held, names, device, amp, train_amp)
    result.evaluation = evaluation.results
    result.metrics = {**result.metrics, **_per_dataset_metrics(evaluation.results)}
    result.warnings = _report_evaluation(evaluation, run_key, reporter)
    return result


def _train(root: DataRoot, datasets: list[str], cfg: TokenizerConfig, reporter: Reporter, planned: TokenizerRun,
           held: dict[str, list[str]], names: list[str], device: torch.device, amp: bool,
           train_amp: bool) -> tuple[TrainedTokenizer, _Evaluation]:
    shards, fingerprint, run_key, run_dir = planned.shards, planned.data_fingerprint, planned.run_key, planned.run_dir
    final, last, grid = planned.final, planned.last, run_dir / "grid.png"
    run_dir.mkdir(parents=True, exist_ok=True)

    model_config = PRESETS[cfg.preset]()
    if cfg.codebook_size is not None:
        if model_config.quantizer == "fsq":
            raise ValueError(f"the {cfg.preset!r} preset quantises with FSQ, whose codebook size is the product of its levels "
                             f"{model_config.fsq_levels}; codebook_size cannot be overridden")
        model_config.codebook_size = cfg.codebook_size
    size = shards[0].size
    downsample = model_config.stem_stride * 2 ** len(model_config.channel_mults)
    if size % downsample:
        raise ValueError(f"frame size {size} is not a multiple of the {cfg.preset!r} preset's downsample factor {downsample}")
    skip = {name: ids for name, ids in held.items() if ids}
    for name in datasets:
        if held.get(name):
            reporter.info(f"{name}: {len(held[name])} videos held out of tokenizer training for evaluation")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = VQVAE(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device, owns_group=False)
    engine = Engine(model, optimizer, scheduler, ReconstructionObjective(), info=info, reporter=reporter, amp=train_amp, grad_clip=1.0,
                    accumulate=1, last=last, what="tokenizer", log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every,
                    batches_per_epoch=0, log_first=True,
                    checkpoint_header={"format": FORMAT, "code_version": CODE_VERSION, "run_key": run_key,
                                       "model_config": model.config_dict(), "config": cfg.model_dump(mode="json")})
    if engine.resume():
        reporter.info(f"resuming at step {engine.step} from {last}")
    else:
        precision = "bf16 autocast" if train_amp else "fp32"
        reporter.info(f"training tokenizer {run_key} ({cfg.preset}, {len(shards)} shards, {size} px) on {device}, {precision}")

    def epochs(epoch: int, resume_at: int) -> Iterator[dict]:
        """One shuffled pass over every frame (held-out videos skipped) from batch `resume_at` on;
        the pass's order depends on (seed, epoch) only, so a resumed epoch replays it."""
        seen = 0
        for batch in _epoch_batches(root, shards, cfg.view, cfg.batch_size, cfg.shuffle_buffer,
                                    np.random.default_rng([cfg.seed, 0, epoch]), skip):
            seen += 1
            if seen > resume_at:  # batches before the resume point were trained on
                yield {"frames": torch.from_numpy(batch)}  # (B, S, S, 3) uint8
        if seen == 0:
            raise ValueError(f"no usable frames (view {cfg.view!r}) in the frame shards of {', '.join(datasets)}")

    started, start_step = time.perf_counter(), engine.step
    step = engine.run(first_step=0, end_step=cfg.steps, stop_at=cfg.steps, epochs=epochs, label="tokenizer steps")
    elapsed = time.perf_counter() - started
    if step > start_step:
        reporter.info(f"trained steps {start_step + 1}-{step} in {elapsed:.1f} s ({elapsed / (step - start_step):.3f} s/step)")

    model.eval()
    evaluation = _evaluate_datasets(root, run_dir, names, datasets, shards, held, cfg, size, lambda: model, device, amp,
                                    reporter, reuse=False)
    trained = [evaluation.results[n] for n in datasets if n in evaluation.results]
    if not trained:
        raise ValueError(f"no usable frames (view {cfg.view!r}) to evaluate in the frame shards of {', '.join(datasets)}")
    tokens = torch.cat([evaluation.tokens[n] for n in datasets if n in evaluation.tokens])
    metrics = _pooled(trained, tokens, model.codebook_size)
    reporter.metrics({f"eval_{k}": v for k, v in (metrics | _per_dataset_metrics(evaluation.results)).items()}, step=step)
    reporter.info(f"tokenizer eval (training datasets' evaluation frames): PSNR {metrics['psnr']:.2f} dB "
                  f"(mean-frame baseline {metrics['baseline_psnr']:.2f} dB), {metrics['usage']:.1%} of codes used")
    reporter.artifact(grid)
    metadata = {"run_key": run_key, "data_fingerprint": fingerprint, "code_version": CODE_VERSION, "steps": step,
                "metrics": metrics, "datasets": list(datasets), "shards": [s.unit for s in shards], "frame_size": size,
                "held_out": {n: ids for n, ids in held.items() if ids}, "config": cfg.model_dump(mode="json")}
    atomic_save({"format": FORMAT, "kind": "final", "model": strip_prefixes(model.state_dict()),
                  "model_config": model.config_dict(), "metadata": metadata}, final)
    last.unlink(missing_ok=True)  # the resume point is moot once the run is finished
    reporter.artifact(final)
    return TrainedTokenizer(final, model.config_dict(), fingerprint, run_key, step, metrics, grid, False), evaluation
