"""Tokenizer training on real frame shards: learning, caching, exact resume, checkpoint errors,
held-out videos, and the per-dataset evaluation with its warning."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.config import DatasetConfig, FramesConfig, IngestConfig, TokenizerConfig
from stages.frames.read import frame_shards, read_shard
from stages.frames.stage import run_frames
from stages.ingest.stage import run_ingest
from stages.media import encode_video
from stages.reporting import RecordingReporter
from stages.tokenizer.train import (EVAL_FRAMES, _epoch_batches, eval_sample, held_out_videos, load_checkpoint, read_eval_frames,
                                    tokenizer_run, train_tokenizer)
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

SIZE = 32


def textured_clip(path: Path, seed: int, seconds: float = 4.0, fps: int = 12) -> Path:
    """Smooth colour textures panning under the camera, a new one every quarter second, with a
    square moving across them: no detail finer than the tiny preset's 8x8-pixel tokens keep at
    32 px, and enough scenes (one per sampled frame) that a tokenizer trained on a few clips
    generalises to others."""
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    vy, vx = rng.uniform(-1.5, 1.5, 2)
    sy, sx = rng.uniform(8, 48, 2)
    scene = fps // 4

    def frames():
        for i in range(int(seconds * fps)):
            if i % scene == 0:
                coarse = (rng.random((3, 3, 3)) * 255).astype(np.uint8)
                texture = np.asarray(Image.fromarray(coarse).resize((96, 96), Image.BILINEAR))  # (96, 96, 3)
            oy, ox = int(16 + vy * i) % 32, int(16 + vx * i) % 32
            frame = texture[oy : oy + 64, ox : ox + 64].copy()
            y, x = int(sy + 1.2 * i) % 52, int(sx + 0.8 * i) % 52
            frame[y : y + 12, x : x + 12] = colour
            yield frame

    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video(frames(), path, fps=fps)


def noise_clip(path: Path, seed: int, seconds: float = 2.0, fps: int = 12) -> Path:
    """Uniform colour noise in every pixel: nothing a tokenizer can reconstruct better than grey."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video((rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(int(seconds * fps))), path, fps=fps)


def build_dataset(root: DataRoot, src: Path, name: str, n: int, clip=textured_clip) -> None:
    for i in range(n):
        clip(src / f"t{i:02d}.mp4", seed=i)
    ds = DatasetConfig(name=name, source=str(src))
    Catalog(root).refresh()
    run_ingest(root, ds, IngestConfig(workers=2, batch_size=4), run_id="ingest-test")
    run_frames(root, ds, FramesConfig(fps=4.0, size=SIZE, views="pretrain", workers=2, shard_target_mb=0.02),
               run_id="frames-test", reporter=RecordingReporter())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataRoot:
    base = tmp_path_factory.mktemp("tok")
    root = DataRoot(base / "home").ensure()
    build_dataset(root, base / "src", "tex", 8)
    build_dataset(root, base / "noise-src", "noise", 3, clip=noise_clip)
    return root


def tiny(**kw) -> TokenizerConfig:
    settings = {"preset": "tiny", "steps": 250, "batch_size": 16, "lr": 2e-3, "warmup_steps": 10, "shuffle_buffer": 64,
                "checkpoint_every": 50, "log_every": 10, "device": "cpu"} | kw
    return TokenizerConfig(**settings)


class StopAt(RecordingReporter):
    """Simulates a kill: raises when metrics for `stop` are reported."""

    def __init__(self, stop: int):
        super().__init__()
        self.stop = stop

    def metrics(self, values, step=None):
        super().metrics(values, step)
        if step == self.stop:
            raise KeyboardInterrupt(f"killed at step {step}")


