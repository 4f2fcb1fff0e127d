"""Prefect flow for the frames stage: one task per pending shard, each on its own decoder process."""

from __future__ import annotations

from prefect import flow

from stages.config import DatasetConfig, FramesConfig
from stages.frames.stage import STAGE, contact_sheet_for, run_frames

from flows.dask_runner import unit_runner
from flows.stage_flow import record_outcome, run_name_from, stage_flow_run


@flow(
    name="frames",
    flow_run_name=run_name_from(STAGE),
    description="Decode each ingested video once, sample frames at a fixed rate on its own timestamps, cut the "
    "paper's fixed views and write WebDataset shards (catalog: `frame_samples`). Committed shards are skipped. "
    "`dask`: run the shards on a Dask cluster (`local`, `local:N` or a scheduler address; docs/scale-out.md).",
)
def frames(dataset: DatasetConfig, config: FramesConfig | None = None, home: str | None = None, force: bool = False,
           dask: str | None = None) -> dict:
    """Sample frames and cut views of an ingested dataset into WebDataset shards.

    Args:
        dataset: the ingested dataset (its name is enough; `fps`/`views` here override the stage settings).
        config: sampling rate, view size, views, encoding and decoder settings.
        home: the data root (default: the server's VIMPAC_HOME).
        force: rebuild every shard, even committed ones.
        dask: run the units on a Dask cluster: `local` (one worker process per core), `local:N` (N workers) or a
            scheduler address such as tcp://host:8786; empty: threads in this flow run (docs/scale-out.md).
    """
    config = config or FramesConfig()
    resolved = {"dataset": dataset.model_dump(), "frames": config.model_dump(), "force": force} | ({"dask": dask} if dask else {})
    with stage_flow_run(STAGE, dataset.name, home, resolved) as ctx, \
            unit_runner(dask, ctx.root, child_processes=True, reporter=ctx.reporter) as runner:
        outcome = run_frames(ctx.root, dataset, config, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=runner)
        if dask:
            outcome.summary.update(runner.summary())
        # The resolved per-dataset settings (fps, views) as the stage actually used them.
        ctx.write_artifact("frames_config.json", outcome.plan.config.model_dump_json(indent=2))
        if config.contact_sheet_videos and outcome.results:
            sheet = contact_sheet_for(ctx.root, outcome, ctx.artifact_dir / "contact_sheet.png", config.contact_sheet_videos)
            if sheet is not None:
                ctx.reporter.artifact(sheet)
        return record_outcome(ctx, STAGE, outcome.summary, outcome.failures, outcome.errors)
