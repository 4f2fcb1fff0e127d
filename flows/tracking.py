"""MLflow tracking and the `runs` table for every stage run.

A pipeline invocation is one parent MLflow run; each stage run inside it is a nested run. A
stage started on its own is a top-level run. Every run also gets a row in the catalog's
`runs` view (its resolved config, the MLflow run id and the Prefect flow-run id), so each
system links to the others. Metrics are sent with `MlflowClient.log_batch` from the driver
process only (one SQLite writer; worker threads go through a lock).
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from stages.reporting import Reporter
from warehouse.layout import DataRoot
from warehouse.runs import RunRecord, new_run_id, save_run
from warehouse.tables import now

from flows.env import artifact_root

_parent: contextvars.ContextVar[RunRecord | None] = contextvars.ContextVar("vimpac_parent_run", default=None)

MAX_PARAM_CHARS = 6000


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params with dotted keys (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def _prefect_flow_run() -> tuple[str | None, str | None]:
    """The current Prefect flow run's id and its address in the Prefect UI (None outside a run;
    the address only when a real server is configured)."""
    try:
        from prefect.runtime import flow_run

        run_id = str(flow_run.id) if flow_run.id else None
        # Prefect's temporary in-process server has no lasting address to link to.
        url = flow_run.ui_url if run_id and os.environ.get("PREFECT_API_URL") else None
        return run_id, (url if url and url.startswith("http") else None)
    except Exception:  # noqa: BLE001 - outside a flow run there is simply no id
        return None, None


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows a run: a URL for a tracking server, else the command that opens it."""
    if tracking_uri.startswith(("http://", "https://")):
        # MLflow 3's UI opens in its GenAI layout (traces, judges) unless told otherwise.
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"run {run_id} of experiment {experiment_id} (browse with `mlflow ui --backend-store-uri {tracking_uri}`)"


def _link_in_prefect(url: str, stage: str, run_id: str) -> None:
    """The MLflow run as a link artifact on the Prefect flow run, so the Prefect UI links to it."""
    if not url.startswith("http"):
        return
    try:
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link=url, link_text=f"MLflow run of {stage}", key=f"mlflow-{stage}".replace("_", "-"),
                             description=f"MLflow run {run_id}")
    except Exception:  # noqa: BLE001 - the link is a convenience; the run goes on without it
        pass


def _experiment_id(root: DataRoot, name: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # With a SQLite backend MLflow would put artifacts under ./mlartifacts of whatever the
    # current directory is; keep them in the data root instead.
    location = artifact_root(root) if mlflow.get_tracking_uri().startswith("sqlite:") else None
    try:
        # The kind tag makes MLflow's UI show the experiment as model training ("Training
        # runs") instead of asking its type on the first visit.
        return mlflow.create_experiment(name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # noqa: BLE001 - created meanwhile by another process
        return mlflow.get_experiment_by_name(name).experiment_id


class FlowReporter(Reporter):
    """Reporter for flows: Prefect logger, MLflow metrics and artifacts, a terminal bar."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, mlflow_run_id: str):
        super().__init__(logger)  # type: ignore[arg-type]
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        self.run_id = mlflow_run_id
        self._lock = threading.Lock()
        self._progress = None
        self._task = None
        self._step = 0

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._lock:
            if step is None:
                step = self._step
                self._step += 1
            batch = [Metric(k, float(v), ts, step) for k, v in values.items() if isinstance(v, (int, float))]
            if batch:
                self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: str | Path) -> None:
        with self._lock:
            self.client.log_artifact(self.run_id, str(path))

    def start_progress(self, total: int, description: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.stop_progress()
        if total <= 0:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def stop_progress(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


@dataclass
class StageContext:
    root: DataRoot
    record: RunRecord
    reporter: FlowReporter
    artifact_dir: Path

    def set_run_name(self, name: str) -> None:
        """Rename the MLflow run, e.g. to the recipe once the stage knows it (small-5x128-mp+cl)."""
        self.reporter.client.set_tag(self.reporter.run_id, "mlflow.runName", name)

    def write_artifact(self, name: str, content: str | bytes) -> Path:
        path = self.artifact_dir / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        self.reporter.artifact(path)
        return path


@contextmanager
def tracked_run(
    root: DataRoot,
    stage: str,
    config: dict[str, Any],
    *,
    logger: logging.Logger | logging.LoggerAdapter,
    run_name: str,
    dataset: str | None = None,
    experiment: str = "vimpac",
) -> Iterator[StageContext]:
    """An MLflow run (nested under the active pipeline run if any) plus its `runs` row."""
    import mlflow

    parent = _parent.get()
    record = RunRecord(
        run_id=new_run_id(stage),
        stage=stage,
        dataset=dataset,
        config=config,
        parent_run_id=parent.run_id if parent else None,
    )
    record.prefect_flow_run_id, prefect_url = _prefect_flow_run()
    tags = {"vimpac.stage": stage, "vimpac.run_id": record.run_id}
    if dataset:
        tags["vimpac.dataset"] = dataset
    if record.prefect_flow_run_id:
        tags["prefect.flow_run_id"] = record.prefect_flow_run_id
    if prefect_url:
        tags["prefect.flow_run_url"] = prefect_url
    active = mlflow.active_run()
    # A nested run must live in its parent's experiment.
    exp_id = active.info.experiment_id if parent is not None and active is not None else _experiment_id(root, experiment)
    with mlflow.start_run(
        run_name=run_name,
        experiment_id=exp_id,
        nested=parent is not None,
        parent_run_id=parent.mlflow_run_id if parent else None,
        tags=tags,
    ) as run:
        record.mlflow_run_id = run.info.run_id
        save_run(root, record)
        mlflow.log_params(flatten(config))
        mlflow.log_dict(config, "config.json")
        url = mlflow_run_url(mlflow.get_tracking_uri(), run.info.experiment_id, run.info.run_id)
        logger.info(f"{stage} run {record.run_id}: MLflow run {run.info.run_id} ({url})")
        _link_in_prefect(url, stage, run.info.run_id)
        reporter = FlowReporter(logger, run.info.run_id)
        artifact_dir = root.tmp / "artifacts" / record.run_id
        artifact_dir.mkdir(parents=True, exist_ok=True)
        token = _parent.set(record)
        try:
            yield StageContext(root, record, reporter, artifact_dir)
        except BaseException as e:
            record.status = "failed"
            record.error = f"{type(e).__name__}: {e}"
            raise
        else:
            record.status = "completed"
        finally:
            _parent.reset(token)
            reporter.stop_progress()
            record.finished_at = now()
            save_run(root, record)
            for p in artifact_dir.glob("*"):
                p.unlink(missing_ok=True)
            artifact_dir.rmdir()
