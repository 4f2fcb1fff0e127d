"""Typed configuration: one pydantic model per stage, a pipeline model that names datasets,
named presets, `--set a.b=value` overrides, and YAML/TOML pipeline files.

Pydantic models are what Prefect renders as parameter forms, so every field carries a
description. Fields marked `operational(...)` change how a stage runs (parallelism, timeouts,
batch sizes) but not what it produces; they are left out of the cache key (DESIGN.md,
"Caching and reruns"), so raising `workers` never triggers recomputation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_OPERATIONAL = {"operational": True}


def operational(default: Any = ..., **kwargs: Any) -> Any:
    """A field that does not affect a stage's output and so stays out of its cache key."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}) | _OPERATIONAL
    return Field(default, json_schema_extra=extra, **kwargs)


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config file must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _default_workers() -> int:
    return max(1, min(8, 2 * (os.cpu_count() or 1)))


class IngestConfig(StrictModel):
    """Copy videos into the content-addressed raw store, hash and probe them."""

    batch_size: int = operational(16, ge=1, description="Videos per unit of work: one Parquet part, one Prefect task.")
    workers: int = operational(
        default_factory=_default_workers, ge=1, description="Batches processed concurrently (threads: ingest is I/O bound)."
    )
    max_bytes: int = Field(20 * 2**30, ge=1, description="Largest accepted video in bytes; bigger ones fail as too_large.")
    connect_timeout_s: float = operational(10.0, gt=0, description="HTTP connect timeout.")
    read_timeout_s: float = operational(30.0, gt=0, description="Longest stall between received bytes before a download fails.")
    total_timeout_s: float = operational(3600.0, gt=0, description="Deadline for one whole download.")
    retries: int = operational(3, ge=0, description="Extra attempts for transient download failures (5xx, timeouts).")
    backoff_s: float = operational(1.0, ge=0, description="First retry delay; doubles per attempt.")
    max_redirects: int = operational(5, ge=0, description="HTTP redirects followed before failing.")
    decode_check_frames: int = Field(2, ge=1, description="Frames decoded at probe time to prove a video is decodable.")
    extensions: list[str] = Field(
        default_factory=lambda: [".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ogv", ".ogg", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"],
        description="File endings treated as videos when scanning a directory.",
    )
    retry_failed: bool = operational(
        False, description="Also retry videos that failed permanently (404, corrupt file). Transient failures are always retried."
    )

    @field_validator("extensions")
    @classmethod
    def _lower_dotted(cls, v: list[str]) -> list[str]:
        return sorted({("." + e.lstrip(".")).lower() for e in v})


class FramesConfig(StrictModel):
    """Decode each video once, sample frames on its own timestamps, cut the paper's fixed views."""

    fps: float = Field(2.0, gt=0, description="Sampling rate in frames per second of video time (paper: 2 for long videos, 4 for short clips).")
    size: int = Field(128, ge=8, le=4096, description="S, the side of every view in pixels (paper: 128, then 256).")
    views: Literal["auto", "pretrain", "downstream"] = Field(
        "auto",
        description="pretrain: shorter side to S, center crop. downstream: 2 scales x 3 crops x flip (12 views, 6 if flip-sensitive). "
        "auto: downstream for labeled datasets, pretrain otherwise.",
    )
    encoding: Literal["jpg", "npy.zst"] = Field("jpg", description="How a view's frames are stored: one tall JPEG per view, or lossless zstd-compressed arrays.")
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality when encoding is jpg.")
    backend: Literal["auto", "decord", "pyav"] = Field("auto", description="Decoder: decord where it works, PyAV otherwise (auto).")
    workers: int = operational(default_factory=lambda: os.cpu_count() or 1, ge=1, description="Decoder processes (one decoder thread each); one shard per process.")
    shard_target_mb: float = operational(256.0, gt=0, description="Target size of a shard; decides how new videos are grouped.")
    max_videos_per_shard: int = operational(5000, ge=1, description="Upper bound on videos per shard.")
    decode_timeout_s: float = operational(300.0, gt=0, description="A video whose decoder shows no progress for this long is killed and marked failed.")
    contact_sheet_videos: int = operational(3, ge=0, description="Videos shown in the contact-sheet PNG logged to MLflow.")


class TokenizerConfig(StrictModel):
    """Train a VQ-VAE image tokenizer on frames sampled at random across a dataset's videos."""

    preset: Literal["tiny", "small", "base"] = Field(
        "base", description="VQ-VAE preset (models/vqvae.py): tiny for CPUs and the demo (FSQ, 512 codes), base = 8x / 8192 codes."
    )
    codebook_size: int | None = Field(None, ge=2, description="Override the preset's number of codes (learned-codebook presets only).")
    steps: int = Field(2000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Frames per step.")
    lr: float = Field(3e-4, gt=0, description="AdamW peak learning rate (linear warm-up, cosine decay).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warm-up steps.")
    view: str = Field("s100_c", description="Which stored view frames are drawn from (s100_c exists in every variant).")
    size: int | None = Field(None, ge=8, description="Frame size S of the frame shards to train on (default: frames.size).")
    shuffle_buffer: int = Field(2048, ge=1, description="Frames held for shuffling across videos.")
    seed: int = Field(0, description="Seed for sampling and initialisation.")
    holdout_videos: int = Field(
        4, ge=0, description="Videos of each training dataset kept out of training to evaluate on (chosen by a hash of "
        "the video id; at most a quarter of the dataset's videos, none below 4 videos)."
    )
    amp: bool = Field(True, description="bf16 autocast: on CUDA, and for training on a CPU with bf16 units (AMX or "
                      "AVX512-BF16; evaluation and tokenizing stay fp32 on a CPU).")
    device: str = operational("auto", description="auto, cpu, cuda or cuda:N.")
    checkpoint_every: int = operational(500, ge=1, description="Steps between checkpoints (resume point).")
    log_every: int = operational(50, ge=1, description="Steps between logged metrics.")
    datasets: list[str] | None = Field(
        None, description="Datasets whose frames train the tokenizer (default: the pipeline's unlabeled datasets, else all)."
    )
    register_as: str = operational("vimpac-tokenizer", description="MLflow registered model name.")


class TokenizeConfig(StrictModel):
    """Encode every stored view of every frame into VQ-VAE code indices."""

    tokenizer: str = Field(
        "",
        description="models:/NAME/VERSION (MLflow registry), a checkpoint path from the tokenizer stage, or "
        "dalle:/path/encoder.pt[,/path/decoder.pt]. Empty: the tokenizer trained by this pipeline for the dataset.",
    )
    size: int | None = Field(None, ge=8, description="Only frame shards of this size S (default: all).")
    variant: Literal["pretrain", "downstream"] | None = Field(None, description="Only frame shards of this variant (default: all).")
    batch_size: int = operational(256, ge=1, description="Frames encoded per forward pass.")
    device: str = operational("auto", description="auto, cpu, cuda or cuda:N.")
    amp: bool = operational(True, description="bf16 autocast on CUDA (ignored on CPU).")
    workers: int = operational(1, ge=1, description="Frame shards tokenized concurrently (the model is shared).")


class PretrainModel(StrictModel):
    """The backbone and heads (models/backbone.py, models/pretrain.py; paper Table 3, Table 13)."""

    preset: Literal["micro", "tiny", "small", "base", "large_half"] = Field(
        "small", description="Backbone preset: small 29.4M / base 119.7M / large_half 210.1M (Table 3); tiny and micro for CPU."
    )
    layout: str | None = Field(None, description="Attention layout override: T,H|W (paper), TxHxW, T,HxW or T,H,W (Table 13).")
    # Table 6's model sizes on top of a preset: 6 x 768 (63.0M) and 12 x 512 (54.7M) between small
    # and base. Heads default to dim / 64 (64-d heads as in BERT) and the MLP to 4 x dim.
    layers: int | None = Field(None, ge=1, description="Override the preset's number of layers (Table 6).")
    dim: int | None = Field(None, ge=8, description="Override the preset's hidden size (Table 6); heads and MLP follow unless set.")
    heads: int | None = Field(None, ge=1, description="Override the number of attention heads (default with model.dim: dim / 64).")
    mlp_dim: int | None = Field(None, ge=1, description="Override the MLP width (default with model.dim: 4 x dim).")
    norm: Literal["post", "pre"] = Field("post", description="LayerNorm position (Table 13: post-LN is better here).")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on attention probabilities and residual branches.")
    objective: Literal["mp+cl", "mp", "cl"] = Field(
        "mp+cl", description="mp+cl: mask-then-predict + contrastive (paper); mp: mask only; cl: contrastive only (Table 7)."
    )
    alpha: float = Field(1.0, ge=0, description="Contrastive loss weight alpha in L = L_mask + alpha*gamma*L_cl (eq. 6, Table 16).")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature gamma (eq. 4).")
    cl_layers: int = Field(2, ge=1, description="Contrastive head MLP layers (paper: 2 for small, 3 for large-half).")
    cl_hidden: int = Field(2048, ge=1, description="Contrastive head hidden width (paper: 2048 small, 4096 large-half).")
    cl_dim: int = Field(256, ge=1, description="Contrastive feature size.")
    cl_input: Literal["masked", "unmasked"] | None = Field(
        None, description="Clips the contrastive head sees (Table 12): masked, the mask-then-predict inputs in one shared "
        "forward (Sec. 3.3), or unmasked, a second forward of the intact clips. Default: the paper's, masked with mp+cl "
        "(Table 12: 69.4 vs 67.4 on UCF101), unmasked with cl alone (57.1 vs 55.5).",
    )


class PretrainMasking(StrictModel):
    """How tokens are masked for mask-then-predict (Sec. 3.1, Appendix B.1, Tables 2, 8, 15)."""

    strategy: Literal["block", "iid", "tube"] = Field(
        "block", description="block: union of random cuboids (paper); iid: independent tokens (Table 8); tube: random "
        "rectangles masked in every frame (VideoMAE), so no masked token can be copied from another frame.",
    )
    n_blocks: int | None = Field(None, ge=1, description="Cuboids per clip; default: the count whose induced ratio is closest to `ratio` (Table 2).")
    ratio: float = Field(0.15, gt=0, lt=1, description="Target masking ratio (block: picks n_blocks; iid: the probability).")
    replacement: Literal["mask", "bert"] = Field("mask", description="mask: every masked token becomes [MASK]; bert: 80/10/10.")


class PretrainData(StrictModel):
    """What a training example is: two clips of one video (Sec. 3.2)."""

    frames: int = Field(5, ge=1, description="T, frames per clip (paper: 5 in both pretraining phases, 128 then 256 px; fine-tuning uses 10).")
    size: int | None = Field(None, ge=8, description="Frame size S of the token shards to train on (default: the only one there is; "
                             "the paper's second phase trains on the 256 px shards).")
    max_distance_s: float | None = Field(None, ge=0, description="d_max: largest distance between the two clips in seconds (Table 10; "
                                         "0: the same clip twice, differently masked); none by default.")
    view: str = Field("s100_c", description="Stored view the clips come from (pretraining: resize + center crop, no augmentation).")
    exclude_split: str | None = Field(
        None, description="Labeled datasets among the pretraining datasets: leave out the evaluation videos of this split "
        "(1, 2, 3 or TRAIN:EVAL, as fine-tuning names it), so pretraining on a downstream dataset's own videos without "
        "labels (VideoMAE's protocol) never sees the videos it is tested on. Unlabeled datasets are used whole.",
    )
    shuffle_buffer: int = Field(256, ge=1, description="Videos held for shuffling per loader worker.")
    workers: int = operational(2, ge=0, description="Data-loader worker processes per rank (masks are made there).")

    @field_validator("exclude_split", mode="before")
    @classmethod
    def _split_as_text(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v  # `exclude_split: 1` in YAML or --set means split set 1


class PretrainTrain(StrictModel):
    """Optimisation (Appendix C, Table 4): AdamW, linear warm-up then linear decay, clipping, accumulation."""

    epochs: float = Field(10, gt=0, description="Passes over the videos (an epoch = videos_per_epoch videos).")
    videos_per_epoch: int | None = Field(None, ge=1, description="Videos per epoch (default: the number of videos in the token shards).")
    batch_size: int = Field(32, ge=1, description="Videos per micro-batch per rank; also the contrastive batch (x ranks).")
    accumulate: int = Field(1, ge=1, description="Micro-batches per optimizer step (effective batch = batch_size x ranks x accumulate; paper: 1024).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (paper tries 1e-3, 5e-4, 3e-4 ... until stable).")
    warmup: float = Field(0.05, ge=0, description="Warm-up length: a fraction of all steps if < 1, else a number of steps.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none on biases, norms, [CLS]).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.98, gt=0, lt=1, description="AdamW beta2 (0.98 as BERT/RoBERTa for stability).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    seed: int = Field(0, ge=0, description="Seed for initialisation, clip sampling and masks.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (CPU trains in fp32).")
    compile: bool = operational(False, description="torch.compile the backbone.")
    device: str = operational("auto", description="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU).")
    log_every: int = operational(10, ge=1, description="Optimizer steps between logged metrics.")
    checkpoint_every: int = operational(200, ge=1, description="Optimizer steps between resume checkpoints.")
    eval_batches: int = Field(4, ge=1, description="Batches of fresh clips and masks per validation (see `validation`).")
    init_from: str | None = Field(
        None, description="Start from this pretrain checkpoint's weights (positional tables interpolated) with a new "
        "optimizer and schedule. To continue a schedule (the paper's 256 px phase) use continue_from.",
    )
    schedule_epochs: float | None = Field(
        None, gt=0, description="Length of the learning-rate schedule in epochs when this run is one phase of a longer one "
        "(default: epochs). The paper's 100-epoch schedule is 90 epochs at 128 px, then 10 at 256 px (Sec. 4.1).",
    )
    continue_from: str | None = Field(
        None, description="Continue this pretrain run's schedule (a run that stopped early with schedule_epochs > epochs): its "
        "weights (positional tables interpolated to the new T and S), its Adam moments for every parameter whose shape did "
        "not change, and the learning rate where it stopped. Give the run's folder or final.pt.",
    )

    @model_validator(mode="after")
    def _one_phase_source(self) -> "PretrainTrain":
        if self.init_from and self.continue_from:
            raise ValueError("train.init_from starts a new schedule and train.continue_from continues one: set only one")
        if self.schedule_epochs is not None and self.schedule_epochs < self.epochs:
            raise ValueError(f"train.schedule_epochs ({self.schedule_epochs}) is shorter than train.epochs ({self.epochs})")
        return self


class PretrainValidation(StrictModel):
    """Where the run's mask accuracy, mask loss and contrastive loss/accuracy are measured: the
    paper's Mask-Accu. and CL-Loss columns (Tables 6, 8-16) are measured on UCF101's validation
    videos while pretraining on HowTo100M, never on training videos."""

    datasets: list[str] | None = Field(
        None, description="Datasets whose token shards validate the run (the paper: ucf101), read with the training "
        "tokenizer; default: videos of the pretraining datasets held out from training (`holdout`).",
    )
    holdout: float = Field(
        0.05, ge=0, lt=0.5, description="Fraction of the pretraining videos kept out of training to validate on when "
        "`datasets` is not set (whole videos, chosen by a hash of train.seed and the video; at least one, if the corpus has "
        "two or more). 0: validate on fresh clips of the training videos.",
    )
    every: int = operational(0, ge=0, description="Optimizer steps between validations during training (0: at the end only).")


class PretrainConfig(StrictModel):
    """VIMPAC pretraining: masked-token prediction + contrastive learning over token shards."""

    model: PretrainModel = Field(default_factory=PretrainModel)
    masking: PretrainMasking = Field(default_factory=PretrainMasking)
    data: PretrainData = Field(default_factory=PretrainData)
    train: PretrainTrain = Field(default_factory=PretrainTrain)
    validation: PretrainValidation = Field(default_factory=PretrainValidation)
    tokenizer: str = Field(
        "", description="Which token shards: a tokenizer identity as in token_samples.tokenizer (models:/NAME/VERSION, "
        "models:/NAME/latest, ckpt:...). Empty: the only one there is.",
    )
    datasets: list[str] | None = Field(None, description="Datasets to pretrain on (default: the pipeline's unlabeled datasets).")
    register_as: str = operational("vimpac-backbone", description="MLflow registered model name for the final backbone.")


class PixelModel(StrictModel):
    """The ST-MAE (models/st_mae.py): a ViT over pixel tubelets with a light decoder (HVM-1, mae_st, VideoMAE)."""

    preset: Literal["micro", "tiny", "base", "large", "huge"] = Field(
        "base", description="Encoder preset: base B/16, large L/16, huge H/14 (HVM-1, 632M); tiny and micro for CPU.")
    masking: Literal["random", "tube"] = Field("random", description="random: any tubelets (mae_st); tube: the same spatial "
                                               "positions at every time step (VideoMAE).")
    mask_ratio: float = Field(0.9, ge=0, lt=1, description="Masked share of the tubelets (HVM-1: 0.9 at 224 px, 0.95 at 448).")
    pos_embed: Literal["learned", "sinusoid"] = Field(
        "learned", description="learned: separate spatial + temporal + [CLS] tables (mae_st, HVM-1); sinusoid: fixed (VideoMAE).")
    norm_pix_loss: bool = Field(False, description="Normalise each target tubelet by its mean and variance (MAE; HVM-1 runs it off).")


class PixelData(StrictModel):
    """Pixel clips from the frame shards (no new format): T frames of a stored view, random resized crop."""

    frames: int = Field(16, ge=1, description="Frames per clip (HVM-1: 16); a multiple of the tubelet length.")
    frame_step: int = Field(1, ge=1, description="Take every k-th stored frame (frame shards hold 2 or 4 FPS).")
    size: int | None = Field(None, ge=8, description="Frame size S of the frame shards (default: the only one there is).")
    view: str = Field("s100_c", description="Stored view the clips are cut from.")
    crop_scale: tuple[float, float] = Field((0.5, 1.0), description="Random resized crop: area range kept (HVM-1: 0.5-1).")
    repeat: int = Field(4, ge=1, description="Clips drawn per video read (repeat augmentation: mae_st 4, HVM-1 16).")
    shuffle_buffer: int = Field(64, ge=1, description="Videos held for shuffling.")
    holdout_videos: int = Field(4, ge=0, description="Videos per dataset kept out of training to validate on (hash order; at "
                                "most a quarter of a dataset).")

    @model_validator(mode="after")
    def _scale(self) -> "PixelData":
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        return self


class PixelTrain(StrictModel):
    """Optimisation: AdamW with a warm-up + half-cycle cosine (mae_st) or a constant rate (HVM-1)."""

    epochs: float = Field(10, gt=0, description="Passes over the training videos.")
    batch_size: int = Field(8, ge=1, description="Videos per micro-batch per rank (clips: x data.repeat).")
    accumulate: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float | None = Field(None, gt=0, description="Learning rate; default blr x clips per step / 256 (mae_st's rule).")
    blr: float = Field(1.6e-3, gt=0, description="Base learning rate for the default lr (mae_st: 1.6e-3).")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="cosine: linear warm-up then half-cycle cosine "
                                                    "(mae_st); constant (HVM-1).")
    warmup_epochs: float = Field(5, ge=0, description="Warm-up epochs of the cosine schedule (mae_st: 5).")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay (none on 1-D parameters: biases, norms; [CLS] and "
                                "positions decay, as in mae_st's pretraining, util/misc.add_weight_decay).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW beta2 (MAE: 0.95).")
    grad_clip: float = Field(0.02, gt=0, description="Gradient-norm clipping (mae_st: 0.02; HVM-1: 0.1).")
    seed: int = Field(0, ge=0, description="Seed for initialisation, clip sampling, crops and masks.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (CPU trains in fp32).")
    device: str = operational("auto", description="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU).")
    log_every: int = operational(10, ge=1, description="Optimizer steps between logged metrics.")
    checkpoint_every: int = operational(200, ge=1, description="Optimizer steps between resume checkpoints.")


class PixelPretrainConfig(StrictModel):
    """ST-MAE pretraining on pixels (HVM-1's method, seed 000) over the frame shards."""

    model: PixelModel = Field(default_factory=PixelModel)
    data: PixelData = Field(default_factory=PixelData)
    train: PixelTrain = Field(default_factory=PixelTrain)
    datasets: list[str] | None = Field(None, description="Datasets whose frame shards it trains on.")
    register_as: str = operational("vimpac-backbone-pixels", description="MLflow registered model name.")


class FinetuneModel(StrictModel):
    """The classifier on top of the backbone (App. A.2: a zero-initialised linear layer on [CLS]): a VIMPAC token
    backbone or an ST-MAE pixel encoder, whichever the model row names."""

    dropout: float = Field(0.1, ge=0, lt=1, description="Backbone dropout during fine-tuning (Table 4: 0.1). Token backbones "
                           "only: the ST-MAE encoder has none (mae_st fine-tunes it without).")
    drop_path: float = Field(
        0.0, ge=0, lt=1, description="Stochastic depth: each residual branch of block i of L is dropped per sample with "
        "probability drop_path x i / (L - 1) while training (mae_st/HVM-1 fine-tuning: 0.1, models_vit.py). Both families; "
        "0: off.",
    )
    head_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout before the last FC layer (Table 4: 0.0).")
    scratch_preset: Literal["micro", "tiny", "small", "base", "large_half"] = Field(
        "small", description="Backbone preset of the from-scratch baseline (no pretrained checkpoint)."
    )
    pool: Literal["cls", "mean"] = Field(
        "cls", description="Clip feature the head reads: the [CLS] output (paper) or the mean of the token states (MAE/VideoMAE)."
    )
    head_norm: Literal["batch", "none"] = Field(
        "batch", description="batch: a BatchNorm without affine parameters before the zero-initialised FC, so a backbone whose "
        "[CLS] barely varies between clips (from scratch, mask-only pretraining) still gets class gradients (docs/learning.md); "
        "none: the paper's bare FC.",
    )


class FinetuneData(StrictModel):
    """Fine-tuning input (App. C): a random temporal clip of a random stored view per video and step."""

    frames: int | None = Field(None, ge=1, description="T, frames per clip (default: the pretrained model's; the paper fine-tunes at 10). "
                               "For an ST-MAE, a multiple of its tubelet length; its temporal positions are interpolated.")
    size: int | None = Field(None, ge=8, description="Frame size S of the token shards to use, or of the frame shards for an "
                             "ST-MAE (default: the only one there is; pixel clips are resized to the encoder's size).")
    variant: Literal["downstream", "pretrain"] | None = Field(
        None, description="Token (or, for an ST-MAE, frame) shards of this frames variant (default: downstream if the dataset "
        "has it: 12 or 6 fixed views)."
    )
    shuffle_buffer: int = Field(256, ge=1, description="Videos held for shuffling per loader worker.")
    workers: int = operational(0, ge=0, description="Data-loader worker processes per rank.")


class FinetuneTrain(StrictModel):
    """Optimisation (Table 4, downstream columns): AdamW (0.9, 0.999), wd 0.01, warm-up 0.1, linear decay."""

    epochs: float = Field(50, gt=0, description="Passes over the training split (Table 4: SSv2 22, Diving48/UCF101/HMDB51 50, K400 30).")
    scratch_factor: float | None = Field(
        None, gt=0, description="Epoch multiplier of the from-scratch rows, `scratch` and `scratch-pixels` (default: 4 for "
        "datasets under 50k training videos, 1.5 above, as the paper following SlowFast does).",
    )
    batch_size: int = Field(128, ge=1, description="Videos per micro-batch per rank (Table 4: 128 in all).")
    accumulate: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default, Table 4: 1e-4 for small/base, 5e-5 for large-half).")
    warmup: float = Field(0.1, ge=0, description="Warm-up: a fraction of all steps if < 1, else a number of steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (none on biases, norms, [CLS], and an ST-MAE's "
                                "positions).")
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise learning-rate decay (ELECTRA/BEiT, mae_st util/lr_decay.py): block i of L "
        "learns at layer_decay^(L + 1 - i) x lr, the embeddings at layer_decay^(L + 1), the head at lr (HVM-1: 0.8). "
        "1: off, every parameter at lr.",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing of the cross-entropy: the target puts 1 - e on the label and e / C on "
        "every class (mae_st/HVM-1 fine-tuning: 0.1). 0: the plain cross-entropy.",
    )
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.999, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    seed: int = Field(0, ge=0, description="Seed for the classifier, clip/view sampling and dropout.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (CPU trains in fp32).")
    compile: bool = operational(False, description="torch.compile the backbone layers.")
    device: str = operational("auto", description="auto, cpu, cuda or cuda:N (under torchrun: the local rank's GPU).")
    log_every: int = operational(10, ge=1, description="Optimizer steps between logged metrics.")
    checkpoint_every: int = operational(200, ge=1, description="Optimizer steps between resume checkpoints.")


class EvalProtocol(StrictModel):
    """Multi-view testing (Sec. 4.1, App. C): n uniform temporal clips x 3 crops, softmax averaged."""

    clips: int = Field(10, ge=1, description="Uniformly spaced temporal clips per video (paper: 10; 2 in the analyses of Sec. F).")
    crops: Literal["auto", "three", "center"] = Field(
        "auto", description="three: top-left, center, bottom-right; center: center only; auto: center for flip-sensitive datasets."
    )
    batch_size: int = operational(64, ge=1, description="Clips per forward pass at evaluation.")


class FinetuneConfig(StrictModel):
    """Fine-tune a pretrained backbone (or train from scratch) on a labeled dataset, then evaluate it."""

    model: FinetuneModel = Field(default_factory=FinetuneModel)
    data: FinetuneData = Field(default_factory=FinetuneData)
    train: FinetuneTrain = Field(default_factory=FinetuneTrain)
    eval: EvalProtocol = Field(default_factory=EvalProtocol)
    tokenizer: str = Field(
        "", description="Token shards of this tokenizer (token_samples.tokenizer). Empty: the pretrained model's, or for "
        "scratch the only one the dataset has.",
    )


def _check_seeds(v: list[int] | None) -> list[int] | None:
    if v is not None:
        if not v:
            raise ValueError("seeds must list at least one seed (or be left out)")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        if any(x < 0 for x in v):
            raise ValueError(f"seeds must be >= 0, got {v}")
    return v


def _unique(v: list) -> list:
    if len(set(v)) != len(v):
        raise ValueError(f"listed more than once: {sorted({x for x in v if v.count(x) > 1})}")
    return v


def _short_models(v: Any) -> Any:
    """`- scratch` in a grid file means `- {ref: scratch}`."""
    return [{"ref": m} if isinstance(m, str) else m for m in v] if isinstance(v, list) else v


def _short_datasets(v: Any) -> Any:
    """`- ucf101` in a grid file means `- {name: ucf101}`."""
    return [{"name": d} if isinstance(d, str) else d for d in v] if isinstance(v, list) else v


SCRATCH_PIXELS = "scratch-pixels"


def scratch_pixels_preset(ref: str | None) -> str | None:
    """The pretrain-pixels preset a `scratch-pixels[:PRESET]` row names (bare: `default`), None
    for any other ref. The row is that preset's ST-MAE encoder, randomly initialised."""
    if ref == SCRATCH_PIXELS:
        return "default"
    if ref and ref.startswith(SCRATCH_PIXELS + ":"):
        return ref[len(SCRATCH_PIXELS) + 1:]
    return None


class GridModel(StrictModel):
    """One row of the results grid: a finished model, `scratch`, `scratch-pixels:PRESET`, or a pretraining recipe
    (VIMPAC on tokens, or ST-MAE on pixels) trained on demand."""

    ref: str | None = Field(None, description="models:/NAME/VERSION|latest (MLflow registry), a pretrain or pretrain-pixels "
                            "(ST-MAE) checkpoint path or run folder, `scratch` (the token backbone of the fine-tune config's "
                            "model.scratch_preset, randomly initialised) or `scratch-pixels:PRESET` (the ST-MAE encoder a "
                            "pretrain-pixels preset trains, e.g. tiny, randomly initialised; bare `scratch-pixels`: preset default). "
                            "Leave empty for a recipe (`pretrain:` or `pretrain_pixels:`).")
    name: str | None = Field(None, description="Label in reports (default: the model's recipe, e.g. small-5x128-mp+cl); "
                             "required for a recipe.")
    preset: str | None = Field(None, description="Fine-tuning preset for this model's cells (overrides the grid's).")
    pretrain: dict[str, Any] | None = Field(
        None, description="A pretraining recipe instead of a finished model: pretrain settings over the grid's `pretrain` base, "
        "as dotted keys ({model.objective: mp, masking.strategy: iid}) or nested mappings. Trained on demand (once per seed, "
        "cached by its run key) before its cells run.",
    )
    pretrain_pixels: dict[str, Any] | None = Field(
        None, description="A pixel pretraining recipe (ST-MAE, the pretrain-pixels stage) instead of a finished model: "
        "pretrain-pixels settings over the grid's `pretrain_pixels` base, as dotted keys ({model.mask_ratio: 0.9}) or nested "
        "mappings ({} is the base as it is). Trained on demand (once per seed, cached by its run key) before its cells run.",
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("a model name must not be empty")
        return v

    @model_validator(mode="after")
    def _ref_or_recipe(self) -> "GridModel":
        given = [k for k, v in (("ref", self.ref), ("pretrain", self.pretrain), ("pretrain_pixels", self.pretrain_pixels))
                 if v is not None and v != ""]
        if not given:
            raise ValueError("a grid model needs `ref` (scratch, models:/..., a checkpoint), `pretrain` (a recipe) or "
                             "`pretrain_pixels` (a pixel recipe)")
        if len(given) > 1:
            raise ValueError(f"grid model {self.name or self.ref!r}: give one of `ref`, `pretrain`, `pretrain_pixels`, "
                             f"not {' and '.join(given)}")
        if self.is_recipe and not self.name:
            raise ValueError("a pretraining recipe in a grid needs a `name` (it labels its rows in the report)")
        pixels = scratch_pixels_preset(self.ref)
        if pixels is not None and pixels not in PRESETS["pretrain-pixels"]:
            known = ", ".join(sorted(PRESETS["pretrain-pixels"]))
            raise ValueError(f"grid model {self.ref!r}: {pixels!r} is not a pretrain-pixels preset; known: {known}")
        return self

    @property
    def is_recipe(self) -> bool:
        """Trained on demand by the evaluate flow: a token (`pretrain`) or pixel (`pretrain_pixels`) recipe."""
        return self.pretrain is not None or self.pretrain_pixels is not None

    @property
    def is_pixel_recipe(self) -> bool:
        return self.pretrain_pixels is not None

    @property
    def label(self) -> str:
        return self.name or self.ref or ""

    def recipe_overrides(self) -> list[str]:
        """The recipe's settings as `a.b=value` overrides (nested mappings flattened)."""
        return _as_overrides(self.pretrain_pixels if self.is_pixel_recipe else self.pretrain or {})


def _as_overrides(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _as_overrides(value, path + ".")
        else:
            out.append(f"{path}={json.dumps(value) if not isinstance(value, str) else value}")
    return out


EvalMethod = Literal["finetune", "linear_probe", "knn", "bag_of_codes"]
EVAL_METHODS: tuple[str, ...] = EvalMethod.__args__


class GridPretrain(StrictModel):
    """The base of a grid's pretraining recipes: which data, which tokenizer, which preset."""

    datasets: list[str] = Field(default_factory=list, min_length=0, description="Datasets whose token shards recipes pretrain on "
                                "(in a pipeline: default the pipeline's pretraining datasets).")
    tokenizer: str = Field("", description="Token shards of this tokenizer (token_samples.tokenizer); empty: the only one there is.")
    preset: str = Field("small", description="Pretrain preset every recipe starts from (pretrain presets: small, base, tiny, ...).")
    config: dict[str, Any] = Field(default_factory=dict, description="PretrainConfig settings over the preset, before each recipe's own.")
    set: list[str] = Field(default_factory=list, description="`a.b=value` pretrain overrides applied before each recipe's own.")


class GridPixelPretrain(StrictModel):
    """The base of a grid's pixel (ST-MAE) pretraining recipes: which frame shards, which pretrain-pixels preset."""

    datasets: list[str] = Field(default_factory=list, description="Datasets whose frame shards pixel recipes pretrain on "
                                "(in a pipeline: default the pretrain-pixels stage's datasets).")
    preset: str = Field("default", description="Pretrain-pixels preset every pixel recipe starts from (tiny, micro, mae_st, hvm1, ...).")
    config: dict[str, Any] = Field(default_factory=dict, description="PixelPretrainConfig settings over the preset, before each "
                                   "recipe's own.")
    set: list[str] = Field(default_factory=list, description="`a.b=value` pretrain-pixels overrides applied before each recipe's own.")


class GridDataset(StrictModel):
    """One column of the results grid: a labeled dataset and the splits to run."""

    name: str = Field(..., description="Dataset name in the catalog (ingested, framed and tokenized).")
    splits: list[str] = Field(
        default_factory=lambda: ["auto"], description="Split sets (1, 2, 3 for UCF101/HMDB51), `train:val`-style pairs, "
        "auto (split set 1 if the dataset has split sets, else train vs val or test), or few-shot splits as HVM-1 "
        "evaluates: `10shot` / `10shot@SPLIT` trains on 10 videos per class of SPLIT (default auto), drawn by the seed, "
        "and evaluates on SPLIT's whole evaluation side.",
    )
    preset: str | None = Field(None, description="Fine-tuning preset for this dataset (e.g. ucf101; Table 4).")

    @field_validator("splits", mode="before")
    @classmethod
    def _as_text(cls, v: Any) -> Any:
        return [str(x) for x in v] if isinstance(v, list) else v


class GridConfig(StrictModel):
    """A batch of fine-tuning + evaluation cells: models x datasets x splits x presets."""

    name: str = Field("grid", min_length=1, description="Grid name, recorded with every result (`vimpac report --grid NAME`).")
    models: list[GridModel] = Field(..., min_length=1, description="Pretrained models (rows); `scratch` is the baseline.")
    datasets: list[GridDataset] = Field(..., min_length=1, description="Labeled datasets (columns) and their splits.")
    presets: list[str] = Field(default_factory=lambda: ["default"], description="Fine-tuning presets: every cell runs once per preset.")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Settings applied over each cell's preset (FinetuneConfig fields).")
    set: list[str] = Field(default_factory=list, description="`a.b=value` overrides applied last to every cell's fine-tune config.")
    protocols: list[EvalMethod] = Field(
        default_factory=lambda: ["finetune"], min_length=1,
        description="Evaluation protocols per model and dataset: finetune (App. A.2), linear_probe and knn on frozen [CLS] and "
        "mean-pooled features, bag_of_codes (a logistic regression on code histograms: the floor, one row per dataset).",
    )
    seeds: list[int] | None = Field(
        None, description="Run every cell (and every recipe's pretraining) once per seed; the seed is a column of `results`. "
        "Empty: each config's own seed.",
    )
    pretrain: GridPretrain | None = Field(None, description="Base of the recipe rows' pretraining (required when a model has `pretrain:`).")
    pretrain_pixels: GridPixelPretrain | None = Field(
        None, description="Base of the pixel recipe rows' ST-MAE pretraining (required when a model has `pretrain_pixels:`).")
    parallel: int = operational(1, ge=1, description="Cells run at once, one per GPU; with fewer than 2 GPUs cells run one "
                                "at a time (sharing a device, they would share torch's random generators).")
    experiment: str = operational("vimpac", description="MLflow experiment.")

    _plain_refs = field_validator("models", mode="before")(_short_models)
    _plain_names = field_validator("datasets", mode="before")(_short_datasets)
    _distinct_seeds = field_validator("seeds")(_check_seeds)
    _distinct_protocols = field_validator("protocols")(_unique)

    @model_validator(mode="after")
    def _recipes_have_a_base(self) -> "GridConfig":
        recipes = [m.name for m in self.models if m.pretrain is not None]
        if recipes and self.pretrain is None:
            raise ValueError(f"models {', '.join(recipes)} are pretraining recipes: the grid needs a `pretrain:` section "
                             "(datasets, tokenizer, preset) to train them on")
        if recipes and self.pretrain is not None and not self.pretrain.datasets:
            raise ValueError("grid `pretrain.datasets` must name the datasets the recipes pretrain on")
        pixels = [m.name for m in self.models if m.is_pixel_recipe]
        if pixels and self.pretrain_pixels is None:
            raise ValueError(f"models {', '.join(pixels)} are pixel pretraining recipes: the grid needs a `pretrain_pixels:` "
                             "section (datasets, preset) to train them on")
        if pixels and self.pretrain_pixels is not None and not self.pretrain_pixels.datasets:
            raise ValueError("grid `pretrain_pixels.datasets` must name the datasets whose frame shards the pixel recipes "
                             "pretrain on")
        labels = [m.label for m in self.models]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"grid models must have distinct names/refs; repeated: {', '.join(dupes)}")
        return self


PRETRAINED = "pretrained"
PRETRAINED_PIXELS = "pretrained-pixels"


class PipelineEvaluate(StrictModel):
    """The pipeline's last stage: a results grid over its labeled datasets (flows/evaluate.py)."""

    models: list[GridModel] = Field(
        default_factory=lambda: [GridModel(ref="scratch"), GridModel(ref=PRETRAINED), GridModel(ref=PRETRAINED_PIXELS)],
        description="Rows of the grid; `pretrained` is the backbone this pipeline's pretrain stage made, `pretrained-pixels` "
        "the ST-MAE encoder its pretrain-pixels stage made (left out without a word when that stage is off), `scratch` the "
        "baseline, `scratch-pixels:PRESET` the pixel baseline.",
    )
    datasets: list[GridDataset] | None = Field(None, description="Columns (default: every labeled dataset of the pipeline, split auto).")
    presets: list[str] = Field(default_factory=lambda: ["default"], description="Fine-tuning presets.")
    finetune: dict[str, Any] = Field(default_factory=dict, description="Settings applied over each cell's preset.")
    set: list[str] = Field(default_factory=list, description="`a.b=value` overrides of every cell's fine-tune config.")
    protocols: list[EvalMethod] = Field(default_factory=lambda: ["finetune"], min_length=1,
                                        description="finetune, linear_probe, knn, bag_of_codes (see the evaluate flow's grid).")
    seeds: list[int] | None = Field(None, description="Run every cell and every recipe's pretraining once per seed.")
    parallel: int = operational(1, ge=1, description="Cells run at once, one per GPU; with fewer than 2 GPUs cells run one "
                                "at a time (sharing a device, they would share torch's random generators).")

    _plain_refs = field_validator("models", mode="before")(_short_models)
    _plain_names = field_validator("datasets", mode="before")(_short_datasets)
    _distinct_seeds = field_validator("seeds")(_check_seeds)
    _distinct_protocols = field_validator("protocols")(_unique)


Layout = Literal["auto", "directory", "folder_per_class", "ucf101", "hmdb51", "ssv2", "diving48", "kinetics", "list", "manifest"]
LAYOUTS: tuple[str, ...] = Layout.__args__


class DatasetConfig(StrictModel):
    """One dataset: where its videos come from and how its labels and splits are laid out."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$", description="Dataset name used in the catalog.")
    source: str = Field(
        ..., description="A directory, a manifest (.csv/.jsonl/.parquet), a list (.txt), a video file, or a URL (http(s)://, file://, any fsspec URL)."
    )
    layout: Layout = Field("auto", description="How labels and splits are found; auto-detected by default.")
    splits_dir: str | None = Field(
        None, description="Folder with the split / annotation files (UCF101 and HMDB51 split lists, SSv2 and Diving48 JSON, "
        "Kinetics CSV); default: found under the source.",
    )
    flip_sensitive: bool = Field(
        False, description="Horizontal flips change the label (e.g. SSv2, left/right motion): no flipped views downstream."
    )
    fps: float | None = Field(None, gt=0, description="Frame sampling rate for this dataset (default: frames.fps).")
    views: Literal["pretrain", "downstream"] | None = Field(None, description="Views for this dataset (default: frames.views).")


class TrackingConfig(StrictModel):
    experiment: str = operational("vimpac", description="MLflow experiment for the runs.")


Stage = Literal["ingest", "frames", "tokenizer", "tokenize", "pretrain", "pretrain-pixels", "evaluate"]
# The stages a pipeline runs by default (and `vimpac serve` deploys, with pipeline). pretrain-pixels
# is optional: it joins `stages` when its section `pretrain_pixels` is set (PipelineConfig).
STAGES: tuple[str, ...] = ("ingest", "frames", "tokenizer", "tokenize", "pretrain", "evaluate")
PIXEL_STAGE = "pretrain-pixels"


class PipelineConfig(StrictModel):
    """Everything one `pipeline` run needs: the datasets and each stage's settings."""

    name: str = operational("pipeline", description="Name of the pipeline run (MLflow parent run name).")
    datasets: list[DatasetConfig] = Field(default_factory=list, description="Datasets to process.")
    stages: list[Stage] = Field(default_factory=lambda: list(STAGES), description="Stages to run, in DAG order.")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    frames: FramesConfig = Field(default_factory=FramesConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    pretrain_pixels: PixelPretrainConfig | None = Field(
        None, description="ST-MAE pixel pretraining (the pretrain-pixels stage, HVM-1) on the frame shards of the pipeline's "
        "unlabeled datasets (or its `datasets`), at frames.size unless data.size says otherwise; its encoder is the evaluate "
        "grid's `pretrained-pixels` row. Unset: off. `{}` is the default recipe; `--preset pretrain-pixels=tiny` sets it "
        "to a preset.",
    )
    evaluate: PipelineEvaluate = Field(default_factory=PipelineEvaluate)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dask: str | None = operational(
        None,
        description="Run the data stages' units (ingest batches, frame shards, token shards) on a Dask cluster: "
        "`local` (a local cluster, one worker process per core, at most the stage's `workers`), `local:N` (N worker "
        "processes) or a scheduler address (`tcp://host:8786`); unset: threads in the flow process. Same output "
        "either way; remote workers need the data root at the same path (docs/scale-out.md).",
    )
    threads: int | None = operational(
        None, ge=1,
        description="Compute threads of the process running the pipeline; pools it starts split them (`parallel` grid cells, "
        "unit threads, local Dask workers). Unset: the cores divided among the vimpac processes computing on this machine. "
        "`vimpac --threads N` and VIMPAC_THREADS win over it (docs/scale-out.md).",
    )

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, v: list[DatasetConfig]) -> list[DatasetConfig]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique; repeated: {', '.join(dupes)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _pixel_stage_when_configured(cls, data: Any) -> Any:
        """Setting `pretrain_pixels` is what switches the stage on: with the default `stages` it
        joins them (before evaluate, which fine-tunes its encoder); a `stages` list given
        explicitly is taken as written."""
        if isinstance(data, dict) and data.get("pretrain_pixels") is not None and "stages" not in data:
            data = {**data, "stages": [*STAGES[:-1], PIXEL_STAGE, STAGES[-1]]}
        return data

    @model_validator(mode="after")
    def _pixel_stage_has_settings(self) -> "PipelineConfig":
        if PIXEL_STAGE in self.stages and self.pretrain_pixels is None:
            raise ValueError(f"stages lists {PIXEL_STAGE} but `pretrain_pixels` is not set: give its settings "
                             "(pretrain_pixels: {} for the default recipe, or --preset pretrain-pixels=tiny)")
        return self


def pipeline_pixel_config(config: PipelineConfig) -> PixelPretrainConfig:
    """The pipeline's pretrain-pixels settings (the flow's and `vimpac plan`'s), at the pipeline's
    frame size unless they name one, as the tokenizer trains at frames.size: a data root that also
    holds frames of another size then still has one choice."""
    cfg = config.pretrain_pixels or PixelPretrainConfig()
    if cfg.data.size is None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"size": config.frames.size})})
    return cfg


