"""Evaluation throughput (videos/s) of the paper's 30-view protocol, next to a naive per-view
scorer of the same model measured in the same run.

    python bench/evaluate.py [--preset tiny|small] [--videos N] [--clips 10] [--frames 5]
                             [--batch-size 64] [--device auto|cpu|cuda] [--amp | --no-amp]
                             [--repeat N] [--warmup N] [--threads N] [--json PATH]

Defaults: CPU: the tiny preset, 64 videos, 1 warm-up video, 3 timed passes, fp32 (~1-2 minutes on
an idle 2-core machine); CUDA: the small preset, 512 videos, 16 warm-up videos, 3 timed passes, bf16
autocast. `--preset small` on CPU defaults to 2 videos, no warm-up and 1 pass: one small forward
pass costs ~0.5-1 s of CPU per view at T = 5 whatever the batch, so every method takes ~15-30 s per
video there (the script says so when it shrinks the count).

What is timed: `stages.finetune.evaluate.score_videos`, the fine-tune stage's evaluation, on
`Protocol.paper(clips, flip_sensitive=False)` (10 uniformly spaced temporal clips x 3 crops =
30 views per video, VIMPAC App. C), reading downstream token shards from a data root and
batching the views of several videos into forward passes of `--batch-size` clips (the stage's
default: 64). Each timed pass scores every evaluation video of the split once.

Data: a labeled token corpus written straight into a temporary data root, as ingest and the
tokenize stage would leave it (videos / datasets rows, downstream-variant token shards of 32
videos with their Parquet index and commit markers): 101 classes (UCF101), split set 1, videos of
16-40 frames at 4 fps (UCF101's 4-10 s clips), 12 stored views each, uniform random codes (speed
does not depend on them): tiny 8x8 tokens (S = 64) with 512 codes, small 16x16 (S = 128) with
8192 codes. Training videos (one short video per class, which `select_split` requires) sit in a
shard of their own so the evaluation shards hold evaluation videos only. The files are written
just before the measurements, so every method reads them from the page cache.

Model: `models.classifier.VideoClassifier` on the backbone preset with the corpus' vocabulary and
grid and `--frames` positions, randomly initialised with a seed (every method builds the same
weights). Its head is drawn at random too: the classifier's zero-initialised head (App. A.2) would
give every class the same probability and the agreement check below would compare uniform vectors.

Methods, each in its own child process (so peak memory is per method):
  - ours: score_videos as the stage calls it.
  - baseline: what one writes without batching: read each shard (warehouse.shards.read_samples),
    and for every video decode its tokens and run the model once per view (30 forward passes of
    batch 1, each copied to the device and back), averaging the softmax.
  - read only: score_videos with a model that returns zeros, i.e. shard reading, token decoding,
    clip assembly and the softmax without the network; "model share" = 1 - read only / ours.
The probabilities of ours and the baseline are compared view by view and fused (mean over the
views): max |diff| must stay below 1e-4 in fp32 (1e-2 under bf16 autocast, where the batch
composition changes the rounding), else the comparison is reported as FAILED.

Timing: `--warmup` videos (the first ones of the split) go through the same method untimed first;
then `--repeat` passes over all videos, the median pass is reported. CUDA timings are bracketed by
torch.cuda.synchronize(). Peak memory: on CUDA torch.cuda.max_memory_allocated(); on CPU the growth
of the child's peak RSS (ru_maxrss) from just before the model is built (weights, activations,
shard buffers, the scores).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.backbone import PRESETS  # noqa: E402
from models.classifier import ClassifierConfig, VideoClassifier  # noqa: E402
from stages.evaluate.metrics import Protocol, clip_starts  # noqa: E402
from stages.finetune.evaluate import score_videos  # noqa: E402
from stages.finetune.splits import SplitSelection, select_split  # noqa: E402
from stages.frames.views import view_names  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402
from warehouse.shards import ShardWriter, commit_shard, read_samples  # noqa: E402
from warehouse.tables import now, write_rows  # noqa: E402

DATASET = "bench"
TOKENIZER = "ckpt:bench0000evaluate"
N_CLASSES = 101  # UCF101
FPS = 4.0  # downstream short clips are sampled at 4 fps (Appendix C)
FRAMES_RANGE = (16, 40)  # 4-10 s clips at 4 fps
TRAIN_FRAMES = 5
VIDEOS_PER_SHARD = 32
CORPUS = {"tiny": {"grid": 8, "codes": 512}, "small": {"grid": 16, "codes": 8192}}
SEED = 0
TOLERANCE = {False: 1e-4, True: 1e-2}  # amp off / on
METHODS = ("ours", "baseline", "read")
LABELS = {"ours": "ours: score_videos", "baseline": "baseline: 1 view per forward", "read": "read only (zero model)"}


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _token_shard(root: DataRoot, number: int, videos: list[tuple[str, int]], *, views: list[str], grid: int, codes: int,
                 rng: np.random.Generator) -> int:
    """One committed downstream token shard of (video_id, n_frames) videos, as the tokenize stage
    writes it (tar of tokens.npy + json, Parquet index, stats, commit marker); returns its bytes."""
    size = grid * 8
    rel = f"shards/tokens/{DATASET}/downstream-{size}--tok-{TOKENIZER[-4:]}/{number:05d}.tar"
    unit = f"{DATASET}-downstream-{TOKENIZER[-4:]}-{size}-{number}"
    writer = ShardWriter(root.home / rel)
    rows = []
    for video_id, n in videos:
        tokens = rng.integers(0, codes, size=(len(views), n, grid, grid), dtype=np.uint16)
        meta = {"video_id": video_id, "dataset": DATASET, "views": views, "fps": FPS, "size": size, "n_frames": n,
                "grid": [grid, grid], "tokenizer": TOKENIZER, "codebook_size": codes}
        writer.add(video_id, {"tokens.npy": _npy(tokens), "json": json.dumps(meta).encode()})
        rows.append({"dataset": DATASET, "video_id": video_id, "shard": rel, "tokenizer": TOKENIZER, "variant": "downstream",
                     "n_frames": n, "grid_h": grid, "grid_w": grid, "n_views": len(views), "views": views, "fps": FPS,
                     "size": size, "codebook_size": codes, "key": video_id, "status": "ok", "unit": unit, "created_at": now()})
    marker = {"stage": "tokenize", "dataset": DATASET, "unit": unit, "path": rel, "n_samples": len(rows), "n_failed": 0,
              "bytes": 0, "created_at": now()}
    path = commit_shard(writer, "token_samples", rows, {"count": len(rows)}, marker, root.table_dir("shards", "tokenize", f"{unit}.parquet"))
    return path.stat().st_size


def write_corpus(root: DataRoot, n_eval: int, grid: int, codes: int) -> dict:
    """`n_eval` test videos of split set 1 (label i % 101) in shards of VIDEOS_PER_SHARD, plus one
    short training video per used class in a shard of its own."""
    Catalog(root).ensure_tables()
    rng = np.random.default_rng(SEED)
    classes = [f"class{c:03d}" for c in range(N_CLASSES)]
    views = view_names("downstream", False)
    lengths = rng.integers(FRAMES_RANGE[0], FRAMES_RANGE[1] + 1, size=n_eval).tolist()
    test = [(f"v{i:05d}", classes[i % N_CLASSES], "test") for i in range(n_eval)]
    train = [(f"t{c:05d}", classes[c], "train") for c in range(min(n_eval, N_CLASSES))]
    rows = [{"dataset": DATASET, "video_id": vid, "source": f"/src/{label}/{vid}.avi", "sha256": f"{i:064x}", "label": label,
             "split": split, "splits": [split], "status": "ok", "ingested_at": now(), "unit": f"{DATASET}-ingest-0"}
            for i, (vid, label, split) in enumerate(test + train)]
    write_rows("videos", rows, root.table_dir("videos", DATASET, "ingest-0.parquet"))
    write_rows("shards", [{"stage": "ingest", "dataset": DATASET, "unit": f"{DATASET}-ingest-0", "path": "", "n_samples": len(rows),
                           "n_failed": 0, "bytes": 0, "created_at": now()}], root.table_dir("shards", "ingest", f"{DATASET}-0.parquet"))
    write_rows("datasets", [{"dataset": DATASET, "source": "/src", "layout": "manifest", "labeled": True, "flip_sensitive": False,
                             "classes": classes, "n_entries": len(rows), "updated_at": now()}], root.table_dir("datasets", DATASET, "d.parquet"))
    eval_bytes, number = 0, 0
    for number, start in enumerate(range(0, n_eval, VIDEOS_PER_SHARD)):
        chunk = [(vid, n) for (vid, _, _), n in zip(test[start : start + VIDEOS_PER_SHARD], lengths[start : start + VIDEOS_PER_SHARD])]
        eval_bytes += _token_shard(root, number, chunk, views=views, grid=grid, codes=codes, rng=rng)
    _token_shard(root, number + 1, [(vid, TRAIN_FRAMES) for vid, _, _ in train], views=views, grid=grid, codes=codes, rng=rng)
    return {"eval_shards": number + 1, "eval_mb": eval_bytes / 2**20, "mean_frames": float(np.mean(lengths)), "views": len(views)}


# ---------------------------------------------------------------------------------------------
# Models and the baseline
# ---------------------------------------------------------------------------------------------


def build_model(preset: str, frames: int, device: torch.device) -> VideoClassifier:
    backbone = PRESETS[preset]()
    backbone.n_codes, backbone.grid, backbone.frames, backbone.dropout = CORPUS[preset]["codes"], CORPUS[preset]["grid"], frames, 0.0
    torch.manual_seed(SEED)
    model = VideoClassifier(ClassifierConfig(backbone, n_classes=N_CLASSES))
    # A random head (logits of ~unit scale) instead of App. A.2's zeros, so the probabilities differ between classes and
    # views and the agreement check between ours and the baseline means something.
    nn.init.normal_(model.fc.weight, std=backbone.dim ** -0.5)
    return model.to(device).eval()


class ZeroModel(nn.Module):
    """Stands in for the network in the read-only measurement: zero logits, no compute."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.zeros(tokens.shape[0], self.n_classes, device=tokens.device)


