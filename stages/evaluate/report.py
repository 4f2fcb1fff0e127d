"""The downstream results table: pretraining recipes x datasets, as in VIMPAC's Table 7.

`build_report` reads the catalog's `results` view (one row per evaluation and metric, values
in [0, 1]) and pivots one metric into rows = (pretraining recipe, evaluation protocol,
fine-tuning recipe where several), columns = datasets. A cell is, per seed, the metric in
percent averaged over the dataset's evaluated splits (UCF101 and HMDB51 have three official
splits; SSv2 and Diving48 a single validation split), then the mean +- sample standard
deviation over seeds. Against a baseline row the report adds the paired difference per cell
with a 95% confidence interval over seeds. A `chance` line (100 / n_classes) leads the table,
then the bag-of-codes floor, the scratch rows and the others. All averaging happens in SQL;
Python only lays the cells out and writes them as Markdown, CSV or Arrow tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field

import pyarrow as pa

METRIC_LABELS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "mean_class": "mean class accuracy"}
SCRATCH = "scratch"
SCRATCH_PIXELS = "scratch-pixels"  # the pixel baseline's recipe names: scratch-pixels-<preset>
FINETUNE = "finetune"
BAG_OF_CODES = "bag_of_codes"
CHANCE = "chance"
MISSING = "—"
NO_RECIPE = "(unnamed recipe)"
# Row order within a recipe; protocols not listed come after, alphabetically.
PROTOCOL_ORDER = (FINETUNE, "linear_probe:cls", "linear_probe:mean", "knn:cls", "knn:mean", BAG_OF_CODES)

# Two-sided 95% Student t quantiles t(0.975, df), df 1-30, then 40, 60, 120 (a df between two
# entries uses the smaller one, which is conservative), and the normal 1.96 beyond.
T975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622, 10: 2.2281,
    11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930,
    20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
    29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
Z975 = 1.96


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the factor of a two-sided 95% confidence interval from df degrees of freedom."""
    if df < 1:
        raise ValueError(f"a t quantile needs at least 1 degree of freedom, got {df}")
    if df > max(T975):
        return Z975
    return T975[max(k for k in T975 if k <= df)]


def confidence_interval(mean: float, sd: float | None, n: int) -> tuple[float, float] | None:
    """mean +- t(0.975, n-1) * sd / sqrt(n); None for fewer than 2 values (no interval)."""
    if n < 2 or sd is None:
        return None
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


# Everything below `picked` averages in SQL, in levels: repeated evaluations of one split (say
# fine-tuning rerun under a new eval_id) first, so every split weighs the same; then the splits
# of one seed; then the seeds. Each (row, dataset, view protocol) is its own group, so a cell
# never mixes view protocols. Parameters: unnamed-recipe label, metric, grid x3 (the grid that
# computed a result, or one that found it evaluated: grid_cells), datasets x2.
_PER_SPLIT_SQL = """
WITH raw AS (
    SELECT coalesce(pretrain_recipe, ?) AS recipe, pretrain_run, finetune_recipe,
           coalesce(protocol, '') AS protocol, coalesce(view_protocol, '') AS view_protocol,
           dataset, coalesce(split, '') AS split, seed, value, n_classes
    FROM results
    WHERE metric = ? AND value IS NOT NULL
      AND (?::VARCHAR IS NULL OR grid = ? OR eval_id IN (SELECT eval_id FROM grid_cells WHERE grid = ?))
      AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], dataset))
), several_runs AS (
    -- A recipe pretrained once per seed has a pretraining run per seed: those runs are its
    -- seeds, one row. Only several runs under one recipe name AND one seed are told apart.
    SELECT DISTINCT recipe, finetune_recipe, protocol
    FROM raw
    GROUP BY recipe, finetune_recipe, protocol, seed
    HAVING count(DISTINCT pretrain_run) > 1
), picked AS (
    SELECT raw.recipe,
           CASE WHEN s.recipe IS NOT NULL THEN raw.pretrain_run
                WHEN min(raw.pretrain_run) OVER runs IS NOT DISTINCT FROM max(raw.pretrain_run) OVER runs THEN raw.pretrain_run
           END AS pretrain_run,
           raw.finetune_recipe,
           raw.protocol, raw.view_protocol, raw.dataset, raw.split, raw.seed, raw.value, raw.n_classes
    FROM raw LEFT JOIN several_runs s
      ON s.recipe = raw.recipe AND s.finetune_recipe IS NOT DISTINCT FROM raw.finetune_recipe AND s.protocol = raw.protocol
    WINDOW runs AS (PARTITION BY raw.recipe, raw.finetune_recipe, raw.protocol)
), per_split AS (
    SELECT recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset, seed, split,
           avg(value) AS value, count(*) AS n_evals, min(n_classes) AS min_classes, max(n_classes) AS max_classes
    FROM picked
    GROUP BY recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset, seed, split
)"""

