"""Compaction of the catalog (warehouse/compact.py): the views show the same rows before, during
(a compaction killed at any step) and after it; reruns, forced reruns and additions still work."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from media_fixtures import make_video
from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import run_ingest
from stages.reporting import RecordingReporter
import warehouse.compact as compact_module
from warehouse.catalog import Catalog, file_lock, reading_files
from warehouse.compact import compact, compact_all, stage_lock_path
from warehouse.layout import DataRoot
from warehouse.summaries import SUMMARIES, read_summary
from warehouse.tables import now, write_rows

ROOT = Path(__file__).resolve().parents[1]
VIEWS = ["videos", "videos_log", "shards", "shards_log", "frame_samples", "frame_samples_log", "token_samples",
         "token_samples_log"]


def snapshot(root: DataRoot) -> dict[str, list[tuple]]:
    """Every row of every view the compaction touches, in a fixed order."""
    return {view: Catalog(root).rows(f"SELECT * FROM {view} ORDER BY ALL") for view in VIEWS}


def catalog_files(root: DataRoot) -> list[str]:
    return sorted(p.relative_to(root.home).as_posix() for p in root.home.rglob("*.parquet")
                  if "_schema" not in p.parts and "summaries" not in p.parts)


# ---------------------------------------------------------------- a catalog written as the stages write it

def ingest_unit(root: DataRoot, ds: str, unit: str, videos: list[str], *, run: str = "r1", commit: bool = True,
                status: str = "ok", sha: dict[str, str] | None = None) -> None:
    """One ingest unit: its `videos` rows file, then its commit marker (stages/ingest/stage.py)."""
    at = now()
    rows = [{"dataset": ds, "video_id": v, "source": f"/src/{v}.mp4", "sha256": (sha or {}).get(v, f"sha-{v}"),
             "status": status, "error": None if status == "ok" else f"/src/{v}.mp4: broken", "label": f"L{v[-1]}",
             "split": "train", "splits": ["train", "test"], "duration_s": 2.5, "bytes": 1000, "unit": unit, "run_id": run,
             "ingested_at": at} for v in videos]
    path = root.table_dir("videos", ds, f"{unit}.parquet")
    write_rows("videos", rows, path)
    if commit:
        write_rows("shards", [{"stage": "ingest", "dataset": ds, "unit": unit, "path": root.relative(path), "n_samples": len(rows),
                               "n_failed": sum(r["status"] != "ok" for r in rows), "bytes": 1000 * len(rows), "run_id": run,
                               "created_at": now()}], root.table_dir("shards", "ingest", f"{ds}--{unit}.parquet"))


def sample_shard(root: DataRoot, stage: str, ds: str, number: int, videos: list[str], *, run: str = "r1") -> None:
    """One frame or token shard's rows beside its (absent) tar, then its marker (warehouse/shards.py)."""
    folder = f"shards/{'frames' if stage == 'frames' else 'tokens'}/{ds}/variant-a"
    tar = f"{folder}/{number:05d}.tar"
    unit = f"{ds}-{stage}-{number}"
    common = {"dataset": ds, "shard": tar, "fps": 2.0, "size": 32, "variant": "pretrain", "n_frames": 4, "status": "ok",
              "views": ["s100_c"], "unit": unit, "run_id": run, "created_at": now(), "config_hash": "cfg"}
    if stage == "frames":
        rows = [common | {"video_id": v, "key": v, "sha256": f"sha-{v}", "bytes": 10} for v in videos]
        write_rows("frame_samples", rows, root.home / folder / f"{number:05d}.parquet")
    else:
        rows = [common | {"video_id": v, "key": v, "tokenizer": "ckpt:abc", "grid_h": 4, "grid_w": 4, "n_views": 1}
                for v in videos]
        write_rows("token_samples", rows, root.home / folder / f"{number:05d}.parquet")
    write_rows("shards", [{"stage": stage, "dataset": ds, "unit": unit, "path": tar, "n_samples": len(rows), "n_failed": 0,
                           "bytes": 0, "run_id": run, "created_at": now()}],
               root.table_dir("shards", stage, f"{ds}--variant-a--{number:05d}.parquet"))


