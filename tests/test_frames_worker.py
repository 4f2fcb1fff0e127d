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


def test_a_variable_frame_rate_avi_is_sampled_on_its_timestamps(tmp_path):
    """Issue 16: an AVI whose index counts drop entries as frames (86 declared at 15 fps, 18 real
    frames every 1/3 s over 6 s) is whole: ingest's probe accepts it and 2 FPS gives one sample
    per half second of its 5.73 s, each the frame on display at k / 2."""
    import subprocess

    import imageio_ffmpeg

    from stages.ingest.probe import probe_video

    avi = tmp_path / "vfr.avi"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=160x120:rate=15:duration=6", "-vf", "select='not(mod(n\\,5))'", "-fps_mode", "vfr",
                    "-c:v", "mpeg4", str(avi)], check=True)
    probed = probe_video(avi)
    assert probed.n_frames == 18 and abs(probed.duration_s - 86 / 15) < 1e-6
    settings = WorkerSettings(fps=2.0, size=32, views="pretrain", flip_sensitive=False, encoding="jpg", jpeg_quality=95,
                              backend="pyav")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    worker = DecodeWorker(settings, scratch, timeout_s=60)
    try:
        out = worker.run(job(avi, "vfr") | {"duration_s": probed.duration_s})
    finally:
        worker.close()
    assert out["status"] == "ok" and out["n_frames"] == 12
    import json

    meta = json.loads((scratch / "vfr.json").read_text())
    assert meta["times_s"] == [k / 2 for k in range(12)]
    # The frame on display at k / 2: the last real frame (every 1/3 s) at or before it.
    assert meta["pts_s"] == [round((k / 2) // (1 / 3) / 3, 6) for k in range(12)]
