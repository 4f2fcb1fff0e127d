"""ST-MAE pixel pretraining as an optional stage of the `pipeline` flow (issue 17): off by
default, switched on by its `pretrain_pixels` section, trained once on the unlabeled datasets'
frame shards and cached by its run key, shown by `vimpac plan`, and its encoder a row of the
pipeline's evaluation grid beside the from-scratch pixel row."""

from __future__ import annotations

import pytest

from finetune_fixtures import labeled_dataset, labeled_frames
from stages.config import ConfigError, PipelineConfig, build, pipeline_pixel_config, resolve_pipeline
from stages.plan import plan_pipeline
from warehouse.catalog import Catalog
from warehouse.tables import now, write_rows

pytestmark = pytest.mark.slow


def unlabeled_frames(root, dataset: str, n: int = 6) -> None:
    """An unlabeled dataset as ingest and frames leave it: a `datasets` row and pretrain-variant
    16 px frame shards (one center view per video)."""
    info = {f"v{500 + i:03d}": ("", None, None) for i in range(n)}
    write_rows("datasets", [{"dataset": dataset, "source": "/src", "layout": "directory", "labeled": False, "flip_sensitive": False,
                             "classes": [], "n_entries": n, "updated_at": now()}], root.table_dir("datasets", dataset, "d.parquet"))
    labeled_frames(root, dataset, info, variant="pretrain")


def config(**evaluate) -> PipelineConfig:
    """The pipeline's pixel branch only (the data stages ran before), micro presets on CPU."""
    return build(PipelineConfig, {
        "name": "pixels", "stages": ["pretrain-pixels", "evaluate"], "frames": {"size": 16},
        "datasets": [{"name": "toy", "source": "/src/toy"}, {"name": "raw", "source": "/src/raw"}],
        "pretrain_pixels": {"model": {"preset": "micro", "mask_ratio": 0.75}, "data": {"frames": 4, "repeat": 2, "holdout_videos": 0},
                            "train": {"batch_size": 2, "epochs": 1, "warmup_epochs": 0, "device": "cpu", "checkpoint_every": 1}},
        "evaluate": {"models": ["scratch-pixels:micro", "pretrained-pixels"], "datasets": [{"name": "toy", "splits": ["1"]}],
                     "presets": ["micro"], "set": ["train.device=cpu"], **evaluate},
        "tracking": {"experiment": "pipeline-pixels"},
    })


def test_pixel_stage_is_off_by_default_and_switched_on_by_its_section():
    default = build(PipelineConfig, {})
    assert default.pretrain_pixels is None and "pretrain-pixels" not in default.stages
    on = resolve_pipeline(presets={"pretrain-pixels": "tiny"})
    assert on.stages[-2:] == ["pretrain-pixels", "evaluate"] and on.pretrain_pixels.model.preset == "tiny"
    assert pipeline_pixel_config(on).data.size == on.frames.size == 128, "it trains at the pipeline's frame size"
    assert resolve_pipeline(overrides=["pretrain_pixels.model.preset=micro"]).stages == on.stages
    assert build(PipelineConfig, {"stages": ["frames"], "pretrain_pixels": {}}).stages == ["frames"], "explicit stages win"
    with pytest.raises(ConfigError, match="stages lists pretrain-pixels but `pretrain_pixels` is not set"):
        build(PipelineConfig, {"stages": ["frames", "pretrain-pixels"]})
    with pytest.raises(ConfigError, match="unknown config key 'pretrain_pixels.train.lrr'"):
        resolve_pipeline(overrides=["pretrain_pixels.train.lrr=1"])


