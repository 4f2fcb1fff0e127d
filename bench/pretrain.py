"""Pretraining throughput (videos/s, tokens/s), peak memory and MFU per model preset, next to an
authors-style training step of the same model measured in the same run.

    python bench/pretrain.py [--presets tiny,small] [--batch 8] [--steps N] [--warmup N]
                             [--device auto|cpu|cuda] [--compile] [--threads N] [--json PATH]

Defaults: CPU tiny (batch 8) and small (batch 2), 1 warm-up + 2 timed steps (~1 minute on an idle
2-core machine); CUDA small (64), base (48), large_half (32), 5 warm-up + 20 timed steps.

Setting: the paper's pretraining input (Table 4 / Table 6): T = 5 frames at S = 128 px, i.e. a
16 x 16 token grid, 8192 codes, two clips per video, block masking (the block count whose induced
ratio is closest to 15%: 5 blocks, Table 2). The model is the pretrain stage's preset (its
contrastive head and dropout) with that vocabulary and grid; tokens are synthetic (uniform random
codes: speed does not depend on them). Each timed step is the stage's full `train_step`: forward,
backward, gradient clipping at 1.0, AdamW step (fused on CUDA), bf16 autocast on CUDA, fp32 on
CPU. Warm-up steps are not timed; CUDA timings are bracketed by torch.cuda.synchronize().

Baseline ("authors-style"): the same model, weights, batches, optimizer and precision, trained
the way the authors' code does it, which differs in two ways (see TokenHead in models/heads.py):
  - token logits are computed at every position (hidden.reshape(-1, D) through the token head)
    and the cross-entropy ignores the unmasked ~85% (ignore_index), instead of decoding only the
    masked positions;
  - attention is plain matmul + softmax (SDPA forced onto its MATH backend) instead of fused
    attention kernels.
The speedup column is ours over that baseline. With --compile both are compiled the same way
(each backbone layer, as the stage's `train.compile` does); the JSON records TorchDynamo's graph
breaks and graph count. On one GPU there is no gradient all-reduce, so the authors' other
difference (all-reduce at every accumulation micro-step) does not show here.

Each (preset, method) runs in its own child process so peak memory is per measurement: on CUDA
torch.cuda.max_memory_allocated(); on CPU the growth of the process's peak RSS (ru_maxrss) from
just before the model is built to the end of the run (parameters, gradients, AdamW state,
activations and allocator caching; tracemalloc does not see torch's allocations).

MFU (CUDA only) = videos/s x 3 (forward + backward) x 2 clips x flops_per_clip / the device's dense
bf16 peak (stages.pretrain.train.peak_flops); heads are not counted. On CUDA the small model's
videos/s is compared with the paper's 32 videos/s on one V100 (Table 6) and the goal of >= 20x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from models.backbone import flops_per_clip  # noqa: E402
from models.losses import info_nce, upcast  # noqa: E402
from models.masking import blocks_for_ratio  # noqa: E402
from models.pretrain import VIMPACPretrainer  # noqa: E402
from stages.config import PretrainConfig, build, preset  # noqa: E402
from stages.pretrain.train import mask_batch, model_config, param_groups, peak_flops, train_step  # noqa: E402

FRAMES, GRID, N_CODES = 5, 16, 8192  # T = 5 at S = 128 px (8x downsampling), DALL-E's vocabulary
PAPER_V100_SMALL = 32.0  # videos/s, small model, one V100 (Table 6)
GOAL = 20.0  # the target: small on one H100 >= 20x the paper's V100 figure
GPU_BATCH = {"tiny": 64, "small": 64, "base": 48, "large_half": 32}
# small trains ~390 GFLOP per video: ~6 s per step of 2 videos on an idle 2-core CPU, so the CPU default keeps it
# small (the whole default CPU run: ~1 minute idle, 2-4 minutes with other work on the machine).
CPU_BATCH = {"micro": 8, "tiny": 8}
SEED = 0


def build_model(name: str, device: torch.device, seed: int) -> tuple[VIMPACPretrainer, torch.optim.Optimizer, PretrainConfig]:
    cfg = build(PretrainConfig, preset("pretrain", name))
    torch.manual_seed(seed)
    model = VIMPACPretrainer(model_config(cfg, N_CODES, GRID)).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                  betas=(cfg.train.beta1, cfg.train.beta2), fused=device.type == "cuda")
    return model, optimizer, cfg


def make_batches(cfg: PretrainConfig, batch: int, count: int, n_blocks: int, device: torch.device, seed: int) -> list[dict]:
    """`count` distinct synthetic micro-batches (uniform random codes, block masks), already on the device."""
    g = torch.Generator().manual_seed(seed)
    pad_id, mask_id = N_CODES, N_CODES + 1
    out = []
    for _ in range(count):
        b = {"tokens": torch.randint(0, N_CODES, (batch, 2, FRAMES, GRID, GRID), generator=g),
             "video_index": torch.arange(batch)}
        b = mask_batch(b, g, strategy="block", n_blocks=n_blocks, ratio=cfg.masking.ratio, replacement=cfg.masking.replacement,
                       pad_id=pad_id, mask_id=mask_id, n_codes=N_CODES, enabled=True)
        out.append({k: v.to(device) for k, v in b.items()})
    return out


def baseline_step(model: VIMPACPretrainer, optimizer: torch.optim.Optimizer, b: dict, *, device: torch.device, amp: bool,
                  grad_clip: float) -> float:
    """One optimizer step the authors' way: logits at every position, cross-entropy with
    ignore_index on the unmasked ones, plain matmul + softmax attention. Same model, optimizer,
    precision and contrastive loss as `train_step`."""
    model.train()
    n = b["tokens"].shape[0]

    def clips(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(2 * n, *x.shape[2:])

    with sdpa_kernel(SDPBackend.MATH), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        predict, targets = clips(b["predict"]), clips(b["tokens"])
        cls, hidden = model.backbone(clips(b["inputs"]), clips(b["pad"]))
    # The heads in fp32, as VIMPACPretrainer runs them (models/pretrain.py), so both paths pay the same precision.
    with torch.autocast(device.type, enabled=False):
        logits = model.token_head(upcast(hidden).reshape(-1, hidden.shape[-1]))  # (2B * T * H * W, V): every position
        labels = targets.masked_fill(~predict, -100).reshape(-1)
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        loss = ce / predict.sum().clamp_min(1)
        cfg = model.config
        feats = model.contrastive_head(upcast(cls))
        cl_loss, _ = info_nce(feats[:n], feats[n:], cfg.temperature, b["video_index"])
        loss = loss + cfg.alpha * cfg.temperature * cl_loss
    loss.backward()
    value = float(loss.detach())  # train_step reads its statistics back too
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(job: dict) -> dict:
    """One (preset, method) measurement; runs in a child process."""
    device = torch.device(job["device"])
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    n_blocks = blocks_for_ratio(FRAMES, GRID, GRID)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, optimizer, cfg = build_model(job["preset"], device, SEED)
    backbone_params = model.backbone.num_params()
    if job["compile"]:
        # As the stage's `train.compile` does (stages/pretrain/train.py): layer by layer, since the
        # backbone's "any padding in this batch?" check is data-dependent and would break the graph.
        for i, layer in enumerate(model.backbone.layers):
            model.backbone.layers[i] = torch.compile(layer)
    batches = make_batches(cfg, job["batch"], min(4, job["warmup"] + job["steps"]), n_blocks, device, SEED + 1)
    amp = device.type == "cuda"
    grad_clip = cfg.train.grad_clip

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        if job["method"] == "ours":
            train_step(model, optimizer, [b], device=device, amp=amp, grad_clip=grad_clip)
        else:
            baseline_step(model, optimizer, b, device=device, amp=amp, grad_clip=grad_clip)

    torch.manual_seed(SEED + 2)
    t_warm = time.perf_counter()
    for i in range(job["warmup"]):
        step(i)
    _sync(device)
    warmup_s = time.perf_counter() - t_warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(job["steps"]):
        t0 = time.perf_counter()
        step(job["warmup"] + i)
        _sync(device)
        times.append(time.perf_counter() - t0)
    total = sum(times)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024  # KiB on Linux
    bcfg = model.config.backbone
    videos_s = job["batch"] * job["steps"] / total
    peak = peak_flops(device)
    flops_video = 3 * 2 * flops_per_clip(bcfg, FRAMES, GRID, GRID)
    return {
        **job,
        "backbone_params": backbone_params,
        "head_params": model.head_params(),
        "n_blocks": n_blocks,
        "ms_per_step": 1000 * total / job["steps"],
        "ms_per_step_median": 1000 * statistics.median(times),
        "videos_per_s": videos_s,
        "tokens_per_s": videos_s * 2 * FRAMES * GRID * GRID,
        "peak_mem_mb": peak_mb,
        "train_flops_per_video": flops_video,
        "mfu": videos_s * flops_video / peak if peak else None,
        "warmup_s": warmup_s,
        **_compile_counters(job["compile"]),
    }


def _compile_counters(compiled: bool) -> dict:
    """Graph breaks and graphs TorchDynamo made (compiled runs): a break or a recompile in the
    timed steps shows up as more graphs than the layers' one (per padding case)."""
    if not compiled:
        return {}
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {"graph_breaks": sum(breaks.values()), "graph_break_reasons": {k[:200]: v for k, v in breaks.items()},
            "unique_graphs": counters["stats"].get("unique_graphs", 0)}


