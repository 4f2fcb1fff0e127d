"""Fine-tuning and probing the ST-MAE (pixel) family in the same cells as token backbones
(issue 17 §3): HVM-1's regularisers (layer-wise lr decay, drop path, label smoothing) for both
families, pixel clips from frame shards, the same results rows and one report for scratch,
token and pixel rows."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune_fixtures import labeled_dataset, labeled_frames
from flows.evaluate import applicable
from models.backbone import PRESETS as BACKBONES
from models.backbone import VideoTransformer
from models.classifier import ClassifierConfig, PixelClassifier, PixelClassifierConfig, VideoClassifier
from models.drop_path import DropPath, drop_path_rates
from models.st_mae import STMAE, STMAEEncoder, load_encoder_state
from models.st_mae import micro as st_micro
from stages.checkpoints import atomic_save
from stages.config import ConfigError, FinetuneConfig, GridConfig, GridModel, PipelineConfig, build, preset
from stages.engine import adamw, param_groups, schedule
from stages.evaluate.report import build_report
from stages.finetune.grid import BAG_OF_CODES, PROBE, expand_grid
from stages.finetune.pixels import LabeledPixelClips, pixel_cell_keys
from stages.finetune.probe import probe_cells
from stages.finetune.splits import select_frame_split, select_split
from stages.finetune.train import ClassificationObjective, ModelSource, cell_keys, finetune_cell, protocol_for
from stages.plan import StagePlan, _Planner
from stages.reporting import RecordingReporter
from test_finetune import TOKENIZER, pretrain_checkpoint
from warehouse.catalog import Catalog

RECIPE = "micro-4x16-st_mae-r0.75"


def micro(*overrides: str) -> FinetuneConfig:
    return build(FinetuneConfig, preset("finetune", "micro"), ["train.device=cpu", *overrides])


def pixel_checkpoint(path, *, seed: int = 0, name: str = RECIPE, datasets=("unlabeled",), kind: str = "final"):
    """A pretrain-pixels checkpoint as that stage writes it (random micro ST-MAE weights)."""
    cfg = st_micro()
    torch.manual_seed(seed)
    model = STMAE(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": "vimpac-pretrain-pixels", "kind": kind, "model": model.state_dict(), "model_config": cfg.to_dict(),
                 "metadata": {"run_key": f"pix{seed:013d}", "run_name": name, "family": "st_mae", "steps": 1,
                              "config": {"data": {"frame_step": 1}}, "datasets": list(datasets)}}, path)
    return path


@pytest.fixture
def toy(root):
    """Three classes, six videos each, with both token shards and 16 px frame shards."""
    labeled_frames(root, "toy", labeled_dataset(root, "toy"))
    return root


# ---------------------------------------------------------------- regularisers


def test_layer_decay_gives_layer_i_of_l_the_scale_decay_to_the_l_plus_1_minus_i():
    """mae_st util/lr_decay.py: embeddings, positions and [CLS] are layer 0, block i is i + 1,
    the final norm and the head L + 1; the rate is lr x decay^(L + 1 - layer)."""
    model = PixelClassifier(PixelClassifierConfig(st_micro(), n_classes=3))  # depth 2
    expected_layer = {"encoder.patch_embed.weight": 0, "encoder.cls_token": 0, "encoder.pos.temporal": 0,
                      "encoder.blocks.0.qkv.weight": 1, "encoder.blocks.1.fc2.bias": 2, "encoder.norm.weight": 3, "fc.weight": 3}
    groups = param_groups(model, 0.05, layer_decay=0.8, layer_of=model.layer_id, n_layers=model.n_layers,
                          no_decay=model.no_weight_decay())
    group_of = {id(p): g for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    for name, layer in expected_layer.items():
        assert group_of[id(params[name])]["lr_scale"] == pytest.approx(0.8 ** (3 - layer)), name
    decayed = {n for n, p in params.items() if group_of[id(p)]["weight_decay"] > 0}
    assert "encoder.blocks.0.qkv.weight" in decayed and "fc.weight" in decayed
    assert not decayed & {"encoder.cls_token", "encoder.pos.spatial", "encoder.blocks.0.qkv.bias", "encoder.norm.weight"}
    assert sum(len(g["params"]) for g in groups) == len(params)

    token = VideoClassifier(ClassifierConfig(BACKBONES["micro"](), n_classes=3))  # 2 layers
    layers = {"backbone.embedding.weight": 0, "backbone.pos_t": 0, "backbone.cls": 0, "backbone.layers.0.mlp.fc1.weight": 1,
              "backbone.layers.1.attention.0.qkv.weight": 2, "fc.weight": 3}
    assert {n: token.layer_id(n) for n in layers} == layers

    optimizer = adamw(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, device=torch.device("cpu"), layer_decay=0.5,
                      layer_of=model.layer_id, n_layers=model.n_layers, no_decay=model.no_weight_decay())
    scheduler = schedule(optimizer, first_step=0, warmup=2, total=10)
    optimizer.step()
    scheduler.step()  # the schedule scales every group's own rate: the ratios stay
    rates = sorted({round(g["lr"] / optimizer.param_groups[-1]["lr"], 6) for g in optimizer.param_groups})
    assert rates == [0.125, 0.25, 0.5, 1.0]


def test_layer_decay_one_keeps_the_two_groups_of_today():
    model = VideoClassifier(ClassifierConfig(BACKBONES["micro"](), n_classes=3))
    groups = param_groups(model, 0.01)
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [0.01, 0.0] and not any("lr_scale" in g for g in groups)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim < 2 for p in groups[1]["params"])
    assert param_groups(model, 0.01, layer_decay=1.0, layer_of=model.layer_id, n_layers=2)[0]["params"] == groups[0]["params"]
    with pytest.raises(ValueError, match="layer_decay must be in"):
        param_groups(model, 0.01, layer_decay=1.5, layer_of=model.layer_id, n_layers=2)


def test_drop_path_is_identity_in_eval_and_at_zero_and_drops_whole_samples_in_training():
    x = torch.randn(64, 5, 8)
    state = torch.random.get_rng_state()
    assert DropPath(0.0).train()(x) is x
    assert torch.equal(torch.random.get_rng_state(), state), "p = 0 draws nothing: training is unchanged"
    assert DropPath(0.5).eval()(x) is x
    torch.manual_seed(0)
    grid, cls = DropPath(0.5).train()(x, x[:, 0])
    kept = (grid != 0).flatten(1).any(1)
    assert 10 < int(kept.sum()) < 54, "about half the samples dropped"
    torch.testing.assert_close(grid[kept], 2 * x[kept])  # kept ones scaled by 1 / (1 - p)
    assert torch.equal(cls != 0, (grid != 0)[:, 0]), "a sample's [CLS] drops with its tokens"
    assert drop_path_rates(0.1, 5) == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1]) and drop_path_rates(0.1, 1) == [0.0]

    videos = torch.randn(2, 3, 4, 16, 16)
    torch.manual_seed(1)
    plain = STMAEEncoder(st_micro())
    deep = STMAEEncoder(dataclasses.replace(st_micro(), drop_path=0.3))
    load_encoder_state(deep, plain.state_dict())
    assert [b.drop_path.p for b in deep.blocks] == [0.0, 0.3]
    torch.testing.assert_close(deep.eval().features(videos), plain.eval().features(videos))
    tokens = torch.randint(0, 32, (2, 4, 4, 4))
    torch.manual_seed(2)
    vimpac = VideoTransformer(BACKBONES["micro"]())
    dropped = VideoTransformer(dataclasses.replace(BACKBONES["micro"](), drop_path=0.5))
    dropped.load_state_dict(vimpac.state_dict())
    torch.testing.assert_close(dropped.eval()(tokens)[0], vimpac.eval()(tokens)[0])
    assert not torch.allclose(dropped.train()(tokens)[0], vimpac.train()(tokens)[0])


def test_label_smoothing_mixes_the_cross_entropy_with_the_mean_log_likelihood():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    batch = {"videos": torch.zeros(2, 3, 4, 16, 16), "labels": labels}

    def loss(e: float) -> float:
        objective = ClassificationObjective(3, label_smoothing=e)
        value, figures = objective.loss(lambda _: logits, batch, torch.tensor(2.0), 1)
        assert figures["correct"] == 1.0 and objective.count(batch) == 2
        return float(value)

    logp = F.log_softmax(logits, -1)
    nll = -logp[torch.arange(2), labels].mean()
    uniform = -logp.mean()  # the cross-entropy against a uniform target, per video
    assert loss(0.0) == pytest.approx(float(nll))
    assert loss(0.1) == pytest.approx(float(0.9 * nll + 0.1 * uniform))
    assert loss(0.1) != pytest.approx(loss(0.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        ClassificationObjective(3, label_smoothing=1.0)


# ---------------------------------------------------------------- pixel cells


def test_frame_selection_picks_the_token_selections_videos_and_labels(toy):
    tokens = select_split(toy, "toy", "2", TOKENIZER)
    frames = select_frame_split(toy, "toy", "2")
    assert frames.train == tokens.train and [v.key for v in frames.eval] == [v.key for v in tokens.eval]
    assert frames.tokenizer == "" and all(s.path.startswith("shards/frames/") for s in frames.shards)
    labeled_dataset(toy, "bare", first_vid=300, tokens=False)
    with pytest.raises(ConfigError, match="dataset bare has no committed frame shards .*run the frames stage"):
        select_frame_split(toy, "bare", "1")


def test_labeled_pixel_clips_are_a_function_of_the_epoch_and_split_videos_between_ranks(toy):
    selection = select_frame_split(toy, "toy", "1")
    loader = LabeledPixelClips(toy, selection.train_shards, selection.train, frames=4, frame_step=1, size=16, batch_size=3,
                               batches_per_epoch=4, seed=5, shuffle_buffer=4)
    whole, resumed = list(loader.epoch(1)), list(loader.epoch(1, skip_batches=2))
    assert len(whole) == 4 and whole[0]["videos"].shape == (3, 3, 4, 16, 16) and whole[0]["labels"].dtype == torch.int64
    assert [b["keys"] for b in whole[2:]] == [b["keys"] for b in resumed]
    assert all(torch.equal(a["videos"], b["videos"]) for a, b in zip(whole[2:], resumed))
    assert all(selection.train[k] == int(label) for b in whole for k, label in zip(b["keys"], b["labels"]))
    ranks = [{k for b in LabeledPixelClips(toy, selection.train_shards, selection.train, frames=4, frame_step=1, size=16,
                                           batch_size=2, batches_per_epoch=3, world_size=2, rank=r).epoch(0) for k in b["keys"]}
             for r in (0, 1)]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == 12


def test_a_pixel_checkpoint_fine_tunes_and_writes_the_results_rows_of_its_recipe(toy, tmp_path):
    ckpt = pixel_checkpoint(tmp_path / "pix" / "final.pt")
    rep = RecordingReporter()
    cfg = micro("train.epochs=2", "train.layer_decay=0.8", "train.label_smoothing=0.1", "model.drop_path=0.1")
    result = finetune_cell(toy, ModelSource(str(ckpt.parent), ckpt.parent), "toy", "1", cfg, preset="micro", reporter=rep)
    assert not result.cached and result.steps == 6 and result.pretrain_recipe == RECIPE and result.pretrain_run == "pix0000000000000"
    assert "layer decay 0.8" in rep.text() and "pixel clips" in rep.text()
    rows = Catalog(toy).rows("SELECT protocol, view_protocol, pretrain_recipe, tokenizer, finetune_run, code_version, metric "
                             "FROM results WHERE eval_id = ? ORDER BY metric", [result.eval_id])
    assert [r[-1] for r in rows] == ["mean_class", "top1", "top5"]
    assert {r[:6] for r in rows} == {("finetune", "2x3", RECIPE, None, result.run_key, "finetune-pixels-1/eval-pixels-1")}
    predictions = Catalog(toy).rows("SELECT count(*), min(token_shard) FROM predictions WHERE eval_id = ?", [result.eval_id])[0]
    assert predictions[0] == result.n_eval == 6 and predictions[1].startswith("shards/frames/toy/")
    selection = select_frame_split(toy, "toy", "1")
    protocol = protocol_for(cfg, False)
    assert (result.run_key, result.eval_id) == pixel_cell_keys(cfg, "pix0000000000000", "toy", selection, 1, protocol)
    token_keys = cell_keys(cfg, "pix0000000000000", "toy", select_split(toy, "toy", "1", TOKENIZER), TOKENIZER, 1, protocol)
    assert not {result.run_key, result.eval_id} & set(token_keys), "the family is part of the keys"

    again = finetune_cell(toy, ModelSource(str(ckpt.parent), ckpt.parent), "toy", "1", cfg, preset="micro", reporter=RecordingReporter())
    assert again.cached and again.metrics == result.metrics
    unfinished = pixel_checkpoint(tmp_path / "half.pt", kind="resume")
    with pytest.raises(ConfigError, match="unfinished pretrain-pixels run"):
        finetune_cell(toy, ModelSource("half", unfinished), "toy", "1", cfg)
    with pytest.raises(ConfigError, match="pool 'cls' needs an encoder with a \\[CLS\\]"):
        bare = tmp_path / "nocls.pt"
        st = dataclasses.replace(st_micro(), cls_token=False)
        atomic_save({"format": "vimpac-pretrain-pixels", "kind": "final", "model": STMAE(st).state_dict(),
                     "model_config": st.to_dict(), "metadata": {"run_name": "nocls"}}, bare)
        finetune_cell(toy, ModelSource("nocls", bare), "toy", "1", cfg)


def test_probes_run_on_the_frozen_encoder_and_the_grid_mixes_the_families_in_one_report(toy, tmp_path):
    pixels = pixel_checkpoint(tmp_path / "pix.pt", seed=1)
    tokens = pretrain_checkpoint(tmp_path / "tok.pt", name="micro-4x32-mp+cl")
    probes = probe_cells(toy, ModelSource("pix", pixels), "toy", "1", micro(), methods=["linear_probe", "knn"], grid="mix")
    assert [r.protocol for r in probes] == ["linear_probe:cls", "linear_probe:mean", "knn:cls", "knn:mean"]
    assert all(r.pretrain_recipe == RECIPE and r.metrics["top1"] > 0.5 for r in probes), [r.metrics for r in probes]

    grid = build(GridConfig, {"name": "mix", "models": ["scratch", {"ref": str(tokens)}, {"ref": str(pixels)}],
                              "datasets": [{"name": "toy", "splits": ["1"]}], "presets": ["micro"], "set": ["train.device=cpu"],
                              "protocols": ["finetune", "linear_probe", "bag_of_codes"]})
    for cell in expand_grid(grid):
        if cell.kind == BAG_OF_CODES:
            continue
        source = ModelSource(cell.model.ref, None if cell.model.ref == "scratch" else Path(cell.model.ref))
        if cell.kind == PROBE:
            probe_cells(toy, source, cell.dataset, cell.split, cell.config, methods=cell.methods, grid="mix")
        else:
            finetune_cell(toy, source, cell.dataset, cell.split, cell.config, preset=cell.preset, grid="mix")
    report = build_report(Catalog(toy), grid="mix")
    rows = {(r.recipe, r.protocol) for r in report.rows}
    assert {("scratch", "finetune"), ("micro-4x32-mp+cl", "finetune"), (RECIPE, "finetune"), (RECIPE, "linear_probe:cls")} <= rows


def test_bag_of_codes_is_skipped_for_a_grid_of_pixel_rows_on_a_dataset_without_tokens(root, tmp_path, caplog):
    labeled_frames(root, "bare", labeled_dataset(root, "bare", tokens=False))
    labeled_frames(root, "toy", labeled_dataset(root, "toy", first_vid=300))
    pixels = pixel_checkpoint(tmp_path / "pix.pt")
    grid = build(GridConfig, {"name": "px", "models": [str(pixels)], "datasets": ["bare", "toy"], "protocols": ["bag_of_codes"]})
    logger = logging.getLogger("test-evaluate")
    with caplog.at_level(logging.INFO, logger="test-evaluate"):
        kept = applicable(expand_grid(grid), grid, root, logger)
    assert [c.dataset for c in kept] == ["toy"], "a dataset with tokens keeps its floor"
    assert "bare | split auto | default | bag_of_codes: not applicable, skipped" in caplog.text
    mixed = grid.model_copy(update={"models": [*grid.models, GridModel(ref="scratch")]})
    assert len(applicable(expand_grid(mixed), mixed, root, logger)) == 2, "with a token row the floor runs (and says what is missing)"


def test_encoder_state_loads_with_more_frames_by_interpolating_the_temporal_table():
    torch.manual_seed(0)
    model = STMAE(st_micro())
    encoder = STMAEEncoder(dataclasses.replace(st_micro(), frames=8))
    load_encoder_state(encoder, model.state_dict())
    table = encoder.pos.temporal[0, :, 0].detach().numpy()
    source = model.pos.temporal[0, :, 0].detach().numpy()
    assert table.shape == (4,) and np.isclose(table[0], source[0]) and np.isclose(table[-1], source[-1])
    with pytest.raises(ValueError, match="does not match the encoder"):
        load_encoder_state(STMAEEncoder(dataclasses.replace(st_micro(), dim=64)), model.state_dict())


def test_plan_keys_pixel_rows_by_their_frame_shards(toy, tmp_path):
    """`vimpac plan` finds a pixel cell's eval ids (fine-tune and probes) without tokens."""
    pixels = pixel_checkpoint(tmp_path / "pix.pt")
    planner = _Planner(build(PipelineConfig, {}), toy, False)
    cfg = micro("train.epochs=1")

    def plan(kind: str, methods=None) -> StagePlan:
        row = StagePlan("evaluate", "toy", "cell")
        planner.cell(row, GridModel(ref=str(pixels)), "toy", "1", cfg, kind=kind, methods=methods)
        return row

    assert (plan("finetune").run, plan("probe", ["knn"]).run) == (1, 1)
    finetune_cell(toy, ModelSource("pix", pixels), "toy", "1", cfg)
    probe_cells(toy, ModelSource("pix", pixels), "toy", "1", cfg, methods=["knn"])
    assert (plan("finetune").cached, plan("probe", ["knn"]).cached) == (1, 1)
    assert plan("probe", ["knn", "linear_probe"]).run == 1, "a probe method not run yet"


