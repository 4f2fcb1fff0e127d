from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

# One MLflow database for the whole session: creating a SQLite tracking store runs its
# migrations (seconds), too slow to repeat per test. Tests that check the per-data-root
# default run the CLI in a subprocess without this variable. Under pytest-xdist each worker
# inherits the controller's environment, so a worker takes its own directory: two processes
# migrating one fresh SQLite file race each other.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if _WORKER and "VIMPAC_TEST_TMP" in os.environ and not os.environ["VIMPAC_TEST_TMP"].endswith(f"-{_WORKER}"):
    _inherited = os.environ.pop("VIMPAC_TEST_TMP")
    if os.environ.get("MLFLOW_TRACKING_URI") == f"sqlite:///{Path(_inherited) / 'mlflow.db'}":
        del os.environ["MLFLOW_TRACKING_URI"]
    os.environ["VIMPAC_TEST_TMP"] = f"{_inherited}-{_WORKER}"
if _WORKER:
    # Two workers on two cores: one compute thread each. OpenMP threads that spin-wait for a
    # core the other worker holds make a run several times slower (measured: 22 CPU-minutes
    # for 13 with two threads per worker). Subprocesses (CLI runs, torchrun ranks) inherit it.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
_SESSION_DIR = Path(os.environ.setdefault("VIMPAC_TEST_TMP", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"vimpac-tests-{os.getpid()}")))
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_SESSION_DIR / 'mlflow.db'}")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

from http_fixtures import http_server  # noqa: E402,F401  (fixture)
from media_fixtures import make_video  # noqa: E402

from warehouse.layout import DataRoot  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`longest` tests first, then modules with end-to-end (`slow`) tests, each module kept
    together: with two pytest-xdist workers (the README's test command) the long ones start
    at once and the quick ones fill the other worker, instead of a long test starting last."""

    def module(item) -> str | None:
        return getattr(getattr(item, "module", None), "__name__", None)

    marked = {name: {module(i) for i in items if i.get_closest_marker(name)} - {None} for name in ("longest", "slow")}
    items.sort(key=lambda item: 0 if module(item) in marked["longest"] else 1 if module(item) in marked["slow"] else 2)


@pytest.fixture(scope="session", autouse=True)
def _session_dir_cleanup():
    yield
    import shutil

    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.fixture
def root(tmp_path) -> DataRoot:
    return DataRoot(tmp_path / "home").ensure()


@pytest.fixture
def video_dir(tmp_path):
    """Factory: a folder of `n` distinct small videos, optionally under class folders."""

    def make(name: str = "src", n: int = 3, classes: list[str] | None = None, seed0: int = 0) -> Path:
        folder = tmp_path / name
        for i in range(n):
            sub = folder / classes[i % len(classes)] if classes else folder
            make_video(sub / f"clip{seed0 + i:03d}.mp4", seed=seed0 + i)
        return folder

    return make


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API for in-process flow runs (started once per session)."""
    _SESSION_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(_SESSION_DIR / "prefect"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
