"""Each computing process, and each worker it starts, takes its share of the cores (issue 16 §4):
an explicit setting wins, else the cores divided among the vimpac processes computing on the
machine (pid files, stale ones ignored), split again among the pools a process starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages import threads
from stages.config import ConfigError, PipelineConfig, build, config_hash
from test_pretrain_data import corpus, make_loader  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
CORES = 4  # what the tests pretend the machine has
OWN_VARS = (*threads.THREAD_VARS, "VIMPAC_THREADS", threads.WAIT_POLICY)


@pytest.fixture
def policy(monkeypatch, tmp_path):
    """A fresh process state on a 4-core machine with its own runtime directory (returned);
    environment and torch's thread count restored afterwards."""
    for var in OWN_VARS:
        monkeypatch.setenv(var, "")  # recorded, so whatever the test sets is undone
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(threads, "cores", lambda: CORES)
    fresh(monkeypatch)
    before = torch.get_num_threads()
    yield tmp_path / "vimpac" / "threads"
    torch.set_num_threads(before)


def fresh(monkeypatch) -> None:
    """A process state as at start (reads OMP_NUM_THREADS now); torch's inter-op pool untouched,
    since it can be sized only once per process."""
    state = threads._Process()
    state.interop_tried = True
    monkeypatch.setattr(threads, "_state", state)
    monkeypatch.setattr(threads, "_local", threading.local())