@torch.no_grad()
def baseline_scores(model: nn.Module, root: DataRoot, selection: SplitSelection, protocol: Protocol, *, clip_len: int, pad_id: int,
                    device: torch.device, amp: bool) -> np.ndarray:
    """(N, V, C) softmax probabilities, one forward pass of one clip per view, views clip-major
    like Protocol.view_names()."""
    model.eval()
    wanted = {v.key for v in selection.eval}
    done: dict[str, np.ndarray] = {}
    for shard in selection.eval_shards:
        for name, sample in read_samples(root.absolute(shard.path)).items():
            key = f"{shard.dataset}/{name}"
            if key not in wanted:
                continue
            stored = json.loads(sample["json"])["views"]
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)  # (n_views, n, h, w)
            per_view = []
            for start in clip_starts(tokens.shape[1], clip_len, protocol.clips):
                for crop in protocol.crops:
                    clip = np.full((clip_len, *tokens.shape[2:]), pad_id, np.int64)
                    part = tokens[stored.index(crop), start : start + clip_len]
                    clip[: len(part)] = part
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        logits = model(torch.from_numpy(clip)[None].to(device))
                    per_view.append(torch.softmax(logits.float(), dim=-1)[0].cpu().numpy())
            done[key] = np.stack(per_view)
    return np.stack([done[v.key] for v in selection.eval]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# One measurement (child process)
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _first_videos(selection: SplitSelection, n: int) -> SplitSelection:
    """The split cut to its first `n` evaluation videos (the warm-up set)."""
    videos = selection.eval[:n]
    paths = {v.shard for v in videos}
    return dataclasses.replace(selection, eval=videos, eval_shards=[s for s in selection.eval_shards if s.path in paths])


def measure(job: dict) -> dict:
    device = torch.device(job["device"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    root = DataRoot(job["home"])
    selection = select_split(root, DATASET, "1", TOKENIZER)
    protocol = Protocol.paper(job["clips"], flip_sensitive=False)
    frames, amp = job["frames"], job["amp"]
    pad_id = CORPUS[job["preset"]]["codes"]  # [PAD] = n_codes (models.backbone)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = ZeroModel(N_CLASSES).to(device) if job["method"] == "read" else build_model(job["preset"], frames, device)

    def run(sel: SplitSelection) -> np.ndarray:
        if job["method"] == "baseline":
            return baseline_scores(model, root, sel, protocol, clip_len=frames, pad_id=pad_id, device=device, amp=amp)
        out = score_videos(model, root, sel, protocol, clip_len=frames, pad_id=pad_id, device=device, amp=amp, batch_size=job["batch_size"])
        if out.errors or len(out.videos) != len(sel.eval):
            raise RuntimeError(f"score_videos scored {len(out.videos)} of {len(sel.eval)} videos: {out.errors[:3]}")
        return out.scores

    if job["warmup"]:
        run(_first_videos(selection, job["warmup"]))
    _sync(device)
    times = []
    for _ in range(job["repeat"]):
        t0 = time.perf_counter()
        scores = run(selection)
        _sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB on Linux
    if job.get("scores_out"):
        np.save(job["scores_out"], scores)
    seconds = statistics.median(times)
    n = len(selection.eval)
    return {**job, "videos": n, "views": protocol.n_views, "times": times, "seconds": seconds, "videos_per_s": n / seconds,
            "views_per_s": n * protocol.n_views / seconds, "peak_mem_mb": peak_mb,
            "params": sum(p.numel() for p in model.parameters())}


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**job, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def device_name(gpu: bool) -> str:
    if gpu:
        return torch.cuda.get_device_name(0)
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _rate(x: float) -> str:
    """Three significant digits at least: the CPU small preset runs at a few hundredths of a video per second."""
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(CORPUS), default=None, help="backbone preset and its corpus (CPU: tiny; CUDA: small)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--videos", type=int, default=None, help="evaluation videos (CPU: tiny 64, small 2; CUDA: 512)")
    ap.add_argument("--clips", type=int, default=10, help="temporal clips per video (x 3 crops; paper: 10)")
    ap.add_argument("--frames", type=int, default=5, help="T, frames per clip")
    ap.add_argument("--batch-size", type=int, default=64, help="clips per forward pass in score_videos (the stage's eval.batch_size)")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on for CUDA, off for CPU)")
    ap.add_argument("--repeat", type=int, default=None, help="timed passes over all videos, median reported (default 3; CPU small: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="videos scored untimed first (CPU: tiny 1, small 0; CUDA: 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the per-view baseline (and the agreement check)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return

    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")
    device = "cuda" if gpu else "cpu"
    preset = args.preset or ("small" if gpu else "tiny")
    slow_cpu = not gpu and preset == "small"
    notes = []
    if args.videos is None and slow_cpu:
        notes.append("small on CPU: 2 videos, no warm-up and 1 timed pass by default (every method costs ~0.5-1 s of CPU "
                     "per view); pass --videos / --warmup / --repeat for more")
    n_videos = args.videos or (512 if gpu else 2 if slow_cpu else 64)
    repeat = args.repeat or (1 if slow_cpu else 3)
    warmup = min(n_videos, args.warmup if args.warmup is not None else (16 if gpu else 0 if slow_cpu else 1))
    amp = gpu if args.amp is None else args.amp
    methods = [m for m in METHODS if not (args.no_baseline and m == "baseline")]
    grid, codes = CORPUS[preset]["grid"], CORPUS[preset]["codes"]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-eval-") as tmp:
        root = DataRoot(Path(tmp) / "home").ensure()
        corpus = write_corpus(root, n_videos, grid, codes)
        results = {}
        for method in methods:
            job = {"home": str(root.home), "preset": preset, "method": method, "device": device, "amp": amp, "clips": args.clips,
                   "frames": args.frames, "batch_size": args.batch_size, "repeat": repeat, "warmup": warmup,
                   "threads": args.threads, "scores_out": str(Path(tmp) / f"{method}.npy") if method != "read" else None}
            r = run_child(job)
            results[method] = r
            status = r.get("error") or f"{r['videos_per_s']:.2f} videos/s ({', '.join(f'{t:.2f}' for t in r['times'])} s per pass)"
            print(f"  {method}: {status}", file=sys.stderr, flush=True)
        agreement = None
        ours, base = results.get("ours", {}), results.get("baseline", {})
        if base and "error" not in ours and "error" not in base:
            a, b = np.load(Path(tmp) / "ours.npy"), np.load(Path(tmp) / "baseline.npy")
            agreement = {"max_abs_diff_views": float(np.abs(a - b).max()),
                         "max_abs_diff_fused": float(np.abs(a.mean(axis=1, dtype=np.float64) - b.mean(axis=1, dtype=np.float64)).max()),
                         "top1_agree": int((a.mean(axis=1).argmax(-1) == b.mean(axis=1).argmax(-1)).sum()), "videos": int(a.shape[0]),
                         "tolerance": TOLERANCE[amp]}
            agreement["ok"] = agreement["max_abs_diff_fused"] < agreement["tolerance"]

    threads = args.threads or torch.get_num_threads()
    dev = device_name(gpu)
    views = args.clips * 3
    print(f"evaluation throughput on {device} ({dev}); torch {torch.__version__}, {threads} threads; "
          f"{'bf16 autocast' if amp else 'fp32'}; load average {load_before:.2f} at the start ({os.cpu_count()} CPUs)")
    print(f"protocol {args.clips}x3 ({views} views/video), preset {preset}: T={args.frames} x {grid}x{grid} tokens (S={grid * 8}), "
          f"{codes} codes, {N_CLASSES} classes; {n_videos} videos of {FRAMES_RANGE[0]}-{FRAMES_RANGE[1]} frames "
          f"(mean {corpus['mean_frames']:.1f}) at {FPS:g} fps, {corpus['views']} stored views, {corpus['eval_shards']} shards "
          f"({corpus['eval_mb']:.1f} MB, page cache)")
    print(f"ours: score_videos, {args.batch_size} clips per forward; baseline: 1 clip per forward; {warmup} warm-up video(s), "
          f"median of {repeat} timed pass(es)")
    for note in notes:
        print(f"note: {note}")
    mem = "peak mem MB" if gpu else "peak RSS+ MB"
    print(f"{'method':<30} {'videos':>6} {'s/pass':>8} {'videos/s':>9} {'views/s':>9} {mem:>12} {'vs baseline':>11}")
    for method in methods:
        r = results[method]
        if "error" in r:
            print(f"{LABELS[method]:<30} failed: {r['error']}")
            continue
        ratio = f"{r['videos_per_s'] / base['videos_per_s']:.2f}x" if base and "error" not in base and method != "read" else "-"
        print(f"{LABELS[method]:<30} {r['videos']:>6} {r['seconds']:>8.2f} {_rate(r['videos_per_s']):>9} {_rate(r['views_per_s']):>9} "
              f"{r['peak_mem_mb']:>12.0f} {ratio:>11}")
    read = results.get("read", {})
    if ours and read and "error" not in ours and "error" not in read:
        print(f"model share of ours: {1 - read['seconds'] / ours['seconds']:.1%} (read + decode + clip assembly alone: "
              f"{read['videos_per_s']:.1f} videos/s)")
    if agreement:
        print(f"agreement ours vs baseline over {agreement['videos']} videos: max |diff| fused {agreement['max_abs_diff_fused']:.2e}, "
              f"per view {agreement['max_abs_diff_views']:.2e}; top-1 equal for {agreement['top1_agree']}/{agreement['videos']} "
              f"(tolerance {agreement['tolerance']:g}: {'ok' if agreement['ok'] else 'FAILED'})")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "device_name": dev, "torch": torch.__version__, "threads": threads,
                                         "load_average_at_start": load_before, "preset": preset, "amp": amp, "corpus": corpus,
                                         "notes": notes, "results": results, "agreement": agreement}, indent=2))
    if agreement and not agreement["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
