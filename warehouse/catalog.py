"""The DuckDB catalog: views over the per-unit Parquet files (docs/catalog.md is the contract).

The catalog file holds only view definitions and a little metadata, never rows, so it can be
rebuilt at any moment from the Parquet files, and a killed run can never leave it half
written. Views read `read_parquet(glob, union_by_name=true)`, so new files appear without
rewriting anything. Only the flow driver writes the file, and only briefly (DuckDB allows one
writer); readers open it read-only, or fall back to an in-memory catalog with the same views
when the file is busy, missing or was built for another data root.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pyarrow as pa

from warehouse.layout import DataRoot
from warehouse.tables import SCHEMAS, ensure_schema_file, table_glob

SCHEMA_VERSION = 5

# Public views and their column order (DESIGN.md "The catalog (SQL contract)"), extras after.
VIDEOS_COLUMNS = (
    "dataset, video_id, source, sha256, bytes, label, split, status, error, duration_s, fps, width, height, codec, "
    "ingested_at, splits, n_frames, rotation, container, has_video, has_audio, start_time_s, raw_path, error_code, retryable, "
    "unit, run_id, config_hash, code_version"
)

# A `results` row written before the method/view split (schema 5): no view_protocol, and a
# view protocol name (or nothing) in `protocol`. Method names never start with a digit.
_LEGACY_RESULT = "(view_protocol IS NULL AND (protocol IS NULL OR regexp_matches(protocol, '^[0-9]+x')))"


def view_ddl(root: DataRoot) -> list[str]:
    def src(table: str) -> str:
        path = table_glob(root.home, table).replace("'", "''")
        return f"read_parquet('{path}', union_by_name=true)"

    return [
        f"CREATE OR REPLACE VIEW shards_log AS SELECT * FROM {src('shards')}",
        # A unit rerun with --force writes a new marker over the old one; keep the newest.
        """CREATE OR REPLACE VIEW shards AS
           SELECT stage, dataset, path, n_samples, n_failed, bytes, config_hash, created_at, code_version, run_id, unit
           FROM shards_log
           QUALIFY row_number() OVER (PARTITION BY stage, dataset, unit ORDER BY created_at DESC) = 1""",
        f"CREATE OR REPLACE VIEW videos_log AS SELECT * FROM {src('videos')}",
        # Rows are visible only once their unit's commit marker exists (a run killed between
        # writing rows and committing them shows nothing of that unit). The latest attempt per
        # video wins; a second video with the same bytes in a dataset is a 'duplicate' of the
        # first by video_id, which is decided here rather than at ingest time so the outcome
        # does not depend on which parallel batch finished first.
        f"""CREATE OR REPLACE VIEW videos AS
            WITH committed AS (
                SELECT v.* FROM videos_log v
                SEMI JOIN shards s ON s.stage = 'ingest' AND s.dataset = v.dataset AND s.unit = v.unit
            ), latest AS (
                SELECT * FROM committed
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
        f"CREATE OR REPLACE VIEW frame_samples_log AS SELECT * FROM {src('frame_samples')}",
        # Committed shards only; a video re-sampled (new content, --force) shows its latest row
        # per variant and config.
        """CREATE OR REPLACE VIEW frame_samples AS
           SELECT f.* FROM frame_samples_log f
           SEMI JOIN shards s ON s.stage = 'frames' AND s.dataset = f.dataset AND s.unit = f.unit
           QUALIFY row_number() OVER (
               PARTITION BY f.dataset, f.video_id, f.fps, f.size, f.variant, f.config_hash ORDER BY f.created_at DESC) = 1""",
        f"CREATE OR REPLACE VIEW token_samples_log AS SELECT * FROM {src('token_samples')}",
        """CREATE OR REPLACE VIEW token_samples AS
           SELECT t.* FROM token_samples_log t
           SEMI JOIN shards s ON s.stage = 'tokenize' AND s.dataset = t.dataset AND s.unit = t.unit
           QUALIFY row_number() OVER (
               PARTITION BY t.dataset, t.video_id, t.tokenizer, t.variant, t.size, t.fps ORDER BY t.created_at DESC) = 1""",
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



@contextmanager
def file_lock(path: Path, *, holder: str | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """An advisory exclusive lock (one writer per catalog / per stage and dataset).

    `holder` (e.g. a run id and pid) is written into the lock file while it is held, so a
    second process that has to wait can say whom it waits for (`on_wait` gets that text).
    The lock dies with its process (flock), so a killed run never leaves a stale lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                f.seek(0)
                on_wait(f.read().strip() or "another process")
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


class Catalog:
    def __init__(self, root: DataRoot | str | os.PathLike[str] | None = None):
        self.root = root if isinstance(root, DataRoot) else DataRoot(root)

    def ensure_tables(self) -> None:
        """Create the data root and every table's schema file (idempotent, no DuckDB write)."""
        self.root.ensure()
        for name in SCHEMAS:
            ensure_schema_file(self.root.home, name)

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
                    "INSERT INTO catalog_meta VALUES ('home', ?), ('schema_version', ?)",
                    [str(self.root.home), str(SCHEMA_VERSION)],
                )
            finally:
                con.close()
        return True

    def _file_is_current(self, con: duckdb.DuckDBPyConnection) -> bool:
        try:
            meta = dict(con.execute("SELECT key, value FROM catalog_meta").fetchall())
        except duckdb.Error:
            return False
        return meta.get("home") == str(self.root.home) and meta.get("schema_version") == str(SCHEMA_VERSION)

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

    def query(self, sql: str, params: list | None = None) -> pa.Table:
        con = self.connect()
        try:
            return con.sql(sql, params=params).to_arrow_table()
        finally:
            con.close()

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        con = self.connect()
        try:
            return con.execute(sql, params or []).fetchall()
        finally:
            con.close()
