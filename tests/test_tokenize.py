"""The tokenize stage: token shards per frame shard, caching by tokenizer identity, bad input."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from media_fixtures import make_video
from stages.config import ConfigError, DatasetConfig, FramesConfig, IngestConfig, TokenizeConfig, TokenizerConfig
from stages.frames.stage import run_frames
from stages.ingest.stage import run_ingest
from stages.reporting import RecordingReporter
from stages.tokenize.render import render_tokens
from stages.tokenize.stage import load_tokenizer, run_tokenize
from stages.tokenizer.train import train_tokenizer
from warehouse.catalog import Catalog
from warehouse.shards import read_samples

SIZE = 32


def _dataset(root, tmp_path: Path, name: str, n: int, views: str, seed0: int = 0) -> DatasetConfig:
    src = tmp_path / name
    for i in range(n):
        make_video(src / f"v{i}.mp4", seed=seed0 + i, frames=24, fps=12)
    # Shorter than one 2 fps interval: ingested fine, failed by the frames stage.
    make_video(src / "short.mp4", seed=seed0 + 99, frames=3, fps=12)
    ds = DatasetConfig(name=name, source=str(src))
    Catalog(root).refresh()
    run_ingest(root, ds, IngestConfig(), run_id="i")
    run_frames(root, ds, FramesConfig(fps=2.0, size=SIZE, views=views, workers=2, shard_target_mb=0.01), run_id="f")
    return ds


@pytest.fixture
def setup(root, tmp_path):
    pre = _dataset(root, tmp_path, "pre", 2, "pretrain")
    down = _dataset(root, tmp_path, "down", 2, "downstream", seed0=10)
    cfg = TokenizerConfig(preset="tiny", steps=3, batch_size=4, warmup_steps=1, checkpoint_every=2, log_every=1)
    trained = train_tokenizer(root, ["pre"], cfg, frame_size=SIZE)
    return pre, down, trained, cfg


def tokenize(root, ds, ref, force=False):
    tok = load_tokenizer(str(ref))
    rep = RecordingReporter()
    return run_tokenize(root, ds, TokenizeConfig(tokenizer=str(ref)), tok, run_id="t", force=force, reporter=rep), tok


def test_tokens_are_views_by_frames_by_grid(root, setup):
    pre, down, trained, _ = setup
    outcome, tok = tokenize(root, down, trained.checkpoint)
    assert outcome.errors == [] and outcome.summary["videos"] == 2
    assert outcome.summary["skipped_failed_upstream"] == 1, "frame samples failed upstream are skipped and counted"
    d = tok.model.downsample
    rows = Catalog(root).query("SELECT * FROM token_samples WHERE dataset = 'down' ORDER BY video_id").to_pylist()
    assert [r["video_id"] for r in rows] == ["v0", "v1"]
    for r in rows:
        assert (r["n_views"], r["grid_h"], r["grid_w"]) == (12, SIZE // d, SIZE // d) and r["tokenizer"] == tok.identity
        sample = read_samples(root.absolute(r["shard"]))[r["key"]]
        tokens = np.load(io.BytesIO(sample["tokens.npy"]))
        assert tokens.shape == (12, r["n_frames"], SIZE // d, SIZE // d) and tokens.dtype == np.uint16
        assert int(tokens.max()) < tok.model.codebook_size
        meta = json.loads(sample["json"])
        assert meta["views"][0] == "s100_tl" and meta["frames_shard"].startswith("shards/frames/down/")
    joined = Catalog(root).rows(
        """SELECT count(*) FROM token_samples t JOIN frame_samples f USING (dataset, video_id)
           JOIN videos v USING (dataset, video_id) WHERE t.dataset = 'down' AND v.status = 'ok'"""
    )
    assert joined == [(2,)]


def test_same_tokenizer_no_work_new_tokenizer_new_shards_only(root, setup):
    pre, down, trained, cfg = setup
    first, _ = tokenize(root, pre, trained.checkpoint)
    frames_before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root.home / "shards" / "frames").rglob("*.tar")}
    again, _ = tokenize(root, pre, trained.checkpoint)
    assert again.plan.pending == [] and again.summary["frames"] == 0
    other = train_tokenizer(root, ["pre"], cfg.model_copy(update={"seed": 1}), frame_size=SIZE)
    third, tok2 = tokenize(root, pre, other.checkpoint)
    assert third.summary["shards_built"] == first.summary["shards_built"] and third.summary["shards_cached"] == 0
    frames_after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (root.home / "shards" / "frames").rglob("*.tar")}
    assert frames_after == frames_before, "switching tokenizer never re-decodes frames"
    tokenizers = {r[0] for r in Catalog(root).rows("SELECT DISTINCT tokenizer FROM token_samples WHERE dataset = 'pre'")}
    assert len(tokenizers) == 2 and tok2.identity in tokenizers


def test_corrupt_frame_shard_fails_alone(root, setup):
    pre, down, trained, _ = setup
    tars = sorted((root.home / "shards" / "frames" / "down").rglob("*.tar"), key=lambda p: p.stat().st_size)
    assert len(tars) >= 2
    victim = tars[-1]  # one that holds samples
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    outcome, _ = tokenize(root, down, trained.checkpoint)
    assert len(outcome.errors) == 1 and str(victim) in outcome.errors[0] and "damaged" in outcome.errors[0]
    assert outcome.summary["shards_built"] == len(tars) - 1


def test_incompatible_or_missing_tokenizer_fails_before_work(root, setup, tmp_path):
    pre, down, trained, _ = setup
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.pt"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="garbage.pt"):
        load_tokenizer(str(garbage))
    tok = load_tokenizer(str(trained.checkpoint))
    tok.model.downsample = 7  # a tokenizer whose grid cannot tile 32-px frames
    with pytest.raises(ConfigError, match="does not divide"):
        run_tokenize(root, pre, TokenizeConfig(tokenizer="x"), tok, run_id="t")
    assert not list((root.home / "shards" / "tokens").rglob("*.tar")), "no work was done"


def test_render_tokens_back_to_png(root, setup, tmp_path):
    pre, down, trained, _ = setup
    _, tok = tokenize(root, pre, trained.checkpoint)
    out = render_tokens(root, "pre", "v0", tok, tmp_path / "v0.png")
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] > SIZE and im.size[1] > SIZE
