"""Tokenize-stage throughput (frames/s) per tokenizer preset, and the data-loading share.

    python bench/tokenize_stage.py [--videos 6] [--seconds 20] [--size 128] [--presets tiny,base]

(Named tokenize_stage.py, not tokenize.py: a file called tokenize.py in bench/ would shadow the
standard library's `tokenize` module for every script run from this folder.)

Builds frame shards from generated 480p clips (pretrain view, 2 fps), then for each preset
(randomly initialised: speed does not depend on the weights) runs the tokenize stage and a
data-loading-only pass over the same shards (read the tar, decode the JPEG views). On a GPU
(when torch sees one) the stage runs with bf16 autocast. The data share is loading time over
stage time, both measured in this run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.frames import RESOLUTIONS, make_source  # noqa: E402
from stages.config import DatasetConfig, FramesConfig, IngestConfig, TokenizeConfig, TokenizerConfig  # noqa: E402
from stages.frames.read import frame_shards, read_shard  # noqa: E402
from stages.frames.stage import run_frames  # noqa: E402
from stages.ingest.stage import run_ingest  # noqa: E402
from stages.tokenize.stage import load_tokenizer, pick_device, run_tokenize  # noqa: E402
from stages.tokenizer.train import train_tokenizer  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--presets", default="tiny,base")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    device = pick_device("auto")

    with tempfile.TemporaryDirectory(prefix="vimpac-bench-tok-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        src.mkdir()
        clip = make_source(tmp / "clip.mp4", RESOLUTIONS["480p"], args.seconds).read_bytes()
        for i in range(args.videos):
            (src / f"v{i}.mp4").write_bytes(clip + i.to_bytes(8, "little"))
        root = DataRoot(tmp / "home").ensure()
        Catalog(root).refresh()
        ds = DatasetConfig(name="bench", source=str(src))
        run_ingest(root, ds, IngestConfig(), run_id="bench")
        run_frames(root, ds, FramesConfig(fps=2.0, size=args.size, views="pretrain"), run_id="bench")

        t0 = time.perf_counter()
        n_load = sum(v.views[n].shape[0] for s in frame_shards(root, "bench") for v in read_shard(root, s) for n in v.views)
        load_s = time.perf_counter() - t0

        rows = []
        for preset in args.presets.split(","):
            cfg = TokenizerConfig(preset=preset, steps=1, batch_size=2, warmup_steps=0, device="cpu")
            ckpt = train_tokenizer(root, ["bench"], cfg, frame_size=args.size).checkpoint
            tok = load_tokenizer(str(ckpt), device=device)
            params = sum(p.numel() for p in tok.model.parameters())
            out = run_tokenize(root, ds, TokenizeConfig(tokenizer=str(ckpt), batch_size=args.batch_size), tok, run_id="bench", force=True)
            s = out.summary
            rows.append((preset, params, tok.model.codebook_size, tok.model.downsample, s["frames"], s["seconds"]))

    print(f"tokenize stage on {device} ({'bf16 autocast' if device.startswith('cuda') else 'fp32'}, torch threads "
          f"{torch.get_num_threads()}): {args.videos} videos x {args.seconds:g} s at 2 fps, {args.size} px pretrain view")
    print(f"data loading only (tar read + JPEG decode): {n_load} frames in {load_s:.2f} s = {n_load / load_s:.0f} frames/s")
    print(f"{'preset':<7} {'params':>11} {'codes':>6} {'down':>5} {'frames':>7} {'seconds':>8} {'frames/s':>9} {'data share':>11}")
    for preset, params, codes, down, frames, seconds in rows:
        print(f"{preset:<7} {params:>11,} {codes:>6} {down:>4}x {frames:>7} {seconds:>8.2f} {frames / seconds:>9.1f} "
              f"{load_s / seconds:>10.0%}")


if __name__ == "__main__":
    main()
