"""The one training engine: every training run (VIMPAC pretraining, fine-tuning) is an objective
driven by `Engine`, as MAE's engine_pretrain.py and torchtitan's Trainer drive theirs.

The engine owns what every run needs and no run should copy (issue 17):

- the step loop: k micro-batches per optimizer step (gradient accumulation), the gradient
  all-reduce only on the last one under DDP (`no_sync`), bf16 autocast on CUDA, gradient clipping,
  AdamW (optionally with layer-wise learning-rate decay), the warm-up + linear-decay schedule
  (Appendix C);
- exact checkpoint and resume: model, optimizer, scheduler, step, the loader's position (epoch,
  batch), every rank's RNG states and the objective's own state go into `last.pt` atomically every
  `checkpoint_every` steps; a run that finds it continues with the same losses as an
  uninterrupted one;
- Ctrl-C at a step boundary (`stop_at_step_boundary`), a step budget (`stop_at`), progress;
- a metric window summed over steps and ranks and logged every `log_every` steps.

An objective supplies the model, the loss of a micro-batch and what its figures mean:

- `step_context(net, micro_batches, device)`: whatever normalises the losses over the whole global
  step (pretraining: the predicted-token count; fine-tuning: the video count), so that k
  accumulated micro-batches on n ranks make the update of one batch k x n times the size;
- `loss(net, batch, context, k)`: the loss to back-propagate and this micro-batch's figures
  (sums: floats or tensors), computed under the engine's autocast;
- `summarise(sums, base)`: the logged values from the window's sums (over steps and ranks) and
  the engine's own values (`base`: grad_norm, videos_per_s, data_wait_frac, epoch);
- optional hooks: `step` (the whole optimizer step, `optimizer_step` by default), `after_step`,
  `at_log`, `logged`, `periodic`, `state`, `load_state`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from stages.checkpoints import atomic_save, flush_denormals, read_checkpoint, rng_states, set_rng_states, strip_prefixes
from stages.pretrain import distributed as D
from stages.reporting import Reporter

Figures = dict[str, Any]  # a micro-batch's or step's sums: floats, or tensors (e.g. per-class counts)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak, then linear decay to zero at `total` (Appendix C)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def layer_scales(layer_decay: float, n_layers: int) -> list[float]:
    """Learning-rate factor of each layer id 0 .. n_layers + 1 (ELECTRA/BEiT's layer-wise decay as
    mae_st's util/lr_decay.py computes it): layer i of n_layers gets decay ** (n_layers + 1 - i),
    so the embeddings (0) learn slowest and the head (n_layers + 1) at the full rate."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    return [layer_decay ** (n_layers + 1 - i) for i in range(n_layers + 2)]


def param_groups(model: torch.nn.Module, weight_decay: float, *, layer_decay: float = 1.0,
                 layer_of: Callable[[str], int] | None = None, n_layers: int = 0,
                 no_decay: Iterable[str] = ()) -> list[dict]:
    """Weight decay on matrices only: biases, LayerNorm/BatchNorm weights and the [CLS] vectors
    (all 1-D) are exempt, as in BERT, and so are the parameters named in `no_decay` (a ViT's
    [CLS] and positions are (1, N, D) tensors: mae_st's no_weight_decay list).

    With `layer_decay` < 1 every (layer, decay) pair is its own group carrying `lr_scale` (see
    `layer_scales`; `layer_of(name)` gives a parameter's layer id: 0 for the embeddings, i + 1 for
    block i, n_layers + 1 for the final norm and the head). At 1 the two groups are exactly
    those of a run without layer decay."""
    exempt = set(no_decay)
    scales = layer_scales(layer_decay, n_layers) if layer_decay != 1.0 else None
    if scales is not None and layer_of is None:
        raise ValueError("layer-wise learning-rate decay needs the model's layer_of(name)")
    groups: dict[tuple[int, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decays = p.ndim >= 2 and name not in exempt
        layer = 0
        if scales is not None:
            layer = layer_of(name)
            if not 0 <= layer < len(scales):
                raise ValueError(f"parameter {name}: layer id {layer} outside 0..{n_layers + 1}")
        groups.setdefault((layer, decays), []).append(p)
    if scales is None:
        return [{"params": groups.get((0, True), []), "weight_decay": weight_decay},
                {"params": groups.get((0, False), []), "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scales[layer]}
            for (layer, decays), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


def adamw(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float,
          device: torch.device, layer_decay: float = 1.0, layer_of: Callable[[str], int] | None = None,
          n_layers: int = 0, no_decay: Iterable[str] = ()) -> torch.optim.AdamW:
    """AdamW over `param_groups`; a group with an `lr_scale` starts at lr x lr_scale, and the
    schedule (a LambdaLR) multiplies each group's own starting rate."""
    groups = param_groups(model, weight_decay, layer_decay=layer_decay, layer_of=layer_of, n_layers=n_layers, no_decay=no_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def schedule(optimizer: torch.optim.Optimizer, *, first_step: int, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + linear-decay schedule from `first_step` of a `total`-step schedule (a
    continued phase starts past 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(first_step + i, warmup=warmup, total=total))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def compile_layers(layers: torch.nn.ModuleList) -> None:
    """torch.compile layer by layer: a backbone's "any padding in this batch?" check is
    data-dependent and would break one whole-model graph; each layer compiles once per case."""
    for i, layer in enumerate(layers):
        layers[i] = torch.compile(layer)


@contextmanager
def stop_at_step_boundary(enabled: bool) -> Iterator[dict]:
    """The first Ctrl-C asks to stop after the current optimizer step (the loop then saves the
    position and raises KeyboardInterrupt); a second one interrupts at once. Saving in the middle
    of a step would pair updated weights with the old step and data position. Only in one process
    and on the main thread: under DDP the save is a collective and the other ranks may be anywhere;
    there the periodic checkpoints are the resume points."""
    state = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame) -> None:
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def _add(total: Figures, figures: Figures) -> None:
    for key, value in figures.items():
        if key in total:
            total[key] = total[key] + value
        else:
            total[key] = value.clone() if isinstance(value, torch.Tensor) else value


def optimizer_step(net: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], objective, *,
                   device: torch.device, amp: bool, grad_clip: float) -> tuple[Figures, float]:
    """One optimizer step over k micro-batches. Returns the figures summed over the micro-batches
    (this rank's) and the gradient norm before clipping."""
    k = len(micro_batches)
    ddp = isinstance(net, DistributedDataParallel)
    batches = [to_device(b, device) for b in micro_batches]
    context = objective.step_context(net, batches, device)
    totals: Figures = {}
    net.train()
    for i, b in enumerate(batches):
        with nullcontext() if (not ddp or i == k - 1) else net.no_sync():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, figures = objective.loss(net, b, context, k)
            loss.backward()
        _add(totals, figures)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return totals, grad_norm


class Objective:
    """Defaults for the optional hooks; see the module docstring for the required ones."""

    ddp_kwargs: dict = {}

    def step(self, net: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict], *,
             device: torch.device, amp: bool, grad_clip: float) -> tuple[Figures, float]:
        """One optimizer step: `optimizer_step` with this objective's loss."""
        return optimizer_step(net, optimizer, micro_batches, self, device=device, amp=amp, grad_clip=grad_clip)

    def step_context(self, net: torch.nn.Module, micro_batches: list[dict], device: torch.device) -> Any:
        return None

    def count(self, batch: dict) -> int:
        """Samples in a batch (the window's `videos`, logged as videos_per_s)."""
        return int(batch["tokens"].shape[0])

    def loss(self, net: torch.nn.Module, batch: dict, context: Any, k: int) -> tuple[torch.Tensor, Figures]:
        """Required: the loss to back-propagate (already divided as the step context says) and
        this micro-batch's figures."""
        raise NotImplementedError(f"{type(self).__name__} must define loss()")

    def summarise(self, sums: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        """The logged values from the window's sums over steps and ranks (`steps` counts both)
        and the engine's values (`base`)."""
        return {}

    def after_step(self, step: int, figures: Figures) -> None:
        """After every optimizer step (figures: this rank's, tensors included)."""

    def at_log(self, micro_batches: list[dict]) -> dict[str, float]:
        """Figures measured at a log step only, summed over ranks with the window."""
        return {}

    def logged(self, values: dict[str, float]) -> None:
        """The values just logged."""

    def periodic(self, step: int) -> None:
        """After logging and before the checkpoint of a step (e.g. validation); every rank."""

    def state(self) -> dict:
        """What the objective adds to a resume checkpoint (called on every rank: may be collective)."""
        return {}

    def load_state(self, ckpt: dict, is_main: bool) -> None:
        """Restore `state()` from a resume checkpoint."""


@dataclass
class Stream:
    """Micro-batches from epoch after epoch of a loader, with the position a resume needs.
    `epochs(epoch, skip_batches)` yields one epoch's batches from a position."""

    epochs: Callable[[int, int], Iterable[dict]]
    what: str  # "pretrain", "fine-tune": names the data in warnings
    reporter: Reporter
    epoch: int = 0
    pos: int = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            started_at = self.pos
            for batch in self.epochs(self.epoch, self.pos):
                self.pos += 1
                for err in batch.get("errors") or []:
                    self.reporter.warning(f"{self.what} data: {err}")
                yield batch
            if started_at == 0 and self.pos == 0:  # a whole epoch without a batch: the next would be empty too
                raise ValueError(f"{self.what} data: epoch {self.epoch} gave this rank no batches (fewer samples than ranks, "
                                 "or every sample unusable)")
            self.epoch, self.pos = self.epoch + 1, 0


class Engine:
    """Drives one objective's training: see the module docstring."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, objective: Objective, *,
                 info: D.DistInfo, reporter: Reporter, amp: bool, grad_clip: float, accumulate: int,
                 last: Path, checkpoint_header: dict, what: str, log_every: int, checkpoint_every: int,
                 batches_per_epoch: int, log_first: bool = False):
        """`batches_per_epoch` 0: unknown (the logged epoch is then whole epochs only); `log_first`:
        also log step 1, the model before it learned anything."""
        self.model, self.optimizer, self.scheduler, self.objective = model, optimizer, scheduler, objective
        self.info, self.reporter, self.amp, self.grad_clip, self.k = info, reporter, amp, grad_clip, accumulate
        self.last, self.header, self.what = last, checkpoint_header, what
        self.log_every, self.checkpoint_every, self.batches_per_epoch = log_every, checkpoint_every, batches_per_epoch
        self.log_first = log_first
        self.device, self.world = info.device, info.world_size
        self.net: torch.nn.Module | None = None  # the model, wrapped in DDP over several ranks: made by `run`
        self.step, self.epoch, self.consumed = 0, 0, 0
        self.last_values: dict[str, float] = {}

    def resume(self) -> bool:
        """Continue from `last` if it exists (model, optimizer, schedule, position, RNG, the
        objective's state); False when there is nothing to resume."""
        if not self.last.exists():
            return False
        ckpt = read_checkpoint(self.last, self.header["format"], self.what)
        try:
            self.model.load_state_dict(strip_prefixes(ckpt["model"]))
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.step, self.epoch, self.consumed = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["consumed"])
            self.objective.load_state(ckpt, self.info.is_main)
            states = ckpt["rng"]
            set_rng_states(states if isinstance(states, dict) else states[self.info.rank], self.device)  # dict: one process, older files
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"cannot resume from {self.last}: {type(e).__name__}: {e}; delete it to start over") from e
        return True

    def save_resume(self, stream: Stream) -> None:
        """`last.pt` with everything an exact resume needs; a collective under DDP."""
        states = [None] * self.world
        mine = rng_states(self.device)
        if self.world > 1:
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        extra = self.objective.state()
        if self.info.is_main:
            atomic_save({**self.header, "kind": "resume", "model": strip_prefixes(self.model.state_dict()),
                         "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "step": self.step, "epoch": stream.epoch, "consumed": stream.pos, "rng": states,
                         "world_size": self.world, **extra}, self.last)
        D.barrier()

    def _summarise(self, window: Figures, elapsed: float, stream: Stream) -> dict[str, float]:
        keys = sorted(window)
        sums = D.all_reduce_sum(torch.tensor([float(window[k]) for k in keys], dtype=torch.float64, device=self.device))
        sums = dict(zip(keys, sums.tolist()))
        elapsed = max(1e-9, elapsed)
        values = {"grad_norm": sums["grad_norm"] / max(1.0, sums["steps"]), "videos_per_s": sums["videos"] / elapsed,
                  "data_wait_frac": sums["wait_s"] / self.world / elapsed,
                  "epoch": stream.epoch + (stream.pos / self.batches_per_epoch if self.batches_per_epoch else 0)}
        values.update(self.objective.summarise(sums, dict(values)))
        return values

    def run(self, *, first_step: int, end_step: int, stop_at: int, epochs: Callable[[int, int], Iterable[dict]],
            label: str) -> int:
        """Train from `self.step` to `stop_at` (<= `end_step`, the run's last step); returns the
        step reached. Short of `end_step` the position is saved for the next call. Ctrl-C saves
        it too and raises KeyboardInterrupt."""
        if self.net is None:  # after resume and compile: DDP broadcasts rank 0's weights as it wraps
            self.net = self.model
            if self.world > 1:
                self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                   **self.objective.ddp_kwargs)
        stream = Stream(epochs, self.what, self.reporter, self.epoch, self.consumed)
        objective, reporter, device = self.objective, self.reporter, self.device
        window: Figures = {}
        started = time.perf_counter()
        reporter.start_progress(end_step - first_step, label)
        if self.step > first_step:
            reporter.advance(self.step - first_step)
        with flush_denormals(device), stop_at_step_boundary(self.world == 1) as interrupt:
            batches = iter(stream)
            while self.step < stop_at:
                t_wait = time.perf_counter()
                micro = [to_device(next(batches), device) for _ in range(self.k)]
                wait = time.perf_counter() - t_wait
                lr = max(g["lr"] for g in self.optimizer.param_groups)  # the peak: layer-wise decay scales the others down
                figures, grad_norm = objective.step(self.net, self.optimizer, micro, device=device, amp=self.amp,
                                                    grad_clip=self.grad_clip)
                self.scheduler.step()
                self.step += 1
                figures["videos"] = float(sum(objective.count(b) for b in micro))
                objective.after_step(self.step, figures)
                _add(window, {k: v for k, v in figures.items() if not isinstance(v, torch.Tensor)})
                _add(window, {"steps": 1.0, "grad_norm": grad_norm, "wait_s": wait})
                if self.step % self.log_every == 0 or self.step == stop_at or (self.log_first and self.step == 1):
                    _add(window, objective.at_log(micro))
                    values = {**self._summarise(window, time.perf_counter() - started, stream), "lr": lr}
                    if self.info.is_main:
                        reporter.metrics(values, step=self.step)
                    objective.logged(values)
                    self.last_values = values
                    window, started = {}, time.perf_counter()
                objective.periodic(self.step)
                if self.step % self.checkpoint_every == 0 and self.step < end_step:
                    self.save_resume(stream)
                reporter.advance()
                if interrupt["stop"]:
                    self.save_resume(stream)
                    reporter.info(f"interrupted at step {self.step}: position saved; run the same command again to continue")
                    raise KeyboardInterrupt
            batches.close()
        if self.step < end_step:
            self.save_resume(stream)
        self.epoch, self.consumed = stream.epoch, stream.pos
        return self.step
