"""Prefect flow for the ingest stage: the stage plans, Prefect runs one task per pending batch."""

from __future__ import annotations

from prefect import flow

from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import STAGE, run_ingest

from flows.stage_flow import record_outcome, run_name_from, stage_flow_run
from flows.units import prefect_runner


@flow(
    name="ingest",
    flow_run_name=run_name_from(STAGE),
    description="Copy a dataset's videos into the content-addressed raw store, hash and probe them, "
    "and record them in the catalog's `videos` view. Committed batches are skipped; `force` redoes every video.",
)
def ingest(dataset: DatasetConfig, config: IngestConfig | None = None, home: str | None = None, force: bool = False) -> dict:
    config = config or IngestConfig()
    resolved = {"dataset": dataset.model_dump(), "ingest": config.model_dump(), "force": force}
    with stage_flow_run(STAGE, dataset.name, home, resolved) as ctx:
        outcome = run_ingest(
            ctx.root, dataset, config, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=prefect_runner
        )
        return record_outcome(ctx, STAGE, outcome.summary, outcome.failures, outcome.errors)
