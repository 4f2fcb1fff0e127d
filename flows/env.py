"""Point Prefect and MLflow at the data root before either is imported.

Prefect reads its settings when it is first imported, so this runs first in every entry
point (the CLI, served deployments, tests). Variables the user set are left alone: a server
URL in PREFECT_API_URL or MLFLOW_TRACKING_URI wins over the local defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from warehouse.layout import DataRoot

# The variables this module set, so a later call with another --home may change them while
# anything the user exported stays untouched.
_ours: set[str] = set()


def _set(name: str, value: str) -> None:
    if name in os.environ and name not in _ours:
        return
    os.environ[name] = value
    _ours.add(name)


def _unset(name: str) -> None:
    if name in _ours:
        os.environ.pop(name, None)
        _ours.discard(name)


def configure_environment(home: str | os.PathLike[str] | None = None) -> DataRoot:
    root = DataRoot(home)
    root.ensure()
    os.environ["VIMPAC_HOME"] = str(root.home)
    # While `vimpac server` runs for this data root, report to its servers, so runs started
    # from the CLI and from the UI land in the same Prefect and MLflow (flows/server.py).
    from flows.server import running_servers

    servers = running_servers(root)
    if servers:
        _set("PREFECT_API_URL", servers["prefect_api_url"])
        _set("MLFLOW_TRACKING_URI", servers["mlflow_url"])
    else:
        _unset("PREFECT_API_URL")
        _set("MLFLOW_TRACKING_URI", f"sqlite:///{root.mlflow_dir / 'mlflow.db'}")
    _set("PREFECT_HOME", str(root.prefect_dir))
    _set("PREFECT_LOCAL_STORAGE_PATH", str(root.prefect_dir / "storage"))
    # The temporary server Prefect starts without PREFECT_API_URL needs a little time on a
    # loaded 2-core machine; its default 20 s has been seen to expire under CI load.
    _set("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    _set("PREFECT_LOGGING_EXTRA_LOGGERS", "vimpac,stages,warehouse")
    _set("MLFLOW_DISABLE_TELEMETRY", "true")
    _set("DO_NOT_TRACK", "1")
    _set("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return root


def artifact_root(root: DataRoot) -> str:
    return Path(root.mlflow_dir / "artifacts").as_uri()
