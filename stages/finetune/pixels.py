"""The ST-MAE (pixel) backbone family in the results grid (issue 17 §3): a grid row naming a
pretrain-pixels checkpoint (file, run folder or registry download) is fine-tuned, evaluated and
probed here, and writes the same `results` and `predictions` rows as a token backbone, so one
`vimpac report` compares scratch, VIMPAC tokens and ST-MAE pixels.

What is the same as the token family (stages/finetune/train.py, probe.py): the split's videos
and labels (`select_frame_split`: the same resolution, few-shot draws and warnings as
`select_split`), the head (non-affine BatchNorm, zero-initialised FC, on [CLS] or the mean token
state: `FinetuneModel.pool`), the training loop (`fit_classifier`: AdamW with layer-wise decay,
label smoothing, drop path, warm-up + linear decay, the learning checks, precise head
statistics), the multi-view protocol (`EvalProtocol`: uniform temporal clips x center or three
crops, softmax averaged), the probes (linear probe and kNN on frozen [CLS] and mean features of
center-view clips) and the evaluation files.

What differs: clips are pixels read from the labeled dataset's frame shards, T frames every
`frame_step`-th stored frame (the pretraining run's step), resized to the encoder's size and
ImageNet-normalised (stages/pretrain/pixels.py). A training clip is a random stored view of a
random temporal position, as the token loader draws views (12, or 6 for flip-sensitive
datasets), with no further random crop, so both families see the same augmentation; a video
shorter than a clip repeats its last frame. There is no bag-of-codes floor for pixels.

Keys: a cell's run key and eval id hash this family's code version and name with the config,
the pretrain run, the frame shards and the split, so a pixel cell can never be mistaken for a
token cell; its `pretrain_recipe` is the pixel run's name (e.g. tiny-8x64-st_mae-r0.9).

The from-scratch pixel row, `scratch-pixels:PRESET`, is the encoder a pretrain-pixels preset
would train (its model, frames and frame step; the labeled dataset's frame size unless the preset
sets one), randomly initialised from the cell's seed. It stands for the pretrained model as
`scratch-pixels:PRESET` in keys and `pretrain_run`, is named `scratch-pixels-PRESET` in
`pretrain_recipe`, and trains as long as the token `scratch` row does (train.scratch_factor:
the paper's 4x the epochs on small datasets).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds

from models.classifier import PixelClassifier, PixelClassifierConfig
from models.st_mae import PRESETS as ST_MAE_PRESETS
from models.st_mae import STMAEConfig, STMAEEncoder, load_encoder_state
from stages.checkpoints import read_checkpoint, strip_prefixes
from stages.config import (SCRATCH_PIXELS, ConfigError, FinetuneConfig, PixelPretrainConfig, build, config_hash, preset,
                           scratch_pixels_preset)
from stages.evaluate.metrics import CENTER, Protocol, clip_starts
from stages.evaluate.probes import KNN_K
from stages.finetune.evaluate import EvalScores, gather_scores
from stages.finetune.probe import PROBE_METHODS, VideoFeatures, fit_probes, found_probed
from stages.finetune.splits import EvalVideo, SplitSelection, select_frame_split
from stages.finetune.train import (FINETUNE, FORMAT, CellResult, ModelSource, _checkpoint_file, _fingerprint, _model_identity,
                                   finetune_recipe, finish_evaluation, fit_classifier, found_evaluated, prepare_run_dir,
                                   protocol_for, restore_finished, save_finished, scratch_factor, seed_everything, training_plan)
from stages.frames.encoding import decode_view, extension
from stages.frames.read import FrameShard
from stages.pretrain import distributed as D
from stages.pretrain.data import batch_generator
from stages.pretrain.pixels import FAMILY, model_config, normalise
from stages.pretrain.pixels import FORMAT as PIXEL_FORMAT
from stages.reporting import Reporter
from warehouse.layout import DataRoot

CODE_VERSION = "finetune-pixels-1"
EVAL_VERSION = "eval-pixels-1"
PROBE_VERSION = "probe-pixels-1"
DEFAULT_LR = 1e-4  # train.lr unset: Table 4's rate for the small and base token backbones
_ORDER, _BUFFER, _VIEW = 11, 12, 13  # seed-sequence tags of the loader's independent draws


@dataclass
class PixelPretrained:
    """A finished pretrain-pixels run as a fine-tuning source."""

    encoder: STMAEConfig
    state: dict | None  # the ST-MAE's weights (decoder entries are dropped when loading); None: from scratch
    identity: str  # pretrain-pixels run key, the file's sha256 for a checkpoint made elsewhere, or scratch-pixels:PRESET
    recipe: str  # e.g. tiny-8x64-st_mae-r0.9, or scratch-pixels-tiny
    frame_step: int  # stored frames between clip frames, as pretraining cut its clips
    datasets: tuple[str, ...] = ()

    @property
    def scratch(self) -> bool:
        return self.state is None

    def transductive_warning(self, dataset: str, split: str) -> str | None:
        """A warning when the encoder was pretrained on `dataset`'s frames, evaluation videos included."""
        if dataset not in self.datasets:
            return None
        return (f"{self.recipe} was pretrained on the frames of {dataset}, including the evaluation videos of split {split} "
                "(without their labels), so this result is transductive, not comparable with one that never saw them; "
                f"pretrain-pixels cannot leave a split out, so pretrain on other datasets than {dataset} for that")