def test_pipeline_pretrains_pixels_once_plans_it_and_evaluates_its_encoder_beside_scratch_pixels(prefect_harness, root):
    from flows.pipeline import pipeline

    labeled_frames(root, "toy", labeled_dataset(root, "toy"))
    unlabeled_frames(root, "raw")
    cfg = config()

    plan = {(r.stage, r.dataset): r for r in plan_pipeline(cfg, root).stages}
    pixels = plan[("pretrain-pixels", "raw")]
    assert (pixels.run, pixels.cached, pixels.reason_text()) == (1, 0, "new input")
    run_key = next(n for n in pixels.notes if n.startswith("run key ")).split()[2]
    evaluate = plan[("evaluate", "toy")]
    assert evaluate.run == 2 and evaluate.reasons == {"new input": 1, "upstream changed (pretrain-pixels raw)": 1}

    summaries = pipeline(cfg, str(root.home))
    trained = summaries["pretrain-pixels/raw"]
    assert not trained["cached"] and trained["run_key"] == run_key and trained["model_uri"].startswith("models:/vimpac-backbone-pixels/")
    cells = summaries["evaluate/pixels"]["cells"]
    assert len(cells) == 2 and not summaries["evaluate/pixels"]["failed"]
    rows = Catalog(root).rows("SELECT pretrain_recipe, pretrain_run, count(DISTINCT eval_id) FROM results WHERE grid = 'pixels' "
                              "AND metric = 'top1' GROUP BY ALL ORDER BY 1")
    assert rows == [("micro-4x16-st_mae-r0.75", run_key, 1), ("scratch-pixels-micro", "scratch-pixels:micro", 1)]
    steps = {c["pretrain_recipe"]: c["steps"] for c in cells.values()}
    assert steps == {"micro-4x16-st_mae-r0.75": 3, "scratch-pixels-micro": 12}, "the scratch row trains 4x the epochs"

    replan = {(r.stage, r.dataset): r for r in plan_pipeline(cfg, root).stages}
    assert replan[("pretrain-pixels", "raw")].cached == 1 and not replan[("pretrain-pixels", "raw")].pending
    assert (replan[("evaluate", "toy")].cached, replan[("evaluate", "toy")].run) == (2, 0)

    again = pipeline(cfg, str(root.home))
    assert again["pretrain-pixels/raw"]["cached"] and again["pretrain-pixels/raw"]["model_uri"] == trained["model_uri"]
    assert all(c["cached"] for c in again["evaluate/pixels"]["cells"].values())
    assert Catalog(root).rows("SELECT count(*) FROM runs WHERE stage = 'pretrain-pixels' AND status = 'completed'")[0][0] == 2

    # Without the section the stage and its row are gone, and the default models do not ask for it.
    off = build(PipelineConfig, {**cfg.model_dump(mode="json", exclude={"pretrain_pixels", "stages", "evaluate"}),
                                 "stages": ["evaluate"], "evaluate": {"datasets": [{"name": "toy", "splits": ["1"]}],
                                                                      "models": ["scratch-pixels:micro", "pretrained-pixels"]}})
    stages = {r.stage for r in plan_pipeline(off, root).stages}
    assert stages == {"evaluate"}