def build_catalog(root: DataRoot) -> None:
    """Two datasets; ingest units (one forced again, one never committed, one duplicate
    content, failures), frame and token shards."""
    Catalog(root).ensure_tables()
    for i in range(12):
        ingest_unit(root, "big", f"u{i:03d}", [f"v{3 * i + j:03d}" for j in range(3)])
    ingest_unit(root, "big", "u001", ["v003", "v004", "v005"], run="r2", status="failed")  # a forced rerun
    ingest_unit(root, "big", "orphan", ["v900"], commit=False)  # killed before its marker
    ingest_unit(root, "big", "dup", ["v950"], sha={"v950": "sha-v000"})  # same bytes as v000
    for i in range(3):
        ingest_unit(root, "small", f"w{i:03d}", [f"s{2 * i + j:03d}" for j in range(2)])
    for n in range(5):
        sample_shard(root, "frames", "big", n, [f"v{4 * n + j:03d}" for j in range(4)])
        sample_shard(root, "tokenize", "big", n, [f"v{4 * n + j:03d}" for j in range(4)])
    sample_shard(root, "frames", "small", 0, ["s000", "s001"])


@pytest.fixture
def built(root) -> tuple[DataRoot, dict]:
    build_catalog(root)
    return root, snapshot(root)


# ---------------------------------------------------------------- the views before and after

@pytest.mark.parametrize("chunk_files, readers", [(compact_module.CHUNK_FILES, compact_module.READERS), (1, 3), (2, 1)])
def test_views_are_identical_before_and_after_compaction(built, monkeypatch, chunk_files, readers):
    """Also with the unit files read one or two per chunk, by several readers at once (as at
    scale) or by one."""
    monkeypatch.setattr(compact_module, "CHUNK_FILES", chunk_files)
    root, before = built
    assert len(before["videos"]) == 43 and len(before["videos_log"]) == 44, "orphan rows only in the log"
    units_before = len(catalog_files(root))
    results = compact_all(root, readers=readers)
    assert {(r.stage, r.dataset) for r in results if r.units} == {
        ("ingest", "big"), ("frames", "big"), ("tokenize", "big"), ("ingest", "small"), ("frames", "small")}
    assert snapshot(root) == before
    after = catalog_files(root)
    assert len(after) < units_before / 3
    # Left in unit files: the uncommitted orphan only; every committed unit is in a part.
    assert [f for f in after if "compacted" not in f] == ["tables/videos/big/orphan.parquet"]
    assert all("/dataset=" in f for f in after if "compacted" in f), "parts live in per-dataset (hive) folders"
    # A second compaction has nothing to do and changes nothing.
    assert all(r.files_written == 0 and r.files_removed == 0 for r in compact_all(root))
    assert snapshot(root) == before


def test_a_dataset_filter_reads_only_that_datasets_folder(built):
    root, before = built
    compact_all(root)
    # Make the other dataset's parts unreadable: a query on `small` must never open them.
    for folder in ("videos", "shards", "frame_samples"):
        for part in (root.tables / "compacted" / folder / "dataset=big").rglob("*.parquet"):
            part.write_bytes(b"not parquet")
    small = Catalog(root).rows("SELECT * FROM videos WHERE dataset = 'small' ORDER BY ALL")
    assert small == [r for r in before["videos"] if r[0] == "small"]
    assert Catalog(root).rows("SELECT count(*) FROM frame_samples WHERE dataset = 'small'") == [(2,)]
    assert Catalog(root).rows("SELECT count(*) FROM shards WHERE dataset = 'small'") == [(4,)]
    with pytest.raises(Exception, match="parquet|Parquet"):
        Catalog(root).rows("SELECT count(*) FROM videos WHERE dataset = 'big'")


