"""The ingest stage: list a dataset's source, plan what is new, and ingest it batch by batch.

A batch is the unit of work (DESIGN.md "Caching and reruns"): its key hashes the stage, the
code version, the output-affecting config and the fingerprints of its entries. Each batch
writes one Parquet file of `videos` rows and then its commit marker in `shards`, so a run
killed at any point leaves only whole, committed batches; a rerun plans the rest again.
One bad video never fails a batch: every failure becomes a row with status 'failed', a short
`error_code` and an `error` sentence naming the source and the cause.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
import traceback
from collections import Counter
import functools
from dataclasses import dataclass, field

from stages.config import DatasetConfig, IngestConfig, config_hash
from stages.ingest.fetch import FetchError, FetchLimits, fetch
from stages.ingest.probe import ProbeError, probe_video
from stages.ingest.sources import Entry, SourceListing, list_source
from stages.reporting import Reporter
from stages.units import StageOutcome, UnitRunner, run_units, thread_runner
from warehouse.catalog import Catalog, file_lock
from warehouse.compact import compact_after_run
from warehouse.layout import DataRoot
from warehouse.tables import clean_partials, now, write_rows

STAGE = "ingest"
# Bump when the stage's output for the same input and config changes; part of every key.
CODE_VERSION = "ingest-1"

log = logging.getLogger(__name__)


@dataclass
class Batch:
    unit: str
    entries: list[Entry]


@dataclass
class IngestPlan:
    dataset: DatasetConfig
    listing: SourceListing
    config_hash: str
    batches: list[Batch]
    cached: int
    reasons: Counter = field(default_factory=Counter)
    # Entries new to the catalog, and entries whose source fingerprint changed, counted whatever
    # they run for (also under --force): what may bring new content to the later stages.
    new_inputs: int = 0
    changed_inputs: int = 0

    @property
    def pending(self) -> int:
        return sum(len(b.entries) for b in self.batches)

    def describe(self) -> str:
        ds = self.dataset.name
        parts = [f"ingest {ds}: {len(self.listing.entries)} videos in source ({self.listing.layout} layout)"]
        parts.append(f"{self.cached} cached (same source, config {self.config_hash} and code {CODE_VERSION})")
        if self.pending:
            why = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons.items()))
            parts.append(f"{self.pending} to ingest in {len(self.batches)} batches ({why})")
        else:
            parts.append("nothing to do")
        return "; ".join(parts)


def entry_key(dataset: str, entry: Entry, cfg_hash: str) -> str:
    blob = json.dumps([STAGE, CODE_VERSION, cfg_hash, dataset, entry.video_id, entry.fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()


def _existing(root: DataRoot, dataset: str, *, read_only: bool = False) -> dict[str, dict]:
    """The latest committed row of every video already in the catalog for this dataset.
    `read_only`: touch nothing in the data root (`vimpac plan`); no catalog yet means no rows."""
    sql = """SELECT video_id, status, retryable, fingerprint, config_hash, code_version, entry_key, source
             FROM (SELECT * FROM videos_log SEMI JOIN shards s
                   ON s.stage = 'ingest' AND s.dataset = videos_log.dataset AND s.unit = videos_log.unit)
             WHERE dataset = ?
             QUALIFY row_number() OVER (PARTITION BY video_id ORDER BY ingested_at DESC, unit DESC) = 1"""
    cols = ["video_id", "status", "retryable", "fingerprint", "config_hash", "code_version", "entry_key", "source"]
    catalog = Catalog(root)
    if read_only:
        try:
            rows = catalog.rows(sql, [dataset])
        except FileNotFoundError:
            return {}
    else:
        catalog.ensure_tables()
        rows = catalog.rows(sql, [dataset])
    return {r[0]: dict(zip(cols, r)) for r in rows}


def plan_ingest(root: DataRoot, dataset: DatasetConfig, cfg: IngestConfig, *, force: bool = False,
                read_only: bool = False) -> IngestPlan:
    """What a run would ingest and why. `read_only` plans without writing anything to the
    data root (`vimpac plan`); the batches are the same."""
    existing = _existing(root, dataset.name, read_only=read_only)
    # Ids already in the catalog keep their files when a new file with the same stem appears.
    listing = list_source(dataset, cfg, {vid: row["source"] for vid, row in existing.items()})
    cfg_hash = config_hash(cfg)
    pending: list[tuple[str, Entry]] = []
    reasons: Counter = Counter()
    new_inputs = changed_inputs = 0
    for e in listing.entries:
        key = entry_key(dataset.name, e, cfg_hash)
        prev = existing.get(e.video_id)
        new_inputs += prev is None
        changed_inputs += prev is not None and prev["fingerprint"] != e.fingerprint
        if force:
            reason = "forced"
        elif prev is None:
            reason = "new"
        elif prev["entry_key"] != key:
            if prev["fingerprint"] != e.fingerprint:
                reason = "source changed"
            elif prev["code_version"] != CODE_VERSION:
                reason = "code changed"
            else:
                reason = "config changed"
        elif prev["status"] == "failed" and prev["retryable"]:
            reason = "retrying transient failure"
        elif prev["status"] == "failed" and cfg.retry_failed:
            reason = "retrying failure"
        else:
            continue
        reasons[reason] += 1
        pending.append((key, e))
    batches = []
    for i in range(0, len(pending), cfg.batch_size):
        chunk = pending[i : i + cfg.batch_size]
        unit = hashlib.sha256(json.dumps([k for k, _ in chunk]).encode()).hexdigest()[:16]
        batches.append(Batch(unit=unit, entries=[e for _, e in chunk]))
    return IngestPlan(dataset, listing, cfg_hash, batches, cached=len(listing.entries) - len(pending), reasons=reasons,
                      new_inputs=new_inputs, changed_inputs=changed_inputs)


def _limits(cfg: IngestConfig) -> FetchLimits:
    return FetchLimits(
        max_bytes=cfg.max_bytes,
        connect_timeout_s=cfg.connect_timeout_s,
        read_timeout_s=cfg.read_timeout_s,
        total_timeout_s=cfg.total_timeout_s,
        retries=cfg.retries,
        backoff_s=cfg.backoff_s,
        max_redirects=cfg.max_redirects,
    )


def ingest_entry(root: DataRoot, dataset: str, entry: Entry, cfg: IngestConfig) -> dict:
    """Fetch, hash, store and probe one video. Never raises: failures become the row's status."""
    row: dict = {
        "dataset": dataset,
        "video_id": entry.video_id,
        "source": entry.source,
        "label": entry.label,
        "split": entry.split,
        "splits": entry.splits,
        "fingerprint": entry.fingerprint,
        "status": "failed",
        "retryable": False,
    }
    if entry.error:
        row.update(error=entry.error, error_code=entry.error_code or "bad_manifest_row")
        return row
    tmp = root.temp_file(prefix=f"{STAGE}--{dataset}--")
    try:
        fetched = fetch(entry.source, tmp, _limits(cfg))
        row.update(sha256=fetched.sha256, bytes=fetched.bytes)
        stored, _ = root.store_raw(tmp, fetched.sha256)
        row["raw_path"] = root.relative(stored)
        probe = probe_video(stored, decode_check_frames=cfg.decode_check_frames)
        row.update(
            status="ok",
            duration_s=probe.duration_s,
            fps=probe.fps,
            n_frames=probe.n_frames,
            width=probe.width,
            height=probe.height,
            codec=probe.codec,
            container=probe.container,
            rotation=probe.rotation,
            has_video=probe.has_video,
            has_audio=probe.has_audio,
            start_time_s=probe.start_time_s,
        )
    except FetchError as e:
        row.update(error=str(e), error_code=e.code, retryable=e.retryable)
    except ProbeError as e:
        # The probe names the stored copy; the user knows the video by its source.
        message = str(e).replace(f"{row.get('raw_path') and root.absolute(row['raw_path'])}: ", "")
        row.update(error=f"{entry.source}: {message}", error_code=e.code)
        if e.code == "no_video_stream":
            row["has_video"] = False
    except Exception as e:  # noqa: BLE001 - a bug or an environment fault must not sink the batch
        log.error("ingest of %s failed unexpectedly:\n%s", entry.source, traceback.format_exc())
        row.update(error=f"{entry.source}: unexpected {type(e).__name__}: {e}", error_code="internal", retryable=True)
    finally:
        tmp.unlink(missing_ok=True)
    return row


