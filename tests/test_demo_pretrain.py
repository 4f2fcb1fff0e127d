"""Integration: the demo corpus's pretraining set and one labeled set through the whole DAG with
the demo's settings, shortened for CI time (a third of the tokenizer's steps, half the
pretraining, a fifth of the fine-tuning epochs); the tiny model must learn something real, and
the evaluate stage must put a scratch and a pretrained row into the results catalog, with
lineage to the videos."""

from __future__ import annotations

import json

import pytest

from stages.config import resolve_pipeline
from stages.demo_data import generate_demo_corpus
from warehouse.catalog import Catalog

pytestmark = [pytest.mark.slow, pytest.mark.longest]


def test_demo_dag_pretrains_something_real_and_fills_the_results_catalog(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.cli import demo_pipeline_file
    from flows.pipeline import pipeline

    home = tmp_path / "home"
    datasets = generate_demo_corpus(tmp_path / "corpus", seed=0)
    # CI time: the demo's stages took 6-8 min on one core (tokenizer and pretraining 144 s each).
    cfg = resolve_pipeline(demo_pipeline_file(tmp_path / "corpus", datasets), ["tokenizer.steps=300", "pretrain.train.epochs=150"])
    # The pretraining set and one labeled set.
    evaluate = cfg.evaluate.model_copy(update={"set": ["train.epochs=2"]})
    cfg = cfg.model_copy(update={"datasets": [d for d in cfg.datasets if d.name in ("demo-pretrain", "demo-motion")],
                                 "evaluate": evaluate})
    summaries = pipeline(cfg, str(home))

    result = summaries["pretrain/demo-pretrain"]
    assert result["model_uri"] == "models:/vimpac-backbone-demo/1" and result["run_name"] == "tiny-5x64-mp+cl"
    acc, baseline = result["eval_mask_acc"], result["eval_mask_acc_baseline"]
    # Clearly better than always answering the most frequent code (measured: 0.057 vs 0.003;
    # the demo's 300 steps reach 0.144).
    assert acc > 2 * baseline and acc > baseline + 0.03, (acc, baseline)
    assert result["eval_cl_acc"] > 0.5, "the two clips of a video find each other among the batch"

    version = MlflowClient().get_model_version("vimpac-backbone-demo", "1")
    assert version.tags["vimpac.tokenizer"] == summaries["tokenizer/demo-pretrain"]["model_uri"]
    assert version.tags["vimpac.datasets"] == "demo-pretrain"
    rows = Catalog(home).rows("SELECT summary FROM runs WHERE stage = 'pretrain' AND status = 'completed'")
    assert len(rows) == 1 and json.loads(rows[0][0])["eval_mask_acc"] == acc

    cells = summaries["evaluate/demo"]["cells"]
    assert all(c["dataset"] == "demo-motion" and c["split"] == "1" for c in cells.values())
    # The demo's protocols: each model fine-tuned and linearly probed, and the bag-of-codes floor;
    # demo-motion is flip-sensitive, so the models are tested on center crops only.
    rows = Catalog(home).rows("SELECT DISTINCT pretrain_recipe, protocol, view_protocol FROM results WHERE metric = 'top1' ORDER BY ALL")
    assert rows == [("bag-of-codes", "bag_of_codes", "all-frames-center")] + [
        (recipe, protocol, "4x1-center") for recipe in ("scratch", "tiny-5x64-mp+cl")
        for protocol in ("finetune", "linear_probe:cls", "linear_probe:mean")], rows
    lineage = Catalog(home).rows(
        """SELECT r.pretrain_recipe, count(DISTINCT v.sha256), any_value(r.tokenizer) FROM results r JOIN predictions p USING (eval_id)
           JOIN videos v ON v.dataset = r.dataset AND v.video_id = p.video_id WHERE r.metric = 'top1' AND r.protocol = 'finetune'
           GROUP BY ALL ORDER BY 1""")
    assert [(r[0], r[2]) for r in lineage] == [("scratch", version.tags["vimpac.tokenizer"]), ("tiny-5x64-mp+cl", version.tags["vimpac.tokenizer"])]
    assert lineage[0][1] == lineage[1][1] > 0, "both rows scored the same test videos"

    # Compaction of the demo's catalog (issue 19) changes no view: the same rows before and after.
    from warehouse.compact import compact_all
    from warehouse.layout import DataRoot

    views = ["videos", "videos_log", "shards", "frame_samples", "token_samples", "results", "predictions"]
    before = {v: Catalog(home).rows(f"SELECT * FROM {v} ORDER BY ALL") for v in views}
    compacted = compact_all(DataRoot(home))
    assert sum(r.files_written for r in compacted) > 0 and not any(r.skipped for r in compacted), compacted
    assert not list((home / "tables" / "videos").glob("demo-*/*.parquet")), "the unit files were merged"
    assert {v: Catalog(home).rows(f"SELECT * FROM {v} ORDER BY ALL") for v in views} == before
