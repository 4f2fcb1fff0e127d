"""One cell of the results grid: fine-tune a pretrained backbone (or train from scratch) on one
split of a labeled dataset, then evaluate it with multi-view testing and write the catalog's
`predictions` and `results` rows.

Fine-tuning follows App. A.2 / C and Table 4: a zero-initialised linear layer on [CLS]; AdamW
(0.9, 0.999), weight decay 0.01 (none on biases, norms, [CLS]), warm-up 0.1 then linear decay,
gradient clipping 1.0, backbone dropout 0.1; per step a random one of the stored views (12, or 6
for flip-sensitive datasets) and a random temporal clip of each training video; positional tables
interpolated when T or S differ from pretraining. The from-scratch baseline trains 4x as long
on small datasets and 1.5x on large ones, as the paper does.

It runs on the shared training engine (stages/engine.py), as pretraining does: `last.pt`
every `checkpoint_every` steps with the loader position and RNG states, Ctrl-C stops at a step
boundary, and a finished cell (its results rows exist) is not computed again unless forced.

Two backbone families share this cell (issue 17): the VIMPAC transformer over token shards
(here) and the ST-MAE encoder over pixel clips from the frame shards (stages/finetune/pixels.py),
chosen by the checkpoint a grid row names (`checkpoint_family`). Both use the same head, the same
training loop (`fit_classifier`: AdamW with optional layer-wise learning-rate decay, label
smoothing, the learning checks) and write the same `results` rows. Stochastic depth
(`model.drop_path`), layer decay (`train.layer_decay`) and label smoothing
(`train.label_smoothing`) are HVM-1's fine-tuning regularisers; their defaults are off, which is
the paper's recipe exactly.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from models.backbone import PRESETS as BACKBONES
from models.backbone import BackboneConfig, load_state_resized
from models.classifier import ClassifierConfig, PixelClassifier, VideoClassifier
from models.pretrain import PretrainModelConfig
from stages.checkpoints import atomic_save, read_checkpoint, strip_prefixes
from stages.config import PRESETS, ConfigError, FinetuneConfig, FinetuneTrain, build, config_hash, scratch_pixels_preset
from stages.engine import Engine, Objective, adamw, compile_layers, schedule
from stages.evaluate.metrics import CENTER, CROPS3, Protocol, classification_metrics, confusion_matrix, confusion_png, fuse, per_class_accuracy
from stages.finetune.evaluate import EvalScores, score_videos
from stages.finetune.splits import SplitSelection, dataset_tokenizers, select_split
from stages.frames.read import FrameShard
from stages.pretrain import distributed as D
from stages.pretrain.data import ClipLoader, ClipSampling, TokenShard
from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY
from stages.pretrain.pixels import FORMAT as PIXEL_FORMAT
from stages.pretrain.train import FORMAT as PRETRAIN_FORMAT
from stages.reporting import Reporter
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.tables import now, write_rows

CODE_VERSION = "finetune-2"  # 2: BatchNorm head (issue 14), precise head statistics, per-class training accuracy
EVAL_VERSION = "eval-1"
FORMAT = "vimpac-finetune"
SCRATCH = "scratch"
FINETUNE = "finetune"  # the results' protocol of fine-tuned cells (probes: stages/finetune/probe.py)
# The paper (following SlowFast) trains non-pretrained models 4x as long on small datasets
# (UCF101, HMDB51, Diving48) and 1.5x on large ones (SSv2, Kinetics: 169k and 240k videos).
LARGE_DATASET = 50_000
CHANCE_MARGIN = 0.02  # training accuracy within 2 points of chance over the first half: "learned nothing"
TOKEN_FAMILY = "vimpac"  # the backbone families a grid row can name (the pretrain checkpoint's format says which)
FAMILIES = {PRETRAIN_FORMAT: TOKEN_FAMILY, PIXEL_FORMAT: PIXEL_FAMILY}


@dataclass
class ModelSource:
    """What a grid row names: a pretrain checkpoint on local disk, or the scratch baseline."""

    ref: str  # as the user wrote it: scratch, models:/NAME/VERSION, a path
    checkpoint: Path | None = None  # local pretrain checkpoint; None for scratch
    name: str | None = None  # label in reports (default: the pretrain recipe)

    @property
    def scratch(self) -> bool:
        return self.checkpoint is None


@dataclass
class CellResult:
    eval_id: str
    run_key: str
    dataset: str
    split: str
    pretrain_recipe: str
    pretrain_run: str
    finetune_recipe: str
    tokenizer: str
    protocol: str  # the evaluation method: finetune, linear_probe:cls, ..., bag_of_codes
    metrics: dict[str, float]
    cached: bool
    checkpoint: Path | None = None
    view_protocol: str = ""  # the test-time views, e.g. 4x3
    seed: int | None = None
    code_version: str = f"{CODE_VERSION}/{EVAL_VERSION}"
    train_per_class: dict[str, float | None] = field(default_factory=dict)  # training accuracy per class at the end
    steps: int = 0
    n_train: int = 0
    n_eval: int = 0
    warnings: list[str] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)

    def summary(self) -> dict:
        return {"eval_id": self.eval_id, "run_key": self.run_key, "dataset": self.dataset, "split": self.split,
                "pretrain_recipe": self.pretrain_recipe, "pretrain_run": self.pretrain_run,
                "finetune_recipe": self.finetune_recipe, "tokenizer": self.tokenizer, "protocol": self.protocol,
                "view_protocol": self.view_protocol, "seed": self.seed,
                "cached": self.cached, "checkpoint": str(self.checkpoint) if self.checkpoint else None, "steps": self.steps,
                "n_train": self.n_train, "n_eval": self.n_eval, "warnings": self.warnings,
                "train_acc_per_class": self.train_per_class, **self.metrics}


@dataclass
class _Pretrained:
    backbone: BackboneConfig
    state: dict  # backbone weights
    identity: str  # pretrain run key, or the file's sha256 for a checkpoint made elsewhere
    recipe: str
    tokenizer: str | None
    preset: str | None
    datasets: tuple[str, ...] = ()  # what it was pretrained on
    excluded_splits: dict[str, str] = field(default_factory=dict)  # dataset -> split whose evaluation videos it never saw

    def transductive_warning(self, dataset: str, split: str) -> str | None:
        """A warning when this backbone was pretrained on `dataset` including the evaluation videos of
        `split`: unlabeled, but the result is then transductive, not comparable with one that never saw them."""
        if dataset not in self.datasets or self.excluded_splits.get(dataset) == split:
            return None
        return (f"{self.recipe} was pretrained on {dataset} including the evaluation videos of split {split} (without "
                f"their labels), so this result is transductive; to pretrain on {dataset}'s own videos as VideoMAE does, "
                f"leave them out with pretrain data.exclude_split={split}")


def _checkpoint_file(path: Path) -> Path:
    """A registry download is a folder holding the checkpoint; a run folder holds final.pt."""
    if path.is_dir():
        for candidate in (path / "final.pt", *sorted(path.glob("*.pt"))):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"no checkpoint (.pt) in {path}")
    return path


def checkpoint_family(checkpoint: Path) -> str:
    """The backbone family of a pretrain checkpoint (file, run folder or registry download):
    vimpac (token shards) or st_mae (pixels), from its format, reading no weights (memory-mapped).
    ValueError naming the file for anything else."""
    path = _checkpoint_file(Path(checkpoint))
    if not path.is_file():
        raise ValueError(f"pretrain checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any load error means "not a readable checkpoint"
        raise ValueError(f"pretrain checkpoint {path} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in FAMILIES:
        raise ValueError(f"{path} is neither a {PRETRAIN_FORMAT} nor a {PIXEL_FORMAT} checkpoint (format {fmt!r})")
    return FAMILIES[fmt]


def source_family(source: ModelSource) -> str:
    """A grid row's family: scratch is the token backbone, scratch-pixels:PRESET the ST-MAE
    encoder (whatever path a caller put beside it); a checkpoint says (ConfigError otherwise)."""
    if scratch_pixels_preset(source.ref) is not None:
        return PIXEL_FAMILY
    if source.scratch:
        return TOKEN_FAMILY
    try:
        return checkpoint_family(Path(source.checkpoint))
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"model {source.ref}: {e}") from None


def load_pretrained_backbone(source: ModelSource) -> _Pretrained:
    path = _checkpoint_file(Path(source.checkpoint))
    try:
        ckpt = read_checkpoint(path, PRETRAIN_FORMAT, "pretrain")
        mcfg = PretrainModelConfig.from_dict(dict(ckpt["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model {source.ref}: {e}") from None
    if ckpt.get("kind") != "final":
        raise ConfigError(f"model {source.ref}: {path} is an unfinished pretraining run's resume checkpoint; finish it first")
    meta = dict(ckpt.get("metadata") or {})
    state = {k[len("backbone."):]: v for k, v in strip_prefixes(ckpt["model"]).items() if k.startswith("backbone.")}
    identity = _model_identity(meta, path)
    preset = ((meta.get("config") or {}).get("model") or {}).get("preset")
    excluded = {d: str(e["split"]) for d, e in dict(meta.get("excluded_eval_videos") or {}).items()}
    return _Pretrained(mcfg.backbone, state, identity, source.name or meta.get("run_name") or path.stem, meta.get("tokenizer"), preset,
                       tuple(meta.get("datasets") or ()), excluded)


def _model_identity(meta: dict, path: Path) -> str:
    """A pretrained model in cell keys: its pretrain run key, or the file's hash if made elsewhere."""
    return meta.get("run_key") or hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def pretrained_identity(checkpoint: Path) -> tuple[str, str | None]:
    """(identity, tokenizer) of a pretrain checkpoint as `finetune_cell` keys it, reading only its
    metadata (memory-mapped: the weights are not loaded). ValueError for an unreadable file."""
    path = _checkpoint_file(Path(checkpoint))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any load error means "not a readable checkpoint"
        raise ValueError(f"pretrain checkpoint {path} is not readable: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_FORMAT:
        raise ValueError(f"{path} is not a {PRETRAIN_FORMAT} checkpoint")
    meta = dict(ckpt.get("metadata") or {})
    return _model_identity(meta, path), meta.get("tokenizer")


def _tokenizer(root: DataRoot, dataset: str, cfg: FinetuneConfig, pretrained: _Pretrained | None, ref: str) -> str:
    return cell_tokenizer(root, dataset, cfg, pretrained.tokenizer if pretrained else None, pretrained is not None, ref)


def cell_tokenizer(root: DataRoot, dataset: str, cfg: FinetuneConfig, pretrained_tokenizer: str | None, pretrained: bool,
                   ref: str) -> str:
    """Whose token shards a cell uses: the config's tokenizer, else the pretrained model's, else
    the only one the dataset has (read-only; ConfigError naming the problem otherwise)."""
    available = dataset_tokenizers(root, dataset)
    if not available:
        raise ConfigError(f"dataset {dataset} has no token shards (run the tokenize stage on it first)")
    wanted = cfg.tokenizer or (pretrained_tokenizer if pretrained else None)
    if wanted:
        if wanted not in available:
            whose = f"model {ref} was pretrained on tokens of {wanted}" if pretrained and not cfg.tokenizer else f"tokenizer {wanted} was asked for"
            raise ConfigError(f"{whose}, but dataset {dataset} has tokens only of {', '.join(available)}: "
                              f"tokenize {dataset} with {wanted} (a backbone's vocabulary is its tokenizer's codebook)")
        return wanted
    if len(available) > 1:
        raise ConfigError(f"dataset {dataset} has tokens of several tokenizers ({', '.join(available)}): set finetune tokenizer")
    return available[0]


def _model_config(cfg: FinetuneConfig, selection: SplitSelection, pretrained: _Pretrained | None, ref: str) -> ClassifierConfig:
    shard = selection.train_shards[0]
    n_codes, (gh, gw) = shard.codebook_size, shard.grid
    if gh != gw:
        raise ConfigError(f"token grids must be square for the factorized positional tables, got {gh}x{gw}")
    if pretrained is not None:
        if pretrained.backbone.n_codes != n_codes:
            raise ConfigError(f"model {ref} has a vocabulary of {pretrained.backbone.n_codes} codes but the tokens of "
                              f"{selection.dataset} ({selection.tokenizer}) have {n_codes}: they come from different tokenizers")
        backbone = copy.deepcopy(pretrained.backbone)
    else:
        backbone = BACKBONES[cfg.model.scratch_preset]()
        backbone.n_codes = n_codes
    backbone.frames = cfg.data.frames or backbone.frames
    backbone.grid, backbone.dropout, backbone.drop_path = gh, cfg.model.dropout, cfg.model.drop_path
    try:
        backbone.__post_init__()
        return ClassifierConfig(backbone, n_classes=len(selection.classes), head_dropout=cfg.model.head_dropout, pool=cfg.model.pool,
                                head_norm=cfg.model.head_norm)
    except ValueError as e:
        raise ConfigError(f"fine-tune model: {e}") from None


def protocol_for(cfg: FinetuneConfig, flip_sensitive: bool) -> Protocol:
    if cfg.eval.crops == "auto":
        return Protocol.paper(cfg.eval.clips, flip_sensitive)
    return Protocol(cfg.eval.clips, CROPS3 if cfg.eval.crops == "three" else CENTER)


def _fingerprint(shards: list[TokenShard] | list[FrameShard]) -> str:
    return hashlib.sha256("\n".join(sorted(s.path for s in shards)).encode()).hexdigest()


def _frame_size(root: DataRoot, shards: list[TokenShard]) -> int:
    rows = Catalog(root).rows("SELECT DISTINCT size FROM token_samples WHERE shard IN (SELECT unnest(?::VARCHAR[]))",
                              [[s.path for s in shards]])
    return int(rows[0][0]) if rows else shards[0].grid[0] * 8


def finetune_recipe(cfg: FinetuneConfig, preset: str, frames: int, size: int) -> str:
    """`<preset>-<T>x<S>`, and `+<config hash>` when settings were changed from the preset's, so a
    report never averages two different recipes under one name. The scratch row's backbone preset
    is in its pretrain_run (`scratch:<preset>`): the same recipe name keeps scratch and pretrained
    rows of one grid side by side (Table 7)."""
    name = f"{preset}-{frames}x{size}"
    # The seed is not part of the recipe: it is its own column of `results`, and the report
    # averages a recipe's seeds (a per-seed hash split every seed into its own row).
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": FinetuneTrain().seed})})
    try:
        as_preset = build(FinetuneConfig, PRESETS["finetune"][preset])
    except KeyError:
        return f"{name}+{config_hash(cfg)[:6]}"
    return name if config_hash(as_preset) == config_hash(cfg) else f"{name}+{config_hash(cfg)[:6]}"


def cell_keys(cfg: FinetuneConfig, pretrain_identity: str, dataset: str, selection: SplitSelection, tokenizer: str,
              world_size: int, protocol: Protocol) -> tuple[str, str]:
    """(fine-tune run key, eval id) of a cell: what `finetune_cell` checks before doing any work
    (a cell whose eval id has results is cached). Pure: `vimpac plan` calls it too."""
    key_blob = json.dumps([CODE_VERSION, config_hash(cfg), pretrain_identity, dataset, selection.split, _fingerprint(selection.shards),
                           tokenizer, world_size, selection.classes], separators=(",", ":"))
    run_key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    eval_id = hashlib.sha256(json.dumps([run_key, protocol.name, EVAL_VERSION]).encode()).hexdigest()[:16]
    return run_key, eval_id


def scratch_identity(cfg: FinetuneConfig) -> str:
    """What stands for the pretrained model in a from-scratch cell's key and results."""
    return f"{SCRATCH}:{cfg.model.scratch_preset}"


def existing_results(root: DataRoot, eval_id: str) -> dict[str, float]:
    return {m: v for m, v in Catalog(root).rows("SELECT metric, value FROM results WHERE eval_id = ?", [eval_id])}


def finetune_cell(root: DataRoot, source: ModelSource, dataset: str, split: str, cfg: FinetuneConfig, *, preset: str = "default",
                  grid: str = "", reporter: Reporter | None = None, force: bool = False, run_id: str | None = None,
                  max_steps: int | None = None) -> CellResult:
    """Fine-tune and evaluate one (model, dataset, split, preset) cell, or find it done."""
    reporter = reporter or Reporter()
    info = D.setup(cfg.train.device)
    try:
        result = _cell(root, source, dataset, split, cfg, preset, grid, reporter, force, run_id, max_steps, info)
    except BaseException:
        D.teardown(info, clean=False)
        raise
    D.teardown(info)
    return result


def _cell(root: DataRoot, source: ModelSource, dataset: str, split: str, cfg: FinetuneConfig, preset: str, grid: str,
          reporter: Reporter, force: bool, run_id: str | None, max_steps: int | None, info: D.DistInfo) -> CellResult:
    if source_family(source) == PIXEL_FAMILY:
        from stages.finetune.pixels import pixel_cell  # the pixel family's module builds on this one

        return pixel_cell(root, source, dataset, split, cfg, preset, grid, reporter, force, run_id, max_steps, info)
    pretrained = None if source.scratch else load_pretrained_backbone(source)
    tokenizer = _tokenizer(root, dataset, cfg, pretrained, source.ref)
    selection = select_split(root, dataset, split, tokenizer, size=cfg.data.size, variant=cfg.data.variant, seed=cfg.train.seed)
    if pretrained is not None and (leak := pretrained.transductive_warning(dataset, selection.base)):
        selection.warnings.append(leak)
    for warning in selection.warnings:
        reporter.warning(warning)
    ccfg = _model_config(cfg, selection, pretrained, source.ref)
    frames, size = ccfg.backbone.frames, _frame_size(root, selection.shards)
    protocol = protocol_for(cfg, selection.flip_sensitive)
    pretrain_identity = pretrained.identity if pretrained else scratch_identity(cfg)
    run_key, eval_id = cell_keys(cfg, pretrain_identity, dataset, selection, tokenizer, info.world_size, protocol)
    recipe = pretrained.recipe if pretrained else (source.name or SCRATCH)
    ft_recipe = finetune_recipe(cfg, preset, frames, size)
    result = CellResult(eval_id, run_key, dataset, selection.split, recipe, pretrain_identity, ft_recipe, tokenizer, FINETUNE,
                        {}, False, n_train=len(selection.train), n_eval=len(selection.eval), warnings=list(selection.warnings),
                        view_protocol=protocol.name, seed=cfg.train.seed)
    where = f"{recipe} on {dataset} split {selection.split} ({ft_recipe})"
    if not force and found_evaluated(root, result, where, reporter):
        return result
    run_dir, final, last = prepare_run_dir(root, run_key, force, info)
    if final.exists() and not force:
        ckpt = read_checkpoint(final, FORMAT, "fine-tune")
        model = VideoClassifier(ClassifierConfig.from_dict(dict(ckpt["model_config"])))
        model.load_state_dict(strip_prefixes(ckpt["model"]))
        restore_finished(result, ckpt, final, where, reporter)
    else:
        watch: dict = {}
        model, result.steps, finished = _train(root, selection, ccfg, cfg, pretrained, reporter, info, run_key, where, last, max_steps,
                                               watch, result.warnings)
        if not finished:
            result.checkpoint = last
            return result
        result.train_per_class = watch.get("per_class") or {}
        save_finished(info, model, ccfg.to_dict(), final, last, result, selection, cfg, source,
                      {"tokenizer": tokenizer, "pretrain": pretrain_identity, "recipe": recipe})
    result.checkpoint = final

    amp = cfg.train.amp and info.device.type == "cuda"
    model.to(info.device)
    scores = score_videos(model, root, selection, protocol, clip_len=frames, pad_id=ccfg.backbone.pad_id, device=info.device, amp=amp,
                          batch_size=cfg.eval.batch_size, rank=info.rank, world=info.world_size)
    finish_evaluation(root, result, selection, scores, protocol, source, grid, run_id, run_dir, reporter, cfg.train.seed, info, where)
    return result


def found_evaluated(root: DataRoot, result: CellResult, where: str, reporter: Reporter) -> bool:
    """Fill `result` from the catalog when its evaluation exists (a cached cell); False otherwise."""
    done = existing_results(root, result.eval_id)
    if not done:
        return False
    reporter.info(f"{where}: already evaluated (eval {result.eval_id}): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(done.items())))
    result.metrics, result.cached = done, True
    final = root.home / "checkpoints" / "finetune" / result.run_key / "final.pt"
    result.checkpoint = final if final.exists() else None
    return True


def prepare_run_dir(root: DataRoot, run_key: str, force: bool, info: D.DistInfo) -> tuple[Path, Path, Path]:
    """The cell's folder, its final.pt and last.pt. --force trains afresh, but the previous final
    model and results stay until the new ones replace them: an interrupted forced run loses
    nothing that was good."""
    run_dir = root.home / "checkpoints" / "finetune" / run_key
    final, last = run_dir / "final.pt", run_dir / "last.pt"
    if force and info.is_main:
        last.unlink(missing_ok=True)
    D.barrier()
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for partial in run_dir.glob(".*.partial"):
            partial.unlink(missing_ok=True)
    return run_dir, final, last


def restore_finished(result: CellResult, ckpt: dict, final: Path, where: str, reporter: Reporter) -> None:
    """A fine-tuned model found on disk (its evaluation was not): its steps, per-class accuracy, warnings."""
    result.steps = int(ckpt["metadata"]["steps"])
    result.train_per_class = dict(ckpt["metadata"].get("train_acc_per_class") or {})
    result.warnings += [w for w in ckpt["metadata"].get("warnings") or [] if w not in result.warnings]
    reporter.info(f"{where}: fine-tuned model found ({final}); evaluating")


def save_finished(info: D.DistInfo, model: torch.nn.Module, model_config: dict, final: Path, last: Path, result: CellResult,
                  selection: SplitSelection, cfg: FinetuneConfig, source: ModelSource, extra: dict) -> None:
    """final.pt (the fine-tuned model, its config and the cell's metadata) replaces last.pt."""
    metadata = {"run_key": result.run_key, "steps": result.steps, "dataset": selection.dataset, "split": selection.split,
                "classes": selection.classes, "train_acc_per_class": result.train_per_class, "warnings": result.warnings,
                "pretrain_ref": source.ref, "finetune_recipe": result.finetune_recipe, "shards": [s.path for s in selection.shards],
                "config": cfg.model_dump(mode="json"), **extra}
    if info.is_main:
        atomic_save({"format": FORMAT, "kind": "final", "model": strip_prefixes(model.state_dict()),
                     "model_config": model_config, "metadata": metadata}, final)
        last.unlink(missing_ok=True)
    D.barrier()


def finish_evaluation(root: DataRoot, result: CellResult, selection: SplitSelection, scores: EvalScores, protocol: Protocol,
                      source: ModelSource, grid: str, run_id: str | None, run_dir: Path, reporter: Reporter, seed: int,
                      info: D.DistInfo, where: str) -> None:
    """Report unreadable videos, then (rank 0) write the cell's results, predictions and plots."""
    for error in scores.errors:
        reporter.warning(f"evaluation: {error}")
    if not scores.videos:
        raise ValueError(f"{where}: none of the {len(selection.eval)} evaluation videos could be scored: {'; '.join(scores.errors[:3])}")
    if info.is_main:
        result.metrics = _write_evaluation(root, result, selection, scores, protocol, source, grid, run_id, run_dir, reporter, seed)
        result.n_eval = len(scores.videos)
        reporter.metrics({f"eval_{k}": v for k, v in result.metrics.items()}, step=result.steps)
        reporter.info(f"{where}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
                      + f" over {len(scores.videos)} videos ({protocol.describe()})")
    D.barrier()


@dataclass(frozen=True)
class TrainingPlan:
    """How long a cell trains: steps per epoch of this world, optimizer steps, warm-up steps."""

    batches_per_epoch: int
    total_steps: int
    warmup: int


def scratch_factor(cfg: FinetuneConfig, n_train: int) -> float:
    """Epoch multiplier of a from-scratch row (token or pixel): train.scratch_factor, else the
    paper's 4x below LARGE_DATASET training videos and 1.5x above."""
    return cfg.train.scratch_factor or (4.0 if n_train < LARGE_DATASET else 1.5)


def training_plan(cfg: FinetuneConfig, n_train: int, world: int, factor: float = 1.0) -> TrainingPlan:
    """`factor` x train.epochs over `n_train` videos in batches of batch_size x world, k accumulated."""
    batches_per_epoch = max(1, math.ceil(n_train / (cfg.train.batch_size * world)))
    total_steps = max(1, math.ceil(cfg.train.epochs * factor * batches_per_epoch / cfg.train.accumulate))
    warmup = int(cfg.train.warmup * total_steps) if cfg.train.warmup < 1 else int(cfg.train.warmup)
    return TrainingPlan(batches_per_epoch, total_steps, warmup)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators: the classifier's initialisation and dropout."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _train(root: DataRoot, selection: SplitSelection, ccfg: ClassifierConfig, cfg: FinetuneConfig, pretrained: _Pretrained | None,
           reporter: Reporter, info: D.DistInfo, run_key: str, where: str, last: Path,
           max_steps: int | None, watch: dict, warnings: list[str]) -> tuple[VideoClassifier, int, bool]:
    """Fine-tune the token backbone; `watch` receives the learning checks (first-half accuracy,
    per-class accuracy at the end), `warnings` what the user must see."""
    world, device = info.world_size, info.device
    n_train = len(selection.train)
    factor = 1.0 if pretrained else scratch_factor(cfg, n_train)
    plan = training_plan(cfg, n_train, world, factor)
    large = (pretrained.preset if pretrained else cfg.model.scratch_preset) == "large_half"
    lr = cfg.train.lr or (5e-5 if large else 1e-4)  # Table 4

    seed_everything(cfg.train.seed)
    model = VideoClassifier(ccfg)
    if pretrained is not None:
        try:
            load_state_resized(model.backbone, pretrained.state)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{where}: {e}") from None
    loader = ClipLoader(root, selection.train_shards, ClipSampling(n_frames=ccfg.backbone.frames, view=None, clips=1),
                        batch_size=cfg.train.batch_size, batches_per_epoch=plan.batches_per_epoch, pad_id=ccfg.backbone.pad_id,
                        seed=cfg.train.seed, rank=info.rank, world_size=world, num_workers=cfg.data.workers,
                        shuffle_buffer=cfg.data.shuffle_buffer, pin_memory=device.type == "cuda", labels=selection.train)
    scratch = f" (from scratch: {factor:g}x the epochs)" if pretrained is None else ""
    return fit_classifier(model, ccfg.to_dict(), loader, plan, cfg, lr=lr, classes=selection.classes, n_train=n_train,
                          backbone_params=model.backbone.num_params(), reporter=reporter, info=info, run_key=run_key, where=where,
                          last=last, max_steps=max_steps, watch=watch, warnings=warnings, note=scratch)


def fit_classifier(model: VideoClassifier | PixelClassifier, model_config: dict, loader, plan: TrainingPlan, cfg: FinetuneConfig, *,
                   lr: float, classes: list[str], n_train: int, backbone_params: int, reporter: Reporter, info: D.DistInfo,
                   run_key: str, where: str, last: Path, max_steps: int | None, watch: dict, warnings: list[str],
                   note: str = "") -> tuple[torch.nn.Module, int, bool]:
    """The training both families share, on the engine: AdamW (layer-wise decay when
    train.layer_decay < 1), warm-up + linear decay, label-smoothed cross-entropy, the learning
    checks, then precise head statistics. `loader.epoch(epoch, skip_batches=)` gives batches
    with "labels" and the model's input ("tokens" or "videos"). Returns (model, step, finished)."""
    world, device = info.world_size, info.device
    k = cfg.train.accumulate
    amp = cfg.train.amp and device.type == "cuda"
    model.to(device)
    optimizer = adamw(model, lr=lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay, device=device,
                      layer_decay=cfg.train.layer_decay, layer_of=model.layer_id, n_layers=model.n_layers,
                      no_decay=model.no_weight_decay())
    scheduler = schedule(optimizer, first_step=0, warmup=plan.warmup, total=plan.total_steps)
    objective = _FinetuneRunObjective(model, n_classes=len(classes), total_steps=plan.total_steps,
                                      batches_per_epoch=plan.batches_per_epoch, amp=amp, device=device, world=world, where=where,
                                      reporter=reporter, watch=watch, warnings=warnings, label_smoothing=cfg.train.label_smoothing)
    engine = Engine(model, optimizer, scheduler, objective, info=info, reporter=reporter, amp=amp, grad_clip=cfg.train.grad_clip,
                    accumulate=k, last=last, what="fine-tune", log_every=cfg.train.log_every,
                    checkpoint_every=cfg.train.checkpoint_every, batches_per_epoch=plan.batches_per_epoch,
                    checkpoint_header={"format": FORMAT, "code_version": CODE_VERSION, "run_key": run_key,
                                       "model_config": model_config})
    total_steps = plan.total_steps
    if engine.resume():
        reporter.info(f"{where}: resuming at step {engine.step}/{total_steps}")
    else:
        decay = f", layer decay {cfg.train.layer_decay:g}" if cfg.train.layer_decay != 1.0 else ""
        reporter.info(f"{where}: fine-tuning {backbone_params / 1e6:.1f}M parameters for {total_steps} steps of "
                      f"{cfg.train.batch_size}x{world}x{k} videos{note}; {n_train} training videos, {len(classes)} classes, "
                      f"lr {lr:g}{decay} on {device} ({run_key})")
    if cfg.train.compile:
        compile_layers(model.layers)
    stop_at = total_steps if max_steps is None else min(total_steps, max_steps)
    step = engine.run(first_step=0, end_step=total_steps, stop_at=stop_at, label=f"fine-tune {where}",
                      epochs=lambda epoch, skip: loader.epoch(epoch, skip_batches=skip))
    if step < total_steps:
        reporter.info(f"{where}: stopped at step {step}/{total_steps}; run again to continue")
        return model, step, False
    if "spread_start" in watch:
        collapse_check(float(watch["spread_start"]), float(watch["spread_last"]), where, reporter, warnings)
    tail = D.all_reduce_sum(watch["tail"].to(device)).cpu()
    watch["per_class"] = {name: (float(tail[0, i] / tail[1, i]) if tail[1, i] else None) for i, name in enumerate(classes)}
    if info.is_main:
        reporter.metrics({f"train_acc_class/{name}": acc for name, acc in watch["per_class"].items() if acc is not None}, step=step)
        reporter.info(f"{where}: training accuracy per class over the last {total_steps - objective.tail_from} steps: "
                      + ", ".join(f"{name} {acc:.2f}" if acc is not None else f"{name} -" for name, acc in watch["per_class"].items()))
    used = recompute_head_statistics(model, loader.epoch(engine.epoch + 1), max(1, min(plan.batches_per_epoch, 50)), device, amp)
    if used:
        reporter.info(f"{where}: head BatchNorm statistics re-estimated on {used} training batches (eval mode)")
    return model, step, True


COLLAPSE_FACTOR = 5.0


def model_input(batch: dict) -> torch.Tensor:
    """The one clip per video a classifier reads from a fine-tuning batch: token clips
    (B, T, H, W) of the token loader, or normalised pixel clips (B, 3, T, S, S)."""
    return batch["tokens"][:, 0] if "tokens" in batch else batch["videos"]


@torch.no_grad()
def feature_spread(model: VideoClassifier | PixelClassifier, clips: torch.Tensor, amp: bool) -> float:
    """The pooled feature's per-feature std over a batch of clips, averaged over features, in
    eval mode (dropout and drop path off: in training mode their noise alone keeps the spread
    up). 0 for a batch of one."""
    if clips.shape[0] < 2:
        return 0.0
    model.eval()
    try:
        with torch.autocast(clips.device.type, dtype=torch.bfloat16, enabled=amp):
            feature = model.features(clips)  # (B, D)
        return float(feature.float().std(0).mean())
    finally:
        model.train()


def collapse_check(start: float, last: float, where: str, reporter: Reporter, warnings: list[str]) -> str | None:
    """Warn when the pooled feature's spread over a batch (`feature_spread`) fell
    `COLLAPSE_FACTOR`-fold from the first logged step to the last: fine-tuning flattened the clips'
    features instead of using them (a pretrained [CLS] went from 0.36 to 0.02 in 120 steps at
    lr 1e-3, docs/learning.md)."""
    if not (start > 0 and last * COLLAPSE_FACTOR < start):
        return None
    message = (f"{where}: the clips' pooled features collapsed during fine-tuning: their spread over a batch (per-feature std) "
               f"fell from {start:.3f} to {last:.3f}. Fine-tuning is erasing what the backbone knew; try a lower learning rate "
               "(train.lr) and check the probes (grid protocols linear_probe, knn).")
    reporter.warning(message)
    warnings.append(message)
    return message


def chance_check(first_half: torch.Tensor, n_classes: int, steps: int, where: str, reporter: Reporter, warnings: list[str]) -> str | None:
    """The warning a user should never have to dig for: training accuracy over the first half of
    the run within 2 points of chance means the model learned nothing (issue 14)."""
    correct, videos = float(first_half[0]), float(first_half[1])
    if videos <= 0:
        return None
    accuracy, chance = correct / videos, 1.0 / n_classes
    if abs(accuracy - chance) > CHANCE_MARGIN:
        return None
    text = (f"{where}: training accuracy {100 * accuracy:.1f}% over the first {steps} steps ({videos:.0f} videos) is within "
            f"{100 * CHANCE_MARGIN:.0f} points of chance ({100 * chance:.1f}%): the model is not learning. Check the probes "
            "(grid protocols linear_probe, knn, bag_of_codes) to see whether the features or the tokens carry the classes, "
            "and docs/learning.md for the known causes")
    warnings.append(text)
    reporter.warning(text)
    return text


class ClassificationObjective(Objective):
    """Fine-tuning on the engine: cross-entropy summed and divided by the global batch's video
    count, so accumulation and DDP equal one large batch. `label_smoothing` e puts 1 - e + e / C
    of the target on the label and e / C on every other class (mae_st/HVM-1 fine-tune with 0.1);
    0 is the plain cross-entropy. Figures: loss sum, correct, and per-class (2, C) [correct,
    videos] counts of this rank."""

    def __init__(self, n_classes: int, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.n_classes = n_classes
        self.label_smoothing = label_smoothing

    def count(self, batch: dict) -> int:
        return int(batch["labels"].numel())

    def step_context(self, net: torch.nn.Module, micro_batches: list[dict], device: torch.device) -> torch.Tensor:
        world = torch.distributed.get_world_size() if isinstance(net, DistributedDataParallel) else 1
        local = float(sum(int(b["labels"].numel()) for b in micro_batches))
        return D.all_reduce_sum(torch.tensor([local], device=device)) / world

    def loss(self, net: torch.nn.Module, batch: dict, norm: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        logits = net(model_input(batch))  # (B, C): the batch's one clip per video
        ce = F.cross_entropy(logits.float(), batch["labels"], reduction="sum", label_smoothing=self.label_smoothing)
        hits = logits.detach().argmax(-1) == batch["labels"]
        labels = batch["labels"].cpu()
        per_class = torch.zeros(2, self.n_classes, dtype=torch.float64)
        per_class[0].index_add_(0, labels, hits.cpu().double())
        per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        return ce / norm, {"loss_sum": float(ce.detach()), "correct": float(hits.sum()), "per_class": per_class}

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        videos = max(1.0, sums["videos"])
        return {"loss": sums["loss_sum"] / videos, "train_acc": sums["correct"] / videos}


class _FinetuneRunObjective(ClassificationObjective):
    """The objective inside a fine-tuning run, with its learning checks (issue 14): accuracy
    over the first half of the run against chance, per-class accuracy over the last epoch's worth
    of steps (at least one), and the pooled features' spread at every log step."""

    def __init__(self, model: VideoClassifier | PixelClassifier, *, n_classes: int, total_steps: int, batches_per_epoch: int,
                 amp: bool, device: torch.device, world: int, where: str, reporter: Reporter, watch: dict, warnings: list[str],
                 label_smoothing: float = 0.0):
        super().__init__(n_classes, label_smoothing)
        self.model, self.amp, self.device, self.world, self.where, self.reporter = model, amp, device, world, where, reporter
        self.half, self.tail_from = total_steps // 2, max(0, total_steps - max(1, batches_per_epoch))
        self.watch, self.warnings = watch, warnings
        watch["first_half"] = watch.get("first_half", torch.zeros(2, dtype=torch.float64))  # correct, videos
        watch["tail"] = watch.get("tail", torch.zeros(2, n_classes, dtype=torch.float64))

    def after_step(self, step: int, figures: dict) -> None:
        watch = self.watch
        if step <= self.half:
            watch["first_half"] += torch.tensor([figures["correct"], figures["videos"]], dtype=torch.float64)
        if step > self.tail_from:
            watch["tail"] += figures["per_class"]
        if step == self.half and self.half > 0:
            chance_check(D.all_reduce_sum(watch["first_half"].to(self.device)).cpu(), self.n_classes, self.half, self.where,
                         self.reporter, self.warnings)

    def at_log(self, micro_batches: list[dict]) -> dict[str, float]:
        return {"feature_spread": feature_spread(self.model, model_input(micro_batches[0]), self.amp)}

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        return {**super().summarise(sums, base), "feature_spread": sums["feature_spread"] / self.world}

    def logged(self, values: dict[str, float]) -> None:
        self.watch.setdefault("spread_start", torch.tensor(values["feature_spread"], dtype=torch.float64))
        self.watch["spread_last"] = torch.tensor(values["feature_spread"], dtype=torch.float64)

    def state(self) -> dict:
        return {"watch": {k: v.clone() for k, v in self.watch.items() if isinstance(v, torch.Tensor)},
                "warnings": list(self.warnings)}

    def load_state(self, ckpt: dict, is_main: bool) -> None:
        self.watch.update(ckpt.get("watch") or {})
        self.warnings.extend(ckpt.get("warnings") or [])


@torch.no_grad()
def recompute_head_statistics(model: VideoClassifier | PixelClassifier, batches, n_batches: int, device: torch.device, amp: bool) -> int:
    """Precise BatchNorm (SlowFast's precise BN): the head's running mean and variance become the
    exact statistics of the final model's features (eval mode: no dropout) over `n_batches`
    training batches, summed over all ranks, instead of a momentum average of features from
    earlier, changing models. Returns the batches this rank used."""
    norm = model.norm
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
        return 0
    model.eval()
    total = torch.zeros(2 * norm.num_features + 1, dtype=torch.float64, device=device)  # sum, sum of squares, count
    used = 0
    for batch in batches:
        if used >= n_batches:
            break
        clips = model_input(batch).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            feature = model.features(clips).double()  # (B, D)
        total += torch.cat([feature.sum(0), (feature * feature).sum(0), feature.new_tensor([feature.shape[0]])])
        used += 1
    total = D.all_reduce_sum(total)
    count = float(total[-1])
    if count >= 2:
        d = norm.num_features
        mean = total[:d] / count
        var = (total[d : 2 * d] / count - mean * mean).clamp_min(0) * count / (count - 1)
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))
    return used


def write_evaluation(root: DataRoot, result: CellResult, selection: SplitSelection, scores: EvalScores, *, method: str,
                     view_protocol: str, model_ref: str, grid: str, run_id: str | None, seed: int | None) -> dict[str, float]:
    """Predictions first, then the results file (the evaluation's commit marker). `method` is
    the results' `protocol` (finetune, linear_probe:cls, ..., bag_of_codes), `view_protocol`
    the test-time views the scores average over. For an ST-MAE the `token_shards` /
    `token_shard` columns hold the frame shards it read and `tokenizer` is empty: the columns
    name each family's inputs. Returns the metrics."""
    classes = selection.classes
    # One stored "view" is a probe's score for the whole video (its features already average the views).
    probs = scores.scores[:, 0].astype(np.float64) if len(scores.views) == 1 else fuse(scores.scores, scores.views)
    labels = np.array([v.label_index for v in scores.videos], np.int64)
    metrics = classification_metrics(probs, labels, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")
    at = now()
    predictions = [{
        "eval_id": result.eval_id, "dataset": selection.dataset, "video_id": v.video_id, "label": v.label, "label_index": v.label_index,
        "prediction": classes[int(order[i, 0])], "top5": [classes[int(j)] for j in order[i, :5]], "correct": int(order[i, 0]) == v.label_index,
        "scores": probs[i].tolist(), "views": scores.views, "view_scores": scores.scores[i].tolist(), "token_shard": v.shard,
        "created_at": at,
    } for i, v in enumerate(scores.videos)]
    base = root.home / "tables"
    write_rows("predictions", predictions, base / "predictions" / selection.dataset / f"{result.eval_id}.parquet")
    common = {
        "eval_id": result.eval_id, "dataset": selection.dataset, "split": selection.split, "pretrain_run": result.pretrain_run,
        "finetune_run": result.run_key if method == FINETUNE else None, "tokenizer": selection.tokenizer or None, "protocol": method,
        "view_protocol": view_protocol, "seed": seed, "n_train": result.n_train, "pretrain_model": model_ref,
        "pretrain_recipe": result.pretrain_recipe, "finetune_recipe": result.finetune_recipe if method == FINETUNE else None,
        "grid": grid or None, "eval_split": selection.eval_split, "train_split": selection.train_split, "n_videos": len(scores.videos),
        "n_classes": len(classes), "token_shards": [s.path for s in selection.shards], "checkpoint": root.relative(result.checkpoint) if result.checkpoint else None,
        "run_id": run_id, "code_version": result.code_version, "created_at": now(),
    }
    write_rows("results", [{**common, "metric": m, "value": float(v)} for m, v in metrics.items()],
               base / "results" / selection.dataset / f"{result.eval_id}.parquet")
    result.n_eval = len(scores.videos)
    return {k: float(v) for k, v in metrics.items()}


def record_grid_cells(root: DataRoot, grid: str, dataset: str, eval_ids: list[str], run_id: str | None) -> None:
    """That `grid` covers these evaluations (the `grid_cells` table), run now or found evaluated
    already, by another grid or an earlier run: the grid's report then holds every cell it names,
    whichever grid computed it. One file per (grid, eval_id), written once."""
    if not grid:
        return
    tag = hashlib.sha256(grid.encode()).hexdigest()[:8]
    for eval_id in dict.fromkeys(eval_ids):
        path = root.table_dir("grid_cells", dataset, f"{tag}-{eval_id}.parquet")
        if not path.exists():
            write_rows("grid_cells", [{"grid": grid, "eval_id": eval_id, "dataset": dataset, "run_id": run_id, "created_at": now()}], path)


def _write_evaluation(root: DataRoot, result: CellResult, selection: SplitSelection, scores: EvalScores, protocol: Protocol,
                      source: ModelSource, grid: str, run_id: str | None, run_dir: Path, reporter: Reporter, seed: int) -> dict[str, float]:
    """The fine-tuned cell's results and predictions, then its confusion matrix and per-class CSV."""
    metrics = write_evaluation(root, result, selection, scores, method=FINETUNE, view_protocol=protocol.name, model_ref=source.ref,
                               grid=grid, run_id=run_id, seed=seed)
    classes = selection.classes
    probs = fuse(scores.scores, scores.views)
    labels = np.array([v.label_index for v in scores.videos], np.int64)
    order = np.argsort(-probs, axis=1, kind="stable")
    matrix = confusion_matrix(labels, order[:, 0], len(classes))
    title = f"{result.pretrain_recipe} on {selection.dataset} split {selection.split}: top-1 {100 * metrics['top1']:.1f}% ({protocol.name})"
    png = confusion_png(matrix, classes, run_dir / "confusion_matrix.png", title=title)
    table = io.StringIO()
    rows = per_class_accuracy(labels, order[:, 0], classes)
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    per_class = run_dir / "per_class_accuracy.csv"
    per_class.write_text(table.getvalue())
    for path in (png, per_class):
        reporter.artifact(path)
    result.artifacts = [png, per_class]
    return {k: float(v) for k, v in metrics.items()}

