"""The frames stage end to end without Prefect: shards, catalog, caching, appends, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from media_fixtures import make_video
from stages.config import DatasetConfig, FramesConfig, IngestConfig
from stages.frames.encoding import decode_view
from stages.frames.stage import plan_frames, run_frames
from stages.ingest.stage import run_ingest
from stages.reporting import RecordingReporter
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.shards import read_samples

ROOT = Path(__file__).resolve().parents[1]


def ingest(root: DataRoot, src: Path, name: str = "ds", flip_sensitive: bool = False) -> DatasetConfig:
    ds = DatasetConfig(name=name, source=str(src), flip_sensitive=flip_sensitive)
    Catalog(root).refresh()
    run_ingest(root, ds, IngestConfig(workers=2, batch_size=4), run_id="ingest-test")
    return ds


def frames(root: DataRoot, ds: DatasetConfig, **cfg):
    settings = dict(fps=4.0, size=32, workers=2, shard_target_mb=0.05) | cfg
    rep = RecordingReporter()
    return run_frames(root, ds, FramesConfig(**settings), run_id="frames-test", reporter=rep), rep


def tar_digests(root: DataRoot) -> dict[str, str]:
    return {
        p.relative_to(root.home).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (root.home / "shards" / "frames").rglob("*.tar")
    }


def clips(folder: Path, n: int, seconds: float = 2.0, classes: list[str] | None = None, seed0: int = 0) -> Path:
    for i in range(n):
        sub = folder / classes[i % len(classes)] if classes else folder
        make_video(sub / f"c{seed0 + i:02d}.mp4", seed=seed0 + i, frames=int(12 * seconds), fps=12)
    return folder


def test_shards_hold_every_view_of_every_frame(root, tmp_path):
    ds = ingest(root, clips(tmp_path / "src", 3, seconds=2.0))
    outcome, rep = frames(root, ds, views="downstream")
    assert outcome.summary["ok"] == 3 and outcome.summary["failed"] == 0
    rows = Catalog(root).query("SELECT * FROM frame_samples ORDER BY video_id").to_pylist()
    assert [r["video_id"] for r in rows] == ["c00", "c01", "c02"]
    for r in rows:
        assert r["status"] == "ok" and r["variant"] == "downstream" and r["fps"] == 4.0 and r["size"] == 32
        assert abs(r["n_frames"] - math.floor(2.0 * 4.0)) <= 1 and len(r["views"]) == 12
        sample = read_samples(root.absolute(r["shard"]))[r["key"]]
        meta = json.loads(sample["json"])
        assert meta["video_id"] == r["video_id"] and meta["n_frames"] == r["n_frames"]
        assert meta["times_s"] == [pytest.approx(k / 4.0) for k in range(r["n_frames"])]
        for view in r["views"]:
            arr = decode_view(sample[f"{view}.jpg"], "jpg")
            assert arr.shape == (r["n_frames"], 32, 32, 3) and arr.dtype == np.uint8
    shards = Catalog(root).rows("SELECT count(*), sum(n_samples) FROM shards WHERE stage = 'frames'")
    assert shards == [(outcome.summary["shards_built"], 3)]
    for tar in (root.home / "shards" / "frames").rglob("*.tar"):
        stats = json.loads(tar.with_name(tar.stem + "_stats.json").read_text())
        assert stats["count"] >= 1 and stats["code_version"] == "frames-1"


@pytest.mark.parametrize("views,flip,n", [("pretrain", False, 1), ("downstream", False, 12), ("downstream", True, 6)])
def test_view_count_follows_the_dataset(root, tmp_path, views, flip, n):
    ds = ingest(root, clips(tmp_path / "src", 1), flip_sensitive=flip)
    frames(root, ds, views=views)
    (names,) = Catalog(root).rows("SELECT views FROM frame_samples")[0]
    assert len(names) == n and all("flip" not in v for v in names) == (flip or views == "pretrain")


def test_auto_views_follow_labels(root, tmp_path):
    labeled = ingest(root, clips(tmp_path / "labeled", 2, classes=["A", "B"]), name="labeled")
    unlabeled = ingest(root, clips(tmp_path / "flat", 1, seed0=10), name="flat")
    frames(root, labeled)
    frames(root, unlabeled)
    got = dict(Catalog(root).rows("SELECT DISTINCT dataset, variant FROM frame_samples"))
    assert got == {"labeled": "downstream", "flat": "pretrain"}


def test_rerun_does_no_work_and_adding_videos_appends_shards(root, tmp_path):
    src = clips(tmp_path / "src", 4)
    ds = ingest(root, src)
    first, _ = frames(root, ds)
    before = tar_digests(root)
    again, rep = frames(root, ds)
    assert again.plan.pending == [] and again.summary["videos"] == 0 and "nothing to do" in rep.text()
    clips(src, 2, seed0=50)
    ds = ingest(root, src)
    third, rep = frames(root, ds)
    assert third.summary["videos"] == 2 and third.plan.new_videos == 2
    after = tar_digests(root)
    assert {k: after[k] for k in before} == before, "existing shards are never rewritten"
    assert len(after) > len(before)
    numbers = sorted(int(Path(k).stem) for k in after)
    assert numbers == list(range(len(after)))


def test_failed_and_short_videos_are_recorded_not_fatal(root, tmp_path):
    src = clips(tmp_path / "src", 2)
    make_video(src / "short.mp4", seed=77, frames=3, fps=12)  # 0.25 s: shorter than one 2 fps interval
    (src / "junk.mp4").write_text("not a video")
    ds = ingest(root, src)
    outcome, rep = frames(root, ds, fps=2.0)
    rows = {r["video_id"]: r for r in Catalog(root).query("SELECT * FROM frame_samples").to_pylist()}
    assert rows["short"]["status"] == "failed" and rows["short"]["error_code"] == "too_short"
    assert str(src / "short.mp4") in rows["short"]["error"], "the error names the source, not the raw copy"
    assert "junk" not in rows and outcome.plan.skipped_videos == 1
    assert rows["c00"]["status"] == rows["c01"]["status"] == "ok"


def test_decoder_without_progress_is_killed_and_the_shard_goes_on(root, tmp_path):
    src = tmp_path / "src"
    make_video(src / "a_long.mp4", seed=1, frames=2400, fps=24, size=(240, 320))
    make_video(src / "b_short.mp4", seed=2, frames=12, fps=12)
    ds = ingest(root, src)
    # 0.05 s without a heartbeat is far less than decoding 100 s of video takes, so the first
    # video times out the way a hung decoder would; the next one still gets a fresh process.
    outcome, rep = frames(root, ds, decode_timeout_s=0.05, shard_target_mb=1000, fps=1.0)
    rows = {r["video_id"]: r for r in Catalog(root).query("SELECT * FROM frame_samples").to_pylist()}
    assert rows["a_long"]["status"] == "failed" and rows["a_long"]["error_code"] == "decode_timeout"
    assert "killed" in rows["a_long"]["error"]


def test_crash_then_rerun_gives_byte_identical_shards(tmp_path):
    src = clips(tmp_path / "src", 6, seconds=3.0)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from stages.config import DatasetConfig, FramesConfig, IngestConfig
        from stages.frames.stage import run_frames
        from stages.ingest.stage import run_ingest
        from warehouse.catalog import Catalog
        from warehouse.layout import DataRoot
        root = DataRoot(sys.argv[1]).ensure()
        Catalog(root).refresh()
        ds = DatasetConfig(name="ds", source={str(src)!r})
        run_ingest(root, ds, IngestConfig(), run_id="i")
        run_frames(root, ds, FramesConfig(fps=4.0, size=32, workers=1, shard_target_mb=0.01), run_id="f")
        """
    )
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run([sys.executable, "-c", script, str(clean)], check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, "-c", script, str(crashed)], start_new_session=True)
    stats_dir = crashed / "shards" / "frames" / "ds"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if stats_dir.exists() and any(stats_dir.rglob("*_stats.json")):
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_total = len(list((clean / "shards" / "frames" / "ds").rglob("*.tar")))
    assert len(list(stats_dir.rglob("*_stats.json"))) < n_total, "the kill must land before the last shard"
    subprocess.run([sys.executable, "-c", script, str(crashed)], check=True, timeout=300)
    assert tar_digests(DataRoot(crashed)) == tar_digests(DataRoot(clean))
    assert not list(crashed.rglob("*.partial"))


def test_plan_persists_membership(root, tmp_path):
    ds = ingest(root, clips(tmp_path / "src", 3))
    plan = plan_frames(root, ds, FramesConfig(fps=4.0, size=32, shard_target_mb=0.01))
    members = [[m.video_id for m in s.members] for s in plan.pending]
    # Planning again (nothing built yet) finds the same shards, not new ones.
    again = plan_frames(root, ds, FramesConfig(fps=4.0, size=32, shard_target_mb=5, workers=1))
    assert [[m.video_id for m in s.members] for s in again.pending] == members and again.new_videos == 0
