"""Ingest throughput next to plain-copy baselines measured in the same run.

    python bench/ingest.py [--videos 16] [--mb 24] [--workers 4] [--repeat 3]

Cases:
  local  ingest stage (hash + content-addressed store + probe + catalog rows) vs shutil.copyfile
         of the same files, and vs the unavoidable byte path (read, sha256, write, fsync)
  http   ingest stage over a local HTTP server (its own process) vs urllib.request to disk
Both sides read the same files from the page cache; the figures compare code paths, not disks.
Each case runs `--repeat` times and reports the best (least disturbed) run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from stages.config import DatasetConfig, IngestConfig  # noqa: E402
from stages.ingest.stage import run_ingest  # noqa: E402
from stages.media import encode_video  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402


def make_corpus(folder: Path, n: int, pad_mb: float) -> list[Path]:
    """n distinct real 720p H.264 clips. One clip is encoded once; each copy gets `pad_mb` of
    random bytes appended plus its index, which demuxers never read (the probe checks that
    the container's boxes are whole, not that nothing follows them). Small files measure
    per-video overhead (probe, catalog writes); padded files measure the byte path (read,
    hash, write) that a copy baseline also has."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    seed_clip = folder / "_seed.mp4"
    # Blocky low-frequency texture panning sideways: compresses like camera footage, unlike
    # pixel noise, whose giant keyframes would make decoding (and the probe) look slow.
    n_frames = 96
    coarse = rng.integers(0, 255, (90, (1280 + n_frames * 4) // 8 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)
    frames = (texture[:, 4 * i : 4 * i + 1280] for i in range(n_frames))
    encode_video(frames, seed_clip, fps=24, codec="h264")
    base = seed_clip.read_bytes()
    pad = rng.integers(0, 255, int(pad_mb * 2**20), dtype=np.uint8).tobytes()
    files = []
    for i in range(n):
        path = folder / f"video{i:03d}.mp4"
        path.write_bytes(base + pad + i.to_bytes(8, "little"))
        files.append(path)
    seed_clip.unlink()
    return files


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def ingest_once(source: str, workers: int, scratch: Path) -> None:
    home = Path(tempfile.mkdtemp(dir=scratch))
    cfg = IngestConfig(workers=workers, batch_size=max(1, workers // 2 or 1), decode_check_frames=1)
    outcome = run_ingest(DataRoot(home).ensure(), DatasetConfig(name="bench", source=source), cfg, run_id="bench")
    if outcome.summary["failed"] or outcome.errors:
        raise SystemExit(f"bench ingest had failures: {outcome.failures[:2]} {outcome.errors[:2]}")
    shutil.rmtree(home)


def copy_once(files: list[Path], scratch: Path) -> None:
    out = Path(tempfile.mkdtemp(dir=scratch))
    for f in files:
        shutil.copyfile(f, out / f.name)
    shutil.rmtree(out)


def floor_once(files: list[Path], scratch: Path, workers: int) -> None:
    """What ingest cannot avoid for the bytes: read, sha256, write, fsync, rename."""
    out = Path(tempfile.mkdtemp(dir=scratch))

    def one(f: Path) -> None:
        h = hashlib.sha256()
        tmp = out / (f.name + ".partial")
        with open(f, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(4 * 2**20):
                h.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, out / h.hexdigest())

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, files))
    shutil.rmtree(out)


def urllib_once(urls: list[str], scratch: Path) -> None:
    out = Path(tempfile.mkdtemp(dir=scratch))
    for i, url in enumerate(urls):
        with urllib.request.urlopen(url) as r, open(out / f"{i}.bin", "wb") as f:
            shutil.copyfileobj(r, f, 4 * 2**20)
    shutil.rmtree(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"benchmark HTTP server did not start on port {port}")


def run_case(label: str, files: list[Path], tmp: Path, workers: int, repeat: int) -> list[tuple]:
    corpus = files[0].parent
    scratch = tmp / f"scratch-{label}"
    scratch.mkdir()
    # The server runs in its own process so it does not share a GIL with what is measured.
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(corpus)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(port)
        urls = [f"http://127.0.0.1:{port}/{f.name}" for f in files]
        url_list = tmp / f"urls-{label}.txt"
        url_list.write_text("\n".join(urls) + "\n")
        return [
            (label, "local", "shutil.copyfile (baseline)", best_of(repeat, lambda: copy_once(files, scratch))),
            (label, "local", f"hash+copy+fsync, {workers} threads", best_of(repeat, lambda: floor_once(files, scratch, workers))),
            (label, "local", f"vimpac ingest, {workers} workers", best_of(repeat, lambda: ingest_once(str(corpus), workers, scratch))),
            (label, "http", "urllib.request (baseline)", best_of(repeat, lambda: urllib_once(urls, scratch))),
            (label, "http", f"vimpac ingest, {workers} workers", best_of(repeat, lambda: ingest_once(str(url_list), workers, scratch))),
        ]
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=64, help="number of small clips (per-video overhead)")
    ap.add_argument("--large", type=int, default=8, help="number of large files (byte throughput)")
    ap.add_argument("--large-mb", type=float, default=64.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-") as tmp:
        tmp = Path(tmp)
        for label, n, pad in (("small", args.small, 0.0), ("large", args.large, args.large_mb)):
            files = make_corpus(tmp / f"corpus-{label}", n, pad)
            mb = sum(f.stat().st_size for f in files) / 2**20
            rows += [(*r, n, mb) for r in run_case(label, files, tmp, args.workers, args.repeat)]

    print(f"ingest benchmark (best of {args.repeat}; files in the page cache on both sides)")
    print(f"{'files':<22} {'source':<6} {'method':<30} {'seconds':>8} {'MB/s':>8} {'videos/s':>9} {'vs baseline':>12}")
    baselines = {(label, src): s for label, src, name, s, _, _ in rows if "baseline" in name}
    for label, src, name, s, n, mb in rows:
        files = f"{label}: {n} x {mb / n:.1f} MB"
        print(f"{files:<22} {src:<6} {name:<30} {s:>8.3f} {mb / s:>8.0f} {n / s:>9.1f} {baselines[label, src] / s:>11.2f}x")


if __name__ == "__main__":
    main()
