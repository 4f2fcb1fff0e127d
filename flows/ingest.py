"""Prefect flow for the ingest stage: the stage plans, Prefect runs one task per pending batch."""

from __future__ import annotations

from prefect import flow

from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import STAGE, run_ingest

from flows.dask_runner import unit_runner
from flows.stage_flow import record_outcome, run_name_from, stage_flow_run


@flow(
    name="ingest",
    flow_run_name=run_name_from(STAGE),
    description="Copy a dataset's videos into the content-addressed raw store, hash and probe them, "
    "and record them in the catalog's `videos` view. Committed batches are skipped; `force` redoes every video. "
    "`dask`: run the batches on a Dask cluster (`local`, `local:N` or a scheduler address; docs/scale-out.md).",
)
def ingest(dataset: DatasetConfig, config: IngestConfig | None = None, home: str | None = None, force: bool = False,
           dask: str | None = None) -> dict:
    """Ingest one dataset's videos into the raw store and the catalog.

    Args:
        dataset: the dataset: its name, its source (directory, manifest, list, file or URL) and layout.
        config: batch size, parallelism, download retries and probing settings.
        home: the data root (default: the server's VIMPAC_HOME).
        force: re-ingest every video, even those already committed.
        dask: run the units on a Dask cluster: `local` (one worker process per core), `local:N` (N workers) or a
            scheduler address such as tcp://host:8786; empty: threads in this flow run (docs/scale-out.md).
    """
    config = config or IngestConfig()
    resolved = {"dataset": dataset.model_dump(), "ingest": config.model_dump(), "force": force} | ({"dask": dask} if dask else {})
    with stage_flow_run(STAGE, dataset.name, home, resolved) as ctx, unit_runner(dask, ctx.root, reporter=ctx.reporter) as runner:
        outcome = run_ingest(ctx.root, dataset, config, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=runner)
        if dask:
            outcome.summary.update(runner.summary())
        return record_outcome(ctx, STAGE, outcome.summary, outcome.failures, outcome.errors)
