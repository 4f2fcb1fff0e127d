"""Operating vimpac as its users do: `vimpac server`, `vimpac serve`, flow runs started through the
Prefect REST API exactly as the UI starts them, and a rerun after new videos arrive."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from media_fixtures import make_video
from stages.config import DatasetConfig, PipelineConfig
from warehouse.catalog import Catalog

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIMPAC_"))}
    return env | {"VIMPAC_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def _api(method: str, url: str, body: dict | None = None, timeout: float = 30, retries: int = 5):
    """One REST call. Prefect answers 503 for errors it declares retryable (a locked SQLite
    database); its own client retries those, and so does this."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(retries + 1):
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == retries:
                raise
            time.sleep(2 ** attempt)


def _wait(what: str, check, timeout: float, procs: list[tuple[subprocess.Popen, Path]], interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        for p, log in procs:
            if p.poll() is not None:
                pytest.fail(f"{what}: {p.args[:4]} exited with {p.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(interval)
    logs = "\n".join(log.read_text()[-2000:] for _, log in procs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def _start(args: list[str], home: Path, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "--home", str(home), *args], env=_clean_env(home),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _run_deployment(api: str, deployment_id: str, parameters: dict, procs, timeout: float = 420) -> dict:
    """What the UI's "Run" button does: create a scheduled flow run of the deployment; the
    serving process picks it up. Returns the finished flow run."""
    run = _api("POST", f"{api}/deployments/{deployment_id}/create_flow_run",
               {"parameters": parameters, "state": {"type": "SCHEDULED", "name": "Scheduled"}})

    def finished():
        fr = _api("GET", f"{api}/flow_runs/{run['id']}")
        return fr if fr["state"]["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} else None

    fr = _wait(f"flow run {run['id']}", finished, timeout, procs)
    assert fr["state"]["type"] == "COMPLETED", fr["state"]
    return fr


def _unit_task_names(api: str, flow_run_id: str) -> dict[str, set[str]]:
    """Per stage subflow of a pipeline run, the names of the unit tasks that ran."""
    subflows = _api("POST", f"{api}/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
    out: dict[str, set[str]] = {}
    for sub in subflows:
        tasks = _api("POST", f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [sub["id"]]}}})
        out.setdefault(sub["name"], set()).update(t["name"] for t in tasks if t["state_type"] == "COMPLETED")
    return out


@pytest.mark.slow
def test_ui_run_of_pipeline_then_rerun_after_two_new_videos_runs_only_their_units(tmp_path):
    home, src = tmp_path / "home", tmp_path / "src"
    for i in range(6):
        make_video(src / ("Up" if i % 2 else "Down") / f"clip{i}.mp4", seed=i)
    prefect_port, mlflow_port = _free_port(), _free_port()
    server_log, serve_log = tmp_path / "server.log", tmp_path / "serve.log"
    server = _start(["server", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)], home, server_log)
    procs = [(server, server_log)]
    serve = None
    try:
        _wait("vimpac server", lambda: (home / "servers.json").exists(), 240, procs)
        info = json.loads((home / "servers.json").read_text())
        assert info["prefect_api_url"] == f"http://127.0.0.1:{prefect_port}/api"
        assert info["mlflow_url"] == f"http://127.0.0.1:{mlflow_port}"
        api = info["prefect_api_url"]
        # The browser app must be told the non-default port, or it shows "can't connect".
        assert _api("GET", f"http://127.0.0.1:{prefect_port}/ui-settings")["api_url"] == api

        serve = _start(["serve", "--only", "pipeline", "--only", "frames"], home, serve_log)
        procs.append((serve, serve_log))

        def deployments():
            # `serve` registers deployments one by one: wait for both it was asked for.
            try:
                return [_api("GET", f"{api}/deployments/name/{name}/vimpac") for name in ("pipeline", "frames")]
            except urllib.error.HTTPError:
                return None

        dep, frames_dep = _wait("the pipeline and frames deployments", deployments, 180, procs)
        assert dep["tags"] == ["vimpac", "pipeline"] and "stages" in dep["description"]
        # The form: a schema for the typed config, with descriptions, filled with the defaults.
        schema = dep["parameter_openapi_schema"]
        frames_schema = schema["definitions"]["FramesConfig"]["properties"]
        assert "description" in frames_schema["fps"] and frames_schema["size"]["default"] == 128
        assert dep["parameters"]["config"]["frames"]["fps"] == 2.0 and dep["parameters"]["home"] == str(home)
        assert frames_dep["parameters"]["config"] == json.loads(PipelineConfig().frames.model_dump_json())

        # The full form as the UI submits it: every field, defaults included.
        cfg = PipelineConfig(
            name="ui-e2e", datasets=[DatasetConfig(name="clips", source=str(src))], stages=["ingest", "frames"],
            ingest={"workers": 2, "batch_size": 2}, frames={"size": 32, "fps": 4.0, "workers": 2},
            tracking={"experiment": "ui-e2e"},
        )
        params = {"config": cfg.model_dump(mode="json"), "home": str(home), "force": False}
        first = _run_deployment(api, dep["id"], params, procs)
        assert first["name"] == "pipeline-ui-e2e", "in the UI's run list a run is named after its pipeline"

        catalog = Catalog(home)
        assert catalog.rows("SELECT count(*) FROM videos WHERE dataset = 'clips' AND status = 'ok'")[0][0] == 6
        assert catalog.rows("SELECT count(*) FROM frame_samples WHERE dataset = 'clips' AND status = 'ok'")[0][0] == 6
        runs = catalog.query("SELECT * FROM runs ORDER BY started_at").to_pylist()
        parent = next(r for r in runs if r["stage"] == "pipeline")
        assert parent["prefect_flow_run_id"] == first["id"] and parent["status"] == "completed"
        children = [r for r in runs if r["parent_run_id"] == parent["run_id"]]
        assert sorted(r["stage"] for r in children) == ["frames", "ingest"]

        # MLflow, through its server: the pipeline run tagged with the Prefect flow run (id and
        # link), the stage runs nested under it, each tagged with its own Prefect subflow run.
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=info["mlflow_url"])
        ml_parent = client.get_run(parent["mlflow_run_id"])
        assert ml_parent.data.tags["prefect.flow_run_id"] == first["id"]
        assert ml_parent.data.tags["prefect.flow_run_url"] == f"http://127.0.0.1:{prefect_port}/flow-runs/flow-run/{first['id']}"
        assert ml_parent.data.params["stages"] == '["ingest", "frames"]'
        for child in children:
            ml_child = client.get_run(child["mlflow_run_id"])
            assert ml_child.data.tags["mlflow.parentRunId"] == parent["mlflow_run_id"]
            assert ml_child.data.tags["prefect.flow_run_id"] == child["prefect_flow_run_id"]
        # ...and the Prefect run's logs name its MLflow run, with a link to it.
        logs = _api("POST", f"{api}/logs/filter", {"logs": {"flow_run_id": {"any_": [first["id"]]}}})
        link = f"http://127.0.0.1:{mlflow_port}/#/experiments/{ml_parent.info.experiment_id}/runs/{parent['mlflow_run_id']}?workflowType=machine_learning"
        assert client.get_experiment(ml_parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
        assert any(link in entry["message"] for entry in logs)
        first_tasks = _unit_task_names(api, first["id"])
        assert len(first_tasks["ingest-clips"]) == 3 and len(first_tasks["frames-clips"]) == 2

        # Two videos arrive; the user presses Run again with the same form.
        make_video(src / "Up" / "clip6.mp4", seed=6)
        make_video(src / "Down" / "clip7.mp4", seed=7)
        shards_before = {r[0]: r[1] for r in catalog.rows("SELECT path, created_at FROM shards WHERE stage = 'frames'")}
        second = _run_deployment(api, dep["id"], params, procs)

        added = "(video_id LIKE '%clip6%' OR video_id LIKE '%clip7%')"
        new_units = {r[0] for r in catalog.rows(f"SELECT unit FROM videos WHERE {added}")}
        assert len(new_units) >= 1
        assert not catalog.rows(f"SELECT video_id FROM videos WHERE unit IN (SELECT unnest(?)) AND NOT {added}", [sorted(new_units)])
        new_shards = {Path(r[0]).stem for r in catalog.rows(f"SELECT shard FROM frame_samples WHERE {added}")}
        assert new_shards
        second_tasks = _unit_task_names(api, second["id"])
        assert second_tasks["ingest-clips"] == {f"ingest-clips-{u}" for u in new_units}
        assert second_tasks["frames-clips"] == {f"frames-clips-{s}" for s in new_shards}
        # The shards built before are the same files, untouched; the new videos are in new ones.
        shards_after = {r[0]: r[1] for r in catalog.rows("SELECT path, created_at FROM shards WHERE stage = 'frames'")}
        assert {p: shards_after[p] for p in shards_before} == shards_before
        assert len(shards_after) == len(shards_before) + len(new_shards)
        assert catalog.rows("SELECT count(*) FROM frame_samples WHERE dataset = 'clips' AND status = 'ok'")[0][0] == 8
        summary = json.loads(catalog.rows("SELECT summary FROM runs WHERE stage = 'frames' ORDER BY started_at DESC LIMIT 1")[0][0])
        assert summary["videos"] == 2
    finally:
        if serve is not None:
            _stop(serve)
        _stop(server)
    # Ctrl-C stopped both servers and withdrew their address.
    assert server.returncode == 0, server_log.read_text()[-2000:]
    assert not (home / "servers.json").exists()
    for port in (prefect_port, mlflow_port):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_two_frames_runs_on_the_same_dataset_at_once_build_each_shard_once(prefect_harness, tmp_path):
    """Two users start the same stage on the same dataset at once: both wait while the lock is
    held, then one builds and the other finds every shard committed (DESIGN.md: one writer per
    stage and dataset) instead of writing the same shards twice."""
    import tarfile

    from prefect.settings import PREFECT_API_URL

    from flows.ingest import ingest
    from stages.config import IngestConfig
    from warehouse.catalog import file_lock

    for i in range(4):
        make_video(tmp_path / "src" / f"clip{i}.mp4", seed=i)
    home = tmp_path / "home"
    ingest(DatasetConfig(name="twice", source=str(tmp_path / "src")), IngestConfig(workers=2, batch_size=2), str(home))
    env = _clean_env(home) | {"PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    logs = [tmp_path / f"run{i}.log" for i in range(2)]
    cmd = [sys.executable, "-m", "flows.cli", "run", "frames", "--dataset", "twice", "--size", "32", "--fps", "4", "--set", "workers=2"]
    # Hold the lock the way a running flow does, so both runs provably overlap with it.
    with file_lock(home / "locks" / "run--frames--twice.lock", holder="a test holding the lock"):
        procs = []
        for log in logs:
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT))
        _wait("both runs waiting for the lock", lambda: all("a test holding the lock" in log.read_text() for log in logs), 240,
              list(zip(procs, logs)))
    for p, log in zip(procs, logs):
        assert p.wait(300) == 0, log.read_text()[-3000:]

    outputs = [log.read_text() for log in logs]
    assert sorted("2 shards to build (4 videos" in out for out in outputs) == [False, True], outputs
    assert sum("2 shards cached; nothing to do" in out for out in outputs) == 1
    catalog = Catalog(home)
    assert catalog.rows("SELECT count(*), count(DISTINCT video_id) FROM frame_samples WHERE status = 'ok'")[0] == (4, 4)
    shards = catalog.rows("SELECT path, n_samples FROM shards WHERE stage = 'frames'")
    assert sum(n for _, n in shards) == 4 and len({p for p, _ in shards}) == len(shards) == 2
    for path, n in shards:
        with tarfile.open(home / path) as tar:
            assert len({m.name.split(".")[0] for m in tar.getmembers()}) == n
    assert [r[0] for r in catalog.rows("SELECT status FROM runs WHERE stage = 'frames'")] == ["completed", "completed"]


