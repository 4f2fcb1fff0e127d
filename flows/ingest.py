"""Prefect flow for the ingest stage: the stage plans, Prefect runs one task per pending batch."""

from __future__ import annotations

import csv
import io
import json
from typing import Iterator

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed

from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import STAGE, Batch, BatchResult, ingest_batch, run_ingest
from stages.reporting import Reporter
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.tracking import tracked_run


# The warehouse decides what is cached (a committed batch is never redone), so Prefect's own
# result caching stays off: it would need persisted results keyed on absolute paths that
# break when the data root moves (PITFALLS.md). Tasks take only plain, picklable arguments so
# any task runner (threads, Dask) can run them.
@task(name="ingest-batch", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE, persist_result=False)
def ingest_batch_task(home: str, dataset: str, batch: Batch, config: IngestConfig, run_id: str) -> BatchResult:
    return ingest_batch(DataRoot(home), dataset, batch, config, run_id=run_id, reporter=Reporter(get_run_logger()))


def prefect_runner(home: str, dataset: str, config: IngestConfig, run_id: str, reporter: Reporter):
    """Map batches onto Prefect tasks, at most `config.workers` in flight, whatever the task runner."""

    def run(batches: list[Batch]) -> Iterator[tuple[Batch, BatchResult | BaseException]]:
        in_flight: dict[PrefectFuture, Batch] = {}
        queue = list(batches)
        while queue or in_flight:
            while queue and len(in_flight) < config.workers:
                batch = queue.pop(0)
                fut = ingest_batch_task.with_options(task_run_name=f"ingest-{dataset}-{batch.unit}").submit(
                    home, dataset, batch, config, run_id
                )
                in_flight[fut] = batch
            fut = next(as_completed(list(in_flight)))
            batch = in_flight.pop(fut)
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001 - reported by the stage; other batches go on
                yield batch, e
                continue
            reporter.advance(result.n_videos)
            yield batch, result

    return run


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
    description="Copy a dataset's videos into the content-addressed raw store, hash and probe them, "
    "and record them in the catalog's `videos` view. Committed batches are skipped; `force` redoes every video.",
)
def ingest(dataset: DatasetConfig, config: IngestConfig | None = None, home: str | None = None, force: bool = False) -> dict:
    logger = get_run_logger()
    config = config or IngestConfig()
    root = DataRoot(home).ensure()
    catalog = Catalog(root)
    catalog.refresh()
    for run_id in mark_crashed_runs(root):
        logger.warning(f"run {run_id} was interrupted earlier; its committed batches are kept, the rest is redone")
    resolved = {"dataset": dataset.model_dump(), "ingest": config.model_dump(), "force": force}
    with tracked_run(root, STAGE, resolved, logger=logger, run_name=f"ingest-{dataset.name}", dataset=dataset.name) as ctx:
        runner = prefect_runner(str(root.home), dataset.name, config, ctx.record.run_id, ctx.reporter)
        outcome = run_ingest(root, dataset, config, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=runner)
        summary = outcome.summary
        ctx.record.summary = summary
        ctx.reporter.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        ctx.write_artifact("ingest_stats.json", json.dumps(summary, indent=2, sort_keys=True))
        if outcome.failures:
            ctx.write_artifact("failures.csv", _failures_csv(outcome.failures))
        if outcome.errors:
            raise RuntimeError(f"ingest {dataset.name}: {len(outcome.errors)} batches failed after retries: " + "; ".join(outcome.errors[:3]))
        return summary
