"""The results report (VIMPAC Table 7 layout): pivot of the catalog's `results` view, split
averaging in SQL, split-count annotations, unambiguous row labels, filters and outputs; seeds
(mean +- std, n), paired differences with confidence intervals against a baseline row, probe and
bag-of-codes rows, chance level, and results files written before the protocol/view split."""

from __future__ import annotations

import csv
import math
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
    finetune: str | None = "full",
    protocol: str = "finetune",
    view: str | None = "10x3",
    seed: int | None = None,
    n_classes: int | None = 101,
    grid: str | None = "g",
    top5: float | None = None,
    mean_class: float | None = None,
    eval_id: str | None = None,
    at=None,
) -> str:
    """Write one evaluation's results file (one row per metric) the way the evaluate stage does:
    `protocol` the method (finetune, linear_probe:cls, ...), `view` the view protocol."""
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
        "pretrain_run": run if recipe not in ("scratch", "bag-of-codes") else None,
        "finetune_run": f"ft-{eval_id}" if protocol == "finetune" else None,
        "tokenizer": "dalle",
        "protocol": protocol,
        "view_protocol": view,
        "seed": seed,
        "n_train": 300,
        "pretrain_model": "small",
        "pretrain_recipe": recipe,
        "finetune_recipe": finetune,
        "grid": grid,
        "eval_split": f"test{split}",
        "train_split": f"train{split}",
        "n_videos": 100,
        "n_classes": n_classes,
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
    add(catalog, "ssv2", "val", "small-5x128-mp+cl", 0.55, view="2x1-center")


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
    assert report.view_protocols == {"hmdb51": ["10x3"], "ssv2": ["2x1-center"], "ucf101": ["10x3"]}


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


def test_dataset_with_two_view_protocols_gets_two_columns(catalog):
    add(catalog, "ssv2", "val", "small", 0.5, view="2x1-center")
    add(catalog, "ssv2", "val", "small", 0.4, view="1x1-center")
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
    assert table[2] == "| chance | 1.0 | 1.0 | 1.0 |"  # 100 / 101 classes
    assert table[3] == f"| scratch | 20.0 (1 split) | {MISSING} | 42.5 (2 splits) |"
    assert table[4] == "| small-5x128-mp+cl | 32.0 | 55.0 | 60.0 |"
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
    assert ucf["pretrain_run"] == RUN_A and ucf["protocol"] == "finetune" and ucf["view_protocol"] == "10x3"
    assert ucf["metric"] == "top1" and ucf["n"] == "1" and ucf["std"] == "" and float(ucf["chance"]) == pytest.approx(100 / 101)
    assert by_key[("scratch", "ucf101")]["splits"] == "1;2"


def test_arrow(catalog):
    table7(catalog)
    table = build_report(catalog).to_arrow()
    assert table.column_names == ["recipe", "hmdb51", "ssv2", "ucf101"]
    assert all(t == pa.string() for t in table.schema.types)
    assert table.to_pylist()[0] == {"recipe": "chance", "hmdb51": "1.0", "ssv2": "1.0", "ucf101": "1.0"}
    assert table.to_pylist()[1] == {"recipe": "scratch", "hmdb51": "20.0 (1 split)", "ssv2": MISSING, "ucf101": "42.5 (2 splits)"}


# --- the results view: protocol = evaluation method, view_protocol = test-time views ---------