def test_a_forced_rerun_after_compaction_replaces_the_units_rows(built):
    root, before = built
    compact_all(root)
    ingest_unit(root, "big", "u002", ["v006", "v007", "v008"], run="r3", status="failed")
    videos = {r[1]: r for r in Catalog(root).rows("SELECT dataset, video_id, status, run_id FROM videos WHERE dataset = 'big'")}
    assert [videos[v][2:] for v in ("v006", "v007", "v008")] == [("failed", "r3")] * 3
    assert Catalog(root).rows("SELECT run_id, count(*) FROM videos_log WHERE unit = 'u002' GROUP BY ALL ORDER BY 1") == [
        ("r1", 3), ("r3", 3)]
    assert Catalog(root).rows("SELECT run_id FROM shards WHERE unit = 'u002'") == [("r3",)]
    rerun = snapshot(root)
    compact_all(root)
    assert snapshot(root) == rerun, "compacting the new attempt changes nothing either"


def test_a_rerun_killed_before_its_marker_leaves_the_compacted_attempt_visible(built):
    root, before = built
    compact_all(root)
    ingest_unit(root, "big", "u003", ["v009", "v010", "v011"], run="r4", status="failed", commit=False)
    assert snapshot(root)["videos"] == before["videos"], "rows without their marker never show"
    compact_all(root)
    assert snapshot(root)["videos"] == before["videos"]


def test_a_real_forced_ingest_after_compaction(root, tmp_path):
    src = tmp_path / "src"
    for i in range(3):
        make_video(src / f"c{i}.mp4", seed=i, frames=6)
    ds = DatasetConfig(name="real", source=str(src))
    cfg = IngestConfig(workers=1, batch_size=1)
    Catalog(root).refresh()
    run_ingest(root, ds, cfg, run_id="first")
    first = Catalog(root).rows("SELECT video_id, sha256, status FROM videos ORDER BY 1")
    compact_all(root)
    assert not list(root.table_dir("videos", "real").glob("*.parquet"))
    outcome = run_ingest(root, ds, cfg, run_id="again")
    assert outcome.summary["processed"] == 0, "compacted units count as done"
    run_ingest(root, ds, cfg, run_id="forced", force=True)
    assert Catalog(root).rows("SELECT video_id, sha256, status FROM videos ORDER BY 1") == first
    assert Catalog(root).rows("SELECT DISTINCT run_id FROM videos") == [("forced",)]
    assert Catalog(root).rows("SELECT run_id, count(*) FROM videos_log GROUP BY ALL ORDER BY 1") == [("first", 3), ("forced", 3)]


# ---------------------------------------------------------------- crash safety

KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from warehouse.compact import compact
from warehouse.layout import DataRoot
at = sys.argv[2]

def step(name):
    if name.startswith(at):
        os.kill(os.getpid(), signal.SIGKILL)

for stage, dataset in [("ingest", "big"), ("frames", "big")]:
    compact(DataRoot(sys.argv[1]), stage, dataset, target_rows=7, remove_batch=1, on_step=step)