@contextmanager
def live_processes(n: int):
    """`n` running processes other than this one."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.parametrize("cli, env, config, omp, expected, reason", [
    ("2", None, None, None, 2, "set by --threads"),
    (None, "3", None, None, 3, "set by VIMPAC_THREADS"),
    (None, None, 1, None, 1, "set by threads in the pipeline config"),
    (None, None, None, "2", 2, "OMP_NUM_THREADS in the environment"),
    (None, None, None, "3,1", 3, "OMP_NUM_THREADS in the environment"),
    ("3", "1", 2, "1", 3, "set by --threads"),
    (None, "1", 2, "3", 1, "set by VIMPAC_THREADS"),
    (None, None, 2, "3", 2, "set by threads in the pipeline config"),
])
def test_an_explicit_setting_wins_over_the_count(policy, monkeypatch, cli, env, config, omp, expected, reason):
    if env is not None:
        monkeypatch.setenv("VIMPAC_THREADS", env)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
        fresh(monkeypatch)  # the environment the process started with
    threads.register(policy, os.getppid())  # another computing process: no effect on an explicit share
    share = threads.claim(cli, config=config)
    assert (share.threads, share.explicit) == (expected, True)
    assert share.describe() == f"threads: {expected} of {CORES} cores ({reason})"
    assert torch.get_num_threads() == expected
    assert all(os.environ[v] == str(expected) for v in threads.THREAD_VARS)
    assert threads.WAIT_POLICY not in os.environ, "OpenMP's default spin-wait is kept (1.4x faster alone)"
    assert (policy / str(os.getpid())).exists(), "an explicit process still counts for the others"


def test_a_later_config_setting_does_not_override_threads_given_on_the_command_line(policy):
    assert threads.claim("3").threads == 3
    assert threads.claim(config=1).threads == 3
    assert threads.claim().threads == 3


@pytest.mark.parametrize("cores, others, expected, reason", [
    (4, 0, 4, "alone"),
    (4, 1, 2, "2 vimpac processes computing"),
    (4, 3, 1, "4 vimpac processes computing"),
    (2, 1, 1, "2 vimpac processes computing"),
    (2, 3, 1, "4 vimpac processes computing"),
    (8, 2, 2, "3 vimpac processes computing"),
])
def test_the_default_divides_the_cores_among_live_vimpac_processes(policy, monkeypatch, cores, others, expected, reason):
    monkeypatch.setattr(threads, "cores", lambda: cores)
    with live_processes(others) as pids:
        for pid in pids:
            threads.register(policy, pid)
        share = threads.claim()
    assert (share.threads, share.explicit, share.reason) == (expected, False, reason)
    assert share.describe() == f"threads: {expected} of {cores} cores ({reason})"
    assert torch.get_num_threads() == expected and os.environ["OMP_NUM_THREADS"] == str(expected)


def test_records_of_finished_or_replaced_processes_are_ignored_and_removed(policy):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # finished, not waited for yet
    while threads._proc_stat(zombie.pid)[0] != "Z":
        time.sleep(0.01)
    with live_processes(2) as (alive, reused):
        threads.register(policy, dead.pid)
        threads.register(policy, zombie.pid)
        threads.register(policy, alive)
        # The pid now names another process than the one that registered it: another start time.
        (policy / str(reused)).write_text("1")
        (policy / ".12345.tmp").write_text("")  # a record being written
        assert threads.live_processes(policy) == {alive}
        share = threads.claim()
        assert (share.threads, share.reason) == (2, "2 vimpac processes computing")
        assert sorted(p.name for p in policy.iterdir()) == sorted([".12345.tmp", str(alive), str(os.getpid())])
    zombie.wait()


def test_the_record_holds_the_start_time_and_goes_at_exit(policy):
    share = threads.claim()
    record = policy / str(os.getpid())
    assert share.threads == CORES and record.read_text() == threads._start_time(os.getpid())
    threads.rebalance()
    assert [p.name for p in policy.iterdir()] == [str(os.getpid())], "registered once"
    threads._unregister(record, os.getpid() + 1)  # a forked child's exit leaves the parent's record
    assert record.exists()
    threads._unregister(record, os.getpid())
    assert not record.exists()


@pytest.mark.parametrize("problem", ["a file in the way", "another user's folder"])
def test_an_unusable_runtime_directory_means_every_core(policy, monkeypatch, caplog, problem):
    if problem == "a file in the way":
        policy.parent.write_text("not a folder")
    else:
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)
    with caplog.at_level(logging.DEBUG, logger="stages.threads"):
        share = threads.claim()
    assert (share.threads, share.reason) == (CORES, "alone")
    assert any("cannot use" in r.getMessage() for r in caplog.records)


def test_the_runtime_directory_is_per_user(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert threads.runtime_dir() == tmp_path / "vimpac" / "threads"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    assert threads.runtime_dir() == tmp_path / f"vimpac-{os.getuid()}" / "threads"


@pytest.mark.parametrize("how", ["--threads", "VIMPAC_THREADS"])
def test_off_leaves_threads_to_torch(policy, monkeypatch, how):
    before = torch.get_num_threads()
    if how == "VIMPAC_THREADS":
        monkeypatch.setenv("VIMPAC_THREADS", "OFF")
    share = threads.claim("off" if how == "--threads" else None, config=2)
    assert share.threads is None and share.describe() == f"threads: torch and OpenMP defaults ({how} off)"
    assert torch.get_num_threads() == before
    assert not any(v in os.environ for v in (*threads.THREAD_VARS, threads.WAIT_POLICY))
    assert not policy.exists(), "not counted"
    assert threads.child_env(share.part(2)) == {}
    with threads.one_of(2) as part:
        assert part is None and torch.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_a_bad_setting_is_an_error_naming_it(policy, monkeypatch, value):
    monkeypatch.setenv("VIMPAC_THREADS", value or " ")
    with pytest.raises(ValueError, match="VIMPAC_THREADS: expected a thread count >= 1 or 'off'"):
        threads.claim()


def test_a_wait_policy_in_the_environment_is_kept(policy, monkeypatch):
    monkeypatch.setenv(threads.WAIT_POLICY, "ACTIVE")
    threads.claim("2")
    assert os.environ[threads.WAIT_POLICY] == "ACTIVE"
    assert threads.child_env(1)[threads.WAIT_POLICY] == "ACTIVE"


def test_a_recount_where_training_starts_sees_a_process_started_meanwhile(policy):
    told: list[str] = []
    assert threads.claim(report=told.append).threads == CORES
    threads.rebalance(told.append)
    with live_processes(1) as (other,):
        threads.register(policy, other)
        share = threads.rebalance(told.append)
        assert (share.threads, share.reason) == (2, "2 vimpac processes computing")
        assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
    assert threads.rebalance(told.append).threads == CORES, "and the cores come back once it is gone"
    assert told == [f"threads: {CORES} of {CORES} cores (alone)", f"threads: 2 of {CORES} cores (2 vimpac processes computing)",
                    f"threads: {CORES} of {CORES} cores (alone)"], "each change told once"


def test_the_config_field_is_operational():
    assert build(PipelineConfig, {"threads": 2}).threads == 2
    assert build(PipelineConfig, {}).threads is None
    assert config_hash(build(PipelineConfig, {"threads": 2})) == config_hash(build(PipelineConfig, {}))
    with pytest.raises(ConfigError, match="threads"):
        build(PipelineConfig, {"threads": 0})


_CLI = """
import json, os, sys
from stages import threads
from flows.cli import main
rc = main(sys.argv[1:])
import torch
intra = torch.get_num_threads()  # from the environment the CLI set before torch loaded
threads.rebalance()  # what a training entry point does: also sizes the inter-op pool, not started yet
print(json.dumps({"rc": rc, "pid": os.getpid(), "torch": intra, "interop": torch.get_num_interop_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS"), "wait": os.environ.get("OMP_WAIT_POLICY"),
                  "records": sorted(os.listdir(threads.runtime_dir()))}))