def test_old_format_rows_read_as_finetune(catalog):
    """A results file written before schema 5 (no view_protocol, seed, n_train columns; its
    views in `protocol`) reads as a fine-tuning under that view protocol, beside new rows."""
    from warehouse.tables import SCHEMAS, write_parquet_atomic

    old_schema = pa.schema([f for f in SCHEMAS["results"] if f.name not in ("view_protocol", "seed", "n_train")])
    old = pa.Table.from_pylist(
        [
            {"eval_id": "old", "dataset": "ucf101", "split": "1", "pretrain_run": RUN_A, "pretrain_recipe": "small",
             "finetune_recipe": "full", "protocol": "10x3", "metric": "top1", "value": 0.5, "n_classes": 101, "created_at": now()}
        ],
        schema=old_schema,
    )
    write_parquet_atomic(old, catalog.root.home / "tables" / "results" / "ucf101" / "old.parquet")
    add(catalog, "ucf101", "2", "small", 0.7, eval_id="new")
    add(catalog, "ucf101", "1", "small", 0.3, protocol="linear_probe:cls", view="4x1-center", finetune=None, seed=0, eval_id="probe")
    columns = catalog.query("SELECT * FROM results LIMIT 0").column_names
    assert columns[:22] == [
        "eval_id", "dataset", "split", "pretrain_run", "finetune_run", "tokenizer", "protocol", "metric", "value",
        "pretrain_model", "pretrain_recipe", "finetune_recipe", "grid", "eval_split", "train_split", "n_videos",
        "n_classes", "token_shards", "checkpoint", "run_id", "code_version", "created_at"]
    assert columns[22:] == ["view_protocol", "seed", "n_train"]
    got = catalog.rows("SELECT eval_id, protocol, view_protocol, seed, n_train FROM results WHERE metric = 'top1' ORDER BY 1")
    assert got == [("new", "finetune", "10x3", None, 300), ("old", "finetune", "10x3", None, None),
                   ("probe", "linear_probe:cls", "4x1-center", 0, 300)]
    report = build_report(catalog, grid=None)
    # The old split-1 row and the new split-2 row are one fine-tuned cell: (50 + 70) / 2.
    assert [r.label for r in report.rows] == ["small · finetune", "small · linear_probe:cls"]
    ucf = cell(report, "small · finetune", "ucf101")
    assert ucf.value == pytest.approx(60.0) and ucf.splits == ("1", "2") and ucf.view_protocol == "10x3"
    assert report.view_protocol_methods == {"ucf101": {"10x3": ["finetune"], "4x1-center": ["linear_probe:cls"]}}
    assert "ucf101 10x3 (finetune), 4x1-center (linear_probe:cls)" in report.caption()


# --- seeds: mean +- sample std (n) ------------------------------------------------------------


def seeded(catalog, recipe: str, values: dict[int | None, dict[str, float]], dataset: str = "ucf101", **kw) -> None:
    for seed, by_split in values.items():
        for split, v in by_split.items():
            add(catalog, dataset, split, recipe, v, seed=seed, **kw)


def test_seeds_mean_std_by_hand(catalog):
    # Per seed, the mean over splits 1 and 2 (split 1 of seed 1 evaluated twice: 0.60 and 0.64 -> 0.62):
    #   seed 0: (60 + 70) / 2 = 65;  seed 1: (62 + 74) / 2 = 68;  seed 2: (55 + 71) / 2 = 63
    # mean = 196 / 3 = 65.333; deviations -1/3, 8/3, -7/3; squares sum 114/9 = 12.667;
    # sample variance 12.667 / 2 = 6.333; std = 2.5166.
    seeded(catalog, "small", {0: {"1": 0.60, "2": 0.70}, 1: {"1": 0.60, "2": 0.74}, 2: {"1": 0.55, "2": 0.71}})
    add(catalog, "ucf101", "1", "small", 0.64, seed=1)
    report = build_report(catalog)
    c = report.rows[0].cells[0]
    assert c.value == pytest.approx(196 / 3) and c.std == pytest.approx(2.516611, abs=1e-5)
    assert c.n_seeds == 3 and c.seeds == (0, 1, 2) and c.seed_values == pytest.approx((65.0, 68.0, 63.0))
    assert c.n_splits == 2 and c.max_evals == 2
    assert report.cell_text(0, 0) == "65.3 ± 2.5 (n=3)"
    assert "mean ± sample std over seeds" in report.caption()
    row = next(csv.DictReader(io.StringIO(report.to_csv())))
    assert row["n"] == "3" and row["seeds"] == "0;1;2" and float(row["std"]) == pytest.approx(2.516611, abs=1e-5)
    assert [float(v) for v in row["seed_values"].split(";")] == pytest.approx([65.0, 68.0, 63.0])


def test_one_seed_and_no_seed_render_as_before(catalog):
    seeded(catalog, "a", {0: {"1": 0.5}})
    seeded(catalog, "b", {None: {"1": 0.25, "2": 0.35}})  # rows without a seed: one seed
    report = build_report(catalog)
    assert text(report, "a", "ucf101") == "50.0 (1 split)"
    assert text(report, "b", "ucf101") == "30.0"
    assert cell(report, "b", "ucf101").n_seeds == 1 and cell(report, "b", "ucf101").std is None


