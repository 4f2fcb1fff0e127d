"""Frozen-feature protocols (issue 14): the probe maths on cases with a known answer, and the
probe / bag-of-codes cells writing cached, seeded `results` rows."""

from __future__ import annotations

import numpy as np
import pytest

from finetune_fixtures import labeled_dataset
from stages.config import FinetuneConfig, build, preset
from stages.evaluate.probes import code_histogram, fit_linear_probe, knn_proba
from stages.finetune.probe import bag_of_codes_cell, probe_cells
from stages.finetune.train import ModelSource
from test_finetune import pretrain_checkpoint
from warehouse.catalog import Catalog

N_CLASSES = 4


def blobs(n: int, dim: int, *, separable: bool, seed: int, scale: float = 1.0, offset: float = 0.0):
    """`n` features per class: class means far apart (separable) or no class signal at all."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(N_CLASSES, dim)) * 4.0
    y = np.repeat(np.arange(N_CLASSES), n)
    x = rng.normal(size=(len(y), dim))
    if separable:
        x = x + centres[y]
    return offset + scale * x, y


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (0.005, 1.0)], ids=["unit", "tiny-variation-on-a-constant"])
def test_linear_probe_separates_separable_features_and_not_random_ones(scale, offset):
    # The second case is a fresh backbone's [CLS]: a constant vector with tiny per-video
    # variation. The non-affine BatchNorm (standardisation) must make it usable.
    x, y = blobs(30, 16, separable=True, seed=0, scale=scale, offset=offset)
    xt, yt = blobs(30, 16, separable=True, seed=1, scale=scale, offset=offset)
    probe = fit_linear_probe(x, y, N_CLASSES)
    assert probe.train_accuracy == 1.0
    assert (probe.predict_proba(xt).argmax(1) == yt).mean() >= 0.95
    r, ry = blobs(30, 16, separable=False, seed=2, scale=scale, offset=offset)
    rt, rty = blobs(200, 16, separable=False, seed=3, scale=scale, offset=offset)
    chance = (fit_linear_probe(r, ry, N_CLASSES).predict_proba(rt).argmax(1) == rty).mean()
    assert abs(chance - 1 / N_CLASSES) < 0.1, chance


def test_knn_votes_by_cosine_similarity():
    x, y = blobs(30, 16, separable=True, seed=0)
    xt, yt = blobs(30, 16, separable=True, seed=1)
    p = knn_proba(x, y, xt, N_CLASSES)
    assert p.shape == (len(yt), N_CLASSES) and np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == yt).mean() >= 0.95
    r, ry = blobs(30, 16, separable=False, seed=2)
    rt, rty = blobs(200, 16, separable=False, seed=3)
    assert abs((knn_proba(r, ry, rt, N_CLASSES).argmax(1) == rty).mean() - 1 / N_CLASSES) < 0.1
    # With fewer training videos than k, every one votes; scale does not matter (cosine).
    assert np.allclose(knn_proba(x[:5] * 10, y[:5], xt, N_CLASSES), knn_proba(x[:5], y[:5], xt, N_CLASSES), atol=1e-6)


def test_code_histogram_ignores_padding_and_normalises():
    tokens = np.array([[0, 1, 1], [3, 9, 9]])  # 9 = [PAD] of a 4-code vocabulary
    assert code_histogram(tokens, 4, pad_id=9).tolist() == [0.25, 0.5, 0.0, 0.25]


def test_probes_reject_bad_input():
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(np.zeros((3, 2)), np.array([0, 1, 5]), 3)
    with pytest.raises(ValueError, match="NaN"):
        fit_linear_probe(np.full((2, 2), np.nan), np.array([0, 1]), 2)


def micro(*overrides: str) -> FinetuneConfig:
    return build(FinetuneConfig, preset("finetune", "micro"), list(overrides))


def test_probe_cells_write_seeded_cached_rows_and_the_bag_of_codes_floor(tmp_path):
    root = Catalog(tmp_path / "home").root
    labeled_dataset(root, "toy")  # codes give the class away in every frame
    ckpt = pretrain_checkpoint(tmp_path / "pre.pt")
    cells = probe_cells(root, ModelSource(str(ckpt), ckpt), "toy", "1", micro(), methods=["linear_probe", "knn"])
    assert [c.protocol for c in cells] == ["linear_probe:cls", "linear_probe:mean", "knn:cls", "knn:mean"]
    assert not any(c.cached for c in cells)
    # Even a random backbone keeps the class-giving codes apart in its mean-pooled states.
    assert cells[1].metrics["top1"] == 1.0, cells[1].metrics
    again = probe_cells(root, ModelSource(str(ckpt), ckpt), "toy", "1", micro(), methods=["linear_probe", "knn"])
    assert all(c.cached for c in again) and [c.metrics for c in again] == [c.metrics for c in cells]
    scratch = probe_cells(root, ModelSource("scratch"), "toy", "1", micro("train.seed=1"), methods=["knn"])
    floor = [bag_of_codes_cell(root, "toy", "1", micro(f"train.seed={s}")) for s in (0, 1)]
    assert floor[0].metrics["top1"] == 1.0 and floor[0].eval_id != floor[1].eval_id
    rows = Catalog(root).rows("SELECT protocol, pretrain_recipe, seed, view_protocol, finetune_run, n_train, n_classes "
                              "FROM results WHERE metric = 'top1' ORDER BY ALL")
    assert rows == sorted([
        *[(p, "micro-4x32-mp+cl", 0, "2x1-center", None, 12, 3) for p in ("knn:cls", "knn:mean", "linear_probe:cls", "linear_probe:mean")],
        ("knn:cls", "scratch", 1, "2x1-center", None, 12, 3), ("knn:mean", "scratch", 1, "2x1-center", None, 12, 3),
        ("bag_of_codes", "bag-of-codes", 0, "all-frames-center", None, 12, 3),
        ("bag_of_codes", "bag-of-codes", 1, "all-frames-center", None, 12, 3),
    ])
    n_pred = Catalog(root).rows("SELECT count(*) FROM predictions WHERE eval_id = ?", [cells[0].eval_id])[0][0]
    assert n_pred == 6  # every evaluation video has its scores
