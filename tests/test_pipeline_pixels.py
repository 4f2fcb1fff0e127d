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