def test_null_seed_counts_as_one_seed_beside_others(catalog):
    seeded(catalog, "a", {None: {"1": 0.40}, 0: {"1": 0.50}, 1: {"1": 0.60}})
    c = build_report(catalog).rows[0].cells[0]
    assert c.n_seeds == 3 and c.seeds == (None, 0, 1) and c.value == pytest.approx(50.0) and c.std == pytest.approx(10.0)


def test_seeds_with_different_splits_are_footnoted(catalog):
    seeded(catalog, "a", {0: {"1": 0.4, "2": 0.6}, 1: {"1": 0.7}})
    report = build_report(catalog)
    c = report.rows[0].cells[0]
    assert c.value == pytest.approx(60.0) and c.n_splits == 2 and c.min_seed_splits == 1  # (50 + 70) / 2
    assert any("different splits" in n and "a on ucf101" in n for n in report.footnotes)


# --- paired differences against a baseline ----------------------------------------------------


def test_t_quantiles():
    from stages.evaluate.report import confidence_interval, t_quantile_975

    # Published two-sided 95% values.
    for df, t in {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 19: 2.093, 29: 2.045, 30: 2.042}.items():
        assert t_quantile_975(df) == pytest.approx(t, abs=6e-4)
    assert t_quantile_975(35) == t_quantile_975(30)  # between entries: the smaller df (a wider interval)
    assert t_quantile_975(60) == pytest.approx(2.000, abs=6e-4) and t_quantile_975(1000) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)
    # Every entry: the Student t CDF at the tabulated value is 0.975 (numerical integration of the density).
    import math

    import numpy as np

    from stages.evaluate.report import T975

    for df, t in T975.items():
        x = np.linspace(0.0, t, 200_001)
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        pdf = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        cdf = 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))
        assert cdf == pytest.approx(0.975, abs=2e-5), df
    assert confidence_interval(10.0, 2.0, 1) is None
    lo, hi = confidence_interval(10.0, 2.0, 4)  # half width 3.1824 * 2 / 2
    assert (lo, hi) == pytest.approx((10.0 - 3.1824, 10.0 + 3.1824))


def test_paired_difference_by_hand(catalog):
    seeded(catalog, "scratch", {0: {"1": 0.40, "2": 0.50}, 1: {"1": 0.42, "2": 0.46}, 2: {"1": 0.38}})
    seeded(catalog, "small", {0: {"1": 0.55, "2": 0.60, "3": 0.90}, 1: {"1": 0.50, "2": 0.58}, 2: {"1": 0.52, "2": 0.99}, 3: {"1": 0.99}})
    report = build_report(catalog, baseline="scratch")
    # Only (split, seed) pairs both rows have: seed 0 splits 1, 2; seed 1 splits 1, 2; seed 2 split 1.
    # Split 3 and seed 3 (no scratch result) and small's seed 2 split 2 (scratch lacks it) are left out.
    #   seed 0: (15 + 10) / 2 = 12.5;  seed 1: (8 + 12) / 2 = 10.0;  seed 2: 14.0
    # mean = 36.5 / 3 = 12.1667; deviations 1/3, -13/6, 11/6; squares sum 49/6; variance 49/12;
    # sd = 2.0207; sd / sqrt(3) = 7/6; t(0.975, 2) = 4.3027; half width 4.3027 * 7/6 = 5.0198.
    d = cell_diff(report, "small", "ucf101")
    assert d.status == "ok" and d.n == 3 and d.seeds == (0, 1, 2) and d.n_pairs == 5
    assert d.seed_diffs == pytest.approx((12.5, 10.0, 14.0))
    assert d.value == pytest.approx(36.5 / 3) and d.sd == pytest.approx(math.sqrt(49 / 12))
    assert d.ci == pytest.approx((36.5 / 3 - 4.3027 * 7 / 6, 36.5 / 3 + 4.3027 * 7 / 6), abs=1e-6)
    assert d.baseline == "scratch"
    i = [r.label for r in report.rows].index("small")
    assert report.diff_text(i, 0) == "+12.2 [+7.1, +17.2] (n=3)"
    assert report.diff_text(0, 0) == "baseline"
    assert any("only some of the row's (split, seed) results" in n and "small on ucf101 (5 of 8)" in n for n in report.footnotes)
    md = report.to_markdown()
    assert "**Paired difference vs scratch (points of top-1 accuracy, mean [95% CI] over seeds)**" in md
    assert "| small | +12.2 [+7.1, +17.2] (n=3) |" in md and "| scratch | baseline |" in md
    rows = {r["recipe"]: r for r in csv.DictReader(io.StringIO(report.to_csv()))}
    assert rows["scratch"]["baseline"] == "baseline" and rows["scratch"]["diff"] == ""
    small = rows["small"]
    assert small["baseline"] == "scratch" and small["n_diff"] == "3" and small["n_pairs"] == "5"
    assert float(small["diff"]) == pytest.approx(36.5 / 3) and float(small["ci_low"]) == pytest.approx(36.5 / 3 - 4.3027 * 7 / 6, abs=1e-5)
    assert report.diff_to_arrow().to_pylist() == [
        {"recipe": "scratch", "ucf101": "baseline"},
        {"recipe": "small", "ucf101": "+12.2 [+7.1, +17.2] (n=3)"},
    ]
    assert build_report(catalog).diff_to_arrow() is None


