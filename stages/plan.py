"""`vimpac plan`: which units of which stages a pipeline run would do, and why, without running
anything and without writing to the data root.

Every stage is asked the question its own run asks first (stages/*: `plan_ingest`,
`plan_frames(save=False)`, `token_units`, `tokenizer_run`, `pretrain_run`, `pixel_run`, `cell_keys`,
`pixel_cell_keys`), so the plan and the run share one notion of "cached". What a stage cannot
know before its upstream has run (the content of videos not ingested yet, the registry version a
new tokenizer will get) is carried forward as "upstream changed (<stage> <dataset>)", with a
range where a count depends on it ("1-2 shards"). The plan may over-state work in such cases; it
never calls cached what the run would recompute.

Reasons, per unit: `new input`, `changed input` (a source file changed), `changed config`,
`changed code version`, `changed config or code version` (older data that did not record which),
`forced`, `unfinished (resumes)`, `retrying failed videos`, `upstream changed (...)`; units that
would be skipped are `cached`. A stage's config hash is `stages.config.config_hash` (operational
fields excluded); what existing units were built with is read from the catalog (`shards`,
`videos`, `runs`, `results`) and from finished checkpoints' metadata.

No prefect or mlflow here (DESIGN.md layout): registry versions are read from the `runs` view,
where every tokenizer and pretrain flow records the `model_uri` it registered.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from stages.config import (
    PIXEL_STAGE,
    PRETRAINED,
    PRETRAINED_PIXELS,
    SCRATCH_PIXELS,
    ConfigError,
    DatasetConfig,
    FinetuneConfig,
    FramesConfig,
    GridConfig,
    GridDataset,
    GridModel,
    GridPretrain,
    IngestConfig,
    PipelineConfig,
    cache_dict,
    config_hash,
    pipeline_pixel_config,
    pipeline_pixel_recipe_base,
    scratch_pixels_preset,
)
from stages.finetune.grid import expand_grid, recipe_configs
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

NEW = "new input"
CHANGED_INPUT = "changed input"
CONFIG = "changed config"
CODE = "changed code version"
CONFIG_OR_CODE = "changed config or code version"
FORCED = "forced"
UNFINISHED = "unfinished (resumes)"
RETRY = "retrying failed videos"
CACHED = "cached"


def upstream(stage: str, what: str) -> str:
    return f"upstream changed ({stage} {what})"


@dataclass
class StagePlan:
    """One stage for one dataset (or one training run): units that would run, units cached."""

    stage: str
    dataset: str  # a dataset, or the datasets a training run uses joined by '+'
    unit: str  # batch, shard, run, cell
    run: int = 0  # units that would run (if the upstream units they wait for succeed)
    run_max: int | None = None  # upper bound where the count depends on upstream outcomes; None: exact
    cached: int = 0  # units that would be skipped
    cached_unit: str | None = None  # when `cached` counts something else (ingest: videos)
    videos: int | None = None  # videos in the units that would run, where known
    reasons: dict[str, int] = field(default_factory=dict)  # reason -> units (ingest: videos)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the real run would fail here
    skipped: str | None = None  # the real run would not run this stage, and why

    @property
    def exact(self) -> bool:
        return self.run_max is None or self.run_max == self.run

    @property
    def pending(self) -> bool:
        """Whether the real run would (or may) do work here."""
        return not self.skipped and not self.error and (self.run > 0 or (self.run_max or 0) > 0)

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.reasons[reason] = self.reasons.get(reason, 0) + n

    def to_run_text(self) -> str:
        if self.skipped:
            return "skipped"
        if self.error:
            return "fails"
        noun = _plural(self.unit, self.run_max if self.run_max is not None else self.run)
        if self.run_max is None or self.run_max == self.run:
            text = f"{self.run} {noun}" if self.run else "0"
        else:
            text = f"{self.run}-{self.run_max} {noun}"
        if self.videos:
            text += f" ({self.videos} {_plural('video', self.videos)})"
        return text

    def cached_text(self) -> str:
        if self.skipped or (self.error and not self.cached):
            return ""
        return f"{self.cached} {_plural(self.cached_unit or self.unit, self.cached)}" if self.cached else "0"

    def reason_text(self) -> str:
        if self.skipped:
            return self.skipped
        if self.error:
            return self.error
        if not self.pending:
            return CACHED
        unit = "video" if self.cached_unit == "video" else None
        parts = []
        for reason, n in self.reasons.items():
            if unit:
                parts.append(f"{reason} ({n} {_plural(unit, n)})")
            elif len(self.reasons) > 1:
                parts.append(f"{reason} x{n}")
            else:
                parts.append(reason)
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(to_run=self.to_run_text(), exact=self.exact, pending=self.pending, reason=self.reason_text())
        return out


@dataclass
class PipelinePlan:
    home: str
    force: bool
    stages: list[StagePlan]

    def summary(self) -> str:
        pending = [s for s in self.stages if s.pending]
        cached = sum(s.cached for s in self.stages if s.cached_unit is None)
        failing = [s for s in self.stages if s.error]
        if not pending and not failing:
            return f"plan: nothing to run, everything is cached ({cached} units); nothing was run"
        parts = [f"{s.stage} {s.dataset}: {s.to_run_text()}" for s in pending]
        text = f"plan: {len(pending)} stage runs would do work" + (f" ({'; '.join(parts)})" if parts else "") + f"; {cached} units cached"
        if failing:
            text += f"; {len(failing)} would fail ({', '.join(f'{s.stage} {s.dataset}' for s in failing)})"
        return text + "; nothing was run"

    def to_json(self) -> dict[str, Any]:
        return {"home": self.home, "force": self.force, "stages": [s.to_json() for s in self.stages], "summary": self.summary()}

    def table_rows(self) -> list[dict[str, str]]:
        return [{"stage": s.stage, "dataset": s.dataset, "to run": s.to_run_text(), "cached": s.cached_text(),
                 "reason": s.reason_text()} for s in self.stages]

    def notes(self) -> list[str]:
        return [f"{s.stage} {s.dataset}: {n}" for s in self.stages for n in s.notes]


def _plural(noun: str, n: int) -> str:
    if n == 1:
        return noun
    return noun + ("es" if noun.endswith(("ch", "sh", "s", "x")) else "s")


def _shard_bounds(n: int, workers: int, max_per_shard: int) -> tuple[int, int]:
    """How many shards the frames stage cuts `n` new videos into when their durations (and so
    their expected sizes) are not known yet: at most one per video; at least two when it uses
    two or more workers (its target size is at most half the total), and never more than
    `max_per_shard` videos per shard."""
    if n <= 0:
        return 0, 0
    lo = 2 if min(workers, n) >= 2 else 1
    return max(lo, math.ceil(n / max_per_shard)), n


def _config_diff(old: BaseModel | dict, new: BaseModel) -> str:
    """`size 32 -> 48, fps 2.0 -> 4.0`: the output-affecting fields that differ."""
    a = old if isinstance(old, dict) else cache_dict(old)
    b = cache_dict(new)

    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    fa, fb = flat(a), flat(b)
    return ", ".join(f"{k} {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k))


def _checkpoint_metadata(path: Path) -> dict:
    """A finished checkpoint's metadata, memory-mapped (the weights are not read)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file tells us nothing
        return {}
    return dict(ckpt.get("metadata") or {}) if isinstance(ckpt, dict) else {}


