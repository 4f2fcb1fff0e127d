"""The pretrain-pixels stage (ST-MAE on pixel clips from frame shards): it learns beyond the
trivial predictor, caches, resumes exactly, splits videos between ranks, and cuts clips as told."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from stages.config import PixelPretrainConfig, build, preset
from stages.media import encode_video
from stages.pretrain.pixels import MEAN, STD, PixelClips, load_st_mae, pixel_run, pretrain_pixels, sample_clip
from stages.reporting import RecordingReporter
from test_tokenizer_train import SIZE, build_dataset
from warehouse.layout import DataRoot


def scene_clip(path, seed: int, seconds: float = 4.0, fps: int = 12):
    """One smooth colour scene per video, panning slowly, with a square moving across it: what
    a masked tubelet hides is in its neighbours in space and time."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((3, 3, 3)) * 255).astype(np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((96, 96), Image.BILINEAR))  # (96, 96, 3)
    colour = rng.integers(0, 256, 3, dtype=np.uint8)
    sy, sx = rng.uniform(8, 48, 2)

    def frames():
        for i in range(int(seconds * fps)):
            frame = texture[16 + i // 4 : 80 + i // 4, 16:80].copy()
            y, x = int(sy + 1.2 * i) % 52, int(sx + 0.8 * i) % 52
            frame[y : y + 12, x : x + 12] = colour
            yield frame

    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video(frames(), path, fps=fps)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> DataRoot:
    base = tmp_path_factory.mktemp("pix")
    root = DataRoot(base / "home").ensure()
    build_dataset(root, base / "src", "tex", 8, clip=scene_clip)
    return root


def micro(*overrides: str) -> PixelPretrainConfig:
    return build(PixelPretrainConfig, preset("pretrain-pixels", "micro"),
                 ["data.holdout_videos=2", "train.device=cpu", *overrides])


def test_micro_st_mae_learns_beyond_the_mean_tubelet_caches_and_draws_its_grid(frames):
    rep = RecordingReporter()
    out = pretrain_pixels(frames, ["tex"], micro("train.epochs=40", "train.log_every=10"), reporter=rep)
    assert not out.cached and out.steps == 120  # 6 training videos / 2 per batch x 40 epochs
    assert out.metrics["eval_on"] == "held-out videos"
    # 0.72 vs 0.85 when written (training clips: 0.49); six training scenes do not generalise much further
    assert out.metrics["eval_loss"] < 0.9 * out.metrics["eval_trivial_loss"], out.metrics
    assert out.run_name == f"micro-4x{SIZE}-st_mae-r0.75"
    assert "2 held out" in rep.text() and out.grid_png in rep.artifacts
    with Image.open(out.grid_png) as grid:  # 4 clips x (original, masked, predicted), 4 frames wide
        assert grid.size == (4 * SIZE, 12 * SIZE + 11 * 2)
    model, meta = load_st_mae(out.checkpoint)
    assert meta["family"] == "st_mae" and meta["held_out"]["tex"] and model.cfg.img_size == SIZE

    again = pretrain_pixels(frames, ["tex"], micro("train.epochs=40", "train.log_every=3"), reporter=RecordingReporter())
    assert again.cached and (again.run_key, again.metrics) == (out.run_key, out.metrics)


def test_a_stopped_run_resumes_to_the_uninterrupted_weights(frames):
    cfg = micro("train.epochs=4", "train.checkpoint_every=100", "train.seed=3")
    whole = pretrain_pixels(frames, ["tex"], cfg)
    reference = torch.load(whole.checkpoint, weights_only=True)["model"]
    shutil.rmtree(whole.checkpoint.parent)
    part = pretrain_pixels(frames, ["tex"], cfg, max_steps=5)
    assert part.steps == 5 and part.checkpoint.name == "last.pt"
    rep = RecordingReporter()
    resumed = pretrain_pixels(frames, ["tex"], cfg, reporter=rep)
    assert "resuming" in rep.text() and "at step 5/12" in rep.text() and resumed.steps == 12
    got = torch.load(resumed.checkpoint, weights_only=True)["model"]
    for key, tensor in reference.items():
        assert torch.equal(got[key], tensor), key


def test_ranks_split_the_videos_and_an_epoch_is_a_function_of_its_seed(frames):
    cfg = micro()
    shards = pixel_run(frames, ["tex"], cfg, world_size=2).shards
    keys = [sorted(k for b in PixelClips(frames, shards, cfg, SIZE, rank=r, world_size=2).epoch(0, batch_size=1)
                   for k in b["keys"]) for r in (0, 1)]
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 8
    one = PixelClips(frames, shards, cfg, SIZE)
    first, again = list(one.epoch(2)), list(one.epoch(2, skip=1))
    assert [b["keys"] for b in first[1:]] == [b["keys"] for b in again]
    assert all(torch.equal(a["videos"], b["videos"]) for a, b in zip(first[1:], again))
    assert first[0]["videos"].shape == (4, 3, 4, SIZE, SIZE)  # 2 videos x repeat 2


def test_the_run_key_holds_the_frame_size_trained_at_whether_or_not_the_config_names_it(frames):
    """A standalone run (the only frame size there is) and the pipeline's (data.size set to
    frames.size) of the same model are one run; another config is another."""
    implicit = pixel_run(frames, ["tex"], micro()).run_key
    assert pixel_run(frames, ["tex"], micro(f"data.size={SIZE}")).run_key == implicit
    assert pixel_run(frames, ["tex"], micro("model.mask_ratio=0.5")).run_key != implicit


def test_recipe_presets_hold_the_reference_numbers():
    """mae_st's PRETRAIN.md / main_pretrain.py and HVM-1's recipe (issue 17)."""
    mae_st = build(PixelPretrainConfig, preset("pretrain-pixels", "mae_st"))
    t = mae_st.train
    assert (t.beta1, t.beta2, t.weight_decay, t.blr, t.schedule, t.warmup_epochs, t.grad_clip, t.lr) == \
        (0.9, 0.95, 0.05, 1.6e-3, "cosine", 5, 0.02, None)
    assert (mae_st.data.repeat, mae_st.model.mask_ratio, mae_st.model.masking) == (4, 0.9, "random")
    hvm1 = build(PixelPretrainConfig, preset("pretrain-pixels", "hvm1"))
    t = hvm1.train
    assert (t.lr, t.schedule, t.warmup_epochs, t.grad_clip) == (1e-4, "constant", 0, 0.1)
    assert (hvm1.model.preset, hvm1.model.mask_ratio, hvm1.model.norm_pix_loss, hvm1.model.pos_embed) == ("huge", 0.9, False, "learned")
    assert (hvm1.data.frames, hvm1.data.repeat, hvm1.data.crop_scale) == (16, 16, (0.5, 1.0))


def test_a_clip_takes_every_kth_frame_and_one_crop_for_all_of_them():
    video = np.zeros((10, 16, 16, 3), np.uint8)
    video[..., 0] = np.arange(10)[:, None, None] * 20  # red channel = 20 x frame index
    clip = sample_clip(video, 4, 3, (1.0, 1.0), 16, torch.Generator().manual_seed(0))
    red = (clip[0] * STD[0] + MEAN[0]) * 255  # (4, 16, 16)
    frames_seen = (red.mean((1, 2)) / 20).round().tolist()
    assert frames_seen == [0, 3, 6, 9]  # the only start that fits 4 frames 3 apart in 10
    short = sample_clip(video[:2], 4, 1, (0.5, 1.0), 8, torch.Generator().manual_seed(1))
    assert short.shape == (3, 4, 8, 8)  # a short video repeats its last frame
    torch.testing.assert_close(short[:, 2], short[:, 3])
