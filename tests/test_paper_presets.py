"""Every named preset that cites a paper table holds that table's numbers (VIMPAC, Table 4 and
Table 6, Appendix C), so a preset cannot drift from its comment."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.backbone import VideoTransformer
from stages.config import DatasetConfig, FinetuneConfig, FramesConfig, PretrainConfig, build, preset
from stages.frames.stage import resolve_config
from stages.pretrain.train import model_config, run_name

# Table 4, "Pre-Train (Analysis)" and "Pre-Train (Results)" columns; negatives = contrastive batch - 1
# (Sec. 4.1: 127 in the analyses; 255 for the first 90 epochs of the final model, 127 for the last 10).
PRETRAIN = {
    #                 model        lr     warm-up epochs schedule negatives effective batch
    "small":          ("small",      1e-3, 0.10, 10, 10, 127, 1024),
    "base":           ("base",       1e-3, 0.10, 10, 10, 127, 1024),
    "large_half":     ("large_half", 3e-4, 0.05, 90, 100, 255, 1024),
    "large_half_256": ("large_half", 3e-4, 0.05, 10, 10, 127, 1024),
}


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_pretrain_preset_is_table_4(name):
    model, lr, warmup, epochs, schedule, negatives, batch = PRETRAIN[name]
    cfg = build(PretrainConfig, preset("pretrain", name))
    t = cfg.train
    assert cfg.model.preset == model
    assert (t.lr, t.warmup, t.epochs, t.schedule_epochs or t.epochs) == (lr, warmup, epochs, schedule)
    assert t.batch_size - 1 == negatives and t.batch_size * t.accumulate == batch
    # Shared by both columns: AdamW (0.9, 0.98), weight decay 0.05, clipping 1.0, backbone dropout 0.1.
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip, cfg.model.dropout) == (0.9, 0.98, 0.05, 1.0, 0.1)
    assert cfg.data.frames == 5  # both phases pretrain on 5-frame clips; S is 128, then 256
    # Sec. 4.1 / App. C.1: a 2 x 2048 contrastive head for the analyses, 3 x 4096 for the final model.
    assert (cfg.model.cl_layers, cfg.model.cl_hidden, cfg.model.cl_dim) == ((3, 4096, 256) if model == "large_half" else (2, 2048, 256))


def test_the_two_phases_make_one_100_epoch_schedule_at_128_then_256_px():
    first, second = (build(PretrainConfig, preset("pretrain", n)) for n in ("large_half", "large_half_256"))
    assert first.train.epochs + second.train.epochs == first.train.schedule_epochs == 100
    assert first.data.size is None and second.data.size == 256


# Table 6: layers x dim with their parameter counts (millions), as overrides on the analysis preset.
TABLE_6 = [(6, 512, 29.4), (6, 768, 63.0), (12, 512, 54.7), (12, 768, 119.7)]


@pytest.mark.parametrize("layers,dim,millions", TABLE_6)
def test_table_6_model_sizes_are_overrides_of_the_small_preset(layers, dim, millions):
    cfg = build(PretrainConfig, preset("pretrain", "small"), [f"model.layers={layers}", f"model.dim={dim}"])
    backbone = model_config(cfg, 8192, 16).backbone
    assert round(VideoTransformer(backbone).num_params() / 1e6, 1) == millions
    assert backbone.head_dim == 64 and backbone.mlp_dim == 4 * dim
    assert run_name(cfg, 128) == f"small.{layers}L{dim}-5x128-mp+cl"


# Table 4, downstream columns: epochs, and lr 1e-4 (small/base) with batch 128, warm-up 0.1, wd 0.01.
FINETUNE_EPOCHS = {"ssv2": 22, "diving48": 50, "ucf101": 50, "hmdb51": 50, "kinetics400": 30}


@pytest.mark.parametrize("name", sorted(FINETUNE_EPOCHS))
def test_finetune_preset_is_table_4(name):
    cfg = build(FinetuneConfig, preset("finetune", name))
    t = cfg.train
    assert t.epochs == FINETUNE_EPOCHS[name]
    assert (t.batch_size, t.warmup, t.weight_decay, t.beta1, t.beta2, t.grad_clip) == (128, 0.1, 0.01, 0.9, 0.999, 1.0)
    assert (cfg.model.dropout, cfg.model.head_dropout) == (0.1, 0.0)
    assert (t.layer_decay, t.label_smoothing, cfg.model.drop_path) == (1.0, 0.0, 0.0), "no HVM-1 regularisers in Table 4"


# Appendix C: 2 FPS for the datasets with longer videos, 4 FPS for those with shorter ones.
LAYOUT_FPS = {"ucf101": 2.0, "kinetics": 2.0, "hmdb51": 4.0, "ssv2": 4.0, "diving48": 4.0}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FPS))
def test_benchmark_layouts_default_to_the_papers_frame_rate(layout):
    frames = build(FramesConfig, preset("frames", "downstream"))  # 4 FPS unless the dataset says otherwise
    ds = DatasetConfig(name="d", source="/x", layout=layout)
    assert resolve_config(ds, frames, labeled=True).fps == LAYOUT_FPS[layout]
    # Detected at ingest (layout auto) counts the same; an explicit dataset fps always wins.
    auto = DatasetConfig(name="d", source="/x")
    assert resolve_config(auto, frames, labeled=True, detected_layout=layout).fps == LAYOUT_FPS[layout]
    assert resolve_config(DatasetConfig(name="d", source="/x", layout=layout, fps=8.0), frames, labeled=True).fps == 8.0


def test_other_layouts_keep_the_frames_rate():
    frames = build(FramesConfig, preset("frames", "downstream"))
    for layout in ("directory", "folder_per_class", "list", "manifest"):
        assert resolve_config(DatasetConfig(name="d", source="/x", layout=layout), frames, labeled=True).fps == 4.0


GRIDS = sorted((Path(__file__).resolve().parents[1] / "grids").rglob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=[p.name for p in GRIDS])
def test_every_shipped_grid_file_validates(path):
    """The grid files docs/pretrain.md points at for Tables 6-16 (and the demo's) resolve into
    valid pretraining recipes and fine-tuning settings, recipe by recipe, without a data root."""
    from flows.cli import load_grid
    from stages.config import deep_merge
    from stages.finetune.grid import recipe_configs

    grid = load_grid(path, [])
    recipes = recipe_configs(grid)
    assert len(recipes) == sum(m.is_recipe for m in grid.models) * len(grid.seeds or [None])
    # Distinct rows are distinct recipes (one pretraining each), never the same config twice.
    configs = {c.model_dump_json() for _, seed, c in recipes if seed in (None, (grid.seeds or [None])[0])}
    assert len(configs) == sum(m.is_recipe for m in grid.models)
    for ds in grid.datasets or []:
        base = preset("finetune", ds.preset or grid.presets[0])
        build(FinetuneConfig, deep_merge(base, grid.finetune), list(grid.set))


def test_indomain_demo_grid_is_the_pretrain_length_grids_longest_recipe():
    """`vimpac demo --grid grids/indomain-demo.yaml` and the pretraining-length study share the
    12-minute pretraining run: same config for seed 0, so either finds the other's run cached."""
    from flows.cli import load_grid
    from stages.finetune.grid import recipe_configs

    grids = Path(__file__).resolve().parents[1] / "grids"
    one = {c.model_dump_json() for _, seed, c in recipe_configs(load_grid(grids / "indomain-demo.yaml", [])) if seed == 0}
    study = {m.name: c.model_dump_json() for m, seed, c in recipe_configs(load_grid(grids / "pretrain-length-demo.yaml", []))
             if seed == 0}
    assert one == {study["tiny-mp+cl-indomain-2880"]}


def test_vimpac_config_shows_a_presets_table_4_numbers(capsys, tmp_path):
    import json

    from flows.cli import main

    assert main(["--home", str(tmp_path), "config", "--preset", "pretrain=large_half"]) == 0
    train = json.loads(capsys.readouterr().out)["pretrain"]["train"]
    assert (train["lr"], train["warmup"], train["epochs"], train["schedule_epochs"]) == (3e-4, 0.05, 90, 100)
    assert (train["batch_size"], train["accumulate"]) == (256, 4)
