"""The downstream results table: pretraining recipes x datasets, as in VIMPAC's Table 7.

`build_report` reads the catalog's `results` view (one row per evaluation and metric, values
in [0, 1]) and pivots one metric into rows = pretraining recipe, columns = datasets, cell =
the metric in percent averaged over the dataset's evaluated splits (UCF101 and HMDB51 have
three official splits; SSv2 and Diving48 a single validation split). The averaging happens in
SQL; Python only lays the cells out and writes them as Markdown, CSV or an Arrow table.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import pyarrow as pa

METRIC_LABELS = {"top1": "top-1 accuracy", "top5": "top-5 accuracy", "mean_class": "mean class accuracy"}
SCRATCH = "scratch"
MISSING = "—"
NO_RECIPE = "(unnamed recipe)"

# Two levels of AVG: repeated evaluations of one split (say fine-tuning rerun under a new
# eval_id) are averaged first, so every split weighs the same in the per-dataset mean. Each
# dataset/protocol pair is its own group, so a cell never mixes view protocols.
_CELLS_SQL = """
WITH picked AS (
    SELECT coalesce(pretrain_recipe, ?) AS recipe, pretrain_run, finetune_recipe,
           coalesce(protocol, '') AS protocol, dataset, coalesce(split, '') AS split, value
    FROM results
    WHERE metric = ? AND value IS NOT NULL
      AND (?::VARCHAR IS NULL OR grid = ?)
      AND (?::VARCHAR[] IS NULL OR list_contains(?::VARCHAR[], dataset))
), per_split AS (
    SELECT recipe, pretrain_run, finetune_recipe, protocol, dataset, split,
           avg(value) AS value, count(*) AS n_evals
    FROM picked
    GROUP BY recipe, pretrain_run, finetune_recipe, protocol, dataset, split
)
SELECT recipe, pretrain_run, finetune_recipe, protocol, dataset,
       100 * avg(value) AS value,
       count(*) AS n_splits,
       list(split ORDER BY split) AS splits,
       max(n_evals) AS max_evals
FROM per_split
GROUP BY recipe, pretrain_run, finetune_recipe, protocol, dataset
"""

_AVAILABLE_SQL = """
SELECT count(*) AS n,
       list(DISTINCT metric ORDER BY metric) AS metrics,
       list(DISTINCT grid ORDER BY grid) FILTER (WHERE grid IS NOT NULL) AS grids,
       list(DISTINCT dataset ORDER BY dataset) AS datasets
FROM results
"""


@dataclass(frozen=True)
class Cell:
    """One recipe's result on one dataset: `value` in percent (None where never evaluated)."""

    value: float | None = None
    n_splits: int = 0
    splits: tuple[str, ...] = ()
    dataset: str = ""
    protocol: str = ""
    # The most evaluations found for one of the splits (1 unless a split was evaluated again).
    max_evals: int = 0


@dataclass
class Row:
    """A table row: one pretraining recipe (with run / fine-tuning recipe where ambiguous)."""

    label: str
    cells: list[Cell]
    recipe: str = ""
    pretrain_run: str | None = None
    finetune_recipe: str | None = None


