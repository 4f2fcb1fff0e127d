"""What every per-dataset stage flow does around its stage function: prepare the catalog,
note runs that crashed earlier, open the tracked MLflow run, and log the outcome."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
from contextlib import contextmanager
from typing import Any, ContextManager, Iterator

from prefect import get_run_logger

from warehouse.catalog import Catalog, file_lock
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.tracking import StageContext, tracked_run


def run_name_from(stage: str, parameter: str = "dataset"):
    """A flow_run_name callable: `<stage>-<name of the parameter>` (a dataset's, a grid's or a
    pipeline's name), so runs read apart in the UI's list and timeline."""

    def name() -> str:
        from prefect.runtime import flow_run

        value = flow_run.parameters.get(parameter)
        return f"{stage}-{value.get('name') if isinstance(value, dict) else getattr(value, 'name', '?')}"

    return name


def run_lock(root: DataRoot, stage: str, key: str, logger) -> ContextManager[None]:
    """One run at a time per stage and dataset (DESIGN.md: the catalog stays single-writer).
    A second flow run of the same stage on the same data waits, says for whom, and then
    finds the first run's committed units cached: a no-op, never a half-overwritten shard."""
    from prefect.runtime import flow_run

    holder = f"{stage} of {key}: Prefect flow run {flow_run.id or '-'}, pid {os.getpid()} on {socket.gethostname()}"
    name = re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"run--{stage}--{key}")
    return file_lock(root.locks / f"{name}.lock", holder=holder,
                     on_wait=lambda who: logger.warning(f"{stage} of {key} waits for the run that holds it: {who}"))


@contextmanager
def stage_flow_run(stage: str, dataset: str, home: str | None, config: dict[str, Any], *,
                   lock_key: str | None = None) -> Iterator[StageContext]:
    """`lock_key` names the data the run writes (default: the dataset; training stages pass
    the set of datasets they train on)."""
    logger = get_run_logger()
    root = DataRoot(home).ensure()
    with run_lock(root, stage, lock_key or dataset, logger):
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
