"""Retake the README's UI screenshots: docs/ui-prefect-run-form.png, docs/ui-mlflow-run.png and
docs/ui-prefect-flow-run.png.

    python docs/screenshots.py [--home /tmp/vimpac-shots] [--skip-run]

What a user does, scripted: generate the demo corpus, `vimpac server`, `vimpac serve --config
<demo pipeline file>`, open the run form of the `frames/vimpac` deployment, start
`pipeline/vimpac` through the REST API exactly as the UI's Run button does, wait for it, and
open its pretraining run in MLflow. Pictures come from headless Chromium (Debian's `chromium`
package). Takes the demo's time (about 5 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(method: str, url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


def wait_for(what: str, check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def screenshot(url: str, out: Path, *, size: str = "1440,1000", budget_ms: int = 20000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("needs Chromium: apt-get install chromium")
    subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=180)
    print(f"wrote {out} ({url})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("/tmp/vimpac-shots"))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--skip-run", action="store_true", help="only the run form (no pipeline run, no MLflow picture)")
    args = parser.parse_args()

    from flows.cli import demo_pipeline_file
    from stages.demo_data import generate_demo_corpus

    home = args.home.resolve()
    corpus = home / "demo-corpus"
    pipeline_file = corpus / "pipeline.yaml"
    if not pipeline_file.exists():
        demo_pipeline_file(corpus, generate_demo_corpus(corpus, progress=print))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))} | {"VIMPAC_HOME": str(home)}
    cli = [sys.executable, "-m", "flows.cli", "--home", str(home)]
    prefect_port, mlflow_port = free_port(), free_port()
    procs = [subprocess.Popen(cli + ["server", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                              env=env, cwd=REPO, start_new_session=True)]
    try:
        info = wait_for("vimpac server", lambda: json.loads((home / "servers.json").read_text())
                        if (home / "servers.json").exists() else None, 300)
        procs.append(subprocess.Popen(cli + ["serve", "--config", str(pipeline_file)], env=env, cwd=REPO, start_new_session=True))
        ui, prefect_api = info["prefect_ui_url"], info["prefect_api_url"]
        frames = wait_for("deployments", lambda: api("GET", f"{prefect_api}/deployments/name/frames/vimpac"), 300)
        pipeline = wait_for("deployments", lambda: api("GET", f"{prefect_api}/deployments/name/pipeline/vimpac"), 300)
        screenshot(f"{ui}/deployments/deployment/{frames['id']}/run", args.out / "ui-prefect-run-form.png", size="1440,1500")
        if args.skip_run:
            return 0
        run = api("POST", f"{prefect_api}/deployments/{pipeline['id']}/create_flow_run",
                  {"parameters": pipeline["parameters"], "state": {"type": "SCHEDULED", "name": "Scheduled"}})
        print(f"pipeline flow run {run['id']} started; waiting (about 5 minutes on 2 cores)")
        done = wait_for("the pipeline run", lambda: (lambda fr: fr if fr["state"]["type"] in
                        {"COMPLETED", "FAILED", "CRASHED"} else None)(api("GET", f"{prefect_api}/flow_runs/{run['id']}")), 1800)
        print(f"pipeline run {done['state']['type']}")

        from warehouse.catalog import Catalog

        (mlflow_run,) = Catalog(home).rows(
            "SELECT mlflow_run_id FROM runs WHERE stage = 'pretrain' AND status = 'completed' ORDER BY finished_at DESC LIMIT 1")[0]
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(tracking_uri=info["mlflow_url"]).get_run(mlflow_run).info.experiment_id
        screenshot(f"{info['mlflow_url']}/#/experiments/{experiment}/runs/{mlflow_run}?workflowType=machine_learning", args.out / "ui-mlflow-run.png",
                   size="1440,1100")
        screenshot(f"{ui}/runs/flow-run/{run['id']}", args.out / "ui-prefect-flow-run.png", size="1440,1100")
        return 0
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
