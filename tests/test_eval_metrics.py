"""Evaluation maths (VIMPAC App. C): view protocols, clip placement, multi-view fusion,
top-k / mean-class accuracy, confusion matrices and their picture, re-fusing stored scores."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.evaluate.metrics import (
    CENTER,
    CROPS3,
    Protocol,
    classification_metrics,
    clip_starts,
    confusion_matrix,
    confusion_png,
    fuse,
    mean_class_accuracy,
    metrics_from_predictions,
    parse_view,
    per_class_accuracy,
    topk_accuracy,
)

# ---------------------------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "protocol, name",
    [
        (Protocol(10, CROPS3), "10x3"),
        (Protocol(2, CENTER), "2x1-center"),
        (Protocol(1, ("s100_tl", "s100_c")), "1xs100_tl+s100_c"),
        (Protocol(4, ("s125_br_flip",)), "4xs125_br_flip"),
        (Protocol(3, ("s100_c", "s100_tl", "s100_br")), "3xs100_c+s100_tl+s100_br"),
    ],
)
def test_protocol_name_round_trip(protocol, name):
    assert protocol.name == name
    assert Protocol.parse(name) == protocol
    assert Protocol.parse(protocol.name).view_names() == protocol.view_names()


def test_protocol_paper_center_only_when_flip_sensitive():
    assert Protocol.paper(10, flip_sensitive=False) == Protocol(10, CROPS3)
    assert Protocol.paper(2, flip_sensitive=True) == Protocol(2, CENTER)
    assert Protocol.paper(2, flip_sensitive=True).name == "2x1-center"


def test_protocol_views_and_description():
    p = Protocol(10, list(CROPS3))
    assert p.crops == CROPS3 and hash(p) == hash(Protocol(10, CROPS3))
    assert p.describe() == "10 temporal clips x 3 crops (s100_tl, s100_c, s100_br), softmax averaged"
    assert Protocol(1, CENTER).describe() == "1 temporal clip x 1 crop (s100_c), softmax averaged"
    views = p.view_names()
    assert views[:4] == ["0/s100_tl", "0/s100_c", "0/s100_br", "1/s100_tl"]
    assert len(views) == p.n_views == 30 and views[-1] == "9/s100_br"
    assert Protocol(2, CENTER).selection() == {"clips": (0, 1), "crops": CENTER}


@pytest.mark.parametrize(
    "clips, crops, match",
    [
        (0, CROPS3, "clips >= 1"),
        (True, CROPS3, "clips >= 1"),
        (1, (), "at least one crop"),
        (1, ("s100_c", "s100_c"), "more than once"),
        (1, "s100_c", "not the string"),
        (1, ("0/s100_c",), "invalid crop"),
    ],
)
def test_protocol_validation(clips, crops, match):
    with pytest.raises(ValueError, match=match):
        Protocol(clips, crops)


@pytest.mark.parametrize("text", ["", "10", "x3", "10x", "ax3", "10x3+", "2x1-centre", "3xs100_c+s100_c"])
def test_protocol_parse_rejects(text):
    with pytest.raises(ValueError, match="not a view protocol name"):
        Protocol.parse(text)


# ---------------------------------------------------------------------------------------------
# Clip placement (SlowFast test-time sampling)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_frames, clip_len, clips, starts",
    [
        (16, 5, 1, [6]),  # delta = 11, 11 / 2 = 5.5 rounds half up
        (16, 5, 2, [0, 11]),
        (16, 5, 10, [0, 1, 2, 4, 5, 6, 7, 9, 10, 11]),  # 11 * i / 9, rounded
        (15, 5, 1, [5]),
        (3, 5, 1, [0]),  # shorter than a clip: the loader pads
        (3, 5, 4, [0, 0, 0, 0]),
        (5, 5, 3, [0, 0, 0]),
        (0, 5, 2, [0, 0]),
        (100, 16, 3, [0, 42, 84]),
    ],
)
def test_clip_starts(n_frames, clip_len, clips, starts):
    got = clip_starts(n_frames, clip_len, clips)
    assert got == starts
    assert all(0 <= s <= max(n_frames - clip_len, 0) for s in got)


def test_clip_starts_uniform_and_ends_on_last_frame():
    starts = clip_starts(301, 5, 7)
    assert starts[0] == 0 and starts[-1] == 296
    assert np.allclose(np.diff(starts), 296 / 6, atol=1)


@pytest.mark.parametrize("args", [(-1, 5, 1), (10, 0, 1), (10, 5, 0)])
def test_clip_starts_rejects(args):
    with pytest.raises(ValueError):
        clip_starts(*args)


# ---------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------

VIEWS_2x3 = Protocol(2, CROPS3).view_names()


def scores_2x3() -> np.ndarray:
    """(2 videos, 6 views, 3 classes) of probabilities, every view different."""
    rng = np.random.default_rng(7)
    raw = rng.random((2, 6, 3))
    return raw / raw.sum(axis=2, keepdims=True)


def test_fuse_all_views_is_hand_average():
    s = np.array(
        [
            [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]],  # views 0/s100_tl, 0/s100_c, 0/s100_br
        ]
    )
    fused = fuse(s, ["0/s100_tl", "0/s100_c", "0/s100_br"])
    assert fused.shape == (1, 2) and fused.dtype == np.float64
    assert np.allclose(fused, [[(0.6 + 0.2 + 0.5) / 3, (0.4 + 0.8 + 0.5) / 3]])
    # The averaged view flips the decision of the center view alone.
    assert fused.argmax(1)[0] == 1 and fuse(s, ["0/s100_tl", "0/s100_c", "0/s100_br"], crops=["s100_tl"]).argmax(1)[0] == 0


@pytest.mark.parametrize(
    "clips, crops, picked",
    [
        (None, None, [0, 1, 2, 3, 4, 5]),
        (None, CENTER, [1, 4]),
        ([1], None, [3, 4, 5]),
        ([0], CENTER, [1]),
        ([1, 0], ["s100_br", "s100_tl"], [0, 2, 3, 5]),
        (range(2), CROPS3, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_fuse_subset_is_average_of_those_views(clips, crops, picked):
    s = scores_2x3()
    assert np.allclose(fuse(s, VIEWS_2x3, clips=clips, crops=crops), s[:, picked].mean(axis=1))


def test_fuse_with_protocol_selection():
    s = scores_2x3()
    assert np.allclose(fuse(s, VIEWS_2x3, **Protocol(1, CENTER).selection()), s[:, 1])


def test_fuse_view_order_does_not_matter():
    s = scores_2x3()
    perm = [5, 3, 1, 0, 4, 2]
    shuffled = [VIEWS_2x3[i] for i in perm]
    assert np.allclose(fuse(s[:, perm], shuffled, crops=CENTER), fuse(s, VIEWS_2x3, crops=CENTER))


@pytest.mark.parametrize(
    "clips, crops, match",
    [
        ([2], None, r"clips \[2\] \(stored: \[0, 1\]\)"),
        (None, ["s125_c"], r"crops \['s125_c'\]"),
        ([], None, "clips selects no clip"),
        (None, [], "crops selects no crop"),
    ],
)
def test_fuse_rejects_bad_selection(clips, crops, match):
    with pytest.raises(ValueError, match=match):
        fuse(scores_2x3(), VIEWS_2x3, clips=clips, crops=crops)


def test_fuse_rejects_incomplete_grid_and_bad_views():
    s = scores_2x3()[:, :5]  # 1/s100_br missing
    with pytest.raises(ValueError, match=r"not stored: \['1/s100_br'\]"):
        fuse(s, VIEWS_2x3[:5], crops=["s100_br"])
    with pytest.raises(ValueError, match="6 views but 5 view names"):
        fuse(scores_2x3(), VIEWS_2x3[:5])
    with pytest.raises(ValueError, match="more than once"):
        fuse(scores_2x3()[:, :2], ["0/s100_c", "0/s100_c"])
    with pytest.raises(ValueError, match="invalid view name"):
        fuse(scores_2x3()[:, :1], ["s100_c"])
    with pytest.raises(ValueError, match="videos, views, classes"):
        fuse(np.zeros((2, 3)), ["0/a", "0/b", "0/c"])


def test_parse_view():
    assert parse_view("12/s125_br_flip") == (12, "s125_br_flip")
    for bad in ["", "1", "a/s100_c", "1/", "/s100_c"]:
        with pytest.raises(ValueError):
            parse_view(bad)


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------

# 4 videos, 4 classes: ranks of the true class are 0, 1, 2, 3.
PROBS = np.array(
    [
        [0.7, 0.1, 0.1, 0.1],  # label 0: rank 0
        [0.5, 0.3, 0.1, 0.1],  # label 1: rank 1
        [0.4, 0.3, 0.2, 0.1],  # label 2: rank 2
        [0.4, 0.3, 0.2, 0.1],  # label 3: rank 3
    ]
)
LABELS = np.array([0, 1, 2, 3])


@pytest.mark.parametrize("k, expected", [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0), (5, 1.0), (100, 1.0)])
def test_topk_accuracy(k, expected):
    assert topk_accuracy(PROBS, LABELS, k) == pytest.approx(expected)


@pytest.mark.parametrize(
    "probs, label, k, correct",
    [
        ([0.5, 0.5, 0.0], 0, 1, True),  # tie: the lower index ranks first
        ([0.5, 0.5, 0.0], 1, 1, False),
        ([0.5, 0.5, 0.0], 1, 2, True),
        ([0.2, 0.4, 0.4], 2, 1, False),
        ([0.2, 0.4, 0.4], 2, 2, True),
        ([1 / 3, 1 / 3, 1 / 3], 2, 2, False),
        ([1 / 3, 1 / 3, 1 / 3], 2, 3, True),
    ],
)
def test_topk_ties_break_by_lower_class_index(probs, label, k, correct):
    assert topk_accuracy(np.array([probs]), np.array([label]), k) == float(correct)


def test_top1_ties_agree_with_argmax():
    rng = np.random.default_rng(0)
    p = rng.integers(0, 3, (200, 5)).astype(float)  # many ties
    y = rng.integers(0, 5, 200)
    assert topk_accuracy(p, y, 1) == pytest.approx(np.mean(p.argmax(1) == y))
    m = confusion_matrix(y, p.argmax(1), 5)
    assert topk_accuracy(p, y, 1) == pytest.approx(np.trace(m) / m.sum())


def test_topk_matches_sort_based_reference():
    rng = np.random.default_rng(1)
    p = rng.random((300, 12))
    y = rng.integers(0, 12, 300)
    for k in (1, 3, 5):
        topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
        assert topk_accuracy(p, y, k) == pytest.approx(np.mean((topk == y[:, None]).any(1)))


def test_mean_class_differs_from_top1_when_imbalanced():
    # Class 0: 8 videos, all right; class 1: 2 videos, both wrong (predicted 0).
    probs = np.array([[0.9, 0.1]] * 10)
    labels = np.array([0] * 8 + [1] * 2)
    assert topk_accuracy(probs, labels, 1) == pytest.approx(0.8)
    assert mean_class_accuracy(probs, labels, 2) == pytest.approx(0.5)


def test_mean_class_ignores_absent_classes():
    probs = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    labels = np.array([0, 1, 1])  # class 2 never occurs
    assert mean_class_accuracy(probs, labels, 3) == pytest.approx((1.0 + 0.5) / 2)


def test_classification_metrics():
    m = classification_metrics(PROBS, LABELS, 4)
    assert set(m) == {"top1", "top5", "mean_class"}
    assert m["top1"] == pytest.approx(0.25)
    assert m["top5"] == 1.0  # k capped at C = 4
    assert m["mean_class"] == pytest.approx(0.25)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: topk_accuracy(np.zeros((0, 3)), np.zeros(0, int), 1), "zero videos"),
        (lambda: classification_metrics(np.zeros((0, 3)), np.zeros(0, int), 3), "zero videos"),
        (lambda: mean_class_accuracy(PROBS, np.array([0, 1, 4, -1]), 4), r"outside \[0, 4\): \[-1, 4\]"),
        (lambda: topk_accuracy(PROBS, np.array([0, 1, 7, 7]), 1), r"\[7\]"),
        (lambda: topk_accuracy(PROBS, LABELS[:3], 1), "4 rows of probabilities but 3 labels"),
        (lambda: topk_accuracy(PROBS, LABELS, 0), "k must be"),
        (lambda: topk_accuracy(PROBS, np.array([0.5, 1, 2, 3]), 1), "integer class indices"),
        (lambda: topk_accuracy(np.full((1, 2), np.nan), np.array([0]), 1), "NaN"),
        (lambda: classification_metrics(PROBS, LABELS, 5), "n_classes is 5"),
        (lambda: confusion_matrix(np.array([0, 1]), np.array([0, 2]), 2), r"predictions outside \[0, 2\): \[2\]"),
        (lambda: confusion_matrix(np.array([], int), np.array([], int), 2), "zero videos"),
    ],
)
def test_metric_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_confusion_matrix_and_per_class():
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 0, 2])
    m = confusion_matrix(labels, preds, 4)
    assert m.dtype == np.int64 and m.shape == (4, 4)
    assert m.tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    rows = per_class_accuracy(labels, preds, ["a", "b", "c", "d"])
    assert rows == [
        {"class": "a", "index": 0, "videos": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)},
        {"class": "b", "index": 1, "videos": 2, "correct": 1, "accuracy": 0.5},
        {"class": "c", "index": 2, "videos": 1, "correct": 1, "accuracy": 1.0},
        {"class": "d", "index": 3, "videos": 0, "correct": 0, "accuracy": None},
    ]


# ---------------------------------------------------------------------------------------------
# Re-fusing stored predictions
# ---------------------------------------------------------------------------------------------


def predictions_table(scores: np.ndarray, views: list[str], labels: np.ndarray) -> pa.Table:
    """Rows shaped like the catalog's `predictions` view (float32 scores, as stored)."""
    return pa.table(
        {
            "label_index": pa.array(labels, pa.int32()),
            "views": pa.array([views] * len(labels), pa.list_(pa.string())),
            "view_scores": pa.array(scores.astype(np.float32).tolist(), pa.list_(pa.list_(pa.float32()))),
        }
    )