def load_pixel_backbone(source: ModelSource) -> PixelPretrained:
    """A finished pretrain-pixels checkpoint (file, run folder, registry download); ConfigError
    naming the model for an unfinished run or a file that does not match its config."""
    path = _checkpoint_file(Path(source.checkpoint))
    try:
        ckpt = read_checkpoint(path, PIXEL_FORMAT, "pretrain-pixels")
        encoder = STMAEConfig.from_dict(dict(ckpt["model_config"]))
        state = strip_prefixes(ckpt["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model {source.ref}: {e}") from None
    if ckpt.get("kind") != "final":
        raise ConfigError(f"model {source.ref}: {path} is an unfinished pretrain-pixels run's resume checkpoint; finish it first")
    meta = dict(ckpt.get("metadata") or {})
    frame_step = int(((meta.get("config") or {}).get("data") or {}).get("frame_step") or 1)
    return PixelPretrained(encoder, state, _model_identity(meta, path), source.name or meta.get("run_name") or path.stem, frame_step,
                           tuple(meta.get("datasets") or ()))


def scratch_pixel_backbone(source: ModelSource, frame_size: int) -> PixelPretrained:
    """A `scratch-pixels:PRESET` row: the ST-MAE encoder that pretrain-pixels preset trains, over
    frames of `frame_size` px (the labeled dataset's, unless the preset sets data.size), with no
    weights to load. Pure: `vimpac plan` builds it too."""
    name = scratch_pixels_preset(source.ref)
    if name is None:
        raise ValueError(f"{source.ref} is not a {SCRATCH_PIXELS} row")
    try:
        cfg = build(PixelPretrainConfig, preset("pretrain-pixels", name))
        encoder = model_config(cfg, cfg.data.size or frame_size)
    except ConfigError as e:
        raise ConfigError(f"model {source.ref}: {e}") from None
    return PixelPretrained(encoder, None, f"{SCRATCH_PIXELS}:{name}", source.name or f"{SCRATCH_PIXELS}-{name}", cfg.data.frame_step)


def pixel_identity(checkpoint: Path) -> tuple[str, STMAEConfig]:
    """(identity `pixel_cell` keys it by, encoder config) of a pretrain-pixels checkpoint, its
    weights memory-mapped, not read. ValueError for anything else."""
    path = _checkpoint_file(Path(checkpoint))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if ckpt.get("format") != PIXEL_FORMAT:
            raise ValueError(f"not a {PIXEL_FORMAT} checkpoint")
        return _model_identity(dict(ckpt.get("metadata") or {}), path), STMAEConfig.from_dict(dict(ckpt["model_config"]))
    except Exception as e:  # noqa: BLE001 - any load or config error means "not a usable checkpoint"
        raise ValueError(f"pretrain-pixels checkpoint {path}: {type(e).__name__}: {e}") from e


def pixel_model_config(cfg: FinetuneConfig, selection: SplitSelection, pretrained: PixelPretrained, ref: str) -> PixelClassifierConfig:
    """The classifier on the pretrained encoder: its size, `data.frames` (default its own) and the
    config's drop path, pooling and head."""
    settings = {**pretrained.encoder.to_dict(), "frames": cfg.data.frames or pretrained.encoder.frames, "drop_path": cfg.model.drop_path}
    try:
        return PixelClassifierConfig(STMAEConfig.from_dict(settings), n_classes=len(selection.classes),
                                     head_dropout=cfg.model.head_dropout, pool=cfg.model.pool, head_norm=cfg.model.head_norm)
    except ValueError as e:
        raise ConfigError(f"fine-tune model on {ref}: {e}") from None


def scratch_pixels_digest(name: str) -> str:
    """What the encoder of a `scratch-pixels:NAME` row is made of, hashed: the pretrain-pixels
    preset's model settings, the ST-MAE preset behind them and its clips' frames, frame step and
    size. Its cells' run keys hold it, so redefining the preset gives new cells rather than the
    results of the encoder it used to name."""
    cfg = build(PixelPretrainConfig, preset("pretrain-pixels", name))
    blob = json.dumps([cfg.model.model_dump(mode="json"), ST_MAE_PRESETS[cfg.model.preset]().to_dict(), cfg.data.frames,
                       cfg.data.frame_step, cfg.data.size], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def pixel_cell_keys(cfg: FinetuneConfig, identity: str, dataset: str, selection: SplitSelection, world_size: int,
                    protocol: Protocol) -> tuple[str, str]:
    """(run key, eval id) of a pixel cell; the family is part of both. Pure: `vimpac plan` calls it."""
    if (scratch := scratch_pixels_preset(identity)) is not None:
        identity = f"{identity}@{scratch_pixels_digest(scratch)}"
    blob = json.dumps([CODE_VERSION, FAMILY, config_hash(cfg), identity, dataset, selection.split, _fingerprint(selection.shards),
                       world_size, selection.classes], separators=(",", ":"))
    run_key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    eval_id = hashlib.sha256(json.dumps([run_key, protocol.name, EVAL_VERSION, FAMILY]).encode()).hexdigest()[:16]
    return run_key, eval_id


# ---------------------------------------------------------------------------------- clips


def read_frame_samples(root: DataRoot, shard: FrameShard, wanted: Container[str], errors: list[str]) -> Iterator[tuple[str, dict, dict]]:
    """("dataset/key", metadata, raw tar members) of the samples of one frame shard whose key is
    in `wanted`, in tar order, nothing decoded. Unreadable shards and samples are described in
    `errors`, never raised: one bad video costs its own clip."""
    path = str(root.absolute(shard.path))

    def handler(exn: BaseException) -> bool:
        errors.append(f"frame shard {path}: {type(exn).__name__}: {str(exn.args[0]) if exn.args else ''}")
        return True

    for sample in wds.tarfile_to_samples(handler=handler)(iter([{"url": path}])):
        key = f"{shard.dataset}/{sample.get('__key__')}"
        if key not in wanted:
            continue
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError, TypeError) as e:
            errors.append(f"frame shard {path}: sample {key}: unreadable metadata: {type(e).__name__}: {e}")
            continue
        missing = [field for field in ("views", "encoding") if field not in meta]
        if missing:
            errors.append(f"frame shard {path}: sample {key}: metadata without {', '.join(missing)}")
            continue
        yield key, meta, sample


def decode_frames(sample: dict, meta: dict, view: str) -> np.ndarray:
    """One stored view (T, S, S, 3) uint8 of a raw sample; ValueError naming what is missing."""
    member = f"{view}.{extension(meta['encoding'])}"
    if member not in sample:
        raise ValueError(f"view {view} is not stored (stored: {', '.join(meta['views'])})")
    return decode_view(sample[member], meta["encoding"])


def cut_clip(frames: np.ndarray, start: int, length: int, step: int, size: int) -> torch.Tensor:
    """(3, length, size, size) normalised: `length` frames `step` apart from `start` (the last
    frame repeated past the end), resized to `size` when the shards store another size."""
    index = np.minimum(start + np.arange(length) * step, frames.shape[0] - 1)
    clip = torch.from_numpy(np.ascontiguousarray(frames[index])).permute(3, 0, 1, 2).float().div_(255)  # (3, T, S, S)
    if clip.shape[-1] != size:
        clip = F.interpolate(clip.transpose(0, 1), size=(size, size), mode="bilinear", align_corners=False,
                             antialias=True).transpose(0, 1)
    return normalise(clip)


def clip_span(length: int, step: int) -> int:
    """Stored frames a clip of `length` frames `step` apart covers."""
    return (length - 1) * step + 1


def _key_seed(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


class LabeledPixelClips:
    """Fine-tuning batches of labeled pixel clips for one rank: {"videos": (B, 3, T, S, S)
    normalised, "labels": (B,), "keys", "errors"}, exactly `batches_per_epoch` per epoch.

    An epoch reads the shards in an order drawn from (seed, epoch) (the same on every rank),
    each rank taking every world-th labeled video, through a seeded shuffle buffer; a rank whose
    share runs out before its last batch starts another pass (so ranks never wait on each other,
    PITFALLS: "repeat + with_epoch"). A video's view is drawn from (seed, epoch, video) and its
    clip start from the batch's generator (seed, epoch, rank, batch), and only the chosen view's
    bytes are held and decoded when its batch is made, so resuming at batch k skips the decoding
    of the batches before it and gives the same batches as an uninterrupted epoch."""

    def __init__(self, root: DataRoot, shards: list[FrameShard], labels: dict[str, int], *, frames: int, frame_step: int, size: int,
                 batch_size: int, batches_per_epoch: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 64):
        if not shards:
            raise ValueError("LabeledPixelClips: no frame shards")
        if not labels:
            raise ValueError("LabeledPixelClips: no labeled videos")
        for name, value in (("frames", frames), ("frame_step", frame_step), ("size", size), ("batch_size", batch_size),
                            ("batches_per_epoch", batches_per_epoch), ("shuffle_buffer", shuffle_buffer), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"LabeledPixelClips: {name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"LabeledPixelClips: rank {rank} outside [0, {world_size})")
        self.root, self.shards, self.labels = root, list(shards), labels
        self.frames, self.frame_step, self.size = frames, frame_step, size
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.seed, self.rank, self.world = seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer

    def _stream(self, epoch: int, errors: list[str]) -> Iterator[tuple[str, int, str, dict, bytes]]:
        """(key, label, view, metadata, the view's bytes) of this rank's videos, pass after pass."""
        order = np.random.default_rng([self.seed, epoch, _ORDER])
        mix = np.random.default_rng([self.seed, epoch, self.rank, _BUFFER])
        passes = 0
        while True:
            buffer: list[tuple] = []
            served = counter = 0
            for i in order.permutation(len(self.shards)):
                for key, meta, sample in read_frame_samples(self.root, self.shards[int(i)], self.labels, errors):
                    counter += 1
                    if (counter - 1) % self.world != self.rank:
                        continue
                    stored = list(meta["views"])
                    view = stored[int(np.random.default_rng([self.seed, epoch, passes, _VIEW, _key_seed(key)]).integers(len(stored)))]
                    member = f"{view}.{extension(meta['encoding'])}"
                    if member not in sample:
                        errors.append(f"sample {key}: view {view} is listed but not stored; skipped")
                        continue
                    item = (key, self.labels[key], view, meta, sample[member])
                    served += 1
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(item)
                        continue
                    j = int(mix.integers(len(buffer)))
                    buffer[j], item = item, buffer[j]
                    yield item
            for j in mix.permutation(len(buffer)):
                yield buffer[int(j)]
            if not served:
                listed = "; ".join(errors[:3])
                raise ValueError(f"fine-tune data: no training video of {len(self.labels)} could be read on rank {self.rank}"
                                 + (f": {listed}" if listed else ""))
            passes += 1

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Batches skip_batches .. batches_per_epoch - 1 of `epoch`."""
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}")
        errors: list[str] = []
        stream = self._stream(epoch, errors)
        failures = 0
        for b in range(self.batches_per_epoch):
            items = [next(stream) for _ in range(self.batch_size)]
            if b < skip_batches:
                continue
            generator = batch_generator(self.seed, epoch, self.rank, b)
            clips, labels, keys = [], [], []
            for key, label, view, meta, data in items:
                while True:
                    try:
                        frames = decode_view(data, meta["encoding"])
                        break
                    except ValueError as e:  # corrupt bytes: this video's clip is replaced by the next one's
                        failures += 1
                        if failures > len(self.labels):
                            raise ValueError(f"fine-tune data: {failures} training clips could not be decoded in epoch {epoch}, "
                                             f"more than there are training videos; last: sample {key} view {view}: {e}") from e
                        errors.append(f"sample {key} view {view}: {e}; replaced by the next video")
                        key, label, view, meta, data = next(stream)
                span = clip_span(self.frames, self.frame_step)
                start = int(torch.randint(0, max(1, frames.shape[0] - span + 1), (1,), generator=generator))
                clips.append(cut_clip(frames, start, self.frames, self.frame_step, self.size))
                labels.append(label)
                keys.append(key)
            batch = {"videos": torch.stack(clips), "labels": torch.tensor(labels, dtype=torch.int64), "keys": keys,
                     "errors": list(errors)}
            errors.clear()
            yield batch


# ---------------------------------------------------------------------------------- evaluation


def _views_of(root: DataRoot, selection: SplitSelection, wanted: dict[str, object], errors: list[str]
              ) -> Iterator[tuple[str, dict, dict]]:
    """Raw samples of the `wanted` videos ("dataset/key" -> EvalVideo or class index), each
    once, in shard order; the wanted ones that never showed up are described in `errors`."""
    seen: set[str] = set()
    for shard in selection.shards:
        todo = {k for k, v in wanted.items() if getattr(v, "shard", shard.path) == shard.path} - seen
        if not todo:
            continue
        for key, meta, sample in read_frame_samples(root, shard, todo, errors):
            seen.add(key)
            yield key, meta, sample
    for key in sorted(set(wanted) - seen):
        errors.append(f"frame shards: sample {key} could not be read; video {getattr(wanted[key], 'video_id', key)} is left out")


def _view_clips(sample: dict, meta: dict, protocol: Protocol, *, frames: int, frame_step: int, size: int) -> torch.Tensor:
    """(clips x crops, 3, T, S, S): the protocol's uniform temporal clips of each crop view,
    clip-major as Protocol.view_names()."""
    missing = [c for c in protocol.crops if c not in meta["views"]]
    if missing:
        raise ValueError(f"views {', '.join(missing)} are not stored (stored: {', '.join(meta['views'])}); make the downstream "
                         "frames variant or evaluate with center crops only (eval.crops=center)")
    views = [decode_frames(sample, meta, crop) for crop in protocol.crops]
    starts = clip_starts(int(views[0].shape[0]), clip_span(frames, frame_step), protocol.clips)
    return torch.stack([cut_clip(view, start, frames, frame_step, size) for start in starts for view in views])


@torch.no_grad()
def score_pixel_videos(model: PixelClassifier, root: DataRoot, selection: SplitSelection, protocol: Protocol, *, frame_step: int,
                       device: torch.device, amp: bool, batch_size: int, rank: int = 0, world: int = 1) -> EvalScores:
    """Softmax scores of every view of every evaluation video this rank owns, in split order
    (as `score_videos` for tokens; rank 0 gathers them under DDP)."""
    model.eval()
    enc = model.config.encoder
    mine = {v.key: v for i, v in enumerate(selection.eval) if i % world == rank}
    per_video = protocol.n_views
    done: dict[str, np.ndarray] = {}
    errors: list[str] = []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        clips = torch.cat([c for _, c in pending])
        probs = []
        for chunk in clips.split(max(batch_size, 1)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(chunk.to(device, non_blocking=True))
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        scores = torch.cat(probs).view(len(pending), per_video, -1).numpy()
        for (key, _), s in zip(pending, scores):
            done[key] = s
        pending.clear()

    for key, meta, sample in _views_of(root, selection, mine, errors):
        try:
            pending.append((key, _view_clips(sample, meta, protocol, frames=enc.frames, frame_step=frame_step, size=enc.img_size)))
        except ValueError as e:
            errors.append(f"sample {key}: {e}")
            continue
        if len(pending) * per_video >= batch_size:
            flush()
    flush()

    return gather_scores(selection, done, errors, protocol.view_names(), per_video, world)


# ---------------------------------------------------------------------------------- fine-tuning


def pixel_cell(root: DataRoot, source: ModelSource, dataset: str, split: str, cfg: FinetuneConfig, preset: str, grid: str,
               reporter: Reporter, force: bool, run_id: str | None, max_steps: int | None, info: D.DistInfo) -> CellResult:
    """`finetune_cell` for a pretrain-pixels checkpoint (or a scratch-pixels row): fine-tune the
    ST-MAE encoder on pixel clips, evaluate it with multi-view testing, write the cell's rows (or
    find them written)."""
    # A checkpoint that cannot be used fails before the frames are looked at; a scratch encoder
    # takes its size from them.
    loaded = None if scratch_pixels_preset(source.ref) is not None else load_pixel_backbone(source)
    selection = select_frame_split(root, dataset, split, size=cfg.data.size, variant=cfg.data.variant, seed=cfg.train.seed)
    pretrained = loaded or scratch_pixel_backbone(source, selection.shards[0].size)
    if leak := pretrained.transductive_warning(dataset, selection.base):
        selection.warnings.append(leak)
    for warning in selection.warnings:
        reporter.warning(warning)
    ccfg = pixel_model_config(cfg, selection, pretrained, source.ref)
    enc = ccfg.encoder
    protocol = protocol_for(cfg, selection.flip_sensitive)
    run_key, eval_id = pixel_cell_keys(cfg, pretrained.identity, dataset, selection, info.world_size, protocol)
    ft_recipe = finetune_recipe(cfg, preset, enc.frames, enc.img_size)
    result = CellResult(eval_id, run_key, dataset, selection.split, pretrained.recipe, pretrained.identity, ft_recipe, "", FINETUNE,
                        {}, False, n_train=len(selection.train), n_eval=len(selection.eval), warnings=list(selection.warnings),
                        view_protocol=protocol.name, seed=cfg.train.seed, code_version=f"{CODE_VERSION}/{EVAL_VERSION}")
    where = f"{pretrained.recipe} on {dataset} split {selection.split} ({ft_recipe})"
    if not force and found_evaluated(root, result, where, reporter):
        return result
    if cfg.model.dropout:
        reporter.info(f"{where}: model.dropout {cfg.model.dropout:g} applies to token backbones only; the ST-MAE encoder has "
                      "no dropout (mae_st fine-tunes without; model.drop_path and model.head_dropout regularise it)")
    shard_size = selection.shards[0].size
    if shard_size != enc.img_size:
        reporter.info(f"{where}: frames of {shard_size} px are resized to the encoder's {enc.img_size} px")
    run_dir, final, last = prepare_run_dir(root, run_key, force, info)
    if final.exists() and not force:
        ckpt = read_checkpoint(final, FORMAT, "fine-tune")
        model = PixelClassifier(PixelClassifierConfig.from_dict(dict(ckpt["model_config"])))
        model.load_state_dict(strip_prefixes(ckpt["model"]))
        restore_finished(result, ckpt, final, where, reporter)
    else:
        watch: dict = {}
        model, result.steps, finished = _train_pixels(root, selection, ccfg, cfg, pretrained, reporter, info, run_key, where, last,
                                                      max_steps, watch, result.warnings)
        if not finished:
            result.checkpoint = last
            return result
        result.train_per_class = watch.get("per_class") or {}
        save_finished(info, model, ccfg.to_dict(), final, last, result, selection, cfg, source,
                      {"family": FAMILY, "pretrain": pretrained.identity, "recipe": pretrained.recipe,
                       "frame_step": pretrained.frame_step})
    result.checkpoint = final

    amp = cfg.train.amp and info.device.type == "cuda"
    model.to(info.device)
    scores = score_pixel_videos(model, root, selection, protocol, frame_step=pretrained.frame_step, device=info.device, amp=amp,
                                batch_size=cfg.eval.batch_size, rank=info.rank, world=info.world_size)
    finish_evaluation(root, result, selection, scores, protocol, source, grid, run_id, run_dir, reporter, cfg.train.seed, info, where)
    return result


def _train_pixels(root: DataRoot, selection: SplitSelection, ccfg: PixelClassifierConfig, cfg: FinetuneConfig,
                  pretrained: PixelPretrained, reporter: Reporter, info: D.DistInfo, run_key: str, where: str, last: Path,
                  max_steps: int | None, watch: dict, warnings: list[str]) -> tuple[PixelClassifier, int, bool]:
    n_train = len(selection.train)
    # A randomly initialised encoder gets the token scratch row's longer schedule, so the two
    # baselines and the pretrained rows compare as the paper compares them.
    factor = scratch_factor(cfg, n_train) if pretrained.scratch else 1.0
    plan = training_plan(cfg, n_train, info.world_size, factor)
    seed_everything(cfg.train.seed)
    model = PixelClassifier(ccfg)
    if not pretrained.scratch:
        try:
            load_encoder_state(model.encoder, pretrained.state)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    enc = ccfg.encoder
    loader = LabeledPixelClips(root, selection.train_shards, selection.train, frames=enc.frames, frame_step=pretrained.frame_step,
                               size=enc.img_size, batch_size=cfg.train.batch_size, batches_per_epoch=plan.batches_per_epoch,
                               seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                               shuffle_buffer=cfg.data.shuffle_buffer)
    params = sum(p.numel() for p in model.encoder.parameters())
    return fit_classifier(model, ccfg.to_dict(), loader, plan, cfg, lr=cfg.train.lr or DEFAULT_LR, classes=selection.classes,
                          n_train=n_train, backbone_params=params, reporter=reporter, info=info, run_key=run_key, where=where,
                          last=last, max_steps=max_steps, watch=watch, warnings=warnings,
                          note=f" (pixel clips, from scratch: {factor:g}x the epochs)" if pretrained.scratch else " (pixel clips)")


# ---------------------------------------------------------------------------------- probes


def poolings(encoder: STMAEConfig) -> tuple[str, ...]:
    """The frozen features a probe reads: [CLS] (when the encoder has one) and the mean token state."""
    return ("cls", "mean") if encoder.cls_token else ("mean",)


def pixel_probe_eval_ids(cfg: FinetuneConfig, identity: str, dataset: str, selection: SplitSelection, encoder: STMAEConfig,
                         methods: list[str]) -> list[tuple[str, str]]:
    """(protocol name, eval id) of each result a pixel probe cell writes; pure, so `vimpac plan` can ask."""
    protocol = Protocol(cfg.eval.clips, CENTER)
    base = [PROBE_VERSION, FAMILY, identity, dataset, selection.split, _fingerprint(selection.shards), selection.classes,
            protocol.name, encoder.frames, cfg.train.seed]
    return [(f"{m}:{p}", hashlib.sha256(json.dumps([*base, f"{m}:{p}", KNN_K if m == "knn" else None], separators=(",", ":"),
                                                   default=str).encode()).hexdigest()[:16])
            for m in PROBE_METHODS if m in methods for p in poolings(encoder)]


@torch.no_grad()
def extract_pixel_features(encoder: STMAEEncoder, root: DataRoot, selection: SplitSelection, videos: dict[str, object],
                           protocol: Protocol, *, frame_step: int, device: torch.device, amp: bool, batch_size: int,
                           errors: list[str]) -> VideoFeatures:
    """[CLS] and mean token features of `videos` ("dataset/key" -> EvalVideo or class index), each
    averaged over the protocol's center-view clips, in the order the shards hold them."""
    encoder.eval()
    cfg = encoder.cfg
    pools = poolings(cfg)
    keys, labels, clips, owners = [], [], [], []
    for key, meta, sample in _views_of(root, selection, videos, errors):
        try:
            video_clips = _view_clips(sample, meta, protocol, frames=cfg.frames, frame_step=frame_step, size=cfg.img_size)
        except ValueError as e:
            errors.append(f"sample {key}: {e}")
            continue
        clips.append(video_clips)
        owners += [len(keys)] * len(video_clips)
        label = videos[key]
        labels.append(label.label_index if isinstance(label, EvalVideo) else int(label))
        keys.append(key)
    if not keys:
        return VideoFeatures([], np.zeros(0, np.int64), {p: np.zeros((0, cfg.dim), np.float32) for p in pools})
    all_clips = torch.cat(clips)
    owner = torch.tensor(owners)
    sums = {p: torch.zeros(len(keys), cfg.dim, dtype=torch.float64) for p in pools}
    for start in range(0, len(all_clips), max(1, batch_size)):
        chunk = all_clips[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            states = encoder.encode(chunk)  # (B, [1 +] L, D)
        index = owner[start : start + len(chunk)]
        tokens = states[:, 1:] if cfg.cls_token else states
        if "cls" in sums:
            sums["cls"].index_add_(0, index, states[:, 0].double().cpu())
        sums["mean"].index_add_(0, index, tokens.mean(1).double().cpu())
    counts = torch.bincount(owner, minlength=len(keys)).double().unsqueeze(1)
    return VideoFeatures(keys, np.array(labels, np.int64), {p: (s / counts).float().numpy() for p, s in sums.items()})


def pixel_probe_cells(root: DataRoot, source: ModelSource, dataset: str, split: str, cfg: FinetuneConfig, *, methods: list[str],
                      grid: str = "", reporter: Reporter | None = None, force: bool = False, run_id: str | None = None,
                      device: torch.device | None = None) -> list[CellResult]:
    """`probe_cells` for a pretrain-pixels checkpoint: linear probe and/or kNN on the frozen
    encoder's [CLS] and mean features of center-view pixel clips."""
    reporter = reporter or Reporter()
    seed = cfg.train.seed
    loaded = None if scratch_pixels_preset(source.ref) is not None else load_pixel_backbone(source)
    selection = select_frame_split(root, dataset, split, size=cfg.data.size, variant=cfg.data.variant, seed=seed)
    pretrained = loaded or scratch_pixel_backbone(source, selection.shards[0].size)
    if leak := pretrained.transductive_warning(dataset, selection.base):
        selection.warnings.append(leak)
        reporter.warning(leak)
    encoder_cfg = pixel_model_config(cfg, selection, pretrained, source.ref).encoder
    encoder_cfg.drop_path = 0.0  # frozen features: eval mode anyway; keeps the config honest
    protocol = Protocol(cfg.eval.clips, CENTER)
    where = f"{pretrained.recipe} on {dataset} split {selection.split} (frozen features, {protocol.name})"
    results = [CellResult(eval_id, "", dataset, selection.split, pretrained.recipe, pretrained.identity, None, "", name, {}, False,
                          n_train=len(selection.train), n_eval=len(selection.eval), warnings=list(selection.warnings),
                          view_protocol=protocol.name, seed=seed, code_version=PROBE_VERSION)
               for name, eval_id in pixel_probe_eval_ids(cfg, pretrained.identity, dataset, selection, encoder_cfg, methods)]
    if not force and found_probed(root, results, where, reporter):
        return results

    device = device or torch.device("cpu")
    if pretrained.scratch:
        torch.manual_seed(seed)  # the scratch-pixels row's random encoder, seeded as the token scratch row's
    encoder = STMAEEncoder(encoder_cfg)
    if not pretrained.scratch:
        try:
            load_encoder_state(encoder, pretrained.state)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    encoder.to(device)
    amp = cfg.train.amp and device.type == "cuda"
    errors: list[str] = []
    kwargs = dict(frame_step=pretrained.frame_step, device=device, amp=amp, batch_size=cfg.eval.batch_size, errors=errors)
    train = extract_pixel_features(encoder, root, selection, selection.train, protocol, **kwargs)
    test = extract_pixel_features(encoder, root, selection, {v.key: v for v in selection.eval}, protocol, **kwargs)
    fit_probes(root, results, train, test, errors, selection, protocol, source=source, grid=grid, run_id=run_id, seed=seed,
               reporter=reporter, where=where)
    return results
