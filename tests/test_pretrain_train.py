"""The pretrain stage: DDP equals one process, SIGKILL + resume equals an uninterrupted run,
accumulation, caching, continuing at a higher resolution, the flow's tracking and registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import backbone as B
from models.pretrain import PretrainModelConfig, VIMPACPretrainer
from pretrain_workers import global_micro_batches
from stages.config import ConfigError, PretrainConfig, build, preset
from stages.pretrain.train import load_pretrained, lr_factor, param_groups, pretrain, train_step
from stages.reporting import RecordingReporter
from test_pretrain_data import write_shard
from warehouse.catalog import Catalog

WORKERS = Path(__file__).with_name("pretrain_workers.py")
REPO = Path(__file__).resolve().parents[1]
CODES = 64


def learnable_tokens(vid: int, n: int, n_views: int) -> np.ndarray:
    """Codes with structure a model can learn: a per-video offset plus position, over 64 codes."""
    t = np.arange(n)[:, None, None]
    h = np.arange(4)[None, :, None]
    w = np.arange(4)[None, None, :]
    frame = (vid * 7 + t + 2 * h + 3 * w) % CODES
    return np.broadcast_to(frame, (n_views, n, 4, 4)).astype(np.uint16)


@pytest.fixture
def corpus(root):
    Catalog(root).ensure_tables()
    write_shard(root, "pre", 0, list(range(0, 6)), codebook=CODES, make_tokens=learnable_tokens)
    write_shard(root, "pre", 1, list(range(6, 12)), codebook=CODES, make_tokens=learnable_tokens)
    return root


def micro_cfg(*overrides: str) -> PretrainConfig:
    return build(PretrainConfig, preset("pretrain", "micro"), list(overrides))


def _env() -> dict[str, str]:
    # One thread everywhere: identical float reductions in every process we compare.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_gives_the_single_process_update(tmp_path):
    single = subprocess.run([sys.executable, str(WORKERS), "step", str(tmp_path)], env=_env(), capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKERS),
                          "step", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=180)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = torch.load(tmp_path / "step-world1.pt")
    two = torch.load(tmp_path / "step-world2.pt")
    # float64 in both: anything but rounding noise would be a wrong loss scale, a missing
    # negative or per-rank BatchNorm statistics.
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-10 * one["grad_norm"]
    moved = 0
    for name, update in one["update"].items():
        assert torch.allclose(update, two["update"][name], atol=1e-11, rtol=0), f"{name} differs between 1 and 2 processes"
        moved += int(update.abs().max() > 1e-6)
    assert moved > 10, "the step changed the weights"
    bn = [k for k in one["params"] if k.endswith("running_var")]
    assert bn and all(torch.allclose(one["params"][k], two["params"][k], atol=1e-11) for k in bn)


def test_accumulated_micro_steps_update_like_one_batch():
    cfg = B.micro()
    torch.manual_seed(0)
    reference = VIMPACPretrainer(PretrainModelConfig(backbone=cfg, objective="mp"))
    accumulated = VIMPACPretrainer(PretrainModelConfig(backbone=cfg, objective="mp"))
    accumulated.load_state_dict(reference.state_dict())
    micro = global_micro_batches(cfg)
    big = [{k: torch.cat([b[k] for b in micro]) for k in micro[0]}]
    for model, batches in ((reference, big), (accumulated, micro)):
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
        train_step(model, opt, batches, device=torch.device("cpu"), amp=False, grad_clip=1.0)
    for (name, a), b in zip(reference.named_parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_weight_decay_spares_biases_norms_and_cls_and_schedule_is_linear():
    model = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), cl_hidden=16, cl_dim=8))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and no_decay["weight_decay"] == 0.0
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.cls", "backbone.embed_norm.weight", "token_head.bias"} <= exempt
    assert any(n.endswith("qkv.bias") for n in exempt) and not any(n.endswith("qkv.weight") for n in exempt)
    assert "backbone.embedding.weight" in {names[id(p)] for p in decay["params"]}
    factors = [lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0 and factors[-1] == pytest.approx(1 / 16)
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))


def _losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses_exactly(corpus, tmp_path):
    sets = ["train.epochs=6", "model.dropout=0.1", "train.checkpoint_every=1", "train.log_every=1", "data.workers=0"]
    home = str(corpus.home)

    def start(metrics: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKERS), "run", home, str(metrics), *sets], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    reference_log = tmp_path / "reference.jsonl"
    ref = start(reference_log)
    assert ref.wait(timeout=180) == 0, ref.stdout.read()[-3000:]
    reference = _losses(reference_log)
    total = max(reference)
    assert total >= 12
    ckpts = list((corpus.home / "checkpoints" / "pretrain").iterdir())
    for run_dir in ckpts:  # forget the finished run: the next one must train again
        for f in run_dir.iterdir():
            f.unlink()

    killed_log = tmp_path / "killed.jsonl"
    victim = start(killed_log)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed_log.exists() or len(_losses(killed_log)) < 5):
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = len(_losses(killed_log))
    assert 5 <= done_before < total, "killed mid-run"

    resumed_log = tmp_path / "resumed.jsonl"
    again = start(resumed_log)
    out, _ = again.communicate(timeout=180)
    assert again.returncode == 0, out[-3000:]
    assert "resuming" in out
    resumed = _losses(resumed_log)
    first = min(resumed)
    assert 2 <= first <= done_before + 1 and max(resumed) == total
    for s, loss in resumed.items():
        assert loss == reference[s], f"step {s}: resumed {loss!r} vs uninterrupted {reference[s]!r}"
    for s, loss in _losses(killed_log).items():
        assert loss == reference[s]


def test_finished_run_is_cached_forced_runs_again_and_max_steps_resumes(corpus):
    cfg = micro_cfg("train.epochs=2")
    partial = pretrain(corpus, ["pre"], cfg, max_steps=2)
    assert partial.steps == 2 and partial.checkpoint.name == "last.pt"
    rep = RecordingReporter()
    full = pretrain(corpus, ["pre"], cfg, reporter=rep)
    assert "resuming" in rep.text() and full.steps == 6 and full.checkpoint.name == "final.pt" and not full.cached
    assert full.run_name == "micro-5x32-mp+cl"
    assert {"eval_mask_acc", "eval_mask_acc_baseline", "eval_cl_acc", "loss", "mask_acc", "cl_loss", "lr"} <= set(full.metrics)
    again = pretrain(corpus, ["pre"], cfg)
    assert again.cached and again.checkpoint == full.checkpoint
    forced = pretrain(corpus, ["pre"], cfg, force=True)
    assert not forced.cached and forced.steps == 6
    model, meta = load_pretrained(full.checkpoint)
    assert meta["tokenizer"] == "ckpt:aaaaaaaaaaaaaaaa" and meta["datasets"] == ["pre"] and len(meta["shards"]) == 2
    assert model.config.backbone.n_codes == CODES and model.config.backbone.grid == 4


def test_init_from_continues_at_more_frames(corpus):
    first = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1"))
    rep = RecordingReporter()
    second = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "data.frames=8", f"train.init_from={first.checkpoint}"),
                      reporter=rep)
    model, _ = load_pretrained(second.checkpoint)
    assert model.backbone.pos_t.shape[0] == 8 and "interpolated" in rep.text()
    assert second.run_name == "micro-8x32-mp+cl"


def _learnable_8x8(vid: int, n: int, n_views: int) -> np.ndarray:
    t, h, w = np.arange(n)[:, None, None], np.arange(8)[None, :, None], np.arange(8)[None, None, :]
    return np.broadcast_to((vid * 7 + t + 2 * h + 3 * w) % CODES, (n_views, n, 8, 8)).astype(np.uint16)


def _lrs(rep: RecordingReporter) -> list[float]:
    return [values["lr"] for values, _ in rep.metric_log if "lr" in values]


def test_second_phase_continues_the_schedule_at_a_bigger_grid(corpus):
    """The paper's 256 px phase (Sec. 4.1): the last epochs of the same schedule at a larger S,
    with the optimizer's state, as one recipe."""
    from stages.pretrain.train import _carry_moments, _continue_from

    # The same 12 videos tokenized a second time at S = 64: an 8 x 8 grid instead of 4 x 4.
    write_shard(corpus, "pre", 0, list(range(0, 6)), codebook=CODES, size=64, grid=(8, 8), make_tokens=_learnable_8x8)
    write_shard(corpus, "pre", 1, list(range(6, 12)), codebook=CODES, size=64, grid=(8, 8), make_tokens=_learnable_8x8)
    whole_rep, first_rep, second_rep = RecordingReporter(), RecordingReporter(), RecordingReporter()
    whole = pretrain(corpus, ["pre"], micro_cfg("train.epochs=2", "data.size=32", "train.warmup=3"), reporter=whole_rep)
    first = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "train.schedule_epochs=2", "data.size=32", "train.warmup=3"),
                     reporter=first_rep)
    second = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "data.size=64", f"train.continue_from={first.checkpoint}"),
                      reporter=second_rep)
    assert first.steps + (second.steps - first.steps) == whole.steps and 0 < first.steps < second.steps
    # One learning-rate curve: warm-up and decay of the two-epoch run, split between the phases.
    assert _lrs(first_rep) + _lrs(second_rep) == pytest.approx(_lrs(whole_rep))
    assert second.run_name == "micro-5x32+5x64-mp+cl" and first.run_name == "micro-5x32-mp+cl"
    model, meta = load_pretrained(second.checkpoint)
    assert model.backbone.config.grid == 8 and meta["continued_from"]["run_key"] == first.run_key
    assert meta["continued_from"]["step"] == first.steps
    assert "optimizer" not in torch.load(second.checkpoint, weights_only=True)  # the schedule is complete

    # Adam's moments come over for every parameter whose shape is unchanged; the resized tables start fresh.
    saved = torch.load(first.checkpoint, weights_only=True)["optimizer"]["state"]
    fresh = VIMPACPretrainer(model.config)
    phase, saved_state = _continue_from(fresh, str(first.checkpoint), RecordingReporter())
    optimizer = torch.optim.AdamW(param_groups(fresh, 0.05), lr=1e-3)
    _carry_moments(optimizer, saved_state, phase, RecordingReporter())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in fresh.named_parameters()}
    resized = {i for i, p in enumerate(params) if names[id(p)] in ("backbone.pos_h", "backbone.pos_w")}
    assert len(resized) == 2
    for i, p in enumerate(params):
        state = optimizer.state.get(p)
        if i in resized:
            assert not state
        else:
            assert torch.equal(state["exp_avg"], saved[i]["exp_avg"]) and torch.equal(state["exp_avg_sq"], saved[i]["exp_avg_sq"])