# One more parameter: k of the metric's chance level (k / n_classes; 5 for top-5, else 1).
_CELLS_SQL = (
    _PER_SPLIT_SQL
    + """, per_seed AS (
    SELECT recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset, seed,
           avg(value) AS value, count(*) AS n_splits, list(split ORDER BY split) AS splits,
           max(n_evals) AS max_evals, min(min_classes) AS min_classes, max(max_classes) AS max_classes
    FROM per_split
    GROUP BY recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset, seed
)
SELECT recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset,
       100 * avg(value) AS value,
       100 * stddev_samp(value) AS std,
       count(*) AS n_seeds,
       list(seed ORDER BY seed NULLS FIRST) AS seeds,
       list(100 * value ORDER BY seed NULLS FIRST) AS seed_values,
       list_sort(list_distinct(flatten(list(splits)))) AS splits,
       min(n_splits) AS min_seed_splits,
       sum(n_splits) AS n_results,
       max(max_evals) AS max_evals,
       100 * least(?, max(max_classes)) / max(max_classes) AS chance_low,
       100 * least(?, min(min_classes)) / min(min_classes) AS chance_high
FROM per_seed
GROUP BY recipe, pretrain_run, finetune_recipe, protocol, view_protocol, dataset
"""
)

# Paired differences: `pairs` (registered per query) maps a row (row_id and its key) to its
# baseline row's key. A (split, seed) pair counts only where both rows have a result, in the
# same column: the same dataset and, where the dataset has a column per view protocol (listed
# in the last parameter), the same view protocol.
_DIFF_SQL = (
    _PER_SPLIT_SQL
    + """, paired AS (
    SELECT p.row_id, r.dataset, r.view_protocol, r.seed, r.split, r.value - b.value AS d
    FROM pairs p
    JOIN per_split r
      ON r.recipe = p.r_recipe AND r.pretrain_run IS NOT DISTINCT FROM p.r_run
     AND r.finetune_recipe IS NOT DISTINCT FROM p.r_ft AND r.protocol = p.r_protocol
    JOIN per_split b
      ON b.recipe = p.b_recipe AND b.pretrain_run IS NOT DISTINCT FROM p.b_run
     AND b.finetune_recipe IS NOT DISTINCT FROM p.b_ft AND b.protocol = p.b_protocol
     AND b.dataset = r.dataset AND b.split = r.split AND b.seed IS NOT DISTINCT FROM r.seed
     AND (b.view_protocol = r.view_protocol OR NOT list_contains(?::VARCHAR[], r.dataset))
), per_seed AS (
    SELECT row_id, dataset, view_protocol, seed, avg(d) AS d, count(*) AS n_splits
    FROM paired
    GROUP BY row_id, dataset, view_protocol, seed
)
SELECT row_id, dataset, view_protocol,
       100 * avg(d) AS diff,
       100 * stddev_samp(d) AS sd,
       count(*) AS n,
       list(seed ORDER BY seed NULLS FIRST) AS seeds,
       list(100 * d ORDER BY seed NULLS FIRST) AS seed_diffs,
       sum(n_splits) AS n_pairs
FROM per_seed
GROUP BY row_id, dataset, view_protocol
"""
)

_PAIRS_SCHEMA = pa.schema(
    [("row_id", pa.int64())]
    + [(f"{side}_{name}", pa.string()) for side in ("r", "b") for name in ("recipe", "run", "ft", "protocol")]
)

_AVAILABLE_SQL = """
SELECT count(*) AS n,
       list(DISTINCT metric ORDER BY metric) AS metrics,
       list(DISTINCT grid ORDER BY grid) FILTER (WHERE grid IS NOT NULL) AS grids,
       list(DISTINCT dataset ORDER BY dataset) AS datasets
FROM results
"""


@dataclass(frozen=True)
class Cell:
    """One row's result on one dataset column: `value` in percent (None where never evaluated).

    `value` is the mean over seeds of each seed's split average, `std` the sample standard
    deviation over seeds (None for one seed), `n_seeds` the number of seeds (results without a
    seed count as one)."""

    value: float | None = None
    n_splits: int = 0
    splits: tuple[str, ...] = ()
    dataset: str = ""
    # The evaluation method of the row (finetune, linear_probe:cls, ...) and the test-time views.
    protocol: str = ""
    view_protocol: str = ""
    # The most evaluations found for one of the splits (1 unless a split was evaluated again).
    max_evals: int = 0
    std: float | None = None
    n_seeds: int = 0
    seeds: tuple[int | None, ...] = ()
    seed_values: tuple[float, ...] = ()
    # The fewest splits one seed evaluated (< n_splits: seeds evaluated different splits).
    min_seed_splits: int = 0
    # (split, seed) results behind the cell.
    n_results: int = 0
    # Chance level in percent (k / n_classes); low < high where rows used several class counts.
    chance_low: float | None = None
    chance_high: float | None = None


