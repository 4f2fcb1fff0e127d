"""The results report (VIMPAC Table 7 layout): pivot of the catalog's `results` view, split
averaging in SQL, split-count annotations, unambiguous row labels, filters and outputs."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from itertools import count

import pyarrow as pa
import pytest

from stages.evaluate.report import MISSING, build_report
from warehouse.catalog import Catalog
from warehouse.tables import now, write_rows

RUN_A = "aaaaaaaa1111"
RUN_B = "bbbbbbbb2222"


@pytest.fixture
def catalog(tmp_path) -> Catalog:
    cat = Catalog(tmp_path / "home")
    cat.ensure_tables()
    return cat


_ids = count()


def add(
    catalog: Catalog,
    dataset: str,
    split: str,
    recipe: str,
    top1: float,
    *,
    run: str | None = RUN_A,
    finetune: str = "full",
    protocol: str = "10x3",
    grid: str | None = "g",
    top5: float | None = None,
    mean_class: float | None = None,
    eval_id: str | None = None,
    at=None,
) -> str:
    """Write one evaluation's results file (one row per metric) the way the evaluate stage does."""
    eval_id = eval_id or f"e{next(_ids):04d}"
    values = {
        "top1": top1,
        "top5": top5 if top5 is not None else min(1.0, top1 + 0.2),
        "mean_class": mean_class if mean_class is not None else top1 - 0.05,
    }
    base = {
        "eval_id": eval_id,
        "dataset": dataset,
        "split": split,
        "pretrain_run": run if recipe != "scratch" else None,
        "finetune_run": f"ft-{eval_id}",
        "tokenizer": "dalle",
        "protocol": protocol,
        "pretrain_model": "small",
        "pretrain_recipe": recipe,
        "finetune_recipe": finetune,
        "grid": grid,
        "eval_split": f"test{split}",
        "train_split": f"train{split}",
        "n_videos": 100,
        "n_classes": 101,
        "token_shards": ["s0"],
        "run_id": "r",
        "code_version": "v",
        "created_at": at or now(),
    }
    rows = [dict(base, metric=m, value=v) for m, v in values.items()]
    write_rows("results", rows, catalog.root.home / "tables" / "results" / dataset / f"{eval_id}.parquet")
    return eval_id


def table7(catalog: Catalog) -> None:
    """scratch and one pretrained recipe on UCF101 (3 splits), HMDB51 (2 of 3 for scratch), SSv2 (val)."""
    for split, v in zip("123", (0.5, 0.6, 0.7)):
        add(catalog, "ucf101", split, "small-5x128-mp+cl", v)
    for split, v in zip("123", (0.30, 0.32, 0.34)):
        add(catalog, "hmdb51", split, "small-5x128-mp+cl", v)
    for split, v in zip("12", (0.40, 0.45)):
        add(catalog, "ucf101", split, "scratch", v)
    add(catalog, "hmdb51", "1", "scratch", 0.2)
    add(catalog, "ssv2", "val", "small-5x128-mp+cl", 0.55, protocol="2x1-center")


def cell(report, label: str, column: str):
    row = next(r for r in report.rows if r.label == label)
    return row.cells[report.columns.index(column)]


def text(report, label: str, column: str) -> str:
    i = [r.label for r in report.rows].index(label)
    return report.cell_text(i, report.columns.index(column))


def test_empty_results_give_empty_report(catalog):
    report = build_report(catalog)
    assert report.rows == [] and report.columns == []
    assert "no results yet" in report.to_markdown()
    assert report.to_arrow().num_rows == 0
    assert report.to_csv().splitlines()[0].startswith("recipe,dataset,value,n_splits,splits")


def test_pivot_and_split_average(catalog):
    table7(catalog)
    report = build_report(catalog)
    assert report.metric == "top1"
    assert report.columns == ["hmdb51", "ssv2", "ucf101"]  # alphabetical
    assert [r.label for r in report.rows] == ["scratch", "small-5x128-mp+cl"]
    ucf = cell(report, "small-5x128-mp+cl", "ucf101")
    assert ucf.value == pytest.approx(60.0) and ucf.n_splits == 3 and ucf.splits == ("1", "2", "3")
    assert cell(report, "small-5x128-mp+cl", "hmdb51").value == pytest.approx(32.0)
    assert cell(report, "scratch", "ucf101").value == pytest.approx(42.5)
    assert cell(report, "scratch", "ssv2").value is None
    assert report.protocols == {"hmdb51": ["10x3"], "ssv2": ["2x1-center"], "ucf101": ["10x3"]}


