"""Decoding in a supervised child process.

Decoders are C code that can hang or crash on hostile files. Each frame shard is built by one
child process (from a fork server, never forked from the threaded parent) that decodes its videos one
after another with one decoder thread, and reports a heartbeat while it works. The parent
kills a child that shows no progress for `decode_timeout_s`, or notices one that died, marks
that video failed, and starts a fresh child for the rest: one bad video never stops a shard.

Protocol over a multiprocessing Pipe (parent -> child: a job dict, or None to stop;
child -> parent: ("alive", samples) heartbeats, then ("done", result dict)). Encoded view
bytes travel through files in a scratch folder, not through the pipe.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.threads import worker_process

HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class WorkerSettings:
    fps: float
    size: int
    views: str  # "pretrain" | "downstream"
    flip_sensitive: bool
    encoding: str
    jpeg_quality: int
    backend: str


def decode_video(job: dict[str, Any], settings: WorkerSettings, scratch: Path, heartbeat=lambda n: None) -> dict[str, Any]:
    """Sample, cut views, encode: the whole per-video pipeline (runs in the child)."""
    from stages.frames.decode import DecodeError, FrameSampler
    from stages.frames.encoding import encode_view, extension
    from stages.frames.views import make_views, scaled_size, view_names, view_specs

    names = view_names(settings.views, settings.flip_sensitive)
    largest = max(scaled_size(settings.size, s.scale) for s in view_specs(settings.views, settings.flip_sensitive))
    t0 = time.perf_counter()
    sampler = FrameSampler(
        job["path"], settings.fps, backend=settings.backend, rotation=job.get("rotation"),
        duration_hint_s=job.get("duration_s"), codec_hint=job.get("codec"), max_short_side=largest,
    )
    per_view: dict[str, list[np.ndarray]] = {n: [] for n in names}
    times: list[float] = []
    pts: list[float] = []
    try:
        for frame in sampler:
            for name, view in make_views(frame.image[None], settings.size, settings.views, settings.flip_sensitive).items():
                per_view[name].append(view[0])
            times.append(round(frame.time_s, 6))
            pts.append(round(frame.pts_s, 6))
            heartbeat(len(times))
    except DecodeError as e:
        # The decoder names the raw-store copy; the user knows the video by its source.
        message = str(e).replace(str(job["path"]), job["source"])
        return {"status": "failed", "error_code": e.code, "error": message, "n_frames": 0, "decode_s": time.perf_counter() - t0}
    report = sampler.report
    if not times:
        return {"status": "failed", "error_code": "undecodable", "n_frames": 0, "decode_s": time.perf_counter() - t0,
                "error": f"{job['source']}: no frame could be sampled ({report.error or 'decoder produced none'})"}
    files: dict[str, str] = {}
    ext = extension(settings.encoding)
    total = 0
    for name in names:
        data = encode_view(np.stack(per_view[name]), settings.encoding, quality=settings.jpeg_quality)
        path = scratch / f"{job['key']}.{name}.{ext}"
        path.write_bytes(data)
        files[f"{name}.{ext}"] = str(path)
        total += len(data)
    meta = {
        "video_id": job["video_id"],
        "dataset": job["dataset"],
        "label": job.get("label"),
        "sha256": job["sha256"],
        "fps": settings.fps,
        "size": settings.size,
        "views": names,
        "encoding": settings.encoding,
        "n_frames": len(times),
        "times_s": times,
        "pts_s": pts,
        "backend": report.backend,
    }
    meta_bytes = json.dumps(meta, sort_keys=True).encode()
    meta_path = scratch / f"{job['key']}.json"
    meta_path.write_bytes(meta_bytes)
    files["json"] = str(meta_path)
    status = "partial" if report.partial else "ok"
    error = None
    if report.partial:
        cause = (report.error or "").replace(str(job["path"]), job["source"])
        error = f"{job['source']}: decoded {len(times)} of {report.expected_samples} expected frames: {cause}"
    return {
        "status": status,
        "error_code": "partial" if report.partial else None,
        "error": error,
        "n_frames": len(times),
        "expected_frames": report.expected_samples,
        "backend": report.backend,
        "fallback_reason": report.fallback_reason,
        "decode_s": time.perf_counter() - t0,
        "bytes": total + len(meta_bytes),
        "files": files,
    }


def _child(conn, settings: WorkerSettings, scratch: str) -> None:
    # One decoder thread per process (DESIGN.md: decord's VP9 bug; scaling by processes).
    worker_process(1, "frame decoder")
    scratch_dir = Path(scratch)
    last = [0.0]

    def heartbeat(n: int) -> None:
        now = time.monotonic()
        if now - last[0] >= HEARTBEAT_S:
            conn.send(("alive", n))
            last[0] = now

    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            result = decode_video(job, settings, scratch_dir, heartbeat)
        except Exception as e:  # noqa: BLE001 - reported as this video's failure
            result = {"status": "failed", "error_code": "internal",
                      "error": f"{job['source']}: unexpected {type(e).__name__}: {e}",
                      "traceback": traceback.format_exc(), "n_frames": 0}
        conn.send(("done", result))


def _context():
    """Children come from a fork server that imported the decoding stack once: starting one
    costs milliseconds instead of the ~0.6 s a fresh interpreter spends on imports, and the
    server is single-threaded, so forking it is safe where forking the threaded parent is not."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["stages.frames.worker", "stages.frames.decode", "stages.frames.views", "stages.frames.encoding"])
    return ctx


def start_fork_server() -> None:
    """Start the decoders' fork server now; otherwise the first shard of a process pays for it."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


class DecodeWorker:
    """The parent's handle on one child process; restarts it after a hang or a crash."""

    def __init__(self, settings: WorkerSettings, scratch: Path, timeout_s: float):
        self.settings = settings
        self.scratch = scratch
        self.timeout_s = timeout_s
        self._ctx = _context()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child, args=(child, self.settings, str(self.scratch)), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(timeout=10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        if self._proc is None or not self._proc.is_alive():
            self._kill()
            self._start()
        self._conn.send(job)
        while True:
            if not self._conn.poll(self.timeout_s):
                self._kill()
                return {"status": "failed", "error_code": "decode_timeout", "n_frames": 0,
                        "error": f"{job['source']}: decoder made no progress for {self.timeout_s:g} s and was killed"}
            try:
                kind, payload = self._conn.recv()
            except (EOFError, OSError):
                self._proc.join(timeout=10)
                code = self._proc.exitcode
                self._kill()
                return {"status": "failed", "error_code": "decoder_crashed", "n_frames": 0,
                        "error": f"{job['source']}: decoder process died (exit code {code})"}
            if kind == "done":
                return payload

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=10)
            except (BrokenPipeError, OSError):
                pass
        self._kill()