@dataclass
class BatchResult:
    unit: str
    n_videos: int
    n_ok: int
    n_failed: int
    bytes: int
    seconds: float
    failures: list[dict]


def ingest_batch(
    root: DataRoot, dataset: str, batch: Batch, cfg: IngestConfig, *, run_id: str, reporter: Reporter | None = None
) -> BatchResult:
    """Ingest one batch and commit it: rows file first, then the marker that makes it visible."""
    reporter = reporter or Reporter()
    t0 = time.perf_counter()
    cfg_hash = config_hash(cfg)
    rows = []
    for entry in batch.entries:
        row = ingest_entry(root, dataset, entry, cfg)
        row.update(
            ingested_at=now(),
            entry_key=entry_key(dataset, entry, cfg_hash),
            config_hash=cfg_hash,
            code_version=CODE_VERSION,
            run_id=run_id,
            unit=batch.unit,
        )
        if row["status"] != "ok":
            reporter.warning(f"{dataset}/{entry.video_id}: {row['error_code']}: {row['error']}")
        rows.append(row)
    rows_path = root.table_dir("videos", dataset, f"{batch.unit}.parquet")
    write_rows("videos", rows, rows_path)
    n_failed = sum(r["status"] != "ok" for r in rows)
    n_bytes = sum(r.get("bytes") or 0 for r in rows)
    write_rows(
        "shards",
        [
            {
                "stage": STAGE,
                "dataset": dataset,
                "unit": batch.unit,
                "path": root.relative(rows_path),
                "n_samples": len(rows),
                "n_failed": n_failed,
                "bytes": n_bytes,
                "config_hash": cfg_hash,
                "code_version": CODE_VERSION,
                "run_id": run_id,
                "created_at": now(),
            }
        ],
        root.table_dir("shards", STAGE, f"{dataset}--{batch.unit}.parquet"),
    )
    failures = [
        {k: r.get(k) for k in ("video_id", "source", "error_code", "error", "retryable")} for r in rows if r["status"] != "ok"
    ]
    return BatchResult(batch.unit, len(rows), len(rows) - n_failed, n_failed, n_bytes, time.perf_counter() - t0, failures)


