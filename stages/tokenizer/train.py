"""Train the VQ-VAE image tokenizer on frames drawn from committed frame shards.

Frames stream shard by shard (shard order reshuffled every epoch), pass through a seeded
shuffle buffer and form batches; every epoch's stream depends only on (seed, epoch), so a
resumed run rebuilds the same stream and skips the batches its checkpoint already consumed.

Files live under `<home>/checkpoints/tokenizer/<run_key>/`: `last.pt` (resume point: model,
optimizer, scheduler, RNG states, data position), `final.pt` (the trained tokenizer: model state,
model config, metadata) and `grid.png` (originals over reconstructions). A finished `final.pt`
means the run is done: the same data and config never train twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.vqvae import PRESETS, VQVAE
from stages.checkpoints import KeyedRun, atomic_save, flush_denormals, read_checkpoint, resolve_device, rng_states, set_rng_states, strip_prefixes
from stages.config import TokenizerConfig, config_hash
from stages.frames.read import FrameShard, frame_shards, read_shard
from stages.reporting import Reporter
from warehouse.layout import DataRoot

CODE_VERSION = "tokenizer-1"
FORMAT = "vimpac-tokenizer"  # marks our own checkpoint files, so a stray .pt is refused clearly
EVAL_FRAMES = 64
GRID_FRAMES = 8
GRID_GAP = 2


@dataclass
class TrainedTokenizer:
    checkpoint: Path
    model_config: dict
    data_fingerprint: str
    run_key: str
    steps: int
    metrics: dict
    grid_png: Path | None
    cached: bool


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


def _epoch_batches(root: DataRoot, shards: list[FrameShard], view: str, batch_size: int, buffer_size: int,
                   rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One pass over every frame, shuffled through a buffer: (B, S, S, 3) uint8 batches.

    Full batches only, except an epoch smaller than one batch, which yields what it has.
    """

    def frames() -> Iterator[np.ndarray]:
        for i in rng.permutation(len(shards)):
            for video in read_shard(root, shards[i], views=[view]):
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


def _write_grid(originals: torch.Tensor, recons: torch.Tensor, path: Path) -> Path:
    """Originals in the top row, their reconstructions below; (N, 3, S, S) in [0, 1] each."""
    n, _, s, _ = originals.shape
    sheet = Image.new("RGB", (n * s + (n + 1) * GRID_GAP, 2 * s + 3 * GRID_GAP), (40, 40, 40))
    for row, images in enumerate((originals, recons)):
        pixels = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)
        for i, img in enumerate(pixels):
            sheet.paste(Image.fromarray(img), (GRID_GAP + i * (s + GRID_GAP), GRID_GAP + row * (s + GRID_GAP)))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _cached_result(final: Path, grid: Path) -> TrainedTokenizer:
    ckpt = _read_checkpoint(final)
    meta = ckpt["metadata"]
    return TrainedTokenizer(final, dict(ckpt["model_config"]), meta["data_fingerprint"], meta["run_key"],
                            int(meta["steps"]), dict(meta["metrics"]), grid if grid.exists() else None, True)


