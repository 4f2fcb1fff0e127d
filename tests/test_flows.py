"""Flows through Prefect and MLflow, the CLI as a user runs it, and a run killed mid-way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from media_fixtures import make_bad_inputs, make_video
from stages.config import DatasetConfig, IngestConfig, PipelineConfig
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

pytestmark = pytest.mark.slow

COMPARE_COLUMNS = "dataset, video_id, source, sha256, bytes, label, status, error_code, n_frames, duration_s, raw_path, unit"


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIMPAC_"))}
    env["VIMPAC_HOME"] = str(home)
    return env


def _vimpac(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=_clean_env(home), capture_output=True, text=True, timeout=timeout
    )


def test_pipeline_flow_tracks_parent_and_nested_runs(prefect_harness, tmp_path):
    import mlflow
    from flows.pipeline import pipeline

    make_video(tmp_path / "a" / "Up" / "one.mp4", seed=1)
    make_video(tmp_path / "a" / "Down" / "two.mp4", seed=2)
    make_bad_inputs(tmp_path / "b")
    make_video(tmp_path / "b" / "fine.mp4", seed=3)
    cfg = PipelineConfig(
        name="flow-test",
        datasets=[DatasetConfig(name="labeled", source=str(tmp_path / "a")), DatasetConfig(name="mixed", source=str(tmp_path / "b"))],
        ingest=IngestConfig(workers=2, batch_size=2),
        frames={"size": 32, "fps": 4.0, "workers": 2},
        stages=["ingest", "frames"],
        tracking={"experiment": "flow-test"},
    )
    home = tmp_path / "home"
    summaries = pipeline(cfg, str(home))
    assert summaries["ingest/labeled"]["ok"] == 2 and summaries["ingest/mixed"]["failed"] == 5
    assert summaries["frames/labeled"]["ok"] == 2 and summaries["frames/labeled"]["n_views"] == 12
    assert summaries["frames/mixed"]["ok"] == 1 and summaries["frames/mixed"]["n_views"] == 1

    catalog = Catalog(home)
    runs = {r["stage"] + "/" + (r["dataset"] or ""): r for r in catalog.query("SELECT * FROM runs ORDER BY started_at").to_pylist()}
    parent = runs["pipeline/"]
    assert parent["status"] == "completed"
    for key in ("ingest/labeled", "ingest/mixed", "frames/labeled", "frames/mixed"):
        run = runs[key]
        assert run["status"] == "completed" and run["parent_run_id"] == parent["run_id"]
        assert run["prefect_flow_run_id"] and run["mlflow_run_id"]
        stage = key.split("/")[0]
        expected = {"ingest": ("batch_size", 2), "frames": ("size", 32)}[stage]
        assert json.loads(run["config"])[stage][expected[0]] == expected[1]

    client = mlflow.tracking.MlflowClient()
    child = client.get_run(runs["ingest/mixed"]["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent["mlflow_run_id"]
    assert child.data.tags["prefect.flow_run_id"] == runs["ingest/mixed"]["prefect_flow_run_id"]
    assert child.data.params["ingest.batch_size"] == "2" and child.data.params["dataset.name"] == "mixed"
    assert child.data.metrics["failed"] == 5 and child.data.metrics["ok"] == 1 and "mb_per_s" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"config.json", "ingest_stats.json", "failures.csv"} <= artifacts
    failures = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="failures.csv", dst_path=str(tmp_path / "dl")))
    assert "undecodable" in failures.read_text() and "truncated" in failures.read_text()

    frames_run = client.get_run(runs["frames/labeled"]["mlflow_run_id"])
    assert frames_run.data.tags["mlflow.parentRunId"] == parent["mlflow_run_id"]
    assert frames_run.data.metrics["frames"] > 0 and "source_seconds_per_s" in frames_run.data.metrics
    assert {"contact_sheet.png", "frames_stats.json", "frames_config.json"} <= {a.path for a in client.list_artifacts(frames_run.info.run_id)}

    # A second pipeline run does no work and says so.
    again = pipeline(cfg, str(home))
    assert again["ingest/labeled"]["processed"] == 0 and again["ingest/mixed"]["cached"] == 6
    assert again["frames/labeled"]["videos"] == 0 and again["frames/labeled"]["shards_cached"] >= 1


def test_cli_ingest_sql_status_with_state_in_the_data_root(tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        make_video(src / f"v{i}.mp4", seed=i)
    home = tmp_path / "home"
    first = _vimpac("--home", str(home), "run", "ingest", "--dataset", "cli", "--source", str(src), "--set", "batch_size=2", home=home)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(first.stdout[first.stdout.index("{"):])["ok"] == 3
    assert (home / "mlflow" / "mlflow.db").exists() and (home / "prefect").is_dir()
    assert any((home / "mlflow" / "artifacts").rglob("ingest_stats.json"))

    out = _vimpac("sql", "SELECT video_id, status, width FROM videos ORDER BY video_id", "--format", "json", home=home)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [{"video_id": f"v{i}", "status": "ok", "width": 64} for i in range(3)]
    csv_out = _vimpac("sql", "SELECT count(*) AS n FROM videos", "--format", "csv", home=home)
    assert csv_out.stdout.split() == ["n", "3"]
    status = _vimpac("status", home=home)
    assert status.returncode == 0 and "cli" in status.stdout and "ingest" in status.stdout

    second = _vimpac("run", "ingest", "--dataset", "cli", "--source", str(src), home=home)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "3 cached" in second.stdout + second.stderr and "nothing to do" in second.stdout + second.stderr

    frames = _vimpac("run", "frames", "--dataset", "cli", "--fps", "4", "--size", "32", "--views", "downstream", home=home)
    assert frames.returncode == 0, frames.stderr[-3000:]
    got = _vimpac("sql", "SELECT count(*) AS n, min(len(views)) AS v, min(n_frames) AS t FROM frame_samples WHERE status = 'ok'",
                  "--format", "json", home=home)
    assert json.loads(got.stdout) == [{"n": 3, "v": 12, "t": 4}]
    not_ingested = _vimpac("run", "frames", "--dataset", "other", home=home)
    assert not_ingested.returncode == 2 and "has not been ingested" in not_ingested.stderr

    bad_sql = _vimpac("sql", "SELECT nope FROM videos", home=home)
    assert bad_sql.returncode == 2 and "SQL error" in bad_sql.stderr
    bad_key = _vimpac("run", "ingest", "--dataset", "cli", "--source", str(src), "--set", "batch_sise=2", home=home)
    assert bad_key.returncode == 2 and "batch_sise" in bad_key.stderr


@pytest.mark.parametrize("stage", ["ingest", "frames"])
def test_a_single_stage_run_imports_its_flow_and_not_the_model_code(stage, tmp_path):
    """`vimpac run ingest|frames` load only their own flow: importing every flow module (torch,
    einx, the models) added about 6 s to each of these runs (bench/RESULTS.md, stop 28)."""
    code = ("import sys; from flows.cli import _stage_flow; "
            f"root, flow = _stage_flow(sys.argv[1], {stage!r}); assert flow.name == {stage!r}; "
            "print(' '.join(m for m in ('torch', 'flows.pipeline', 'flows.evaluate', 'flows.pretrain') if m in sys.modules) or 'none')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")], env=_clean_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["none"], out.stdout


def test_flow_modules_load_on_first_use_through_the_package(tmp_path):
    """bench/effect.py reached `flows.pipeline` through the package without importing it first
    and stopped with an AttributeError (stop 29): the package imports a flow module when it is
    first reached, and not before."""
    code = ("import sys; from flows.cli import _flows; root, flows = _flows(sys.argv[1]); "
            "before = 'torch' in sys.modules; "
            "assert flows.pipeline.pipeline.name == 'pipeline' and flows.evaluate.evaluate.name == 'evaluate'; "
            "print(before, 'torch' in sys.modules, hasattr(flows, 'no_such_flow'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "home")], env=_clean_env(tmp_path / "home"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "False"], out.stdout


def test_killed_run_then_rerun_gives_the_same_catalog(prefect_harness, tmp_path):
    from flows.ingest import ingest

    n = 24
    src = tmp_path / "src"
    for i in range(n):
        make_video(src / f"v{i:02d}.mp4", seed=i, frames=6)
    killed_home, clean_home = tmp_path / "killed", tmp_path / "clean"
    settings = ["--set", "batch_size=1", "--set", "workers=1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", "ingest", "--dataset", "k", "--source", str(src), *settings],
        env=_clean_env(killed_home), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    markers = killed_home / "tables" / "shards" / "ingest"
    deadline = time.time() + 240
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        committed = len(list(markers.glob("k--*.parquet"))) if markers.exists() else 0
        if committed >= 3:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= committed < n, f"the kill must land mid-run (committed {committed} of {n})"

    cfg = IngestConfig(batch_size=1, workers=1)
    ds = DatasetConfig(name="k", source=str(src))
    resumed = ingest(ds, cfg, str(killed_home))
    assert resumed["cached"] >= 3 and resumed["processed"] == n - resumed["cached"]
    ingest(ds, cfg, str(clean_home))

    def snapshot(home: Path) -> list[tuple]:
        return Catalog(home).rows(f"SELECT {COMPARE_COLUMNS} FROM videos ORDER BY video_id")

    assert snapshot(killed_home) == snapshot(clean_home)
    assert len(snapshot(clean_home)) == n
    statuses = Catalog(killed_home).rows("SELECT status, count(*) FROM runs WHERE stage = 'ingest' GROUP BY ALL ORDER BY 1")
    assert statuses == [("completed", 1), ("crashed", 1)]
    assert not list(DataRoot(killed_home).tables.rglob("*.partial"))


def test_runs_against_a_prefect_server_when_api_url_is_set(tmp_path):
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server_env = _clean_env(tmp_path / "unused") | {"PREFECT_HOME": str(tmp_path / "prefect-server")}
    prefect_bin = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen(
        [prefect_bin, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--no-services"],
        env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    pytest.fail("prefect server did not come up")
                time.sleep(0.5)
        make_video(tmp_path / "src" / "a.mp4", seed=1)
        home = tmp_path / "home"
        env = _clean_env(home) | {"PREFECT_API_URL": api}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "ingest", "--dataset", "srv", "--source", str(tmp_path / "src")],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Starting temporary server" not in proc.stderr + proc.stdout
        (flow_run_id,) = Catalog(home).rows("SELECT prefect_flow_run_id FROM runs WHERE stage = 'ingest'")[0]
        flow_run = json.loads(urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10).read())
        assert flow_run["state"]["type"] == "COMPLETED" and flow_run["name"] == "ingest-srv"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_tokenizer_registry_round_trip_and_tokenize_by_uri(prefect_harness, tmp_path):
    import numpy as np
    import torch

    from flows.frames import frames
    from flows.ingest import ingest
    from flows.tokenizer import resolve_tokenizer, tokenize, tokenizer
    from stages.config import FramesConfig, TokenizeConfig, TokenizerConfig
    from stages.tokenize.stage import load_tokenizer

    for i in range(2):
        make_video(tmp_path / "src" / f"v{i}.mp4", seed=i, frames=24, fps=12)
    home = str(tmp_path / "home")
    ds = DatasetConfig(name="tok", source=str(tmp_path / "src"))
    ingest(ds, IngestConfig(), home)
    frames(ds, FramesConfig(fps=2.0, size=32, workers=1), home)
    cfg = TokenizerConfig(preset="tiny", steps=4, batch_size=4, warmup_steps=1, register_as="test-tokenizer")
    first = tokenizer(ds, cfg, home, frame_size=32)
    assert first["model_uri"] == "models:/test-tokenizer/1" and not first["cached"]
    again = tokenizer(ds, cfg, home, frame_size=32)
    assert again["cached"] and again["model_uri"] == first["model_uri"], "same config and data: same registered version"

    by_uri = resolve_tokenizer(first["model_uri"], "cpu")
    by_path = load_tokenizer(first["checkpoint"], device="cpu")
    assert by_uri.identity == "models:/test-tokenizer/1"
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(by_uri.model.encode(x), by_path.model.encode(x))

    summary = tokenize(ds, TokenizeConfig(tokenizer="models:/test-tokenizer/latest"), home)
    assert summary["videos"] == 2 and summary["tokenizer"] == "models:/test-tokenizer/1"
    rows = Catalog(home).rows("SELECT DISTINCT tokenizer, grid_h, n_views FROM token_samples WHERE dataset = 'tok'")
    assert rows == [("models:/test-tokenizer/1", 4, 1)]
    # The obvious next command after `vimpac run tokenizer`: tokenize without naming a tokenizer.
    implicit = tokenize(ds, TokenizeConfig(), home)
    assert implicit["tokenizer"] == "models:/test-tokenizer/1"
    assert np.isfinite(first["psnr"])

    # The same frame shards pretrain an ST-MAE on pixels (issue 17): registered with its family.
    from flows.pretrain import pretrain_pixels
    from stages.config import PixelPretrainConfig, build, preset

    pixels = build(PixelPretrainConfig, preset("pretrain-pixels", "micro"), ["register_as=test-pixels", "train.device=cpu"])
    trained = pretrain_pixels(ds, pixels, home)
    assert trained["model_uri"] == "models:/test-pixels/1" and trained["run_name"] == "micro-4x32-st_mae-r0.75"
    assert pretrain_pixels(ds, pixels, home)["cached"]
    import mlflow

    assert mlflow.MlflowClient().get_model_version("test-pixels", "1").tags["vimpac.family"] == "st_mae"