def test_continue_from_refuses_a_run_whose_schedule_is_complete(corpus):
    done = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1"))
    with pytest.raises(ConfigError, match="not the end of a pretraining phase"):
        pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", f"train.continue_from={done.checkpoint}"))


def test_validation_videos_are_held_out_of_every_training_batch(corpus, monkeypatch):
    """Table 6-16's Mask-Accu. / CL-Loss are measured on videos the model never trained on."""
    import stages.pretrain.train as T

    trained, validated = set(), set()
    real_step, real_eval = T.train_step, T.evaluate

    def recording_step(net, optimizer, micro, **kwargs):
        for b in micro:
            trained.update(b["keys"])
        return real_step(net, optimizer, micro, **kwargs)

    def recording_eval(model, loader, *args):
        for b in loader.epoch(0):
            validated.update(b["keys"])
        return real_eval(model, loader, *args)

    monkeypatch.setattr(T, "train_step", recording_step)
    monkeypatch.setattr(T, "evaluate", recording_eval)
    rep = RecordingReporter()
    result = pretrain(corpus, ["pre"], micro_cfg("train.epochs=3", "validation.holdout=0.25", "validation.every=2"), reporter=rep)
    held = set(json.loads(json.dumps(load_pretrained(result.checkpoint)[1]["validation"]["videos"])))
    assert len(held) == 3 and validated == held  # ceil(0.25 x 12) videos, and only those are validated on
    assert trained and not trained & held and len(trained) == 9
    assert "3 videos held out of training" in rep.text()
    # Every `validation.every` steps and at the end, with the metrics the paper's tables report.
    logged = [step for values, step in rep.metric_log if "eval_mask_acc" in values]
    assert logged == list(range(2, result.steps, 2)) + [result.steps]
    final = result.metrics
    assert {"eval_mask_acc", "eval_mask_loss", "eval_cl_loss", "eval_cl_acc"} <= set(final)