def run_child(job: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**job, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help="comma-separated pretrain presets (CPU: tiny,small; CUDA: small,base,large_half)")
    ap.add_argument("--batch", type=int, default=None, help="videos per step (CPU: tiny 8, others 2; CUDA: small 64, base 48, large_half 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (CPU: 2; CUDA: 20)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (CPU: 1; CUDA: 5, 10 with --compile)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone (ours and baseline alike)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the authors-style baseline")
    ap.add_argument("--methods", default=None, help="comma-separated subset of ours,baseline (default: both, or ours with --no-baseline)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print("RESULT " + json.dumps(measure(json.loads(args.child))), flush=True)
        return

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    gpu = device == "cuda"
    presets = (args.presets or ("small,base,large_half" if gpu else "tiny,small")).split(",")
    warmup = args.warmup if args.warmup is not None else ((10 if args.compile else 5) if gpu else 1)
    methods = args.methods.split(",") if args.methods else (["ours"] if args.no_baseline else ["ours", "baseline"])

    load_before = os.getloadavg()[0]
    results = []
    for name in presets:
        batch = args.batch or (GPU_BATCH.get(name, 32) if gpu else CPU_BATCH.get(name, 2))
        steps = args.steps or (20 if gpu else 2)
        for method in methods:
            job = {"preset": name, "method": method, "batch": batch, "steps": steps, "warmup": warmup,
                   "device": device, "compile": args.compile, "threads": args.threads}
            r = run_child(job)
            results.append(r)
            status = r.get("error") or f"{r['videos_per_s']:.2f} videos/s, {r['ms_per_step']:.0f} ms/step"
            print(f"  {name} {method}: {status}", file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(0) if gpu else (platform.processor() or platform.machine())
    if not gpu:
        try:
            dev_name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        except (OSError, StopIteration):
            pass
    threads = args.threads or torch.get_num_threads()
    print(f"pretraining throughput on {device} ({dev_name}); torch {torch.__version__}, {threads} threads; "
          f"{'bf16 autocast' if gpu else 'fp32'}{', torch.compile' if args.compile else ''}; "
          f"load average {load_before:.2f} at the start ({os.cpu_count()} CPUs)")
    print(f"T={FRAMES} x {GRID}x{GRID} tokens (S=128), {N_CODES} codes, 2 clips/video, {blocks_for_ratio(FRAMES, GRID, GRID)} mask blocks; "
          f"{warmup} warm-up step(s) before the timed ones; baseline = logits at every position + math (matmul+softmax) attention")
    mem = "peak mem MB" if gpu else "peak RSS+ MB"
    head = (f"{'preset':<11} {'params M':>8} {'batch':>5} {'steps':>5} {'videos/s':>9} {'tokens/s':>10} {'ms/step':>8} {mem:>12} "
            f"{'MFU':>6} {'base videos/s':>13} {'base ms/step':>12} {'base ' + mem:>17} {'speedup':>8}")
    print(head)
    by = {(r["preset"], r["method"]): r for r in results}
    for name in presets:
        ours, base = by.get((name, "ours")), by.get((name, "baseline"))
        if ours is None and base is not None and "error" not in base:  # --methods baseline
            print(f"{name:<11} {base['backbone_params'] / 1e6:>8.1f} {base['batch']:>5} {base['steps']:>5} {'-':>9} {'-':>10} {'-':>8} "
                  f"{'-':>12} {'-':>6} {base['videos_per_s']:>13.2f} {base['ms_per_step']:>12.0f} {base['peak_mem_mb']:>17.0f} {'-':>8}")
            continue
        if ours is None or "error" in ours:
            print(f"{name:<11} failed: {ours.get('error') if ours else 'not run'}")
            continue
        mfu = f"{ours['mfu']:.1%}" if ours.get("mfu") is not None else "-"
        if base is not None and "error" not in base:
            b_cols = (f"{base['videos_per_s']:>13.2f} {base['ms_per_step']:>12.0f} {base['peak_mem_mb']:>17.0f} "
                      f"{ours['videos_per_s'] / base['videos_per_s']:>7.2f}x")
        else:
            b_cols = f"{'-' if base is None else 'failed':>13} {'-':>12} {'-':>17} {'-':>8}"
        print(f"{name:<11} {ours['backbone_params'] / 1e6:>8.1f} {ours['batch']:>5} {ours['steps']:>5} {ours['videos_per_s']:>9.2f} "
              f"{ours['tokens_per_s']:>10.0f} {ours['ms_per_step']:>8.0f} {ours['peak_mem_mb']:>12.0f} {mfu:>6} {b_cols}")
    for r in results:
        if "error" in r:
            print(f"{r['preset']} {r['method']} failed: {r['error']}")
        elif args.compile:
            print(f"{r['preset']} {r['method']} compiled: {r['warmup_s']:.1f} s of warm-up (compilation included), "
                  f"{r['unique_graphs']} graph(s), {r['graph_breaks']} graph break(s)"
                  + (f": {'; '.join(r['graph_break_reasons'])[:300]}" if r["graph_breaks"] else ""))
    small = by.get(("small", "ours"))
    if gpu and small and "error" not in small:
        ratio = small["videos_per_s"] / PAPER_V100_SMALL
        print(f"small: {small['videos_per_s']:.0f} videos/s vs the paper's {PAPER_V100_SMALL:.0f} videos/s on one V100 = {ratio:.1f}x "
              f"(goal >= {GOAL:.0f}x: {'met' if ratio >= GOAL else 'not met'})")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "device_name": dev_name, "torch": torch.__version__, "threads": threads, "load_average_at_start": load_before,
                                         "compile": args.compile, "frames": FRAMES, "grid": GRID, "n_codes": N_CODES,
                                         "paper_v100_small_videos_per_s": PAPER_V100_SMALL, "results": results}, indent=2))


if __name__ == "__main__":
    main()