@pytest.mark.parametrize("clips, crops", [(None, None), (None, CENTER), ([0], None), ([1], ["s100_tl", "s100_br"])])
def test_metrics_from_predictions_matches_arrays(clips, crops):
    rng = np.random.default_rng(3)
    n, c = 40, 7
    raw = rng.random((n, 6, c)) ** 4
    scores = (raw / raw.sum(2, keepdims=True)).astype(np.float32)
    labels = rng.integers(0, c, n)
    table = predictions_table(scores, VIEWS_2x3, labels)
    expected = classification_metrics(fuse(scores.astype(np.float64), VIEWS_2x3, clips=clips, crops=crops), labels, c)
    got = metrics_from_predictions(table, c, clips=clips, crops=crops)
    assert got == pytest.approx(expected)


def test_metrics_from_predictions_chunked_and_reordered_rows():
    rng = np.random.default_rng(4)
    scores = rng.random((6, 6, 3))
    labels = rng.integers(0, 3, 6)
    first = predictions_table(scores[:3], VIEWS_2x3, labels[:3])
    perm = [2, 0, 1, 5, 4, 3]
    second = predictions_table(scores[3:, perm], [VIEWS_2x3[i] for i in perm], labels[3:])
    table = pa.concat_tables([first, second])
    assert table.column("view_scores").num_chunks == 2
    expected = classification_metrics(fuse(scores.astype(np.float32), VIEWS_2x3, crops=CENTER), labels, 3)
    assert metrics_from_predictions(table, 3, crops=CENTER) == pytest.approx(expected)


