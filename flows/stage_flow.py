"""What every per-dataset stage flow does around its stage function: prepare the catalog,
note runs that crashed earlier, open the tracked MLflow run, and log the outcome."""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from typing import Any, Iterator

from prefect import get_run_logger

from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.tracking import StageContext, tracked_run


def run_name_from(stage: str):
    """A flow_run_name callable: `<stage>-<dataset name>`."""

    def name() -> str:
        from prefect.runtime import flow_run

        ds = flow_run.parameters.get("dataset")
        return f"{stage}-{ds.get('name') if isinstance(ds, dict) else getattr(ds, 'name', '?')}"

    return name


@contextmanager
def stage_flow_run(stage: str, dataset: str, home: str | None, config: dict[str, Any]) -> Iterator[StageContext]:
    logger = get_run_logger()
    root = DataRoot(home).ensure()
    Catalog(root).refresh()
    for run_id in mark_crashed_runs(root):
        logger.warning(f"run {run_id} was interrupted earlier; its committed units are kept, the rest is redone")
    with tracked_run(root, stage, config, logger=logger, run_name=f"{stage}-{dataset}", dataset=dataset) as ctx:
        yield ctx


def record_outcome(ctx: StageContext, stage: str, summary: dict, failures: list[dict], errors: list[str]) -> dict:
    """Summary as metrics and stats JSON, failures as CSV; unit crashes fail the flow run
    after everything else was committed and logged."""
    ctx.record.summary = summary
    ctx.reporter.metrics({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    ctx.write_artifact(f"{stage}_stats.json", json.dumps(summary, indent=2, sort_keys=True, default=str))
    if failures:
        buf = io.StringIO()
        fields = sorted({k for f in failures for k in f}, key=lambda k: (k != "video_id", k))
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(failures)
        ctx.write_artifact("failures.csv", buf.getvalue())
    if errors:
        raise RuntimeError(f"{stage} {summary.get('dataset')}: {len(errors)} units failed after retries: " + "; ".join(errors[:3]))
    return summary