def test_a_grid_trains_its_pixel_recipe_once_per_seed_and_caches_it(prefect_harness, root):
    """A `pretrain_pixels:` row is pretrained on demand like a token recipe: once per seed (the
    seed is its pretraining's train.seed, so a run key of its own), its rows carry the recipe's
    name, and a second run of the grid trains nothing."""
    from flows.evaluate import evaluate
    from stages.config import GridConfig
    from stages.finetune.grid import recipe_configs

    labeled_frames(root, "toy", labeled_dataset(root, "toy"))
    unlabeled_frames(root, "raw")
    grid = build(GridConfig, {
        "name": "pixel-recipes", "models": [{"name": "st-mae", "pretrain_pixels": {"model.mask_ratio": 0.5}}],
        "datasets": [{"name": "toy", "splits": ["1"]}], "presets": ["micro"], "protocols": ["finetune", "knn"], "seeds": [0, 1],
        "pretrain_pixels": {"datasets": ["raw"], "preset": "micro", "set": ["train.device=cpu", "train.checkpoint_every=1"]},
        "set": ["train.device=cpu", "train.epochs=1"]})
    configs = recipe_configs(grid)
    assert [(m.name, s, c.train.seed, c.model.mask_ratio, c.model.preset) for m, s, c in configs] == \
        [("st-mae", 0, 0, 0.5, "micro"), ("st-mae", 1, 1, 0.5, "micro")]

    first = evaluate(grid, str(root.home))
    assert not first["failed"] and len(first["cells"]) == 2 * 2  # seeds x {finetune, probe}
    catalog = Catalog(root)
    pretrains = catalog.rows("SELECT summary->>'run_key', summary->>'cached', summary->>'run_name' FROM runs "
                             "WHERE stage = 'pretrain-pixels' ORDER BY ALL")
    assert len(pretrains) == 2 and len({k for k, _, _ in pretrains}) == 2, "one pretraining per seed, each its own run key"
    assert {(c, n) for _, c, n in pretrains} == {("false", "micro-4x16-st_mae-r0.5")}
    rows = catalog.rows("SELECT pretrain_recipe, protocol, seed, count(DISTINCT pretrain_run) FROM results "
                        "WHERE grid = 'pixel-recipes' AND metric = 'top1' GROUP BY ALL ORDER BY ALL")
    assert rows == [("st-mae", p, s, 1) for p in ("finetune", "knn:cls", "knn:mean") for s in (0, 1)]
    runs = {r for (r,) in catalog.rows("SELECT DISTINCT pretrain_run FROM results WHERE grid = 'pixel-recipes'")}
    assert runs == {k for k, _, _ in pretrains}, "each seed's rows name that seed's pretraining run"

    again = evaluate(grid, str(root.home))
    assert all(c["cached"] for c in again["cells"].values())
    cached = catalog.rows("SELECT summary->>'cached' FROM runs WHERE stage = 'pretrain-pixels' AND status = 'completed' "
                          "ORDER BY finished_at DESC LIMIT 2")
    assert [c for (c,) in cached] == ["true", "true"], "the recipe is trained once: the second run reuses it"


def test_plan_shows_the_pipeline_grids_pixel_recipe_as_would_run_then_cached(prefect_harness, root):
    """`vimpac plan` gives a pixel recipe of the pipeline's grid a pretrain-pixels row (its seeds
    are its units) and counts its cells as waiting on it until it is trained."""
    from flows.pipeline import pipeline

    labeled_frames(root, "toy", labeled_dataset(root, "toy"))
    unlabeled_frames(root, "raw")
    cfg = build(PipelineConfig, {**config().model_dump(mode="json", exclude={"stages", "evaluate", "pretrain_pixels"}),
                                 "stages": ["evaluate"],
                                 "evaluate": {"models": [{"name": "st-mae", "pretrain_pixels": {
                                     "model": {"preset": "micro", "mask_ratio": 0.75}, "data": {"frames": 4, "repeat": 2, "holdout_videos": 0},
                                     "train": {"batch_size": 2, "epochs": 1, "warmup_epochs": 0, "device": "cpu"}}}],
                                     "datasets": [{"name": "toy", "splits": ["1"]}], "presets": ["micro"],
                                     "set": ["train.device=cpu", "train.epochs=1"]}})
    plan = {(r.stage, r.dataset): r for r in plan_pipeline(cfg, root).stages}
    recipe = plan[("pretrain-pixels", "recipe st-mae (raw)")]
    assert (recipe.run, recipe.cached, recipe.reason_text()) == (1, 0, "new input")
    run_key = next(n for n in recipe.notes if n.startswith("run key ")).split()[2]
    evaluate = plan[("evaluate", "toy")]
    assert evaluate.run == 1 and evaluate.reasons == {"upstream changed (pretrain-pixels recipe st-mae)": 1}

    summaries = pipeline(cfg, str(root.home))
    assert not summaries["evaluate/pixels"]["failed"]
    assert Catalog(root).rows("SELECT DISTINCT pretrain_recipe, pretrain_run FROM results WHERE grid = 'pixels'") == [("st-mae", run_key)]
    replan = {(r.stage, r.dataset): r for r in plan_pipeline(cfg, root).stages}
    assert replan[("pretrain-pixels", "recipe st-mae (raw)")].cached == 1
    assert (replan[("evaluate", "toy")].cached, replan[("evaluate", "toy")].run) == (1, 0)
