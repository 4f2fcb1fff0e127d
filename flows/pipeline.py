"""The `pipeline` flow: every configured stage for every dataset, under one parent MLflow run."""

from __future__ import annotations

from prefect import flow, get_run_logger

from stages.config import PipelineConfig
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

from flows.ingest import ingest
from flows.tracking import tracked_run


@flow(name="pipeline", description="Run the configured stages (in DAG order) over the configured datasets.")
def pipeline(config: PipelineConfig, home: str | None = None, force: bool = False) -> dict:
    logger = get_run_logger()
    root = DataRoot(home).ensure()
    Catalog(root).refresh()
    summaries: dict[str, dict] = {}
    failed: list[str] = []
    with tracked_run(root, "pipeline", config.model_dump() | {"force": force}, logger=logger, run_name=config.name,
                     experiment=config.tracking.experiment) as ctx:
        if "ingest" in config.stages:
            for ds in config.datasets:
                # One dataset's failure (an unreadable source, say) must not stop the others.
                state = ingest(ds, config.ingest, str(root.home), force, return_state=True)
                if state.is_completed():
                    summaries[f"ingest/{ds.name}"] = state.result()
                else:
                    failed.append(f"ingest/{ds.name}: {state.message}")
                    logger.error(f"ingest of {ds.name} failed: {state.message}")
        ctx.record.summary = {"stages": summaries, "failed": failed}
        if failed:
            raise RuntimeError(f"{len(failed)} stage runs failed: " + "; ".join(failed))
    return summaries