def test_servers_bind_to_loopback_unless_asked(tmp_path):
    from flows.cli import build_parser
    from flows.server import services
    from warehouse.layout import DataRoot

    args = build_parser().parse_args(["server"])
    assert (args.host, args.prefect_port, args.mlflow_port) == ("127.0.0.1", 4200, 5000)
    for svc in services(DataRoot(tmp_path), args.host, 4311, 5311):
        assert svc.command[svc.command.index("--host") + 1] == "127.0.0.1"
        assert svc.url.startswith("http://127.0.0.1:")
    prefect = services(DataRoot(tmp_path), "127.0.0.1", 4311, 5311)[0]
    assert prefect.env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4311/api"


def test_every_stage_is_a_deployment_with_a_described_form(tmp_path):
    """What the UI's run form is made of, for every deployment `vimpac serve` registers."""
    from flows.env import configure_environment

    root = configure_environment(tmp_path / "home")
    from flows.serve import SPECS, build_deployments, load_flow
    from stages.config import STAGES

    deployments = {d.flow_name: d for d in build_deployments(root)}
    assert set(deployments) == set(STAGES) | {"pipeline"}
    for name, d in deployments.items():
        assert d.name == "vimpac" and d.description and "vimpac" in d.tags, name
        schema = d._parameter_openapi_schema.model_dump()
        for param, prop in schema["properties"].items():
            assert prop.get("description"), f"{name}.{param} has no description in the form"
        # The defaults fill the form and are valid input for the flow.
        assert d.parameters["home"] == str(root.home)
        required = {"dataset": {"name": "x", "source": "/videos"}, "grid": {"name": "g", "models": ["scratch"], "datasets": ["x"]}}
        flow = load_flow(SPECS[name].flow)
        flow.validate_parameters(d.parameters | {k: v for k, v in required.items() if k in schema["properties"]})


