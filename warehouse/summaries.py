"""Per-dataset summaries of the catalog (what `vimpac status` shows), kept so that a summary of
a million videos does not read a million rows.

A summary is a query over one view grouped by dataset (and finer), so its rows for one dataset
are that dataset's rows of the whole result. After a compaction (and at the end of every
stage run) the rows of each dataset are written to `tables/summaries/<summary>/<dataset>.parquet`
with a key of the dataset's commit markers of the stage that feeds the view: their number,
newest time and a hash of all of them. A marker added or replaced changes the key, so a
summary is used only while it describes exactly the committed state; for every dataset whose
file is missing or stale the summary is computed from the view, restricted to those datasets
(the views read only their folders). Compaction moves markers without changing them, so it
keeps summaries valid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from warehouse.catalog import SCHEMA_VERSION, Catalog
from warehouse.layout import DataRoot
from warehouse.tables import UNIT_TABLES, write_parquet_atomic

_KEY = b"vimpac.summary_key"


@dataclass(frozen=True)
class Summary:
    title: str
    stage: str  # whose commits change it; it reads that stage's view (UNIT_TABLES)
    sql: str  # `{rows}` stands for the view, restricted to the datasets being summarised
    order: str  # ORDER BY of the combined rows

    @property
    def slug(self) -> str:
        return self.title.replace(" ", "_")

    def query(self) -> str:
        restricted = f"(SELECT * FROM {UNIT_TABLES[self.stage]} WHERE list_contains($datasets::VARCHAR[], dataset))"
        return self.sql.format(rows=restricted)

    def digest(self) -> str:
        return hashlib.sha256(f"{SCHEMA_VERSION}\n{self.sql}".encode()).hexdigest()[:16]


SUMMARIES: dict[str, Summary] = {s.title: s for s in [
    Summary("datasets", "ingest", """
        SELECT dataset, count(*) AS videos,
               count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'duplicate') AS duplicate,
               count(DISTINCT label) AS classes,
               round(sum(duration_s) FILTER (WHERE status = 'ok') / 60, 1) AS minutes,
               round(sum(bytes) FILTER (WHERE status = 'ok') / 1048576, 1) AS mb
        FROM {rows} GROUP BY dataset""", "dataset"),
    Summary("frame samples", "frames", """
        SELECT dataset, variant, fps, size, count(*) AS videos,
               count(*) FILTER (WHERE status = 'ok') AS ok,
               count(*) FILTER (WHERE status = 'partial') AS partial,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               sum(n_frames) AS frames, count(DISTINCT shard) AS shards,
               round(sum(bytes) / 1048576, 1) AS mb
        FROM {rows} GROUP BY ALL""", "ALL"),
    Summary("token samples", "tokenize", """
        SELECT dataset, tokenizer, variant, size, count(*) AS videos, sum(n_frames * n_views) AS frames,
               any_value(grid_h) || 'x' || any_value(grid_w) AS grid, count(DISTINCT shard) AS shards
        FROM {rows} GROUP BY ALL""", "ALL"),
    Summary("failures by cause", "ingest", """
        SELECT dataset, error_code, count(*) AS videos, any_value(error) AS example
        FROM {rows} WHERE status = 'failed' GROUP BY dataset, error_code""", "dataset, videos DESC"),
]}


def _folder(root: DataRoot, summary: Summary) -> Path:
    return root.tables / "summaries" / summary.slug


def _marker_keys(con: duckdb.DuckDBPyConnection, stage: str, datasets: list[str] | None = None) -> dict[str, str]:
    """dataset -> a key of its committed markers of `stage` (as the views see them)."""
    sql = """SELECT dataset, format('{}/{}/{}', count(*), epoch_us(max(created_at)), bit_xor(hash(unit, created_at)))
             FROM _shards_live WHERE stage = $stage"""
    params: dict = {"stage": stage}
    if datasets is not None:
        sql += " AND list_contains($datasets::VARCHAR[], dataset)"
        params["datasets"] = datasets
    return dict(con.execute(sql + " GROUP BY dataset", params).fetchall())


def refresh_summaries(root: DataRoot, stage: str, dataset: str) -> None:
    """Rewrite the dataset's summaries of `stage`. Call it holding the stage's lock on the
    dataset, so that no commit of that stage lands between the key and the rows."""
    wanted = [s for s in SUMMARIES.values() if s.stage == stage]
    if not wanted:
        return
    with Catalog(root).session() as con:
        key = _marker_keys(con, stage, [dataset]).get(dataset)
        tables = {s.title: con.sql(s.query(), params={"datasets": [dataset]}).to_arrow_table() for s in wanted}
    for s in wanted:
        path = _folder(root, s) / f"{dataset}.parquet"
        if key is None:
            path.unlink(missing_ok=True)  # nothing committed: nothing to keep
            continue
        meta = json.dumps({"key": key, "sql": s.digest()}).encode()
        table = tables[s.title]
        write_parquet_atomic(table.replace_schema_metadata({_KEY: meta}), path)


def read_summary(catalog: Catalog, summary: Summary) -> pa.Table:
    """The summary over every dataset: kept rows where they are current, the view elsewhere."""
    with catalog.session() as con:
        keys = _marker_keys(con, summary.stage)
        kept: list[pa.Table] = []
        stale: list[str] = []
        for dataset, key in sorted(keys.items()):
            path = _folder(catalog.root, summary) / f"{dataset}.parquet"
            table = _read_current(path, key, summary)
            if table is None:
                stale.append(dataset)
            else:
                kept.append(table)
        fresh = con.sql(summary.query(), params={"datasets": stale}).to_arrow_table()
        con.register("combined", pa.concat_tables([fresh, *(t.cast(fresh.schema) for t in kept)]))
        return con.sql(f"SELECT * FROM combined ORDER BY {summary.order}").to_arrow_table()


def _read_current(path: Path, key: str, summary: Summary) -> pa.Table | None:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return None
    meta = (table.schema.metadata or {}).get(_KEY)
    if meta is None or json.loads(meta) != {"key": key, "sql": summary.digest()}:
        return None
    return table.replace_schema_metadata(None)
