"""Processes the pretraining tests start: one DDP training step, and a pretrain run to kill.

    python tests/pretrain_workers.py step OUT            # one process, the whole global batch
    torchrun --nproc-per-node 2 tests/pretrain_workers.py step OUT   # each rank half of it
    python tests/pretrain_workers.py run HOME METRICS.jsonl [--set ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import backbone as B  # noqa: E402
from models.masking import block_mask, corrupt  # noqa: E402
from models.pretrain import PretrainModelConfig, VIMPACPretrainer  # noqa: E402
from stages.pretrain import distributed as D  # noqa: E402
from stages.pretrain.train import _NO_BUFFER_SYNC, param_groups, train_step  # noqa: E402


GLOBAL_BATCH = 8  # videos per micro-batch, all ranks together
MICRO_STEPS = 2


def global_micro_batches(cfg: B.BackboneConfig) -> list[dict]:
    """The same data in every process: MICRO_STEPS micro-batches of GLOBAL_BATCH videos, some padded."""
    gen = torch.Generator().manual_seed(123)
    out = []
    for _ in range(MICRO_STEPS):
        shape = (GLOBAL_BATCH, 2, cfg.frames, cfg.grid, cfg.grid)
        tokens = torch.randint(0, cfg.n_codes, shape, generator=gen)
        tokens[1, :, 3:] = cfg.pad_id  # a short video
        flat = tokens.reshape(2 * GLOBAL_BATCH, *shape[2:])
        inputs, predict = corrupt(flat, block_mask(flat.shape, 3, gen), pad_id=cfg.pad_id, mask_id=cfg.mask_id, n_codes=cfg.n_codes)
        out.append({"tokens": tokens, "inputs": inputs.view(shape), "predict": predict.view(shape), "pad": tokens == cfg.pad_id,
                    "video_index": torch.arange(GLOBAL_BATCH)})
    return out


def step(out_dir: str) -> None:
    info = D.setup("cpu")
    torch.manual_seed(0)
    cfg = B.micro()
    model = VIMPACPretrainer(PretrainModelConfig(backbone=cfg, cl_hidden=16, cl_dim=8))
    # float64: what remains between 1 and 2 processes is then rounding at 1e-12, not 1e-5,
    # so the comparison can be tight enough to catch a wrong scale or a missing negative.
    model.double()
    net = model
    if info.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, **_NO_BUFFER_SYNC)  # the stage's, for any torch >= 2.4
    # Plain SGD: the update is the (clipped) gradient itself. Adam's first step is lr * sign(g),
    # which turns float-rounding noise in near-zero gradients into full-size differences.
    optimizer = torch.optim.SGD(param_groups(model, 0.0), lr=1.0)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    share = GLOBAL_BATCH // info.world_size
    mine = slice(info.rank * share, (info.rank + 1) * share)
    micro = [{k: v[mine] for k, v in b.items()} for b in global_micro_batches(cfg)]
    stats = train_step(net, optimizer, micro, device=torch.device("cpu"), amp=False, grad_clip=1.0)
    if info.is_main:
        after = model.state_dict()
        torch.save({"update": {k: after[k].detach() - before[k] for k in after if after[k].is_floating_point()},
                    "params": {k: v.detach().clone() for k, v in after.items()}, "grad_norm": stats.grad_norm},
                   Path(out_dir) / f"step-world{info.world_size}.pt")
    D.teardown(info)


class JsonlReporter:
    """Appends every metrics record to a file, flushed at once, so a killed run leaves its trace."""

    def __init__(self, path: str):
        self.file = open(path, "a")

    def info(self, msg: str) -> None:
        print(msg, flush=True)

    warning = info

    def metrics(self, values: dict, step: int | None = None) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def artifact(self, path) -> None:
        pass

    def start_progress(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int = 1) -> None:
        pass


def run(home: str, metrics: str, overrides: list[str]) -> None:
    from stages.config import PretrainConfig, build, preset
    from stages.pretrain.train import pretrain
    from warehouse.layout import DataRoot

    cfg = build(PretrainConfig, preset("pretrain", "micro"), overrides)
    pretrain(DataRoot(home), cfg.datasets or ["pre"], cfg, reporter=JsonlReporter(metrics))


if __name__ == "__main__":
    if sys.argv[1] == "step":
        step(sys.argv[2])
    else:
        sets = [a for a in sys.argv[4:] if a != "--set"]
        run(sys.argv[2], sys.argv[3], sets)