@dataclass(frozen=True)
class Diff:
    """A row's paired difference against its baseline on one column, in points (percent).

    status: "ok", "baseline" (the row is the baseline), "missing" (the row has no result
    there), "no_baseline" (no baseline row for the row's protocol), "no_pairs" (no (split,
    seed) result in common with the baseline)."""

    status: str = "missing"
    value: float | None = None
    sd: float | None = None
    n: int = 0
    ci: tuple[float, float] | None = None
    seeds: tuple[int | None, ...] = ()
    seed_diffs: tuple[float, ...] = ()
    # (split, seed) pairs used, and the baseline row's label.
    n_pairs: int = 0
    baseline: str | None = None


@dataclass
class Row:
    """A table row: one pretraining recipe and protocol (with run / fine-tuning recipe where ambiguous)."""

    label: str
    cells: list[Cell]
    recipe: str = ""
    pretrain_run: str | None = None
    finetune_recipe: str | None = None
    protocol: str = FINETUNE
    # Paired differences against the baseline, per column (empty without a baseline).
    diffs: list[Diff] = field(default_factory=list)
    # The pretraining run's validation metrics, one per Report.pretrain_columns (shown as text).
    pretrain_values: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A pivoted results table; `columns` are the column headers (datasets) in order."""

    title: str
    metric: str
    columns: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    # dataset -> view protocols found for it (Protocol names such as "10x3").
    view_protocols: dict[str, list[str]] = field(default_factory=dict)
    # dataset -> view protocol -> evaluation protocols that used it.
    view_protocol_methods: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    grid: str | None = None
    footnotes: list[str] = field(default_factory=list)
    # Per column, the chance level in percent as (low, high); None where n_classes is unknown.
    chance: list[tuple[float, float] | None] = field(default_factory=list)
    # The --baseline name as given, when differences were asked for.
    baseline: str | None = None
    # Datasets with a column per view protocol (one protocol was evaluated under several).
    per_view: list[str] = field(default_factory=list)
    # Pretraining metrics shown after the dataset columns (build_report(pretrain_metrics=True)).
    pretrain_columns: list[str] = field(default_factory=list)

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def expected_splits(self) -> list[int]:
        """Per column, the most splits any cell averages; cells with another count get marked."""
        return [max((r.cells[j].n_splits for r in self.rows), default=0) for j in range(len(self.columns))]

    def cell_text(self, row: int, column: int) -> str:
        """The rendered cell: "69.4" (one seed), "69.4 ± 1.2 (n=3)" (several), with ", 2 splits"
        when its column's cells mostly average more splits; "—" where not evaluated."""
        cell = self.rows[row].cells[column]
        if cell.value is None:
            return MISSING
        text = f"{cell.value:.1f}"
        notes = []
        if cell.n_seeds > 1:
            text += f" ± {cell.std:.1f}"
            notes.append(f"n={cell.n_seeds}")
        if cell.n_splits != self.expected_splits()[column]:
            notes.append(f"{cell.n_splits} split{'s' if cell.n_splits != 1 else ''}")
        return text + (f" ({', '.join(notes)})" if notes else "")

    def chance_text(self, column: int) -> str:
        chance = self.chance[column] if column < len(self.chance) else None
        if chance is None:
            return MISSING
        low, high = chance
        return f"{low:.1f}" if f"{low:.1f}" == f"{high:.1f}" else f"{low:.1f}–{high:.1f}"

    def has_chance(self) -> bool:
        return any(c is not None for c in self.chance)

    def diff_text(self, row: int, column: int) -> str:
        """"+12.3 [+4.1, +20.5] (n=3)", "+12.3 (n=1, no CI)", "baseline", or "—"."""
        d = self.rows[row].diffs[column] if self.rows[row].diffs else Diff()
        if d.status == "baseline":
            return "baseline"
        if d.status != "ok" or d.value is None:
            return MISSING
        if d.ci is None:
            return f"{d.value:+.1f} (n={d.n}, no CI)"
        return f"{d.value:+.1f} [{d.ci[0]:+.1f}, {d.ci[1]:+.1f}] (n={d.n})"

    def caption(self) -> str:
        parts = []
        for d, methods in self.view_protocol_methods.items():
            vps = list(methods)
            if len(vps) > 1 and len({m for ms in methods.values() for m in ms}) > 1:
                parts.append(f"{d} " + ", ".join(f"{vp or 'unrecorded'} ({', '.join(methods[vp])})" for vp in vps))
            else:
                parts.append(f"{d} {', '.join(vp or 'unrecorded' for vp in vps)}")
        text = f"{self.metric_label} (%), mean over each dataset's evaluated splits"
        if any(c.n_seeds > 1 for r in self.rows for c in r.cells):
            text += ", then mean ± sample std over seeds (n seeds)"
        if self.grid:
            text += f"; grid {self.grid}"
        return text + (f"; view protocols: {'; '.join(parts)}" if parts else "")

    def diff_title(self) -> str:
        return f"Paired difference vs {self.baseline} (points of {self.metric_label}, mean [95% CI] over seeds)"

    def to_markdown(self) -> str:
        if not self.rows:
            return f"**{self.title}**\n\nno results yet\n"

        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        extra = self.pretrain_columns
        header = "| " + " | ".join(["Pretraining"] + [esc(c) for c in self.columns + extra]) + " |"
        rule = "| --- |" + " ---: |" * (len(self.columns) + len(extra))
        lines = [f"**{self.title}**", "", f"Metric: {self.caption()}.", "", header, rule]
        if self.has_chance():
            lines.append("| " + " | ".join([CHANCE] + [self.chance_text(j) for j in range(len(self.columns))]
                                           + [MISSING] * len(extra)) + " |")
        for i, row in enumerate(self.rows):
            cells = [self.cell_text(i, j) for j in range(len(self.columns))] + self._pretrain_texts(row)
            lines.append("| " + " | ".join([esc(row.label)] + cells) + " |")
        header = "| " + " | ".join(["Pretraining"] + [esc(c) for c in self.columns]) + " |"
        rule = "| --- |" + " ---: |" * len(self.columns)
        if self.baseline is not None:
            lines += ["", f"**{esc(self.diff_title())}**", "", header, rule]
            for i, row in enumerate(self.rows):
                cells = [self.diff_text(i, j) for j in range(len(self.columns))]
                lines.append("| " + " | ".join([esc(row.label)] + cells) + " |")
        if self.footnotes:
            lines.append("")
            lines.extend(f"{n}. {note}" for n, note in enumerate(self.footnotes, 1))
        return "\n".join(lines) + "\n"

    CSV_COLUMNS = (
        "recipe", "dataset", "value", "n_splits", "splits", "metric", "protocol", "pretrain_recipe", "pretrain_run",
        "finetune_recipe", "view_protocol", "column", "std", "n", "seeds", "seed_values", "chance",
        "baseline", "diff", "diff_sd", "ci_low", "ci_high", "n_diff", "n_pairs", "diff_seeds", "seed_diffs",
    )

    def to_csv(self) -> str:
        """Long format, one line per evaluated cell; values in percent, unrounded; lists ';'-joined.

        `value` is the mean over seeds (`n` of them, `std` their sample standard deviation,
        `seeds` / `seed_values` each seed's split average; an empty seed is a result without
        one), `chance` the cell's chance level. With a baseline: `baseline` (its row label, or
        "baseline" on the baseline row itself), `diff` = mean over seeds of the paired
        difference, `ci_low` / `ci_high` its 95% interval (empty for n_diff = 1)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.CSV_COLUMNS)

        def num(x: float | None) -> str:
            return "" if x is None else repr(round(x, 6))

        def seeds(xs) -> str:
            return ";".join("" if s is None else str(s) for s in xs)

        for row in self.rows:
            for j, cell in enumerate(row.cells):
                if cell.value is None:
                    continue
                d = row.diffs[j] if row.diffs else Diff()
                writer.writerow(
                    [
                        row.label,
                        cell.dataset,
                        num(cell.value),
                        cell.n_splits,
                        ";".join(cell.splits),
                        self.metric,
                        cell.protocol,
                        row.recipe,
                        row.pretrain_run or "",
                        row.finetune_recipe or "",
                        cell.view_protocol,
                        self.columns[j],
                        num(cell.std),
                        cell.n_seeds,
                        seeds(cell.seeds),
                        ";".join(num(v) for v in cell.seed_values),
                        num(cell.chance_low) if cell.chance_low is not None and cell.chance_low == cell.chance_high else "",
                        "baseline" if d.status == "baseline" else (d.baseline or ""),
                        num(d.value) if d.status == "ok" else "",
                        num(d.sd) if d.status == "ok" else "",
                        num(d.ci[0]) if d.ci else "",
                        num(d.ci[1]) if d.ci else "",
                        d.n if d.status == "ok" else "",
                        d.n_pairs if d.status == "ok" else "",
                        seeds(d.seeds) if d.status == "ok" else "",
                        ";".join(num(v) for v in d.seed_diffs) if d.status == "ok" else "",
                    ]
                )
        return out.getvalue()

    def _pretrain_texts(self, row: Row) -> list[str]:
        return list(row.pretrain_values) if row.pretrain_values else [MISSING] * len(self.pretrain_columns)

    def to_arrow(self) -> pa.Table:
        """The table as displayed: "recipe" plus one string column per dataset column (then the
        pretraining metric columns, when asked for); the `chance` line first where class counts
        are known."""
        labels = [r.label for r in self.rows]
        columns = [[self.cell_text(i, j) for i in range(len(self.rows))] for j in range(len(self.columns))]
        extra = [[self._pretrain_texts(r)[j] for r in self.rows] for j in range(len(self.pretrain_columns))]
        if self.rows and self.has_chance():
            labels = [CHANCE] + labels
            columns = [[self.chance_text(j)] + col for j, col in enumerate(columns)]
            extra = [[MISSING] + col for col in extra]
        data = {"recipe": pa.array(labels, pa.string())}
        for name, col in zip(self.columns + self.pretrain_columns, columns + extra):
            data[name] = pa.array(col, pa.string())
        return pa.table(data)

    def diff_to_arrow(self) -> pa.Table | None:
        """The paired-difference table as displayed (None without a baseline)."""
        if self.baseline is None:
            return None
        data = {"recipe": pa.array([r.label for r in self.rows], pa.string())}
        for j, name in enumerate(self.columns):
            data[name] = pa.array([self.diff_text(i, j) for i in range(len(self.rows))], pa.string())
        return pa.table(data)


Key = tuple[str, str | None, str | None, str]  # recipe, pretrain_run, finetune_recipe, protocol


def build_report(
    catalog,
    *,
    metric: str = "top1",
    grid: str | None = None,
    datasets: list[str] | None = None,
    baseline: str | None = None,
    pretrain_metrics: bool = False,
) -> Report:
    """VIMPAC Table 7 from the catalog's `results` view (`catalog`: a `warehouse.catalog.Catalog`).

    Rows are (pretraining recipe, evaluation protocol, fine-tuning recipe where several): the
    bag-of-codes floor first, then "scratch" (and the pixel baselines, "scratch-pixels-*"), then by
    recipe, fine-tuning before the probes;
    columns datasets, in the order of `datasets` when given, else alphabetical (a stable order
    that does not depend on which evaluation happened to run first). A dataset where one
    protocol was evaluated under several view protocols gets a column per view protocol
    ("ssv2 (2x1-center)"). Each cell is the `metric` in percent, averaged over splits per
    seed, then over seeds (mean, sample std, n), in SQL; rows and columns without data are
    left out. Chance level per column (100 * k / n_classes, k = 5 for top5 else 1) is kept
    in `Report.chance` and shown as the table's first line.

    One recipe name covering several pretraining runs is told apart by the first 8 characters
    of the run id, and when several fine-tuning recipes occur every fine-tuned row names its
    own. Probe rows are labelled "recipe · protocol"; a fine-tuned row is the plain recipe,
    or "recipe · finetune" when the same recipe also has probe rows.

    `baseline` (a row label or a recipe name) adds the paired difference of every other row
    against it (`Row.diffs`): per seed the mean over the splits both evaluated of (row -
    baseline), then mean and 95% confidence interval over the seeds. One baseline row is the
    reference of every row; a name covering several rows (scratch fine-tuned and probed) gives
    each row the baseline row of its own protocol (and fine-tuning recipe, where several).

    An empty results view gives a Report without rows. Filters that match nothing while
    results exist raise ValueError naming the metrics, grids and datasets that are there; so
    does a baseline that names no row, or several rows of one protocol.

    `pretrain_metrics` adds the columns of the paper's ablation tables (6, 8-16) after the
    datasets: each row's pretraining validation metrics from the `runs` catalog (mask accuracy,
    accuracy on the tokens copying gets wrong, contrastive loss), averaged over the row's
    pretraining runs (one per seed); "—" for scratch, bag-of-codes and unknown runs.
    """
    wanted = list(dict.fromkeys(datasets)) if datasets is not None else None
    k = 5 if metric == "top5" else 1
    params = [NO_RECIPE, metric, grid, grid, grid, wanted, wanted]
    table = catalog.query(_CELLS_SQL, params + [k, k])
    label = METRIC_LABELS.get(metric, metric)
    title = f"Downstream {label} (%) by pretraining recipe"
    if grid:
        title += f", grid {grid}"
    if table.num_rows == 0:
        available = catalog.query(_AVAILABLE_SQL).to_pylist()[0]
        if available["n"]:
            raise ValueError(
                f"no results match metric={metric!r}, grid={grid!r}, datasets={wanted!r}; "
                f"the catalog has metrics {available['metrics']}, grids {available['grids'] or []}, "
                f"datasets {available['datasets']}"
            )
        return Report(title=title, metric=metric, grid=grid, baseline=baseline)

    found = table.to_pylist()
    # Columns: a dataset, or (dataset, view protocol) where one protocol used several views.
    methods_of: dict[str, dict[str, set]] = {}
    for c in found:
        methods_of.setdefault(c["dataset"], {}).setdefault(c["protocol"], set()).add(c["view_protocol"])
    per_view = {d for d, m in methods_of.items() if any(len(vps) > 1 for vps in m.values())}

    def column_key(c: dict) -> tuple[str, str | None]:
        return (c["dataset"], c["view_protocol"] if c["dataset"] in per_view else None)

    order = {d: i for i, d in enumerate(wanted)} if wanted is not None else None
    pairs = sorted(
        {column_key(c) for c in found},
        key=lambda dv: (order[dv[0]] if order is not None else 0, dv[0].casefold(), dv[0], dv[1] or ""),
    )
    headers = [d if vp is None else f"{d} ({vp or 'unrecorded'})" for d, vp in pairs]
    column_of = {dv: j for j, dv in enumerate(pairs)}
    view_protocol_methods: dict[str, dict[str, list[str]]] = {}
    for d, _ in pairs:
        if d in view_protocol_methods:
            continue
        by_vp: dict[str, set] = {}
        for method, vps in methods_of[d].items():
            for vp in vps:
                by_vp.setdefault(vp, set()).add(method)
        view_protocol_methods[d] = {vp: sorted(by_vp[vp], key=_protocol_rank) for vp in sorted(by_vp)}
    view_protocols = {d: list(m) for d, m in view_protocol_methods.items()}

    keys: list[Key] = sorted(
        {(c["recipe"], c["pretrain_run"], c["finetune_recipe"], c["protocol"]) for c in found},
        key=lambda k: tuple("" if v is None else v for v in k),
    )
    labels, notes = _row_labels(keys)
    rows = []
    for key in keys:
        cells = [Cell(dataset=d, protocol=key[3]) for d, _ in pairs]
        for c in found:
            if (c["recipe"], c["pretrain_run"], c["finetune_recipe"], c["protocol"]) == key:
                cells[column_of[column_key(c)]] = Cell(
                    value=c["value"],
                    n_splits=len(c["splits"]),
                    splits=tuple(c["splits"]),
                    dataset=c["dataset"],
                    protocol=c["protocol"],
                    view_protocol=c["view_protocol"],
                    max_evals=c["max_evals"],
                    std=c["std"],
                    n_seeds=c["n_seeds"],
                    seeds=tuple(c["seeds"]),
                    seed_values=tuple(c["seed_values"]),
                    min_seed_splits=c["min_seed_splits"],
                    n_results=int(c["n_results"]),
                    chance_low=c["chance_low"],
                    chance_high=c["chance_high"],
                )
        rows.append(
            Row(label=labels[key], cells=cells, recipe=key[0], pretrain_run=key[1], finetune_recipe=key[2], protocol=key[3])
        )
    rows.sort(key=_row_order)

    chance: list[tuple[float, float] | None] = []
    for j in range(len(pairs)):
        lows = [r.cells[j].chance_low for r in rows if r.cells[j].chance_low is not None]
        highs = [r.cells[j].chance_high for r in rows if r.cells[j].chance_high is not None]
        chance.append((min(lows), max(highs)) if lows else None)

    report = Report(
        title=title,
        metric=metric,
        columns=headers,
        rows=rows,
        view_protocols=view_protocols,
        view_protocol_methods=view_protocol_methods,
        grid=grid,
        chance=chance,
        baseline=baseline,
        per_view=sorted(per_view),
    )
    diff_notes: list[str] = []
    if baseline is not None:
        diff_notes = _paired_differences(catalog, report, baseline, params, pairs)
    report.footnotes = _footnotes(report, notes, k) + diff_notes
    if pretrain_metrics:
        _add_pretrain_metrics(catalog, report, params)
    return report


# Validation metrics of a pretraining run (runs.summary), as the paper's ablation tables show them.
PRETRAIN_COLUMNS = (("eval_mask_acc", "val mask acc", 100, 1), ("eval_mask_acc_uncopyable", "val uncopyable acc", 100, 1),
                    ("eval_cl_loss", "val CL loss", 1, 2))

_RUNS_OF_RECIPES_SQL = """
SELECT DISTINCT coalesce(pretrain_recipe, ?) AS recipe, pretrain_run FROM results
WHERE metric = ? AND (?::VARCHAR IS NULL OR grid = ? OR eval_id IN (SELECT eval_id FROM grid_cells WHERE grid = ?)) AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], dataset))
"""


def _add_pretrain_metrics(catalog, report: Report, params: list) -> None:
    runs_of: dict[str, set[str]] = {}
    for r in catalog.query(_RUNS_OF_RECIPES_SQL, params).to_pylist():
        if r["pretrain_run"]:
            runs_of.setdefault(r["recipe"], set()).add(r["pretrain_run"])
    summaries: dict[str, dict] = {}
    for (text,) in catalog.rows("SELECT summary FROM runs WHERE stage = 'pretrain' AND status = 'completed'"):
        try:
            summary = json.loads(text or "{}")
        except ValueError:
            continue
        if isinstance(summary, dict) and summary.get("run_key"):
            summaries[summary["run_key"]] = summary
    report.pretrain_columns = [label for _, label, _, _ in PRETRAIN_COLUMNS]
    for row in report.rows:
        runs = [row.pretrain_run] if row.pretrain_run else sorted(runs_of.get(row.recipe, ()))
        known = [summaries[r] for r in runs if r in summaries]
        values = []
        for key, _, scale, digits in PRETRAIN_COLUMNS:
            xs = [float(s[key]) for s in known if s.get(key) is not None]
            values.append(f"{scale * sum(xs) / len(xs):.{digits}f}" if xs else MISSING)
        row.pretrain_values = values


def _protocol_rank(protocol: str) -> tuple[int, str]:
    return (PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER), protocol)


def _row_order(row: Row) -> tuple:
    # The from-scratch baselines of both families (scratch, scratch-pixels-PRESET) sit together.
    group = 0 if row.protocol == BAG_OF_CODES else 1 if row.recipe == SCRATCH or row.recipe.startswith(SCRATCH_PIXELS) else 2
    return (group, row.recipe.casefold(), row.recipe, _protocol_rank(row.protocol), row.label.casefold(), row.label)


def _row_labels(keys: list[Key]) -> tuple[dict, list[str]]:
    """Unambiguous labels for (recipe, pretrain_run, finetune_recipe, protocol) keys, and what they add."""
    runs_of: dict[str, set] = {}
    protocols_of: dict[str, set] = {}
    for recipe, run, _, protocol in keys:
        runs_of.setdefault(recipe, set()).add(run)
        protocols_of.setdefault(recipe, set()).add(protocol)
    several_finetunes = len({ft for _, _, ft, p in keys if p == FINETUNE}) > 1
    labels = {}
    notes = []
    named_protocol = named_finetune = False
    for recipe, run, ft, protocol in keys:
        text = recipe
        # The bag-of-codes floor is its own recipe; its protocol adds nothing to its name.
        if protocol != BAG_OF_CODES and (protocol != FINETUNE or len(protocols_of[recipe]) > 1):
            text += f" · {protocol or 'unrecorded protocol'}"
            named_protocol = True
            named_finetune |= protocol == FINETUNE
        if several_finetunes and protocol == FINETUNE:
            text += f" / {ft or 'default fine-tuning'}"
        if len(runs_of[recipe]) > 1:
            text += f" [{_short_run(run, runs_of[recipe])}]"
        labels[(recipe, run, ft, protocol)] = text
    if named_protocol:
        note = '" · protocol": the evaluation method (linear_probe: a linear layer on frozen features; knn: k-nearest neighbours; :cls on the [CLS] output, :mean on mean-pooled token states)'
        note += '; "· finetune" marks the fine-tuned row of a recipe that also has probe rows.' if named_finetune else "; rows without it are fine-tuned."
        notes.append(note)
    if several_finetunes:
        notes.append('"/ name": the fine-tuning recipe, named on every fine-tuned row since several were used.')
    if any(len(r) > 1 for r in runs_of.values()):
        notes.append("[id]: the start of the pretraining run id, where one recipe name covers several pretraining runs.")
    return labels, notes


def _short_run(run: str | None, siblings: set) -> str:
    if run is None:
        return "no run"
    others = [s for s in siblings if s is not None and s != run]
    # 8 characters, more only if another run of the same recipe shares that prefix.
    for n in range(8, len(run) + 1):
        if not any(o.startswith(run[:n]) for o in others):
            return run[:n]
    return run


def _baselines(report: Report, name: str) -> tuple[dict[int, int | None], list[str]]:
    """For each row index, its baseline row's index (None: no baseline row for its protocol)."""
    rows = report.rows
    chosen = [i for i, r in enumerate(rows) if r.label == name] or [i for i, r in enumerate(rows) if r.recipe == name]
    if not chosen:
        recipes = sorted({r.recipe for r in rows})
        raise ValueError(
            f"baseline {name!r} is neither a row label nor a recipe of this report; "
            f"rows: {[r.label for r in rows]}, recipes: {recipes}"
        )
    if len(chosen) == 1:
        return {i: chosen[0] for i in range(len(rows))}, []
    mapping: dict[int, int | None] = {}
    for i, row in enumerate(rows):
        if i in chosen:
            mapping[i] = i
            continue
        candidates = [b for b in chosen if rows[b].protocol == row.protocol]
        if len(candidates) > 1:
            candidates = [b for b in candidates if rows[b].finetune_recipe == row.finetune_recipe]
        if len(candidates) > 1:
            raise ValueError(
                f"baseline {name!r} is ambiguous for {row.label!r}: rows {[rows[b].label for b in candidates]}; "
                "pass one of these row labels"
            )
        mapping[i] = candidates[0] if candidates else None
    return mapping, [rows[b].label for b in chosen]