def _classify(current: dict[str, Any], previous: list[dict[str, Any]], labels: dict[str, str]) -> tuple[str, list[str]]:
    """Why a keyed run is not cached: compared with the previous run that differs least, the
    first differing component's reason (in `labels` order), and the others as notes."""
    if not previous:
        return NEW, []
    best = min(previous, key=lambda p: sum(p.get(k) != v for k, v in current.items()))
    differing = [k for k in labels if best.get(k) != current.get(k)]
    if not differing:
        return CONFIG_OR_CODE, []
    if "code" in differing and best.get("code") is None:
        return CONFIG_OR_CODE, []
    reasons = [labels[k] for k in differing]
    return reasons[0], [f"also {r} since the closest earlier run" for r in reasons[1:]]


@dataclass
class _Frames:
    """What a frames run would add to a dataset's committed frame shards."""

    size: int
    variant: str
    fps: float
    new_lo: int  # shards committed anew (not rebuilds of committed ones)
    new_hi: int


@dataclass
class _Tokens:
    identity: str | None  # None: a tokenizer version that does not exist yet
    changed: bool  # token shards that are not committed now would be
    new_lo: int = 0
    new_hi: int = 0


class _Reader:
    """The catalog, read-only, as `vimpac status` reads it; no catalog yet means no rows."""

    def __init__(self, root: DataRoot):
        self.catalog = Catalog(root)

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        try:
            return self.catalog.rows(sql, params)
        except FileNotFoundError:
            return []

    def completed_runs(self, stage: str) -> list[dict]:
        out = []
        for dataset, config, summary in self.rows(
            "SELECT dataset, config, summary FROM runs WHERE stage = ? AND status = 'completed' ORDER BY finished_at DESC", [stage]
        ):
            try:
                out.append({"dataset": dataset, "config": json.loads(config or "{}"), "summary": json.loads(summary or "{}")})
            except json.JSONDecodeError:
                continue
        return out