def test_psnr_rises_and_beats_the_mean_frame_baseline_then_caches(data):
    assert len(frame_shards(data, "tex")) >= 2, "the stream must cross shards"
    rep = RecordingReporter()
    t0 = time.perf_counter()
    out = train_tokenizer(data, ["tex"], tiny(), reporter=rep)
    train_s = time.perf_counter() - t0
    logged = {step: m for m, step in rep.metric_log if "psnr" in m}
    first, end, base = logged[1]["psnr"], out.metrics["psnr"], out.metrics["baseline_psnr"]
    print(f"\ntiny preset, {SIZE}px, batch 16: {train_s / out.steps * 1000:.0f} ms/step; "
          f"PSNR step 1 {first:.2f} dB -> end {end:.2f} dB, mean-frame baseline {base:.2f} dB")
    assert not out.cached and out.steps == 250 and out.checkpoint.name == "final.pt"
    assert end > base + 3.0 and end > first + 3.0 and out.warnings == []
    # The overall figures are those of the training dataset's held-out videos (2 of 8), 16 frames each.
    assert out.evaluation["tex"]["held_out"] and out.evaluation["tex"]["videos"] == 2 and out.evaluation["tex"]["frames"] == 32
    assert out.metrics["psnr/tex"] == end and out.metrics["baseline_psnr/tex"] == base
    assert set(logged) == {1, *range(10, 251, 10)}
    assert {"loss", "recon_loss", "commit_loss", "psnr", "usage", "perplexity", "lr"} <= set(logged[10])
    assert 0 < out.metrics["usage"] <= 1 and out.metrics["perplexity"] > 1
    assert rep.advanced == 250 and out.grid_png in rep.artifacts
    with Image.open(out.grid_png) as grid:
        assert grid.size[0] > 8 * SIZE and grid.size[1] > 2 * SIZE
    assert out.checkpoint.parent == data.home / "checkpoints" / "tokenizer" / out.run_key
    assert not (out.checkpoint.parent / "last.pt").exists()

    rep2 = RecordingReporter()
    t0 = time.perf_counter()
    again = train_tokenizer(data, ["tex"], tiny(log_every=7, checkpoint_every=3), reporter=rep2)  # operational changes only
    assert again.cached and time.perf_counter() - t0 < 2.0
    assert rep2.advanced == 0 and rep2.metric_log == []  # the evaluation stored with the run is reused too
    assert (again.run_key, again.metrics, again.checkpoint, again.evaluation) == (out.run_key, out.metrics, out.checkpoint, out.evaluation)

    changed = train_tokenizer(data, ["tex"], tiny(steps=2, seed=1), reporter=RecordingReporter())
    assert not changed.cached and changed.run_key != out.run_key and changed.data_fingerprint == out.data_fingerprint

    # The round trip gives the same tokens as the model that was trained.
    model = load_checkpoint(out.checkpoint)
    shard = frame_shards(data, "tex")[0]
    frames = next(read_shard(data, shard, views=["s100_c"])).views["s100_c"]  # (T, S, S, 3)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    again_model = load_checkpoint(again.checkpoint)
    assert torch.equal(model.encode(x), again_model.encode(x))
    assert model.encode(x).shape == (len(frames), SIZE // 8, SIZE // 8)


def test_resume_after_a_kill_matches_an_uninterrupted_run(data):
    cfg = tiny(steps=40, checkpoint_every=10, log_every=5, warmup_steps=5)
    whole = train_tokenizer(data, ["tex"], cfg, reporter=RecordingReporter())
    reference = torch.load(whole.checkpoint, weights_only=True)
    shutil.rmtree(whole.checkpoint.parent)

    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(data, ["tex"], cfg, reporter=StopAt(25))
    run_dir = whole.checkpoint.parent
    assert (run_dir / "last.pt").exists() and not (run_dir / "final.pt").exists()
    assert torch.load(run_dir / "last.pt", weights_only=True)["step"] == 20

    rep = RecordingReporter()
    resumed = train_tokenizer(data, ["tex"], cfg, reporter=rep)
    assert "resuming at step 20" in rep.text() and rep.advanced == 40
    assert [s for _, s in rep.metric_log] == [25, 30, 35, 40, 40]
    got = torch.load(resumed.checkpoint, weights_only=True)
    assert got["model"].keys() == reference["model"].keys()
    for key, tensor in reference["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    assert got["metadata"]["metrics"] == reference["metadata"]["metrics"]


@pytest.mark.parametrize("cpu_bf16, amp, trains_in_bf16", [(True, True, True), (False, True, False), (True, False, False)])
def test_training_on_a_cpu_uses_bf16_autocast_only_where_the_cpu_has_bf16_units(data, monkeypatch, cpu_bf16, amp, trains_in_bf16):
    """A CPU without bf16 units would emulate it (slower than fp32); evaluation, like the tokenize
    stage on a CPU, stays fp32 either way, so the reported PSNR is that of the tokens users get."""
    from stages.tokenizer import train as stage

    training, evaluation = [], []
    loss, evaluate_frames = stage.ReconstructionObjective.loss, stage.evaluate_frames

    def spy_loss(self, net, batch, context, k):
        training.append(torch.is_autocast_enabled("cpu"))
        return loss(self, net, batch, context, k)

    def spy_evaluate(model, frames, device, amp=False, **kw):
        evaluation.append(amp)
        return evaluate_frames(model, frames, device, amp, **kw)

    monkeypatch.setattr(stage, "cpu_has_bf16", lambda: cpu_bf16)
    monkeypatch.setattr(stage.ReconstructionObjective, "loss", spy_loss)
    monkeypatch.setattr(stage, "evaluate_frames", spy_evaluate)
    rep = RecordingReporter()
    out = train_tokenizer(data, ["tex"], tiny(steps=3, amp=amp), reporter=rep, force=True)
    assert out.steps == 3 and training == [trains_in_bf16] * 3 and evaluation and not any(evaluation)
    assert ("bf16 autocast" if trains_in_bf16 else "on cpu, fp32") in rep.text()


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ValueError, match="nope.pt"):
        load_checkpoint(missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="garbage.pt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="foreign.pt"):
        load_checkpoint(foreign)
    wrong = tmp_path / "wrong.pt"
    torch.save({"format": "vimpac-tokenizer", "model": {"x": torch.zeros(1)}, "model_config": {"codebook_size": 4}}, wrong)
    with pytest.raises(ValueError, match="wrong.pt"):
        load_checkpoint(wrong)


def test_datasets_without_usable_frames_are_named(data):
    with pytest.raises(ValueError, match="'nothing-here'"):
        train_tokenizer(data, ["tex", "nothing-here"], tiny(steps=1))
    with pytest.raises(ValueError, match="size 48"):
        train_tokenizer(data, ["tex"], tiny(steps=1, size=48))


def test_frame_size_must_fit_the_downsample(tmp_path):
    root = DataRoot(tmp_path / "home").ensure()
    src = tmp_path / "src"
    textured_clip(src / "a.mp4", seed=0, seconds=1.0)
    ds = DatasetConfig(name="odd", source=str(src))
    Catalog(root).refresh()
    run_ingest(root, ds, IngestConfig(workers=1), run_id="ingest-test")
    run_frames(root, ds, FramesConfig(fps=4.0, size=20, views="pretrain", workers=1), run_id="frames-test", reporter=RecordingReporter())
    with pytest.raises(ValueError, match=r"frame size 20 .* downsample factor 8"):
        train_tokenizer(root, ["odd"], tiny(steps=1))


def test_per_dataset_psnr_and_a_warning_for_frames_it_cannot_reconstruct(data):
    """Evaluating on another dataset is a report: same run key, no training; noise frames (which
    no tokenizer beats the mean frame on) get a warning naming them, the training data none."""
    plain = train_tokenizer(data, ["tex"], tiny(), reporter=RecordingReporter())
    rep = RecordingReporter()
    out = train_tokenizer(data, ["tex"], tiny(), reporter=rep, evaluate_on=["noise", "tex"])
    assert out.cached and out.run_key == plain.run_key == tokenizer_run(data, ["tex"], tiny()).run_key
    assert list(out.evaluation) == ["tex", "noise"]
    tex, noise = out.evaluation["tex"], out.evaluation["noise"]
    print(f"\ntex {tex['psnr']:.2f} dB (mean frame {tex['baseline_psnr']:.2f}), noise {noise['psnr']:.2f} dB "
          f"(mean frame {noise['baseline_psnr']:.2f})")
    assert tex["psnr"] > tex["baseline_psnr"] + 3 and noise["psnr"] < noise["baseline_psnr"] + 3
    assert noise["held_out"] and noise["videos"] == 3 and noise["frames"] == 3 * 8  # every frame: fewer than 64
    assert out.metrics["psnr/noise"] == noise["psnr"] and out.metrics["baseline_psnr/noise"] == noise["baseline_psnr"]
    assert out.metrics["psnr"] == plain.metrics["psnr"]  # the overall figures stay the training data's
    warnings = [m for level, m in rep.messages if level == "warning"]
    assert len(warnings) == 1 and "noise" in warnings[0] and "within 3 dB" in warnings[0] and out.warnings == warnings
    logged = {k for m, _ in rep.metric_log for k in m}
    assert {"eval_psnr/noise", "eval_baseline_psnr/noise", "eval_psnr/tex"} <= logged
    with Image.open(out.grid_png) as grid:  # one block (caption, originals, reconstructions) per dataset
        assert grid.size[1] > 4 * SIZE

    # Asked again: the stored figures, no model run, the warning again.
    rep2 = RecordingReporter()
    again = train_tokenizer(data, ["tex"], tiny(), reporter=rep2, evaluate_on=["noise", "tex"])
    assert again.evaluation == out.evaluation and rep2.metric_log == [] and again.warnings == warnings
    # A dataset without frames of the tokenizer's size is skipped with a warning, not an error.
    rep3 = RecordingReporter()
    train_tokenizer(data, ["tex"], tiny(), reporter=rep3, evaluate_on=["nothing-here"])
    assert any("cannot evaluate nothing-here" in m for level, m in rep3.messages if level == "warning")


def test_held_out_videos_are_never_trained_on_and_evaluation_frames_are_fixed(data):
    shards = frame_shards(data, "tex")
    held = held_out_videos(data, ["tex"], shards, 4)["tex"]
    assert len(held) == 2  # at most a quarter of 8 videos
    assert held_out_videos(data, ["tex"], shards, 1)["tex"] == held[:1]  # a fixed order, not a fresh draw
    assert held_out_videos(data, ["tex"], shards, 0)["tex"] == []
    assert held_out_videos(data, ["noise"], frame_shards(data, "noise"), 4)["noise"] == []  # 3 videos: too few

    def stream(skip):
        batches = _epoch_batches(data, shards, "s100_c", 1, 4, np.random.default_rng(0), skip)
        return np.concatenate(list(batches))

    every, trained = stream(None), stream({"tex": held})
    per_video = {v.meta["video_id"]: v.views["s100_c"] for s in shards for v in read_shard(data, s, views=["s100_c"])}
    assert len(every) == sum(len(f) for f in per_video.values())
    assert len(trained) == len(every) - sum(len(per_video[v]) for v in held)
    held_frames = {f.tobytes() for v in held for f in per_video[v]}
    assert not any(f.tobytes() in held_frames for f in trained)

    # A training dataset is evaluated on its held-out videos; any other on all of its videos.
    sample = eval_sample(data, "tex", shards, "s100_c", trained_on=True, held_out=held)
    assert sorted(v for v, _ in sample.videos) == sorted(held) and sample.held_out
    other = eval_sample(data, "tex", shards, "s100_c", trained_on=False, held_out=[])
    assert sorted(v for v, _ in other.videos) == sorted(per_video) and other.held_out
    in_sample = eval_sample(data, "tex", shards, "s100_c", trained_on=True, held_out=[])
    assert not in_sample.held_out and len(in_sample.videos) == 8
    first, second = read_eval_frames(data, other, "s100_c"), read_eval_frames(data, other, "s100_c")
    assert first.shape == (EVAL_FRAMES, SIZE, SIZE, 3) and np.array_equal(first, second)
    # Spread over every video: 8 frames of each of the 8.
    assert sum(any(np.array_equal(f, g) for g in per_video[v]) for v, _ in other.videos[:1] for f in first) == 8
    assert eval_sample(data, "tex", shards, "s100_c", trained_on=False, held_out=[]).key == other.key != sample.key