def test_one_seed_difference_has_no_interval(catalog):
    add(catalog, "ucf101", "1", "scratch", 0.30)  # no seed on either side: the pair still counts
    add(catalog, "ucf101", "1", "small", 0.45)
    add(catalog, "ucf101", "2", "small", 0.90, seed=7)  # no scratch result with seed 7: unpaired
    report = build_report(catalog, baseline="scratch")
    d = cell_diff(report, "small", "ucf101")
    assert d.n == 1 and d.ci is None and d.value == pytest.approx(15.0) and d.seeds == (None,)
    assert report.diff_text(1, 0) == "+15.0 (n=1, no CI)"
    assert any("n=1: one seed, no interval" in n for n in report.footnotes)


def test_no_common_pair_is_a_dash_with_a_footnote(catalog):
    add(catalog, "ucf101", "1", "scratch", 0.3, seed=0)
    add(catalog, "ucf101", "1", "small", 0.5, seed=1)  # another seed: nothing to pair
    add(catalog, "hmdb51", "1", "small", 0.4, seed=0)  # scratch never evaluated hmdb51
    report = build_report(catalog, baseline="scratch")
    i = [r.label for r in report.rows].index("small")
    assert report.diff_text(i, report.columns.index("ucf101")) == MISSING
    assert report.diff_text(i, report.columns.index("hmdb51")) == MISSING
    assert report.diff_text(0, report.columns.index("hmdb51")) == "baseline"
    assert any("no (split, seed) result in common" in n and "small on hmdb51; small on ucf101" in n for n in report.footnotes)


def test_unknown_or_ambiguous_baseline_names_the_rows(catalog):
    add(catalog, "ucf101", "1", "small", 0.5, run=RUN_A)
    add(catalog, "ucf101", "1", "small", 0.7, run=RUN_B)
    with pytest.raises(ValueError, match=r"baseline 'nope'.*rows: \['small \[aaaaaaaa\]', 'small \[bbbbbbbb\]'\]"):
        build_report(catalog, baseline="nope")
    with pytest.raises(ValueError, match=r"ambiguous"):
        add(catalog, "ucf101", "1", "other", 0.7)
        build_report(catalog, baseline="small")
    # A row label picks one row.
    assert cell_diff(build_report(catalog, baseline="small [aaaaaaaa]"), "small [bbbbbbbb]", "ucf101").value == pytest.approx(20.0)


# --- probes, the bag-of-codes floor and chance level ------------------------------------------


def demo_grid(catalog) -> None:
    """The demo's layout: a temporal set (4 classes) and a spatial one (10), fine-tuned and probed."""
    for dataset, n_classes in (("demo-motion", 4), ("demo-spatial", 10)):
        common = dict(n_classes=n_classes, grid="demo")
        for recipe, base in (("scratch", 0.3), ("tiny-5x64-mp+cl", 0.6)):
            for seed in (0, 1):
                if recipe == "scratch":
                    add(catalog, dataset, "1", "bag-of-codes", 0.40, protocol="bag_of_codes", view="1x1-center", finetune=None, seed=seed, **common)
                add(catalog, dataset, "1", recipe, base + 0.02 * seed, view="2x3", seed=seed, **common)
                add(catalog, dataset, "1", recipe, base - 0.1, protocol="linear_probe:cls", view="4x1-center", finetune=None, seed=seed, **common)
        add(catalog, dataset, "1", "tiny-5x64-mp+cl", 0.5, protocol="knn:mean", view="4x1-center", finetune=None, seed=0, **common)


