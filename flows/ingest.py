"""Prefect flow for the ingest stage: the stage plans, Prefect runs one task per pending batch."""

from __future__ import annotations

import csv
import io
import json

from prefect import flow, get_run_logger

from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import STAGE, run_ingest
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.tracking import tracked_run
from flows.units import prefect_runner


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
        outcome = run_ingest(
            root, dataset, config, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=prefect_runner
        )
        summary = outcome.summary
        ctx.record.summary = summary
        ctx.reporter.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        ctx.write_artifact("ingest_stats.json", json.dumps(summary, indent=2, sort_keys=True))
        if outcome.failures:
            ctx.write_artifact("failures.csv", _failures_csv(outcome.failures))
        if outcome.errors:
            raise RuntimeError(f"ingest {dataset.name}: {len(outcome.errors)} batches failed after retries: " + "; ".join(outcome.errors[:3]))
        return summary
