"""Tokenizer training on real frame shards: learning, caching, exact resume, checkpoint errors."""

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
from stages.tokenizer.train import load_checkpoint, train_tokenizer
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

SIZE = 32


def textured_clip(path: Path, seed: int, seconds: float = 4.0, fps: int = 12) -> Path:
    """A smooth colour texture panning under the camera with a bright square moving across it."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((96, 96), Image.BILINEAR))  # (96, 96, 3)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    vy, vx = rng.uniform(-1.5, 1.5, 2)
    sy, sx = rng.uniform(8, 48, 2)

    def frames():
        for i in range(int(seconds * fps)):
            oy, ox = int(16 + vy * i) % 32, int(16 + vx * i) % 32
            frame = texture[oy : oy + 64, ox : ox + 64].copy()
            y, x = int(sy + 1.2 * i) % 52, int(sx + 0.8 * i) % 52
            frame[y : y + 12, x : x + 12] = colour
            yield frame

    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video(frames(), path, fps=fps)


def build_dataset(root: DataRoot, src: Path, name: str, n: int) -> None:
    for i in range(n):
        textured_clip(src / f"t{i:02d}.mp4", seed=i)
    ds = DatasetConfig(name=name, source=str(src))
    Catalog(root).refresh()
    run_ingest(root, ds, IngestConfig(workers=2, batch_size=4), run_id="ingest-test")
    run_frames(root, ds, FramesConfig(fps=4.0, size=SIZE, views="pretrain", workers=2, shard_target_mb=0.02),
               run_id="frames-test", reporter=RecordingReporter())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataRoot:
    base = tmp_path_factory.mktemp("tok")
    root = DataRoot(base / "home").ensure()
    build_dataset(root, base / "src", "tex", 6)
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
    assert end > base + 1.0 and end > first + 3.0
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
    assert rep2.advanced == 0 and rep2.metric_log == []
    assert (again.run_key, again.metrics, again.checkpoint) == (out.run_key, out.metrics, out.checkpoint)

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