def test_chance_floor_and_probe_rows(catalog):
    demo_grid(catalog)
    report = build_report(catalog, grid="demo")
    assert report.columns == ["demo-motion", "demo-spatial"]  # probe views do not split a column
    assert [r.label for r in report.rows] == [
        "bag-of-codes",
        "scratch · finetune",
        "scratch · linear_probe:cls",
        "tiny-5x64-mp+cl · finetune",
        "tiny-5x64-mp+cl · linear_probe:cls",
        "tiny-5x64-mp+cl · knn:mean",
    ]
    assert [r.protocol for r in report.rows][:2] == ["bag_of_codes", "finetune"]
    assert report.chance == [(25.0, 25.0), (10.0, 10.0)]
    assert cell(report, "tiny-5x64-mp+cl · finetune", "demo-motion").value == pytest.approx(61.0)
    table = [line for line in report.to_markdown().splitlines() if line.startswith("|")]
    assert table[:4] == [
        "| Pretraining | demo-motion | demo-spatial |",
        "| --- | ---: | ---: |",
        "| chance | 25.0 | 10.0 |",
        "| bag-of-codes | 40.0 ± 0.0 (n=2) | 40.0 ± 0.0 (n=2) |",
    ]
    assert table[4] == "| scratch · finetune | 31.0 ± 1.4 (n=2) | 31.0 ± 1.4 (n=2) |"
    assert report.to_arrow().to_pylist()[0] == {"recipe": "chance", "demo-motion": "25.0", "demo-spatial": "10.0"}
    assert any(n.startswith("chance: the level of guessing, 100 / n_classes") for n in report.footnotes)
    assert any(n.startswith("bag-of-codes: a logistic regression") for n in report.footnotes)
    assert any('" · protocol"' in n for n in report.footnotes)
    top5 = build_report(catalog, grid="demo", metric="top5")
    assert top5.chance == [(100.0, 100.0), (50.0, 50.0)]  # min(5, n) / n
    rows = list(csv.DictReader(io.StringIO(report.to_csv())))
    floor = next(r for r in rows if r["recipe"] == "bag-of-codes" and r["dataset"] == "demo-spatial")
    assert floor["protocol"] == "bag_of_codes" and floor["pretrain_run"] == "" and float(floor["chance"]) == pytest.approx(10.0)


def test_finetune_only_recipe_keeps_the_plain_label(catalog):
    add(catalog, "ucf101", "1", "scratch", 0.3, protocol="linear_probe:mean", view="4x1-center", finetune=None)
    add(catalog, "ucf101", "1", "small", 0.6)
    add(catalog, "ucf101", "1", "small", 0.7, finetune="other")
    report = build_report(catalog)
    # The fine-tuning recipe is named on fine-tuned rows only; probe rows have none.
    assert [r.label for r in report.rows] == ["scratch · linear_probe:mean", "small / full", "small / other"]


def test_no_chance_line_without_class_counts(catalog):
    add(catalog, "ucf101", "1", "a", 0.5, n_classes=None)
    report = build_report(catalog)
    assert report.chance == [None] and not report.has_chance()
    assert [r["recipe"] for r in report.to_arrow().to_pylist()] == ["a"]
    assert "| chance |" not in report.to_markdown()


def test_chance_range_when_class_counts_differ(catalog):
    add(catalog, "ucf101", "1", "a", 0.5, n_classes=4)
    add(catalog, "ucf101", "1", "b", 0.5, n_classes=5)
    report = build_report(catalog)
    assert report.chance_text(0) == "20.0–25.0"
    assert any("different class counts" in n for n in report.footnotes)