def train_tokenizer(root: DataRoot, datasets: list[str], cfg: TokenizerConfig, *, reporter: Reporter | None = None,
                    frame_size: int | None = None, force: bool = False) -> TrainedTokenizer:
    """Train (or resume, or find already trained) the VQ-VAE for these datasets' frames.
    `force` trains again from scratch, replacing what this run key had."""
    reporter = reporter or Reporter()
    if not datasets:
        raise ValueError("train_tokenizer needs at least one dataset")
    planned = tokenizer_run(root, datasets, cfg, frame_size)
    shards, fingerprint, run_key, run_dir = planned.shards, planned.data_fingerprint, planned.run_key, planned.run_dir
    final, last, grid = planned.final, planned.last, run_dir / "grid.png"
    if force:
        for path in (final, last):
            path.unlink(missing_ok=True)
    if final.exists():
        reporter.info(f"tokenizer {run_key} already trained: {final}")
        return _cached_result(final, grid)
    run_dir.mkdir(parents=True, exist_ok=True)

    model_config = PRESETS[cfg.preset]()
    if cfg.codebook_size is not None:
        model_config.codebook_size = cfg.codebook_size
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"

    # A fixed evaluation batch from its own seeded stream: independent of training's RNG use.
    eval_stream = _epoch_batches(root, shards, cfg.view, EVAL_FRAMES, cfg.shuffle_buffer, np.random.default_rng([cfg.seed, 1]))
    eval_np = next(eval_stream, None)  # (E, S, S, 3)
    eval_stream.close()  # releases the open shard
    if eval_np is None:
        raise ValueError(f"no usable frames (view {cfg.view!r}) in the frame shards of {', '.join(datasets)}")
    size = eval_np.shape[1]
    downsample = 2 ** len(model_config.channel_mults)
    if size % downsample:
        raise ValueError(f"frame size {size} is not a multiple of the {cfg.preset!r} preset's downsample factor {downsample}")

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    model = VQVAE(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.steps))
    # Sum of every training frame seen, for the mean-frame baseline.
    frame_sum = torch.zeros(3, size, size, dtype=torch.float64)
    frame_count = 0
    step, epoch, consumed = 0, 0, 0  # consumed: batches of `epoch` already trained on

    if last.exists():
        ckpt = _read_checkpoint(last)
        try:
            model.load_state_dict(strip_prefixes(ckpt["model"]))
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            step, epoch, consumed = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["consumed"])
            frame_sum, frame_count = ckpt["frame_sum"], int(ckpt["frame_count"])
            set_rng_states(ckpt["rng"], device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"cannot resume from {last}: {type(e).__name__}: {e}; delete it to start over") from e
        reporter.info(f"resuming at step {step} from {last}")
    else:
        reporter.info(f"training tokenizer {run_key} ({cfg.preset}, {len(shards)} shards, {size} px) on {device}")

    with flush_denormals(device):
        reporter.start_progress(cfg.steps, "tokenizer steps")
        if step:
            reporter.advance(step)
        model.train()
        started, start_step = time.perf_counter(), step
        while step < cfg.steps:
            batches = _epoch_batches(root, shards, cfg.view, cfg.batch_size, cfg.shuffle_buffer, np.random.default_rng([cfg.seed, 0, epoch]))
            seen = 0
            for batch in batches:
                seen += 1
                if seen <= consumed:  # trained on before the resume point
                    continue
                frames = _to_tensor(batch, device)  # (B, 3, S, S)
                frame_sum += frames.sum(0).double().cpu()
                frame_count += frames.shape[0]
                lr = optimizer.param_groups[0]["lr"]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(frames)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step, consumed = step + 1, seen

                if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    atomic_save({
                        "format": FORMAT, "kind": "resume", "code_version": CODE_VERSION, "run_key": run_key,
                        "model": strip_prefixes(model.state_dict()), "model_config": model.config_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "step": step, "epoch": epoch, "consumed": consumed,
                        "frame_sum": frame_sum, "frame_count": frame_count,
                        "rng": rng_states(device), "config": cfg.model_dump(mode="json"),
                    }, last)
                if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
                    recon = float(out.recon_loss.detach())
                    reporter.metrics({
                        "loss": float(out.loss.detach()), "recon_loss": recon, "commit_loss": float(out.commit_loss.detach()),
                        "psnr": _psnr(recon), "usage": float(out.usage), "perplexity": float(out.perplexity), "lr": lr,
                    }, step=step)
                reporter.advance()
                if step >= cfg.steps:
                    break
            else:
                if seen == 0:
                    raise ValueError(f"no usable frames (view {cfg.view!r}) in the frame shards of {', '.join(datasets)}")
                epoch, consumed = epoch + 1, 0
        elapsed = time.perf_counter() - started
        if step > start_step:
            reporter.info(f"trained steps {start_step + 1}-{step} in {elapsed:.1f} s ({elapsed / (step - start_step):.3f} s/step)")

    model.eval()
    eval_frames = _to_tensor(eval_np, device)  # (E, 3, S, S)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        tokens = model.encode(eval_frames)  # (E, h, w)
        recons = model.decode(tokens).float()  # (E, 3, S, S), clamped
    mse = float(torch.mean((recons - eval_frames) ** 2))
    mean_frame = (frame_sum / max(1, frame_count)).float().to(device)  # (3, S, S)
    baseline_mse = float(torch.mean((mean_frame.unsqueeze(0) - eval_frames) ** 2))
    perplexity, usage = _code_stats(tokens, model.codebook_size)
    metrics = {"recon_loss": mse, "psnr": _psnr(mse), "usage": usage, "perplexity": perplexity,
               "baseline_psnr": _psnr(baseline_mse)}
    reporter.metrics({f"eval_{k}": v for k, v in metrics.items()}, step=step)
    reporter.info(f"tokenizer eval: PSNR {metrics['psnr']:.2f} dB (mean-frame baseline {metrics['baseline_psnr']:.2f} dB), "
                  f"{usage:.1%} of codes used")

    _write_grid(eval_frames[:GRID_FRAMES], recons[:GRID_FRAMES], grid)
    reporter.artifact(grid)
    metadata = {"run_key": run_key, "data_fingerprint": fingerprint, "code_version": CODE_VERSION, "steps": step,
                "metrics": metrics, "datasets": list(datasets), "shards": [s.unit for s in shards], "frame_size": size,
                "config": cfg.model_dump(mode="json")}
    atomic_save({"format": FORMAT, "kind": "final", "model": strip_prefixes(model.state_dict()),
                  "model_config": model.config_dict(), "metadata": metadata}, final)
    last.unlink(missing_ok=True)  # the resume point is moot once the run is finished
    reporter.artifact(final)
    return TrainedTokenizer(final, model.config_dict(), fingerprint, run_key, step, metrics, grid, False)