def pipeline_pixel_recipe_base(config: PipelineConfig, datasets: list[str]) -> GridPixelPretrain:
    """The base of the pipeline evaluate grid's pixel recipes (the flow's and `vimpac plan`'s):
    the pipeline's pretrain-pixels settings (its defaults when the section is unset) on `datasets`,
    so a recipe differs from the stage's own run by its overrides only."""
    cfg = pipeline_pixel_config(config)
    return GridPixelPretrain(datasets=datasets, preset="default", config=cfg.model_dump(mode="json", exclude={"datasets"}))


# Named presets: partial dicts applied over the defaults, so a preset only states what differs.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "ingest": {
        "default": {},
        # Remote sources: more patience and more parallel downloads.
        "web": {"workers": 16, "retries": 5, "backoff_s": 2.0, "read_timeout_s": 60.0},
        # Local files on a fast disk: fewer, larger units.
        "local": {"batch_size": 64},
    },
    "frames": {
        "default": {},
        # The paper's pretraining input: 2 FPS, 128 px, one center view (Section 4.1).
        "pretrain": {"fps": 2.0, "size": 128, "views": "pretrain"},
        # Downstream short clips: 4 FPS and the 12 fixed views (Appendix C, Table 4).
        "downstream": {"fps": 4.0, "size": 128, "views": "downstream"},
        # The second pretraining phase at 256 px.
        "pretrain-256": {"fps": 2.0, "size": 256, "views": "pretrain"},
        # CPU tests and the demo: 64 px views.
        "tiny": {"size": 64},
    },
    "tokenizer": {
        "default": {},
        # CPU tests and the demo: a small model that learns in a few hundred steps. 900 steps of 16
        # frames see the frames 450 steps of 32 did with twice the updates: about 1 dB more on
        # held-out demo frames; bf16 autocast on a CPU with bf16 units pays for the extra steps
        # (docs/tokenizer.md, "Batch 16 and bf16 on the CPU").
        "tiny": {"preset": "tiny", "steps": 900, "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "checkpoint_every": 300},
        "small": {"preset": "small", "steps": 5000},
    },
    "pretrain": {
        "default": {},
        # Table 4 "Pre-Train (Analysis)", the recipe of every ablation in Sec. F: the small model at
        # 5 x 128 px, 2 x 2048 contrastive head, 10 epochs, lr 1e-3, warm-up 0.1, linear decay, effective
        # batch 1024 by accumulating 8 micro-batches of 128 clips pairs (127 negatives: "the number of
        # negative pairs used in our ablation analyses is kept constant at 127", Sec. 4.1).
        "small": {"model": {"preset": "small"},
                  "train": {"batch_size": 128, "accumulate": 8, "lr": 1e-3, "warmup": 0.1, "epochs": 10}},
        # Table 6's 12 x 768 row: the analysis recipe with the base model.
        "base": {"model": {"preset": "base"},
                 "train": {"batch_size": 128, "accumulate": 8, "lr": 1e-3, "warmup": 0.1, "epochs": 10}},
        # Table 4 "Pre-Train (Results)", first phase: large-half, 3 x 4096 contrastive head, lr 3e-4,
        # warm-up 0.05, batch 1024 = 4 x 256 (255 negatives), the first 90 of 100 epochs at 128 px
        # (Sec. 4.1: 255 negatives for the first 90 epochs, 127 for the last 10).
        "large_half": {"model": {"preset": "large_half", "cl_layers": 3, "cl_hidden": 4096},
                       "train": {"batch_size": 256, "accumulate": 4, "lr": 3e-4, "warmup": 0.05, "epochs": 90,
                                 "schedule_epochs": 100}},
        # ... second phase: the last 10 epochs of the same schedule at T = 5, S = 256, batch 1024 = 8 x 128
        # (127 negatives). Set train.continue_from to the first phase's run: it carries the weights (positional
        # tables interpolated), Adam's moments and the learning rate where the first phase stopped.
        "large_half_256": {"model": {"preset": "large_half", "cl_layers": 3, "cl_hidden": 4096},
                           "data": {"frames": 5, "size": 256},
                           "train": {"batch_size": 128, "accumulate": 8, "lr": 3e-4, "warmup": 0.05, "epochs": 10}},
        # CPU: the demo (64 px frames -> 8x8 tokens) and tests.
        "tiny": {"model": {"preset": "tiny", "cl_hidden": 256, "cl_dim": 64, "dropout": 0.0},
                 "train": {"batch_size": 8, "lr": 2e-3, "warmup": 0.1, "epochs": 1, "log_every": 5, "checkpoint_every": 50},
                 # Two cores: a loader process would compete with training; masks cost little here.
                 "data": {"workers": 0}},
        "micro": {"model": {"preset": "micro", "cl_hidden": 32, "cl_dim": 16, "dropout": 0.0},
                  "train": {"batch_size": 4, "lr": 1e-3, "warmup": 1, "epochs": 1, "log_every": 1, "checkpoint_every": 1},
                  "data": {"workers": 0}},
    },
    # ST-MAE on pixels (stages/pretrain/pixels.py).
    "pretrain-pixels": {
        "default": {},
        # mae_st's pretraining recipe (PRETRAIN.md, main_pretrain.py): AdamW (0.9, 0.95), weight decay
        # 0.05, blr 1.6e-3 x batch / 256, 5 warm-up epochs then half-cycle cosine, clipping 0.02,
        # repeat augmentation 4, mask ratio 0.9.
        "mae_st": {"model": {"preset": "large"},
                   "train": {"blr": 1.6e-3, "schedule": "cosine", "warmup_epochs": 5, "grad_clip": 0.02},
                   "data": {"repeat": 4}},
        # HVM-1's recipe (seed 000; eminorhan/hvm-1): ViT-H/14, constant lr 1e-4 without warm-up,
        # clipping 0.1, repeat augmentation 16, 16 frames, mask ratio 0.9 at 224 px (the default random
        # resized crop, area 0.5-1, is HVM-1's).
        "hvm1": {"model": {"preset": "huge", "mask_ratio": 0.9},
                 "train": {"lr": 1e-4, "schedule": "constant", "warmup_epochs": 0, "grad_clip": 0.1},
                 "data": {"frames": 16, "repeat": 16}},
        # CPU: the demo's 64 px frames, 8-frame clips of (2, 8, 8) tubelets.
        "tiny": {"model": {"preset": "tiny"},
                 "train": {"batch_size": 4, "lr": 1e-3, "warmup_epochs": 1, "epochs": 20, "grad_clip": 1.0,
                           "log_every": 5, "checkpoint_every": 50},
                 "data": {"frames": 8, "repeat": 2}},
        "micro": {"model": {"preset": "micro", "mask_ratio": 0.75},
                  "train": {"batch_size": 2, "lr": 2e-3, "warmup_epochs": 0, "epochs": 1, "grad_clip": 1.0,
                            "log_every": 1, "checkpoint_every": 1},
                  "data": {"frames": 4, "repeat": 2, "holdout_videos": 0}},
    },
    # Table 4's downstream columns (T and S come from the pretrained model and the token shards).
    "finetune": {
        "default": {},
        "ssv2": {"train": {"epochs": 22}},
        "diving48": {"train": {"epochs": 50}},
        "ucf101": {"train": {"epochs": 50}},
        "hmdb51": {"train": {"epochs": 50}},
        "kinetics400": {"train": {"epochs": 30}},
        # Sec. F analyses: the small model at 5 x 128, 2 temporal clips at test.
        "analysis": {"data": {"frames": 5}, "eval": {"clips": 2}},
        # CPU: the demo and tests (tiny backbone, 8x8 tokens).
        # 10 epochs (scratch: 40, the paper's 4x): the demo's 96 training videos per set give
        # 60 fine-tuning steps and 240 from scratch, which keeps the demo within its 10 minutes.
        "tiny": {"model": {"scratch_preset": "tiny"},
                 "train": {"epochs": 10, "batch_size": 16, "lr": 1e-3, "log_every": 5, "checkpoint_every": 50},
                 "eval": {"clips": 4, "batch_size": 64}},
        "micro": {"model": {"scratch_preset": "micro", "dropout": 0.0},
                  "train": {"epochs": 1, "batch_size": 4, "lr": 1e-3, "warmup": 1, "log_every": 1, "checkpoint_every": 1},
                  "eval": {"clips": 2, "batch_size": 16}},
        # HVM-1's fine-tuning (eminorhan/mae_st, the code HVM-1's README points to: finetune.py defaults and
        # scripts/finetune/*.sh, models_vit.py): [CLS] (its forward reads x[:, 0]; the global-pool flag is unused),
        # layer-wise lr decay 0.8, drop path 0.1, head dropout 0.3, label smoothing 0.1, weight decay 1e-4,
        # no warm-up, gradient clipping 5, batch 16 x 2 accumulated, lr = blr 1.2e-3 x 32 / 256 = 1.5e-4, AdamW
        # (0.9, 0.999), no mixup/cutmix, RandAugment or dropout inside the ViT. Not carried over: its half-cycle
        # cosine to 1e-5 (ours decays linearly), its per-step random resized crop (area 0.08-1) and flip (both
        # families train on the stored views: 2 scales x 3 crops x flip), and its open-ended epoch count (runs
        # were stopped by hand; the epochs here stay the default's).
        "hvm1": {"model": {"pool": "cls", "drop_path": 0.1, "head_dropout": 0.3, "dropout": 0.0},
                 "train": {"layer_decay": 0.8, "label_smoothing": 0.1, "weight_decay": 1e-4, "warmup": 0, "grad_clip": 5.0,
                           "batch_size": 16, "accumulate": 2, "lr": 1.5e-4, "beta1": 0.9, "beta2": 0.999}},
    },
}


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, nested dicts merged key by key (a file's `train: {lr: ...}` keeps the
    preset's other `train` settings)."""
    out = json.loads(json.dumps(base))
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def preset(stage: str, name: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[stage][name])
    except KeyError:
        known = ", ".join(sorted(PRESETS.get(stage, {}))) or "none"
        raise ConfigError(f"unknown preset {name!r} for stage {stage!r}; known: {known}") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML (8, 0.5, true, [a, b])."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".")], value


def _config_class(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds, also when it is optional (`PixelPretrainConfig | None`)."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in typing.get_args(annotation) if optional else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def apply_overrides(data: dict[str, Any], overrides: list[str], *, model: type[BaseModel]) -> dict[str, Any]:
    """Set each `a.b=value` in a nested dict, refusing keys the model does not have."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node: dict[str, Any] = data
        cls: type[BaseModel] | None = model
        for i, key in enumerate(path):
            if cls is not None and key not in cls.model_fields:
                known = ", ".join(sorted(cls.model_fields))
                raise ConfigError(f"unknown config key {'.'.join(path[: i + 1])!r} in override {item!r}; valid here: {known}")
            if i == len(path) - 1:
                if cls is not None and cls.model_fields[key].annotation is str:
                    # Text fields take the text as written: YAML would turn `2024` into an int,
                    # `001` into 1 and cut `run #3` at the comment. Quotes still work.
                    raw = item.partition("=")[2].strip()
                    value = value if isinstance(value, str) and raw[:1] in ("'", '"') else raw
                node[key] = value
                break
            annotation = cls.model_fields[key].annotation if cls is not None else None
            cls = _config_class(annotation)
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
    return data


def build(model: type[BaseModel], base: dict[str, Any] | None = None, overrides: list[str] | None = None):
    """Validate `base` + overrides into `model`, turning pydantic errors into one clear message."""
    data = apply_overrides(base or {}, overrides or [], model=model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid {model.__name__}:\n" + "\n".join(lines)) from None


def load_pipeline_file(path: str | Path) -> dict[str, Any]:
    """Read a pipeline config (YAML or TOML). Relative dataset sources resolve against the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read pipeline config {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"pipeline config {path} is not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"pipeline config {path} must be a mapping at the top level")
    for ds in data.get("datasets") or []:
        if isinstance(ds, dict):
            for key in ("source", "splits_dir"):
                value = ds.get(key)
                if isinstance(value, str) and "://" not in value and not Path(value).is_absolute():
                    local = Path(value).expanduser()  # `~/videos` is the home folder, not `~` beside the file
                    ds[key] = str(local if local.is_absolute() else (path.parent / local).resolve())
    return data


def resolve_pipeline(
    file: str | Path | None = None, overrides: list[str] | None = None, presets: dict[str, str] | None = None
) -> PipelineConfig:
    """File, then stage presets, then `--set` overrides: the last word wins."""
    data = load_pipeline_file(file) if file else {}
    for stage, name in (presets or {}).items():
        section = stage.replace("-", "_")  # the pretrain-pixels preset fills the `pretrain_pixels` section
        data[section] = deep_merge(preset(stage, name), dict(data.get(section) or {}))
    return build(PipelineConfig, data, overrides)


def cache_dict(cfg: BaseModel) -> dict[str, Any]:
    """The config's fields that affect output (operational ones dropped), recursively."""
    out: dict[str, Any] = {}
    for name, field in type(cfg).model_fields.items():
        if (field.json_schema_extra or {}).get("operational"):
            continue
        value = getattr(cfg, name)
        out[name] = cache_dict(value) if isinstance(value, BaseModel) else value
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def config_hash(cfg: BaseModel) -> str:
    """Short stable hash of what in a config changes a stage's output."""
    blob = json.dumps(cache_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