def test_fewer_splits_are_annotated(catalog):
    table7(catalog)
    report = build_report(catalog)
    assert text(report, "small-5x128-mp+cl", "ucf101") == "60.0"
    assert text(report, "scratch", "ucf101") == "42.5 (2 splits)"
    assert text(report, "scratch", "hmdb51") == "20.0 (1 split)"
    assert text(report, "small-5x128-mp+cl", "ssv2") == "55.0"  # one split, as every ssv2 cell
    assert text(report, "scratch", "ssv2") == MISSING


def test_repeated_split_counts_once(catalog):
    # Split 1 evaluated twice (0.4 and 0.6 -> 0.5); split 2 once (0.8): (0.5 + 0.8) / 2, not (0.4 + 0.6 + 0.8) / 3.
    add(catalog, "ucf101", "1", "r", 0.4)
    add(catalog, "ucf101", "1", "r", 0.6)
    add(catalog, "ucf101", "2", "r", 0.8)
    report = build_report(catalog)
    c = cell(report, "r", "ucf101")
    assert c.value == pytest.approx(65.0) and c.n_splits == 2 and c.max_evals == 2
    assert any("more than once" in note for note in report.footnotes)


def test_rerun_of_same_eval_keeps_newest(catalog):
    t = now()
    add(catalog, "ucf101", "1", "r", 0.4, eval_id="same", at=t - timedelta(hours=1))
    write_rows(
        "results",
        [
            {
                "eval_id": "same",
                "dataset": "ucf101",
                "split": "1",
                "pretrain_run": RUN_A,
                "pretrain_recipe": "r",
                "finetune_recipe": "full",
                "protocol": "10x3",
                "grid": "g",
                "metric": "top1",
                "value": 0.9,
                "created_at": t,
            }
        ],
        catalog.root.home / "tables" / "results" / "ucf101" / "same-rerun.parquet",
    )
    assert cell(build_report(catalog), "r", "ucf101").value == pytest.approx(90.0)


@pytest.mark.parametrize("metric, expected", [("top1", 60.0), ("top5", 80.0), ("mean_class", 55.0)])
def test_metric_selection(catalog, metric, expected):
    table7(catalog)
    report = build_report(catalog, metric=metric)
    assert report.metric == metric
    assert cell(report, "small-5x128-mp+cl", "ucf101").value == pytest.approx(expected)


def test_unknown_metric_names_what_exists(catalog):
    table7(catalog)
    with pytest.raises(ValueError, match=r"metric='top3'.*metrics \['mean_class', 'top1', 'top5'\]"):
        build_report(catalog, metric="top3")


def test_grid_filter(catalog):
    add(catalog, "ucf101", "1", "small", 0.5, grid="g1")
    add(catalog, "ucf101", "1", "small", 0.9, grid="g2", run=RUN_B)
    add(catalog, "hmdb51", "1", "small", 0.3, grid="g2", run=RUN_B)
    report = build_report(catalog, grid="g1")
    assert report.grid == "g1" and "g1" in report.title
    assert report.columns == ["ucf101"]
    assert [r.label for r in report.rows] == ["small"]  # one run within the grid: no run suffix
    assert report.rows[0].cells[0].value == pytest.approx(50.0)
    assert build_report(catalog, grid="g2").columns == ["hmdb51", "ucf101"]
    with pytest.raises(ValueError, match=r"grids \['g1', 'g2'\]"):
        build_report(catalog, grid="nope")


def test_datasets_filter_sets_column_order(catalog):
    table7(catalog)
    report = build_report(catalog, datasets=["ucf101", "ssv2", "kinetics"])
    assert report.columns == ["ucf101", "ssv2"]  # given order, no-data columns dropped
    # A row with no data in the chosen columns disappears.
    assert [r.label for r in build_report(catalog, datasets=["ssv2"]).rows] == ["small-5x128-mp+cl"]


