"""Data-stage units on a Dask cluster: the `dask` setting of the ingest, frames and tokenize flows.

    dask: null            Prefect's default task runner (threads in the flow process)
    dask: local           a LocalCluster for this flow run: one single-threaded worker process per
                          core, at most the stage's `workers` (more could never be busy); each
                          worker computes on its part of the flow process's threads
    dask: local:N         the same with exactly N worker processes
    dask: tcp://host:8786 an existing scheduler (also tls://, ws://, wss://, ucx://)

A flow cannot change its own task runner once it runs, and the setting has to work from a served
deployment's form too, so the flow opens a `prefect_dask.DaskTaskRunner` itself (`unit_runner`)
and `flows.units.prefect_runner` submits each unit's `run_unit` task to it: units stay task runs
of the flow (UI, retries), at most `workers` in flight, yielded as they finish, and every result
comes back to the flow process, which alone logs to MLflow and the catalog's `runs` table.

What a worker needs (checked before the first unit is sent, with a clear error):
- the data root at the same path (a LocalCluster shares the local disk; a remote cluster needs
  shared storage mounted at the same path on every worker);
- for frames, a non-daemonic worker process: each shard's decoder runs in a child process, and
  multiprocessing refuses children of daemonic processes, which Dask's nanny makes by default.
  The LocalCluster here is started with `distributed.worker.daemon: False`; start remote workers
  with `DASK_DISTRIBUTED__WORKER__DAEMON=False` (or `dask worker --no-nanny`);
- the Prefect API: the flow's settings travel with every task; when the flow uses Prefect's
  temporary local server, its address is handed to the workers (reachable from this machine only:
  remote workers need a real server in PREFECT_API_URL).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from stages import threads
from stages.reporting import Reporter
from warehouse.layout import DataRoot

from flows.units import prefect_runner

# A LocalCluster never gets more worker processes than this without an explicit `local:N`.
LOCAL_MAX_WORKERS = 32
# Schemes a Dask scheduler address may use.
ADDRESS_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx", "inproc")
# How long to wait for a remote scheduler to have at least one worker.
WAIT_FOR_WORKERS_S = 60.0

_ADDRESS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})/?")
_HELP = "use 'local', 'local:N' (N worker processes) or a scheduler address such as tcp://host:8786"


@dataclass(frozen=True)
class DaskTarget:
    """A parsed `dask` setting: a LocalCluster (address None, n_workers None for one per core)
    or an existing scheduler's address."""

    setting: str
    address: str | None = None
    n_workers: int | None = None

    @property
    def local(self) -> bool:
        return self.address is None

    def local_workers(self, stage_workers: int) -> int:
        """Worker processes of a LocalCluster for a stage that keeps `stage_workers` units in flight."""
        if self.n_workers is not None:
            return self.n_workers
        return max(1, min(os.cpu_count() or 1, LOCAL_MAX_WORKERS, stage_workers))


def parse_dask(value: str | None) -> DaskTarget | None:
    """The `dask` setting of a data stage; None (or blank) means Prefect's default task runner.
    Anything else that is not `local`, `local:N` or a scheduler address is a ValueError."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"invalid dask setting {value!r}: {_HELP}")
    text = value.strip()
    if not text:
        return None
    if text == "local":
        return DaskTarget(text)
    if text.startswith("local:"):
        count = text[len("local:"):]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"invalid dask setting {value!r}: local:N needs a worker count N >= 1, e.g. local:4")
        return DaskTarget(text, n_workers=int(count))
    # An address names its scheme: a bare `name:N` is more likely a mistyped `local:N`.
    m = _ADDRESS.fullmatch(text)
    if m is None or m["scheme"].lower() not in ADDRESS_SCHEMES or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"invalid dask setting {value!r}: {_HELP}")
    return DaskTarget(text, address=f"{m['scheme'].lower()}://{m['host']}:{m['port']}")


def _worker_facts(home: str) -> dict[str, Any]:
    """Run on every worker before units are sent: can it do the work?"""
    return {
        "daemon": bool(multiprocessing.current_process().daemon),
        "sees_root": os.path.isdir(home) and os.access(home, os.W_OK),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }


def _where() -> dict[str, Any]:
    try:
        from distributed import get_worker

        address = get_worker().address
    except (ImportError, ValueError):
        address = None
    return {"worker": address, "host": socket.gethostname(), "pid": os.getpid()}


@dataclass
class Placed:
    """A unit's result and where it was computed (worker address, host, pid)."""

    value: Any
    where: dict[str, Any]


