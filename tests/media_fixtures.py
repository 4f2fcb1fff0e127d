"""Small real videos and the bad inputs the ingest stage must survive, made with ffmpeg."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.media import encode_video, run_ffmpeg


def make_video(path: Path, *, seed: int = 0, frames: int = 12, fps: float = 12.0, size: tuple[int, int] = (48, 64),
               codec: str = "h264", faststart: bool = False) -> Path:
    """A short clip whose content (and so sha256) depends on `seed`."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    clip = (np.roll(base, 3 * i, axis=1) for i in range(frames))
    extra = {"movflags": "+faststart"} if faststart else None
    return encode_video(clip, path, fps=fps, codec=codec, extra_output=extra)


def make_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each local bad-input case of the issue -> (file, the error_code ingest must record)."""
    folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, tuple[Path, str]] = {}

    zero = folder / "zero.mp4"
    zero.write_bytes(b"")
    cases["zero-byte"] = (zero, "empty_file")

    text = folder / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    cases["text named .mp4"] = (text, "not_media")

    whole = make_video(folder / ".whole-faststart.mp4", seed=99, frames=48, faststart=True)
    data = whole.read_bytes()
    truncated = folder / "truncated.mp4"
    truncated.write_bytes(data[: int(len(data) * 0.6)])
    whole.unlink()
    cases["truncated mp4"] = (truncated, "truncated")

    audio = folder / "audio.mp4"
    run_ffmpeg(["-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(audio)])
    cases["audio-only"] = (audio, "no_video_stream")

    # A valid container whose video payload is noise: it opens, no frame decodes.
    good = make_video(folder / ".garbage-src.mp4", seed=98, frames=24)
    raw = bytearray(good.read_bytes())
    mdat = raw.find(b"mdat")
    rng = np.random.default_rng(0)
    size = int.from_bytes(raw[mdat - 4 : mdat], "big")
    raw[mdat + 4 : mdat - 4 + size] = rng.integers(0, 255, size - 8, dtype=np.uint8).tobytes()
    garbage = folder / "garbage.mp4"
    garbage.write_bytes(bytes(raw))
    good.unlink()
    cases["no decodable frames"] = (garbage, "undecodable")
    return cases
