"""The pretrain stage: VIMPAC's mask-then-predict + contrastive pretraining over token shards.

The objective (`MaskedTokenObjective`) runs on the shared training engine (stages/engine.py),
in one process, or one per GPU under torchrun (DDP). Everything a resume needs (model, optimizer,
scheduler, step, RNG states, the loader's position, the config) is saved atomically every
`checkpoint_every` steps; a run with the same key picks it up and continues the same run, with
the same losses as an uninterrupted one. The finished backbone is `final.pt` in
`checkpoints/pretrain/<run key>/`; a finished run key is not trained again unless forced.

Optimisation follows Appendix C / Table 4: AdamW (betas 0.9, 0.98; weight decay 0.05, none on
biases, norms and [CLS]), linear warm-up then linear decay, gradient clipping at 1.0, gradient
accumulation to an effective batch without all-reduce on non-final micro-steps.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from models.backbone import PRESETS as BACKBONES
from models.backbone import flops_per_clip, load_state_resized
from models.masking import block_mask, blocks_for_ratio, copy_prediction, corrupt, iid_mask, tube_mask
from models.pretrain import PretrainModelConfig, VIMPACPretrainer, default_cl_input
from stages.checkpoints import KeyedRun, atomic_save, read_checkpoint, strip_prefixes
from stages.config import ConfigError, PretrainConfig, config_hash
from stages.engine import Engine, Objective, adamw, compile_layers, lr_factor, optimizer_step, param_groups, schedule, to_device  # noqa: F401 (lr_factor, param_groups, to_device: re-exported)
from stages.finetune.splits import select_split  # fine-tuning's own split resolution, so both agree on the videos
from stages.pretrain import distributed as D
from stages.pretrain.data import ClipLoader, ClipSampling, TokenShard, holdout_videos, token_shards
from stages.reporting import Reporter
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

CODE_VERSION = "pretrain-1"
FORMAT = "vimpac-pretrain"

# DDP without buffer broadcasts at every forward: torch 2.13 names it forward_sync_buffers and
# deprecates broadcast_buffers; older builds (2.11 on the GPU machine of issue 18) know only the latter.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})

# Dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation; unknown devices get none.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
             "A10G": 70e12, "V100": 125e12, "B200": 2250e12}


@dataclass
class PretrainResult:
    checkpoint: Path
    run_key: str
    run_name: str
    steps: int
    metrics: dict
    cached: bool
    tokenizer: str
    datasets: list[str]
    data_fingerprint: str
    model_config: dict = field(default_factory=dict)


def mask_batch(batch: dict, generator: torch.Generator, *, strategy: str, n_blocks: int, ratio: float, replacement: str,
               pad_id: int, mask_id: int, n_codes: int, enabled: bool) -> dict:
    """Loader transform (runs in the data-loader worker): each clip gets its own mask (Sec. 3.1).
    Adds "inputs" (masked ids), "predict" (where the loss is) and "pad" (padded positions)."""
    tokens = batch["tokens"]  # (B, 2, T, H, W)
    b, two, t, h, w = tokens.shape
    flat = tokens.reshape(b * two, t, h, w)
    if not enabled:  # contrastive only: the clips go in unmasked
        mask = torch.zeros_like(flat, dtype=torch.bool)
    elif strategy == "block":
        mask = block_mask((b * two, t, h, w), n_blocks, generator)
    elif strategy == "tube":
        mask = tube_mask((b * two, t, h, w), n_blocks, generator)
    else:
        mask = iid_mask((b * two, t, h, w), ratio, generator)
    inputs, predict = corrupt(flat, mask, pad_id=pad_id, mask_id=mask_id, n_codes=n_codes, replacement=replacement,
                              generator=generator)
    batch["inputs"] = inputs.view_as(tokens)
    batch["predict"] = predict.view_as(tokens)
    batch["pad"] = tokens == pad_id
    return batch


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16, key=len, reverse=True):
        if key in name:
            return PEAK_BF16[key]
    return None


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    videos: int
    mask_ce_sum: float = 0.0
    mask_correct: float = 0.0
    n_predicted: float = 0.0
    cl_loss: float = 0.0
    cl_acc: float = 0.0
    target_counts: torch.Tensor | None = None

    def figures(self) -> dict:
        """As the engine sums them (the keys of `MaskedTokenObjective.loss`)."""
        out = {"loss": self.loss, "mask_ce": self.mask_ce_sum, "correct": self.mask_correct, "predicted": self.n_predicted,
               "cl_loss": self.cl_loss, "cl_acc": self.cl_acc}
        if self.target_counts is not None:
            out["target_counts"] = self.target_counts
        return out


class MaskedTokenObjective(Objective):
    """VIMPAC's objectives (MP, CL, MP+CL) on the engine: the loss of a micro-batch and its figures.

    The mask loss of every micro-batch is normalised by the predicted-token count of the whole
    effective global batch, and the contrastive loss by k, so the update equals one batch of k
    times the size on one process (tests/test_pretrain_train.py). `n_codes` also counts the
    masked targets per code, for the most-frequent-token baseline of validation."""

    ddp_kwargs = _NO_BUFFER_SYNC

    def __init__(self, n_codes: int | None = None):
        self.n_codes = n_codes

    def step_context(self, net: torch.nn.Module, micro_batches: list[dict], device: torch.device) -> torch.Tensor:
        world = torch.distributed.get_world_size() if isinstance(net, DistributedDataParallel) else 1
        predicted = torch.tensor([float(sum(int(b["predict"].sum()) for b in micro_batches))], device=device)
        return D.all_reduce_sum(predicted).clamp_min(1.0) / world

    def loss(self, net: torch.nn.Module, batch: dict, mask_norm: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
        b = batch
        out = net(b["inputs"], b["tokens"], b["predict"], b["video_index"], b["pad"], mask_norm=mask_norm, cl_scale=1.0 / k)
        figures = {"loss": float(out["loss"].detach())}
        if "mask_ce_sum" in out:
            figures.update(mask_ce=float(out["mask_ce_sum"]), correct=float(out["mask_correct"]),
                           predicted=float(out["n_predicted"]))
            if self.n_codes:
                figures["target_counts"] = torch.bincount(b["tokens"][b["predict"]], minlength=self.n_codes)[: self.n_codes]
        if "cl_loss" in out:
            figures.update(cl_loss=float(out["cl_loss"]) / k, cl_acc=float(out["cl_acc"]) / k)
        return out["loss"], figures

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        n = max(1.0, sums["steps"])  # steps x ranks
        out = {"loss": sums["loss"] / n, "videos": sums["videos"]}
        if sums.get("predicted", 0.0) > 0:
            out["mask_loss"] = sums["mask_ce"] / sums["predicted"]
            out["mask_acc"] = sums["correct"] / sums["predicted"]
        if sums.get("cl_loss") or sums.get("cl_acc"):
            out["cl_loss"] = sums["cl_loss"] / n
            out["cl_acc"] = sums["cl_acc"] / n
        return out


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
               device: torch.device, amp: bool, grad_clip: float, n_codes: int | None = None) -> StepStats:
    """One optimizer step of the pretraining objective over k micro-batches (gradient
    accumulation; under DDP the gradient all-reduce happens only on the last micro-step, the
    obvious win over the authors' code, DESIGN.md)."""
    figures, grad_norm = optimizer_step(model, optimizer, micro_batches, MaskedTokenObjective(n_codes), device=device,
                                        amp=amp, grad_clip=grad_clip)
    return StepStats(loss=figures.get("loss", 0.0), grad_norm=grad_norm, videos=sum(int(b["tokens"].shape[0]) for b in micro_batches),
                     mask_ce_sum=figures.get("mask_ce", 0.0), mask_correct=figures.get("correct", 0.0),
                     n_predicted=figures.get("predicted", 0.0), cl_loss=figures.get("cl_loss", 0.0),
                     cl_acc=figures.get("cl_acc", 0.0), target_counts=figures.get("target_counts"))


class _PretrainRunObjective(MaskedTokenObjective):
    """The objective inside a pretraining run: target counts carried over steps and resumes,
    throughput figures, validation every `validation.every` steps."""

    def __init__(self, n_codes: int, *, is_main: bool, device: torch.device, tokens_per_video: int, flops_step: float,
                 peak: float | None, world: int, every: int, end_step: int, validate, reporter: Reporter):
        super().__init__(n_codes)
        self.target_counts = torch.zeros(n_codes, dtype=torch.long)
        self.is_main, self.device, self.world = is_main, device, world
        self.tokens_per_video, self.flops_step, self.peak = tokens_per_video, flops_step, peak
        self.every, self.end_step, self.validate, self.reporter = every, end_step, validate, reporter

    def step(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
             device: torch.device, amp: bool, grad_clip: float) -> tuple[dict, float]:
        # Through the module's `train_step`, the public one-step function that tools and tests wrap.
        stats = train_step(net, optimizer, micro_batches, device=device, amp=amp, grad_clip=grad_clip, n_codes=self.n_codes)
        return stats.figures(), stats.grad_norm

    def global_counts(self) -> torch.Tensor:
        """Every rank's targets so far (a collective)."""
        return D.all_reduce_sum(self.target_counts.to(self.device)).cpu()

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        out = super().summarise(sums, base)
        out["tokens_per_s"] = base["videos_per_s"] * self.tokens_per_video
        if self.peak:
            out["mfu"] = base["videos_per_s"] * self.flops_step / (self.peak * self.world)
        return out

    def after_step(self, step: int, figures: dict) -> None:
        if figures.get("target_counts") is not None:
            self.target_counts += figures["target_counts"].cpu()

    def periodic(self, step: int) -> None:
        if self.every and step % self.every == 0 and step < self.end_step:
            values = self.validate()
            if self.is_main:
                self.reporter.metrics(values, step=step)

    def state(self) -> dict:
        return {"target_counts": self.global_counts()}

    def load_state(self, ckpt: dict, is_main: bool) -> None:
        if is_main:  # the saved counts are global: rank 0 carries them on, the others restart at zero
            self.target_counts = ckpt["target_counts"].clone()


def _fingerprint(shards: list[TokenShard]) -> str:
    return hashlib.sha256("\n".join(sorted(s.path for s in shards)).encode()).hexdigest()


def _frame_size(root: DataRoot, shards: list[TokenShard]) -> int:
    rows = Catalog(root).rows(
        "SELECT DISTINCT size FROM token_samples WHERE shard IN (SELECT unnest(?::VARCHAR[]))", [[s.path for s in shards]]
    )
    return int(rows[0][0]) if rows else shards[0].grid[0]


def model_config(cfg: PretrainConfig, n_codes: int, grid: int) -> PretrainModelConfig:
    """The preset, with vocabulary and positional tables fitted to the tokens (Table 3: the
    vocabulary is the tokenizer's)."""
    backbone = BACKBONES[cfg.model.preset]()
    backbone.n_codes, backbone.frames, backbone.grid = n_codes, cfg.data.frames, grid
    backbone.dropout, backbone.norm = cfg.model.dropout, cfg.model.norm
    m = cfg.model
    if m.layers is not None:
        backbone.n_layers = m.layers
    if m.dim is not None or m.heads is not None:
        # Table 6's sizes keep BERT's 64-d heads and 4x MLP unless told otherwise.
        backbone.dim = m.dim or backbone.dim
        backbone.n_heads = m.heads or max(1, backbone.dim // 64)
        backbone.head_dim = backbone.dim // backbone.n_heads
        backbone.mlp_dim = 4 * backbone.dim
    if m.mlp_dim is not None:
        backbone.mlp_dim = m.mlp_dim
    if cfg.model.layout:
        backbone.layout = cfg.model.layout
    try:
        backbone.__post_init__()
        return PretrainModelConfig(backbone=backbone, objective=cfg.model.objective, alpha=cfg.model.alpha,
                                   temperature=cfg.model.temperature, cl_hidden=cfg.model.cl_hidden,
                                   cl_layers=cfg.model.cl_layers, cl_dim=cfg.model.cl_dim, cl_input=cfg.model.cl_input)
    except ValueError as e:
        raise ConfigError(f"pretrain model: {e}") from None


def run_name(cfg: PretrainConfig, frame_size: int) -> str:
    """The recipe in a name: preset-TxS-objective, e.g. small-5x128-mp+cl."""
    preset = cfg.model.preset
    if any(v is not None for v in (cfg.model.layers, cfg.model.dim, cfg.model.heads, cfg.model.mlp_dim)):
        size = model_config(cfg, 8, 1).backbone  # the shape only: vocabulary and grid do not enter the name
        preset = f"{preset}.{size.n_layers}L{size.dim}"
    name = f"{preset}-{cfg.data.frames}x{frame_size}-{cfg.model.objective}"
    if cfg.model.layout and cfg.model.layout.replace(" ", "") != "T,H|W":
        name += f"-{cfg.model.layout.replace(',', '.').replace('|', '')}"
    if cfg.masking.strategy != "block":
        name += f"-{cfg.masking.strategy}"
    m = cfg.model
    if m.cl_input and m.objective != "mp" and m.cl_input != default_cl_input(m.objective):
        name += f"-cl{m.cl_input}"  # Table 12's non-default rows
    return name


def continued_name(source_name: str, frames: int, frame_size: int) -> str:
    """A continued phase's recipe: the source's name with the new resolution after its own,
    e.g. large_half-5x128-mp+cl -> large_half-5x128+5x256-mp+cl."""
    head, sep, tail = source_name.partition("-")
    resolution, sep2, rest = tail.partition("-")
    if not sep or not sep2:
        return f"{source_name}+{frames}x{frame_size}"
    return f"{head}-{resolution}+{frames}x{frame_size}-{rest}"


def resolve_tokenizer_identity(root: DataRoot, datasets: list[str], ref: str) -> str:
    """Which token shards to train on, as recorded in token_samples.tokenizer. models:/NAME/latest
    (or models:/NAME) means the newest version of NAME that tokenized these datasets; empty means
    the only tokenizer there is (the data loader names the candidates if there are several)."""
    if not ref.startswith("models:/"):
        return ref
    name, _, version = ref[len("models:/"):].partition("/")
    if version not in ("", "latest"):
        return ref
    rows = Catalog(root).rows(
        "SELECT DISTINCT tokenizer FROM token_samples WHERE dataset IN (SELECT unnest(?::VARCHAR[])) AND tokenizer LIKE ?",
        [list(datasets), f"models:/{name}/%"],
    )
    versions = [(int(v), t) for (t,) in rows if (v := t.rsplit("/", 1)[-1]).isdigit()]
    if not versions:
        raise ConfigError(f"no token shards of {', '.join(datasets)} were made by a version of {name!r}")
    return max(versions)[1]


def _read_checkpoint(path: str | Path) -> dict:
    return read_checkpoint(path, FORMAT, "pretrain")


def load_pretrained(path: str | Path, ckpt: dict | None = None) -> tuple[VIMPACPretrainer, dict]:
    """A finished (or resumable) pretrain checkpoint as a model on CPU, plus its metadata
    (`ckpt`: the checkpoint already read from `path`)."""
    ckpt = ckpt if ckpt is not None else _read_checkpoint(Path(path))
    try:
        model = VIMPACPretrainer(PretrainModelConfig.from_dict(dict(ckpt["model_config"])))
        model.load_state_dict(strip_prefixes(ckpt["model"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"pretrain checkpoint {path} does not match its model config: {type(e).__name__}: {e}") from e
    return model.eval(), dict(ckpt.get("metadata") or {})


def _init_from(model: VIMPACPretrainer, path: str, reporter: Reporter, ckpt: dict | None = None) -> None:
    """Continue from another run's weights at a new T or S (the paper's 128 -> 256 phase)."""
    try:
        source, _ = load_pretrained(path, ckpt)
    except ValueError as e:
        raise ConfigError(f"train.init_from: {e}") from None
    state = source.state_dict()
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    try:
        load_state_resized(model.backbone, backbone)
        heads = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        missing = model.load_state_dict({**{f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}, **heads},
                                        strict=False)
    except ValueError as e:
        raise ConfigError(f"train.init_from {path}: {e}") from None
    reporter.info(f"initialised from {path} (positional tables interpolated to {model.config.backbone.frames} frames x "
                  f"{model.config.backbone.grid}^2 tokens); heads not taken over: {missing.missing_keys or 'none'}")


@dataclass
class _Phase:
    """Where a continued run picks up its source's schedule (the paper's last 10 of 100 epochs
    at 256 px, Sec. 4.1): the source's step, schedule length and warm-up."""

    source: str
    run_key: str
    run_name: str
    step: int
    total_steps: int
    warmup: int


def _continue_from(model: VIMPACPretrainer, path: str, reporter: Reporter) -> tuple[_Phase, dict]:
    """Load the weights of a run that stopped early in its schedule (positional tables
    interpolated) and return where its schedule stands and its optimizer state, which
    `_carry_moments` gives to the new optimizer (built after this: resizing replaces the tables)."""
    source = Path(path)
    source = source / "final.pt" if source.is_dir() else source
    try:
        ckpt = _read_checkpoint(source)
    except ValueError as e:
        raise ConfigError(f"train.continue_from: {e}") from None
    schedule, meta = ckpt.get("schedule"), dict(ckpt.get("metadata") or {})
    if ckpt.get("kind") != "final" or not schedule or "optimizer" not in ckpt:
        raise ConfigError(f"train.continue_from {path}: not the end of a pretraining phase (a finished run trained with "
                          "train.schedule_epochs longer than train.epochs keeps its optimizer and schedule for this)")
    if schedule["step"] >= schedule["total_steps"]:
        raise ConfigError(f"train.continue_from {path}: its schedule is already complete ({schedule['step']} of "
                          f"{schedule['total_steps']} steps)")
    _init_from(model, str(source), reporter, ckpt)
    phase = _Phase(str(source), meta.get("run_key", ""), meta.get("run_name", source.parent.name), int(schedule["step"]),
                   int(schedule["total_steps"]), int(schedule["warmup"]))
    return phase, ckpt["optimizer"]


def _carry_moments(optimizer: torch.optim.Optimizer, saved: dict, phase: _Phase, reporter: Reporter) -> None:
    """Adam's moments of the source run for every parameter whose shape did not change; the
    resized positional tables start with fresh moments (there is no meaningful way to resize them)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    n_saved = sum(len(g["params"]) for g in saved["param_groups"])
    if n_saved != len(params):
        raise ConfigError(f"train.continue_from {phase.source}: the model has {len(params)} parameter tensors, the source "
                          f"run {n_saved}; a continued phase keeps the model and changes only T and S")
    kept = {i: state for i, p in enumerate(params)
            if (state := saved["state"].get(i)) is not None and state["exp_avg"].shape == p.shape}
    optimizer.load_state_dict({"state": kept, "param_groups": optimizer.state_dict()["param_groups"]})
    reporter.info(f"continuing {phase.run_name} at step {phase.step} of its {phase.total_steps}-step schedule; Adam moments "
                  f"kept for {len(kept)} parameter tensors, {len(params) - len(kept)} start fresh (resized)")


@dataclass
class _Validation:
    """What the run is validated on: shards to read, and which of their videos."""

    description: str
    shards: list[TokenShard]
    only: frozenset[str] | None  # read only these videos (held-out ones)
    exclude: frozenset[str]  # the training loader leaves these out


def validation_set(root: DataRoot, shards: list[TokenShard], cfg: PretrainConfig) -> _Validation:
    """The validation videos (Tables 6, 8-16 report Mask-Accu. and CL-Loss on videos the model
    never trained on): another dataset's token shards, or videos held out of the corpus."""
    v = cfg.validation
    if v.datasets:
        try:
            val = token_shards(root, v.datasets, shards[0].tokenizer)
        except ValueError as e:
            raise ConfigError(f"validation.datasets: {e}") from None
        if {tuple(s.grid) for s in val} != {tuple(shards[0].grid)} or val[0].codebook_size != shards[0].codebook_size:
            raise ConfigError(f"validation.datasets: token grid {val[0].grid} x {val[0].codebook_size} codes differs from the "
                              f"training tokens' {shards[0].grid} x {shards[0].codebook_size}")
        return _Validation(f"{sum(s.n_samples for s in val)} videos of {', '.join(v.datasets)}", val, None, frozenset())
    held = holdout_videos(root, shards, v.holdout, cfg.train.seed)
    if not held:
        return _Validation("fresh clips of the training videos (none held out)", shards, None, frozenset())
    keys, paths = frozenset(held), set(held.values())
    return _Validation(f"{len(keys)} videos held out of training ({v.holdout:g} of the corpus)",
                       [s for s in shards if s.path in paths], keys, keys)


def split_eval_videos(root: DataRoot, shards: list[TokenShard], split: str) -> dict[str, tuple[str, frozenset[str]]]:
    """Per labeled dataset of `shards`: the split as resolved ("auto" -> "1") and the "dataset/key"
    samples of its evaluation videos in it, which pretraining leaves out (`data.exclude_split`).
    Matched by video id, so a video is left out whichever view variant the pretraining shards
    hold. ConfigError when no shard is of a labeled dataset: the setting would protect nothing."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    catalog = Catalog(root)
    labeled = {d for (d,) in catalog.rows("SELECT dataset FROM datasets WHERE len(classes) >= 2")}
    for dataset in sorted({s.dataset for s in shards} & labeled):
        selection = select_split(root, dataset, split, shards[0].tokenizer)
        ids = [v.video_id for v in selection.eval]
        paths = [s.path for s in shards if s.dataset == dataset]
        rows = catalog.rows(
            "SELECT DISTINCT key FROM token_samples WHERE dataset = ? AND status = 'ok' "
            "AND list_contains(?, video_id) AND list_contains(?, shard)", [dataset, ids, paths])
        out[dataset] = selection.base, frozenset(f"{dataset}/{k}" for (k,) in rows)
    if not out:
        raise ConfigError(f"data.exclude_split={split!r}: none of the pretraining datasets "
                          f"({', '.join(sorted({s.dataset for s in shards}))}) is labeled, so no evaluation videos can be "
                          "left out; remove the setting")
    return out


def pretrain(root: DataRoot, datasets: list[str], cfg: PretrainConfig, *, reporter: Reporter | None = None,
             force: bool = False, max_steps: int | None = None) -> PretrainResult:
    """Pretrain (or resume, or find finished) a VIMPAC model on these datasets' token shards.

    `max_steps` stops early without finishing the run (tests and time-boxed jobs); the resume
    checkpoint then holds the position and a later call continues.
    """
    reporter = reporter or Reporter()
    if not datasets:
        raise ConfigError("pretrain needs at least one dataset")
    info = D.setup(cfg.train.device)
    try:
        result = _pretrain(root, datasets, cfg, reporter, force, max_steps, info)
    except BaseException:
        D.teardown(info, clean=False)
        raise
    D.teardown(info)
    return result


@dataclass
class PretrainRun(KeyedRun):
    """Which training run a config and the committed token shards make: its key and folder."""

    tokenizer: str
    shards: list[TokenShard]


def pretrain_run(root: DataRoot, datasets: list[str], cfg: PretrainConfig, world_size: int | None = None) -> PretrainRun:
    """The run key `pretrain` would use (code version, config, token shards, tokenizer, world
    size), read-only: no training, nothing written. `world_size` defaults to torchrun's
    WORLD_SIZE (1 without torchrun). ConfigError when the token shards do not form a corpus."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        shards = token_shards(root, datasets, cfg.tokenizer or None, cfg.data.size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tokenizer = shards[0].tokenizer
    fingerprint = _fingerprint(shards)
    key_blob = json.dumps([CODE_VERSION, config_hash(cfg), fingerprint, tokenizer, world_size], separators=(",", ":"))
    run_key = hashlib.sha256(key_blob.encode()).hexdigest()[:16]
    return PretrainRun(run_key=run_key, data_fingerprint=fingerprint, run_dir=root.home / "checkpoints" / "pretrain" / run_key,
                       tokenizer=tokenizer, shards=shards)


def _pretrain(root: DataRoot, datasets: list[str], cfg: PretrainConfig, reporter: Reporter, force: bool,
              max_steps: int | None, info: D.DistInfo) -> PretrainResult:
    planned = pretrain_run(root, datasets, cfg, info.world_size)
    shards, tokenizer, fingerprint, run_key = planned.shards, planned.tokenizer, planned.data_fingerprint, planned.run_key
    n_codes, grid = shards[0].codebook_size, shards[0].grid
    if grid[0] != grid[1]:
        raise ConfigError(f"token grids must be square for the factorized positional tables, got {grid[0]}x{grid[1]}")
    size = _frame_size(root, shards)
    mcfg = model_config(cfg, n_codes, grid[0])
    bcfg = mcfg.backbone
    name = run_name(cfg, size)
    run_dir = planned.run_dir
    final, last = planned.final, planned.last
    if force and info.is_main:
        final.unlink(missing_ok=True)
        last.unlink(missing_ok=True)
    D.barrier()
    if final.exists():
        ckpt = _read_checkpoint(final)
        meta = ckpt["metadata"]
        reporter.info(f"pretrain {name} ({run_key}) already finished: {final}")
        return PretrainResult(final, run_key, meta["run_name"], int(meta["steps"]), dict(meta["metrics"]), True, tokenizer,
                              list(datasets), fingerprint, dict(ckpt["model_config"]))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for partial in run_dir.glob(".*.partial"):  # a checkpoint write cut short by a kill
            partial.unlink(missing_ok=True)

    world, device = info.world_size, info.device
    validation = validation_set(root, shards, cfg)
    left_out = split_eval_videos(root, shards, cfg.data.exclude_split) if cfg.data.exclude_split else {}
    train_exclude = validation.exclude.union(*(keys for _, keys in left_out.values()))
    for dataset, (split, keys) in left_out.items():
        reporter.info(f"pretrain: the {len(keys)} evaluation videos of {dataset} split {split} are left out of pretraining "
                      "(data.exclude_split)")
    n_videos = sum(s.n_samples for s in shards) - len(train_exclude)
    videos_per_epoch = cfg.train.videos_per_epoch or n_videos
    batches_per_epoch = max(1, math.ceil(videos_per_epoch / (cfg.train.batch_size * world)))
    k = cfg.train.accumulate
    # The learning-rate schedule may be longer than this run: a first phase stops early (schedule_epochs),
    # a continued phase takes its source's schedule and step (train.continue_from).
    total_steps = max(1, math.ceil((cfg.train.schedule_epochs or cfg.train.epochs) * batches_per_epoch / k))
    warmup = int(cfg.train.warmup * total_steps) if cfg.train.warmup < 1 else int(cfg.train.warmup)
    run_steps = max(1, math.ceil(cfg.train.epochs * batches_per_epoch / k))
    n_blocks = cfg.masking.n_blocks or blocks_for_ratio(cfg.data.frames, grid[0], grid[1], cfg.masking.ratio,
                                                         tube=cfg.masking.strategy == "tube")
    amp = cfg.train.amp and device.type == "cuda"

    transform = functools.partial(
        mask_batch, strategy=cfg.masking.strategy, n_blocks=n_blocks, ratio=cfg.masking.ratio,
        replacement=cfg.masking.replacement, pad_id=bcfg.pad_id, mask_id=bcfg.mask_id, n_codes=n_codes,
        enabled=mcfg.masks_inputs,
    )
    sampling = ClipSampling(n_frames=cfg.data.frames, max_distance_s=cfg.data.max_distance_s, view=cfg.data.view)

    def loader(batches: int, seed: int) -> ClipLoader:
        return ClipLoader(root, shards, sampling, batch_size=cfg.train.batch_size, batches_per_epoch=batches,
                          pad_id=bcfg.pad_id, seed=seed, rank=info.rank, world_size=world, num_workers=cfg.data.workers,
                          shuffle_buffer=cfg.data.shuffle_buffer, transform=transform, pin_memory=device.type == "cuda",
                          exclude=train_exclude)

    def validate() -> dict[str, float]:
        """Fresh clips and masks of the validation videos (the same ones at every validation)."""
        val_loader = ClipLoader(root, validation.shards, sampling, batch_size=cfg.train.batch_size,
                                batches_per_epoch=cfg.train.eval_batches, pad_id=bcfg.pad_id, seed=cfg.train.seed + 1,
                                rank=info.rank, world_size=world, num_workers=0, shuffle_buffer=cfg.data.shuffle_buffer,
                                transform=transform, only=validation.only)
        values = evaluate(model, val_loader, device, amp, objective.global_counts(), n_codes)
        model.train()
        return values

    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = VIMPACPretrainer(mcfg)
    if cfg.train.init_from:
        _init_from(model, cfg.train.init_from, reporter)
    phase = None
    if cfg.train.continue_from:
        phase, saved_optimizer = _continue_from(model, cfg.train.continue_from, reporter)
        total_steps, warmup = phase.total_steps, phase.warmup
        name = continued_name(phase.run_name, cfg.data.frames, size)
    model.to(device)
    optimizer = adamw(model, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), weight_decay=cfg.train.weight_decay,
                      device=device)
    if phase is not None:
        _carry_moments(optimizer, saved_optimizer, phase, reporter)
    first_step = phase.step if phase else 0
    end_step = min(total_steps, first_step + run_steps)
    scheduler = schedule(optimizer, first_step=first_step, warmup=warmup, total=total_steps)
    objective = _PretrainRunObjective(
        n_codes, is_main=info.is_main, device=device, tokens_per_video=2 * cfg.data.frames * grid[0] * grid[1],
        flops_step=3 * 2 * flops_per_clip(bcfg, cfg.data.frames, grid[0], grid[1]),  # per video: two clips, fwd + bwd
        peak=peak_flops(device), world=world, every=cfg.validation.every, end_step=end_step, validate=validate,
        reporter=reporter)
    engine = Engine(model, optimizer, scheduler, objective, info=info, reporter=reporter, amp=amp, grad_clip=cfg.train.grad_clip,
                    accumulate=k, last=last, what="pretrain", log_every=cfg.train.log_every,
                    checkpoint_every=cfg.train.checkpoint_every, batches_per_epoch=batches_per_epoch,
                    checkpoint_header={"format": FORMAT, "code_version": CODE_VERSION, "run_key": run_key,
                                       "model_config": mcfg.to_dict(), "config": cfg.model_dump(mode="json")})
    engine.step = first_step
    if engine.resume():
        reporter.info(f"resuming {name} ({run_key}) at step {engine.step}/{end_step} (epoch {engine.epoch}, batch {engine.consumed})")
    else:
        reporter.info(
            f"pretraining {name} ({run_key}): {model.backbone.num_params() / 1e6:.1f}M backbone + "
            f"{model.head_params() / 1e6:.2f}M heads on {device} x {world}; {n_videos} videos in {len(shards)} shards "
            f"of {', '.join(datasets)}; steps {first_step}-{end_step} of a {total_steps}-step schedule of "
            f"{cfg.train.batch_size}x{world}x{k} videos; "
            f"{n_blocks} mask blocks for {cfg.data.frames}x{grid[0]}x{grid[1]} tokens; validation on {validation.description}"
        )
    if cfg.train.compile:
        compile_layers(model.backbone.layers)

    def epochs(epoch: int, skip: int):
        return loader(batches_per_epoch, cfg.train.seed).epoch(epoch, skip_batches=skip)

    stop_at = end_step if max_steps is None else min(end_step, first_step + max_steps)
    step = engine.run(first_step=first_step, end_step=end_step, stop_at=stop_at, epochs=epochs, label=f"pretrain {name}")
    if step < end_step:
        reporter.info(f"pretrain {name} stopped at step {step}/{end_step}; run again to continue")
        return PretrainResult(last, run_key, name, step, dict(engine.last_values), False, tokenizer,
                              list(datasets), fingerprint, mcfg.to_dict())

    evaluation = validate()
    metrics = {**engine.last_values, **evaluation}
    reporter.metrics({k_: v for k_, v in evaluation.items()}, step=step)
    if "eval_mask_acc" in evaluation:
        reporter.info(f"pretrain {name}: validation mask accuracy {evaluation['eval_mask_acc']:.3f} on "
                      f"{validation.description} vs most-frequent-token baseline {evaluation['eval_mask_acc_baseline']:.3f}")
    if "eval_cl_acc" in evaluation:
        reporter.info(f"pretrain {name}: contrastive accuracy {evaluation['eval_cl_acc']:.3f}")
    metadata = {"run_key": run_key, "run_name": name, "code_version": CODE_VERSION, "steps": step, "metrics": metrics,
                "datasets": list(datasets), "tokenizer": tokenizer, "data_fingerprint": fingerprint,
                "shards": [s.path for s in shards], "frame_size": size, "n_blocks": n_blocks, "world_size": world,
                "validation": {"on": validation.description, "videos": sorted(validation.only or [])},
                # Fine-tuning reads this to tell a backbone that saw a test set's videos (docs/learning.md).
                "excluded_eval_videos": {d: {"split": sp, "videos": len(k)} for d, (sp, k) in left_out.items()},
                "config": cfg.model_dump(mode="json")}
    if phase is not None:
        metadata["continued_from"] = {"checkpoint": phase.source, "run_key": phase.run_key, "run_name": phase.run_name,
                                      "step": phase.step}
    final_state = {"format": FORMAT, "kind": "final", "model": strip_prefixes(model.state_dict()),
                   "model_config": mcfg.to_dict(), "metadata": metadata}
    if step < total_steps:
        # A first phase: a usable backbone, plus what a continued phase needs to pick up the schedule.
        final_state["optimizer"] = optimizer.state_dict()
        final_state["schedule"] = {"step": step, "total_steps": total_steps, "warmup": warmup}
    if info.is_main:
        atomic_save(final_state, final)
        last.unlink(missing_ok=True)
    D.barrier()
    return PretrainResult(final, run_key, name, step, metrics, False, tokenizer, list(datasets), fingerprint, mcfg.to_dict())


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ClipLoader, device: torch.device, amp: bool, train_counts: torch.Tensor,
             n_codes: int) -> dict[str, float]:
    """Mask and contrastive accuracy on freshly sampled clips and masks, model in eval mode,
    next to the accuracy of always predicting the most frequent training target."""
    model.eval()
    most_frequent = int(train_counts.argmax()) if int(train_counts.sum()) else -1
    # correct, predicted, baseline hits, cl_acc, batches, mask CE sum, cl_loss,
    # copy hits, model hits where copying fails, positions where copying fails
    sums = torch.zeros(10, dtype=torch.float64, device=device)
    for batch in loader.epoch(0):
        b = to_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b["inputs"], b["tokens"], b["predict"], b["video_index"], b["pad"], return_hits=True)
        if "mask_correct" in out:
            sums[0] += float(out["mask_correct"])
            sums[1] += float(out["n_predicted"])
            sums[2] += float((b["tokens"][b["predict"]] == most_frequent).sum())
            sums[5] += float(out["mask_ce_sum"])
            # The copy-paste answer (Appendix, Table 8): what a model gets without learning motion or shape.
            clips = [x.transpose(0, 1).flatten(0, 1) for x in (b["tokens"], b["predict"], b["pad"])]  # (2B, T, H, W)
            guess, _ = copy_prediction(*clips)
            copied = (guess == clips[0])[clips[1]]  # (N,), ordered like mask_hits
            sums[7] += float(copied.sum())
            sums[8] += float((out["mask_hits"] & ~copied).sum())
            sums[9] += float((~copied).sum())
        if "cl_acc" in out:
            sums[3] += float(out["cl_acc"])
            sums[6] += float(out["cl_loss"])
        sums[4] += 1
    sums = D.all_reduce_sum(sums)
    out: dict[str, float] = {}
    if sums[1] > 0:
        out["eval_mask_acc"] = float(sums[0] / sums[1])
        out["eval_mask_loss"] = float(sums[5] / sums[1])
        out["eval_mask_acc_baseline"] = float(sums[2] / sums[1])
        out["eval_copy_acc"] = float(sums[7] / sums[1])
        if sums[9] > 0:
            out["eval_mask_acc_uncopyable"] = float(sums[8] / sums[9])
    if sums[3] > 0:
        out["eval_cl_acc"] = float(sums[3] / sums[4])
        out["eval_cl_loss"] = float(sums[6] / sums[4])
    return out
