"""The DuckDB catalog: views over the Parquet files of each table (docs/catalog.md is the contract).

The catalog file holds only view definitions and a little metadata, never rows, so it can be
rebuilt at any moment from the Parquet files, and a killed run can never leave it half
written. Views read `read_parquet(glob)`, so new files appear without rewriting anything.
Only the flow driver writes the file, and only briefly (DuckDB allows one writer); readers
open it read-only, or fall back to an in-memory catalog with the same views when the file is
busy, missing or was built for another data root or another version of the views.

A table's rows are in two places: per-unit files, as the stages commit them, and compacted
files that merge many committed units (warehouse/compact.py). A unit's commit marker says
which: `compaction` is NULL for a marker in its own file, else the compaction whose files hold
the unit. When one marker (stage, dataset, unit, created_at: one attempt of a unit) is found in
several places (a compaction killed before removing what it merged), the newest compaction
wins, so the rows are shown once: the switch from unit files to a compacted part happens in
one rename, that of the part's marker file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from warehouse.layout import DataRoot
from warehouse.tables import (
    COMPACTED,
    LOCATIONS,
    SCHEMAS,
    UNIT_TABLES,
    compacted_glob,
    compacted_schema,
    compacted_schema_path,
    ensure_compacted_schema_file,
    ensure_schema_file,
    schema_path,
    table_glob,
)

SCHEMA_VERSION = 6

# Public views and their column order (DESIGN.md "The catalog (SQL contract)"), extras after.
VIDEOS_COLUMNS = (
    "dataset, video_id, source, sha256, bytes, label, split, status, error, duration_s, fps, width, height, codec, "
    "ingested_at, splits, n_frames, rotation, container, has_video, has_audio, start_time_s, raw_path, error_code, retryable, "
    "unit, run_id, config_hash, code_version"
)

# A `results` row written before the method/view split (schema 5): no view_protocol, and a
# view protocol name (or nothing) in `protocol`. Method names never start with a digit.
_LEGACY_RESULT = "(view_protocol IS NULL AND (protocol IS NULL OR regexp_matches(protocol, '^[0-9]+x')))"

_DUCKDB_TYPES = {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.float64(): "DOUBLE",
                 pa.float32(): "FLOAT", pa.bool_(): "BOOLEAN"}


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    if pa.types.is_list(t):
        return _sql_type(t.value_type) + "[]"
    return _DUCKDB_TYPES[t]


def _columns(table: str, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(f'{prefix}"{c}"' for c in SCHEMAS[table].names)


def _schemas_digest() -> str:
    """The tables' schemas, as the catalog file's views were made for them: a column added
    without a new SCHEMA_VERSION still makes an older file stale (its views may read parts
    without union_by_name)."""
    text = "\n".join(f"{name}: {schema}" for name, schema in sorted(SCHEMAS.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _outdated_parts(root: DataRoot, table: str) -> bool:
    """Whether any compacted file of `table` lacks the current schema (a few footers to read)."""
    schema = compacted_schema(table)
    base = root.home / COMPACTED / table
    for path in base.glob("*/*/*.parquet" if table == "shards" else "*/*.parquet"):
        try:
            if not pq.read_schema(path).equals(schema, check_metadata=False):
                return True
        except (OSError, pa.ArrowInvalid):
            continue  # removed meanwhile, or not a Parquet file: not ours to judge here
    return False


def view_ddl(root: DataRoot) -> list[str]:
    def quoted(path: str) -> str:
        return path.replace("'", "''")

    def no_rows(schema: pa.Schema) -> str:
        """An empty relation with `schema`'s columns (for files a read-only root cannot get)."""
        cols = ", ".join(f'NULL::{_sql_type(f.type)} AS "{f.name}"' for f in schema)
        return f"(SELECT {cols} WHERE false)"

    def src(table: str) -> str:
        base, depth = LOCATIONS[table]
        if not schema_path(root.home, table).exists() and next((root.home / base).glob("*/" * depth + "*.parquet"), None) is None:
            # A table newer than a data root opened where its schema file cannot be written
            # (read-only): no rows, with the columns it would have.
            return no_rows(SCHEMAS[table])
        return f"read_parquet('{quoted(table_glob(root.home, table))}', union_by_name=true)"

    def compacted(table: str) -> str:
        if not compacted_schema_path(root.home, table).exists():
            # A data root that was never compacted, opened where its schema files cannot be
            # written (read-only): no compacted rows, with the columns they would have.
            return no_rows(compacted_schema(table))
        partitions = "{'dataset': 'VARCHAR', 'stage': 'VARCHAR'}" if table == "shards" else "{'dataset': 'VARCHAR'}"
        # union_by_name opens every file when the query is bound, before a filter on dataset
        # drops folders; without it only the first file (the schema file) is. So it is used
        # only while a part written before a column was added is left (compaction rewrites those).
        by_name = str(_outdated_parts(root, table)).lower()
        return (f"read_parquet(['{quoted(compacted_schema_path(root.home, table).as_posix())}', "
                f"'{quoted(compacted_glob(root.home, table))}'], hive_partitioning=true, "
                f"hive_types={partitions}, union_by_name={by_name})")

    ddl = [
        # Every attempt of every unit, once: from its own marker file, or from the newest
        # compaction that holds it (see the module docstring).
        f"""CREATE OR REPLACE VIEW _shards_live AS
            SELECT * FROM (
                SELECT {_columns('shards')}, NULL::VARCHAR AS compaction FROM {src('shards')}
                UNION ALL
                SELECT {_columns('shards')}, compaction FROM {compacted('shards')})
            QUALIFY row_number() OVER (
                PARTITION BY stage, dataset, unit, created_at ORDER BY compaction DESC NULLS LAST) = 1""",
        f"CREATE OR REPLACE VIEW shards_log AS SELECT {_columns('shards')} FROM _shards_live",
        # A unit rerun with --force writes a new marker over the old one; keep the newest.
        """CREATE OR REPLACE VIEW shards AS
           SELECT stage, dataset, path, n_samples, n_failed, bytes, config_hash, created_at, code_version, run_id, unit
           FROM _shards_live
           QUALIFY row_number() OVER (PARTITION BY stage, dataset, unit ORDER BY created_at DESC) = 1""",
    ]
    for stage, table in UNIT_TABLES.items():
        ddl += [
            # Per unit: the compactions holding one of its attempts, and how many of its
            # attempts have a marker file of their own. One pass over the markers per query.
            f"""CREATE OR REPLACE VIEW _{table}_holders AS
                SELECT dataset, unit, list(compaction) FILTER (WHERE compaction IS NOT NULL) AS parts,
                       count(*) FILTER (WHERE compaction IS NULL) AS own
                FROM _shards_live WHERE stage = '{stage}' GROUP BY dataset, unit""",
            f"""CREATE OR REPLACE VIEW _{table}_files AS
                SELECT {_columns(table)}, compaction FROM {compacted(table)}
                UNION ALL
                SELECT {_columns(table)}, NULL::VARCHAR AS compaction FROM {src(table)}""",
            # Rows are visible only once their unit's commit marker exists (a run killed between
            # writing rows and committing them shows nothing of that unit): compacted rows where
            # their compaction holds the unit's marker, rows of a unit file while the unit has a
            # marker of its own (not once a compaction has taken it over).
            f"""CREATE OR REPLACE VIEW _{table}_committed AS
                SELECT {_columns(table, 'r')} FROM _{table}_files r
                JOIN _{table}_holders h ON h.dataset = r.dataset AND h.unit = r.unit
                WHERE CASE WHEN r.compaction IS NULL THEN h.own > 0 ELSE list_contains(h.parts, r.compaction) END""",
            # Everything written, committed or not, except what a compaction took over: unit
            # files waiting to be removed, parts that lost to a newer one.
            f"""CREATE OR REPLACE VIEW {table}_log AS
                SELECT {_columns(table, 'r')} FROM _{table}_files r
                LEFT JOIN _{table}_holders h ON h.dataset = r.dataset AND h.unit = r.unit
                WHERE CASE WHEN r.compaction IS NULL THEN h.unit IS NULL OR h.own > 0
                           ELSE coalesce(list_contains(h.parts, r.compaction), false) END""",
        ]
    ddl += [
        # The latest attempt per video wins; a second video with the same bytes in a dataset is
        # a 'duplicate' of the first by video_id, which is decided here rather than at ingest
        # time so the outcome does not depend on which parallel batch finished first.
        f"""CREATE OR REPLACE VIEW videos AS
            WITH latest AS (
                SELECT * FROM _videos_committed
                QUALIFY row_number() OVER (PARTITION BY dataset, video_id ORDER BY ingested_at DESC, unit DESC) = 1
            ), marked AS (
                SELECT * REPLACE (
                    CASE WHEN status = 'ok' AND first_id <> video_id THEN 'duplicate' ELSE status END AS status,
                    CASE WHEN status = 'ok' AND first_id <> video_id
                         THEN 'same content as ' || first_id ELSE error END AS error,
                    CASE WHEN status = 'ok' AND first_id <> video_id THEN 'duplicate' ELSE error_code END AS error_code)
                FROM (SELECT *, min(CASE WHEN status = 'ok' THEN video_id END)
                                    OVER (PARTITION BY dataset, sha256) AS first_id FROM latest)
            )
            SELECT {VIDEOS_COLUMNS} FROM marked""",
        f"""CREATE OR REPLACE VIEW runs AS
            SELECT run_id, stage, mlflow_run_id, prefect_flow_run_id, config, status, started_at, finished_at,
                   parent_run_id, dataset, error, summary, host, pid
            FROM {src('runs')}""",
        # Committed shards only; a video re-sampled (new content, --force) shows its latest row
        # per variant and config.
        """CREATE OR REPLACE VIEW frame_samples AS
           SELECT * FROM _frame_samples_committed
           QUALIFY row_number() OVER (
               PARTITION BY dataset, video_id, fps, size, variant, config_hash ORDER BY created_at DESC) = 1""",
        """CREATE OR REPLACE VIEW token_samples AS
           SELECT * FROM _token_samples_committed
           QUALIFY row_number() OVER (
               PARTITION BY dataset, video_id, tokenizer, variant, size, fps ORDER BY created_at DESC) = 1""",
        f"CREATE OR REPLACE VIEW results_log AS SELECT * FROM {src('results')}",
        # An evaluation redone (--force) writes a new file; the newest value per metric wins.
        # `protocol` is the evaluation method, `view_protocol` the test-time views. A row written
        # before schema 5 has no view_protocol and its views in `protocol` (a Protocol name,
        # always "<clips>x...", e.g. 10x3): it was a fine-tuning, and reads as one.
        f"""CREATE OR REPLACE VIEW results AS
            SELECT eval_id, dataset, split, pretrain_run, finetune_run, tokenizer,
                   CASE WHEN {_LEGACY_RESULT} THEN 'finetune' ELSE protocol END AS protocol,
                   metric, value, pretrain_model, pretrain_recipe, finetune_recipe, grid, eval_split, train_split,
                   n_videos, n_classes, token_shards, checkpoint, run_id, code_version, created_at,
                   CASE WHEN {_LEGACY_RESULT} THEN protocol ELSE view_protocol END AS view_protocol, seed, n_train
            FROM results_log
            QUALIFY row_number() OVER (PARTITION BY eval_id, metric ORDER BY created_at DESC) = 1""",
        f"""CREATE OR REPLACE VIEW grid_cells AS
            SELECT grid, eval_id, dataset, min(created_at) AS created_at FROM {src('grid_cells')} GROUP BY ALL""",
        f"CREATE OR REPLACE VIEW predictions_log AS SELECT * FROM {src('predictions')}",
        # Predictions are written before their results file: only evaluations whose results
        # exist (committed) are visible, and of those the newest write.
        """CREATE OR REPLACE VIEW predictions AS
           SELECT p.eval_id, p.video_id, p.label, p.prediction, p.top5, p.view_scores, p.views, p.scores, p.correct,
                  p.label_index, p.dataset, p.token_shard, p.created_at
           FROM predictions_log p
           SEMI JOIN (SELECT eval_id, max(created_at) AS at FROM results_log GROUP BY eval_id) r
                ON r.eval_id = p.eval_id AND p.created_at <= r.at
           QUALIFY row_number() OVER (PARTITION BY p.eval_id, p.video_id ORDER BY p.created_at DESC) = 1""",
        f"""CREATE OR REPLACE VIEW datasets AS
            SELECT * FROM {src('datasets')}
            QUALIFY row_number() OVER (PARTITION BY dataset ORDER BY updated_at DESC) = 1""",
    ]
    return ddl