def _static_tokens(vid: int, n: int, n_views: int) -> np.ndarray:
    h, w = np.arange(4)[:, None], np.arange(4)[None, :]
    return np.broadcast_to((vid * 7 + 2 * h + 3 * w) % CODES, (n_views, n, 4, 4)).astype(np.uint16)


@pytest.mark.parametrize("kind", ["static", "moving"])
def test_validation_reports_the_copy_baseline_and_accuracy_beyond_it(root, kind):
    """In a static video copying the same position from a frame that shows it is right (it fails
    only where the union of blocks covers every frame); when every token changes from frame to
    frame copying is never right and all of the model's hits are beyond it."""
    Catalog(root).ensure_tables()
    make = _static_tokens if kind == "static" else learnable_tokens
    write_shard(root, "pre", 0, list(range(0, 6)), codebook=CODES, make_tokens=make)
    write_shard(root, "val", 0, list(range(6, 10)), codebook=CODES, make_tokens=make)
    m = pretrain(root, ["pre"], micro_cfg("train.epochs=2", "validation.datasets=[val]")).metrics
    if kind == "static":
        assert m["eval_copy_acc"] > 0.9
    else:
        assert m["eval_copy_acc"] == 0.0 and m["eval_mask_acc_uncopyable"] == pytest.approx(m["eval_mask_acc"])


