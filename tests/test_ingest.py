"""The ingest stage end to end without Prefect: catalog rows, caching, dedupe, bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from media_fixtures import make_bad_inputs, make_video
from stages.config import DatasetConfig, IngestConfig
from stages.ingest.stage import plan_ingest, run_ingest
from stages.reporting import RecordingReporter
from warehouse.catalog import Catalog
from warehouse.tables import write_rows

FAST = dict(workers=2, batch_size=2, retries=1, backoff_s=0.01, connect_timeout_s=2, read_timeout_s=0.5, total_timeout_s=5)


def ingest(root, source, name="ds", reporter=None, force=False, **overrides):
    cfg = IngestConfig(**(FAST | overrides))
    ds = DatasetConfig(name=name, source=str(source))
    Catalog(root).refresh()
    rep = reporter or RecordingReporter()
    return run_ingest(root, ds, cfg, run_id="test-run", force=force, reporter=rep), rep


def videos(root, where: str = "TRUE") -> dict[str, dict]:
    table = Catalog(root).query(f"SELECT * FROM videos WHERE {where} ORDER BY dataset, video_id")
    return {r["video_id"]: r for r in table.to_pylist()}


def test_ingest_records_videos_queryable_with_sql(root, video_dir):
    src = video_dir(n=3, classes=["Jump", "Run"])
    outcome, rep = ingest(root, src)
    assert outcome.summary["ok"] == 3 and outcome.summary["failed"] == 0
    rows = videos(root)
    assert set(rows) == {"Jump/clip000", "Run/clip001", "Jump/clip002"}
    row = rows["Run/clip001"]
    assert row["label"] == "Run" and row["status"] == "ok" and row["codec"] == "h264"
    assert (row["width"], row["height"], row["n_frames"]) == (64, 48, 12)
    assert row["fps"] == pytest.approx(12.0) and row["duration_s"] == pytest.approx(1.0, abs=0.09)
    source_bytes = (src / "Run" / "clip001.mp4").read_bytes()
    assert row["sha256"] == hashlib.sha256(source_bytes).hexdigest() and row["bytes"] == len(source_bytes)
    assert (root.home / row["raw_path"]).read_bytes() == source_bytes
    by_label = dict(Catalog(root).rows("SELECT label, count(*) FROM videos WHERE status = 'ok' GROUP BY label"))
    assert by_label == {"Jump": 2, "Run": 1}
    assert Catalog(root).rows("SELECT stage, dataset, sum(n_samples) FROM shards GROUP BY ALL") == [("ingest", "ds", 3)]
    assert Catalog(root).rows("SELECT layout, classes FROM datasets") == [("folder_per_class", ["Jump", "Run"])]


def test_rerun_does_zero_work(root, video_dir):
    src = video_dir(n=4)
    ingest(root, src)
    units_before = Catalog(root).rows("SELECT unit, created_at FROM shards ORDER BY unit")
    outcome, rep = ingest(root, src)
    assert outcome.plan.pending == 0 and outcome.summary["processed"] == 0 and outcome.summary["cached"] == 4
    assert "4 cached" in rep.text() and "nothing to do" in rep.text()
    assert Catalog(root).rows("SELECT unit, created_at FROM shards ORDER BY unit") == units_before
    # Operational settings (parallelism, batching, timeouts) are not part of the cache key.
    outcome, _ = ingest(root, src, workers=1, batch_size=7, read_timeout_s=9)
    assert outcome.plan.pending == 0


def test_adding_two_videos_processes_exactly_two(root, video_dir):
    src = video_dir(n=5)
    ingest(root, src)
    make_video(src / "new_a.mp4", seed=100)
    make_video(src / "new_b.mp4", seed=101)
    outcome, rep = ingest(root, src)
    assert outcome.summary["processed"] == 2 and outcome.summary["cached"] == 5
    assert outcome.plan.reasons == {"new": 2}
    assert {e.video_id for b in outcome.plan.batches for e in b.entries} == {"new_a", "new_b"}
    assert len(videos(root)) == 7
    # Existing units keep their members: the original batches are untouched.
    assert Catalog(root).rows("SELECT count(*) FROM shards")[0][0] == 3 + 1


def test_changed_config_or_source_is_reprocessed_with_reason(root, video_dir):
    src = video_dir(n=2)
    ingest(root, src)
    outcome, rep = ingest(root, src, decode_check_frames=3)
    assert outcome.plan.reasons == {"config changed": 2}
    make_video(src / "clip000.mp4", seed=55, frames=24)
    outcome, _ = ingest(root, src, decode_check_frames=3)
    assert outcome.plan.reasons == {"source changed": 1}
    row = videos(root)["clip000"]
    assert row["n_frames"] == 24 and row["sha256"] == hashlib.sha256((src / "clip000.mp4").read_bytes()).hexdigest()
    outcome, _ = ingest(root, src, decode_check_frames=3, force=True)
    assert outcome.plan.reasons == {"forced": 2} and len(videos(root)) == 2


def test_same_bytes_stored_once_and_marked_duplicate(root, tmp_path):
    src = tmp_path / "src"
    make_video(src / "a.mp4", seed=1)
    shutil.copy(src / "a.mp4", src / "b.mp4")
    make_video(src / "c.mp4", seed=2)
    ingest(root, src)
    rows = videos(root)
    assert rows["a"]["status"] == "ok" and rows["c"]["status"] == "ok"
    assert rows["b"]["status"] == "duplicate" and rows["b"]["error"] == "same content as a"
    assert rows["a"]["sha256"] == rows["b"]["sha256"]
    assert len([p for p in root.raw.rglob("*") if p.is_file()]) == 2


def test_duplicate_manifest_entry_recorded_once(root, tmp_path):
    clip = make_video(tmp_path / "v" / "x.mp4", seed=3)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"source,label\n{clip},a\n{clip},a\n")
    outcome, rep = ingest(root, manifest)
    assert outcome.summary["processed"] == 1 and outcome.summary["duplicates_in_source"] == 1
    assert "duplicate entries in the source" in rep.text()
    assert len(videos(root)) == 1


def test_every_local_bad_input_fails_alone(root, tmp_path):
    src = tmp_path / "src"
    cases = make_bad_inputs(src / "bad")
    make_video(src / "good1.mp4", seed=1)
    make_video(src / "good2.mp4", seed=2)
    outcome, rep = ingest(root, src)
    rows = videos(root)
    for name, (path, code) in cases.items():
        row = rows[f"bad/{path.stem}"]
        assert row["status"] == "failed", name
        assert row["error_code"] == code, (name, row["error"])
        assert str(path) in row["error"], "the error names the input"
    assert rows["good1"]["status"] == rows["good2"]["status"] == "ok"
    assert rows["good1"]["has_video"] is True and rows["bad/audio"]["has_video"] is False
    assert outcome.summary["failed"] == len(cases) and outcome.errors == []
    # Permanent failures are not retried by a plain rerun.
    again, _ = ingest(root, src)
    assert again.plan.pending == 0


def test_http_sources_and_their_failures(root, tmp_path, http_server):
    good = make_video(tmp_path / "g.mp4", seed=7).read_bytes()
    http_server.files["/good.mp4"] = good
    manifest = tmp_path / "m.jsonl"
    rows_in = [
        {"video_id": "ok", "source": http_server.url("/good.mp4"), "label": "x"},
        {"video_id": "redirected", "source": http_server.url("/redirect/2/good.mp4")},
        {"video_id": "missing", "source": http_server.url("/status/404")},
        {"video_id": "broken", "source": http_server.url("/status/500")},
        {"video_id": "huge", "source": http_server.url("/big?bytes=5000000")},
        {"video_id": "stalled", "source": http_server.url("/stall")},
        {"video_id": "nosource", "label": "x"},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows_in) + "\nnot json at all\n")
    outcome, _ = ingest(root, manifest, max_bytes=2_000_000)
    rows = videos(root)
    assert rows["ok"]["status"] == "ok" and rows["ok"]["label"] == "x"
    assert rows["redirected"]["status"] == "duplicate"  # same bytes as `ok`
    expect = {
        "missing": ("http_404", False),
        "broken": ("http_500", True),
        "huge": ("too_large", False),
        "stalled": ("timeout", True),
        "nosource": ("bad_manifest_row", False),
        "m.jsonl:row8": ("bad_manifest_row", False),
    }
    for vid, (code, retryable) in expect.items():
        assert rows[vid]["status"] == "failed" and rows[vid]["error_code"] == code, rows[vid]["error"]
        assert bool(rows[vid]["retryable"]) == retryable
    assert "after 2 attempts" in rows["broken"]["error"] and http_server.hits["/status/500"] == 2
    assert "m.jsonl row 7" in rows["nosource"]["error"] and "missing 'source'" in rows["nosource"]["error"]
    # A rerun retries only the transient failures (HTTP 500, timeout).
    plan = plan_ingest(root, DatasetConfig(name="ds", source=str(manifest)), IngestConfig(**(FAST | {"max_bytes": 2_000_000})))
    assert {e.video_id for b in plan.batches for e in b.entries} == {"broken", "stalled"}
    assert plan.reasons == {"retrying transient failure": 2}


def test_rows_of_an_uncommitted_batch_are_invisible_and_redone(root, video_dir):
    """A run killed between writing a batch's rows and its commit marker shows nothing of it."""
    src = video_dir(n=2)
    plan = plan_ingest(root, DatasetConfig(name="ds", source=str(src)), IngestConfig(**FAST))
    batch = plan.batches[0]
    orphan = [{"dataset": "ds", "video_id": e.video_id, "status": "ok", "unit": batch.unit} for e in batch.entries]
    write_rows("videos", orphan, root.table_dir("videos", "ds", f"{batch.unit}.parquet"))
    Catalog(root).refresh()
    assert videos(root) == {}
    outcome, _ = ingest(root, src)
    assert outcome.summary["processed"] == 2 and all(r["status"] == "ok" for r in videos(root).values())


