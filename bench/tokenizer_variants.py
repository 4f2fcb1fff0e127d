"""Tokenizer variants on a demo data root: what each keeps of the labeled sets' frames.

    python bench/tokenizer_variants.py --home DATA_ROOT NAME [key=value ...] [--out DIR]

DATA_ROOT is a data root where `vimpac demo` (or its pipeline's frames stage) has run: 64 px
frame shards of demo-pretrain, demo-motion and demo-shapes. The variant trains `models.vqvae`'s
tiny preset directly (no stage, no cache) on the frames of `train_on`, holding out the stage's
videos (`held_out_videos`, 4 per dataset at most), with the stage's frame stream, AdamW, warm-up
and cosine schedule and gradient clipping, then prints one JSON line (and appends it to
DIR/results.jsonl) with, per dataset:

- `psnr` / `base`: the stage's own evaluation (`eval_sample`, `read_eval_frames`,
  `evaluate_frames`: 64 frames of held-out or untrained-on videos, fp32) against the mean frame;
- `outline`: PSNR on the pixels within 2 px of an edge of the original (where shapes are);
- `bag` (labeled sets): a bag-of-codes linear probe, split 1, center view, every frame, top-1 %;

and DIR/NAME/grid.png (the stage's grid layout). Keys (defaults: the tiny recipe):
steps (900), bs (16), lr (1e-3), seed (0), amp (1: bf16 autocast on the CPU), loss (mse, l1, or
edgeW: MSE + W x MSE near edges), levels (FSQ levels, e.g. 8,5,5,5), width, res, mid,
train_on (comma-separated, demo-pretrain). docs/tokenizer.md ("Batch 16 and bf16 on the CPU")
has the figures of stop 29.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vqvae import VQVAE, tiny  # noqa: E402
from stages.evaluate.probes import code_histogram, fit_linear_probe  # noqa: E402
from stages.frames.read import frame_shards, read_shard  # noqa: E402
from stages.tokenizer import train as stage  # noqa: E402
from warehouse.catalog import Catalog  # noqa: E402
from warehouse.layout import DataRoot  # noqa: E402

DATASETS = ("demo-pretrain", "demo-motion", "demo-shapes")
LABELED = ("demo-shapes", "demo-motion")
VIEW = "s100_c"
CPU = torch.device("cpu")


def near_edges(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) mask of the pixels within 2 px of a step of more than 0.1 in any channel."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().amax(1, keepdim=True)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().amax(1, keepdim=True)
    edge = torch.zeros_like(x[:, :1])
    edge[..., :, 1:] += gx
    edge[..., :, :-1] += gx
    edge[..., 1:, :] += gy
    edge[..., :-1, :] += gy
    return F.max_pool2d((edge > 0.1).float(), 5, 1, 2)


def train(root: DataRoot, opts: dict[str, str]) -> tuple[VQVAE, dict[str, list[str]], float]:
    steps, batch_size, lr = int(opts.get("steps", 900)), int(opts.get("bs", 16)), float(opts.get("lr", 1e-3))
    seed, amp, loss_kind = int(opts.get("seed", 0)), opts.get("amp", "1") == "1", opts.get("loss", "mse")
    train_on = opts.get("train_on", "demo-pretrain").split(",")
    cfg = tiny()
    if "levels" in opts:
        cfg.fsq_levels = tuple(int(v) for v in opts["levels"].split(","))
    for key, field in (("width", "base_width"), ("res", "num_res_blocks"), ("mid", "mid_blocks")):
        if key in opts:
            setattr(cfg, field, int(opts[key]))
    cfg.__post_init__()
    torch.manual_seed(seed)
    shards = stage._select_shards(root, train_on, 64)
    held = stage.held_out_videos(root, train_on, shards, 4)
    model = VQVAE(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, stage._lr_lambda(20, steps))
    rng = np.random.default_rng(seed)
    started, step = time.perf_counter(), 0
    model.train()
    while step < steps:
        for batch in stage._epoch_batches(root, shards, VIEW, batch_size, 2048, rng, skip=held):
            x = stage._to_tensor(batch, CPU)  # (B, 3, S, S)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            if loss_kind == "l1":
                loss = F.l1_loss(out.reconstruction, x) + (out.loss - out.recon_loss)
            elif loss_kind.startswith("edge"):
                loss = out.loss + float(loss_kind[4:] or 4) * ((out.reconstruction - x) ** 2 * near_edges(x)).mean()
            else:
                loss = out.loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if step >= steps:
                break
    return model.eval(), held, time.perf_counter() - started


def bag_of_codes(root: DataRoot, model: VQVAE, dataset: str) -> dict:
    """Top-1 of a linear probe on each video's code histogram, split 1, center view."""
    labels = {v: (label, splits[0] if splits else None) for v, label, splits in
              Catalog(root).rows("SELECT video_id, label, splits FROM videos WHERE dataset = ? AND status = 'ok'", [dataset])}
    classes = sorted({label for label, _ in labels.values()})
    feats: dict[str, list] = {"train": [], "test": []}
    ys: dict[str, list] = {"train": [], "test": []}
    for shard in frame_shards(root, dataset, size=64):
        for video in read_shard(root, shard, views=[VIEW]):
            label, part = labels.get(video.meta.get("video_id"), (None, None))
            if part in feats:
                with torch.no_grad():
                    codes = model.encode(stage._to_tensor(video.views[VIEW], CPU)).numpy()  # (T, h, w)
                feats[part].append(code_histogram(codes, model.codebook_size))
                ys[part].append(classes.index(label))
    probe = fit_linear_probe(np.stack(feats["train"]), np.array(ys["train"]), len(classes))
    top1 = float((probe.predict_proba(np.stack(feats["test"])).argmax(1) == np.array(ys["test"])).mean())
    return {"bag": round(100 * top1, 1), "bag_train": round(100 * probe.train_accuracy, 1), "videos": [len(ys["train"]), len(ys["test"])]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a data root with the demo's 64 px frame shards")
    ap.add_argument("--out", type=Path, default=Path("tokenizer-variants"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("name")
    ap.add_argument("settings", nargs="*", help="key=value (see above)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = dict(item.split("=", 1) for item in args.settings)
    root = DataRoot(args.home)
    model, held, train_s = train(root, opts)
    result: dict = {"name": args.name, "settings": opts, "train_s": round(train_s, 1), "codes": model.codebook_size}
    rows = []
    train_on = opts.get("train_on", "demo-pretrain").split(",")
    for dataset in DATASETS:
        shards = stage._select_shards(root, [dataset], 64)
        sample = stage.eval_sample(root, dataset, shards, VIEW, trained_on=dataset in train_on, held_out=held.get(dataset, []))
        figures, x, r, _ = stage.evaluate_frames(model, stage.read_eval_frames(root, sample, VIEW), CPU)
        outline = near_edges(x).expand_as(x) > 0
        result[dataset] = {"psnr": round(figures["psnr"], 2), "base": round(figures["baseline_psnr"], 2),
                           "outline": round(-10 * math.log10(float(((r - x) ** 2)[outline].mean())), 2)}
        if dataset in LABELED:
            result[dataset] |= bag_of_codes(root, model, dataset)
        rows.append((f"{dataset}: {figures['psnr']:.1f} dB", x[:8], r[:8]))
    (args.out / args.name).mkdir(parents=True, exist_ok=True)
    stage._write_grid(rows, args.out / args.name / "grid.png")
    line = json.dumps(result)
    print(line)
    with open(args.out / "results.jsonl", "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