def test_metrics_from_predictions_errors():
    scores = np.full((2, 6, 3), 1 / 3)
    table = predictions_table(scores, VIEWS_2x3, np.array([0, 1]))
    with pytest.raises(ValueError, match="zero videos"):
        metrics_from_predictions(table.slice(0, 0), 3)
    with pytest.raises(ValueError, match="expected n_classes = 4"):
        metrics_from_predictions(table, 4)
    with pytest.raises(ValueError, match="lack columns"):
        metrics_from_predictions(table.drop_columns(["views"]), 3)
    with pytest.raises(ValueError, match=r"clips \[5\]"):
        metrics_from_predictions(table, 3, clips=[5])


# ---------------------------------------------------------------------------------------------
# Confusion matrix picture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [4, 45, 400])
def test_confusion_png(tmp_path, n_classes):
    rng = np.random.default_rng(n_classes)
    labels = rng.integers(0, n_classes, 20 * n_classes)
    preds = np.where(rng.random(labels.size) < 0.7, labels, rng.integers(0, n_classes, labels.size))
    m = confusion_matrix(labels, preds, n_classes)
    classes = [f"class_{i}" for i in range(n_classes)]
    start = time.perf_counter()
    path = confusion_png(m, classes, tmp_path / "sub" / "confusion.png", title=f"{n_classes} classes")
    elapsed = time.perf_counter() - start
    assert path == tmp_path / "sub" / "confusion.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        # Big enough to show every cell, never absurdly large.
        assert n_classes <= w < 4000 and n_classes <= h < 4000
        assert w >= 200 and h >= 150
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 3  # not a blank canvas
    assert elapsed < 1.0


def test_confusion_png_colours_rows_by_share(tmp_path):
    def colours(matrix) -> set[tuple[int, int, int]]:
        path = confusion_png(np.array(matrix), ["a", "b"], tmp_path / "c.png")
        with Image.open(path) as img:
            return set(map(tuple, np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()))

    darkest, lightest, no_videos = (8, 48, 107), (247, 251, 255), (235, 228, 216)
    # A row entirely on one cell is the darkest colour whatever its count.
    assert {darkest, lightest} <= colours([[10, 0], [0, 1]])
    assert no_videos in colours([[0, 0], [0, 3]])
    assert no_videos not in colours([[1, 0], [0, 3]])


def test_confusion_png_rejects_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 class names"):
        confusion_png(np.zeros((2, 2), int), ["a", "b", "c"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        confusion_png(np.zeros((2, 3), int), ["a", "b"], tmp_path / "x.png")
