"""Prefect flow for the ingest stage: plan, then one task per pending batch."""

from __future__ import annotations

import csv
import io
import json
import time

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import STAGE, Batch, BatchResult, ingest_batch, plan_ingest, record_dataset, summarize
from stages.reporting import Reporter
from warehouse.catalog import Catalog, file_lock
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.tracking import tracked_run


# The warehouse decides what is cached (a committed batch is never redone), so Prefect's own
# result caching stays off: it would need persisted results keyed on absolute paths that
# break when the data root moves (PITFALLS.md).
# Tasks get only plain, picklable arguments so any task runner (threads, Dask) can run them.
@task(name="ingest-batch", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def ingest_batch_task(home: str, dataset: str, batch: Batch, config: IngestConfig, run_id: str) -> BatchResult:
    return ingest_batch(DataRoot(home), dataset, batch, config, run_id=run_id, reporter=Reporter(get_run_logger()))


def _drain(in_flight: list[PrefectFuture], keep: int, results: list[BatchResult], errors: list[str], reporter: Reporter) -> list[PrefectFuture]:
    """Wait until at most `keep` batches are still running, collecting the finished ones."""
    remaining = list(in_flight)
    if len(remaining) <= keep:
        return remaining
    for fut in as_completed(remaining):
        remaining.remove(fut)
        try:
            result = fut.result()
        except Exception as e:  # noqa: BLE001 - recorded; the other batches go on
            errors.append(f"task {fut.task_run_id}: {type(e).__name__}: {e}")
            continue
        results.append(result)
        reporter.advance(result.n_videos)
        if len(remaining) <= keep:
            break
    return remaining


def _failures_csv(failures: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["video_id", "source", "error_code", "retryable", "error"])
    writer.writeheader()
    writer.writerows(failures)
    return buf.getvalue()


def _run_name() -> str:
    from prefect.runtime import flow_run

    ds = flow_run.parameters.get("dataset")
    name = ds.get("name") if isinstance(ds, dict) else getattr(ds, "name", "?")
    return f"ingest-{name}"


@flow(
    name="ingest",
    flow_run_name=_run_name,
    description="Copy a dataset's videos into the content-addressed raw store, hash and probe them, and record them in the catalog's `videos` view.",
)
def ingest(dataset: DatasetConfig, config: IngestConfig | None = None, home: str | None = None, force: bool = False) -> dict:
    """Ingest one dataset. Committed batches are skipped; `force` redoes every video."""
    logger = get_run_logger()
    config = config or IngestConfig()
    root = DataRoot(home).ensure()
    catalog = Catalog(root)
    catalog.refresh()
    for run_id in mark_crashed_runs(root):
        logger.warning(f"run {run_id} was interrupted earlier; its committed batches are kept, the rest is redone")
    resolved = {"dataset": dataset.model_dump(), "ingest": config.model_dump(), "force": force}
    # One writer per (stage, dataset): a second concurrent run waits, then finds the work done.
    with file_lock(root.locks / f"{STAGE}--{dataset.name}.lock"):
        with tracked_run(root, STAGE, resolved, logger=logger, run_name=f"ingest-{dataset.name}", dataset=dataset.name) as ctx:
            t0 = time.perf_counter()
            plan = plan_ingest(root, dataset, config, force=force)
            logger.info(plan.describe())
            for warning in plan.listing.warnings:
                logger.warning(f"{dataset.name}: {warning}")
            if plan.listing.duplicates:
                dupes = sorted(set(plan.listing.duplicates))
                logger.warning(
                    f"{dataset.name}: {len(plan.listing.duplicates)} duplicate entries in the source recorded once: {', '.join(dupes[:10])}"
                    + (" ..." if len(dupes) > 10 else "")
                )
            record_dataset(root, plan)
            results: list[BatchResult] = []
            errors: list[str] = []
            ctx.reporter.start_progress(plan.pending, f"ingest {dataset.name}")
            in_flight = []
            # At most `workers` batches in flight, whatever task runner the flow runs on.
            for batch in plan.batches:
                in_flight.append(
                    ingest_batch_task.with_options(task_run_name=f"ingest-{dataset.name}-{batch.unit}").submit(
                        str(root.home), dataset.name, batch, config, ctx.record.run_id
                    )
                )
                in_flight = _drain(in_flight, config.workers - 1, results, errors, ctx.reporter)
            _drain(in_flight, 0, results, errors, ctx.reporter)
            ctx.reporter.stop_progress()
            summary = summarize(plan, results, time.perf_counter() - t0)
            summary["batch_errors"] = len(errors)
            ctx.record.summary = summary
            ctx.reporter.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            ctx.write_artifact("ingest_stats.json", json.dumps(summary, indent=2, sort_keys=True))
            failures = [f for r in results for f in r.failures]
            if failures:
                ctx.write_artifact("failures.csv", _failures_csv(failures))
            catalog.refresh()
            logger.info(
                f"ingest {dataset.name}: {summary['processed']} processed ({summary['ok']} ok, {summary['failed']} failed), "
                f"{summary['cached']} cached, {summary['mb_per_s']} MB/s"
            )
            if errors:
                raise RuntimeError(f"ingest {dataset.name}: {len(errors)} batches failed after retries: " + "; ".join(errors[:3]))
            return summary
