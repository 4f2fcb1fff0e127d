"""Data stages on a Dask cluster (flows/dask_runner.py): the setting, and byte-identical frame
shards from a 2-worker local cluster and from the default task runner."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from media_fixtures import make_video
from stages.config import DatasetConfig, FramesConfig, IngestConfig, PipelineConfig
from stages.ingest.stage import run_ingest
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot


def test_dask_setting_parsing():
    from flows.dask_runner import LOCAL_MAX_WORKERS, DaskTarget, parse_dask

    assert parse_dask(None) is None and parse_dask("") is None and parse_dask("  ") is None
    local = parse_dask("local")
    assert local == DaskTarget("local") and local.local and local.n_workers is None
    # One worker per core, never more than the units the stage keeps in flight, nor the cap.
    assert local.local_workers(1) == 1
    assert local.local_workers(10_000) == min(os.cpu_count() or 1, LOCAL_MAX_WORKERS)
    three = parse_dask("local:3")
    assert three.local and three.n_workers == 3 and three.local_workers(1) == 3
    assert parse_dask("tcp://10.0.0.5:8786") == DaskTarget("tcp://10.0.0.5:8786", address="tcp://10.0.0.5:8786")
    assert parse_dask("tls://sched.example.org:8786").address == "tls://sched.example.org:8786"
    assert parse_dask("ws://sched-1:8786/").address == "ws://sched-1:8786"
    assert parse_dask("tcp://[::1]:8786").address == "tcp://[::1]:8786"
    for bad in ("lokal", "local:", "local:0", "local:-2", "local:two", "http://host:8786", "tcp://host", "host:99999",
                "tcp://host:port", "dask",
                "lokal:2", "sched-1:8786"):  # an address names its scheme: `lokal:2` is a typo, not a host
        with pytest.raises(ValueError, match="dask setting") as info:
            parse_dask(bad)
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="local:N"):
        parse_dask("local:0")


def test_workers_that_cannot_do_the_work_are_refused_with_the_fix(tmp_path):
    from flows.dask_runner import DaskUnitRunner, parse_dask, unit_runner
    from flows.units import prefect_runner

    root = DataRoot(tmp_path / "home").ensure()
    with unit_runner(None, root) as runner:
        assert runner is prefect_runner
    with unit_runner("local:2", root, child_processes=True) as runner:
        assert isinstance(runner, DaskUnitRunner)
        # Nothing to do: no cluster is started.
        assert list(runner(str, [], workers=2)) == [] and runner._task_runner is None

    def facts(daemon: bool, sees_root: bool) -> dict:
        return {"daemon": daemon, "sees_root": sees_root, "host": "h", "pid": 1}

    frames_like = DaskUnitRunner(parse_dask("tcp://sched:8786"), root, child_processes=True)
    frames_like._check_workers({"tcp://w1:1": facts(False, True), "tcp://w2:1": facts(False, True)})
    assert frames_like.n_workers == 2
    with pytest.raises(RuntimeError, match="tcp://w2:1 are daemonic.*DASK_DISTRIBUTED__WORKER__DAEMON=False"):
        frames_like._check_workers({"tcp://w1:1": facts(False, True), "tcp://w2:1": facts(True, True)})
    # Only stages that start child processes need non-daemonic workers.
    DaskUnitRunner(parse_dask("tcp://sched:8786"), root)._check_workers({"tcp://w2:1": facts(True, True)})
    with pytest.raises(RuntimeError, match=f"tcp://w1:1 cannot write the data root {root.home}.*same path"):
        frames_like._check_workers({"tcp://w1:1": facts(False, False)})
    with pytest.raises(RuntimeError, match="no workers"):
        frames_like._check_workers({})


def test_pipeline_config_has_the_dask_setting():
    assert PipelineConfig().dask is None
    assert PipelineConfig(dask="local:2").dask == "local:2"
    assert "Dask" in PipelineConfig.model_fields["dask"].description


def _tar_digests(home: Path) -> dict[str, str]:
    return {p.relative_to(home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((home / "shards" / "frames").rglob("*.tar"))}


def _frame_rows(home: Path) -> list[dict]:
    # Everything but who ran it, when, and how long decoding took.
    rows = Catalog(home).query("SELECT * EXCLUDE (run_id, created_at, decode_s) FROM frame_samples ORDER BY video_id").to_pylist()
    return rows


@pytest.mark.slow
def test_frames_on_a_two_worker_local_dask_cluster_gives_the_same_shards(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from flows.frames import frames

    src = tmp_path / "src"
    for i in range(6):
        make_video(src / f"v{i}.mp4", seed=i, frames=24, fps=12.0, size=(48, 64))
    ds = DatasetConfig(name="dk", source=str(src))
    default_home, dask_home = tmp_path / "default", tmp_path / "dask"
    root = DataRoot(default_home).ensure()
    Catalog(root).refresh()
    ingested = run_ingest(root, ds, IngestConfig(workers=2, batch_size=3), run_id="ingest-dask-test")
    assert ingested.summary["ok"] == 6
    shutil.copytree(default_home, dask_home)

    cfg = FramesConfig(fps=4.0, size=32, workers=2, views="downstream", contact_sheet_videos=0)
    by_default = frames(ds, cfg, str(default_home))
    on_dask = frames(ds, cfg, str(dask_home), dask="local:2")

    # The same shards, byte for byte, and the same catalog rows.
    digests = _tar_digests(default_home)
    assert len(digests) >= 2 and by_default["shards_built"] == len(digests) and by_default["ok"] == 6
    assert _tar_digests(dask_home) == digests
    rows = _frame_rows(default_home)
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    assert _frame_rows(dask_home) == rows
    assert {k: on_dask[k] for k in ("videos", "ok", "frames", "bytes", "shards_built")} == \
        {k: by_default[k] for k in ("videos", "ok", "frames", "bytes", "shards_built")}
    assert "dask" not in by_default

    # The units really ran in the cluster's worker processes: each result came back stamped
    # with the Dask worker (distributed.get_worker(), only set inside one) and its pid.
    assert on_dask["dask"] == "local:2" and on_dask["dask_workers"] == 2
    placements = on_dask["dask_placements"]
    assert sum(p["units"] for p in placements.values()) == len(digests)
    assert all(addr.startswith("tcp://") for addr in placements)
    assert {p["pid"] for p in placements.values()}.isdisjoint({os.getpid()})

    # ... and are still task runs of the flow run, as with the default runner.
    flow_run_id = Catalog(dask_home).rows("SELECT prefect_flow_run_id FROM runs WHERE stage = 'frames'")[0][0]
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)])),
                                          sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    units = sorted(t.name for t in task_runs if t.name.startswith("frames-dk-"))
    assert len(units) == len(digests) and all(t.state.is_completed() for t in task_runs if t.name in units)
