"""Encoding videos with a real FFmpeg through ffmpeg-python.

The machines this runs on often have no system ffmpeg; the `imageio-ffmpeg` wheel ships a
static binary with every encoder the pipeline and its tests need (x264, x265, VP8/9, AV1,
MPEG-4, MJPEG, Theora). It has no ffprobe: probing goes through PyAV (stages/ingest/probe.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import ffmpeg
import numpy as np


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary: $VIMPAC_FFMPEG, then imageio-ffmpeg's, then PATH."""
    explicit = os.environ.get("VIMPAC_FFMPEG")
    if explicit:
        return explicit
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - fall through to PATH, then fail with a clear message
        found = shutil.which("ffmpeg")
        if found:
            return found
    raise RuntimeError("no ffmpeg binary: install imageio-ffmpeg or set VIMPAC_FFMPEG")


@dataclass(frozen=True)
class Codec:
    """An encoder and the options that make it deterministic and quick on small frames."""

    encoder: str
    pix_fmt: str = "yuv420p"
    options: tuple[tuple[str, str], ...] = ()


# Encoders by short name. Options keep output bit-exact across runs (single thread where the
# encoder is otherwise nondeterministic) and fast at the tiny sizes of tests and the demo.
CODECS: dict[str, Codec] = {
    "h264": Codec("libx264", options=(("preset", "veryfast"), ("crf", "23"), ("g", "48"))),
    "h265": Codec("libx265", options=(("preset", "ultrafast"), ("x265-params", "log-level=error:pools=1:frame-threads=1"))),
    "vp8": Codec("libvpx", options=(("b:v", "400k"), ("deadline", "realtime"), ("cpu-used", "8"))),
    "vp9": Codec("libvpx-vp9", options=(("b:v", "400k"), ("deadline", "realtime"), ("cpu-used", "8"), ("row-mt", "0"))),
    "av1": Codec("libaom-av1", options=(("cpu-used", "8"), ("usage", "realtime"), ("crf", "40"), ("b:v", "0"))),
    "mpeg4": Codec("mpeg4", options=(("q:v", "5"),)),
    "mjpeg": Codec("mjpeg", pix_fmt="yuvj420p", options=(("q:v", "5"),)),
    "theora": Codec("libtheora", options=(("q:v", "6"),)),
}


def encode_video(
    frames: Iterable[np.ndarray],
    path: str | Path,
    *,
    fps: float,
    codec: str = "h264",
    extra_output: dict[str, str] | None = None,
) -> Path:
    """Encode RGB uint8 frames (H, W, 3) into `path`; the container follows the extension.

    Frames are streamed to ffmpeg's stdin, so memory does not grow with video length. The
    file appears atomically: it is written under a temporary name and renamed when ffmpeg
    exits cleanly.
    """
    path = Path(path)
    spec = CODECS[codec]
    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError(f"encode_video({path}): no frames")
    h, w = first.shape[:2]
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    out_kwargs: dict[str, str] = {
        "vcodec": spec.encoder,
        "pix_fmt": spec.pix_fmt,
        "r": f"{fps}",
        "threads": "1",
        # Bit-exact output: no encoder version strings or timestamps in the file, so the same
        # seed gives the same bytes (and the same sha256) on every machine with this binary.
        "fflags": "+bitexact",
        "flags:v": "+bitexact",
        "map_metadata": "-1",
    }
    out_kwargs.update(dict(spec.options))
    out_kwargs.update(extra_output or {})
    process = (
        ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
        .output(str(tmp), **out_kwargs)
        .overwrite_output()
        .global_args("-hide_banner", "-loglevel", "error", "-nostdin")
        .run_async(cmd=ffmpeg_exe(), pipe_stdin=True, pipe_stderr=True)
    )
    try:
        process.stdin.write(np.ascontiguousarray(first, dtype=np.uint8).tobytes())
        for frame in it:
            if frame.shape[:2] != (h, w):
                raise ValueError(f"encode_video({path}): frame size {frame.shape[:2]} != {(h, w)}")
            process.stdin.write(np.ascontiguousarray(frame, dtype=np.uint8).tobytes())
        process.stdin.close()
        stderr = process.stderr.read()
        process.stderr.close()
        code = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        tmp.unlink(missing_ok=True)
        raise
    if code != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg failed encoding {path} with {spec.encoder}: {stderr.decode(errors='replace')[-2000:]}")
    os.replace(tmp, path)
    return path


def run_ffmpeg(args: list[str]) -> None:
    """Run the bundled ffmpeg with raw arguments (muxing audio, remuxing, test fixtures)."""
    import subprocess

    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        capture_output=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
