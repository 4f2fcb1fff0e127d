"""Compaction: merge committed per-unit files into a few large files per table and dataset.

The stages commit one rows file and one marker file per unit of work (16 videos per ingest
unit by default), so a catalog of 1.2M videos would be 75,000 + 75,000 files that every query
globs and opens. Compaction of one (stage, dataset) writes the rows of its committed units into
a *part*: rows files of at most `target_rows` rows under
`tables/compacted/<table>/dataset=<name>/part-<id>-<k>.parquet`, then the units' markers into
`tables/compacted/shards/dataset=<name>/stage=<stage>/part-<id>.parquet`. That second rename is
the commit: from then on the catalog's views take those units from the part and ignore their
unit files (warehouse/catalog.py, `_shards_live`), which the compaction then removes.

Crash safety: before the commit the part's rows are invisible (no marker holds their
compaction id) and the unit files are what the views show; after it, the unit files are
invisible and only wait to be removed. A run killed at any point, or several compactions one
after the other, leave the views exactly as they were; the next compaction of the same
(stage, dataset) first removes whatever a killed one left (partial files, merged files, parts
that lost to a newer one) and goes on.

Incremental: each compaction writes one part from the units committed since the last one, and
merges existing parts only within a size tier (at least `fanout` parts of similar size, all
smaller than `target_rows`), so adding 1,000 videos to a compacted catalog writes about 1,000
rows, and every row is rewritten about log_fanout(target_rows / unit size) times in all.

Locks: a compaction holds the lock of the stage and dataset it compacts (the one the stage
holds while it runs), so it never races the stage's own writes; other datasets and other
stages go on. It takes the catalog's file lock (`changing_files`) only for the commit rename
and for removals, which queries (`reading_files`) exclude; it reads its stage's marker folder,
which holds every dataset's markers, as a query.
"""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import duckdb
import pyarrow.parquet as pq

from warehouse.catalog import Catalog, LockBusy, changing_files, file_lock, reading_files
from warehouse.layout import DataRoot
from warehouse.summaries import refresh_summaries
from warehouse.tables import (
    COMPACTED,
    LOCATIONS,
    SCHEMAS,
    UNIT_TABLES,
    _fsync_dir,
    clean_partials,
    compacted_dir,
    compacted_schema,
    compacted_schema_path,
)

TARGET_ROWS = 1_000_000
FANOUT = 4
# A stage run compacts at its end once this many of its units are in unit files: a catalog
# keeps at most about this many unit files per stage and dataset beside its parts.
AUTO_MIN_UNITS = 32
ROW_GROUP_ROWS = 128 * 1024  # several row groups per part file, so a scan of one file uses every core
REMOVE_BATCH = 2000  # files removed per hold of the file lock: queries wait for one batch at most
# Unit files are read in chunks of CHUNK_FILES, each chunk by its own DuckDB connection, READERS
# at a time (see `_read_chunked`).
READERS = max(1, min(4, os.cpu_count() or 1))
CHUNK_FILES = 2048

# Row order inside a part: what lookups filter on, so Parquet statistics skip row groups.
SORT_KEYS = {"videos": "video_id, ingested_at", "frame_samples": "shard, video_id", "token_samples": "shard, video_id"}

_PART = re.compile(r"^part-(\d{8}-[0-9a-f]{6})(?:-(\d+))?\.parquet$")


def stage_lock_path(root: DataRoot, stage: str, dataset: str) -> Path:
    """The lock a stage holds on a dataset while it runs (stages/*/stage.py)."""
    return root.locks / f"{stage}--{dataset}.lock"


@dataclass
class CompactionResult:
    stage: str
    dataset: str
    units: int = 0  # units taken from unit files into the new part
    parts_merged: int = 0  # earlier parts merged into it
    rows: int = 0  # rows written
    files_written: int = 0
    files_removed: int = 0
    unit_files_left: int = 0  # committed units still in unit files (fewer than min_units)
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was done (busy)

    def describe(self) -> str:
        what = f"compact {self.stage} {self.dataset}: "
        if self.skipped:
            return what + self.skipped
        if not self.files_written and not self.files_removed:
            return what + f"nothing to do ({self.unit_files_left} units in unit files)"
        return what + (f"{self.units} units and {self.parts_merged} parts -> {self.rows} rows in {self.files_written} files, "
                       f"{self.files_removed} files removed, {self.seconds:.1f} s")