class LockBusy(Exception):
    """A lock taken with `wait=False` is held by another process (the message says whom)."""


@contextmanager
def file_lock(path: Path, *, holder: str | None = None, on_wait: Callable[[str], None] | None = None,
              wait: bool = True) -> Iterator[None]:
    """An advisory exclusive lock (one writer per catalog / per stage and dataset).

    `holder` (e.g. a run id and pid) is written into the lock file while it is held, so a
    second process that has to wait can say whom it waits for (`on_wait` gets that text), or,
    with `wait=False`, is told in the LockBusy it gets instead of waiting.
    The lock dies with its process (flock), so a killed run never leaves a stale lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            if not wait:
                raise LockBusy(f"{path.name} is held by {who}") from None
            if on_wait is not None:
                on_wait(who)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            if holder is not None:
                f.seek(0)
                f.truncate()
                f.write(holder)
                f.flush()
            yield
        finally:
            if holder is not None:
                f.truncate(0)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _files_lock_path(root: DataRoot) -> Path:
    return root.locks / "catalog-files.lock"


@contextmanager
def reading_files(root: DataRoot) -> Iterator[None]:
    """Held (shared) while a query runs: a compaction removes the files it merged, and commits
    a merge, only between queries, so a query never opens a file that was just removed, nor
    sees half of a switch. Reading never writes to the data root: the lock file is made by
    `Catalog.ensure_tables` (every stage run) and by compaction; without one there is no lock."""
    try:
        f = open(_files_lock_path(root))
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def changing_files(root: DataRoot) -> Iterator[None]:
    """Held (exclusive) by a compaction while it commits a merge or removes merged files: a few
    renames or unlinks, so queries wait milliseconds. Never take it while this process holds
    `reading_files` (flock would wait for itself)."""
    path = _files_lock_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Catalog:
    def __init__(self, root: DataRoot | str | os.PathLike[str] | None = None):
        self.root = root if isinstance(root, DataRoot) else DataRoot(root)

    def ensure_tables(self) -> None:
        """Create the data root and every table's schema file (idempotent, no DuckDB write)."""
        self.root.ensure()
        for name in SCHEMAS:
            ensure_schema_file(self.root.home, name)
        for name in ("shards", *UNIT_TABLES.values()):
            ensure_compacted_schema_file(self.root.home, name)
        if not _files_lock_path(self.root).exists():
            _files_lock_path(self.root).touch()

    def _install(self, con: duckdb.DuckDBPyConnection) -> None:
        for ddl in view_ddl(self.root):
            con.execute(ddl)

    def refresh(self) -> bool:
        """(Re)write the view definitions into the catalog file. Driver process only.

        Returns False, leaving the old file in place, when another process holds DuckDB's
        write lock (a user's open read-write client): readers then use in-memory views.
        """
        self.ensure_tables()
        with file_lock(self.root.locks / "catalog.lock"):
            try:
                con = duckdb.connect(str(self.root.catalog_path))
            except duckdb.IOException:
                return False
            try:
                self._install(con)
                con.execute("CREATE OR REPLACE TABLE catalog_meta (key VARCHAR, value VARCHAR)")
                con.execute(
                    "INSERT INTO catalog_meta VALUES ('home', ?), ('schema_version', ?), ('schemas', ?)",
                    [str(self.root.home), str(SCHEMA_VERSION), _schemas_digest()],
                )
            finally:
                con.close()
        return True

    def _file_is_current(self, con: duckdb.DuckDBPyConnection) -> bool:
        try:
            meta = dict(con.execute("SELECT key, value FROM catalog_meta").fetchall())
        except duckdb.Error:
            return False
        return (meta.get("home") == str(self.root.home) and meta.get("schema_version") == str(SCHEMA_VERSION)
                and meta.get("schemas") == _schemas_digest())

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A read-only view of the catalog, safe to use while flows are writing."""
        if self.root.catalog_path.exists():
            try:
                con = duckdb.connect(str(self.root.catalog_path), read_only=True)
            except duckdb.Error:
                con = None
            if con is not None:
                if self._file_is_current(con):
                    return con
                con.close()
        if not (self.root.tables / "videos" / "_schema" / "_schema.parquet").exists():
            raise FileNotFoundError(f"no vimpac catalog under {self.root.home} (run a stage first, or pass --home)")
        try:
            # A data root written by an older version gets the current schema files.
            self.ensure_tables()
        except PermissionError:
            pass
        con = duckdb.connect(":memory:")
        self._install(con)
        return con

    @contextmanager
    def session(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection for several queries (or registered tables), held under
        `reading_files`, so that no compaction removes or switches files while it is open."""
        with reading_files(self.root):
            con = self.connect()
            try:
                yield con
            finally:
                con.close()

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        with self.session() as con:
            return con.sql(sql, params=params).to_arrow_table()

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        with self.session() as con:
            return con.execute(sql, params or []).fetchall()