def _paired_differences(catalog, report: Report, name: str, params: list, pairs: list) -> list[str]:
    per_view = report.per_view
    mapping, several = _baselines(report, name)
    rows = report.rows
    todo = {i: b for i, b in mapping.items() if b is not None and b != i}
    table = pa.Table.from_pylist(
        [
            {
                "row_id": i,
                "r_recipe": rows[i].recipe, "r_run": rows[i].pretrain_run, "r_ft": rows[i].finetune_recipe, "r_protocol": rows[i].protocol,
                "b_recipe": rows[b].recipe, "b_run": rows[b].pretrain_run, "b_ft": rows[b].finetune_recipe, "b_protocol": rows[b].protocol,
            }
            for i, b in todo.items()
        ],
        schema=_PAIRS_SCHEMA,
    )
    with catalog.session() as con:
        con.register("pairs", table)
        found = con.sql(_DIFF_SQL, params=params + [per_view]).to_arrow_table().to_pylist()
    column_of = {dv: j for j, dv in enumerate(pairs)}
    got: dict[tuple[int, int], dict] = {}
    for d in found:
        key = (d["dataset"], d["view_protocol"] if d["dataset"] in per_view else None)
        got[(d["row_id"], column_of[key])] = d

    no_baseline, no_pairs, partial = [], [], []
    for i, row in enumerate(rows):
        b = mapping[i]
        diffs = []
        for j, cell in enumerate(row.cells):
            if b == i:
                diffs.append(Diff(status="baseline"))
            elif cell.value is None:
                diffs.append(Diff(status="missing"))
            elif b is None:
                diffs.append(Diff(status="no_baseline"))
                no_baseline.append(f"{row.label} on {report.columns[j]}")
            elif (i, j) not in got:
                diffs.append(Diff(status="no_pairs", baseline=rows[b].label))
                no_pairs.append(f"{row.label} on {report.columns[j]}")
            else:
                d = got[(i, j)]
                diffs.append(
                    Diff(
                        status="ok",
                        value=d["diff"],
                        sd=d["sd"],
                        n=d["n"],
                        ci=confidence_interval(d["diff"], d["sd"], d["n"]),
                        seeds=tuple(d["seeds"]),
                        seed_diffs=tuple(d["seed_diffs"]),
                        n_pairs=int(d["n_pairs"]),
                        baseline=rows[b].label,
                    )
                )
                if d["n_pairs"] < cell.n_results:
                    partial.append(f"{row.label} on {report.columns[j]} ({d['n_pairs']} of {cell.n_results})")
        row.diffs = diffs

    if several:
        whom = f"the {name} row of the same protocol ({', '.join(several)})"
    else:
        whom = f"{rows[next(iter(mapping.values()))].label}"
    notes = [
        f"Paired difference vs {whom}, in points: per seed, the mean over the splits both rows evaluated of "
        "(row − baseline); then the mean over seeds and its 95% confidence interval, mean ± t(0.975, n−1)·sd/√n "
        "over the n seeds. Only (split, seed) results both rows have are paired; a result without a seed pairs "
        "with the baseline's result without one. n=1: one seed, no interval."
    ]
    if no_pairs:
        notes.append(f"{MISSING} in the differences: no (split, seed) result in common with the baseline: " + "; ".join(no_pairs) + ".")
    if no_baseline:
        notes.append(f"{MISSING} in the differences: no baseline row of the same protocol: " + "; ".join(no_baseline) + ".")
    if partial:
        notes.append("Differences from only some of the row's (split, seed) results (the baseline lacks the others): " + "; ".join(partial) + ".")
    return notes


