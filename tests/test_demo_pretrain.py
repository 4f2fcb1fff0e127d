"""Integration: the demo corpus's pretraining set through every stage up to pretrain, with the
demo's own settings, and the tiny model must learn something real."""

from __future__ import annotations

import json

import pytest

from stages.config import resolve_pipeline
from stages.demo_data import generate_demo_corpus
from warehouse.catalog import Catalog

pytestmark = pytest.mark.slow


def test_tiny_pretraining_on_demo_tokens_beats_the_most_frequent_token(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.cli import demo_pipeline_file
    from flows.pipeline import pipeline

    home = tmp_path / "home"
    datasets = generate_demo_corpus(tmp_path / "corpus", seed=0)
    cfg = resolve_pipeline(demo_pipeline_file(tmp_path / "corpus", datasets))
    # Only the pretraining set: what the demo pretrains on, without the labeled sets' stages.
    cfg = cfg.model_copy(update={"datasets": [d for d in cfg.datasets if d.name == "demo-pretrain"]})
    summaries = pipeline(cfg, str(home))

    result = summaries["pretrain/demo-pretrain"]
    assert result["model_uri"] == "models:/vimpac-backbone-demo/1" and result["run_name"] == "tiny-5x64-mp+cl"
    acc, baseline = result["eval_mask_acc"], result["eval_mask_acc_baseline"]
    # Clearly better than always answering the most frequent code (measured: ~0.09 vs ~0.02).
    assert acc > 2 * baseline and acc > baseline + 0.03, (acc, baseline)
    assert result["eval_cl_acc"] > 0.5, "the two clips of a video find each other among the batch"

    version = MlflowClient().get_model_version("vimpac-backbone-demo", "1")
    assert version.tags["vimpac.tokenizer"] == summaries["tokenizer/demo-pretrain"]["model_uri"]
    assert version.tags["vimpac.datasets"] == "demo-pretrain"
    rows = Catalog(home).rows("SELECT summary FROM runs WHERE stage = 'pretrain' AND status = 'completed'")
    assert len(rows) == 1 and json.loads(rows[0][0])["eval_mask_acc"] == acc