def test_ambiguous_recipe_gets_run_prefix(catalog):
    add(catalog, "ucf101", "1", "small", 0.5, run=RUN_A)
    add(catalog, "ucf101", "1", "small", 0.7, run=RUN_B)
    add(catalog, "ucf101", "1", "scratch", 0.3)
    add(catalog, "ucf101", "1", "base", 0.8, run="cccccccc")
    report = build_report(catalog)
    assert [r.label for r in report.rows] == ["scratch", "base", "small [aaaaaaaa]", "small [bbbbbbbb]"]
    assert cell(report, "small [bbbbbbbb]", "ucf101").value == pytest.approx(70.0)
    assert any("pretraining run id" in note for note in report.footnotes)


def test_run_prefix_grows_until_unique(catalog):
    add(catalog, "ucf101", "1", "small", 0.5, run="12345678aa")
    add(catalog, "ucf101", "1", "small", 0.7, run="12345678bb")
    assert [r.label for r in build_report(catalog).rows] == ["small [12345678a]", "small [12345678b]"]


def test_several_finetune_recipes_are_named(catalog):
    add(catalog, "ucf101", "1", "small", 0.5, finetune="full")
    add(catalog, "ucf101", "1", "small", 0.4, finetune="linear")
    add(catalog, "ucf101", "1", "scratch", 0.3, finetune="full")
    report = build_report(catalog)
    assert [r.label for r in report.rows] == ["scratch / full", "small / full", "small / linear"]
    assert cell(report, "small / linear", "ucf101").value == pytest.approx(40.0)


def test_dataset_with_two_protocols_gets_two_columns(catalog):
    add(catalog, "ssv2", "val", "small", 0.5, protocol="2x1-center")
    add(catalog, "ssv2", "val", "small", 0.4, protocol="1x1-center")
    add(catalog, "ucf101", "1", "small", 0.6)
    report = build_report(catalog)
    assert report.columns == ["ssv2 (1x1-center)", "ssv2 (2x1-center)", "ucf101"]
    assert [c.value for c in report.rows[0].cells] == pytest.approx([40.0, 50.0, 60.0])


def test_markdown(catalog):
    table7(catalog)
    md = build_report(catalog).to_markdown()
    lines = md.splitlines()
    assert "top-1 accuracy" in lines[0]
    assert any(line.startswith("Metric: top-1 accuracy (%)") and "ssv2 2x1-center" in line and "ucf101 10x3" in line for line in lines)
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| Pretraining | hmdb51 | ssv2 | ucf101 |"
    assert table[1] == "| --- | ---: | ---: | ---: |"
    assert table[2] == f"| scratch | 20.0 (1 split) | {MISSING} | 42.5 (2 splits) |"
    assert table[3] == "| small-5x128-mp+cl | 32.0 | 55.0 | 60.0 |"
    notes = [line for line in lines if line[:1].isdigit()]
    assert any("splits found" in n and "ucf101: 1, 2, 3" in n for n in notes)
    assert any('"(n splits)"' in n for n in notes)


def test_markdown_escapes_pipes(catalog):
    add(catalog, "ucf101", "1", "a|b", 0.5)
    assert "| a\\|b | 50.0 |" in build_report(catalog).to_markdown()


def test_csv(catalog):
    table7(catalog)
    rows = list(csv.DictReader(io.StringIO(build_report(catalog).to_csv())))
    assert list(rows[0])[:5] == ["recipe", "dataset", "value", "n_splits", "splits"]
    by_key = {(r["recipe"], r["dataset"]): r for r in rows}
    assert len(rows) == 5  # scratch x ssv2 was never evaluated
    ucf = by_key[("small-5x128-mp+cl", "ucf101")]
    assert float(ucf["value"]) == pytest.approx(60.0) and ucf["n_splits"] == "3" and ucf["splits"] == "1;2;3"
    assert ucf["pretrain_run"] == RUN_A and ucf["protocol"] == "10x3" and ucf["metric"] == "top1"
    assert by_key[("scratch", "ucf101")]["splits"] == "1;2"


def test_arrow(catalog):
    table7(catalog)
    table = build_report(catalog).to_arrow()
    assert table.column_names == ["recipe", "hmdb51", "ssv2", "ucf101"]
    assert all(t == pa.string() for t in table.schema.types)
    assert table.to_pylist()[0] == {"recipe": "scratch", "hmdb51": "20.0 (1 split)", "ssv2": MISSING, "ucf101": "42.5 (2 splits)"}
