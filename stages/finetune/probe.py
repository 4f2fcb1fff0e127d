"""Frozen-feature cells of the results grid: linear probe and kNN on a backbone's [CLS] output
and on its mean-pooled token states, and the bag-of-codes floor (stages/evaluate/probes.py has
the maths). They sit next to fine-tuning in the grid (`protocols:`), write `results` rows with
their protocol name (`linear_probe:cls`, `linear_probe:mean`, `knn:cls`, `knn:mean`,
`bag_of_codes`) and their per-video scores to `predictions`, and are cached by eval id as
fine-tuned cells are.

Features: every video of the split (training and evaluation side) is seen through the same
`eval.clips` uniformly spaced clips of T frames of its center view (`s100_c`, no flip), the
backbone runs in eval mode, and a video's feature is the average over its clips. The scratch
row probes a randomly initialised backbone (seeded), which is the floor a pretrained backbone's
features must clear. A pretrain-pixels (ST-MAE) model is probed the same way on pixel clips
(stages/finetune/pixels.py); the bag of codes needs a tokenizer's codes and has no pixel form.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import torch

from models.backbone import VideoTransformer, load_state_resized
from stages.config import ConfigError, FinetuneConfig
from stages.evaluate.metrics import CENTER, Protocol, clip_starts
from stages.evaluate.probes import KNN_K, KNN_TEMPERATURE, code_histogram, fit_linear_probe, knn_proba
from stages.finetune.evaluate import EvalScores, _clips, read_token_videos
from stages.finetune.splits import EvalVideo, SplitSelection, select_split
from stages.finetune.train import (SCRATCH, CellResult, ModelSource, _fingerprint, _model_config, cell_tokenizer, existing_results,
                                   load_pretrained_backbone, scratch_identity, source_family, write_evaluation)
from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY
from stages.reporting import Reporter
from warehouse.layout import DataRoot

PROBE_VERSION = "probe-1"
BAG_VERSION = "bag-of-codes-1"
PROBE_METHODS = ("linear_probe", "knn")
POOLINGS = ("cls", "mean")
BAG_OF_CODES = "bag_of_codes"
BAG_RECIPE = "bag-of-codes"
VIEW = CENTER[0]


@dataclass
class VideoFeatures:
    keys: list[str]
    labels: np.ndarray  # (N,) class indices
    pooled: dict[str, np.ndarray]  # pooling -> (N, D)


def _probe_eval_id(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()[:16]


def _center(tokens: np.ndarray, stored: list[str], key: str) -> np.ndarray:
    """(n, h, w) tokens of the center view (the pretrain variant stores only that one)."""
    if VIEW not in stored:
        raise ValueError(f"sample {key}: view {VIEW} is not stored (stored: {', '.join(stored)})")
    return tokens[stored.index(VIEW)]


@torch.no_grad()
def extract_features(backbone: VideoTransformer, root: DataRoot, selection: SplitSelection, videos: dict[str, object],
                     protocol: Protocol, *, clip_len: int, device: torch.device, amp: bool, batch_size: int,
                     errors: list[str]) -> VideoFeatures:
    """[CLS] and mean-pooled token features of `videos` (key -> EvalVideo or class index), each the
    average over the protocol's clips of the center view, in the order the shards hold them."""
    backbone.eval()
    pad_id = backbone.config.pad_id
    shards = selection.shards
    keys, labels, clips, owners = [], [], [], []
    for key, tokens, stored in read_token_videos(root, shards, videos, errors):
        try:
            center = _center(tokens, stored, key)
        except ValueError as e:
            errors.append(str(e))
            continue
        starts = clip_starts(int(center.shape[0]), clip_len, protocol.clips)
        clips.append(_clips(center, starts, clip_len, pad_id))  # (clips, T, h, w)
        owners += [len(keys)] * len(starts)
        label = videos[key]
        labels.append(label.label_index if isinstance(label, EvalVideo) else int(label))
        keys.append(key)
    if not keys:
        return VideoFeatures([], np.zeros(0, np.int64), {p: np.zeros((0, backbone.config.dim), np.float32) for p in POOLINGS})
    all_clips = torch.from_numpy(np.concatenate(clips))  # (total clips, T, h, w)
    sums = {p: torch.zeros(len(keys), backbone.config.dim, dtype=torch.float64) for p in POOLINGS}
    owner = torch.tensor(owners)
    for start in range(0, len(all_clips), max(1, batch_size)):
        chunk = all_clips[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            cls, hidden = backbone(chunk)  # (B, D), (B, T, H, W, D)
        keep = (chunk != pad_id).unsqueeze(-1).to(hidden.dtype)  # (B, T, H, W, 1)
        mean = (hidden * keep).sum((1, 2, 3)) / keep.sum((1, 2, 3)).clamp_min(1)  # (B, D): padding left out
        index = owner[start : start + len(chunk)]
        sums["cls"].index_add_(0, index, cls.double().cpu())
        sums["mean"].index_add_(0, index, mean.double().cpu())
    counts = torch.bincount(owner, minlength=len(keys)).double().unsqueeze(1)
    return VideoFeatures(keys, np.array(labels, np.int64), {p: (s / counts).float().numpy() for p, s in sums.items()})


def probe_eval_ids(cfg: FinetuneConfig, identity: str, dataset: str, selection: SplitSelection, tokenizer: str, frames: int,
                   methods: list[str]) -> list[tuple[str, str]]:
    """(protocol name, eval id) of each result a probe cell writes; pure, so `vimpac plan` can ask."""
    protocol = Protocol(cfg.eval.clips, CENTER)
    base = [PROBE_VERSION, identity, dataset, selection.split, _fingerprint(selection.shards), tokenizer, selection.classes,
            protocol.name, frames, cfg.train.seed]
    return [(f"{m}:{p}", _probe_eval_id(*base, f"{m}:{p}", KNN_K if m == "knn" else None)) for m in PROBE_METHODS if m in methods
            for p in POOLINGS]


def bag_eval_id(dataset: str, selection: SplitSelection, tokenizer: str, seed: int) -> str:
    return _probe_eval_id(BAG_VERSION, dataset, selection.split, _fingerprint(selection.shards), tokenizer, selection.classes, seed)


def _scores(selection: SplitSelection, keys: list[str], probs: np.ndarray, view: str) -> EvalScores:
    order = {v.key: v for v in selection.eval}
    return EvalScores([order[k] for k in keys], [view], probs[:, None, :].astype(np.float32))


def probe_cells(root: DataRoot, source: ModelSource, dataset: str, split: str, cfg: FinetuneConfig, *, methods: list[str],
                grid: str = "", reporter: Reporter | None = None, force: bool = False, run_id: str | None = None,
                device: torch.device | None = None) -> list[CellResult]:
    """Linear probe and/or kNN (`methods`) on the frozen backbone's [CLS] and mean-pooled features
    for one (model, dataset, split); one result per method and pooling."""
    reporter = reporter or Reporter()
    unknown = sorted(set(methods) - set(PROBE_METHODS))
    if unknown or not methods:
        raise ConfigError(f"probe methods must be among {', '.join(PROBE_METHODS)}, got {methods}")
    if source_family(source) == PIXEL_FAMILY:
        from stages.finetune.pixels import pixel_probe_cells  # the pixel family's module builds on this one

        return pixel_probe_cells(root, source, dataset, split, cfg, methods=methods, grid=grid, reporter=reporter, force=force,
                                 run_id=run_id, device=device)
    seed = cfg.train.seed
    pretrained = None if source.scratch else load_pretrained_backbone(source)
    tokenizer = cell_tokenizer(root, dataset, cfg, pretrained.tokenizer if pretrained else None, pretrained is not None, source.ref)
    selection = select_split(root, dataset, split, tokenizer, size=cfg.data.size, variant=cfg.data.variant, seed=cfg.train.seed)
    if pretrained is not None and (leak := pretrained.transductive_warning(dataset, selection.base)):
        selection.warnings.append(leak)
        reporter.warning(leak)
    ccfg = _model_config(cfg, selection, pretrained, source.ref)
    bcfg = ccfg.backbone
    bcfg.dropout, bcfg.drop_path = 0.0, 0.0  # frozen features: eval mode anyway; keeps the config honest
    protocol = Protocol(cfg.eval.clips, CENTER)
    identity = pretrained.identity if pretrained else scratch_identity(cfg)
    recipe = pretrained.recipe if pretrained else (source.name or SCRATCH)
    where = f"{recipe} on {dataset} split {selection.split} (frozen features, {protocol.name})"
    results: list[CellResult] = []
    for name, eval_id in probe_eval_ids(cfg, identity, dataset, selection, tokenizer, bcfg.frames, methods):
        results.append(CellResult(eval_id, "", dataset, selection.split, recipe, identity, None, tokenizer, name, {}, False,
                                  n_train=len(selection.train), n_eval=len(selection.eval), warnings=list(selection.warnings),
                                  view_protocol=protocol.name, seed=seed, code_version=PROBE_VERSION))
    if not force and found_probed(root, results, where, reporter):
        return results

    device = device or torch.device("cpu")
    torch.manual_seed(seed)  # the scratch row's random backbone
    backbone = VideoTransformer(bcfg)
    if pretrained is not None:
        try:
            load_state_resized(backbone, pretrained.state)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"{where}: {e}") from None
    backbone.to(device)
    amp = cfg.train.amp and device.type == "cuda"
    errors: list[str] = []
    kwargs = dict(clip_len=bcfg.frames, device=device, amp=amp, batch_size=cfg.eval.batch_size, errors=errors)
    train = extract_features(backbone, root, selection, selection.train, protocol, **kwargs)
    test = extract_features(backbone, root, selection, {v.key: v for v in selection.eval}, protocol, **kwargs)
    fit_probes(root, results, train, test, errors, selection, protocol, source=source, grid=grid, run_id=run_id, seed=seed,
               reporter=reporter, where=where)
    return results