class OnWorker:
    """`fn` for the Dask path: runs the unit and says which process did (picklable if `fn` is)."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, unit: Any) -> Placed:
        return Placed(self.fn(unit), _where())


def _api_url_for_workers() -> str | None:
    """The Prefect API the flow talks to, when the settings that travel with each task do not
    name one (Prefect's temporary server, started by this process): workers must use the same
    server, not start their own."""
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    ctx = FlowRunContext.get()
    client = getattr(ctx, "client", None) if ctx else None
    url = str(client.api_url) if client is not None else ""
    return url if url.startswith("http") and "ephemeral-prefect" not in url else None


def _has_dashboard() -> bool:
    """Dask's dashboard pages need bokeh (not a vimpac dependency); without it the link is a 404."""
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def _is_loopback(url: str) -> bool:
    return bool(re.match(r"https?://(127\.|localhost|\[::1\])", url))


class DaskUnitRunner:
    """A `stages.units.UnitRunner` that runs each unit as a Prefect task on a Dask cluster.

    The cluster (or the connection to one) is opened at the first call that has units, so a run
    with nothing to do starts nothing, and closed by `close()`. `placements` counts the units
    each worker process computed (flows add it to the stage summary)."""

    def __init__(self, target: DaskTarget, root: DataRoot, *, child_processes: bool = False, reporter: Reporter | None = None):
        self.target = target
        self.root = root
        self.child_processes = child_processes
        self.reporter = reporter or Reporter()
        self.placements: dict[str, dict[str, Any]] = {}
        self.n_workers = 0
        self.worker_hosts: set[str] = set()
        self._stack = ExitStack()
        self._task_runner: Any = None
        self._api_url: str | None = None

    # -- the cluster ------------------------------------------------------------------------
    def _start(self, stage_workers: int) -> None:
        if self._task_runner is not None:
            return
        import dask
        from prefect_dask import DaskTaskRunner

        if self.target.local:
            n = self.target.local_workers(stage_workers)
            # Nannies read this when they start (and restart) worker processes: non-daemonic
            # workers may start the frames decoders' child processes.
            self._stack.enter_context(dask.config.set({"distributed.worker.daemon": False}))
            # The scheduler and nannies live in this process: their start/stop chatter (some 30
            # INFO lines) would drown the flow's log. Warnings still show.
            dask_log = logging.getLogger("distributed")
            self._stack.callback(dask_log.setLevel, dask_log.level)
            dask_log.setLevel(max(dask_log.getEffectiveLevel(), logging.WARNING))
            runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(n, self.root))
            if n > stage_workers:
                self.reporter.warning(f"dask {self.target.setting}: {n} workers but the stage keeps at most {stage_workers} "
                                      "units in flight; raise the stage's `workers` to use them all")
        else:
            runner = DaskTaskRunner(address=self.target.address)
        self._stack.enter_context(runner)
        self._task_runner = runner
        try:
            try:
                client = runner.client  # creates the LocalCluster or connects to the scheduler
            except OSError as e:
                raise RuntimeError(f"dask {self.target.setting}: cannot reach the Dask scheduler: {e}") from e
            if not self.target.local:
                try:
                    client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
                except TimeoutError:
                    raise RuntimeError(f"dask scheduler {self.target.address} has no workers "
                                       f"(waited {WAIT_FOR_WORKERS_S:g} s)") from None
            self._check_workers(client.run(_worker_facts, str(self.root.home)))
        except BaseException:
            self.close()
            raise
        self._api_url = _api_url_for_workers()
        api = self._api_url or os.environ.get("PREFECT_API_URL") or ""
        if api and _is_loopback(api) and self.worker_hosts - {socket.gethostname()}:
            self.reporter.warning(f"the Prefect API is at {api}, which Dask workers on other machines cannot reach: "
                                  "set PREFECT_API_URL to a server they can reach (see docs/scale-out.md)")
        link = f"; dashboard {client.dashboard_link}" if _has_dashboard() else ""
        kind = "local cluster" if self.target.local else f"scheduler {self.target.address}"
        self.reporter.info(f"units run on Dask ({self.target.setting}): {kind}, {self.n_workers} workers{link}")

    def _check_workers(self, facts: dict[str, dict[str, Any]]) -> None:
        self.n_workers = len(facts)
        self.worker_hosts = {f["host"] for f in facts.values()}
        if not facts:
            raise RuntimeError(f"dask {self.target.setting}: the cluster has no workers")
        blind = sorted(a for a, f in facts.items() if not f["sees_root"])
        if blind:
            raise RuntimeError(
                f"dask {self.target.setting}: workers {', '.join(blind)} cannot write the data root {self.root.home}; "
                "every worker needs it at the same path (shared storage, see docs/scale-out.md)"
            )
        daemonic = sorted(a for a, f in facts.items() if f["daemon"])
        if self.child_processes and daemonic:
            raise RuntimeError(
                f"dask {self.target.setting}: workers {', '.join(daemonic)} are daemonic processes, which cannot start this "
                "stage's decoder processes; start the workers with DASK_DISTRIBUTED__WORKER__DAEMON=False "
                "(or `dask worker --no-nanny`)"
            )

    def close(self) -> None:
        self._task_runner = None
        self._stack.close()

    # -- flows.units.Submitter ----------------------------------------------------------------
    def submit(self, task: Any, parameters: dict[str, Any]) -> Any:
        if self._api_url is None:
            return self._task_runner.submit(task, parameters=parameters)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # The settings serialized with the task now name the flow's server.
        with temporary_settings(updates={PREFECT_API_URL: self._api_url}):
            return self._task_runner.submit(task, parameters=parameters)

    # -- stages.units.UnitRunner ------------------------------------------------------------
    def __call__(
        self, fn: Callable[[Any], Any], units: Sequence[Any], *, workers: int, name: Callable[[Any], str] = str
    ) -> Iterator[tuple[Any, Any]]:
        units = list(units)
        if not units:
            return
        self._start(workers)
        for unit, result in prefect_runner(OnWorker(fn), units, workers=workers, name=name, task_runner=self):
            if isinstance(result, Placed):
                key = result.where["worker"] or f"{result.where['host']}:{result.where['pid']}"
                seen = self.placements.setdefault(key, {"host": result.where["host"], "pid": result.where["pid"], "units": 0})
                seen["units"] += 1
                result = result.value
            yield unit, result

    def summary(self) -> dict[str, Any]:
        """For the stage summary: the setting, the cluster's size and which workers did the units."""
        return {"dask": self.target.setting, "dask_workers": self.n_workers, "dask_placements": self.placements}


def local_cluster_kwargs(n_workers: int, root: DataRoot) -> dict[str, Any]:
    """A LocalCluster of `n_workers` single-threaded worker processes. Dask's nannies start each
    worker with OMP_NUM_THREADS=1 whatever the machine; here each gets its part of this process's
    share of the cores instead (stages/threads.py), so N workers neither fight over the cores nor
    leave them idle."""
    share = threads.current()
    env = threads.child_env(share.part(n_workers))
    # Any free port: flows running side by side each get their own dashboard.
    return {"n_workers": n_workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0",
            "local_directory": str(root.tmp / "dask"), **({"env": env} if env else {})}


@contextmanager
def unit_runner(dask: str | None, root: DataRoot, *, child_processes: bool = False, reporter: Reporter | None = None) -> Iterator[Any]:
    """The unit runner a data-stage flow hands its stage: `prefect_runner` (the flow's own task
    runner) without a `dask` setting, else a `DaskUnitRunner`, closed when the block ends."""
    target = parse_dask(dask)
    if target is None:
        yield prefect_runner
        return
    runner = DaskUnitRunner(target, root, child_processes=child_processes, reporter=reporter)
    try:
        yield runner
    finally:
        runner.close()
