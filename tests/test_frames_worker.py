"""The supervised decoder process: a crash or a hang costs one video, not the shard."""

from __future__ import annotations

import os
import signal
import threading
import time

from media_fixtures import make_video
from stages.frames.worker import DecodeWorker, WorkerSettings

SETTINGS = WorkerSettings(fps=1.0, size=32, views="pretrain", flip_sensitive=False, encoding="jpg", jpeg_quality=95, backend="pyav")


def job(path, key):
    return {"path": str(path), "key": key, "video_id": key, "dataset": "d", "sha256": "x", "source": str(path)}


def test_a_crashed_decoder_fails_one_video_and_the_next_gets_a_fresh_process(tmp_path):
    long = make_video(tmp_path / "long.mp4", seed=1, frames=2400, fps=24, size=(240, 320))
    short = make_video(tmp_path / "short.mp4", seed=2, frames=24, fps=12)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    worker = DecodeWorker(SETTINGS, scratch, timeout_s=60)
    pids = []

    def crash_it():
        # As a segfaulting decoder would: the child dies mid-video.
        while worker._proc is None:
            time.sleep(0.01)
        time.sleep(0.3)
        pids.append(worker._proc.pid)
        os.kill(worker._proc.pid, signal.SIGSEGV)

    killer = threading.Thread(target=crash_it)
    killer.start()
    try:
        crashed = worker.run(job(long, "long"))
        killer.join()
        assert crashed["status"] == "failed" and crashed["error_code"] == "decoder_crashed"
        assert "exit code -11" in crashed["error"] and str(long) in crashed["error"]
        fine = worker.run(job(short, "short"))
        assert fine["status"] == "ok" and fine["n_frames"] == 2
        assert worker._proc.pid != pids[0]
    finally:
        worker.close()