def test_catalog_file_is_read_only_for_queries_and_survives_a_moved_root(root, video_dir, tmp_path):
    src = video_dir(n=2)
    ingest(root, src)
    con = Catalog(root).connect()
    with pytest.raises(Exception):
        con.execute("CREATE TABLE x (a INT)")
    con.close()
    moved = tmp_path / "moved-home"
    shutil.move(str(root.home), moved)
    assert len(Catalog(moved).rows("SELECT * FROM videos")) == 2


def test_files_sharing_a_stem_are_all_ingested(root, tmp_path):
    """The same clip in several containers (all different bytes), and a byte-identical copy
    under another extension: every file reaches the catalog; the copy as a duplicate."""
    src = tmp_path / "src"
    make_video(src / "demo.mp4", seed=1)
    make_video(src / "demo.mkv", seed=1)
    make_video(src / "demo.webm", seed=1, codec="vp9")
    make_video(src / "sub" / "clip.mp4", seed=2)
    shutil.copy(src / "sub" / "clip.mp4", src / "sub" / "clip.mov")
    outcome, rep = ingest(root, src)
    rows = videos(root)
    assert set(rows) == {"demo", "demo.mp4", "demo.webm", "sub/clip", "sub/clip.mp4"}
    assert rows["demo"]["source"].endswith("demo.mkv")  # the first path keeps the bare id
    assert all(rows[v]["status"] == "ok" for v in ("demo", "demo.mp4", "demo.webm", "sub/clip"))
    assert rows["sub/clip.mp4"]["status"] == "duplicate" and rows["sub/clip.mp4"]["error"] == "same content as sub/clip"
    assert outcome.summary["duplicates_in_source"] == 0 and "duplicate entries in the source" not in rep.text()


