"""The `runs` table: one Parquet file per run, replaced atomically when its state changes."""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pyarrow.parquet as pq

from warehouse.layout import DataRoot
from warehouse.tables import now, write_rows


def new_run_id(stage: str) -> str:
    return f"{stage}-{now().strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class RunRecord:
    run_id: str
    stage: str
    config: dict[str, Any]
    dataset: str | None = None
    parent_run_id: str | None = None
    mlflow_run_id: str | None = None
    prefect_flow_run_id: str | None = None
    status: str = "running"
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    started_at: datetime = field(default_factory=now)
    finished_at: datetime | None = None
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)

    def row(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "parent_run_id": self.parent_run_id,
            "stage": self.stage,
            "dataset": self.dataset,
            "mlflow_run_id": self.mlflow_run_id,
            "prefect_flow_run_id": self.prefect_flow_run_id,
            "config": json.dumps(self.config, sort_keys=True, default=str),
            "status": self.status,
            "error": self.error,
            "summary": json.dumps(self.summary, sort_keys=True, default=str),
            "host": self.host,
            "pid": self.pid,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


def save_run(root: DataRoot, record: RunRecord) -> None:
    write_rows("runs", [record.row()], root.table_dir("runs", record.stage, f"{record.run_id}.parquet"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_crashed_runs(root: DataRoot) -> list[str]:
    """Runs still 'running' whose process on this host is gone were killed: say so."""
    crashed = []
    runs_dir = root.tables / "runs"
    if not runs_dir.exists():
        return crashed
    host = socket.gethostname()
    for path in runs_dir.glob("*/*.parquet"):
        if path.parent.name == "_schema":
            continue
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception:  # noqa: BLE001 - an unreadable file is not ours to judge here
            continue
        for row in rows:
            if row["status"] == "running" and row["host"] == host and row["pid"] != os.getpid() and not _alive(row["pid"]):
                row.update(status="crashed", error="the process running it ended without finishing (killed?)", finished_at=now())
                write_rows("runs", [row], path)
                crashed.append(row["run_id"])
    return crashed
