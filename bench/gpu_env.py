"""The machine a GPU figure was measured on, and its two ceilings measured in the same run.

    python bench/gpu_env.py [--json PATH] [--size 8192]

Prints (and writes as JSON) the GPU's name, memory, driver, CUDA/cuDNN/NCCL/Triton/torch and
Python versions, the date, and two ceilings measured here (METHOD.md of the device notes):
a dense bf16 matrix product (size^3, random data, 3 warm-ups, median of 10 timed with CUDA
events) and a device-to-device copy of 2 GiB (bytes read + written). MFU figures elsewhere
use the datasheet peak (stages.pretrain.train.peak_flops); the measured product rate is the
practical ceiling next to it. Without a GPU it prints what it can and no ceilings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stages.pretrain.train import peak_flops  # noqa: E402


def _timed(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median seconds of fn() over `reps` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--size", type=int, default=8192, help="matrix size of the bf16 product")
    args = ap.parse_args()
    info: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "python": platform.python_version(),
                  "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cpus": os.cpu_count()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
                    datasheet_bf16_peak_tflops=(peak_flops(dev) or 0) / 1e12)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["nvidia_smi"] = f"unavailable: {e}"
        n = args.size
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device=dev, dtype=torch.bfloat16, generator=g)
        s = _timed(lambda: a @ b)
        info["bf16_matmul_tflops"] = 2 * n**3 / s / 1e12
        del a, b
        x = torch.empty(2**30, device=dev, dtype=torch.int16)  # 2 GiB
        y = torch.empty_like(x)
        s = _timed(lambda: y.copy_(x))
        info["d2d_copy_tb_s"] = 2 * x.numel() * 2 / s / 1e12
        del x, y
        torch.cuda.empty_cache()
    for k, v in info.items():
        print(f"{k}: {v}")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