def found_probed(root: DataRoot, results: list[CellResult], where: str, reporter: Reporter) -> bool:
    """Fill `results` from the catalog when every one of them was evaluated (a cached cell)."""
    done = [existing_results(root, r.eval_id) for r in results]
    if not all(done):
        return False
    for r, metrics in zip(results, done):
        r.metrics, r.cached = metrics, True
    reporter.info(f"{where}: already evaluated (" + ", ".join(f"{r.protocol} top1 {r.metrics.get('top1', 0):.3f}" for r in results) + ")")
    return True


def fit_probes(root: DataRoot, results: list[CellResult], train: VideoFeatures, test: VideoFeatures, errors: list[str],
               selection: SplitSelection, protocol: Protocol, *, source: ModelSource, grid: str, run_id: str | None, seed: int,
               reporter: Reporter, where: str) -> None:
    """Every probe of `results` (`linear_probe:POOL`, `knn:POOL`) on the frozen features of the
    training and evaluation videos, written as results rows; both backbone families end here."""
    for error in errors:
        reporter.warning(f"{where}: {error}")
    if not len(train.keys) or not len(test.keys):
        raise ValueError(f"{where}: no {'training' if not len(train.keys) else 'evaluation'} video could be read: {'; '.join(errors[:3])}")
    n_classes = len(selection.classes)
    for result in results:
        method, pool = result.protocol.split(":")
        x_train, x_test = train.pooled[pool], test.pooled[pool]
        if method == "linear_probe":
            probe = fit_linear_probe(x_train, train.labels, n_classes)
            probs = probe.predict_proba(x_test)
            note = f"train accuracy {probe.train_accuracy:.3f}"
        else:
            probs = knn_proba(x_train, train.labels, x_test, n_classes, k=KNN_K, temperature=KNN_TEMPERATURE)
            note = f"k={min(KNN_K, len(train.keys))}"
        scores = _scores(selection, test.keys, probs, f"features:{protocol.name}")
        result.metrics = write_evaluation(root, result, selection, scores, method=result.protocol, view_protocol=protocol.name,
                                          model_ref=source.ref, grid=grid, run_id=run_id, seed=seed)
        reporter.metrics({f"{result.protocol}/{k}": v for k, v in result.metrics.items()})
        reporter.info(f"{where}: {result.protocol} top1 {result.metrics['top1']:.3f} over {len(test.keys)} videos "
                      f"({len(train.keys)} training videos, {note})")