"""


@pytest.mark.parametrize("at", ["scanned", "wrote part-", "rows written", "committed", "removed 1 of", "done"])
def test_compaction_killed_at_any_step_then_rerun_gives_the_same_catalog(built, tmp_path, at):
    """SIGKILL before the merge (scanned), during it (one of several part files written), before
    its commit, right after it, in the middle of removing the merged files, at the end."""
    root, before = built
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT.format(repo=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), str(root.home), at], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the compaction was not killed at {at!r}:\n{proc.stderr}"
    assert snapshot(root) == before, f"killed at {at!r}, the catalog shows exactly what was committed"
    compact_all(root, target_rows=7)
    assert snapshot(root) == before
    assert not list(root.home.rglob("*.partial"))

    # The files are those of an uninterrupted compaction: same unit files left, same number of
    # part files per folder (part ids differ).
    clean = DataRoot(tmp_path / "clean")
    build_catalog(clean)
    compact_all(clean, target_rows=7)

    def layout(r: DataRoot) -> dict[str, int]:
        folders: dict[str, int] = {}
        for f in catalog_files(r):
            key = f if "compacted" not in f else f.rsplit("/", 1)[0]
            folders[key] = folders.get(key, 0) + 1
        return folders

    assert layout(root) == layout(clean)


def test_a_compaction_partial_file_is_removed_by_the_next_one(built):
    root, before = built
    folder = root.tables / "compacted" / "videos" / "dataset=big"
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / ".part-00000009-abcdef-0.1234abcd.partial"
    leftover.write_bytes(b"half a file")
    compact(root, "ingest", "big")
    assert not leftover.exists() and snapshot(root) == before


# ---------------------------------------------------------------- incremental

def test_adding_units_to_a_compacted_catalog_rewrites_only_them(built):
    root, before = built
    compact_all(root)
    big_part = sorted((root.tables / "compacted" / "videos" / "dataset=big").glob("part-*.parquet"))
    stamp = [p.stat().st_mtime_ns for p in big_part]
    written = []
    for k in range(3):
        ingest_unit(root, "big", f"new{k}", [f"n{k}{j}" for j in range(2)])
        written.append(compact(root, "ingest", "big", fanout=4).rows)
    assert written == [2, 2, 2], "each compaction writes the new unit's rows only"
    assert [p.stat().st_mtime_ns for p in big_part] == stamp, "the first part is never rewritten"
    # A fourth small part in the same size tier: they merge into one.
    ingest_unit(root, "big", "new3", ["n30", "n31"])
    merged = compact(root, "ingest", "big", fanout=4)
    assert (merged.parts_merged, merged.rows) == (3, 8)
    parts = {p.name.split("-")[1] for p in (root.tables / "compacted" / "videos" / "dataset=big").glob("part-*.parquet")}
    assert len(parts) == 2
    assert len(Catalog(root).rows("SELECT * FROM videos WHERE dataset = 'big'")) == len(
        [r for r in before["videos"] if r[0] == "big"]) + 8


def test_a_stage_compacts_at_its_end_once_enough_units_are_waiting(root, tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(3):
        make_video(src / f"c{i}.mp4", seed=i, frames=6)
    ds = DatasetConfig(name="auto", source=str(src))
    Catalog(root).refresh()
    rep = RecordingReporter()
    run_ingest(root, ds, IngestConfig(workers=1, batch_size=1), run_id="few", reporter=rep)
    assert len(list(root.table_dir("videos", "auto").glob("*.parquet"))) == 3, "3 units: below AUTO_MIN_UNITS"
    assert (root.tables / "summaries" / "datasets" / "auto.parquet").exists(), "summaries are kept anyway"
    monkeypatch.setattr(compact_module, "AUTO_MIN_UNITS", 2)
    make_video(src / "c3.mp4", seed=3, frames=6)
    run_ingest(root, ds, IngestConfig(workers=1, batch_size=1), run_id="more", reporter=rep)
    assert not list(root.table_dir("videos", "auto").glob("*.parquet"))
    assert "compact ingest auto: 4 units" in rep.text()
    assert Catalog(root).rows("SELECT count(*) FROM videos WHERE status = 'ok'") == [(4,)]


# ---------------------------------------------------------------- concurrency

def test_compaction_skips_a_dataset_whose_stage_runs_and_never_waits_for_another_dataset(built):
    root, before = built
    with file_lock(stage_lock_path(root, "ingest", "big")):
        t0 = time.perf_counter()
        busy = compact(root, "ingest", "big")
        other = compact(root, "ingest", "small")
        assert time.perf_counter() - t0 < 30
    assert busy.skipped and "busy" in busy.skipped and busy.rows == 0
    assert other.skipped is None and other.units == 3
    assert snapshot(root) == before


def test_two_compactions_of_one_table_at_once(built, tmp_path):
    root, before = built
    script = tmp_path / "compact.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from warehouse.compact import compact
        from warehouse.layout import DataRoot
        compact(DataRoot(sys.argv[1]), "ingest", "big", wait=True, target_rows=5)
    """))
    procs = [subprocess.Popen([sys.executable, str(script), str(root.home)]) for _ in range(2)]
    assert [p.wait(120) for p in procs] == [0, 0]
    assert snapshot(root) == before
    assert [f for f in catalog_files(root) if f.startswith("tables/videos/big/")] == ["tables/videos/big/orphan.parquet"]
    parts = {p.name.split("-")[1] for p in (root.tables / "compacted" / "shards" / "dataset=big" / "stage=ingest").glob("*.parquet")}
    assert len(parts) == 1, "the second found nothing left to do"


