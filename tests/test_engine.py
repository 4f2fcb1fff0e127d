"""The shared training engine (stages/engine.py) on a toy objective: exact resume, accumulation
equal to one large batch, the objective's state carried through a checkpoint, and the metric
window. The pretraining and fine-tuning families are covered end to end in
tests/test_pretrain_train.py and tests/test_finetune.py (resume equality, DDP, SIGKILL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stages.engine import Engine, Objective, adamw, optimizer_step, schedule
from stages.pretrain.distributed import DistInfo
from stages.reporting import RecordingReporter

DIM, CLASSES, BATCH, PER_EPOCH = 6, 3, 4, 5


def _batches(seed: int):
    """A deterministic dataset of PER_EPOCH batches per epoch, different every epoch."""
    def epochs(epoch: int, skip: int):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        for i in range(PER_EPOCH):
            x = torch.randn(BATCH, DIM, generator=g)
            labels = torch.randint(0, CLASSES, (BATCH,), generator=g)
            if i >= skip:
                yield {"tokens": x, "labels": labels}
    return epochs


class _Toy(Objective):
    """Cross-entropy with dropout (so the RNG state matters) and a running count as its own state."""

    def __init__(self):
        self.seen = torch.zeros(1, dtype=torch.float64)

    def step_context(self, net, micro_batches, device):
        return float(sum(b["labels"].numel() for b in micro_batches))

    def loss(self, net, batch, norm, k):
        logits = net(F.dropout(batch["tokens"], 0.3))
        ce = F.cross_entropy(logits, batch["labels"], reduction="sum")
        return ce / norm, {"loss_sum": float(ce.detach()), "per_batch": torch.ones(1)}

    def summarise(self, sums, base):
        return {"loss": sums["loss_sum"] / sums["videos"]}

    def after_step(self, step, figures):
        self.seen += figures["videos"]

    def state(self):
        return {"seen": self.seen.clone()}

    def load_state(self, ckpt, is_main):
        self.seen = ckpt["seen"].clone()


def _engine(tmp_path, accumulate: int = 1, checkpoint_every: int = 100):
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, CLASSES)
    optimizer = adamw(model, lr=0.05, betas=(0.9, 0.999), weight_decay=0.01, device=torch.device("cpu"))
    scheduler = schedule(optimizer, first_step=0, warmup=2, total=12)
    reporter = RecordingReporter()
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)
    engine = Engine(model, optimizer, scheduler, _Toy(), info=info, reporter=reporter, amp=False, grad_clip=1.0,
                    accumulate=accumulate, last=tmp_path / "last.pt", what="toy", log_every=1,
                    checkpoint_every=checkpoint_every, batches_per_epoch=PER_EPOCH,
                    checkpoint_header={"format": "toy", "code_version": "1", "run_key": "k", "model_config": {}})
    return engine, reporter


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch, at an epoch's end, in the second epoch
def test_a_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, accumulate, stop):
    whole, whole_log = _engine(tmp_path / "whole", accumulate)
    (tmp_path / "whole").mkdir()
    assert whole.run(first_step=0, end_step=12, stop_at=12, epochs=_batches(1), label="toy") == 12

    (tmp_path / "split").mkdir()
    first, first_log = _engine(tmp_path / "split", accumulate)
    assert first.run(first_step=0, end_step=12, stop_at=stop, epochs=_batches(1), label="toy") == stop
    assert (tmp_path / "split" / "last.pt").exists()
    torch.manual_seed(123)  # a new process: whatever the global RNG holds, the checkpoint's states win
    second, second_log = _engine(tmp_path / "split", accumulate)
    assert second.resume() and second.step == stop
    assert second.run(first_step=0, end_step=12, stop_at=12, epochs=_batches(1), label="toy") == 12

    for a, b in zip(whole.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    losses = [v["loss"] for v, _ in whole_log.metric_log]
    assert losses == [v["loss"] for v, _ in first_log.metric_log + second_log.metric_log]
    assert float(second.objective.seen) == float(whole.objective.seen) == 12 * accumulate * BATCH


def test_accumulated_micro_batches_make_the_update_of_one_large_batch():
    torch.manual_seed(0)
    one, two = torch.nn.Linear(DIM, CLASSES), torch.nn.Linear(DIM, CLASSES)
    two.load_state_dict(one.state_dict())
    batch = next(iter(_batches(3)(0, 0)))
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]

    class NoDropout(_Toy):
        def loss(self, net, b, norm, k):
            ce = F.cross_entropy(net(b["tokens"]), b["labels"], reduction="sum")
            return ce / norm, {"loss_sum": float(ce.detach())}

    results = []
    for model, micro in ((one, [batch]), (two, halves)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        figures, grad_norm = optimizer_step(model, opt, micro, NoDropout(), device=torch.device("cpu"), amp=False, grad_clip=1e9)
        results.append((figures["loss_sum"], grad_norm))
    torch.testing.assert_close(one.weight, two.weight)
    assert results[0][0] == pytest.approx(results[1][0]) and results[0][1] == pytest.approx(results[1][1])


def test_the_window_logs_every_step_and_the_periodic_checkpoint_holds_the_objectives_state(tmp_path):
    engine, reporter = _engine(tmp_path, checkpoint_every=4)
    engine.run(first_step=0, end_step=6, stop_at=6, epochs=_batches(2), label="toy")
    values, step = reporter.metric_log[-1]
    assert step == 6 and set(values) >= {"loss", "lr", "grad_norm", "videos_per_s", "data_wait_frac", "epoch"}
    assert values["epoch"] == pytest.approx(6 / PER_EPOCH)
    assert reporter.advanced == 6
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # every 4 steps, not at the end: the caller finishes a run
    assert (ckpt["kind"], ckpt["format"], ckpt["step"]) == ("resume", "toy", 4)
    assert float(ckpt["seen"]) == 4 * BATCH and (ckpt["epoch"], ckpt["consumed"]) == (0, 4)


def test_an_epoch_without_batches_is_an_error_not_an_endless_loop(tmp_path):
    engine, _ = _engine(tmp_path)
    with pytest.raises(ValueError, match="epoch 0 gave this rank no batches"):
        engine.run(first_step=0, end_step=3, stop_at=3, epochs=lambda epoch, skip: iter(()), label="toy")