def test_baseline_recipe_pairs_each_protocol_with_its_own(catalog):
    demo_grid(catalog)
    assert catalog.refresh()  # the catalog file, opened read-only, as `vimpac report` reads it
    report = build_report(catalog, grid="demo", baseline="scratch")
    # Pretrained linear probe vs the probe on the randomly initialised backbone: 50 - 20 = +30 per seed.
    d = cell_diff(report, "tiny-5x64-mp+cl · linear_probe:cls", "demo-motion")
    assert d.baseline == "scratch · linear_probe:cls" and d.value == pytest.approx(30.0) and d.n == 2
    assert d.sd == pytest.approx(0.0) and d.ci == pytest.approx((30.0, 30.0))
    assert cell_diff(report, "tiny-5x64-mp+cl · finetune", "demo-motion").baseline == "scratch · finetune"
    assert cell_diff(report, "tiny-5x64-mp+cl · finetune", "demo-motion").value == pytest.approx(30.0)
    assert cell_diff(report, "tiny-5x64-mp+cl · knn:mean", "demo-motion").status == "no_baseline"
    assert cell_diff(report, "scratch · finetune", "demo-motion").status == "baseline"
    assert any("no baseline row of the same protocol" in n and "tiny-5x64-mp+cl · knn:mean on demo-motion" in n for n in report.footnotes)
    # One row as the baseline: every row against the bag-of-codes floor (40 in both seeds).
    floor = build_report(catalog, grid="demo", baseline="bag-of-codes")
    d = cell_diff(floor, "scratch · finetune", "demo-motion")  # seed 0: 30 - 40, seed 1: 32 - 40
    assert d.baseline == "bag-of-codes" and d.seed_diffs == pytest.approx((-10.0, -8.0)) and d.value == pytest.approx(-9.0)
    # sd = sqrt(2), half width t(0.975, 1) * sqrt(2) / sqrt(2) = 12.7062
    assert d.ci == pytest.approx((-9.0 - 12.7062, -9.0 + 12.7062))
    d = cell_diff(floor, "tiny-5x64-mp+cl · knn:mean", "demo-spatial")  # one seed: 50 - 40
    assert d.value == pytest.approx(10.0) and d.n == 1 and d.seeds == (0,) and d.ci is None


