"""How stages report progress, metrics and artifacts without importing prefect or mlflow.

A stage receives a `Reporter`; flows pass one that logs to Prefect and MLflow and drives a
terminal progress bar, tests pass `RecordingReporter` and assert on what it captured.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Reporter:
    """Default implementation: standard logging, metrics and artifacts dropped."""

    def __init__(self, logger: logging.Logger | None = None):
        self.logger = logger or logging.getLogger("vimpac")

    def info(self, msg: str) -> None:
        self.logger.info(msg)

    def warning(self, msg: str) -> None:
        self.logger.warning(msg)

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        """Numbers to track over a run (MLflow metrics)."""

    def artifact(self, path: str | Path) -> None:
        """A file to keep with the run (MLflow artifact)."""

    def start_progress(self, total: int, description: str) -> None:
        """Begin a unit counter, e.g. videos to ingest."""

    def advance(self, n: int = 1) -> None:
        """Count finished units; called from worker threads."""


@dataclass
class RecordingReporter(Reporter):
    """Keeps everything in lists, for tests."""

    messages: list[tuple[str, str]] = field(default_factory=list)
    metric_log: list[tuple[dict[str, float], int | None]] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    advanced: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        super().__init__()

    def info(self, msg: str) -> None:
        self.messages.append(("info", msg))

    def warning(self, msg: str) -> None:
        self.messages.append(("warning", msg))

    def metrics(self, values: dict[str, Any], step: int | None = None) -> None:
        self.metric_log.append((dict(values), step))

    def artifact(self, path: str | Path) -> None:
        self.artifacts.append(Path(path))

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.advanced += n

    def text(self) -> str:
        return "\n".join(m for _, m in self.messages)
