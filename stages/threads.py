"""How many compute threads each vimpac process, and each worker it starts, may use.

torch starts one intra-op thread per core in every process, and OpenMP threads spin for a while
before they sleep. Two such processes on one machine (two `vimpac run`s, a grid's parallel cells,
Dask workers, loader workers next to training) were measured 2x to 8x slower each, where a fair
share of the cores would be 2x (issue 16). So every process that computes takes a share:

1. An explicit setting wins, first of: `vimpac --threads N`, `VIMPAC_THREADS=N`, the pipeline
   config's `threads: N`, `OMP_NUM_THREADS` in the environment the process started with (the
   usual knob, and how vimpac hands a share to the processes it starts).
2. Otherwise the cores divided by the vimpac processes computing on this machine, at least 1.
   Each computing process registers a pid file in a per-user runtime directory
   (`$XDG_RUNTIME_DIR/vimpac/threads`, else `<tmp>/vimpac-<uid>/threads`); files of processes that
   are gone (or whose pid now names another process) are ignored and removed. The count is taken
   when the process starts and again where training or tokenizing starts (by then a second
   process started at the same moment has registered too), never in the middle of a run. A
   runtime directory that cannot be used means the plain default: every core.
3. Pools a process starts itself split its share: N grid cells (`parallel: N`) or N unit threads
   get share // N threads each, a LocalCluster of N Dask workers share // N per worker, loader
   workers and frame decoders 1 each (`one_of`, `child_env`, `worker_process`).

OpenMP's default wait policy is kept: waiting threads spin briefly before they sleep. Shares keep
the threads of all vimpac processes within the cores, so nobody spins on a core another process
needs; `OMP_WAIT_POLICY=PASSIVE` measured 1.4x slower per step for a process alone (tiny backbone,
2 threads: 390 vs 277 ms) and made the demo 1.5x slower. A user who runs processes with their
own overlapping settings may set it; it is passed on to the workers vimpac starts.

Nothing here imports torch: its thread count is set only where it is already imported; a
process that imports it later reads the share from OMP_NUM_THREADS.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

OFF = "off"
# Thread-pool sizes of OpenMP (torch's intra-op pool), MKL and OpenBLAS, read when each loads.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WAIT_POLICY = "OMP_WAIT_POLICY"


@dataclass(frozen=True)
class Share:
    """A process's thread count (None: left to torch and OpenMP), out of `cores`, and why."""

    threads: int | None
    cores: int
    reason: str
    explicit: bool

    def describe(self) -> str:
        if self.threads is None:
            return f"threads: torch and OpenMP defaults ({self.reason})"
        return f"threads: {self.threads} of {self.cores} cores ({self.reason})"

    def part(self, workers: int) -> int | None:
        """Threads of each of `workers` running at once on this share."""
        return None if self.threads is None else max(1, self.threads // max(1, workers))


def cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one: taskset, cgroups)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def parse_threads(value: Any, source: str) -> int | None:
    """A thread setting: a positive count, or `off` (None). ValueError names `source`."""
    text = str(value).strip().lower()
    if text == OFF:
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{source}: expected a thread count >= 1 or 'off', got {value!r}")
    return n


def _inherited_omp(value: str | None) -> int | None:
    """OMP_NUM_THREADS as OpenMP reads it (a count, or a list whose first entry is the outer level)."""
    try:
        n = int((value or "").split(",")[0])
    except ValueError:
        return None
    return n if n >= 1 else None


def runtime_dir() -> Path:
    """Where computing vimpac processes register: per user, so a count never mixes users."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "vimpac" / "threads"
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"vimpac-{uid}" / "threads"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) from /proc (Linux): the start time tells a
    pid reused by another process from the one that registered; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _start_time(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, now = stat
    return state != "Z" and (not started or now == started)  # a zombie has finished: only its exit status is left


def _usable(directory: Path) -> Path:
    """`directory`, created private to this user; OSError when it cannot be (or another user owns
    the folder in a shared temp directory, where a count could be faked)."""
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if hasattr(os, "getuid") and directory.parent.stat().st_uid != os.getuid():
        raise PermissionError(f"{directory.parent} belongs to another user")
    directory.mkdir(exist_ok=True, mode=0o700)
    return directory


def register(directory: Path, pid: int | None = None) -> Path:
    """Record `pid` (default: this process) as computing; OSError when the folder is unusable."""
    pid = os.getpid() if pid is None else pid
    directory = _usable(directory)
    path = directory / str(pid)
    tmp = directory / f".{pid}.tmp"
    tmp.write_text(_start_time(pid) or "")
    os.replace(tmp, path)  # a reader never sees a half-written record
    return path


def live_processes(directory: Path) -> set[int]:
    """Pids registered in `directory` whose process still runs; records of others are removed."""
    live = set()
    for entry in os.scandir(directory):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            started = Path(entry.path).read_text().strip()
        except OSError:
            continue  # removed by its process meanwhile
        if _alive(pid, started):
            live.add(pid)
        else:
            Path(entry.path).unlink(missing_ok=True)
    return live


def _unregister(path: Path, pid: int) -> None:
    if os.getpid() == pid:  # not from a forked child that inherited the exit handler
        path.unlink(missing_ok=True)


class _Process:
    """This process's settings, registration and current share."""

    def __init__(self) -> None:
        self.cli: Any = None  # --threads
        self.config: int | None = None  # the pipeline config's `threads`
        # What the environment gave the process; read once, before this module sets anything.
        self.inherited = _inherited_omp(os.environ.get("OMP_NUM_THREADS"))
        self.registered: Path | None = None
        self.share: Share | None = None
        self.announced: Share | None = None
        self.interop_tried = False