def test_cli_report_with_and_without_baseline(catalog, capsys, tmp_path):
    import argparse

    from flows.cli import cmd_report, main

    demo_grid(catalog)
    home = str(catalog.root.home)
    # The demo pipeline's call: a Namespace without `baseline`.
    assert cmd_report(argparse.Namespace(home=home, metric="top1", grid="demo", out=None)) == 0
    out = capsys.readouterr().out
    assert "chance" in out and "bag-of-codes" in out and "Paired difference" not in out
    assert (catalog.root.home / "reports" / "results-demo-top1.md").exists()
    assert main(["--home", home, "report", "--grid", "demo", "--baseline", "scratch", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "Paired difference vs scratch" in out and "+30.0 [+30.0, +30.0] (n=2)" in out
    md = (tmp_path / "r" / "results-demo-top1-vs-scratch.md").read_text()
    assert "| tiny-5x64-mp+cl · linear_probe:cls | +30.0 [+30.0, +30.0] (n=2) |" in md
    assert main(["--home", home, "report", "--grid", "demo", "--baseline", "nope"]) != 0


def cell_diff(report, label: str, column: str):
    row = next(r for r in report.rows if r.label == label)
    return row.diffs[report.columns.index(column)]


def test_a_recipe_pretrained_once_per_seed_is_one_row_with_its_seeds(catalog):
    """A grid recipe row is pretrained per seed, so each seed has its own pretraining run: the
    runs are the row's seeds (mean +- std, n=3), not three rows; two runs under one recipe name
    for the same seed are still told apart."""
    for seed, (run, tuned, scratch) in enumerate([("r0aaaaaa0000", 0.60, 0.40), ("r1bbbbbb1111", 0.70, 0.45), ("r2cccccc2222", 0.65, 0.35)]):
        add(catalog, "ucf101", "1", "tiny-mp+cl", tuned, run=run, seed=seed, finetune="tiny-5x64")
        add(catalog, "ucf101", "1", "scratch", scratch, seed=seed, finetune="tiny-5x64")
    report = build_report(catalog, grid="g", baseline="scratch")
    assert [r.label for r in report.rows] == ["scratch", "tiny-mp+cl"]
    tuned = cell(report, "tiny-mp+cl", "ucf101")
    assert tuned.value == pytest.approx(65.0) and tuned.std == pytest.approx(5.0) and tuned.n_seeds == 3
    # Differences 20, 25, 30: mean 25, sd 5, 95% CI 25 +- 4.303 * 5 / sqrt(3).
    diff = cell_diff(report, "tiny-mp+cl", "ucf101")
    assert diff.value == pytest.approx(25.0)
    assert diff.ci == pytest.approx((25.0 - 4.3027 * 5 / math.sqrt(3), 25.0 + 4.3027 * 5 / math.sqrt(3)), abs=1e-3)
    # A second run of the recipe for seed 0: now the runs of that seed are different models.
    add(catalog, "ucf101", "1", "tiny-mp+cl", 0.10, run="r9dddddd9999", seed=0, finetune="tiny-5x64")
    assert len([r for r in build_report(catalog, grid="g").rows if r.recipe == "tiny-mp+cl"]) == 4


def _pretrain_run(catalog: Catalog, run_key: str, **metrics: float) -> None:
    from warehouse.runs import RunRecord, new_run_id, save_run

    save_run(catalog.root, RunRecord(run_id=new_run_id("pretrain"), stage="pretrain", config={}, status="completed",
                                     summary={"run_key": run_key, "run_name": "small-5x128-mp+cl", **metrics}))


def test_pretrain_metric_columns_sit_beside_downstream_accuracy(catalog):
    """The paper's ablation tables put Mask-Accu. and CL-Loss beside UCF101; per recipe, the
    mean over its seeds' pretraining runs; scratch has none."""
    seeded(catalog, "mp+cl", {0: {"1": 0.6}}, run="key0")
    seeded(catalog, "mp+cl", {1: {"1": 0.7}}, run="key1")
    seeded(catalog, "scratch", {0: {"1": 0.4}, 1: {"1": 0.5}})
    _pretrain_run(catalog, "key0", eval_mask_acc=0.170, eval_mask_acc_uncopyable=0.05, eval_cl_loss=1.00)
    _pretrain_run(catalog, "key1", eval_mask_acc=0.180, eval_mask_acc_uncopyable=0.07, eval_cl_loss=1.10)
    _pretrain_run(catalog, "other", eval_mask_acc=0.9)  # a run no result row uses
    plain = build_report(catalog)
    assert plain.pretrain_columns == [] and "val mask acc" not in plain.to_arrow().column_names
    report = build_report(catalog, pretrain_metrics=True)
    assert report.pretrain_columns == ["val mask acc", "val uncopyable acc", "val CL loss"]
    rows = {r.label: r for r in report.rows}
    assert rows["mp+cl"].pretrain_values == ["17.5", "6.0", "1.05"]
    assert rows["scratch"].pretrain_values == ["—", "—", "—"]
    table = report.to_arrow().to_pylist()
    assert next(r for r in table if r["recipe"] == "mp+cl")["val CL loss"] == "1.05"
    assert "| val mask acc | val uncopyable acc | val CL loss |" in report.to_markdown()


def test_a_grid_report_holds_cells_another_grid_computed(catalog):
    from stages.finetune.train import record_grid_cells

    shared = add(catalog, "ucf101", "1", "scratch", 0.40, grid="table7")
    add(catalog, "ucf101", "1", "mp-iid", 0.55, grid="table8")
    add(catalog, "ucf101", "1", "cl", 0.50, grid="table7")
    record_grid_cells(catalog.root, "table8", "ucf101", [shared, shared], "run-8")
    record_grid_cells(catalog.root, "table8", "ucf101", [shared], "run-9")  # found again: still one row
    assert catalog.rows("SELECT grid, eval_id FROM grid_cells") == [("table8", shared)]
    rows = {r["recipe"] for r in build_report(catalog, metric="top1", grid="table8", baseline="scratch").to_arrow().to_pylist()}
    assert {"scratch", "mp-iid"} <= rows and "cl" not in rows


def test_a_read_only_data_root_older_than_a_table_still_answers_queries(catalog, monkeypatch):
    import shutil

    add(catalog, "ucf101", "1", "scratch", 0.40)
    # As a version before `grid_cells` left it: no schema file, no catalog file with its views;
    # and read-only, so neither can be written (as on a shared mount; chmod does not stop root).
    shutil.rmtree(catalog.root.tables / "grid_cells")
    catalog.root.catalog_path.unlink(missing_ok=True)

    def read_only(self):
        raise PermissionError(f"read-only file system: {self.root.home}")

    monkeypatch.setattr(Catalog, "ensure_tables", read_only)
    assert catalog.rows("SELECT count(*) FROM grid_cells") == [(0,)]
    assert len(build_report(catalog, metric="top1", grid="g").to_arrow()) >= 1