def _servers_file(home: Path, **info) -> None:
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()  # nothing listens there
    (home / "servers.json").write_text(json.dumps({"prefect_api_url": f"http://127.0.0.1:{port}/api",
                                                   "mlflow_url": f"http://127.0.0.1:{_free_port()}", **info}))


def test_a_server_that_is_gone_is_ignored_and_one_that_hangs_is_an_error(tmp_path):
    from flows.server import ServerNotAnswering, running_servers
    from warehouse.layout import DataRoot

    root = DataRoot(tmp_path / "home")
    assert running_servers(root) is None, "no servers.json: no servers"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _servers_file(root.home, pid=dead.pid, host=socket.gethostname())
    assert running_servers(root, patience_s=0.5) is None, "a crashed `vimpac server` left its file behind"
    _servers_file(root.home, pid=os.getpid(), host="another-machine")
    assert running_servers(root, patience_s=0.5) is None, "servers of another machine's data root are not ours to judge"

    # Alive but not answering (overloaded, hung): an error that says so, not a silent run
    # against a private temporary server the UI never shows.
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "server"])
    try:
        _servers_file(root.home, pid=hung.pid, host=socket.gethostname())
        with pytest.raises(ServerNotAnswering, match=f"pid {hung.pid}.*did not answer"):
            running_servers(root, patience_s=1.0)
    finally:
        hung.kill()
        hung.wait()