def record_dataset(root: DataRoot, plan: IngestPlan) -> None:
    """The dataset's own facts (layout, classes, flip sensitivity) for later stages."""
    write_rows(
        "datasets",
        [
            {
                "dataset": plan.dataset.name,
                "source": plan.dataset.source,
                "layout": plan.listing.layout,
                "labeled": plan.listing.labeled,
                # Either the user (flip_sensitive: true) or the layout itself (SSv2) can say so.
                "flip_sensitive": plan.dataset.flip_sensitive or plan.listing.flip_sensitive,
                "classes": plan.listing.classes,
                "n_entries": len(plan.listing.entries),
                "updated_at": now(),
            }
        ],
        root.table_dir("datasets", plan.dataset.name, "current.parquet"),
    )


def summarize(plan: IngestPlan, results: list[BatchResult], seconds: float) -> dict:
    n_videos = sum(r.n_videos for r in results)
    n_bytes = sum(r.bytes for r in results)
    return {
        "dataset": plan.dataset.name,
        "layout": plan.listing.layout,
        "entries": len(plan.listing.entries),
        "cached": plan.cached,
        "processed": n_videos,
        "ok": sum(r.n_ok for r in results),
        "failed": sum(r.n_failed for r in results),
        "batches": len(results),
        "duplicates_in_source": len(plan.listing.duplicates),
        "bytes": n_bytes,
        "seconds": round(seconds, 3),
        "videos_per_s": round(n_videos / seconds, 3) if seconds > 0 else 0.0,
        "mb_per_s": round(n_bytes / 2**20 / seconds, 3) if seconds > 0 else 0.0,
        "reasons": dict(plan.reasons),
        "host": socket.gethostname(),
        "config_hash": plan.config_hash,
        "code_version": CODE_VERSION,
    }