def test_ids_already_in_the_catalog_keep_their_file_when_a_same_stem_file_appears(root, tmp_path):
    src = tmp_path / "src"
    make_video(src / "demo.mp4", seed=1)
    ingest(root, src)
    make_video(src / "demo.3gp", seed=4)  # sorts before demo.mp4: without the catalog it would take the id
    ingest(root, src)
    rows = videos(root)
    assert rows["demo"]["source"].endswith("demo.mp4") and rows["demo.3gp"]["status"] == "ok"


def test_a_dataset_defined_id_naming_two_different_files_fails_visibly(root, tmp_path):
    a = make_video(tmp_path / "v" / "a.mp4", seed=5)
    b = make_video(tmp_path / "w" / "b.mp4", seed=6)
    same = tmp_path / "w" / "a-copy.mp4"
    shutil.copy(a, same)
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"video_id,source,label\nx,{a},k\nx,{b},k\ny,{a},k\ny,{same},k\n")
    outcome, rep = ingest(root, manifest)
    rows = videos(root)
    assert rows["x"]["status"] == "failed" and rows["x"]["error_code"] == "id_clash"
    assert str(a) in rows["x"]["error"] and str(b) in rows["x"]["error"]
    assert rows["y"]["status"] == "ok" and outcome.summary["duplicates_in_source"] == 1  # the same bytes twice: one video