# ---------------------------------------------------------------- the from-scratch pixel row


def test_scratch_pixels_trains_a_random_encoder_of_its_preset_on_the_scratch_schedule(toy, tmp_path, monkeypatch):
    """`scratch-pixels:micro` is the micro pretrain-pixels preset's encoder with no weights
    loaded, named apart from the token `scratch` row, trained 4x the epochs as `scratch` is."""
    cfg = micro("train.epochs=1")
    pixels = pixel_checkpoint(tmp_path / "pix.pt")
    pretrained = finetune_cell(toy, ModelSource("pix", pixels), "toy", "1", cfg, preset="micro")

    def no_weights(*_):
        raise AssertionError("a scratch-pixels row loads no weights")

    monkeypatch.setattr("stages.finetune.pixels.load_encoder_state", no_weights)
    rep = RecordingReporter()
    source = ModelSource("scratch-pixels:micro")
    result = finetune_cell(toy, source, "toy", "1", cfg, preset="micro", reporter=rep)
    assert (pretrained.steps, result.steps) == (3, 12), "12 training videos, batches of 4: 1 epoch, and 4 from scratch"
    assert "pixel clips, from scratch: 4x the epochs" in rep.text()
    assert (result.pretrain_recipe, result.pretrain_run) == ("scratch-pixels-micro", "scratch-pixels:micro")
    rows = Catalog(toy).rows("SELECT DISTINCT pretrain_recipe, pretrain_run, code_version FROM results WHERE eval_id = ?",
                             [result.eval_id])
    assert rows == [("scratch-pixels-micro", "scratch-pixels:micro", "finetune-pixels-1/eval-pixels-1")]
    saved = torch.load(result.checkpoint, weights_only=True)
    encoder = saved["model_config"]["encoder"]
    assert saved["metadata"]["pretrain"] == "scratch-pixels:micro"
    assert (encoder["img_size"], encoder["frames"], encoder["dim"]) == (16, 4, 32), "micro's encoder at the labeled frames' 16 px"
    assert result.eval_id != pretrained.eval_id and result.run_key != pretrained.run_key

    again = finetune_cell(toy, source, "toy", "1", cfg, preset="micro", reporter=RecordingReporter())
    assert again.cached and again.metrics == result.metrics
    assert finetune_cell(toy, source, "toy", "1", micro("train.epochs=1", "train.scratch_factor=2"), preset="micro").steps == 6

    probes = probe_cells(toy, source, "toy", "1", cfg, methods=["knn"])
    assert [r.protocol for r in probes] == ["knn:cls", "knn:mean"] and all(r.pretrain_recipe == "scratch-pixels-micro" for r in probes)

    planner = _Planner(build(PipelineConfig, {}), toy, False)
    for kind, methods in (("finetune", None), ("probe", ["knn"])):
        row = StagePlan("evaluate", "toy", "cell")
        planner.cell(row, GridModel(ref="scratch-pixels:micro"), "toy", "1", cfg, kind=kind, methods=methods)
        assert (row.cached, row.run, row.error) == (1, 0, None), kind
    with pytest.raises(ValueError, match="'large' is not a pretrain-pixels preset"):
        GridModel(ref="scratch-pixels:large")
    grid = build(GridConfig, {"models": ["scratch", "scratch-pixels:micro"], "datasets": ["toy"]})
    assert [m.ref for m in grid.models] == ["scratch", "scratch-pixels:micro"]


