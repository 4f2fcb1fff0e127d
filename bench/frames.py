"""Frames stage throughput and memory next to FFmpeg's decode-only speed, in the same run.

    python bench/frames.py [--seconds 20] [--fps 2] [--size 128] [--views pretrain]

For 240p, 480p and 1080p H.264 sources (30 fps, CABAC, as cameras write them) it prints:
  - ffmpeg -threads 1 -i SRC -vf fps=F -f null -   (decode-only baseline, one core)
  - the frames stage with one worker process (decode + sample + views + encode + shard)
as output frames/s and source-seconds/s per video, and the stage/ffmpeg ratio (goal >= 0.8 per
core). "decode in worker" is the per-video time inside the decoder process; "whole" is the
stage's wall time (planning, process start, shard commit) divided by the videos in the shard.
Then the decoder process's peak RSS for a short source and one 20x longer: streaming decode
keeps it flat apart from the sampled output it holds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stages.config import DatasetConfig, FramesConfig, IngestConfig  # noqa: E402
from stages.frames.stage import run_frames  # noqa: E402
from stages.frames.worker import start_fork_server  # noqa: E402
from stages.ingest.stage import run_ingest  # noqa: E402
from stages.media import encode_video, ffmpeg_exe  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402

RESOLUTIONS = {"240p": (240, 426), "480p": (480, 854), "1080p": (1080, 1920)}


def make_source(path: Path, hw: tuple[int, int], seconds: float, fps: int = 30) -> Path:
    """Camera-like content: a blocky texture panning and a bright square moving across it."""
    h, w = hw
    rng = np.random.default_rng(0)
    n = int(seconds * fps)
    coarse = rng.integers(0, 255, (h // 8 + 1, (w + 2 * n) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h]

    def frames():
        for i in range(n):
            f = texture[:, 2 * i : 2 * i + w].copy()
            y, x = (i * 3) % (h - h // 4), (i * 5) % (w - w // 4)
            f[y : y + h // 4, x : x + w // 4] = 255 - f[y : y + h // 4, x : x + w // 4]
            yield f

    return encode_video(frames(), path, fps=fps, codec="h264")


def ffmpeg_decode_s(path: Path, fps: float) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-threads", "1", "-i", str(path), "-vf", f"fps={fps}", "-f", "null", "-"],
        check=True,
    )
    return time.perf_counter() - t0


def stage_run(path: Path, cfg: FramesConfig, scratch: Path, copies: int) -> dict:
    """The stage on `copies` distinct copies of the source (trailing bytes make each copy's
    hash unique; demuxers never read them), all in one shard and one worker process, so the
    process start is paid once as in real shards of many videos."""
    src = scratch / f"src-{path.stem}"
    src.mkdir()
    data = path.read_bytes()
    for i in range(copies):
        (src / f"{path.stem}-{i}.mp4").write_bytes(data + i.to_bytes(8, "little"))
    root = DataRoot(scratch / f"home-{path.stem}").ensure()
    Catalog(root).refresh()
    ds = DatasetConfig(name="bench", source=str(src))
    run_ingest(root, ds, IngestConfig(), run_id="bench")
    t0 = time.perf_counter()
    outcome = run_frames(root, ds, cfg.model_copy(update={"workers": 1}), run_id="bench")
    wall = time.perf_counter() - t0
    rows = Catalog(root).query("SELECT n_frames, decode_s, status, backend FROM frame_samples").to_pylist()
    if len(rows) != copies or any(r["status"] != "ok" for r in rows):
        raise SystemExit(f"frames stage failed on {path}: {outcome.failures}")
    return {
        "wall_s": wall / copies,
        "decode_s": sum(r["decode_s"] for r in rows) / copies,
        "frames": rows[0]["n_frames"],
        "backend": rows[0]["backend"],
    }


_RSS_CHILD = """
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from stages.frames.worker import WorkerSettings, decode_video
settings = WorkerSettings(*json.loads(sys.argv[3]))
job = {"path": sys.argv[2], "key": "k", "video_id": "v", "dataset": "d", "sha256": "", "source": sys.argv[2]}
out = Path(sys.argv[4])
result = decode_video(job, settings, out)
print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "frames": result["n_frames"], "output_mb": result["bytes"] / 2**20}))
"""


def peak_rss(path: Path, cfg: FramesConfig, scratch: Path) -> dict:
    settings = [cfg.fps, cfg.size, cfg.views, False, cfg.encoding, cfg.jpeg_quality, cfg.backend]
    out = scratch / f"rss-{path.stem}"
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, str(Path(__file__).resolve().parents[1]), str(path), json.dumps(settings), str(out)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each throughput source")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--views", default="pretrain", choices=["pretrain", "downstream"])
    ap.add_argument("--rss-seconds", type=float, default=15.0, help="short source for the memory check (long = 20x)")
    ap.add_argument("--resolutions", default="240p,480p,1080p")
    ap.add_argument("--copies", type=int, default=32, help="videos per shard in the stage run (figures are per video; real shards hold hundreds)")
    args = ap.parse_args()
    cfg = FramesConfig(fps=args.fps, size=args.size, views=args.views, workers=1)

    # The decoders' fork server starts once per process; start it outside the timed runs.
    start_fork_server()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-frames-") as tmp:
        tmp = Path(tmp)
        for name in args.resolutions.split(","):
            src = make_source(tmp / f"{name}.mp4", RESOLUTIONS[name], args.seconds)
            base = min(ffmpeg_decode_s(src, args.fps) for _ in range(2))
            stage = stage_run(src, cfg, tmp, args.copies)
            rows.append((name, args.seconds, base, stage))
        short = make_source(tmp / "rss-short.mp4", RESOLUTIONS["480p"], args.rss_seconds)
        long = make_source(tmp / "rss-long.mp4", RESOLUTIONS["480p"], args.rss_seconds * 20)
        rss = [("short", args.rss_seconds, peak_rss(short, cfg, tmp)), ("20x long", args.rss_seconds * 20, peak_rss(long, cfg, tmp))]

    print(f"frames stage vs ffmpeg decode-only, one core, H.264 30 fps sources of {args.seconds:g} s, "
          f"sampling {args.fps:g} fps, {args.views} views at {args.size} px")
    print(f"{'source':<7} {'method':<34} {'seconds':>8} {'out frames/s':>13} {'source-s/s':>11} {'vs ffmpeg':>10}")
    for name, seconds, base, stage in rows:
        frames = stage["frames"]
        print(f"{name:<7} {'ffmpeg -threads 1 -vf fps (baseline)':<34} {base:>8.2f} {frames / base:>13.1f} {seconds / base:>11.1f} {1.0:>9.2f}x")
        print(f"{name:<7} {'frames stage, decode in worker':<34} {stage['decode_s']:>8.2f} {frames / stage['decode_s']:>13.1f} "
              f"{seconds / stage['decode_s']:>11.1f} {base / stage['decode_s']:>9.2f}x   ({stage['backend']})")
        print(f"{name:<7} {'frames stage, whole (process, shard)':<34} {stage['wall_s']:>8.2f} {frames / stage['wall_s']:>13.1f} "
              f"{seconds / stage['wall_s']:>11.1f} {base / stage['wall_s']:>9.2f}x")
    print("\ndecoder process peak RSS (480p source)")
    print(f"{'source':<9} {'seconds':>8} {'frames out':>11} {'output MB':>10} {'peak RSS MB':>12}")
    for label, seconds, r in rss:
        print(f"{label:<9} {seconds:>8.0f} {r['frames']:>11} {r['output_mb']:>10.1f} {r['rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