class _Planner:
    def __init__(self, config: PipelineConfig, root: DataRoot, force: bool):
        self.cfg, self.root, self.force = config, root, force
        self.db = _Reader(root)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rows: list[StagePlan] = []
        self.blocked: dict[str, str] = {}  # dataset -> the stage that fails for it
        self.listings: dict[str, Any] = {}
        self.ingest_new: dict[str, tuple[int, int]] = {}  # dataset -> (new videos, maybe-new content)
        self.frames: dict[str, _Frames] = {}
        self.tokens: dict[str, _Tokens] = {}
        # The tokenizer the pipeline's tokenize and pretrain use: (ref given to them, identity).
        self.tokenizer_ref: str = config.tokenize.tokenizer
        self.tokenizer_identity: str | None = None
        self.tokenizer_row: StagePlan | None = None
        self.pretrain_row: StagePlan | None = None
        self.pretrained: tuple[str | None, str | None] | None = None  # (identity, tokenizer) of the `pretrained` model
        self.pixels_row: StagePlan | None = None
        self.pixels: tuple[str, Path] | None = None  # (run key, final.pt) of the `pretrained-pixels` encoder

    # ---------------------------------------------------------------- helpers

    def facts(self, ds: DatasetConfig) -> tuple[bool, bool]:
        """(labeled, flip_sensitive) as the catalog will say once ingest has recorded the dataset."""
        listing = self.listings.get(ds.name)
        if listing is not None:
            return bool(listing.labeled), bool(ds.flip_sensitive or listing.flip_sensitive)
        rows = self.db.rows("SELECT labeled, flip_sensitive FROM datasets WHERE dataset = ?", [ds.name])
        return (bool(rows[0][0]), bool(rows[0][1])) if rows else (False, False)

    def pretraining_datasets(self, chosen: list[str] | None, setting: str) -> list[str]:
        """flows.pipeline.pretraining_datasets, on the facts ingest is about to record."""
        names = [d.name for d in self.cfg.datasets]
        picked = chosen or [d.name for d in self.cfg.datasets if not self.facts(d)[0]] or names
        unknown = sorted(set(picked) - set(names))
        if unknown:
            raise ConfigError(f"{setting} names datasets the pipeline does not have: {', '.join(unknown)}")
        return picked

    def skip_blocked(self, row: StagePlan, names: list[str]) -> bool:
        blocked = [f"{n} ({self.blocked[n]})" for n in names if n in self.blocked]
        if blocked:
            row.skipped = f"skipped: an earlier stage fails for {', '.join(blocked)}"
            self.rows.append(row)
        return bool(blocked)

    def registered(self, stage: str, run_key: str, name: str) -> str | None:
        """The registry URI a finished run key was registered under (as its flow recorded it)."""
        for run in self.db.completed_runs(stage):
            uri = str(run["summary"].get("model_uri") or "")
            if run["summary"].get("run_key") == run_key and uri.startswith(f"models:/{name}/"):
                return uri
        return None

    def latest_version(self, name: str) -> str | None:
        versions = set()
        for stage in ("tokenizer", "pretrain"):
            for run in self.db.completed_runs(stage):
                uri = str(run["summary"].get("model_uri") or "")
                if uri.startswith(f"models:/{name}/") and uri.rsplit("/", 1)[-1].isdigit():
                    versions.add(int(uri.rsplit("/", 1)[-1]))
        for (tok,) in self.db.rows("SELECT DISTINCT tokenizer FROM token_samples WHERE tokenizer LIKE ?", [f"models:/{name}/%"]):
            if tok.rsplit("/", 1)[-1].isdigit():
                versions.add(int(tok.rsplit("/", 1)[-1]))
        return f"models:/{name}/{max(versions)}" if versions else None

    def tokenizer_ref_identity(self, ref: str, row: StagePlan) -> str | None:
        """The identity the tokenize flow records for a tokenizer reference, read-only."""
        from stages.tokenize.stage import file_identity

        if ref.startswith("models:/"):
            name, _, version = ref[len("models:/"):].partition("/")
            if version.isdigit():
                return ref
            latest = self.latest_version(name)
            if latest:
                row.notes.append(f"{ref} taken as {latest}, the newest version this data root knows (the registry may have newer)")
            return latest
        path = ref[len("dalle:"):].split(",")[0] if ref.startswith("dalle:") else ref
        if not Path(path).exists():
            raise ConfigError(f"tokenizer checkpoint {path} does not exist")
        return file_identity(path, "dalle") if ref.startswith("dalle:") else file_identity(path)

    # ---------------------------------------------------------------- ingest

    def ingest(self, ds: DatasetConfig) -> None:
        from stages.ingest.stage import plan_ingest

        row = StagePlan("ingest", ds.name, "batch", cached_unit="video")
        try:
            plan = plan_ingest(self.root, ds, self.cfg.ingest, force=self.force, read_only=True)
        except (ConfigError, OSError, ValueError) as e:
            row.error = f"fails: {e}"
            self.blocked[ds.name] = "ingest"
            self.rows.append(row)
            return
        self.listings[ds.name] = plan.listing
        names = {"new": NEW, "source changed": CHANGED_INPUT, "code changed": CODE, "config changed": CONFIG,
                 "retrying transient failure": RETRY, "retrying failure": RETRY, "forced": FORCED}
        for reason, n in sorted(plan.reasons.items()):
            row.add(names.get(reason, reason), n)
        if CONFIG in row.reasons:
            previous = self.previous_stage_config("ingest", ds.name, IngestConfig)
            if previous is not None and (diff := _config_diff(previous, self.cfg.ingest)):
                row.notes.append(f"config: {diff}")
        row.run, row.videos, row.cached = len(plan.batches), plan.pending, plan.cached
        retries = plan.reasons.get("retrying transient failure", 0) + plan.reasons.get("retrying failure", 0)
        self.ingest_new[ds.name] = (plan.new_inputs, plan.changed_inputs + retries)
        if row.run and not (plan.new_inputs or plan.changed_inputs or retries):
            row.notes.append("re-ingests the same files: their content hashes stay, so frames and later stages keep their shards")
        self.rows.append(row)

    def previous_stage_config(self, stage: str, dataset: str, model: type[BaseModel]) -> BaseModel | None:
        """The config of the last completed run of a per-dataset stage (the `runs` view)."""
        for run in self.db.completed_runs(stage):
            if run["dataset"] == dataset and isinstance(run["config"].get(stage), dict):
                try:
                    return model.model_validate(run["config"][stage])
                except ValueError:
                    return None
        return None

    # ---------------------------------------------------------------- frames

    def frames_stage(self, ds: DatasetConfig) -> None:
        from stages.frames.stage import CODE_VERSION, plan_frames
        from warehouse.shards import stats_path

        row = StagePlan("frames", ds.name, "shard")
        if self.skip_blocked(row, [ds.name]):
            return
        fcfg = self.cfg.frames
        try:
            plan = plan_frames(self.root, ds, fcfg, force=self.force, save=False, facts=self.facts(ds))
        except Exception as e:  # noqa: BLE001 - whatever stops the planning stops the run too
            row.error = f"fails: {type(e).__name__}: {e}"
            self.blocked[ds.name] = "frames"
            self.rows.append(row)
            return
        vdir = self.root.home / plan.variant_dir
        pending = plan.pending
        split = len(pending) - plan.planned_now
        old, fresh = pending[:split], pending[split:]
        rebuilt = [p for p in old if stats_path(vdir / f"{p.name}.tar").exists()]  # --force over committed shards
        unfinished = len(old) - len(rebuilt)
        new_videos, maybe = self.ingest_new.get(ds.name, (0, 0))
        if new_videos or maybe:
            # Videos not ingested yet join the ones in no shard: how they are grouped depends on
            # durations that only ingest will probe.
            lo, _ = _shard_bounds(plan.new_videos + new_videos, plan.config.workers, plan.config.max_videos_per_shard)
            _, hi = _shard_bounds(plan.new_videos + new_videos + maybe, plan.config.workers, plan.config.max_videos_per_shard)
            if not new_videos:
                lo = len(fresh)
            videos = plan.new_videos + new_videos
            row.notes.append(f"{new_videos + maybe} videos are not ingested yet: the shard count assumes they ingest fine"
                             + ("" if lo == hi else " and depends on their durations"))
        else:
            lo = hi = len(fresh)
            videos = plan.new_videos
        row.run = len(old) + lo
        row.run_max = len(old) + hi if hi != lo else None
        row.videos = videos + sum(len(p.members) for p in old) or None
        row.cached = plan.committed
        self.frames[ds.name] = _Frames(plan.config.size, plan.config.views, plan.config.fps, unfinished + lo, unfinished + hi)
        if self.force:
            row.add(FORCED, row.run_max or row.run)
        else:
            row.add(UNFINISHED, unfinished)
            if hi:
                brand_new_variant = not plan.committed and not old
                reason = self.variant_reason(ds.name, plan.config, self.facts(ds)[0], CODE_VERSION, row) if brand_new_variant else NEW
                row.add(reason, hi)
        if plan.skipped_videos:
            row.notes.append(f"{plan.skipped_videos} videos failed or are duplicates upstream and are not framed")
        self.rows.append(row)

    def variant_reason(self, dataset: str, resolved: FramesConfig, labeled: bool, code_version: str, row: StagePlan) -> str:
        """Why a dataset gets a frames variant it has no shard of: what its committed shards were built with."""
        shards = self.db.rows("SELECT path, config_hash, code_version FROM shards WHERE stage = 'frames' AND dataset = ?", [dataset])
        if not shards:
            return NEW
        current = config_hash(resolved)
        same = [s for s in shards if s[1] == current]
        if any(s[2] is None for s in same) or any(s[1] is None for s in shards):
            return CONFIG_OR_CODE
        if any(s[2] != code_version for s in same):
            row.notes.append(f"frames code version is {code_version}; the committed shards of this config were made by "
                             + ", ".join(sorted({s[2] for s in same if s[2] != code_version})))
            return CODE
        if same:
            row.notes.append("same frames config and code as committed shards: the dataset's flip_sensitive setting changed")
            return CONFIG
        previous = self.previous_stage_config("frames", dataset, FramesConfig)
        if previous is not None:
            run_ds = next((r["config"].get("dataset") for r in self.db.completed_runs("frames") if r["dataset"] == dataset), None)
            try:
                from stages.frames.stage import detected_layout, resolve_config

                ds_prev = DatasetConfig.model_validate(run_ds) if isinstance(run_ds, dict) else None
                old = resolve_config(ds_prev, previous, labeled, detected_layout(self.root, dataset)) if ds_prev else previous
                if diff := _config_diff(old, resolved):
                    row.notes.append(f"config: {diff}")
            except ValueError:
                pass
        return CONFIG

    # ---------------------------------------------------------------- tokenizer (train)

    def training_row(self, stage: str, chosen: list[str] | None) -> tuple[list[str], StagePlan | None]:
        """The datasets a training stage (tokenizer, pretrain) would train on and its plan row;
        no row (and a failing one recorded) when `<stage>.datasets` cannot be resolved."""
        try:
            datasets = self.pretraining_datasets(chosen, f"{stage}.datasets")
        except ConfigError as e:
            self.rows.append(StagePlan(stage, "-", "run", error=f"fails: {e}"))
            return [], None
        return datasets, StagePlan(stage, "+".join(datasets), "run")

    def tokenizer_stage(self) -> None:
        from stages.tokenizer.train import CODE_VERSION, tokenizer_run

        tcfg = self.cfg.tokenizer
        train_on, row = self.training_row("tokenizer", tcfg.datasets)
        if row is None:
            return
        self.tokenizer_row = row
        size = tcfg.size or self.cfg.frames.size
        changed = [d for d in train_on if (f := self.frames.get(d)) and f.size == size and f.new_hi]
        run = None
        if not changed:
            try:
                run = tokenizer_run(self.root, train_on, tcfg, size)
            except (ValueError, FileNotFoundError) as e:
                row.error = f"fails: {e}"
                self.rows.append(row)
                return
        if run is not None and run.finished and not self.force:
            row.cached = 1
            uri = self.registered("tokenizer", run.run_key, tcfg.register_as)
            self.tokenizer_identity = uri
            if uri is None:
                row.notes.append(f"trained ({run.run_key}) but not registered as {tcfg.register_as}: the run registers a new "
                                 "version, so every dataset is tokenized again")
        else:
            row.run = 1
            if self.force:
                row.add(FORCED)
                # A forced run trains the same key again; the registry keeps its version.
                self.tokenizer_identity = self.registered("tokenizer", run.run_key, tcfg.register_as) if run else None
            elif changed:
                row.add(upstream("frames", ", ".join(changed)))
                row.notes.append("its key covers every committed frame shard of its datasets at this size: new shards retrain it")
            elif run.last.exists():
                row.add(UNFINISHED)
            else:
                reason, notes = self.classify_training("tokenizer", run.run_key, {
                    "code": CODE_VERSION, "config": config_hash(tcfg), "data": run.data_fingerprint}, tcfg, row)
                row.add(reason)
                row.notes.extend(notes)
        if not self.cfg.tokenize.tokenizer:
            self.tokenizer_ref = "trained"
        self.rows.append(row)

    def classify_training(self, stage: str, run_key: str, current: dict[str, Any], cfg: BaseModel, row: StagePlan) -> tuple[str, list[str]]:
        """Compare a training run's key parts with the finished runs' metadata (their final.pt)."""
        previous = []
        configs = {}
        for final in sorted((self.root.home / "checkpoints" / stage).glob("*/final.pt")):
            meta = _checkpoint_metadata(final)
            if not meta:
                continue
            try:
                old_cfg = type(cfg).model_validate(meta.get("config") or {})
                old_hash = config_hash(old_cfg)
            except ValueError:
                old_cfg, old_hash = None, None
            data = meta.get("data_fingerprint")
            if data is None and meta.get("shards"):
                from stages.pretrain.pixels import shard_fingerprint

                data = shard_fingerprint(meta["shards"])  # pretrain-pixels records its shard units
            entry = {"code": meta.get("code_version"), "config": old_hash, "data": data,
                     "tokenizer": meta.get("tokenizer"), "world": meta.get("world_size")}
            previous.append(entry)
            configs[id(entry)] = old_cfg
        labels = {"data": NEW, "tokenizer": upstream("tokenizer", "identity"), "config": CONFIG, "code": CODE, "world": CONFIG}
        labels = {k: v for k, v in labels.items() if k in current}
        reason, notes = _classify(current, previous, labels)
        if reason == CONFIG and previous:
            best = min(previous, key=lambda p: sum(p.get(k) != v for k, v in current.items()))
            old_cfg = configs.get(id(best))
            if old_cfg is not None and (diff := _config_diff(old_cfg, cfg)):
                notes.append(f"config: {diff}")
        return reason, notes

    # ---------------------------------------------------------------- tokenize

    def tokenize_stage(self, ds: DatasetConfig) -> None:
        from stages.frames.read import frame_shards
        from stages.tokenize.stage import CODE_VERSION, token_shard_path, token_units
        from warehouse.shards import stats_path

        row = StagePlan("tokenize", ds.name, "shard")
        if self.skip_blocked(row, [ds.name]):
            return
        tcfg = self.cfg.tokenize
        explicit = bool(tcfg.tokenizer)
        if explicit:
            try:
                identity = self.tokenizer_ref_identity(tcfg.tokenizer, row)
            except ConfigError as e:
                row.error = f"fails: {e}"
                self.rows.append(row)
                return
            source = "tokenize.tokenizer"
        elif self.tokenizer_ref == "trained" and self.tokenizer_row is not None and not self.tokenizer_row.error:
            identity, source = self.tokenizer_identity, f"tokenizer {self.tokenizer_row.dataset}"
        else:
            row.skipped = "skipped: no tokenizer available (set tokenize.tokenizer or run the tokenizer stage)"
            self.rows.append(row)
            return
        try:
            committed = frame_shards(self.root, ds.name, variant=tcfg.variant, size=tcfg.size)
        except FileNotFoundError:
            committed = []
        f = self.frames.get(ds.name)
        lo = hi = 0
        if f and (tcfg.variant in (None, f.variant)) and (tcfg.size in (None, f.size)):
            lo, hi = f.new_lo, f.new_hi
        if not committed and not hi:
            row.error = "fails: no committed frame shards (run the frames stage first)"
            self.blocked[ds.name] = "tokenize"
            self.rows.append(row)
            return
        if identity is None:
            # A tokenizer version that does not exist yet: every frame shard gets new tokens.
            row.run, row.run_max = len(committed) + lo, (len(committed) + hi if hi != lo else None)
            if self.force:
                row.add(FORCED, len(committed) + hi)
            else:
                row.add(upstream("tokenizer", source.split(" ", 1)[-1]) if not explicit else NEW, len(committed))
                row.add(upstream("frames", ds.name), hi)
            self.tokens[ds.name] = _Tokens(None, True, len(committed) + lo, len(committed) + hi)
        else:
            cfg = tcfg.model_copy(update={"tokenizer": identity})
            pending, cached = token_units(self.root, ds.name, cfg, identity, committed, force=self.force)
            fresh = [u for u in pending if not stats_path(self.root.home / u.out_dir / f"{u.number}.tar").exists()]
            row.cached = cached
            row.run = len(pending) + lo
            row.run_max = len(pending) + hi if hi != lo else None
            if self.force:
                row.add(FORCED, len(pending) + hi)
            else:
                row.add(NEW, len(pending))
                row.add(upstream("frames", ds.name), hi)
            self.tokens[ds.name] = _Tokens(identity, bool(fresh) or hi > 0, len(fresh) + lo, len(fresh) + hi)
            stale = self.db.rows(
                "SELECT count(*), list(DISTINCT code_version) FROM shards WHERE stage = 'tokenize' AND dataset = ? "
                "AND code_version IS DISTINCT FROM ? AND path IN (SELECT unnest(?::VARCHAR[]))",
                [ds.name, CODE_VERSION, [token_shard_path(ds.name, s.path, identity) for s in committed]])
            if stale and stale[0][0]:
                row.notes.append(f"{stale[0][0]} cached token shards were made by {', '.join(map(str, stale[0][1]))} (code now "
                                 f"{CODE_VERSION}): token shards are keyed by frames and tokenizer only, so they are kept (--force rebuilds)")
        self.rows.append(row)

    # ---------------------------------------------------------------- pretrain

    def pretrain_stage(self) -> None:
        from stages.pretrain.train import CODE_VERSION, pretrain_run, resolve_tokenizer_identity

        pcfg = self.cfg.pretrain
        pretrain_on, row = self.training_row("pretrain", pcfg.datasets)
        if row is None:
            return
        self.pretrain_row = row
        if self.skip_blocked(row, pretrain_on):
            return
        # As flows.pipeline: pretrain.tokenizer, else the pipeline's tokenizer (tokenize.tokenizer,
        # else the one the tokenizer stage registers); the pretrain flow then resolves
        # models:/NAME/latest against the token shards. None: a version that does not exist yet.
        identity: str | None
        trained = self.tokenizer_ref == "trained" and self.tokenizer_row is not None and not self.tokenizer_row.error
        ref = pcfg.tokenizer or self.cfg.tokenize.tokenizer
        if ref:
            try:
                identity = resolve_tokenizer_identity(self.root, pretrain_on, ref)
            except (ConfigError, FileNotFoundError):
                identity = None  # no tokens of it yet: they come from this run's tokenize, or the run fails
        elif trained:
            identity = self.tokenizer_identity
        else:
            identity = ""  # the only tokenizer whose token shards the datasets have
        changed = [n for n in pretrain_on if (t := self.tokens.get(n)) and t.changed and (not identity or t.identity in (identity, None))]
        run = None
        if identity is not None and not changed:
            cfg = pcfg.model_copy(update={"tokenizer": identity}) if identity else pcfg
            try:
                run = pretrain_run(self.root, pretrain_on, cfg, self.world_size)
            except (ConfigError, FileNotFoundError) as e:
                if not self.force:
                    row.error = f"fails: {e}"
                    self.rows.append(row)
                    return
        self.pretrained = (run.run_key, run.tokenizer) if run else (None, identity or None)
        if self.force:
            row.run = 1
            row.add(FORCED)
        elif identity is None:
            row.run = 1
            row.add(upstream("tokenizer", self.tokenizer_row.dataset) if trained else NEW)
        elif changed:
            row.run = 1
            row.add(upstream("tokenize", ", ".join(changed)))
            row.notes.append("its key covers every committed token shard of its datasets: new shards train a new model")
        else:
            self.finished_or_why(row, "pretrain", run, {
                "code": CODE_VERSION, "config": config_hash(cfg), "data": run.data_fingerprint, "tokenizer": run.tokenizer,
                "world": self.world_size}, cfg)
        # Token shards of one dataset from two frame settings (a new size or fps beside the old
        # one, all tokenized by a new tokenizer) are refused by the pretrain data loader.
        mixed = {n: s for n in changed if len(s := self.token_settings(n, identity)) > 1}
        if mixed:
            row.error = "fails: " + "; ".join(
                f"{n} would have token shards of several frame settings ({', '.join(f'{v} {z} px {f:g} fps' for v, z, f in sorted(s))})"
                for n, s in mixed.items()) + ": pretraining takes one per dataset (set tokenize.size / tokenize.variant)"
        self.rows.append(row)

    # ---------------------------------------------------------------- pretrain-pixels

    def pixels_stage(self) -> None:
        """As flows.pipeline: the ST-MAE on the pretraining datasets' frame shards at the
        pipeline's frame size; only ingest or frames failing stops it."""
        from stages.pretrain.pixels import CODE_VERSION, pixel_run

        if self.cfg.pretrain_pixels is None:
            return
        pcfg = pipeline_pixel_config(self.cfg)
        train_on, row = self.training_row(PIXEL_STAGE, pcfg.datasets)
        if row is None:
            return
        self.pixels_row = row
        blocked = [f"{n} ({self.blocked[n]})" for n in train_on if self.blocked.get(n) in ("ingest", "frames")]
        if blocked:
            row.skipped = f"skipped: an earlier stage fails for {', '.join(blocked)}"
            self.rows.append(row)
            return
        changed = [d for d in train_on if (f := self.frames.get(d)) and f.size == pcfg.data.size and f.new_hi]
        run = None
        if not changed:
            try:
                run = pixel_run(self.root, train_on, pcfg, self.world_size)
            except (ConfigError, FileNotFoundError, ValueError) as e:
                row.error = f"fails: {e}"
                self.rows.append(row)
                return
            self.pixels = (run.run_key, run.final)
            row.notes.append(f"run key {run.run_key} (checkpoints/{PIXEL_STAGE}/{run.run_key})")
        if self.force:
            row.run = 1
            row.add(FORCED)
        elif changed:
            row.run = 1
            row.add(upstream("frames", ", ".join(changed)))
            row.notes.append("its key covers every committed frame shard of its datasets at this size: new shards train a new model")
        else:
            self.finished_or_why(row, PIXEL_STAGE, run, {
                "code": CODE_VERSION, "config": config_hash(pcfg), "data": run.data_fingerprint, "world": self.world_size}, pcfg)
        self.rows.append(row)

    def finished_or_why(self, row: StagePlan, stage: str, run, entry: dict, cfg) -> None:
        """A training stage whose run key is known: cached when its run finished, else one run,
        unfinished (a resume checkpoint exists) or why the key is new (`entry` is what the key
        hashes, compared with earlier runs')."""
        if run.finished:
            row.cached = 1
            return
        row.run = 1
        if run.last.exists():
            row.add(UNFINISHED)
            return
        reason, notes = self.classify_training(stage, run.run_key, entry, cfg, row)
        row.add(reason)
        row.notes.extend(notes)

    def token_settings(self, dataset: str, identity: str | None) -> set[tuple[str, int, float]]:
        """(variant, size, fps) of a dataset's token shards of `identity` once tokenize has run: it
        tokenizes every committed frame shard (within tokenize.variant/size)."""
        from stages.frames.read import frame_shards

        tcfg = self.cfg.tokenize
        try:
            out = {(s.variant, int(s.size), float(s.fps)) for s in frame_shards(self.root, dataset, variant=tcfg.variant, size=tcfg.size)}
        except FileNotFoundError:
            out = set()
        f = self.frames.get(dataset)
        if f and f.new_hi and tcfg.variant in (None, f.variant) and tcfg.size in (None, f.size):
            out.add((f.variant, int(f.size), float(f.fps)))
        if identity:
            out |= {(v, int(z), float(fp)) for v, z, fp in self.db.rows(
                "SELECT DISTINCT variant, size, fps FROM token_samples WHERE dataset = ? AND tokenizer = ?", [dataset, identity])}
        return out

    # ---------------------------------------------------------------- evaluate

    def evaluate_stage(self) -> None:
        from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY

        stage = self.cfg.evaluate
        models = []
        notes = []
        for m in stage.models:
            if m.ref == PRETRAINED:
                row = self.pretrain_row
                if row is None or row.error or row.skipped or self.pretrained is None:
                    notes.append("no pretrained backbone from this pipeline run: only the other models are evaluated")
                    continue
            if m.ref == PRETRAINED_PIXELS:
                row = self.pixels_row
                if row is None or row.error or row.skipped:
                    if PIXEL_STAGE in self.cfg.stages and self.cfg.pretrain_pixels is not None:
                        notes.append("no pixel (ST-MAE) encoder from this pipeline run: only the other models are evaluated")
                    continue  # the stage is off (the default): the row is not asked for
            models.append(m)
        labeled_names = [d.name for d in self.cfg.datasets if self.facts(d)[0]]
        datasets = stage.datasets or [GridDataset(name=n) for n in labeled_names]
        unknown = sorted({d.name for d in datasets} - {d.name for d in self.cfg.datasets})
        if unknown:
            self.rows.append(StagePlan("evaluate", "-", "cell", error=f"fails: evaluate.datasets names datasets the pipeline "
                                                                        f"does not have: {', '.join(unknown)}"))
            return
        if not models or not datasets:
            self.rows.append(StagePlan("evaluate", self.cfg.name, "cell", notes=notes,
                                       skipped="skipped: no labeled datasets" if not datasets else "skipped: no models"))
            return
        blocked = [d.name for d in datasets if d.name in self.blocked]
        by_dataset = {d.name: StagePlan("evaluate", d.name, "cell") for d in datasets}
        if blocked:
            for r in by_dataset.values():
                r.skipped = f"skipped: an earlier stage fails for {', '.join(blocked)}"
            self.rows.extend(by_dataset.values())
            return
        base = pixel_base = None
        if any(m.pretrain is not None for m in models):
            base = GridPretrain(datasets=[d for d in (self.cfg.pretrain.datasets or self.pretraining_names())], preset="default",
                                tokenizer=self.cfg.pretrain.tokenizer,
                                config=self.cfg.pretrain.model_dump(mode="json", exclude={"datasets", "tokenizer"}))
        if any(m.is_pixel_recipe for m in models):
            pixel_base = pipeline_pixel_recipe_base(self.cfg, pipeline_pixel_config(self.cfg).datasets or self.pretraining_names())
        try:
            grid = GridConfig(name=self.cfg.name, models=models, datasets=datasets, presets=stage.presets, finetune=stage.finetune,
                              set=stage.set, protocols=stage.protocols, seeds=stage.seeds, pretrain=base, pretrain_pixels=pixel_base)
            cells = expand_grid(grid)
            recipes = recipe_configs(grid)
        except (ConfigError, ValueError) as e:  # as the evaluate flow: a bad preset or override fails the whole grid
            cells, recipes = [], []
            for r in by_dataset.values():
                r.error = f"fails: {e}"
        pending_recipes = self.recipe_rows(recipes)
        pixel_only = all(self.model_family(m)[0] == PIXEL_FAMILY for m in models)
        for c in cells:
            row = by_dataset[c.dataset]
            if c.model.is_recipe:
                recipe = pending_recipes.get((c.model.name, c.seed))
                if recipe is None or isinstance(recipe, str):
                    row.run += 1
                    stage_name = PIXEL_STAGE if c.model.is_pixel_recipe else "pretrain"
                    row.add(upstream(stage_name, f"recipe {c.model.name}") if recipe is None else recipe)
                    continue
                c = dataclasses.replace(c, model=recipe)
            self.cell(row, c.model, c.dataset, c.split, c.config, kind=c.kind, methods=c.methods, pixel_only=pixel_only)
        first = next(iter(by_dataset.values()))
        first.notes.extend(notes)
        self.rows.extend(by_dataset.values())

    def model_family(self, model) -> tuple[str, str | None, Path | None]:
        """(family, pretrain identity, checkpoint) of a grid row as the evaluate flow will find it:
        scratch, `pretrained` and recipes are token backbones (identity and checkpoint None: the
        token cells look them up themselves); scratch-pixels and `pretrained-pixels` are pixel
        ones (scratch has no checkpoint); a checkpoint's format says; a registry model is found
        among the pretrain-pixels runs that registered it (else it is a token backbone)."""
        from stages.finetune.pixels import pixel_identity
        from stages.finetune.train import SCRATCH, TOKEN_FAMILY, checkpoint_family
        from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY

        if (pixels := scratch_pixels_preset(model.ref)) is not None:
            return PIXEL_FAMILY, f"{SCRATCH_PIXELS}:{pixels}", None  # scratch_pixel_backbone's identity
        if model.ref == PRETRAINED_PIXELS:
            # This run's pretrain-pixels row: known once its key is (None while frames change).
            return PIXEL_FAMILY, *(self.pixels or (None, None))
        if model.is_pixel_recipe:
            return PIXEL_FAMILY, None, None  # planned by recipe_rows; its cells then see its checkpoint
        if model.is_recipe or model.ref in (SCRATCH, PRETRAINED):
            return TOKEN_FAMILY, None, None
        if model.ref.startswith("models:/"):
            name, _, version = model.ref[len("models:/"):].partition("/")
            uri = model.ref if version.isdigit() else self.latest_version(name)
            for run in self.db.completed_runs("pretrain-pixels"):
                if uri and run["summary"].get("model_uri") == uri:
                    checkpoint = run["summary"].get("checkpoint")
                    return PIXEL_FAMILY, run["summary"].get("run_key"), Path(checkpoint) if checkpoint else None
            return TOKEN_FAMILY, None, None
        path = Path(model.ref).expanduser()
        try:
            if checkpoint_family(path) == PIXEL_FAMILY:
                return PIXEL_FAMILY, pixel_identity(path)[0], path
        except (ValueError, ConfigError, OSError):
            pass  # not a pixel checkpoint: the token cell reports what is wrong with the file
        return TOKEN_FAMILY, None, None

    def pixel_cell(self, row: StagePlan, label: str, identity: str, checkpoint: Path | None, dataset: str, split: str,
                   cfg: FinetuneConfig, kind: str, methods: list[str] | None) -> None:
        """A pixel (ST-MAE) row's cell: keyed by the frame shards, not by any tokens."""
        from stages.finetune.pixels import pixel_cell_keys, pixel_identity, pixel_probe_eval_ids, scratch_pixel_backbone
        from stages.finetune.splits import select_frame_split
        from stages.finetune.train import ModelSource, existing_results
        from stages.finetune.train import protocol_for as protocol

        frames = self.frames.get(dataset)
        if frames is not None and frames.new_hi:
            row.run += 1
            row.add(upstream("frames", dataset))
            return
        try:
            selection = select_frame_split(self.root, dataset, split, size=cfg.data.size, variant=cfg.data.variant, seed=cfg.train.seed)
            if kind == "probe":
                if identity.startswith(f"{SCRATCH_PIXELS}:"):
                    encoder = scratch_pixel_backbone(ModelSource(identity), selection.shards[0].size).encoder
                elif checkpoint is None or not checkpoint.exists():
                    row.run += 1
                    row.add(NEW)
                    return
                else:
                    encoder = pixel_identity(checkpoint)[1]
                encoder = dataclasses.replace(encoder, frames=cfg.data.frames or encoder.frames)
                ids = [e for _, e in pixel_probe_eval_ids(cfg, identity, dataset, selection, encoder, methods or [])]
            else:
                ids = [pixel_cell_keys(cfg, identity, dataset, selection, self.world_size, protocol(cfg, selection.flip_sensitive))[1]]
        except (ConfigError, FileNotFoundError, ValueError) as e:
            row.error = f"fails: {label} split {split}: {e}"
            return
        if all(existing_results(self.root, e) for e in ids):
            row.cached += 1
        else:
            row.run += 1
            row.add(NEW)

    def probe_frames(self, model, cfg: FinetuneConfig) -> int | None:
        """T of the backbone a probe cell would run: the scratch preset's or the checkpoint's."""
        from models.backbone import PRESETS as BACKBONES
        from stages.finetune.train import SCRATCH

        if model.ref == SCRATCH:
            return BACKBONES[cfg.model.scratch_preset]().frames
        try:
            import torch

            ckpt = torch.load(Path(model.ref).expanduser(), map_location="cpu", weights_only=True, mmap=True)
            return int(ckpt["model_config"]["backbone"]["frames"])
        except Exception:  # noqa: BLE001 - unknown: the planner then counts the cell as to run
            return None

    def pretraining_names(self) -> list[str]:
        labeled = {d.name for d in self.cfg.datasets if self.facts(d)[0]}
        names = [d.name for d in self.cfg.datasets]
        return [n for n in names if n not in labeled] or names

    def recipe_rows(self, recipes) -> dict:
        """A `pretrain` (token recipe) or `pretrain-pixels` (pixel recipe) plan row per recipe of
        the evaluate grid (units: its seeds); returns (name, seed) -> the finished model it stands
        for, a failure text, or None where it would train first."""
        from stages.pretrain.pixels import pixel_run
        from stages.pretrain.train import pretrain_run

        out: dict = {}
        rows: dict[str, StagePlan] = {}
        for model, seed, cfg in recipes:
            stage = PIXEL_STAGE if model.is_pixel_recipe else "pretrain"
            row = rows.setdefault(model.name, StagePlan(stage, f"recipe {model.name} ({'+'.join(cfg.datasets)})", "run"))
            if self.force:
                row.run += 1
                row.add(FORCED)
                continue
            if model.is_pixel_recipe:
                out[(model.name, seed)] = self.pixel_recipe(row, model, cfg, pixel_run)
                continue
            changed = [n for n in cfg.datasets if (t := self.tokens.get(n)) and t.changed]
            if changed:
                row.run += 1
                row.add(upstream("tokenize", ", ".join(changed)))
                continue
            identity = cfg.tokenizer or (self.pretrained[1] if self.pretrained and self.pretrained[1] else "")
            try:
                run = pretrain_run(self.root, list(cfg.datasets), cfg.model_copy(update={"tokenizer": identity}) if identity else cfg,
                                   self.world_size)
            except (ConfigError, FileNotFoundError, ValueError) as e:
                row.error = f"fails: {e}"
                out[(model.name, seed)] = f"fails: recipe {model.name}: {e}"
                continue
            if run.finished:
                row.cached += 1
                out[(model.name, seed)] = GridModel(ref=str(run.final), name=model.name, preset=model.preset)
            else:
                row.run += 1
                row.add(UNFINISHED if run.last.exists() else NEW)
        self.rows.extend(rows.values())
        return out

    def pixel_recipe(self, row: StagePlan, model, cfg, pixel_run) -> GridModel | str | None:
        """One seed of a pixel recipe, as the pretrain-pixels flow will find it: its run key over
        the committed frame shards (new frame shards of its datasets make a new key)."""
        changed = [n for n in cfg.datasets if (f := self.frames.get(n)) and f.new_hi and cfg.data.size in (None, f.size)]
        if changed:
            row.run += 1
            row.add(upstream("frames", ", ".join(changed)))
            return None
        try:
            run = pixel_run(self.root, list(cfg.datasets), cfg, self.world_size)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            row.error = f"fails: {e}"
            return f"fails: pixel recipe {model.name}: {e}"
        row.notes.append(f"run key {run.run_key} (checkpoints/{PIXEL_STAGE}/{run.run_key})")
        if run.finished:
            row.cached += 1
            return GridModel(ref=str(run.final), name=model.name, preset=model.preset)
        row.run += 1
        row.add(UNFINISHED if run.last.exists() else NEW)
        return None

    def cell(self, row: StagePlan, model, dataset: str, split: str, cfg: FinetuneConfig, *, kind: str = "finetune",
             methods: list[str] | None = None, pixel_only: bool = False) -> None:
        from stages.finetune.train import (
            CODE_VERSION, EVAL_VERSION, SCRATCH, cell_keys, cell_tokenizer, existing_results, pretrained_identity, scratch_identity,
        )
        from stages.finetune.train import protocol_for as protocol
        from stages.finetune.splits import select_split

        from stages.finetune.probe import bag_eval_id, probe_eval_ids
        from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY

        if self.force:
            row.run += 1
            row.add(FORCED)
            return
        if kind == "bag_of_codes":
            if pixel_only and not self.db.rows("SELECT 1 FROM token_samples WHERE dataset = ? LIMIT 1", [dataset]) and \
                    not ((t := self.tokens.get(dataset)) is not None and t.changed):
                note = (f"bag_of_codes on {dataset}: not applicable (every model is a pixel ST-MAE backbone and {dataset} has no "
                        "token shards); the evaluate flow skips it")
                if note not in row.notes:
                    row.notes.append(note)
                return
            try:
                tokenizer = cell_tokenizer(self.root, dataset, cfg, None, False, "bag-of-codes")
                selection = select_split(self.root, dataset, split, tokenizer, size=cfg.data.size, variant=cfg.data.variant,
                                         seed=cfg.train.seed)
            except (ConfigError, FileNotFoundError) as e:
                if (t := self.tokens.get(dataset)) is not None and t.changed:
                    row.run += 1
                    row.add(upstream("tokenize", dataset))
                else:
                    row.error = f"fails: bag of codes split {split}: {e}"
                return
            if existing_results(self.root, bag_eval_id(dataset, selection, tokenizer, cfg.train.seed)):
                row.cached += 1
            else:
                row.run += 1
                row.add(NEW)
            return
        label = "scratch" if model.ref == SCRATCH else "pretrained" if model.ref == PRETRAINED else (model.name or model.ref)
        family, pixel_run, checkpoint = self.model_family(model)
        if family == PIXEL_FAMILY:
            if model.ref == PRETRAINED_PIXELS and self.pixels_row is not None and self.pixels_row.pending:
                row.run += 1
                row.add(upstream(PIXEL_STAGE, self.pixels_row.dataset))
                return
            if pixel_run is None:
                row.run += 1
                row.add(NEW)
                return
            self.pixel_cell(row, label, pixel_run, checkpoint, dataset, split, cfg, kind, methods)
            return
        pretrained = model.ref != SCRATCH
        if model.ref == SCRATCH:
            identity, model_tok = scratch_identity(cfg), None
        elif model.ref == PRETRAINED:
            identity, model_tok = self.pretrained or (None, None)
            if self.pretrain_row is not None and self.pretrain_row.pending:
                row.run += 1
                row.add(upstream("pretrain", self.pretrain_row.dataset))
                return
        elif model.ref.startswith("models:/"):
            identity = model_tok = None
            name, _, version = model.ref[len("models:/"):].partition("/")
            uri = model.ref if version.isdigit() else self.latest_version(name)
            for run in self.db.completed_runs("pretrain"):
                if uri and run["summary"].get("model_uri") == uri:
                    identity, model_tok = run["summary"].get("run_key"), run["summary"].get("tokenizer")
                    break
            if identity is None:
                row.run += 1
                row.add(NEW)
                row.notes.append(f"{model.ref}: not a backbone this data root registered; its cells are counted as to run")
                return
        else:
            try:
                identity, model_tok = pretrained_identity(Path(model.ref).expanduser())
            except (ValueError, ConfigError, OSError) as e:
                row.error = f"fails: model {model.ref}: {e}"
                return
        tokens = self.tokens.get(dataset)
        if tokens is not None and tokens.changed:
            row.run += 1
            row.add(upstream("tokenize", dataset))
            if tokens.identity is None and not cfg.tokenizer and not pretrained and self.db.rows(
                    "SELECT 1 FROM token_samples WHERE dataset = ? LIMIT 1", [dataset]):
                note = (f"{label} cells: {dataset} will have token shards of two tokenizers; a scratch cell then needs "
                        "evaluate.finetune.tokenizer (it fails otherwise)")
                if note not in row.notes:
                    row.notes.append(note)
            return
        try:
            tokenizer = cell_tokenizer(self.root, dataset, cfg, model_tok, pretrained, model.ref)
            selection = select_split(self.root, dataset, split, tokenizer, size=cfg.data.size, variant=cfg.data.variant,
                                     seed=cfg.train.seed)
            run_key, eval_id = cell_keys(cfg, identity, dataset, selection, tokenizer, self.world_size,
                                         protocol(cfg, selection.flip_sensitive))
        except (ConfigError, FileNotFoundError) as e:
            row.error = f"fails: {label} split {split}: {e}"
            return
        if kind == "probe":
            frames = cfg.data.frames or self.probe_frames(model, cfg)
            ids = probe_eval_ids(cfg, identity, dataset, selection, tokenizer, frames, methods or [])
            if all(existing_results(self.root, e) for _, e in ids):
                row.cached += 1
            else:
                row.run += 1
                row.add(NEW)
            return
        if existing_results(self.root, eval_id):
            row.cached += 1
            return
        row.run += 1
        ckpt = self.root.home / "checkpoints" / "finetune" / run_key
        if (ckpt / "final.pt").exists() or (ckpt / "last.pt").exists():
            row.add(UNFINISHED)
            return
        earlier = self.db.rows(
            "SELECT DISTINCT code_version, token_shards FROM results WHERE dataset = ? AND split = ? AND pretrain_run = ? "
            "AND tokenizer = ?", [dataset, selection.split, identity, tokenizer])
        shards = sorted(s.path for s in selection.shards)
        same_data = [r for r in earlier if sorted(r[1] or []) == shards]
        if not same_data:
            row.add(NEW)
        elif any(r[0] is None for r in same_data):
            row.add(CONFIG_OR_CODE)
        elif any(r[0] != f"{CODE_VERSION}/{EVAL_VERSION}" for r in same_data):
            row.add(CODE)
        else:
            row.add(CONFIG)

    # ---------------------------------------------------------------- all

    def plan(self) -> list[StagePlan]:
        stages = self.cfg.stages
        for ds in self.cfg.datasets:
            if "ingest" in stages:
                self.ingest(ds)
        for ds in self.cfg.datasets:
            if "frames" in stages:
                self.frames_stage(ds)
        if "tokenizer" in stages and self.cfg.datasets:
            self.tokenizer_stage()
        if "tokenize" in stages:
            for ds in self.cfg.datasets:
                self.tokenize_stage(ds)
        if "pretrain" in stages and self.cfg.datasets:
            self.pretrain_stage()
        if PIXEL_STAGE in stages and self.cfg.datasets:
            self.pixels_stage()
        elif self.cfg.pretrain_pixels is not None and self.cfg.datasets:
            self.rows.append(StagePlan(PIXEL_STAGE, "-", "run", skipped=f"skipped: `pretrain_pixels` is set but `stages` does not "
                                                                     f"list {PIXEL_STAGE}"))
        if "evaluate" in stages and self.cfg.datasets:
            self.evaluate_stage()
        return self.rows


def plan_pipeline(config: PipelineConfig, home: str | os.PathLike[str] | DataRoot | None = None, *, force: bool = False) -> PipelinePlan:
    """What `vimpac run pipeline` with this config (and --force) would run, per stage and
    dataset, with the reasons; reads the data root and the sources, writes nothing."""
    root = home if isinstance(home, DataRoot) else DataRoot(home)
    return PipelinePlan(str(root.home), force, _Planner(config, root, force).plan())