IngestOutcome = StageOutcome


def run_ingest(
    root: DataRoot,
    dataset: DatasetConfig,
    cfg: IngestConfig,
    *,
    run_id: str,
    force: bool = False,
    reporter: Reporter | None = None,
    runner: UnitRunner = thread_runner,
) -> IngestOutcome:
    """Plan the dataset, ingest every pending batch, and summarise. Batch-level crashes (after
    the runner's retries) are collected in `errors`; the other batches still commit."""
    reporter = reporter or Reporter()
    # One writer per (stage, dataset): a concurrent second run waits here, then finds the
    # work committed and does nothing.
    with file_lock(root.locks / f"{STAGE}--{dataset.name}.lock"):
        removed = _clean_leftovers(root, dataset.name)
        if removed:
            reporter.info(f"{dataset.name}: removed {removed} partial files left by an interrupted run")
        outcome = _run_locked(root, dataset, cfg, run_id=run_id, force=force, reporter=reporter, runner=runner)
        compact_after_run(root, STAGE, dataset.name, info=reporter.info, warning=reporter.warning)
        return outcome


def _clean_leftovers(root: DataRoot, dataset: str) -> int:
    return (
        clean_partials(root.tmp, f"{STAGE}--{dataset}--*.partial")
        + clean_partials(root.table_dir("videos", dataset), ".*.partial")
        + clean_partials(root.table_dir("shards", STAGE), f".{dataset}--*.partial")
    )


def _run_locked(
    root: DataRoot, dataset: DatasetConfig, cfg: IngestConfig, *, run_id: str, force: bool, reporter: Reporter,
    runner: UnitRunner,
) -> IngestOutcome:
    t0 = time.perf_counter()
    plan = plan_ingest(root, dataset, cfg, force=force)
    reporter.info(plan.describe())
    for warning in plan.listing.warnings:
        reporter.warning(f"{dataset.name}: {warning}")
    if plan.listing.duplicates:
        dupes = sorted(set(plan.listing.duplicates))
        more = " ..." if len(dupes) > 10 else ""
        reporter.warning(
            f"{dataset.name}: {len(plan.listing.duplicates)} duplicate entries in the source, each recorded once: "
            f"{', '.join(dupes[:10])}{more}"
        )
    record_dataset(root, plan)
    reporter.start_progress(plan.pending, f"ingest {dataset.name}")
    results, errors = run_units(
        runner,
        functools.partial(ingest_batch, root, dataset.name, cfg=cfg, run_id=run_id),
        plan.batches,
        workers=cfg.workers,
        name=lambda b: f"ingest-{dataset.name}-{b.unit}",
        describe=lambda b: f"batch {b.unit} ({len(b.entries)} videos)",
        reporter=reporter,
        label=dataset.name,
        progress=lambda rs: {"videos_done": sum(r.n_videos for r in rs), "videos_failed": sum(r.n_failed for r in rs)},
    )
    summary = summarize(plan, results, time.perf_counter() - t0)
    summary["batch_errors"] = len(errors)
    reporter.info(
        f"ingest {dataset.name}: {summary['processed']} processed ({summary['ok']} ok, {summary['failed']} failed), "
        f"{summary['cached']} cached, {summary['videos_per_s']} videos/s, {summary['mb_per_s']} MB/s"
    )
    return IngestOutcome(plan, results, errors, summary)
