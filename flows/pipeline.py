"""The `pipeline` flow: every configured stage for every dataset, under one parent MLflow run."""

from __future__ import annotations

from prefect import flow, get_run_logger

from stages.config import PipelineConfig
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

from flows.frames import frames
from flows.ingest import ingest
from flows.tracking import tracked_run


@flow(name="pipeline", description="Run the configured stages (in DAG order) over the configured datasets.")
def pipeline(config: PipelineConfig, home: str | None = None, force: bool = False) -> dict:
    logger = get_run_logger()
    root = DataRoot(home).ensure()
    Catalog(root).refresh()
    summaries: dict[str, dict] = {}
    failed: list[str] = []
    stage_flows = {"ingest": (ingest, config.ingest), "frames": (frames, config.frames)}
    with tracked_run(root, "pipeline", config.model_dump() | {"force": force}, logger=logger, run_name=config.name,
                     experiment=config.tracking.experiment) as ctx:
        for ds in config.datasets:
            for stage in config.stages:
                if any(f.startswith(f"{ds.name}/") for f in failed):
                    # A later stage never runs on a dataset whose earlier stage failed.
                    logger.warning(f"{stage} of {ds.name} skipped: an earlier stage failed")
                    continue
                stage_flow, stage_cfg = stage_flows[stage]
                # One dataset's failure (an unreadable source, say) must not stop the others.
                state = stage_flow(ds, stage_cfg, str(root.home), force, return_state=True)
                if state.is_completed():
                    summaries[f"{stage}/{ds.name}"] = state.result()
                else:
                    failed.append(f"{ds.name}/{stage}: {state.message}")
                    logger.error(f"{stage} of {ds.name} failed: {state.message}")
        ctx.record.summary = {"stages": summaries, "failed": failed}
        if failed:
            raise RuntimeError(f"{len(failed)} stage runs failed: " + "; ".join(failed))
    return summaries
