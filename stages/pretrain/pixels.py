"""The pretrain-pixels stage: ST-MAE pretraining on pixel clips (HVM-1, seed 000), on the engine.

Clips come from the committed frame shards (no new format): T stored frames of one view, every
`frame_step`-th, from a random start, through a random resized crop (area `crop_scale`, aspect
3/4-4/3) back to S x S, normalised with ImageNet's mean and std. Every video read gives `repeat`
clips (mae_st's repeat augmentation), so a step sees batch_size x repeat clips per rank.

An epoch is one pass over the training videos: shards in an order drawn from (seed, epoch),
videos through a seeded shuffle buffer, each rank taking every world-th video; clip starts, crops
and masks are drawn from a generator of (seed, epoch, rank, batch). So an epoch depends on those
numbers only, and a resumed run replays it and skips the batches its checkpoint consumed.

A few videos per dataset (hash order, as the tokenizer's) are held out; at the end the run
reports the masked-tubelet loss on their clips next to the trivial predictor's (every masked
tubelet predicted by the training clips' mean tubelet) and writes a reconstruction grid
(original, masked input, prediction) as `grid.png`. Files: `checkpoints/pretrain-pixels/<run key>/`
with `last.pt` (resume) and `final.pt` (the ST-MAE, its config and metadata).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.st_mae import PRESETS as ST_MAE_PRESETS
from models.st_mae import STMAE, STMAEConfig
from stages.checkpoints import KeyedRun, atomic_save, read_checkpoint, strip_prefixes
from stages.config import ConfigError, PixelPretrainConfig, config_hash
from stages.engine import Engine, Objective, adamw
from stages.frames.read import FrameShard, read_shard
from stages.pretrain import distributed as D
from stages.pretrain.data import batch_generator  # the token loader's per-batch generator: same rule
from stages.reporting import Reporter
from stages.tokenizer.train import _select_shards, held_out_videos
from warehouse.layout import DataRoot

CODE_VERSION = "pretrain-pixels-1"
FORMAT = "vimpac-pretrain-pixels"
FAMILY = "st_mae"  # the model-family tag of its registered backbones
MEAN = torch.tensor([0.485, 0.456, 0.406])  # ImageNet, as mae_st and HVM-1 normalise
STD = torch.tensor([0.229, 0.224, 0.225])
EVAL_CLIPS = 16  # held-out clips in the final evaluation
GRID_CLIPS = 4


@dataclass
class PixelPretrainResult:
    checkpoint: Path
    run_key: str
    run_name: str
    steps: int
    metrics: dict
    cached: bool
    datasets: list[str]
    grid_png: Path | None = None


@dataclass
class PixelRun(KeyedRun):
    shards: list[FrameShard]


def model_config(cfg: PixelPretrainConfig, size: int) -> STMAEConfig:
    base = ST_MAE_PRESETS[cfg.model.preset]()
    try:
        return STMAEConfig(**{**base.to_dict(), "img_size": size, "frames": cfg.data.frames, "masking": cfg.model.masking,
                              "mask_ratio": cfg.model.mask_ratio, "pos_embed": cfg.model.pos_embed,
                              "norm_pix_loss": cfg.model.norm_pix_loss})
    except ValueError as e:
        raise ConfigError(f"pretrain-pixels model: {e}") from None


def run_name(cfg: PixelPretrainConfig, size: int) -> str:
    """The recipe in a name, e.g. tiny-8x64-st_mae-r0.9 (tube masking adds -tube)."""
    name = f"{cfg.model.preset}-{cfg.data.frames}x{size}-{FAMILY}-r{cfg.model.mask_ratio:g}"
    return name + ("-tube" if cfg.model.masking == "tube" else "")


def shard_fingerprint(units) -> str:
    """The run key's data part: a hash of the frame shard units it trains on (a checkpoint's
    metadata records them as `shards`, so `vimpac plan` can compare an older run's)."""
    return hashlib.sha256("\n".join(sorted(map(str, units))).encode()).hexdigest()


