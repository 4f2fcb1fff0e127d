"""Training-step time of a tokenizer preset on this machine: the `tiny` recipe's batch and
precision against the recipe it replaced, interleaved in one process.

    python bench/tokenizer_step.py [--preset tiny] [--frames 14400] [--size 64] [--repeats 5]
                                   [--threads N] [--json PATH]

Rows (all on random frames: a step's time does not depend on the pixels):

- batch 32, fp32: the `tiny` recipe before stop 29 (450 steps of 32 frames), the baseline;
- batch 16, fp32: the current recipe's batch on a CPU without bf16 units;
- batch 16, bf16 autocast: the current recipe on a CPU with bf16 units (AMX or AVX512-BF16),
  as the tokenizer stage trains there (stages/checkpoints.py `cpu_has_bf16`).

Each row is timed `--repeats` times in turn (rows interleaved, so a machine whose speed drifts
slows every row alike); the table gives the median ms per step and the time `--frames` frames
take (the recipe's 900 x 16 = 450 x 32 = 14,400), and the ratio to the baseline.
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

from models.vqvae import PRESETS, VQVAE  # noqa: E402
from stages.checkpoints import cpu_has_bf16  # noqa: E402

ROWS = [("batch 32, fp32 (the old recipe)", 32, False), ("batch 16, fp32", 16, False), ("batch 16, bf16 autocast", 16, True)]


def time_steps(model: VQVAE, optimizer: torch.optim.Optimizer, batch: int, bf16: bool, size: int, steps: int) -> float:
    """Mean ms per step over `steps` steps (the caller warms up first)."""
    x = torch.rand(batch, 3, size, size)  # (B, 3, S, S) in [0, 1]
    started = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--frames", type=int, default=14400, help="frames of a whole training run (default: the tiny recipe's)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VQVAE(PRESETS[args.preset]()).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    for name, batch, bf16 in ROWS:  # warm-up: allocator, oneDNN primitives
        time_steps(model, optimizer, batch, bf16, args.size, 3)
    for _ in range(args.repeats):
        for name, batch, bf16 in ROWS:
            times[name].append(time_steps(model, optimizer, batch, bf16, args.size, max(4, 320 // batch)))
    base = statistics.median(times[ROWS[0][0]]) / ROWS[0][1]  # ms per frame of the baseline
    print(f"tokenizer {args.preset}, {args.size} px, {torch.get_num_threads()} threads; CPU bf16 units: {cpu_has_bf16()}")
    print(f"| row | ms/step (median of {args.repeats}) | {args.frames:,} frames | vs batch 32 fp32 |")
    print("|---|---:|---:|---:|")
    rows = []
    for name, batch, bf16 in ROWS:
        ms = statistics.median(times[name])
        run_s = ms / batch * args.frames / 1000
        rows.append({"row": name, "batch": batch, "bf16": bf16, "ms_per_step": ms, "runs_ms": times[name], "run_s": run_s})
        print(f"| {name} | {ms:.1f} | {run_s:.1f} s | {ms / batch / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "size": args.size, "cpu_bf16": cpu_has_bf16(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
