"""Where the time of one pretraining step goes: phases, GPU busy time and the top operators.

    python bench/profile_step.py [--preset small] [--batch 64] [--steps 3] [--method ours|baseline]
                                 [--compile] [--device auto|cpu|cuda] [--json PATH]

Same model, batches and step as bench/pretrain.py. Prints (1) the step split into forward,
backward and clip + AdamW, each bracketed by synchronisations (median of --steps); (2) over
--steps profiled steps (torch.profiler, CPU and CUDA activities): wall time per step, the summed
GPU kernel time per step and the kernel launches per step (GPU busy share = kernel time / wall:
far below 1 means the host cannot feed the GPU); (3) the operators with the most GPU time and
the most CPU time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.pretrain import FRAMES, GRID, baseline_step, build_model, make_batches  # noqa: E402
from models.masking import blocks_for_ratio  # noqa: E402
from stages.pretrain.train import train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_time(evt) -> float:
    """Self device time of a profiler average in microseconds (the attribute's name changed)."""
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=None, help="videos per step (CUDA: 64; CPU: 2)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, 10 with --compile)")
    ap.add_argument("--method", default="ours", choices=["ours", "baseline"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if gpu else "cpu")
    batch = args.batch or (64 if gpu else 2)
    warmup = args.warmup if args.warmup is not None else (10 if args.compile else 3)
    model, optimizer, cfg = build_model(args.preset, device, 0)
    if args.compile:
        for i, layer in enumerate(model.backbone.layers):
            model.backbone.layers[i] = torch.compile(layer)
    batches = make_batches(cfg, batch, 2, blocks_for_ratio(FRAMES, GRID, GRID), device, 1)
    amp = gpu

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        if args.method == "ours":
            train_step(model, optimizer, [b], device=device, amp=amp, grad_clip=cfg.train.grad_clip)
        else:
            baseline_step(model, optimizer, b, device=device, amp=amp, grad_clip=cfg.train.grad_clip)

    for i in range(warmup):
        step(i)
    _sync(device)

    # (1) phases of `ours`: forward / backward / clip + optimizer, synchronised in between
    phases = {"forward": [], "backward": [], "clip+adamw": []}
    for i in range(args.steps):
        b = batches[i % len(batches)]
        model.train()
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(b["inputs"], b["tokens"], b["predict"], b["video_index"], b["pad"],
                        mask_norm=b["predict"].sum().clamp_min(1).float())
        _sync(device)
        t1 = time.perf_counter()
        out["loss"].backward()
        _sync(device)
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(1000 * v)
    phase_ms = {k: statistics.median(v) for k, v in phases.items()}

    # (2) + (3) the profiler over whole steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(args.steps):
            step(i)
        _sync(device)
        wall = (time.perf_counter() - t0) / args.steps
    averages = prof.key_averages()
    # Kernels only: summing the operator averages counts each operator and its kernels both (the
    # first GPU run printed 586 ms of "GPU time" for a 310 ms step that way).
    kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    gpu_us = sum(_device_time(e) for e in kernels) / args.steps
    launches = len(kernels) / args.steps if kernels else None
    by_gpu = sorted(averages, key=_device_time, reverse=True)[: args.top]
    by_cpu = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]

    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    print(f"profile of one {args.method} step on {device} ({name}), preset {args.preset}, batch {batch}, "
          f"{'compiled, ' if args.compile else ''}{'bf16 autocast' if amp else 'fp32'}; torch {torch.__version__}")
    print("phases (ours, synchronised, median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in phase_ms.items()))
    busy = f"{gpu_us / 1000:.1f} ms of GPU kernels ({gpu_us / 1000 / (1000 * wall):.0%} busy)" if gpu else "no GPU"
    print(f"profiled: {1000 * wall:.1f} ms per step wall (profiler on), {busy}"
          + (f", {launches:.0f} kernel launches per step" if launches else ""))
    print(f"{'top GPU time':<70} {'GPU ms/step':>11} {'calls/step':>10}")
    for e in by_gpu:
        if _device_time(e) <= 0:
            break
        print(f"{e.key[:70]:<70} {_device_time(e) / 1000 / args.steps:>11.2f} {e.count / args.steps:>10.1f}")
    print(f"{'top CPU self time':<70} {'CPU ms/step':>11} {'calls/step':>10}")
    for e in by_cpu[:15]:
        print(f"{e.key[:70]:<70} {e.self_cpu_time_total / 1000 / args.steps:>11.2f} {e.count / args.steps:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "device_name": name, "torch": torch.__version__, "preset": args.preset, "batch": batch, "method": args.method,
            "compile": args.compile, "phases_ms": phase_ms, "wall_ms_per_step": 1000 * wall, "gpu_kernel_ms_per_step": gpu_us / 1000,
            "kernel_launches_per_step": launches,
            "top_gpu": [{"op": e.key, "gpu_ms_per_step": _device_time(e) / 1000 / args.steps, "calls_per_step": e.count / args.steps}
                        for e in by_gpu],
            "top_cpu": [{"op": e.key, "cpu_ms_per_step": e.self_cpu_time_total / 1000 / args.steps, "calls_per_step": e.count / args.steps}
                        for e in by_cpu],
        }, indent=2))


if __name__ == "__main__":
    main()