def test_a_compaction_commits_only_between_queries(built):
    root, before = built
    steps: list[str] = []
    worker = threading.Thread(target=lambda: compact(root, "ingest", "big", on_step=steps.append))
    with reading_files(root):
        worker.start()
        deadline = time.monotonic() + 60
        while "rows written" not in steps and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert "rows written" in steps and "committed" not in steps, "the commit waits for the query in flight"
    worker.join(60)
    assert steps[-1] == "done" and snapshot(root) == before


# ---------------------------------------------------------------- summaries

def test_status_summaries_are_kept_and_never_stale(built):
    root, before = built
    catalog = Catalog(root)
    summary = SUMMARIES["datasets"]

    def from_view() -> list[dict]:
        con = catalog.connect()
        try:
            return con.sql(summary.query().replace("list_contains($datasets::VARCHAR[], dataset)", "TRUE")
                           + f" ORDER BY {summary.order}").to_arrow_table().to_pylist()
        finally:
            con.close()

    compact_all(root)
    assert read_summary(catalog, summary).to_pylist() == from_view()
    # The kept file is what status reads: change it and status shows the change...
    path = root.tables / "summaries" / "datasets" / "small.parquet"
    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("videos"), "videos", [[999]]).replace_schema_metadata(
        table.schema.metadata), path)
    assert {r["dataset"]: r["videos"] for r in read_summary(catalog, summary).to_pylist()}["small"] == 999
    # ...until the dataset commits something: then its rows come from the view again.
    ingest_unit(root, "small", "w100", ["s100"])
    assert read_summary(catalog, summary).to_pylist() == from_view()
    assert {r["dataset"]: r["videos"] for r in from_view()}["small"] == 7


def test_status_command_after_compaction(built, capsys):
    from flows.cli import main

    root, _ = built
    assert main(["--home", str(root.home), "compact"]) == 0
    out = capsys.readouterr().out
    assert "compact ingest big: 13 units" in out and "compacted 5 of 5" in out
    assert main(["--home", str(root.home), "status"]) == 0
    out = capsys.readouterr().out
    assert "big" in out and "small" in out and "units of work" in out
    assert main(["--home", str(root.home), "sql", "SELECT count(*) AS n FROM videos", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": 43}]


@pytest.mark.parametrize("chunk_files", [compact_module.CHUNK_FILES, 1])
def test_a_unit_file_written_before_a_column_existed_is_compacted_with_the_column_null(built, monkeypatch, chunk_files):
    """A unit file without a column makes the chunked scan fall back to union_by_name, in
    whichever reader meets it."""
    monkeypatch.setattr(compact_module, "CHUNK_FILES", chunk_files)
    root, _ = built
    unit = root.tables / "videos" / "big" / "u005.parquet"
    pq.write_table(pq.read_table(unit).drop_columns(["duration_s"]), unit)
    Catalog(root).refresh()
    legacy = snapshot(root)
    assert Catalog(root).rows("SELECT DISTINCT duration_s FROM videos WHERE unit = 'u005'") == [(None,)]
    assert Catalog(root).rows("SELECT count(*) FROM videos WHERE unit <> 'u005' AND duration_s IS NULL") == [(0,)]
    compact_all(root)
    assert not unit.exists(), "the unit file was compacted"
    assert snapshot(root) == legacy


def test_a_part_written_before_a_column_existed_reads_as_null_and_is_rewritten(built):
    root, _ = built
    compact_all(root)
    part = next((root.tables / "compacted" / "videos" / "dataset=big").glob("part-*.parquet"))
    old = pq.read_table(part)
    pq.write_table(old.drop_columns(["container"]), part)  # as a version without that column wrote it
    Catalog(root).refresh()
    legacy = snapshot(root)
    assert {r[18] for r in legacy["videos"] if r[0] == "big"} == {None}, "the missing column reads as NULL"
    result = compact(root, "ingest", "big")
    assert result.parts_merged == 1 and result.units == 0, "the outdated part is rewritten"
    assert pq.read_schema(next((root.tables / "compacted" / "videos" / "dataset=big").glob("part-*.parquet"))).names[-1] == "compaction"
    assert snapshot(root) == legacy