def test_a_scratch_pixels_cell_is_keyed_by_what_its_preset_builds_not_by_its_name(toy, monkeypatch):
    """Redefining a pretrain-pixels preset (another clip length here) must not hand the
    `scratch-pixels:PRESET` row the cached results of the encoder the preset used to build."""
    import stages.config as config_module

    cfg = micro()
    selection = select_frame_split(toy, "toy", "1")
    protocol = protocol_for(cfg, False)
    before = pixel_cell_keys(cfg, "scratch-pixels:micro", "toy", selection, 1, protocol)
    pretrained = pixel_cell_keys(cfg, "pix0000000000000", "toy", selection, 1, protocol)
    assert before == pixel_cell_keys(cfg, "scratch-pixels:micro", "toy", selection, 1, protocol), "keys are stable"
    redefined = {**config_module.PRESETS["pretrain-pixels"]["micro"]}
    redefined["data"] = {**redefined["data"], "frames": 8}
    monkeypatch.setitem(config_module.PRESETS["pretrain-pixels"], "micro", redefined)
    assert pixel_cell_keys(cfg, "scratch-pixels:micro", "toy", selection, 1, protocol) != before
    assert pixel_cell_keys(cfg, "pix0000000000000", "toy", selection, 1, protocol) == pretrained, "checkpoints keep their keys"