def test_validation_on_another_dataset_trains_on_every_video(corpus):
    write_shard(corpus, "val", 0, list(range(20, 24)), codebook=CODES, make_tokens=learnable_tokens)
    rep = RecordingReporter()
    result = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "validation.datasets=[val]"), reporter=rep)
    assert "4 videos of val" in rep.text() and "12 videos in 2 shards" in rep.text()
    assert 0 <= result.metrics["eval_mask_acc"] <= 1


def test_ctrl_c_saves_the_position_and_the_next_run_continues(corpus, monkeypatch):
    import stages.pretrain.train as T

    calls = {"n": 0}
    real = T.train_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C in the middle of step 4: the step finishes, then the run stops
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    cfg = micro_cfg("train.epochs=2", "train.checkpoint_every=100")  # no periodic checkpoint in 6 steps
    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(corpus, ["pre"], cfg)
    monkeypatch.setattr(T, "train_step", real)
    rep = RecordingReporter()
    result = pretrain(corpus, ["pre"], cfg, reporter=rep)
    assert "resuming" in rep.text() and "at step 4/6" in rep.text() and result.steps == 6


def test_models_command_lists_presets_and_mask_blocks(capsys):
    from flows.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "29.44M" in out and "119.75M" in out and "210.10M" in out
    assert "5 x 16 x 16" in out and "14.4%" in out and "10 x 32 x 32" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_training_matches_eager_and_saves_plain_keys(corpus):
    eager = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1"))
    # `compile` changes how, not what: same run key, so force it to train again.
    compiled = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "train.compile=true"), force=True)
    assert not compiled.cached
    assert compiled.metrics["loss"] == pytest.approx(eager.metrics["loss"], rel=1e-3)
    load_pretrained(compiled.checkpoint)  # loads into a plain model: no torch.compile key prefixes left