def bag_of_codes_cell(root: DataRoot, dataset: str, split: str, cfg: FinetuneConfig, *, grid: str = "", reporter: Reporter | None = None,
                      force: bool = False, run_id: str | None = None, tokenizer: str | None = None) -> CellResult:
    """The floor: a linear probe on each video's normalised code histogram (center view, every
    frame). No model, no positions: what the tokens alone separate."""
    reporter = reporter or Reporter()
    seed = cfg.train.seed
    tokenizer = tokenizer or cell_tokenizer(root, dataset, cfg, None, False, BAG_RECIPE)
    selection = select_split(root, dataset, split, tokenizer, size=cfg.data.size, variant=cfg.data.variant, seed=cfg.train.seed)
    codebook = selection.shards[0].codebook_size
    eval_id = bag_eval_id(dataset, selection, tokenizer, seed)
    result = CellResult(eval_id, "", dataset, selection.split, BAG_RECIPE, None, None, tokenizer, BAG_OF_CODES, {}, False,
                        n_train=len(selection.train), n_eval=len(selection.eval), warnings=list(selection.warnings),
                        view_protocol="all-frames-center", seed=seed, code_version=BAG_VERSION)
    where = f"bag of codes on {dataset} split {selection.split}"
    if not force and (done := existing_results(root, eval_id)):
        result.metrics, result.cached = done, True
        reporter.info(f"{where}: already evaluated (top1 {done.get('top1', 0):.3f})")
        return result
    errors: list[str] = []
    histograms: dict[str, np.ndarray] = {}
    everything = {**selection.train, **{v.key: v for v in selection.eval}}
    for key, tokens, stored in read_token_videos(root, selection.shards, everything, errors):
        try:
            histograms[key] = code_histogram(_center(tokens, stored, key), codebook)
        except ValueError as e:
            errors.append(str(e))
    for error in errors:
        reporter.warning(f"{where}: {error}")
    train_keys = [k for k in selection.train if k in histograms]
    test_videos = [v for v in selection.eval if v.key in histograms]
    if not train_keys or not test_videos:
        raise ValueError(f"{where}: no {'training' if not train_keys else 'evaluation'} video could be read: {'; '.join(errors[:3])}")
    probe = fit_linear_probe(np.stack([histograms[k] for k in train_keys]), np.array([selection.train[k] for k in train_keys]),
                             len(selection.classes))
    probs = probe.predict_proba(np.stack([histograms[v.key] for v in test_videos]))
    scores = EvalScores(test_videos, ["histogram:center"], probs[:, None, :])
    result.metrics = write_evaluation(root, result, selection, scores, method=BAG_OF_CODES, view_protocol=result.view_protocol,
                                      model_ref=BAG_RECIPE, grid=grid, run_id=run_id, seed=seed)
    reporter.metrics({f"{BAG_OF_CODES}/{k}": v for k, v in result.metrics.items()})
    reporter.info(f"{where}: top1 {result.metrics['top1']:.3f} over {len(test_videos)} videos "
                  f"(train accuracy {probe.train_accuracy:.3f} on {len(train_keys)} videos, {codebook} codes)")
    return result