def _footnotes(report: Report, label_notes: list[str], k: int) -> list[str]:
    splits_of: dict[int, set] = {j: set() for j in range(len(report.columns))}
    for row in report.rows:
        for j, cell in enumerate(row.cells):
            splits_of[j].update(cell.splits)
    listed = "; ".join(f"{h}: {', '.join(sorted(s)) or 'unnamed'}" for h, s in ((report.columns[j], splits_of[j]) for j in splits_of))
    notes = [f"Each cell averages the dataset's evaluated splits (in SQL); splits found: {listed}."]
    cells = [(r, j, c) for r in report.rows for j, c in enumerate(r.cells) if c.value is not None]
    if any(c.n_seeds > 1 for _, _, c in cells):
        notes.append(
            "\"± s (n=k)\": mean ± sample standard deviation over k seeds, each seed's value the mean of its splits; "
            "results without a recorded seed count as one seed; a single seed shows its value alone."
        )
    uneven = [f"{r.label} on {report.columns[j]}" for r, j, c in cells if c.min_seed_splits != c.n_splits]
    if uneven:
        notes.append("Seeds that evaluated different splits (each seed averages its own): " + "; ".join(uneven) + ".")
    if report.has_chance():
        what = "100 · min(5, n_classes) / n_classes" if k == 5 else "100 / n_classes"
        note = f"{CHANCE}: the level of guessing, {what} of the dataset"
        if any(c is not None and f"{c[0]:.1f}" != f"{c[1]:.1f}" for c in report.chance):
            note += " (a range where its rows used different class counts)"
        notes.append(note + ".")
    if any(r.protocol == BAG_OF_CODES for r in report.rows):
        notes.append(
            "bag-of-codes: a logistic regression on each video's histogram of token codes, no model; "
            "the floor every fine-tuned row should clear."
        )
    expected = report.expected_splits()
    if any(c.n_splits != expected[j] for _, j, c in cells):
        notes.append('"(n splits)": the cell averages fewer splits than others in its column, so it is not directly comparable.')
    repeated = [f"{r.label} on {report.columns[j]}" for r, j, c in cells if c.max_evals > 1]
    if repeated:
        notes.append("Splits evaluated more than once count once, with the mean of their evaluations: " + "; ".join(repeated) + ".")
    if report.per_view:
        notes.append("A dataset where one protocol was evaluated under several view protocols has a column per view protocol.")
    mixed = [d for d, vps in report.view_protocols.items() if len(vps) > 1 and d not in report.per_view]
    if mixed:
        notes.append(
            f"On {', '.join(mixed)} the protocols were tested under different view protocols (the caption names which), "
            "so their rows differ in test-time views as well as in method."
        )
    if any(c.value is None for r in report.rows for c in r.cells):
        notes.append(f"{MISSING}: not evaluated.")
    return notes + label_notes