@dataclass
class _Part:
    cid: str
    rows_files: list[Path] = field(default_factory=list)
    marks_file: Path | None = None
    rows: int = 0


def _columns_of(table: str, alias: str) -> str:
    return ", ".join(f'{alias}."{c}"' for c in SCHEMAS[table].names)


def _literal(path: Path | str) -> str:
    """A path as an SQL string literal."""
    return "'" + (path.as_posix() if isinstance(path, Path) else path).replace("'", "''") + "'"


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_literal(p) for p in paths) + "]"


def _files(folder: Path, pattern: str) -> list[Path]:
    """The files matching `folder/pattern`, in name order, leaving out hidden names: the temporary
    files of atomic writes (`.<name>.<id>.partial`) and anything under a hidden folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _read_chunked(con: duckdb.DuckDBPyConnection, table: str, schema_file: Path, files: list[Path],
                  select: Callable[[str], str], params: dict, readers: int) -> None:
    """CREATE TEMP TABLE `table` from `select(files_sql)` (a query over `read_parquet(files_sql,
    ...)`) run over `files` in chunks, the table's schema file first in each chunk so that its
    types hold even where no file matched, each chunk on a connection of its own, `readers` at a
    time, inserted into `con` as they arrive (`readers` 1: one chunk after another).

    Why not one query: DuckDB spends about 0.45 ms on each 31-column rows file and 0.3 ms on each
    marker file, much of it one file after another whatever its thread count, so one query over a
    HowTo100M dataset's 75,000 unit files leaves cores idle. Separate connections share nothing
    and read side by side: a lone compaction of 300,000 videos' ingest took 14.0 s with two
    readers and 15.5 s with one on 2 cores (bench/RESULTS.md, "Catalog at scale"). A reader's
    error (a schema mismatch, which `_scan` answers with union_by_name) is raised here."""
    chunks = [files[i : i + CHUNK_FILES] for i in range(0, len(files), CHUNK_FILES)] or [[]]
    threads = max(1, (os.cpu_count() or 1) // readers)

    def read(chunk: list[Path]):
        reader = duckdb.connect(":memory:")
        try:
            reader.execute("SET TimeZone = 'UTC'")
            reader.execute(f"SET threads = {threads}")
            reader.execute("SET preserve_insertion_order = false")
            return reader.sql(select(_sql_list([schema_file, *chunk])), params=params).to_arrow_table()
        finally:
            reader.close()

    with ThreadPoolExecutor(min(readers, len(chunks))) as pool:
        for i, rows in enumerate(pool.map(read, chunks)):
            con.register("_chunk", rows)
            try:
                con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM _chunk" if i == 0
                            else f"INSERT INTO {table} SELECT * FROM _chunk")
            finally:
                con.unregister("_chunk")


def _tier(rows: int, fanout: int) -> int:
    return int(math.log(max(rows, 1), fanout))


def _new_cid(parts: dict[str, _Part]) -> str:
    seq = max((int(cid.split("-")[0]) for cid in parts), default=0) + 1
    return f"{seq:08d}-{uuid.uuid4().hex[:6]}"


class _Compactor:
    def __init__(self, root: DataRoot, stage: str, dataset: str, *, target_rows: int, fanout: int, remove_batch: int,
                 readers: int, on_step: Callable[[str], None] | None):
        if stage not in UNIT_TABLES:
            raise ValueError(f"cannot compact stage {stage!r}: only {', '.join(UNIT_TABLES)} commit units")
        if target_rows < 1 or fanout < 2:
            raise ValueError(f"compaction needs target_rows >= 1 and fanout >= 2, got {target_rows} and {fanout}")
        if readers < 1:
            raise ValueError(f"compaction needs readers >= 1, got {readers}")
        self.root, self.stage, self.dataset = root, stage, dataset
        self.table = UNIT_TABLES[stage]
        self.target_rows, self.fanout, self.remove_batch, self.readers = target_rows, fanout, remove_batch, readers
        self.on_step = on_step or (lambda step: None)
        self.rows_dir = compacted_dir(root.home, self.table, dataset)
        self.marks_dir = compacted_dir(root.home, "shards", dataset, stage)
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET TimeZone = 'UTC'")  # timestamps leave DuckDB as they were stored
        # A large dataset's staged rows may not fit in memory: spill into the data root's tmp/.
        self.con.execute(f"SET temp_directory = {_literal(root.tmp / 'compact')}")
        # Reading many small files in any order is about twice as fast; a part's order is the
        # ORDER BY of its query.
        self.con.execute("SET preserve_insertion_order = false")

    def close(self) -> None:
        self.con.close()

    # ------------------------------------------------------------------ reading the state

    def _scan(self) -> None:
        """Markers and rows of this (stage, dataset), wherever they are, into temporary tables,
        reading each file once: `marks` (every marker row, with its file and compaction: NULL for
        a unit file) and `staged` (every row of the dataset's unit rows files, with its file).
        `live_marks` is what the views show: one copy of each attempt of a unit.

        Unit files are read with the table's schema file first and without union_by_name, which
        opens each file once instead of twice (a third of the time of a first compaction); a
        file written before a column was added makes DuckDB refuse that, and the scan is redone
        with union_by_name."""
        try:
            self._scan_files(union_by_name=False)
        except duckdb.InvalidInputException as e:
            if "schema mismatch" not in str(e):
                raise
            self._scan_files(union_by_name=True)

    def _scan_files(self, union_by_name: bool) -> None:
        home = self.root.home
        by_name = str(union_by_name).lower()
        cols = _columns_of("shards", "m")
        # Every stage names a unit's marker `<dataset>--...` (stages/*/stage.py): globbing the
        # dataset's own reads one dataset's markers, not the whole stage's (a small dataset beside
        # HowTo100M would otherwise read 75,000 files to compact 800); the WHERE below stays the rule.
        unit_marks = _files(self.root.table_dir("shards", self.stage), f"{self.dataset}--*.parquet")
        self.parts = self._list_parts()
        part_marks = [p.marks_file for p in self.parts.values() if p.marks_file is not None]
        params = {"dataset": self.dataset, "stage": self.stage}
        # The stage's marker folder holds every dataset's markers, which their own compactions
        # remove: read it as a query does. The rows and parts read below are this (stage,
        # dataset)'s own, which only the holder of its stage lock writes or removes.
        with reading_files(self.root):
            _read_chunked(self.con, "unit_marks", self.root.table_dir("shards", "_schema", "_schema.parquet"), unit_marks,
                          lambda files: f"""SELECT {cols}, NULL::VARCHAR AS compaction, m.filename AS file
                              FROM read_parquet({files}, union_by_name={by_name}, filename=true) m
                              WHERE m.dataset = $dataset AND m.stage = $stage""", params, self.readers)
            sources = ["SELECT * FROM unit_marks"]
            if part_marks:
                files = _sql_list([compacted_schema_path(home, "shards"), *part_marks])
                sources.append(f"""SELECT {cols}, m.compaction, m.filename AS file
                    FROM read_parquet({files}, union_by_name=true, filename=true) m
                    WHERE m.dataset = $dataset AND m.stage = $stage""")
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE marks AS {' UNION ALL '.join(sources)}",
                             params if part_marks else {})
        self.con.execute("DROP TABLE unit_marks")
        self.con.execute("""CREATE OR REPLACE TEMP VIEW live_marks AS
            SELECT * FROM marks QUALIFY row_number() OVER (
                PARTITION BY unit, created_at ORDER BY compaction DESC NULLS LAST) = 1""")
        base, depth = LOCATIONS[self.table]
        rows_files = _files(home / base / self.dataset, "/".join(["*"] * (depth - 1) + ["*.parquet"]))
        _read_chunked(self.con, "staged", home / base / Path(*(["_schema"] * depth)) / "_schema.parquet", rows_files,
                      lambda files: f"""SELECT {_columns_of(self.table, 'r')}, r.filename AS file
                          FROM read_parquet({files}, union_by_name={by_name}, filename=true) r WHERE r.dataset = $dataset""",
                      {"dataset": self.dataset}, self.readers)
        self.con.execute("""CREATE OR REPLACE TEMP VIEW unit_rows AS
            SELECT file, unit, count(*) AS n FROM staged GROUP BY ALL""")
        # The markers in files of their own that a new part takes over: those whose rows are in
        # the dataset's folder (a marker whose rows are elsewhere keeps its file, and its rows
        # stay visible where they are).
        self.con.execute("""CREATE OR REPLACE TEMP VIEW taken_marks AS
            SELECT * FROM live_marks WHERE compaction IS NULL AND unit IN (SELECT unit FROM staged)""")

    def _forget(self, removed: list[Path]) -> None:
        """Drop removed files from the scanned state (they held nothing the views show)."""
        names = [p.as_posix() for p in removed]
        self.con.execute("DELETE FROM marks WHERE list_contains(?::VARCHAR[], file)", [names])
        self.con.execute("DELETE FROM staged WHERE list_contains(?::VARCHAR[], file)", [names])
        gone = set(removed)
        for cid in list(self.parts):
            part = self.parts[cid]
            part.rows_files = [f for f in part.rows_files if f not in gone]
            if part.marks_file in gone:
                part.marks_file = None
            if not part.rows_files and part.marks_file is None:
                del self.parts[cid]

    def _list_parts(self) -> dict[str, _Part]:
        parts: dict[str, _Part] = {}
        for folder, is_marks in ((self.rows_dir, False), (self.marks_dir, True)):
            for path in sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []:
                m = _PART.match(path.name)
                if m is None:
                    continue
                part = parts.setdefault(m.group(1), _Part(m.group(1)))
                if is_marks:
                    part.marks_file = path
                else:
                    part.rows_files.append(path)
                    part.rows += pq.read_metadata(path).num_rows
        return parts

    def _live_parts(self) -> set[str]:
        return {c for (c,) in self.con.execute("SELECT DISTINCT compaction FROM live_marks WHERE compaction IS NOT NULL").fetchall()}

    # ------------------------------------------------------------------ removing what no view shows

    def _garbage(self) -> list[Path]:
        """Files no view reads rows from, in a safe removal order: unit rows files whose every
        unit a compaction holds, unit marker files that lost to a compaction, then parts that
        lost every marker to a newer part (rows files before the marker file)."""
        unit_rows = [Path(f) for (f,) in self.con.execute("""
            SELECT r.file FROM unit_rows r LEFT JOIN (
                SELECT unit, count(*) FILTER (WHERE compaction IS NULL) AS own, count(*) AS n FROM live_marks GROUP BY unit
            ) m USING (unit)
            GROUP BY r.file HAVING bool_and(coalesce(m.n, 0) > 0 AND m.own = 0) ORDER BY r.file""").fetchall()]
        unit_marks = [Path(f) for (f,) in self.con.execute("""
            SELECT DISTINCT file FROM marks WHERE compaction IS NULL
            EXCEPT SELECT file FROM live_marks WHERE compaction IS NULL ORDER BY file""").fetchall()]
        live = self._live_parts()
        dead = [p for cid, p in sorted(self.parts.items()) if cid not in live]
        files = unit_rows + unit_marks
        files += [f for p in dead for f in p.rows_files]
        files += [p.marks_file for p in dead if p.marks_file is not None]
        return files

    def _remove(self, files: list[Path]) -> int:
        """Remove files in batches, each under the file lock; unlinks run on threads (freeing the
        blocks of a just-written file can take milliseconds, mostly waiting on the disk)."""
        with ThreadPoolExecutor(8) as pool:
            for i in range(0, len(files), self.remove_batch):
                with changing_files(self.root):
                    list(pool.map(lambda p: p.unlink(missing_ok=True), files[i : i + self.remove_batch]))
                self.on_step(f"removed {min(i + self.remove_batch, len(files))} of {len(files)}")
        for folder in {p.parent for p in files}:
            _fsync_dir(folder)
        return len(files)

    # ------------------------------------------------------------------ writing a part

    def _merge_set(self, new_rows: int) -> list[_Part]:
        """Earlier parts to merge into the new one: the lowest size tier below target_rows that
        holds at least `fanout` parts (the new one counted), with every smaller part; and any
        part written before a column was added to its table (the views read parts without
        union_by_name once none is left: warehouse/catalog.py)."""
        live = self._live_parts()
        parts = [p for cid, p in sorted(self.parts.items()) if cid in live]
        outdated = {p.cid for p in parts if not self._current_schema(p)}
        candidates = [p for p in parts if p.rows < self.target_rows]
        tiers: dict[int, int] = {}
        for rows in [p.rows for p in candidates] + ([new_rows] if new_rows else []):
            tiers[_tier(rows, self.fanout)] = tiers.get(_tier(rows, self.fanout), 0) + 1
        full = [t for t, n in sorted(tiers.items()) if n >= self.fanout]
        tiered = {p.cid for p in candidates if full and _tier(p.rows, self.fanout) <= full[0]}
        return [p for p in parts if p.cid in tiered | outdated]

    def _current_schema(self, part: _Part) -> bool:
        files = [(f, compacted_schema(self.table)) for f in part.rows_files]
        if part.marks_file is not None:
            files.append((part.marks_file, compacted_schema("shards")))
        return all(pq.read_schema(f).equals(schema, check_metadata=False) for f, schema in files)

    def _write_rows(self, cid: str, merged: list[_Part]) -> list[Path]:
        """The part's rows files, each written under a temporary name, fsynced and renamed.
        Invisible until the part's marker file exists."""
        # Exactly what the views show of unit files: rows of units with a marker of their own.
        sources = [f"""SELECT {_columns_of(self.table, 's')} FROM staged s
            SEMI JOIN taken_marks m ON m.unit = s.unit"""]
        rows_files = [f for p in merged for f in p.rows_files]
        if rows_files:
            files = _sql_list([compacted_schema_path(self.root.home, self.table), *rows_files])
            sources.append(f"""SELECT {_columns_of(self.table, 'c')} FROM read_parquet({files}, union_by_name=true) c
                SEMI JOIN (SELECT unit, compaction FROM live_marks WHERE compaction IS NOT NULL) m
                     ON m.unit = c.unit AND m.compaction = c.compaction""")
        sql = (f"SELECT *, '{cid}' AS compaction FROM ({' UNION ALL '.join(sources)}) "
               f"ORDER BY {SORT_KEYS[self.table]}")
        schema = compacted_schema(self.table)
        reader = self.con.sql(sql).to_arrow_reader(ROW_GROUP_ROWS)
        self.rows_dir.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        writer = tmp = None
        in_file = 0

        def finish() -> None:
            writer.close()
            final = self.rows_dir / f"part-{cid}-{len(written)}.parquet"
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            written.append(final)
            self.on_step(f"wrote {final.name}")

        try:
            for batch in reader:
                batch = batch.cast(schema)
                while batch.num_rows:
                    if writer is None:
                        tmp = self.rows_dir / f".part-{cid}-{len(written)}.{uuid.uuid4().hex[:8]}.partial"
                        writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                        in_file = 0
                    take = min(batch.num_rows, self.target_rows - in_file)
                    writer.write_batch(batch.slice(0, take), row_group_size=ROW_GROUP_ROWS)
                    in_file += take
                    batch = batch.slice(take)
                    if in_file >= self.target_rows:
                        finish()
                        writer = None
            if writer is not None:
                finish()
                writer = None
        finally:
            if writer is not None:
                writer.close()
                Path(tmp).unlink(missing_ok=True)
        _fsync_dir(self.rows_dir)
        return written

    def _commit_marks(self, cid: str, merged: list[_Part]) -> Path:
        """The part's marker file: the units' markers as the views show them now. Its rename is
        the commit; from then on the views read these units from the part."""
        cols = ", ".join(f'"{c}"' for c in SCHEMAS["shards"].names)
        merged_ids = [p.cid for p in merged]
        table = self.con.sql(
            f"""SELECT {cols}, $cid AS compaction FROM (
                    SELECT * FROM taken_marks UNION ALL
                    SELECT * FROM live_marks WHERE list_contains($merged::VARCHAR[], compaction))
                ORDER BY unit, created_at""",
            params={"cid": cid, "merged": merged_ids}).to_arrow_table().cast(compacted_schema("shards"))
        self.marks_dir.mkdir(parents=True, exist_ok=True)
        final = self.marks_dir / f"part-{cid}.parquet"
        tmp = self.marks_dir / f".part-{cid}.{uuid.uuid4().hex[:8]}.partial"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        with changing_files(self.root):
            os.replace(tmp, final)
        _fsync_dir(self.marks_dir)
        return final

    # ------------------------------------------------------------------ the whole run

    def run(self, min_units: int) -> CompactionResult:
        t0 = time.perf_counter()
        result = CompactionResult(self.stage, self.dataset)
        # A killed compaction's temporary files (we hold the lock of whoever writes them).
        for folder in (self.rows_dir, self.marks_dir):
            clean_partials(folder, ".part-*.partial")
        self._scan()
        garbage = self._garbage()
        self.on_step("scanned")
        result.files_removed += self._remove(garbage)
        self._forget(garbage)
        units, new_rows = self.con.execute("""
            SELECT count(DISTINCT unit), (SELECT count(*) FROM staged WHERE unit IN (SELECT unit FROM taken_marks))
            FROM taken_marks""").fetchone()
        merged = self._merge_set(int(new_rows))
        if units < min_units and not merged:
            result.unit_files_left = int(units)
            result.seconds = time.perf_counter() - t0
            return result
        cid = _new_cid(self.parts)
        rows_files = self._write_rows(cid, merged)
        self.on_step("rows written")
        marks_file = self._commit_marks(cid, merged)
        self.on_step("committed")
        result.units, result.parts_merged = int(units), len(merged)
        result.rows = sum(pq.read_metadata(p).num_rows for p in rows_files)
        result.files_written = len(rows_files) + 1
        # The state after the commit, as the views see it: the new part holds these markers.
        self.parts[cid] = _Part(cid, rows_files, marks_file, result.rows)
        self.con.execute(
            """INSERT INTO marks SELECT * EXCLUDE (compaction, file), $cid AS compaction, $file AS file FROM (
                   SELECT * FROM taken_marks UNION ALL
                   SELECT * FROM live_marks WHERE list_contains($merged::VARCHAR[], compaction))""",
            {"cid": cid, "file": marks_file.as_posix(), "merged": [p.cid for p in merged]})
        result.files_removed += self._remove(self._garbage())
        self.on_step("done")
        result.seconds = time.perf_counter() - t0
        return result


def compact_locked(root: DataRoot, stage: str, dataset: str, *, min_units: int = 1, target_rows: int = TARGET_ROWS,
                   fanout: int = FANOUT, remove_batch: int = REMOVE_BATCH, readers: int = READERS, summaries: bool = True,
                   on_step: Callable[[str], None] | None = None) -> CompactionResult:
    """Compact one stage's units of one dataset, then rewrite the dataset's status summaries of
    that stage; the caller holds that stage's lock on the dataset (a stage at the end of its
    run). No part is written while fewer than `min_units` units are in unit files, but what a
    killed compaction left is always cleaned up. `on_step` hears each step ("scanned", "wrote
    <part file>", "rows written", "committed", "removed N of M", "done")."""
    compactor = _Compactor(root, stage, dataset, target_rows=target_rows, fanout=fanout, remove_batch=remove_batch,
                           readers=readers, on_step=on_step)
    try:
        result = compactor.run(min_units)
    finally:
        compactor.close()
    if summaries:
        refresh_summaries(root, stage, dataset)
    return result


def compact(root: DataRoot, stage: str, dataset: str, *, wait: bool = False, **kwargs) -> CompactionResult:
    """`compact_locked` under the stage's lock on the dataset. With `wait=False` a stage run (or
    compaction) holding it makes this return at once, `skipped` saying so: that run compacts
    at its end."""
    try:
        with file_lock(stage_lock_path(root, stage, dataset), wait=wait):
            return compact_locked(root, stage, dataset, **kwargs)
    except LockBusy as e:
        return CompactionResult(stage, dataset, skipped=f"busy ({e}); the run holding it compacts when it ends")


def compact_after_run(root: DataRoot, stage: str, dataset: str, *, info: Callable[[str], None],
                      warning: Callable[[str], None]) -> CompactionResult | None:
    """What a stage does at the end of its run, still holding its lock on the dataset: compact
    once AUTO_MIN_UNITS units are in unit files, and rewrite the dataset's summaries. A
    compaction that fails leaves the catalog as it was; the run's units are committed either
    way, so the failure is reported, not raised."""
    try:
        result = compact_locked(root, stage, dataset, min_units=AUTO_MIN_UNITS)
    except Exception as e:  # noqa: BLE001 - see the docstring: the stage's work is done and committed
        warning(f"compaction of {stage} {dataset} failed ({type(e).__name__}: {e}); the catalog is unchanged, "
                "`vimpac compact` retries it")
        return None
    if result.files_written or result.files_removed:
        info(result.describe())
    return result


def compactable(root: DataRoot) -> list[tuple[str, str]]:
    """(stage, dataset) pairs with unit rows files or parts, by dataset then stage. Dataset
    names come from folder names (every table keeps one folder per dataset), so finding them
    opens no file."""
    found: set[tuple[str, str]] = set()
    compacted = root.home / COMPACTED / "shards"
    for folder in compacted.glob("dataset=*/stage=*") if compacted.is_dir() else []:
        dataset, stage = folder.parent.name.split("=", 1)[1], folder.name.split("=", 1)[1]
        if stage in UNIT_TABLES and not dataset.startswith("_"):
            found.add((stage, dataset))
    for stage, table in UNIT_TABLES.items():
        base = root.home / LOCATIONS[table][0]
        for folder in base.iterdir() if base.is_dir() else []:
            if folder.is_dir() and not folder.name.startswith("_"):
                found.add((stage, folder.name))
    return sorted(found, key=lambda sd: (sd[1], list(UNIT_TABLES).index(sd[0])))


def compact_all(root: DataRoot, *, datasets: list[str] | None = None, wait: bool = False,
                report: Callable[[CompactionResult], None] | None = None, **kwargs) -> list[CompactionResult]:
    """`vimpac compact`: every (stage, dataset) of the data root (or of `datasets`), two at a
    time (one's removals, waiting on the disk, overlap the other's reading); then the status
    summaries of each, once all are compacted (a summary reads views over every dataset's
    files); then the catalog file's views, so that a DuckDB client opening it reads the
    compacted files (binding views is cheap once the files are few)."""
    pairs = [(stage, dataset) for stage, dataset in compactable(root) if not datasets or dataset in datasets]
    # Two compactions at a time share the cores: half the readers each (on 2 cores one each, which
    # measured as fast as two each at 1.2M videos: bench/RESULTS.md).
    kwargs.setdefault("readers", max(1, READERS // 2))
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(compact, root, stage, dataset, wait=wait, summaries=False, **kwargs) for stage, dataset in pairs]
        results = []
        for future in futures:
            results.append(future.result())
            if report is not None:
                report(results[-1])
    for result in results:
        if result.skipped:
            continue
        try:
            with file_lock(stage_lock_path(root, result.stage, result.dataset), wait=wait):
                refresh_summaries(root, result.stage, result.dataset)
        except LockBusy:
            pass  # a run started meanwhile: it rewrites them when it ends
    Catalog(root).refresh()
    return results