"""


@pytest.mark.parametrize("args, others, divisor, reason", [
    (["--threads", "1"], 0, None, "set by --threads"),
    ([], 1, 2, "2 vimpac processes computing"),
    ([], 0, 1, "alone"),
])
def test_the_cli_sets_the_share_before_torch_loads(tmp_path, args, others, divisor, reason):
    # The machine's real cores: torch never starts more threads than there are.
    cores = threads.cores()
    expected = 1 if divisor is None else max(1, cores // divisor)
    env = {k: v for k, v in os.environ.items() if k not in OWN_VARS}
    env.update({"XDG_RUNTIME_DIR": str(tmp_path), "PYTHONPATH": str(REPO)})
    directory = tmp_path / "vimpac" / "threads"
    with live_processes(others) as pids:
        for pid in pids:
            threads.register(directory, pid)
        # `run evaluate` without a grid stops at a configuration error: the share is taken first.
        done = subprocess.run([sys.executable, "-c", _CLI, *args, "--home", str(tmp_path / "home"), "run", "evaluate"],
                              env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert f"vimpac: threads: {expected} of {cores} cores ({reason})" in done.stderr
        assert (out["rc"], out["torch"], out["interop"], out["omp"], out["wait"]) == (2, expected, expected, str(expected), None)
        assert sorted(out["records"]) == sorted(str(p) for p in [*pids, out["pid"]]), "it registered itself"
        assert sorted(p.name for p in directory.iterdir()) == sorted(str(p) for p in pids), "and its record went at exit"


def test_unit_threads_split_the_share(policy):
    from stages.units import thread_runner

    threads.claim("4")
    meet = threading.Barrier(2)

    def unit(u: int) -> int:
        if u < 2:
            meet.wait(timeout=30)  # both at once
        return torch.get_num_threads()

    assert sorted(r for _, r in thread_runner(unit, [0, 1], workers=2)) == [2, 2]
    assert [r for _, r in thread_runner(unit, [5], workers=4)] == [4], "one unit in flight has every thread"
    assert torch.get_num_threads() == 4, "the calling thread keeps the process's share"


def test_parallel_grid_cells_split_the_share(policy, monkeypatch, tmp_path):
    import flows.evaluate as ev
    from stages.config import GridConfig
    from stages.finetune.grid import expand_grid

    threads.claim("4")
    meet = threading.Barrier(2)
    seen: list[int] = []

    @contextmanager
    def tracked(*args, **kwargs):
        yield SimpleNamespace(reporter=None, record=SimpleNamespace(run_id="r", summary=None), set_run_name=lambda name: None)

    def finetune_cell(*args, **kwargs):
        if kwargs["grid"] == "pair":
            meet.wait(timeout=30)
        seen.append(torch.get_num_threads())
        return SimpleNamespace(eval_id=f"e-{kwargs['grid']}", pretrain_recipe="scratch", split="1", finetune_recipe="tiny", checkpoint=None,
                               summary=lambda: {"threads": seen[-1]})

    monkeypatch.setattr(ev, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(ev, "run_lock", lambda *a: contextmanager(lambda: (yield))())
    monkeypatch.setattr(ev, "tracked_run", tracked)
    monkeypatch.setattr(ev, "finetune_cell", finetune_cell)
    cells = expand_grid(build(GridConfig, {"models": ["scratch"], "datasets": ["a", "b"], "presets": ["tiny"]}))
    home = str(tmp_path / "home")
    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda c: ev.run_cell.fn(c, home, "pair", "e", False, parallel=2), cells))
    assert [s["threads"] for s in pair] == [2, 2]
    assert ev.run_cell.fn(cells[0], home, "one", "e", False)["threads"] == 4


@pytest.mark.parametrize("workers, expected", [(1, "4"), (2, "2"), (3, "1"), (8, "1")])
def test_local_dask_workers_get_their_part(policy, root, workers, expected):
    from flows.dask_runner import local_cluster_kwargs

    threads.claim()
    kwargs = local_cluster_kwargs(workers, root)
    assert kwargs["n_workers"] == workers and kwargs["threads_per_worker"] == 1
    assert {v: kwargs["env"][v] for v in (*threads.THREAD_VARS, "VIMPAC_THREADS")} == dict.fromkeys(
        (*threads.THREAD_VARS, "VIMPAC_THREADS"), expected)
    assert threads.WAIT_POLICY not in kwargs["env"]


def test_local_dask_workers_keep_dasks_defaults_with_the_policy_off(policy, monkeypatch, root):
    from flows.dask_runner import local_cluster_kwargs

    monkeypatch.setenv("VIMPAC_THREADS", "off")
    assert "env" not in local_cluster_kwargs(2, root)


def record_threads(batch: dict, generator: torch.Generator) -> dict:
    """A loader transform: what the worker process it runs in computes with."""
    batch["threads"] = torch.get_num_threads()
    batch["env"] = json.dumps({v: os.environ.get(v) for v in threads.THREAD_VARS})
    batch["pid"] = os.getpid()
    return batch


def test_loader_workers_take_one_thread_and_training_keeps_its_share(policy, root, corpus):  # noqa: F811
    threads.claim("2")
    batches = list(make_loader(root, corpus, num_workers=2, transform=record_threads).epoch(0))
    assert {b["pid"] for b in batches} - {os.getpid()} and os.getpid() not in {b["pid"] for b in batches}
    assert {b["threads"] for b in batches} == {1}
    assert {b["env"] for b in batches} == {json.dumps(dict.fromkeys(threads.THREAD_VARS, "1"))}
    assert torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"


def test_a_frame_decoder_process_takes_one_thread(policy):
    from stages.frames.worker import _child

    threads.claim("4")

    class Stop:
        def recv(self):
            return None  # the parent's "no more jobs"

    _child(Stop(), None, "unused")
    assert all(os.environ[v] == "1" for v in threads.THREAD_VARS) and torch.get_num_threads() == 1
    assert threads.current().describe() == f"threads: 1 of {CORES} cores (frame decoder)"
