"""The pretrain stage end to end (token shards -> loader workers -> pinned batches -> train_step):
videos/s, MFU and the share of time the step loop waits for data, from the stage's own metrics.

    python bench/pretrain_stage.py [--preset small] [--batch 64] [--steps 40] [--workers 2,8]
                                   [--compile] [--videos 4096] [--device auto|cpu|cuda] [--json PATH]

bench/pretrain.py times `train_step` on batches already on the device; this runs
`stages.pretrain.train.pretrain` as a user does, on a synthetic corpus written into a temporary
data root: `--videos` videos of 20 frames (10 s at 2 fps) of 16x16 tokens (S = 128), 8192 codes,
the pretrain view only, shards of 256 videos, uniform random codes. Loader workers sample two
clips per video and block-mask them (5 blocks); batches come pinned when the device is CUDA.
The stage logs every `--log-every` steps; the first window holds CUDA start-up and compilation,
so the figures are the mean over the later windows ("steady"). `data wait` is the stage's
data_wait_frac: time spent in next(batches) over wall time. Each worker setting runs in its
own process, `--steps` optimizer steps (`max_steps`: the run stops early and leaves a resume
checkpoint, which is written after the last window and not timed).
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.config import PretrainConfig, build, preset  # noqa: E402
from stages.pretrain.train import pretrain  # noqa: E402
from stages.reporting import RecordingReporter  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402
from warehouse.shards import ShardWriter, commit_shard  # noqa: E402
from warehouse.tables import now  # noqa: E402

DATASET, TOKENIZER = "bench", "ckpt:bench0000pretrain"
FRAMES, GRID, N_CODES, SIZE, FPS, VIEW = 20, 16, 8192, 128, 2.0, "s100_c"
PER_SHARD = 256


def write_corpus(root: DataRoot, videos: int, seed: int = 0) -> None:
    Catalog(root).ensure_tables()
    rng = np.random.default_rng(seed)
    for number, start in enumerate(range(0, videos, PER_SHARD)):
        rel = f"shards/tokens/{DATASET}/pretrain-{SIZE}--tok-{TOKENIZER[-4:]}/{number:05d}.tar"
        unit = f"{DATASET}-pretrain-{TOKENIZER[-4:]}-{SIZE}-{number}"
        writer = ShardWriter(root.home / rel)
        rows = []
        for vid in range(start, min(videos, start + PER_SHARD)):
            key = f"v{vid:06d}"
            buf = io.BytesIO()
            np.save(buf, rng.integers(0, N_CODES, size=(1, FRAMES, GRID, GRID), dtype=np.uint16), allow_pickle=False)
            meta = {"video_id": key, "dataset": DATASET, "views": [VIEW], "fps": FPS, "size": SIZE, "n_frames": FRAMES,
                    "grid": [GRID, GRID], "tokenizer": TOKENIZER, "codebook_size": N_CODES}
            writer.add(key, {"tokens.npy": buf.getvalue(), "json": json.dumps(meta).encode()})
            rows.append({"dataset": DATASET, "video_id": key, "shard": rel, "tokenizer": TOKENIZER, "variant": "pretrain",
                         "n_frames": FRAMES, "grid_h": GRID, "grid_w": GRID, "n_views": 1, "views": [VIEW], "fps": FPS,
                         "size": SIZE, "codebook_size": N_CODES, "key": key, "status": "ok", "unit": unit, "created_at": now()})
        marker = {"stage": "tokenize", "dataset": DATASET, "unit": unit, "path": rel, "n_samples": len(rows), "n_failed": 0,
                  "bytes": 0, "created_at": now()}
        commit_shard(writer, "token_samples", rows, {"count": len(rows)}, marker,
                     root.table_dir("shards", "tokenize", f"{unit}.parquet"))


def measure(job: dict) -> dict:
    root = DataRoot(job["home"])
    sets = [f"train.batch_size={job['batch']}", f"data.workers={job['workers']}", f"train.compile={str(job['compile']).lower()}",
            f"train.log_every={job['log_every']}", f"train.device={job['device']}", "train.epochs=100",
            f"train.seed={job['workers']}"]  # another run key per setting: no run resumes another's checkpoint
    cfg = build(PretrainConfig, preset("pretrain", job["preset"]), sets)
    reporter = RecordingReporter()
    pretrain(root, [DATASET], cfg, reporter=reporter, max_steps=job["steps"], force=True)
    windows = [dict(values, step=step) for values, step in reporter.metric_log if "videos_per_s" in values]
    steady = windows[1:] or windows
    out = {**job, "windows": windows,
           "videos_per_s": statistics.mean(w["videos_per_s"] for w in steady),
           "data_wait_frac": statistics.mean(w["data_wait_frac"] for w in steady),
           "first_window_videos_per_s": windows[0]["videos_per_s"] if windows else None}
    mfus = [w["mfu"] for w in steady if "mfu" in w]
    out["mfu"] = statistics.mean(mfus) if mfus else None
    if torch.cuda.is_available() and job["device"] == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        return {**job, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, help="pretrain preset (CUDA: small; CPU: tiny)")
    ap.add_argument("--batch", type=int, default=None, help="videos per step (CUDA: 64; CPU: 4)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per setting (CUDA: 40; CPU: 4)")
    ap.add_argument("--log-every", type=int, default=None, help="steps per metrics window (CUDA: 10; CPU: 2)")
    ap.add_argument("--workers", default="2,8", help="comma-separated data.workers settings (the stage's default: 2)")
    ap.add_argument("--videos", type=int, default=None, help="videos in the synthetic corpus (CUDA: 4096; CPU: 64)")
    ap.add_argument("--compile", action="store_true", help="train.compile=true (the stage compiles layer by layer)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    device = "cuda" if gpu else "cpu"
    name = args.preset or ("small" if gpu else "tiny")
    batch = args.batch or (64 if gpu else 4)
    steps = args.steps or (40 if gpu else 4)
    log_every = args.log_every or (10 if gpu else 2)
    videos = args.videos or (4096 if gpu else 64)
    results = []
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-pretrain-stage-") as tmp:
        root = DataRoot(Path(tmp) / "home").ensure()
        write_corpus(root, videos)
        Catalog(root).refresh()
        for workers in [int(w) for w in args.workers.split(",")]:
            job = {"home": str(root.home), "preset": name, "batch": batch, "steps": steps, "log_every": log_every,
                   "workers": workers, "compile": args.compile, "device": device}
            r = run_child(job)
            results.append(r)
            status = r.get("error") or f"{r['videos_per_s']:.1f} videos/s, data wait {r['data_wait_frac']:.1%}"
            print(f"  workers={workers}: {status}", file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"pretrain stage on {device} ({dev_name}); torch {torch.__version__}; preset {name}, batch {batch}, {steps} steps, "
          f"metrics every {log_every}; {videos} synthetic videos of {FRAMES} frames x {GRID}x{GRID} tokens, {N_CODES} codes"
          f"{'; train.compile' if args.compile else ''}")
    print(f"{'workers':>7} {'videos/s':>9} {'MFU':>6} {'data wait':>10} {'1st window v/s':>15} {'peak mem MB':>12}")
    for r in results:
        if "error" in r:
            print(f"{r['workers']:>7} failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        peak = f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") else "-"
        print(f"{r['workers']:>7} {r['videos_per_s']:>9.1f} {mfu:>6} {r['data_wait_frac']:>10.1%} "
              f"{r['first_window_videos_per_s']:>15.1f} {peak:>12}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "device_name": dev_name, "torch": torch.__version__, "preset": name,
                                         "batch": batch, "steps": steps, "videos": videos, "compile": args.compile,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
