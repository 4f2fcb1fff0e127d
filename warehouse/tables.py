"""Table schemas and atomic Parquet writes.

Every catalog table is a folder of immutable Parquet files. A file is written under a
temporary name, fsynced and renamed into place, so a reader (or a run killed at any instant)
sees either the whole file or none of it. Each table folder also holds a zero-row
`_schema/_schema.parquet`, so its view has every column even before the first write.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

TS = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    # One row per ingest attempt of a video; the `videos` view keeps the latest per video.
    "videos": pa.schema(
        [
            ("dataset", pa.string()),
            ("video_id", pa.string()),
            ("source", pa.string()),
            ("sha256", pa.string()),
            ("bytes", pa.int64()),
            ("label", pa.string()),
            ("split", pa.string()),
            ("splits", pa.list_(pa.string())),
            ("status", pa.string()),
            ("error", pa.string()),
            ("error_code", pa.string()),
            ("retryable", pa.bool_()),
            ("duration_s", pa.float64()),
            ("fps", pa.float64()),
            ("n_frames", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("codec", pa.string()),
            ("container", pa.string()),
            ("rotation", pa.int32()),
            ("has_video", pa.bool_()),
            ("has_audio", pa.bool_()),
            ("start_time_s", pa.float64()),
            ("raw_path", pa.string()),
            ("ingested_at", TS),
            ("fingerprint", pa.string()),
            ("entry_key", pa.string()),
            ("config_hash", pa.string()),
            ("code_version", pa.string()),
            ("run_id", pa.string()),
            ("unit", pa.string()),
        ]
    ),
    # One commit marker per unit of work (an ingest batch, later a frame or token shard),
    # written last: a unit's rows are visible only once its marker exists.
    "shards": pa.schema(
        [
            ("stage", pa.string()),
            ("dataset", pa.string()),
            ("unit", pa.string()),
            ("path", pa.string()),
            ("n_samples", pa.int64()),
            ("n_failed", pa.int64()),
            ("bytes", pa.int64()),
            ("config_hash", pa.string()),
            ("code_version", pa.string()),
            ("run_id", pa.string()),
            ("created_at", TS),
        ]
    ),
    "runs": pa.schema(
        [
            ("run_id", pa.string()),
            ("parent_run_id", pa.string()),
            ("stage", pa.string()),
            ("dataset", pa.string()),
            ("mlflow_run_id", pa.string()),
            ("prefect_flow_run_id", pa.string()),
            ("config", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("summary", pa.string()),
            ("host", pa.string()),
            ("pid", pa.int64()),
            ("started_at", TS),
            ("finished_at", TS),
        ]
    ),
    # One row per video per frame shard, written beside the shard's tar.
    "frame_samples": pa.schema(
        [
            ("dataset", pa.string()),
            ("video_id", pa.string()),
            ("shard", pa.string()),
            ("fps", pa.float64()),
            ("size", pa.int32()),
            ("variant", pa.string()),
            ("n_frames", pa.int64()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("error_code", pa.string()),
            ("expected_frames", pa.int64()),
            ("views", pa.list_(pa.string())),
            ("key", pa.string()),
            ("sha256", pa.string()),
            ("backend", pa.string()),
            ("fallback_reason", pa.string()),
            ("source_duration_s", pa.float64()),
            ("decode_s", pa.float64()),
            ("bytes", pa.int64()),
            ("encoding", pa.string()),
            ("unit", pa.string()),
            ("config_hash", pa.string()),
            ("code_version", pa.string()),
            ("run_id", pa.string()),
            ("created_at", TS),
        ]
    ),
    # One row per video per token shard, written beside the shard's tar.
    "token_samples": pa.schema(
        [
            ("dataset", pa.string()),
            ("video_id", pa.string()),
            ("shard", pa.string()),
            ("tokenizer", pa.string()),
            ("variant", pa.string()),
            ("n_frames", pa.int64()),
            ("grid_h", pa.int32()),
            ("grid_w", pa.int32()),
            ("n_views", pa.int32()),
            ("views", pa.list_(pa.string())),
            ("fps", pa.float64()),
            ("size", pa.int32()),
            ("codebook_size", pa.int64()),
            ("key", pa.string()),
            ("frames_shard", pa.string()),
            ("frames_unit", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("unit", pa.string()),
            ("config_hash", pa.string()),
            ("code_version", pa.string()),
            ("run_id", pa.string()),
            ("created_at", TS),
        ]
    ),
    # One row per (evaluation, metric): the downstream results table (docs/catalog.md). A file
    # per evaluation, written after its predictions file, so it is the evaluation's commit marker.
    "results": pa.schema(
        [
            ("eval_id", pa.string()),
            ("dataset", pa.string()),
            ("split", pa.string()),
            ("pretrain_run", pa.string()),
            ("finetune_run", pa.string()),
            ("tokenizer", pa.string()),
            ("protocol", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
            ("pretrain_model", pa.string()),
            ("pretrain_recipe", pa.string()),
            ("finetune_recipe", pa.string()),
            ("grid", pa.string()),
            ("eval_split", pa.string()),
            ("train_split", pa.string()),
            ("n_videos", pa.int64()),
            ("n_classes", pa.int64()),
            ("token_shards", pa.list_(pa.string())),
            ("checkpoint", pa.string()),
            ("run_id", pa.string()),
            ("code_version", pa.string()),
            ("created_at", TS),
            # `protocol` is the evaluation method (finetune, linear_probe:cls, knn:mean,
            # bag_of_codes, ...) and `view_protocol` the test-time views (10x3, 4x1-center).
            # Files written before these columns have the views in `protocol`: the `results`
            # view reads them as protocol 'finetune' (warehouse/catalog.py).
            ("view_protocol", pa.string()),
            ("seed", pa.int64()),
            ("n_train", pa.int64()),
        ]
    ),
    # Which evaluations a grid covers: one row per (grid, eval_id), written whenever a grid runs a
    # cell or finds it already evaluated (another grid's, or an earlier run's), so a grid's report
    # holds every cell it names, not only those it computed (results.grid is the first grid only).
    "grid_cells": pa.schema(
        [
            ("grid", pa.string()),
            ("eval_id", pa.string()),
            ("dataset", pa.string()),
            ("run_id", pa.string()),
            ("created_at", TS),
        ]
    ),
    # One row per evaluated video: fused prediction plus every view's softmax scores, so a result
    # can be re-fused under another view protocol without running the model again.
    "predictions": pa.schema(
        [
            ("eval_id", pa.string()),
            ("dataset", pa.string()),
            ("video_id", pa.string()),
            ("label", pa.string()),
            ("label_index", pa.int32()),
            ("prediction", pa.string()),
            ("top5", pa.list_(pa.string())),
            ("correct", pa.bool_()),
            ("scores", pa.list_(pa.float32())),
            ("views", pa.list_(pa.string())),
            ("view_scores", pa.list_(pa.list_(pa.float32()))),
            ("token_shard", pa.string()),
            ("created_at", TS),
        ]
    ),
    "datasets": pa.schema(
        [
            ("dataset", pa.string()),
            ("source", pa.string()),
            ("layout", pa.string()),
            ("labeled", pa.bool_()),
            ("flip_sensitive", pa.bool_()),
            ("classes", pa.list_(pa.string())),
            ("n_entries", pa.int64()),
            ("updated_at", TS),
        ]
    ),
}


def now() -> datetime:
    return datetime.now(timezone.utc)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write `table` to `path` so that `path` is only ever absent or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:8]}.partial"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def to_table(name: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    schema = SCHEMAS[name]
    rows = list(rows)
    return pa.Table.from_pylist([{f: r.get(f) for f in schema.names} for r in rows], schema=schema)


def write_rows(name: str, rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    return write_parquet_atomic(to_table(name, rows), path)


# Where each table's files live under the data root, and how many folder levels sit between
# that base and a file: the catalog reads `<base>/*/.../*.parquet`.
LOCATIONS: dict[str, tuple[str, int]] = {
    "videos": ("tables/videos", 1),
    "shards": ("tables/shards", 1),
    "runs": ("tables/runs", 1),
    "datasets": ("tables/datasets", 1),
    # tables/results/<dataset>/<eval_id>.parquet, tables/predictions/<dataset>/<eval_id>.parquet
    "results": ("tables/results", 1),
    "predictions": ("tables/predictions", 1),
    # tables/grid_cells/<dataset>/<grid hash>-<eval_id>.parquet
    "grid_cells": ("tables/grid_cells", 1),
    # shards/frames/<dataset>/<variant>/NNNNN.parquet
    "frame_samples": ("shards/frames", 2),
    # shards/tokens/<dataset>/<variant>/NNNNN.parquet
    "token_samples": ("shards/tokens", 2),
}


def table_glob(home: Path, name: str) -> str:
    base, depth = LOCATIONS[name]
    return (home / base).as_posix() + "/*" * depth + "/*.parquet"


# Which stage commits the rows of which table, unit by unit (its markers are in `shards`): the
# tables that compaction merges (warehouse/compact.py).
UNIT_TABLES: dict[str, str] = {"ingest": "videos", "frames": "frame_samples", "tokenize": "token_samples"}

# Compacted files: tables/compacted/<table>/dataset=<name>/part-<compaction>-<k>.parquet, and for
# the markers tables/compacted/shards/dataset=<name>/stage=<stage>/part-<compaction>.parquet.
# Hive-style folders, so that a filter on dataset (and stage) selects folders before any file
# is opened, in the catalog's views and in any DuckDB, Spark or pyarrow reader.
COMPACTED = "tables/compacted"
COMPACTION_COLUMN = "compaction"
SCHEMA_PARTITION = "_schema"  # the zero-row schema file's partition value; no dataset name starts with "_"


def compacted_schema(name: str) -> pa.Schema:
    return SCHEMAS[name].append(pa.field(COMPACTION_COLUMN, pa.string()))


def compacted_dir(home: Path, name: str, dataset: str, stage: str | None = None) -> Path:
    folder = home / COMPACTED / name / f"dataset={dataset}"
    return folder / f"stage={stage}" if name == "shards" else folder


def compacted_glob(home: Path, name: str) -> str:
    levels = 2 if name == "shards" else 1
    return (home / COMPACTED / name).as_posix() + "/*" * levels + "/*.parquet"


def compacted_schema_path(home: Path, name: str) -> Path:
    return compacted_dir(home, name, SCHEMA_PARTITION, SCHEMA_PARTITION) / "_schema.parquet"


def schema_path(home: Path, name: str) -> Path:
    """Where a table's zero-row schema file lives (`ensure_schema_file`)."""
    base, depth = LOCATIONS[name]
    return home / base / Path(*(["_schema"] * depth)) / "_schema.parquet"


def ensure_schema_file(home: Path, name: str) -> Path:
    """A zero-row file where the table's glob finds it, so its view has every column even
    before the first write (DuckDB refuses a glob that matches nothing), and so a column
    added in a newer version reads as NULL in files written before it."""
    path = schema_path(home, name)
    if not path.exists() or not pq.read_schema(path).equals(SCHEMAS[name], check_metadata=False):
        write_parquet_atomic(SCHEMAS[name].empty_table(), path)
    return path


def ensure_compacted_schema_file(home: Path, name: str) -> Path:
    """The same for a table's compacted files (its hive glob must match a file too)."""
    path = compacted_schema_path(home, name)
    schema = compacted_schema(name)
    if not path.exists() or not pq.read_schema(path).equals(schema, check_metadata=False):
        write_parquet_atomic(schema.empty_table(), path)
    return path


def clean_partials(folder: Path, pattern: str = "*.partial") -> int:
    """Remove leftovers of writes interrupted by a crash (never visible to readers). Call it
    only while holding the lock of whoever writes files matching `pattern` there."""
    n = 0
    if folder.exists():
        for p in folder.glob(pattern):
            p.unlink(missing_ok=True)
            n += 1
    return n
