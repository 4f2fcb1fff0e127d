"""Tokenize-stage throughput (frames/s) per tokenizer preset, and the data-loading share.

    python bench/tokenize_stage.py [--videos 6] [--seconds 20] [--size 128] [--presets tiny,base]
                                   [--batch-size 256] [--workers 1] [--repeat 1]
                                   [--device auto|cpu|cuda] [--json PATH]
    python bench/tokenize_stage.py --prepare DIR [--videos N] [--seconds S] [--size 128]
    python bench/tokenize_stage.py --frames-home DIR ...

(Named tokenize_stage.py, not tokenize.py: a file called tokenize.py in bench/ would shadow the
standard library's `tokenize` module for every script run from this folder.)

Builds frame shards from generated 480p clips (pretrain view, 2 fps), then for each preset
(randomly initialised: speed does not depend on the weights) runs the tokenize stage and a
data-loading-only pass over the same shards (read the tar, decode the JPEG views). On a GPU
the stage runs with bf16 autocast. The data share is loading time over stage time, both
measured in this run.

Also per preset: "model only", the tokenizer's encode on the same frames already decoded in
memory (`encode_frames` as the stage calls it, same batch size): the stage's ceiling. Stage
frames/s far below it means the stage waits on reading, decoding or per-video round trips,
not on the model. On CUDA the codes under bf16 autocast are compared with fp32 codes of the
same frames (share of equal codes): a nearest-codebook search in bf16 may pick another code.
Before the timed stage run each preset encodes one batch untimed (CUDA context, cuDNN
algorithm choice). `--workers 1,2` times the stage per TokenizeConfig.workers setting (frame
shards tokenized concurrently).

Building frames needs FFmpeg (imageio-ffmpeg's binary) and PyAV. Where they are missing (the
GPU machine of bench/gpu_check.sh), prepare the frames elsewhere with `--prepare DIR` and pass
`--frames-home DIR`: the data root is copied to a temporary folder and used as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.config import DatasetConfig, TokenizeConfig, TokenizerConfig  # noqa: E402
from stages.frames.read import frame_shards, read_shard  # noqa: E402
from stages.tokenize.stage import encode_frames, load_tokenizer, pick_device, run_tokenize  # noqa: E402
from stages.tokenizer.train import train_tokenizer  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402

DATASET = "bench"


def build_frames(home: Path, videos: int, seconds: float, size: int) -> DataRoot:
    """A data root holding `videos` ingested copies of one generated 480p clip and their frame
    shards (pretrain view at `size` px, 2 fps). Needs FFmpeg and PyAV, hence the late imports."""
    from bench.frames import RESOLUTIONS, make_source
    from stages.config import FramesConfig, IngestConfig
    from stages.frames.stage import run_frames
    from stages.ingest.stage import run_ingest

    scratch = home.parent
    src = scratch / "src"
    src.mkdir(parents=True, exist_ok=True)
    clip = make_source(scratch / "clip.mp4", RESOLUTIONS["480p"], seconds).read_bytes()
    for i in range(videos):
        (src / f"v{i}.mp4").write_bytes(clip + i.to_bytes(8, "little"))
    root = DataRoot(home).ensure()
    Catalog(root).refresh()
    ds = DatasetConfig(name=DATASET, source=str(src))
    run_ingest(root, ds, IngestConfig(), run_id="bench")
    run_frames(root, ds, FramesConfig(fps=2.0, size=size, views="pretrain"), run_id="bench")
    return root


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--presets", default="tiny,base")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", default="1", help="comma-separated TokenizeConfig.workers settings (frame shards tokenized "
                    "concurrently; the stage's default: 1)")
    ap.add_argument("--repeat", type=int, default=1, help="timed stage runs per preset (forced reruns); the median is reported")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prepare", type=Path, default=None, help="only build the frames data root under DIR/home, then stop")
    ap.add_argument("--frames-home", type=Path, default=None, help="use this prepared data root (from --prepare) instead of building one")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    device = pick_device(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no GPU")

    if args.prepare:
        home = args.prepare.resolve() / "home"
        if home.exists():
            shutil.rmtree(home)
        build_frames(home, args.videos, args.seconds, args.size)
        for leftover in (home.parent / "src", home.parent / "clip.mp4", home / "raw"):  # only the frame shards travel
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        print(f"frames data root prepared in {home}: {args.videos} videos x {args.seconds:g} s, {args.size} px")
        return

    amp = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="vimpac-bench-tok-") as tmp:
        tmp = Path(tmp)
        if args.frames_home:
            source = args.frames_home / "home" if (args.frames_home / "home").is_dir() else args.frames_home
            shutil.copytree(source, tmp / "home")
            root = DataRoot(tmp / "home").ensure()
            Catalog(root).refresh()  # the catalog records its home: rewrite it for the new place
        else:
            root = build_frames(tmp / "home", args.videos, args.seconds, args.size)
        ds = DatasetConfig(name=DATASET, source=str(tmp / "src"))
        shards = frame_shards(root, DATASET)
        if not shards:
            raise SystemExit(f"no committed frame shards of {DATASET!r} under {root.home}")
        n_videos = sum(s.n_ok for s in shards)

        t0 = time.perf_counter()
        frames = [v.views[n] for s in shards for v in read_shard(root, s) for n in v.views]
        load_s = time.perf_counter() - t0
        frames = np.concatenate(frames)  # (N, S, S, 3) uint8
        n_load = len(frames)
        size = int(frames.shape[1])

        rows = []
        for preset in args.presets.split(","):
            cfg = TokenizerConfig(preset=preset, steps=1, batch_size=2, warmup_steps=0, device="cpu")
            ckpt = train_tokenizer(root, [DATASET], cfg, frame_size=size).checkpoint
            tok = load_tokenizer(str(ckpt), device=device)
            params = sum(p.numel() for p in tok.model.parameters())
            encode_frames(tok, frames[: args.batch_size], args.batch_size, amp)  # warm-up, untimed
            _sync(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            codes = encode_frames(tok, frames, args.batch_size, amp)
            _sync(device)
            model_s = time.perf_counter() - t0
            for workers in [int(w) for w in args.workers.split(",")]:
                cfg_tok = TokenizeConfig(tokenizer=str(ckpt), batch_size=args.batch_size, workers=workers)
                runs = []
                for _ in range(args.repeat):
                    out = run_tokenize(root, ds, cfg_tok, tok, run_id="bench", force=True)
                    if out.errors:
                        raise SystemExit(f"tokenize stage failed on {len(out.errors)} shard(s): {out.errors[:2]}")
                    runs.append(out.summary)
                s = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
                rows.append({"preset": preset, "workers": workers, "params": params, "codes": int(tok.model.codebook_size),
                             "downsample": int(tok.model.downsample), "frames": int(s["frames"]),
                             "stage_seconds": float(s["seconds"]), "stage_runs_seconds": [r["seconds"] for r in runs],
                             "stage_frames_per_s": s["frames"] / s["seconds"], "model_only_seconds": model_s,
                             "model_only_frames_per_s": n_load / model_s, "data_share": load_s / s["seconds"]})
            if device.startswith("cuda"):
                n = min(len(frames), 4 * args.batch_size)
                agreement = float((encode_frames(tok, frames[:n], args.batch_size, False) == codes[:n]).mean())
                for row in rows:
                    if row["preset"] == preset:
                        row.update(peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20, bf16_code_agreement=agreement,
                                   agreement_frames=n)

    dev_name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    print(f"tokenize stage on {device} ({dev_name}; {'bf16 autocast' if amp else 'fp32'}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}): {n_videos} videos, {n_load} frames at 2 fps, {size} px pretrain view; batch {args.batch_size}; "
          f"median of {args.repeat} stage run(s)")
    print(f"data loading only (tar read + JPEG decode): {n_load} frames in {load_s:.2f} s = {n_load / load_s:.0f} frames/s")
    print(f"{'preset':<7} {'workers':>7} {'params':>11} {'codes':>6} {'down':>5} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'data share':>11} "
          f"{'model-only f/s':>15} {'bf16=fp32 codes':>16}")
    for r in rows:
        agree = f"{r['bf16_code_agreement']:.1%}" if "bf16_code_agreement" in r else "-"
        print(f"{r['preset']:<7} {r['workers']:>7} {r['params']:>11,} {r['codes']:>6} {r['downsample']:>4}x {r['frames']:>7} {r['stage_seconds']:>8.2f} "
              f"{r['stage_frames_per_s']:>9.1f} {r['data_share']:>10.0%} {r['model_only_frames_per_s']:>15.1f} {agree:>16}")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "device_name": dev_name, "torch": torch.__version__, "amp": amp,
                                         "videos": n_videos, "frames": n_load, "size": size, "batch_size": args.batch_size,
                                         "load_seconds": load_s, "load_frames_per_s": n_load / load_s, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