@dataclass
class Report:
    """A pivoted results table; `columns` are the column headers (datasets) in order."""

    title: str
    metric: str
    columns: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    # dataset -> view protocols found for it (Protocol names such as "10x3").
    protocols: dict[str, list[str]] = field(default_factory=dict)
    grid: str | None = None
    footnotes: list[str] = field(default_factory=list)

    @property
    def metric_label(self) -> str:
        return METRIC_LABELS.get(self.metric, self.metric)

    def expected_splits(self) -> list[int]:
        """Per column, the most splits any cell averages; cells with another count get marked."""
        return [max((r.cells[j].n_splits for r in self.rows), default=0) for j in range(len(self.columns))]

    def cell_text(self, row: int, column: int) -> str:
        """The rendered cell: "69.4", "69.4 (2 splits)" when its column's cells mostly average more, or "—"."""
        cell = self.rows[row].cells[column]
        if cell.value is None:
            return MISSING
        text = f"{cell.value:.1f}"
        if cell.n_splits != self.expected_splits()[column]:
            text += f" ({cell.n_splits} split{'s' if cell.n_splits != 1 else ''})"
        return text

    def caption(self) -> str:
        found = "; ".join(f"{d} {', '.join(p or 'unrecorded' for p in ps)}" for d, ps in self.protocols.items())
        text = f"{self.metric_label} (%), mean over each dataset's evaluated splits"
        if self.grid:
            text += f"; grid {self.grid}"
        return text + (f"; view protocols: {found}" if found else "")

    def to_markdown(self) -> str:
        if not self.rows:
            return f"**{self.title}**\n\nno results yet\n"

        def esc(text: str) -> str:
            return text.replace("|", "\\|")

        lines = [f"**{self.title}**", "", f"Metric: {self.caption()}.", ""]
        lines.append("| " + " | ".join(["Pretraining"] + [esc(c) for c in self.columns]) + " |")
        lines.append("| --- |" + " ---: |" * len(self.columns))
        for i, row in enumerate(self.rows):
            cells = [self.cell_text(i, j) for j in range(len(self.columns))]
            lines.append("| " + " | ".join([esc(row.label)] + cells) + " |")
        if self.footnotes:
            lines.append("")
            lines.extend(f"{n}. {note}" for n, note in enumerate(self.footnotes, 1))
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """Long format, one line per evaluated cell; `value` in percent, unrounded; splits ';'-joined."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(
            ["recipe", "dataset", "value", "n_splits", "splits", "metric", "protocol", "pretrain_recipe", "pretrain_run", "finetune_recipe"]
        )
        for row in self.rows:
            for cell in row.cells:
                if cell.value is None:
                    continue
                writer.writerow(
                    [
                        row.label,
                        cell.dataset,
                        repr(round(cell.value, 6)),
                        cell.n_splits,
                        ";".join(cell.splits),
                        self.metric,
                        cell.protocol,
                        row.recipe,
                        row.pretrain_run or "",
                        row.finetune_recipe or "",
                    ]
                )
        return out.getvalue()

    def to_arrow(self) -> pa.Table:
        """The table as displayed: "recipe" plus one string column per dataset column."""
        data = {"recipe": pa.array([r.label for r in self.rows], pa.string())}
        for j, name in enumerate(self.columns):
            data[name] = pa.array([self.cell_text(i, j) for i in range(len(self.rows))], pa.string())
        return pa.table(data)


def build_report(catalog, *, metric: str = "top1", grid: str | None = None, datasets: list[str] | None = None) -> Report:
    """VIMPAC Table 7 from the catalog's `results` view (`catalog`: a `warehouse.catalog.Catalog`).

    Rows are pretraining recipes ("scratch" first, then by label), columns datasets: in the
    order of `datasets` when given, else alphabetical (a stable order that does not depend on
    which evaluation happened to run first). A dataset evaluated under several view protocols
    gets a column per protocol ("ssv2 (2x1-center)"). Each cell is the `metric` in percent,
    averaged over splits in SQL; rows and columns without data are left out.

    One recipe name covering several pretraining runs is told apart by the first 8 characters
    of the run id, and when several fine-tuning recipes occur every label names its own.

    An empty results view gives a Report without rows. Filters that match nothing while
    results exist raise ValueError naming the metrics, grids and datasets that are there.
    """
    wanted = list(dict.fromkeys(datasets)) if datasets is not None else None
    table = catalog.query(_CELLS_SQL, [NO_RECIPE, metric, grid, grid, wanted, wanted])
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
        return Report(title=title, metric=metric, grid=grid)

    found = table.to_pylist()
    # Columns: (dataset, protocol) pairs.
    order = {d: i for i, d in enumerate(wanted)} if wanted is not None else None
    pairs = sorted(
        {(c["dataset"], c["protocol"]) for c in found},
        key=lambda dp: (order[dp[0]] if order is not None else 0, dp[0].casefold(), dp[0], dp[1]),
    )
    protocols: dict[str, list[str]] = {}
    for d, p in pairs:
        protocols.setdefault(d, []).append(p)
    headers = [f"{d} ({p or 'unrecorded'})" if len(protocols[d]) > 1 else d for d, p in pairs]
    column_of = {dp: j for j, dp in enumerate(pairs)}

    keys = sorted(
        {(c["recipe"], c["pretrain_run"], c["finetune_recipe"]) for c in found}, key=lambda k: tuple("" if v is None else v for v in k)
    )
    labels, notes = _row_labels(keys)
    rows = []
    for key in keys:
        cells = [Cell(dataset=d, protocol=p) for d, p in pairs]
        for c in found:
            if (c["recipe"], c["pretrain_run"], c["finetune_recipe"]) == key:
                cells[column_of[(c["dataset"], c["protocol"])]] = Cell(
                    value=c["value"],
                    n_splits=c["n_splits"],
                    splits=tuple(c["splits"]),
                    dataset=c["dataset"],
                    protocol=c["protocol"],
                    max_evals=c["max_evals"],
                )
        rows.append(Row(label=labels[key], cells=cells, recipe=key[0], pretrain_run=key[1], finetune_recipe=key[2]))
    rows.sort(key=lambda r: (r.recipe != SCRATCH, r.label.casefold(), r.label))

    report = Report(title=title, metric=metric, columns=headers, rows=rows, protocols=protocols, grid=grid)
    report.footnotes = _footnotes(report, pairs, notes)
    return report


def _row_labels(keys: list[tuple[str, str | None, str | None]]) -> tuple[dict, list[str]]:
    """Unambiguous labels for (recipe, pretrain_run, finetune_recipe) keys, and what they add."""
    runs_of: dict[str, set] = {}
    for recipe, run, _ in keys:
        runs_of.setdefault(recipe, set()).add(run)
    several_finetunes = len({ft for _, _, ft in keys}) > 1
    labels = {}
    notes = []
    for recipe, run, ft in keys:
        text = recipe
        if several_finetunes:
            text += f" / {ft or 'default fine-tuning'}"
        if len(runs_of[recipe]) > 1:
            text += f" [{_short_run(run, runs_of[recipe])}]"
        labels[(recipe, run, ft)] = text
    if several_finetunes:
        notes.append('"/ name": the fine-tuning recipe, named on every row since several were used.')
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


def _footnotes(report: Report, pairs: list[tuple[str, str]], label_notes: list[str]) -> list[str]:
    splits_of: dict[int, set] = {j: set() for j in range(len(pairs))}
    for row in report.rows:
        for j, cell in enumerate(row.cells):
            splits_of[j].update(cell.splits)
    listed = "; ".join(f"{h}: {', '.join(sorted(s)) or 'unnamed'}" for h, s in ((report.columns[j], splits_of[j]) for j in splits_of))
    notes = [f"Each cell averages the dataset's evaluated splits (in SQL); splits found: {listed}."]
    expected = report.expected_splits()
    if any(c.value is not None and c.n_splits != expected[j] for r in report.rows for j, c in enumerate(r.cells)):
        notes.append('"(n splits)": the cell averages fewer splits than others in its column, so it is not directly comparable.')
    repeated = [f"{r.label} on {report.columns[j]}" for r in report.rows for j, c in enumerate(r.cells) if c.max_evals > 1]
    if repeated:
        notes.append("Splits evaluated more than once count once, with the mean of their evaluations: " + "; ".join(repeated) + ".")
    if any(len(p) > 1 for p in report.protocols.values()):
        notes.append("A dataset evaluated under several view protocols has a column per protocol.")
    if any(c.value is None for r in report.rows for c in r.cells):
        notes.append(f"{MISSING}: not evaluated.")
    return notes + label_notes
