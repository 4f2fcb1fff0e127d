"""The frames stage: decode every ingested video once, sample it at a fixed rate on its own
timestamps, cut the paper's fixed views, and write WebDataset shards.

Shard membership is decided once, when a shard is planned, and saved next to it as
`NNNNN.plan.json`: adding videos appends new shards and never rewrites existing ones, and a
shard interrupted by a crash is rebuilt with exactly the same members, so it comes out
byte-identical. Outputs live in one folder per dataset and variant:

    shards/frames/<dataset>/fps<F>-s<S>-<views>-<config hash>/NNNNN.{plan.json,tar,parquet,_stats.json}

A shard's unit key hashes the stage, its code version, the resolved config (fps, size,
views, encoding, decoder) and its members' content hashes (DESIGN.md "Caching and reruns").
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.config import DatasetConfig, FramesConfig, config_hash
from stages.frames.views import view_names
from stages.frames.worker import DecodeWorker, WorkerSettings
from stages.reporting import Reporter
from stages.units import StageOutcome, UnitRunner, run_units, thread_runner
from warehouse.catalog import Catalog, file_lock
from warehouse.compact import compact_after_run
from warehouse.layout import DataRoot
from warehouse.shards import ShardWriter, commit_shard, stats_path, write_json_atomic
from warehouse.tables import clean_partials, now

STAGE = "frames"
CODE_VERSION = "frames-1"

# Rough bytes per stored pixel (x3 channels) by encoding, to size shards before decoding.
_BYTES_PER_PIXEL = {"jpg": 0.15, "npy.zst": 0.7}


@dataclass(frozen=True)
class Member:
    video_id: str
    sha256: str
    raw_path: str
    source: str
    duration_s: float
    rotation: int
    codec: str
    label: str | None
    key: str


@dataclass
class ShardPlan:
    number: int
    unit: str
    members: list[Member]
    variant_dir: str  # relative to the data root

    @property
    def name(self) -> str:
        return f"{self.number:05d}"


@dataclass
class FramesPlan:
    dataset: DatasetConfig
    config: FramesConfig  # resolved for this dataset
    flip_sensitive: bool
    views: list[str]
    variant_dir: str
    pending: list[ShardPlan]
    committed: int
    new_videos: int
    skipped_videos: int  # failed/duplicate upstream
    forced: bool = False
    planned_now: int = 0  # shards of new videos planned by this call (the last ones in `pending`)

    def describe(self) -> str:
        c = self.config
        text = (
            f"frames {self.dataset.name} ({c.fps:g} fps, {c.size} px, {c.views}: {len(self.views)} views, {c.encoding}): "
            f"{self.committed} shards cached; "
        )
        if self.pending:
            reason = "forced" if self.forced else f"{self.new_videos} new videos"
            text += f"{len(self.pending)} shards to build ({sum(len(s.members) for s in self.pending)} videos; {reason})"
        else:
            text += "nothing to do"
        if self.skipped_videos:
            text += f"; {self.skipped_videos} videos not usable upstream (failed or duplicate in `videos`) skipped"
        return text


# Appendix C: "We sample frames at 2 FPS for datasets with longer videos (i.e., UCF101 and
# Kinetics-400), and sample 4 FPS for datasets with shorter videos (i.e., HMDB51, SSV2, Diving48)."
LAYOUT_FPS = {"ucf101": 2.0, "kinetics": 2.0, "hmdb51": 4.0, "ssv2": 4.0, "diving48": 4.0}


def resolve_config(dataset: DatasetConfig, cfg: FramesConfig, labeled: bool, detected_layout: str | None = None) -> FramesConfig:
    """Per-dataset settings win, then the paper's rate for a known benchmark layout (as configured,
    else as ingest detected it), then frames.fps; `auto` views mean downstream for labeled data (Sec. 4)."""
    views = dataset.views or (cfg.views if cfg.views != "auto" else ("downstream" if labeled else "pretrain"))
    layout = dataset.layout if dataset.layout != "auto" else detected_layout
    return cfg.model_copy(update={"fps": dataset.fps or LAYOUT_FPS.get(layout or "") or cfg.fps, "views": views})


def detected_layout(root: DataRoot, dataset: str) -> str | None:
    """The layout ingest recorded for the dataset (None before ingest)."""
    try:
        rows = Catalog(root).rows("SELECT layout FROM datasets WHERE dataset = ?", [dataset])
    except FileNotFoundError:  # no catalog yet: nothing detected
        return None
    return rows[0][0] if rows else None


def sample_key(video_id: str) -> str:
    """A WebDataset key: no dots (they split extensions), unique, readable."""
    safe = re.sub(r"[^A-Za-z0-9_\-]+", "_", video_id).strip("_") or "video"
    return f"{safe}-{hashlib.sha1(video_id.encode()).hexdigest()[:8]}"


def variant_name(cfg: FramesConfig, flip_sensitive: bool) -> str:
    return f"fps{cfg.fps:g}-s{cfg.size}-{cfg.views}-{_variant_hash(cfg, flip_sensitive)}"


def _variant_hash(cfg: FramesConfig, flip_sensitive: bool) -> str:
    blob = json.dumps([CODE_VERSION, config_hash(cfg), flip_sensitive])
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _unit_key(variant: str, members: list[Member]) -> str:
    blob = json.dumps([STAGE, variant, [(m.video_id, m.sha256) for m in members]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_plans(vdir: Path) -> list[ShardPlan]:
    plans = []
    for path in sorted(vdir.glob("*.plan.json")):
        data = json.loads(path.read_text())
        plans.append(ShardPlan(data["number"], data["unit"], [Member(**m) for m in data["members"]], data["variant_dir"]))
    return plans


def _save_plan(vdir: Path, plan: ShardPlan) -> None:
    write_json_atomic(
        {"number": plan.number, "unit": plan.unit, "variant_dir": plan.variant_dir, "members": [asdict(m) for m in plan.members]},
        vdir / f"{plan.name}.plan.json",
    )


def _dataset_facts(root: DataRoot, dataset: str) -> tuple[bool, bool]:
    rows = Catalog(root).rows("SELECT labeled, flip_sensitive FROM datasets WHERE dataset = ?", [dataset])
    return (bool(rows[0][0]), bool(rows[0][1])) if rows else (False, False)


def plan_frames(root: DataRoot, dataset: DatasetConfig, cfg: FramesConfig, *, force: bool = False, save: bool = True,
                facts: tuple[bool, bool] | None = None) -> FramesPlan:
    """The dataset's shards: those already planned (membership read back from their plan files)
    and new ones for videos in no shard yet, saved as plan files unless `save` is false. With
    `save=False` nothing in the data root is touched (`vimpac plan`): the same shards, unsaved.
    `facts` = (labeled, flip_sensitive) as ingest is about to record them (default: the catalog's)."""
    catalog = Catalog(root)
    if save:
        catalog.ensure_tables()
    labeled, recorded_flip = facts if facts is not None else _dataset_facts(root, dataset.name)
    # The flag given at ingest is recorded in `datasets`; either source can set it.
    flip_sensitive = dataset.flip_sensitive or recorded_flip
    cfg = resolve_config(dataset, cfg, labeled, detected_layout(root, dataset.name) if dataset.layout == "auto" else None)
    names = view_names(cfg.views, flip_sensitive)
    variant = variant_name(cfg, flip_sensitive)
    vdir = root.home / "shards" / STAGE / dataset.name / variant
    rel_vdir = f"shards/{STAGE}/{dataset.name}/{variant}"
    try:
        usable = catalog.rows(
            """SELECT video_id, sha256, raw_path, source, duration_s, coalesce(rotation, 0), codec, label
               FROM videos WHERE dataset = ? AND status = 'ok' ORDER BY video_id""",
            [dataset.name],
        )
        skipped = catalog.rows("SELECT count(*) FROM videos WHERE dataset = ? AND status <> 'ok'", [dataset.name])[0][0]
    except FileNotFoundError:
        if save:
            raise
        usable, skipped = [], 0  # planning on a data root without a catalog yet: no videos
    plans = _load_plans(vdir)
    assigned = {(m.video_id, m.sha256) for p in plans for m in p.members}
    new = [
        Member(vid, sha, raw, src, float(dur or 0.0), int(rot), codec or "", label, sample_key(vid))
        for vid, sha, raw, src, dur, rot, codec, label in usable
        if (vid, sha) not in assigned
    ]
    next_number = max((p.number for p in plans), default=-1) + 1
    # Size new shards by their expected output, so a shard holds about shard_target_mb; but
    # cut at least one shard per worker when there is little new data, or a small dataset
    # would decode on one core. Membership is saved below, so this never changes later.
    per_second = cfg.fps * len(names) * cfg.size * cfg.size * 3 * _BYTES_PER_PIXEL[cfg.encoding]
    estimates = [max(m.duration_s, 1.0 / cfg.fps) * per_second for m in new]
    target = cfg.shard_target_mb * 2**20
    if new:
        target = min(target, sum(estimates) / min(cfg.workers, len(new)))
    chunks: list[list[Member]] = []
    current: list[Member] = []
    size = 0.0
    for m, est in zip(new, estimates):
        if current and (size + est > target or len(current) >= cfg.max_videos_per_shard):
            chunks.append(current)
            current, size = [], 0.0
        current.append(m)
        size += est
    if current:
        chunks.append(current)
    new_plans = []
    for i, members in enumerate(chunks):
        new_plans.append(ShardPlan(next_number + i, _unit_key(variant, members), members, rel_vdir))
    for p in new_plans if save else []:
        vdir.mkdir(parents=True, exist_ok=True)
        _save_plan(vdir, p)
    all_plans = plans + new_plans
    pending = [p for p in all_plans if force or not stats_path(vdir / f"{p.name}.tar").exists()]
    return FramesPlan(
        dataset, cfg, flip_sensitive, names, rel_vdir, pending, committed=len(all_plans) - len(pending), new_videos=len(new),
        skipped_videos=int(skipped), forced=force, planned_now=len(new_plans),
    )


@dataclass
class ShardResult:
    number: int
    unit: str
    tar: str
    n_videos: int
    n_ok: int
    n_partial: int
    n_failed: int
    frames: int
    bytes: int
    source_seconds: float
    decode_s: float
    failures: list[dict] = field(default_factory=list)


def build_shard(
    root: DataRoot, plan: FramesPlan, shard: ShardPlan, *, run_id: str, reporter: Reporter | None = None
) -> ShardResult:
    """Decode the shard's videos in a supervised child process and commit the shard."""
    reporter = reporter or Reporter()
    cfg = plan.config
    vdir = root.home / shard.variant_dir
    tar_path = vdir / f"{shard.name}.tar"
    scratch = root.tmp / f"{STAGE}--{plan.dataset.name}--{shard.unit}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    settings = WorkerSettings(cfg.fps, cfg.size, cfg.views, plan.flip_sensitive, cfg.encoding, cfg.jpeg_quality, cfg.backend)
    worker = DecodeWorker(settings, scratch, cfg.decode_timeout_s)
    writer = ShardWriter(tar_path)
    created = now()
    cfg_hash = config_hash(cfg)
    rows: list[dict[str, Any]] = []
    failures: list[dict] = []
    try:
        for m in shard.members:
            job = asdict(m) | {"path": str(root.absolute(m.raw_path)), "dataset": plan.dataset.name}
            result = worker.run(job)
            if result.get("traceback"):
                reporter.warning(f"{plan.dataset.name}/{m.video_id}: {result['traceback']}")
            if result["status"] != "failed":
                files = result["files"]
                writer.add(m.key, {ext: Path(p).read_bytes() for ext, p in files.items()})
                for p in files.values():
                    Path(p).unlink(missing_ok=True)
            if result["status"] != "ok":
                failures.append({"video_id": m.video_id, "status": result["status"], "error_code": result.get("error_code"), "error": result.get("error")})
                reporter.warning(f"{plan.dataset.name}/{m.video_id}: {result['status']}: {result.get('error')}")
            rows.append(
                {
                    "dataset": plan.dataset.name,
                    "video_id": m.video_id,
                    "shard": f"{shard.variant_dir}/{shard.name}.tar",
                    "fps": cfg.fps,
                    "size": cfg.size,
                    "variant": cfg.views,
                    "n_frames": result.get("n_frames", 0),
                    "status": result["status"],
                    "error": result.get("error"),
                    "error_code": result.get("error_code"),
                    "expected_frames": result.get("expected_frames"),
                    "views": plan.views,
                    "key": m.key if result["status"] != "failed" else None,
                    "sha256": m.sha256,
                    "backend": result.get("backend"),
                    "fallback_reason": result.get("fallback_reason"),
                    "source_duration_s": m.duration_s,
                    "decode_s": result.get("decode_s"),
                    "bytes": result.get("bytes", 0),
                    "encoding": cfg.encoding,
                    "unit": shard.unit,
                    "config_hash": cfg_hash,
                    "code_version": CODE_VERSION,
                    "run_id": run_id,
                    "created_at": created,
                }
            )
    except BaseException:
        writer.abort()
        raise
    finally:
        worker.close()
        shutil.rmtree(scratch, ignore_errors=True)
    n_failed = sum(r["status"] == "failed" for r in rows)
    n_partial = sum(r["status"] == "partial" for r in rows)
    frames = sum(r["n_frames"] for r in rows)
    decode_s = sum(r["decode_s"] or 0.0 for r in rows)
    source_s = sum(r["source_duration_s"] for r in rows if r["status"] != "failed")
    stats = {
        "stage": STAGE, "dataset": plan.dataset.name, "shard": shard.name, "unit": shard.unit, "count": len(rows),
        "successes": len(rows) - n_failed - n_partial, "partial": n_partial, "failed_to_decode": n_failed, "frames": frames,
        "views": plan.views, "fps": cfg.fps, "size": cfg.size, "encoding": cfg.encoding, "config_hash": cfg_hash,
        "code_version": CODE_VERSION, "decode_s": round(decode_s, 3), "source_seconds": round(source_s, 3),
    }
    marker = {
        "stage": STAGE, "dataset": plan.dataset.name, "unit": shard.unit, "path": f"{shard.variant_dir}/{shard.name}.tar",
        "n_samples": len(rows), "n_failed": n_failed, "bytes": 0, "config_hash": cfg_hash, "code_version": CODE_VERSION,
        "run_id": run_id, "created_at": now(),
    }
    tar = commit_shard(
        writer, "frame_samples", rows, stats, marker,
        root.table_dir("shards", STAGE, f"{plan.dataset.name}--{Path(shard.variant_dir).name}--{shard.name}.parquet"),
    )
    return ShardResult(
        shard.number, shard.unit, root.relative(tar), len(rows), len(rows) - n_failed - n_partial, n_partial, n_failed,
        frames, tar.stat().st_size, source_s, decode_s, failures,
    )


FramesOutcome = StageOutcome


def _clean_leftovers(root: DataRoot, plan: FramesPlan) -> int:
    removed = 0
    for p in root.tmp.glob(f"{STAGE}--{plan.dataset.name}--*"):
        shutil.rmtree(p, ignore_errors=True)
        removed += 1
    removed += clean_partials(root.home / plan.variant_dir, ".*.partial")
    removed += clean_partials(root.table_dir("shards", STAGE), f".{plan.dataset.name}--*.partial")
    return removed


def run_frames(
    root: DataRoot,
    dataset: DatasetConfig,
    cfg: FramesConfig,
    *,
    run_id: str,
    force: bool = False,
    reporter: Reporter | None = None,
    runner: UnitRunner = thread_runner,
) -> FramesOutcome:
    """Plan the dataset's shards and build the pending ones, `cfg.workers` at a time."""
    reporter = reporter or Reporter()
    with file_lock(root.locks / f"{STAGE}--{dataset.name}.lock"):
        t0 = time.perf_counter()
        plan = plan_frames(root, dataset, cfg, force=force)
        removed = _clean_leftovers(root, plan)
        if removed:
            reporter.info(f"{dataset.name}: removed {removed} partial files left by an interrupted run")
        reporter.info(plan.describe())
        reporter.start_progress(sum(len(s.members) for s in plan.pending), f"frames {dataset.name}")
        results, errors = run_units(
            runner,
            functools.partial(_build_unit, root, plan, run_id),
            plan.pending,
            workers=plan.config.workers,
            name=lambda s: f"frames-{dataset.name}-{s.name}",
            describe=lambda s: f"shard {s.name} ({len(s.members)} videos)",
            reporter=reporter,
            label=dataset.name,
            progress=lambda rs: {"videos_done": sum(r.n_videos for r in rs), "frames_done": sum(r.frames for r in rs)},
        )
        seconds = time.perf_counter() - t0
        summary = summarize(plan, results, seconds)
        summary["shard_errors"] = len(errors)
        reporter.info(
            f"frames {dataset.name}: {summary['videos']} videos ({summary['ok']} ok, {summary['partial']} partial, "
            f"{summary['failed']} failed), {summary['frames']} frames, {summary['source_seconds_per_s']} source-s/s, "
            f"{summary['output_frames_per_s']} frames/s"
        )
        compact_after_run(root, STAGE, dataset.name, info=reporter.info, warning=reporter.warning)
        return FramesOutcome(plan, results, errors, summary)


def _build_unit(root: DataRoot, plan: FramesPlan, run_id: str, shard: ShardPlan) -> ShardResult:
    return build_shard(root, plan, shard, run_id=run_id)


def summarize(plan: FramesPlan, results: list[ShardResult], seconds: float) -> dict:
    videos = sum(r.n_videos for r in results)
    frames = sum(r.frames for r in results)
    source_s = sum(r.source_seconds for r in results)
    return {
        "dataset": plan.dataset.name,
        "variant_dir": plan.variant_dir,
        "fps": plan.config.fps,
        "size": plan.config.size,
        "views": plan.config.views,
        "n_views": len(plan.views),
        "shards_built": len(results),
        "shards_cached": plan.committed,
        "videos": videos,
        "ok": sum(r.n_ok for r in results),
        "partial": sum(r.n_partial for r in results),
        "failed": sum(r.n_failed for r in results),
        "frames": frames,
        "bytes": sum(r.bytes for r in results),
        "seconds": round(seconds, 3),
        "source_seconds": round(source_s, 3),
        "source_seconds_per_s": round(source_s / seconds, 2) if seconds > 0 else 0.0,
        "output_frames_per_s": round(frames / seconds, 2) if seconds > 0 else 0.0,
        "config_hash": config_hash(plan.config),
        "code_version": CODE_VERSION,
    }


def contact_sheet_for(root: DataRoot, outcome: FramesOutcome, path: Path, n_videos: int) -> Path | None:
    """A PNG of a few decoded videos, every view, for a person to check crops and flips."""
    from stages.frames.contact_sheet import contact_sheet
    from stages.frames.encoding import decode_view
    from warehouse.shards import read_samples

    rows: list[tuple[str, dict]] = []
    for result in outcome.results:
        if len(rows) >= n_videos:
            break
        for key, members in read_samples(root.absolute(result.tar)).items():
            if len(rows) >= n_videos:
                break
            meta = json.loads(members["json"])
            views = {}
            for name in meta["views"]:
                data = next(v for ext, v in members.items() if ext.startswith(name + "."))
                views[name] = decode_view(data, meta["encoding"])
            rows.append((meta["video_id"], views))
    if not rows:
        return None
    return contact_sheet(rows, path)