def test_objectives_and_masking_options_train(corpus):
    for sets in (["model.objective=mp"], ["model.objective=cl"], ["masking.strategy=iid", "masking.replacement=bert"],
                 ["model.layout=T,H,W", "model.norm=pre"]):
        result = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", *sets))
        assert np.isfinite(result.metrics["loss"])
    tube = pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "masking.strategy=tube"))
    assert tube.run_name.endswith("-tube")
    # Tubes hide a position in every frame: the copy-paste answer never has a visible frame to copy.
    assert tube.metrics["eval_copy_acc"] == 0.0
    assert tube.metrics["eval_mask_acc_uncopyable"] == pytest.approx(tube.metrics["eval_mask_acc"])
    assert "eval_cl_acc" not in pretrain(corpus, ["pre"], micro_cfg("train.epochs=1", "model.objective=mp")).metrics


def test_missing_tokens_and_bad_settings_are_clear_errors(corpus):
    with pytest.raises(ConfigError, match="nope"):
        pretrain(corpus, ["nope"], micro_cfg())
    with pytest.raises(ConfigError, match="heads"):
        pretrain(corpus, ["pre"], micro_cfg("model.layout=T,H|W|T"))
    with pytest.raises(ConfigError, match="init_from"):
        pretrain(corpus, ["pre"], micro_cfg("train.init_from=/does/not/exist.pt"))


@pytest.mark.slow
def test_pretrain_flow_streams_metrics_and_registers_the_backbone(prefect_harness, corpus):
    from mlflow.tracking import MlflowClient

    from flows.pretrain import pretrain as pretrain_flow
    from stages.config import DatasetConfig

    # Loader workers inside a Prefect flow: a plain fork of this process kills them at exit.
    cfg = micro_cfg("train.epochs=2", "register_as=test-backbone", "data.workers=2")
    summary = pretrain_flow(DatasetConfig(name="pre", source="/unused"), cfg, str(corpus.home))
    assert summary["model_uri"] == "models:/test-backbone/1" and summary["run_name"] == "micro-5x32-mp+cl"
    client = MlflowClient()
    version = client.get_model_version("test-backbone", "1")
    assert version.tags["vimpac.tokenizer"] == "ckpt:aaaaaaaaaaaaaaaa" and version.tags["vimpac.datasets"] == "pre"
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.runName"] == "pretrain-micro-5x32-mp+cl"
    history = client.get_metric_history(run.info.run_id, "mask_acc")
    assert {m.step for m in history} >= set(range(1, 7)), "a point per logged step, live"
    for key in ("loss", "mask_loss", "cl_loss", "cl_acc", "lr", "grad_norm", "videos_per_s", "tokens_per_s", "data_wait_frac"):
        assert key in run.data.metrics, key
    again = pretrain_flow(DatasetConfig(name="pre", source="/unused"), cfg, str(corpus.home))
    assert again["cached"] and again["model_uri"] == summary["model_uri"]


@pytest.mark.slow
def test_torchrun_launch_of_the_cli_trains_on_two_ranks(corpus, tmp_path):
    """The command the README gives for many GPUs, on 2 CPU processes with gloo: rank 0 runs
    the Prefect flow and tracks the run, rank 1 trains alongside without Prefect or MLflow."""
    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in _env().items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIMPAC_"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flows.cli",
           "run", "pretrain", "--home", str(corpus.home), "--dataset", "pre", "--preset", "micro",
           "--set", "train.epochs=2", "--set", "register_as=ddp-backbone"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    assert summary["model_uri"] == "models:/ddp-backbone/1"
    _, meta = load_pretrained(summary["checkpoint"])
    assert meta["world_size"] == 2 and meta["steps"] == 4  # 12 videos / (4 x 2 ranks) = 2 batches per epoch
    runs = Catalog(corpus).rows("SELECT status FROM runs WHERE stage = 'pretrain'")
    assert runs == [("completed",)], "one tracked run, from rank 0 only"
    client = MlflowClient(tracking_uri=f"sqlite:///{corpus.home / 'mlflow' / 'mlflow.db'}",
                          registry_uri=f"sqlite:///{corpus.home / 'mlflow' / 'mlflow.db'}")
    assert client.get_model_version("ddp-backbone", "1").tags["vimpac.datasets"] == "pre"


