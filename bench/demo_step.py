"""The demo's pretraining step on a CPU: what compiling, bf16 autocast and the batch size buy.

    python bench/demo_step.py [--batches 8,16,32,64] [--repeats 5] [--no-compile] [--threads N] [--json PATH]

The step is the pretrain stage's tiny MP+CL recipe on the demo's tokens: 5 x 8 x 8 tokens (64 px
frames through the tiny tokenizer), 512 codes, two clips per video, 15% of tokens masked, the
model's forward (token and contrastive losses), backward and an AdamW step; the mask is drawn
token by token (not the stage's blocks) and gradients are not clipped; masks and the optimizer
are a few percent of a step (stop 27's profile). Tokens are uniform random codes: a step's time does not depend on them.

Rows, each with its own freshly built model (seed 0):
- eager fp32 at batch 8 (the demo's recipe): the baseline;
- the same with the backbone's layers compiled (`train.compile`, layer by layer) and with the
  whole model compiled (`--no-compile` skips both; compiling takes tens of seconds first);
- eager bf16 autocast at batch 8;
- eager fp32 and bf16 at each `--batches` size, reported per video as well.

Rows are timed `--repeats` times in turn (interleaved, so a machine whose speed drifts slows
every row alike); the table gives the median ms per step and per video and the ratio of ms per
video to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.pretrain import VIMPACPretrainer  # noqa: E402
from stages.config import PretrainConfig, build, preset  # noqa: E402
from stages.engine import compile_layers  # noqa: E402
from stages.pretrain.train import model_config  # noqa: E402

CODES, GRID, FRAMES, RATIO = 512, 8, 5, 0.15


class Row:
    def __init__(self, name: str, batch: int, bf16: bool = False, compile_mode: str = ""):
        self.name, self.batch, self.bf16 = name, batch, bf16
        cfg = model_config(build(PretrainConfig, preset("pretrain", "tiny"), []), CODES, GRID)
        torch.manual_seed(0)
        self.model = VIMPACPretrainer(cfg)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        if compile_mode == "layers":
            compile_layers(self.model.backbone.layers)
        self.net = torch.compile(self.model) if compile_mode == "whole" else self.model
        g = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, CODES, (batch, 2, FRAMES, GRID, GRID), generator=g)  # (B, clips, T, H, W)
        self.predict = torch.rand(self.tokens.shape, generator=g) < RATIO
        self.inputs = self.tokens.masked_fill(self.predict, cfg.backbone.mask_id)
        self.video = torch.arange(batch)
        self.pad = torch.zeros_like(self.predict)
        self.ms: list[float] = []

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(self.inputs, self.tokens, self.predict, self.video, self.pad, mask_norm=float(self.predict.sum()))
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, steps: int) -> None:
        started = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.ms.append((time.perf_counter() - started) / steps * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [Row("eager fp32, batch 8 (the demo)", 8)]
    if not args.no_compile:
        rows += [Row("layers compiled, fp32, batch 8", 8, compile_mode="layers"), Row("whole model compiled, fp32, batch 8", 8, compile_mode="whole")]
    rows.append(Row("eager bf16 autocast, batch 8", 8, bf16=True))
    for batch in (int(b) for b in args.batches.split(",") if int(b) != 8):
        rows += [Row(f"eager fp32, batch {batch}", batch), Row(f"eager bf16 autocast, batch {batch}", batch, bf16=True)]
    for row in rows:  # warm-up: compilation, allocator, oneDNN primitives
        started = time.perf_counter()
        for _ in range(3):
            row.step()
        print(f"warm-up {row.name}: {time.perf_counter() - started:.1f} s", flush=True)
    for _ in range(args.repeats):
        for row in rows:
            row.time(max(2, 64 // row.batch))
    base = statistics.median(rows[0].ms) / rows[0].batch
    print(f"\ntiny MP+CL pretraining step, {FRAMES}x{GRID}x{GRID} tokens, {CODES} codes, {torch.get_num_threads()} threads")
    print(f"| row | ms/step (median of {args.repeats}) | ms/video | vs the demo's step, per video |")
    print("|---|---:|---:|---:|")
    out = []
    for row in rows:
        ms = statistics.median(row.ms)
        print(f"| {row.name} | {ms:.1f} | {ms / row.batch:.1f} | {ms / row.batch / base:.2f}x |")
        out.append({"row": row.name, "batch": row.batch, "bf16": row.bf16, "ms_per_step": ms, "runs_ms": row.ms})
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
