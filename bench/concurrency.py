"""Two vimpac trainings on one machine: one after the other, then at the same time, in one run.

    python bench/concurrency.py [--steps 200] [--threads-policy both|on|off] [--home DIR] [--record]

Each training is `vimpac run tokenizer --preset tiny` (the demo's CPU tokenizer, `--force`d, a
fixed number of steps) on the demo corpus's pretraining videos, started as a user would: a
separate `vimpac` process with no thread setting, so the default policy of stages/threads.py is
what is measured; the two work in two data roots prepared alike, so neither waits for the
other's locks. Per policy:

    sequential: run A, then run B (each alone on the machine)
    concurrent: A and B started together

and `concurrency: policy=P sequential_s=X concurrent_s=Y ratio=Y/X (target <= 1.15)`, X and Y being wall
times of the whole commands (Prefect's temporary server and MLflow included), beside each run's
training s/step and the thread share it logged. `--threads-policy off` runs the same with
`VIMPAC_THREADS=off` (torch's and OpenMP's defaults: every process takes every core, OpenMP
threads spin while they wait): the behaviour before the policy, measured next to it by default
(`both`). The issue this answers measured 8x slower steps per process for two at once on 2 cores
where a fair share is 2x.

Thread variables of this shell (OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS,
OMP_WAIT_POLICY, VIMPAC_THREADS) are removed from the trainings' environment. Run it alone on the
machine: other processes, vimpac or not, change both figures. The data is made once under --home
(a child process, so this one is never counted as computing), plus one untimed 1-step training per
data root so that both measured modes find Prefect's and MLflow's databases made. About 10 minutes
on an idle 2-core machine with the defaults (the old policy's concurrent run is most of it).
`--record` appends the table to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATASET = "demo-pretrain"
SIZE = 64
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "VIMPAC_THREADS")
TARGET = 1.15
_STEPS = re.compile(r"trained steps (\d+)-(\d+) in ([\d.]+) s \(([\d.]+) s/step\)")
_SHARE = re.compile(r"threads: [^\n]*?\)(?=\s|$)")


@dataclass
class Run:
    name: str
    wall_s: float
    train_s: float | None
    s_per_step: float | None
    share: str
    log: Path


def prepare(home: Path, scale: float, seconds: float) -> None:
    """The demo corpus once, then its pretraining videos ingested and framed (64 px, 2 fps) into
    data roots `home/a` and `home/b`. Runs in a child process (see the module docstring)."""
    from stages.config import DatasetConfig, FramesConfig, IngestConfig
    from stages.demo_data import generate_demo_corpus
    from stages.frames.stage import run_frames
    from stages.ingest.stage import run_ingest
    from warehouse.catalog import Catalog
    from warehouse.layout import DataRoot

    corpus = generate_demo_corpus(home / "corpus", scale=scale, pretrain_seconds=seconds, progress=lambda _m: None)
    source = next(d for d in corpus if d.name == DATASET)
    for name in ("a", "b"):
        root = DataRoot(home / name).ensure()
        Catalog(root).refresh()
        ds = DatasetConfig(name=DATASET, source=str(source.path))
        run_ingest(root, ds, IngestConfig(), run_id="bench-concurrency")
        run_frames(root, ds, FramesConfig(fps=2.0, size=SIZE, views="pretrain"), run_id="bench-concurrency")


def command(home: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "--home", str(home), "run", "tokenizer", "--dataset", DATASET,
            "--preset", "tiny", "--size", str(SIZE), "--set", f"steps={steps}", "--set", f"warmup_steps={min(20, steps)}",
            "--set", f"checkpoint_every={steps + 1}", "--set", f"log_every={max(1, steps // 4)}", "--force"]


def environment(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if policy == "off":
        env["VIMPAC_THREADS"] = "off"
    return env


def start(home: Path, steps: int, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, float]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(command(home, steps), env=env, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    return proc, time.perf_counter()


def finish(name: str, proc: subprocess.Popen, started: float, log: Path) -> Run:
    rc = proc.wait()
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    if rc != 0:
        raise SystemExit(f"{name} failed (exit code {rc}); its output is in {log}:\n{text[-3000:]}")
    steps = _STEPS.findall(text)
    shares = _SHARE.findall(text)
    train_s, per_step = (float(steps[-1][2]), float(steps[-1][3])) if steps else (None, None)
    return Run(name, wall, train_s, per_step, shares[-1] if shares else "?", log)


def sequential(homes: list[Path], steps: int, env: dict[str, str], logs: Path) -> list[Run]:
    runs = []
    for home in homes:
        log = logs / f"sequential-{home.name}.log"
        runs.append(finish(f"sequential {home.name}", *start(home, steps, env, log), log))
    return runs


def concurrent(homes: list[Path], steps: int, env: dict[str, str], logs: Path) -> tuple[list[Run], float]:
    t0 = time.perf_counter()
    started = [(home, *start(home, steps, env, logs / f"concurrent-{home.name}.log")) for home in homes]
    runs = [finish(f"concurrent {home.name}", proc, at, logs / f"concurrent-{home.name}.log") for home, proc, at in started]
    return runs, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, default=REPO / "vimpac-data" / "bench-concurrency")
    ap.add_argument("--steps", type=int, default=200, help="tokenizer training steps per run (tiny preset: ~0.15 s/step alone on 2 cores)")
    ap.add_argument("--threads-policy", choices=["both", "on", "off"], default="both",
                    help="on: the default thread policy; off: VIMPAC_THREADS=off (every process takes every core); both: off, then on")
    ap.add_argument("--scale", type=float, default=0.25, help="demo corpus scale (pretraining videos: 8 x scale)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each pretraining video")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    ap.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)  # the data-making child
    args = ap.parse_args()
    home = args.home.resolve()
    if args.prepare_only:
        prepare(home, args.scale, args.seconds)
        return 0

    t_all = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--prepare-only", "--home", str(home), "--scale", str(args.scale),
                    "--seconds", str(args.seconds)], check=True, cwd=REPO)
    homes = [home / "a", home / "b"]
    logs = home / "logs"
    load = os.getloadavg()[0]
    # Untimed: each data root's first command makes its Prefect and MLflow databases.
    concurrent(homes, 1, environment("on"), logs / "warm-up")
    policies = ["off", "on"] if args.threads_policy == "both" else [args.threads_policy]
    results: dict[str, tuple[list[Run], list[Run], float]] = {}
    for policy in policies:
        env = environment(policy)
        seq = sequential(homes, args.steps, env, logs / policy)
        conc, conc_wall = concurrent(homes, args.steps, env, logs / policy)
        results[policy] = (seq, conc, conc_wall)
        report(policy, seq, conc, conc_wall)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"Two `vimpac run tokenizer --preset tiny --set steps={args.steps}` processes (demo pretraining videos, "
             f"{SIZE} px frames, separate data roots) on {machine}; load average {load:.2f} at the start; "
             f"{(time.perf_counter() - t_all) / 60:.1f} min in all.", "",
             "| policy | mode | run | wall s | training s | s/step | share it logged |", "|---|---|---|---:|---:|---:|---|"]
    for policy, (seq, conc, conc_wall) in results.items():
        for mode, runs in (("sequential", seq), ("concurrent", conc)):
            for r in runs:
                lines.append(f"| {policy} | {mode} | {r.name.split()[-1]} | {r.wall_s:.1f} | {_num(r.train_s, 1)} | "
                             f"{_num(r.s_per_step, 3)} | {r.share} |")
    lines.append("")
    for policy, (seq, conc, conc_wall) in results.items():
        lines.append(f"- `{summary(policy, seq, conc_wall)}`")
    if args.record:
        block = (f"\n## Concurrency (`python bench/concurrency.py --steps {args.steps}`), {date.today().isoformat()}\n\n"
                 + "\n".join(lines) + "\n")
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(block)
        print("appended to bench/RESULTS.md")
    else:
        print("\n".join(lines))
    return 0


def _num(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(policy: str, seq: list[Run], conc_wall: float) -> str:
    sequential_s = sum(r.wall_s for r in seq)
    return (f"concurrency: policy={policy} sequential_s={sequential_s:.1f} concurrent_s={conc_wall:.1f} "
            f"ratio={conc_wall / sequential_s:.2f} (target <= {TARGET})")


def report(policy: str, seq: list[Run], conc: list[Run], conc_wall: float) -> None:
    for r in (*seq, *conc):
        print(f"policy {policy}, {r.name}: {r.wall_s:.1f} s wall, {_num(r.train_s, 1)} s training at {_num(r.s_per_step, 3)} s/step; "
              f"{r.share}", flush=True)
    alone = [r.s_per_step for r in seq if r.s_per_step]
    together = [r.s_per_step for r in conc if r.s_per_step]
    if alone and together:
        print(f"policy {policy}: two at once train at {sum(together) / len(together) / (sum(alone) / len(alone)):.2f}x the "
              "s/step of one alone (a fair share of the cores: 2x)", flush=True)
    print(summary(policy, seq, conc_wall), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