def test_exclude_split_keeps_a_labeled_sets_test_videos_out_and_fine_tuning_warns_when_they_were_in(root, monkeypatch):
    """VideoMAE's protocol, pretraining on a downstream set's own videos without their labels: the
    evaluation videos of the chosen split never reach a training batch, the checkpoint records it,
    and a backbone that did see a split's evaluation videos makes that split's results warn."""
    import stages.pretrain.train as T
    from finetune_fixtures import labeled_dataset
    from stages.config import FinetuneConfig
    from stages.finetune.train import ModelSource, finetune_cell, load_pretrained_backbone

    info = labeled_dataset(root, "toy")  # 18 videos; split set k tests 6 of them
    write_shard(root, "pre", 0, list(range(0, 6)), codebook=CODES, make_tokens=learnable_tokens)
    keys = dict(Catalog(root).rows("SELECT video_id, key FROM token_samples WHERE dataset = 'toy'"))
    test_of = {k: {f"toy/{keys[v]}" for v, (_, _, splits) in info.items() if splits[k - 1] == "test"} for k in (1, 2)}
    assert len(test_of[1]) == 6 and not test_of[1] & test_of[2]

    trained: set[str] = set()
    real_step = T.train_step

    def recording_step(net, optimizer, micro, **kwargs):
        for b in micro:
            trained.update(b["keys"])
        return real_step(net, optimizer, micro, **kwargs)

    monkeypatch.setattr(T, "train_step", recording_step)
    rep = RecordingReporter()
    cfg = micro_cfg("train.epochs=3", "validation.holdout=0", "data.exclude_split=1")
    result = pretrain(root, ["pre", "toy"], cfg, reporter=rep)
    toy_trained = {k for k in trained if k.startswith("toy/")}
    assert toy_trained and not toy_trained & test_of[1] and toy_trained & test_of[2]
    assert len(toy_trained) == 12 and "the 6 evaluation videos of toy split 1 are left out" in rep.text()
    assert "18 videos in" in rep.text()  # 6 + 18 - 6

    backbone = load_pretrained_backbone(ModelSource(str(result.checkpoint), result.checkpoint))
    assert backbone.transductive_warning("toy", "1") is None
    assert "transductive" in backbone.transductive_warning("toy", "2") and backbone.transductive_warning("pre-only", "1") is None
    whole = pretrain(root, ["pre", "toy"], micro_cfg("train.epochs=1", "validation.holdout=0"))
    seen_all = load_pretrained_backbone(ModelSource(str(whole.checkpoint), whole.checkpoint))
    assert "data.exclude_split=1" in seen_all.transductive_warning("toy", "1")
    ft = build(FinetuneConfig, preset("finetune", "micro"), ["train.epochs=1"])
    cell = finetune_cell(root, ModelSource(str(whole.checkpoint), whole.checkpoint), "toy", "1", ft, preset="micro")
    assert any("transductive" in w for w in cell.warnings), "the result row carries the warning"

    with pytest.raises(ConfigError, match="none of the pretraining datasets"):
        pretrain(root, ["pre"], micro_cfg("train.epochs=1", "data.exclude_split=1"))
    with pytest.raises(ConfigError, match="split 4 does not exist"):
        pretrain(root, ["pre", "toy"], micro_cfg("train.epochs=1", "data.exclude_split=4"))