def pixel_run(root: DataRoot, datasets: list[str], cfg: PixelPretrainConfig, world_size: int | None = None) -> PixelRun:
    """The run key (code version, config, frame shards, world size) and folder; nothing written."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    try:
        shards = _select_shards(root, datasets, cfg.data.size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fingerprint = shard_fingerprint(s.unit for s in shards)
    # Keyed by the frame size it trains at, not by whether the config named it: a standalone run
    # (the only size there is) and the pipeline's (frames.size) of the same model share one run.
    resolved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"size": shards[0].size})})
    key = hashlib.sha256(json.dumps([CODE_VERSION, config_hash(resolved), fingerprint, world_size]).encode()).hexdigest()[:16]
    return PixelRun(run_key=key, data_fingerprint=fingerprint, run_dir=root.home / "checkpoints" / "pretrain-pixels" / key,
                    shards=shards)


def normalise(clip: torch.Tensor) -> torch.Tensor:
    """(3, T, S, S) in [0, 1] -> ImageNet-normalised, as mae_st and HVM-1 feed their ViTs."""
    return (clip - MEAN[:, None, None, None]) / STD[:, None, None, None]


def sample_clip(frames: np.ndarray, n: int, step: int, scale: tuple[float, float], size: int,
                generator: torch.Generator) -> torch.Tensor:
    """One (3, n, size, size) normalised clip from a (T, S, S, 3) uint8 video: n frames `step`
    apart from a random start (the last frame repeated when the video is short), one random
    resized crop for the whole clip."""
    t = frames.shape[0]
    span = (n - 1) * step + 1
    start = int(torch.randint(0, max(1, t - span + 1), (1,), generator=generator))
    index = np.minimum(start + np.arange(n) * step, t - 1)
    clip = torch.from_numpy(frames[index]).permute(3, 0, 1, 2).float().div_(255)  # (3, n, S, S)
    s = clip.shape[-1]
    area = s * s * float(torch.empty(1).uniform_(*scale, generator=generator))
    aspect = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)))
    h = max(1, min(s, round(math.sqrt(area / aspect))))
    w = max(1, min(s, round(math.sqrt(area * aspect))))
    top = int(torch.randint(0, s - h + 1, (1,), generator=generator))
    left = int(torch.randint(0, s - w + 1, (1,), generator=generator))
    crop = clip[:, :, top : top + h, left : left + w].transpose(0, 1)  # (n, 3, h, w)
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True).transpose(0, 1)
    return normalise(crop)


class PixelClips:
    """Epochs of pixel-clip batches for one rank: see the module docstring."""

    def __init__(self, root: DataRoot, shards: list[FrameShard], cfg: PixelPretrainConfig, size: int, *, rank: int = 0,
                 world_size: int = 1, exclude: dict[str, set[str]] | None = None, only: dict[str, set[str]] | None = None):
        self.root, self.shards, self.cfg, self.size = root, shards, cfg, size
        self.rank, self.world = rank, world_size
        self.exclude, self.only = exclude or {}, only

    def _videos(self, rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray]]:
        """(dataset/video_id, (T, S, S, 3)) of this rank, shuffled through the buffer."""
        buffer: list[tuple[str, np.ndarray]] = []
        counter = 0
        for i in rng.permutation(len(self.shards)):
            shard = self.shards[i]
            for video in read_shard(self.root, shard, views=[self.cfg.data.view]):
                vid = video.meta.get("video_id", video.key)
                if vid in self.exclude.get(shard.dataset, ()) or (self.only is not None and vid not in self.only.get(shard.dataset, ())):
                    continue
                counter += 1
                if (counter - 1) % self.world != self.rank:
                    continue
                item = (f"{shard.dataset}/{vid}", video.views[self.cfg.data.view])
                if len(buffer) < self.cfg.data.shuffle_buffer:
                    buffer.append(item)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], item = item, buffer[j]
                yield item
        for j in rng.permutation(len(buffer)):
            yield buffer[int(j)]

    def epoch(self, epoch: int, skip: int = 0, *, batch_size: int | None = None) -> Iterator[dict]:
        """Batches from batch `skip` on: {"videos": (B x repeat, 3, T, S, S), "keys": [...]}.
        Full batches only, unless the whole epoch is smaller than one."""
        seed = self.cfg.train.seed
        batch_size = batch_size or self.cfg.train.batch_size
        rng = np.random.default_rng([seed, epoch, 7])  # shard order and buffer: the same on every rank
        pending: list[tuple[str, np.ndarray]] = []
        b = 0
        yielded = False
        for item in self._videos(rng):
            pending.append(item)
            if len(pending) == batch_size:
                if b >= skip:
                    yield self._assemble(pending, batch_generator(seed, epoch, self.rank, b))
                b, pending, yielded = b + 1, [], True
        if pending and not yielded:
            yield self._assemble(pending, batch_generator(seed, epoch, self.rank, b))

    def _assemble(self, items: list[tuple[str, np.ndarray]], generator: torch.Generator) -> dict:
        d = self.cfg.data
        clips = [sample_clip(frames, d.frames, d.frame_step, d.crop_scale, self.size, generator)
                 for _, frames in items for _ in range(d.repeat)]
        return {"videos": torch.stack(clips), "keys": [k for k, _ in items for _ in range(d.repeat)],
                "mask_seed": torch.randint(0, 2**62, (1,), generator=generator)}


class MaskedTubeletObjective(Objective):
    """ST-MAE on the engine: the mean squared error on masked tubelets of a micro-batch. Each
    micro-batch's masks come from its own seed, so a resumed run draws the same masks."""

    def count(self, batch: dict) -> int:
        return int(batch["videos"].shape[0])

    def loss(self, net: torch.nn.Module, batch: dict, context, k: int) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator().manual_seed(int(batch["mask_seed"]))
        out = net(batch["videos"], generator=generator)
        return out["loss"] / k, {"loss": float(out["loss"].detach()) / k}

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        return {"loss": sums["loss"] / max(1.0, sums["steps"])}