_state = _Process()
_lock = threading.RLock()
_local = threading.local()  # `workers`: how many threads of a pool share the process's threads


def _explicit(st: _Process) -> tuple[int | None, str] | None:
    env = os.environ.get("VIMPAC_THREADS")
    for value, source in ((st.cli, "--threads"), (env if env not in (None, "") else None, "VIMPAC_THREADS"),
                          (st.config, "threads in the pipeline config")):
        if value is not None:
            n = parse_threads(value, source)
            return n, (f"{source} off" if n is None else f"set by {source}")
    if st.inherited is not None:
        return st.inherited, "OMP_NUM_THREADS in the environment"
    return None


def _decide(st: _Process) -> Share:
    """The share by the rules in the module's docstring; registers the process on the way."""
    n = cores()
    explicit = _explicit(st)
    if explicit is not None and explicit[0] is None:
        return Share(None, n, explicit[1], True)
    directory = runtime_dir()
    live: set[int] = set()
    try:
        if st.registered is None:
            st.registered = register(directory)
            atexit.register(_unregister, st.registered, os.getpid())
        live = live_processes(directory)
    except OSError as e:
        log.debug("threads: cannot use %s (%s): counting this process alone", directory, e)
    if explicit is not None:
        return Share(explicit[0], n, explicit[1], True)
    count = len(live | {os.getpid()})
    reason = "alone" if count == 1 else f"{count} vimpac processes computing"
    return Share(max(1, n // count), n, reason, False)


def _apply_process(share: Share) -> None:
    """The environment that torch (if not loaded yet), OpenMP and child processes read."""
    if share.threads is None:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(share.threads)


def _apply_thread(threads: int | None, share: Share) -> None:
    """torch's intra-op threads for the calling thread (an OpenMP setting is per thread), and its
    inter-op pool once, if nothing has started it yet (torch refuses a second setting)."""
    torch = sys.modules.get("torch")
    if threads is None or torch is None:
        return
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if not _state.interop_tried:
        _state.interop_tried = True
        try:
            torch.set_num_interop_threads(share.threads)
        except RuntimeError as e:  # inter-op work already started: its pool keeps its size
            log.debug("threads: inter-op pool kept (%s)", e)


def _announce(share: Share, report: Callable[[str], None] | None) -> None:
    """Say which share and why, once, and again whenever it changes."""
    if share != _state.announced:
        (report or log.info)(share.describe())
        _state.announced = share


def claim(threads: Any = None, *, config: int | None = None, report: Callable[[str], None] | None = None) -> Share:
    """Decide this process's share and apply it (environment, torch where loaded); register the
    process as computing. `threads` is `--threads` (a count or `off`), `config` the pipeline
    config's field; a later call with a setting found later (a config file) decides again.
    A new share is told to `report` (a stage's reporter), else logged."""
    with _lock:
        if threads is not None:
            _state.cli = threads
        if config is not None:
            _state.config = config
        share = _decide(_state)
        _state.share = share
        _apply_process(share)
        _apply_thread(share.part(getattr(_local, "workers", 1)), share)
        _announce(share, report)
        return share


def current() -> Share:
    """This process's share, claimed now if nothing has claimed it."""
    return _state.share or claim()


def rebalance(report: Callable[[str], None] | None = None) -> Share:
    """Where a thread starts to compute (training, tokenizing): count the computing processes
    again for a default share, and give the calling thread its part of it."""
    return claim(report=report)


@contextmanager
def one_of(workers: int) -> Iterator[int | None]:
    """The calling thread is one of `workers` threads of this process computing at once (grid
    cells, units of work): it gets the process's share // workers (at least 1) until the block
    ends, then the share it had. Yields its thread count (None with the policy off)."""
    share = current()
    before = getattr(_local, "workers", 1)
    _local.workers = max(1, workers)
    _apply_thread(share.part(workers), share)
    try:
        yield share.part(workers)
    finally:
        _local.workers = before
        _apply_thread((_state.share or share).part(before), share)


class Pooled:
    """`fn` run as one of `workers` threads (`one_of`); picklable when `fn` is."""

    def __init__(self, fn: Callable[[Any], Any], workers: int):
        self.fn = fn
        self.workers = workers

    def __call__(self, unit: Any) -> Any:
        with one_of(self.workers):
            return self.fn(unit)


def child_env(threads: int | None) -> dict[str, str]:
    """Environment variables that give a child process (a Dask worker) `threads` threads; empty
    with the policy off. VIMPAC_THREADS too, so vimpac code there takes the same count."""
    if threads is None:
        return {}
    env = {var: str(threads) for var in (*THREAD_VARS, "VIMPAC_THREADS")}
    if WAIT_POLICY in os.environ:  # a policy the user chose reaches the workers too
        env[WAIT_POLICY] = os.environ[WAIT_POLICY]
    return env


def worker_process(threads: int = 1, role: str = "worker process") -> Share:
    """In a worker process the project started (loader worker, frame decoder): take `threads`
    threads, for torch if loaded and for anything it starts; not registered, since it works
    inside its parent's count."""
    with _lock:
        share = Share(threads, cores(), role, True)
        _state.share = _state.announced = share
        _apply_process(share)
        _apply_thread(threads, share)
        return share


def loader_worker_init(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one thread per loader worker; training keeps its share."""
    worker_process(1, f"DataLoader worker {worker_id}")