def _lr_factor(schedule: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return factor


@torch.no_grad()
def evaluate(model: STMAE, clips: torch.Tensor, mean_tubelet: torch.Tensor, seed: int) -> dict[str, float]:
    """Masked-tubelet loss on fixed clips and masks, next to predicting `mean_tubelet` everywhere."""
    model.eval()
    out = model(clips, generator=torch.Generator().manual_seed(seed))
    trivial = (out["target"] - mean_tubelet).pow(2).mean(-1)[out["mask"]].mean()
    model.train()
    return {"eval_loss": float(out["loss"]), "eval_trivial_loss": float(trivial)}


def _to_image(clip: torch.Tensor) -> np.ndarray:
    """(3, T, S, S) normalised -> (S, T * S, 3) uint8."""
    x = (clip * STD[:, None, None, None] + MEAN[:, None, None, None]).clamp(0, 1)
    return (x.permute(2, 1, 3, 0).flatten(1, 2) * 255).round().byte().numpy()


@torch.no_grad()
def reconstruction_grid(model: STMAE, clips: torch.Tensor, path: Path, seed: int) -> Path:
    """Per clip three rows: the original frames, the masked input (masked tubelets grey) and the
    prediction (visible tubelets kept, masked ones predicted)."""
    model.eval()
    out = model(clips, generator=torch.Generator().manual_seed(seed))
    mask = out["mask"][..., None].float()
    target = model.patchify(clips)
    pred = out["pred"].float()
    if model.cfg.norm_pix_loss:  # predictions are per-tubelet normalised: put the tubelet's statistics back
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        pred = pred * (var + 1e-6).sqrt() + mean
    grey = model.patchify(((torch.full_like(clips, 0.5) - MEAN[:, None, None, None]) / STD[:, None, None, None]))
    masked = model.unpatchify(target * (1 - mask) + grey * mask)
    predicted = model.unpatchify(target * (1 - mask) + pred * mask)
    rows = [_to_image(x[i]) for i in range(clips.shape[0]) for x in (clips, masked, predicted)]
    gap = np.full((2, rows[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([r for row in rows for r in (row, gap)][:-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    model.train()
    return path


def pretrain_pixels(root: DataRoot, datasets: list[str], cfg: PixelPretrainConfig, *, reporter: Reporter | None = None,
                    force: bool = False, max_steps: int | None = None, device: str | None = None) -> PixelPretrainResult:
    """Train (or resume, or return the cached) ST-MAE on the frame shards of `datasets`."""
    reporter = reporter or Reporter()
    info = D.setup(device or cfg.train.device)
    clean = False
    try:
        result = _pretrain_pixels(root, datasets, cfg, reporter, force, max_steps, info)
        clean = True
        return result
    finally:
        D.teardown(info, clean=clean)


def _pretrain_pixels(root: DataRoot, datasets: list[str], cfg: PixelPretrainConfig, reporter: Reporter, force: bool,
                     max_steps: int | None, info: D.DistInfo) -> PixelPretrainResult:
    planned = pixel_run(root, datasets, cfg, info.world_size)
    shards, run_key, final, last = planned.shards, planned.run_key, planned.final, planned.last
    size = shards[0].size
    mcfg = model_config(cfg, size)
    name = run_name(cfg, size)
    grid_png = planned.run_dir / "grid.png"
    if force and info.is_main:
        final.unlink(missing_ok=True)
        last.unlink(missing_ok=True)
    D.barrier()
    if final.exists():
        meta = read_checkpoint(final, FORMAT, "pretrain-pixels")["metadata"]
        reporter.info(f"pretrain-pixels {name} ({run_key}) already finished: {final}")
        return PixelPretrainResult(final, run_key, meta["run_name"], int(meta["steps"]), dict(meta["metrics"]), True,
                                   list(datasets), grid_png if grid_png.exists() else None)
    planned.run_dir.mkdir(parents=True, exist_ok=True)
    world, device = info.world_size, info.device
    held = {n: set(ids) for n, ids in held_out_videos(root, datasets, shards, cfg.data.holdout_videos).items() if ids}
    n_videos = sum(s.n_ok for s in shards) - sum(len(v) for v in held.values())
    batches_per_epoch = max(1, n_videos // (cfg.train.batch_size * world))
    k = cfg.train.accumulate
    total = max(1, math.ceil(cfg.train.epochs * batches_per_epoch / k))
    warmup = int(cfg.train.warmup_epochs * batches_per_epoch / k)
    clips_per_step = cfg.train.batch_size * cfg.data.repeat * world * k
    lr = cfg.train.lr or cfg.train.blr * clips_per_step / 256  # mae_st: lr = blr x effective batch / 256
    amp = cfg.train.amp and device.type == "cuda"

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)
    model = STMAE(mcfg).to(device)
    optimizer = adamw(model, lr=lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg.train.schedule, warmup, total))
    data = PixelClips(root, shards, cfg, size, rank=info.rank, world_size=world, exclude=held)
    engine = Engine(model, optimizer, scheduler, MaskedTubeletObjective(), info=info, reporter=reporter, amp=amp,
                    grad_clip=cfg.train.grad_clip, accumulate=k, last=last, what="pretrain-pixels",
                    log_every=cfg.train.log_every, checkpoint_every=cfg.train.checkpoint_every,
                    batches_per_epoch=batches_per_epoch, log_first=True,
                    checkpoint_header={"format": FORMAT, "code_version": CODE_VERSION, "run_key": run_key,
                                       "model_config": mcfg.to_dict(), "config": cfg.model_dump(mode="json")})
    if engine.resume():
        reporter.info(f"resuming {name} ({run_key}) at step {engine.step}/{total}")
    else:
        reporter.info(f"pretraining {name} ({run_key}): {model.encoder_params() / 1e6:.2f}M encoder on {device} x {world}; "
                      f"{n_videos} videos of {', '.join(datasets)} ({sum(len(v) for v in held.values())} held out); "
                      f"{total} steps of {clips_per_step} clips, lr {lr:g} ({cfg.train.schedule})")
    stop_at = total if max_steps is None else min(total, engine.step + max_steps)
    step = engine.run(first_step=0, end_step=total, stop_at=stop_at, label=f"pretrain-pixels {name}",
                      epochs=lambda epoch, skip: data.epoch(epoch, skip))
    if step < total:
        reporter.info(f"pretrain-pixels {name} stopped at step {step}/{total}; run again to continue")
        return PixelPretrainResult(last, run_key, name, step, dict(engine.last_values), False, list(datasets))

    metrics = dict(engine.last_values)
    # Held-out clips (training clips when nothing could be held out), a fixed draw.
    source = PixelClips(root, shards, cfg, size, only=held) if held else data
    evaluation_clips = next(source.epoch(10**6, batch_size=max(1, EVAL_CLIPS // cfg.data.repeat)))["videos"].to(device)
    reference = next(data.epoch(10**6 + 1, batch_size=max(1, 64 // cfg.data.repeat)))["videos"]
    mean_tubelet = model.patchify(reference).mean((0, 1)).to(device)
    if info.is_main:
        metrics |= evaluate(model, evaluation_clips, mean_tubelet, cfg.train.seed)
        metrics["eval_on"] = "held-out videos" if held else "training videos"
        reporter.metrics({k_: v for k_, v in metrics.items() if k_.startswith("eval_") and isinstance(v, float)}, step=step)
        reporter.info(f"pretrain-pixels {name}: masked-tubelet loss {metrics['eval_loss']:.4f} on {metrics['eval_on']} vs "
                      f"{metrics['eval_trivial_loss']:.4f} for the mean tubelet")
        reconstruction_grid(model, evaluation_clips[:GRID_CLIPS], grid_png, cfg.train.seed)
        reporter.artifact(grid_png)
        metadata = {"run_key": run_key, "run_name": name, "code_version": CODE_VERSION, "family": FAMILY, "steps": step,
                    "metrics": metrics, "datasets": list(datasets), "shards": [s.unit for s in shards], "frame_size": size,
                    "held_out": {n: sorted(v) for n, v in held.items()}, "world_size": world,
                    "config": cfg.model_dump(mode="json")}
        atomic_save({"format": FORMAT, "kind": "final", "model": strip_prefixes(model.state_dict()),
                     "model_config": mcfg.to_dict(), "metadata": metadata}, final)
        last.unlink(missing_ok=True)
    D.barrier()
    return PixelPretrainResult(final, run_key, name, step, metrics, False, list(datasets), grid_png)


def load_st_mae(path: str | Path) -> tuple[STMAE, dict]:
    """A finished pretrain-pixels checkpoint as a model on CPU, plus its metadata."""
    ckpt = read_checkpoint(path, FORMAT, "pretrain-pixels")
    try:
        model = STMAE(STMAEConfig.from_dict(dict(ckpt["model_config"])))
        model.load_state_dict(strip_prefixes(ckpt["model"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"pretrain-pixels checkpoint {path} does not match its model config: {type(e).__name__}: {e}") from e
    return model.eval(), dict(ckpt.get("metadata") or {})
