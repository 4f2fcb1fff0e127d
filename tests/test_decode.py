"""FrameSampler: which frames it picks, on every codec/container, and how it fails.

Most clips show their frame index as a flat grey level (8 * i + 4), which every codec here keeps
within a quarter of a step at 64x48, so a sample's pixels tell which source frame it is.
Fixtures are made with the bundled ffmpeg and take a few hundredths of a second each.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from media_fixtures import make_bad_inputs
from stages.frames import decode as decode_module
from stages.frames.decode import DecodeError, DecodeReport, FrameSampler, SampledFrame
from stages.media import encode_video, run_ffmpeg
from test_probe import top_level_boxes

W, H = 64, 48
SRC_FPS = 12
N = 30  # 2.5 s
EPS = 1e-6
DECORD_CANNOT = {"av1", "theora"}


def indexed(n: int = N):
    """Frame i is flat grey at level 8 * i + 4."""
    for i in range(n):
        yield np.full((H, W, 3), 8 * i + 4, np.uint8)


def shown(image: np.ndarray) -> int:
    """The source frame index an `indexed` frame shows."""
    return round((float(image[8:-8, 8:-8].mean()) - 4) / 8)


def frame_at(t: float, times: list[float]) -> int:
    """The latest source frame whose time is <= t: the frame on display at t."""
    return max(i for i, ti in enumerate(times) if ti <= t + EPS)


def sample(path: Path, fps: float, **kwargs) -> tuple[list[SampledFrame], DecodeReport]:
    sampler = FrameSampler(path, fps, **kwargs)
    frames = list(sampler)
    return frames, sampler.report


def check_grid(frames: list[SampledFrame], report: DecodeReport, fps: float, true_duration: float,
               hint: float | None = None) -> None:
    """Evenly spaced samples on k / fps, as many as the decoded duration holds, each a real frame."""
    n = len(frames)
    assert [f.index for f in frames] == list(range(n))
    assert [f.time_s for f in frames] == [k / fps for k in range(n)]
    assert n == sum(1 for k in range(10_000) if k / fps < report.duration_s - EPS)
    assert abs(n - math.floor(true_duration * fps)) <= 1
    assert report.samples == n
    assert report.expected_samples == math.floor((report.duration_s if hint is None else hint) * fps + EPS)
    assert report.duration_s == pytest.approx(true_duration, abs=2e-3)
    for f in frames:
        assert f.pts_s <= f.time_s + EPS
        assert f.image.dtype == np.uint8 and f.image.ndim == 3 and f.image.shape[2] == 3
        assert f.image.flags.c_contiguous
    assert frames[0].pts_s == 0.0
    assert all(a.pts_s <= b.pts_s for a, b in zip(frames, frames[1:]))


# ---------------------------------------------------------------- every codec and container


COMBOS = [
    ("h264", "mp4"), ("h264", "mkv"), ("h264", "mov"), ("h264", "avi"),
    ("h265", "mp4"), ("h265", "mkv"),
    ("vp8", "webm"), ("vp9", "webm"), ("vp9", "mp4"),
    ("av1", "mkv"), ("av1", "mp4"),
    ("mpeg4", "avi"), ("mpeg4", "mp4"),
    ("mjpeg", "avi"), ("mjpeg", "mov"),
    ("theora", "ogv"),
]


@pytest.mark.parametrize(("codec", "ext"), COMBOS, ids=[f"{c}-{e}" for c, e in COMBOS])
def test_codec_container_combos(tmp_path, codec, ext):
    path = encode_video(indexed(), tmp_path / f"v.{ext}", fps=SRC_FPS, codec=codec)
    times = [i / SRC_FPS for i in range(N)]
    fps = 5.0  # off the source's grid: 0.2 s steps fall between frames 4 times in 5
    picked = {}
    for backend in ("auto", "pyav", "decord"):
        if backend == "decord" and codec in DECORD_CANNOT:
            with pytest.raises(DecodeError) as info:
                sample(path, fps, backend=backend)
            assert info.value.code == "unsupported_codec", str(info.value)
            continue
        if backend == "decord" and (codec, ext) == ("h264", "avi"):
            # No timestamps in this file for decord, which then fetches wrong frames now and then.
            with pytest.raises(DecodeError) as info:
                sample(path, fps, backend=backend)
            assert info.value.code == "open_failed" and "no frame timestamps" in str(info.value)
            continue
        frames, report = sample(path, fps, backend=backend)
        check_grid(frames, report, fps, N / SRC_FPS)
        assert all(f.image.shape == (H, W, 3) for f in frames)
        assert [shown(f.image) for f in frames] == [frame_at(f.time_s, times) for f in frames]
        for f in frames:
            assert f.pts_s == pytest.approx(times[shown(f.image)], abs=1e-3)
        expected_backend = {"auto": "decord" if codec == "mjpeg" else "pyav"}.get(backend, backend)
        assert report.backend == expected_backend
        assert not report.partial and report.error is None and report.fallback_reason is None
        if report.backend == "pyav":
            assert report.frames_decoded == N
        picked[backend] = [shown(f.image) for f in frames]
    assert len(set(map(tuple, picked.values()))) == 1  # every backend picks the same frames


# ---------------------------------------------------------------- timestamps


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_variable_frame_rate(tmp_path, ext, backend):
    # 15 frames 1/15 s apart, then 15 frames 1/30 s apart: 1.5 s. A frame counter would put
    # sample k at frame 30 * k / fps * (30 / 20); the timestamps put it where it is shown.
    src = encode_video(indexed(30), tmp_path / "src.mp4", fps=30, codec="h264")
    vfr = tmp_path / f"vfr.{ext}"
    run_ffmpeg(["-i", str(src), "-vf", "setpts='if(lt(N,15),2*N,N+15)/(30*TB)'", "-fps_mode", "vfr",
                "-c:v", "libx264", "-preset", "veryfast", str(vfr)])
    times = [2 * i / 30 if i < 15 else (i + 15) / 30 for i in range(30)]
    fps = 4.0
    frames, report = sample(vfr, fps, backend=backend)
    check_grid(frames, report, fps, 1.5)
    assert [shown(f.image) for f in frames] == [frame_at(f.time_s, times) for f in frames]
    assert [f.pts_s for f in frames] == pytest.approx([times[frame_at(f.time_s, times)] for f in frames], abs=1e-3)


@pytest.mark.parametrize(("codec", "ext"), [("h264", "mp4"), ("h264", "mkv"), ("vp9", "webm")])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_nonzero_start_time(tmp_path, codec, ext, backend):
    src = encode_video(indexed(), tmp_path / f"src.{ext}", fps=SRC_FPS, codec=codec)
    shifted = tmp_path / f"shifted.{ext}"
    run_ffmpeg(["-i", str(src), "-c", "copy", "-output_ts_offset", "2", str(shifted)])
    with av.open(str(shifted)) as c:
        first = next(iter(c.decode(video=0)))
        assert first.time == pytest.approx(2.0, abs=0.01)
    base, base_report = sample(src, 5.0, backend=backend)
    frames, report = sample(shifted, 5.0, backend=backend)
    check_grid(frames, report, 5.0, N / SRC_FPS)
    assert [shown(f.image) for f in frames] == [shown(f.image) for f in base]
    assert [f.pts_s for f in frames] == pytest.approx([f.pts_s for f in base], abs=1e-3)
    assert report.duration_s == pytest.approx(base_report.duration_s, abs=1e-3)


def test_low_fps_source_repeats_a_frame(tmp_path):
    # A 1 fps slideshow sampled at 4 fps: each frame serves four samples, as one shared image.
    path = encode_video(indexed(3), tmp_path / "slides.mp4", fps=1, codec="h264")
    for backend in ("pyav", "decord"):
        frames, report = sample(path, 4.0, backend=backend)
        check_grid(frames, report, 4.0, 3.0)
        assert [shown(f.image) for f in frames] == [k // 4 for k in range(12)]
        assert frames[1].image is frames[0].image and frames[4].image is not frames[3].image


def test_only_sampled_frames_are_converted(tmp_path, monkeypatch):
    # 90 frames decoded, 6 sampled: the RGB conversion, as costly as decoding, runs 6 times.
    path = encode_video((np.full((H, W, 3), i, np.uint8) for i in range(90)), tmp_path / "v.mp4", fps=30, codec="h264")
    calls = []
    real = decode_module.VideoReformatter

    class Counting:
        def __init__(self):
            self._inner = real()

        def reformat(self, frame, **kwargs):
            calls.append(frame.pts)
            return self._inner.reformat(frame, **kwargs)

    monkeypatch.setattr(decode_module, "VideoReformatter", Counting)
    frames, report = sample(path, 2.0, backend="pyav")
    assert report.frames_decoded == 90
    assert len(frames) == 6 and len(calls) == 6


# ---------------------------------------------------------------- rotation


def marked(n: int = SRC_FPS):
    """A white square in the stored picture's top-left corner."""
    for _ in range(n):
        f = np.zeros((H, W, 3), np.uint8)
        f[:8, :8] = 255
        yield f


def corner(image: np.ndarray) -> str:
    h, w = image.shape[:2]
    spots = {"top-left": image[:8, :8], "top-right": image[:8, w - 8 :], "bottom-left": image[h - 8 :, :8],
             "bottom-right": image[h - 8 :, w - 8 :]}
    (bright,) = [name for name, spot in spots.items() if spot.mean() > 200]
    return bright


@pytest.fixture(scope="module")
def marked_mp4(tmp_path_factory) -> Path:
    return encode_video(marked(), tmp_path_factory.mktemp("rot") / "marked.mp4", fps=SRC_FPS, codec="h264")


@pytest.mark.parametrize(("display_rotation", "clockwise", "where"),
                         [("-90", 90, "top-right"), ("180", 180, "bottom-right"), ("90", 270, "bottom-left")])
@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_rotation_from_display_matrix(tmp_path, marked_mp4, display_rotation, clockwise, where, backend):
    # ffmpeg's -display_rotation is counter-clockwise; a phone's portrait clip is 90 clockwise.
    rotated = tmp_path / "rotated.mp4"
    run_ffmpeg(["-display_rotation", display_rotation, "-i", str(marked_mp4), "-c", "copy", str(rotated)])
    shape = (W, H, 3) if clockwise % 180 else (H, W, 3)
    if backend == "decord" and clockwise % 180:
        # decord turns the picture into a buffer of the stored size and fails on every frame.
        with pytest.raises(DecodeError) as info:
            sample(rotated, 2.0, backend=backend)
        assert info.value.code == "open_failed" and "rotated by" in str(info.value)
        return
    for rotation in (None, clockwise):  # detected, or as the catalog records it
        frames, _ = sample(rotated, 2.0, backend=backend, rotation=rotation)
        assert len(frames) == 2
        assert all(f.image.shape == shape and f.image.flags.c_contiguous for f in frames)
        assert corner(frames[0].image) == where
    # The caller's word wins: rotation=0 leaves the stored orientation.
    frames, _ = sample(rotated, 2.0, backend=backend, rotation=0)
    assert frames[0].image.shape == (H, W, 3) and corner(frames[0].image) == "top-left"


def test_rotation_matches_what_ffmpeg_displays(tmp_path, marked_mp4):
    rotated = tmp_path / "rotated.mp4"
    run_ffmpeg(["-display_rotation", "-90", "-i", str(marked_mp4), "-c", "copy", str(rotated)])
    shown_gray = tmp_path / "shown.gray"
    run_ffmpeg(["-i", str(rotated), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", str(shown_gray)])
    picture = np.fromfile(shown_gray, np.uint8).reshape(W, H)  # ffmpeg autorotates: portrait
    frames, _ = sample(rotated, 2.0)
    assert np.abs(frames[0].image.mean(axis=2) - picture).mean() < 4


def test_auto_keeps_quarter_turned_videos_away_from_decord(tmp_path):
    src = encode_video(marked(), tmp_path / "marked.avi", fps=SRC_FPS, codec="mjpeg")  # "auto" tries decord first
    rotated = tmp_path / "rotated.mov"
    run_ffmpeg(["-display_rotation", "-90", "-i", str(src), "-c", "copy", str(rotated)])
    frames, report = sample(rotated, 2.0)
    assert report.backend == "pyav" and "rotated by 90" in report.fallback_reason
    assert corner(frames[0].image) == "top-right"
    frames, report = sample(rotated, 2.0, rotation=90)  # known up front: decord is not even tried
    assert report.backend == "pyav" and report.fallback_reason is None
    assert corner(frames[0].image) == "top-right"


def test_explicit_rotation_on_an_unrotated_file(marked_mp4):
    frames, _ = sample(marked_mp4, 2.0, rotation=90)
    assert frames[0].image.shape == (W, H, 3) and corner(frames[0].image) == "top-right"


# ---------------------------------------------------------------- too short, bad files


@pytest.mark.parametrize("backend", ["auto", "pyav", "decord"])
def test_too_short(tmp_path, backend):
    path = encode_video(indexed(3), tmp_path / "short.mp4", fps=10, codec="h264")  # 0.3 s
    for hint in (None, 0.3, 5.0):
        sampler = FrameSampler(path, 2.0, backend=backend, duration_hint_s=hint)
        it = iter(sampler)
        with pytest.raises(DecodeError) as info:
            next(it)  # raises before yielding anything
        assert info.value.code == "too_short"
        assert str(path) in str(info.value)


def test_exactly_one_interval_is_long_enough(tmp_path):
    path = encode_video(indexed(6), tmp_path / "half.mp4", fps=SRC_FPS, codec="h264")  # 0.5 s
    frames, report = sample(path, 2.0, duration_hint_s=0.5)
    assert len(frames) == 1 and report.expected_samples == 1 and not report.partial


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return make_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    ("case", "codes"),
    [
        ("zero-byte", {"auto": "open_failed", "pyav": "open_failed", "decord": "open_failed"}),
        ("text named .mp4", {"auto": "open_failed", "pyav": "open_failed", "decord": "open_failed"}),
        ("audio-only", {"auto": "no_video_stream", "pyav": "no_video_stream", "decord": "no_video_stream"}),
        # decord cannot even build its index of the garbage; PyAV opens it and nothing decodes.
        ("no decodable frames", {"auto": "undecodable", "pyav": "undecodable", "decord": "open_failed"}),
    ],
)
def test_bad_inputs(bad_inputs, case, codes):
    path, _ = bad_inputs[case]
    for backend, code in codes.items():
        sampler = FrameSampler(path, 2.0, backend=backend)
        with pytest.raises(DecodeError) as info:
            next(iter(sampler))
        err = info.value
        assert err.code == code, f"{backend}: {err}"
        assert str(path) in str(err)


def test_missing_file():
    for backend in ("auto", "pyav", "decord"):
        with pytest.raises(DecodeError) as info:
            list(FrameSampler("/nonexistent/clip.mp4", 2.0, backend=backend))
        assert info.value.code == "open_failed"


def test_decode_error_pickles():
    err = pickle.loads(pickle.dumps(DecodeError("undecodable", "x.mp4: no frame decodes")))
    assert (err.code, str(err), err.message) == ("undecodable", "x.mp4: no frame decodes", "x.mp4: no frame decodes")


def test_arguments_are_checked(tmp_path):
    for kwargs in ({"fps": 0}, {"fps": -1.0}, {"fps": float("nan")}, {"fps": 2, "backend": "opencv"}, {"fps": 2, "rotation": 45}):
        with pytest.raises(ValueError):
            FrameSampler(tmp_path / "x.mp4", **kwargs)


# ---------------------------------------------------------------- partial decodes


def noise(n: int, seed: int = 0):
    """Noise frames: a large payload next to the header, so cuts and damage land inside it."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


def damage(src: Path, dst: Path, start: float, end: float, seed: int = 1) -> Path:
    """Overwrite bytes [start, end) (fractions of the file) with garbage."""
    data = bytearray(src.read_bytes())
    a, b = int(len(data) * start), int(len(data) * end)
    data[a:b] = np.random.default_rng(seed).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_truncated_faststart_mp4_is_partial(bad_inputs, backend):
    path, _ = bad_inputs["truncated mp4"]  # 48 frames at 12 fps with the index up front, cut at 60%
    frames, report = sample(path, 2.0, backend=backend, duration_hint_s=4.0)
    assert report.partial
    assert report.expected_samples == 8
    assert 1 <= len(frames) < 8 and report.samples == len(frames)
    assert "of the 4.000 s expected" in report.error
    assert [f.time_s for f in frames] == [k / 2 for k in range(len(frames))]
    # Without the probe's duration the decoder still saw the last packet cut short.
    frames, report = sample(path, 2.0, backend=backend)
    assert report.partial and report.decode_errors >= 1


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_damaged_mkv_stops_early_and_is_partial(tmp_path, backend):
    src = encode_video(noise(45), tmp_path / "v.mkv", fps=15, codec="h264")
    bad = damage(src, tmp_path / "bad.mkv", 0.45, 0.55)
    frames, report = sample(bad, 2.0, backend=backend, duration_hint_s=3.0)
    assert report.partial and report.expected_samples == 6
    assert 1 <= len(frames) < 6
    assert report.duration_s < 0.9 * 3.0
    check_grid(frames, report, 2.0, report.duration_s, hint=3.0)


def test_damaged_mp4_keeps_decoding_past_the_damage(tmp_path):
    src = encode_video(noise(45), tmp_path / "v.mp4", fps=15, codec="h264")
    (offset, size, _), = [b for b in top_level_boxes(src.read_bytes()) if b[2] == b"mdat"]
    total = src.stat().st_size
    bad = damage(src, tmp_path / "bad.mp4", (offset + 0.45 * size) / total, (offset + 0.55 * size) / total)
    frames, report = sample(bad, 2.0, backend="pyav", duration_hint_s=3.0)
    # The sample table is intact: the decoder rejects the damaged packets and goes on, like
    # ffmpeg; the lost frames make the decode partial, the samples still cover the whole video.
    assert report.partial and report.decode_errors >= 1 and "failed to decode" in report.error
    assert len(frames) == report.expected_samples == 6
    check_grid(frames, report, 2.0, 3.0, hint=3.0)
    # decord stops at the damage. Its decoder thread runs ahead of the frames asked for and
    # reports the error on whichever fetch comes next, so now and then one of the first two
    # fetches fails (measured: 6 runs in 30) and too little is left to sample.
    try:
        frames, report = sample(bad, 2.0, backend="decord", duration_hint_s=3.0)
    except DecodeError as err:
        assert err.code in ("undecodable", "too_short") and "decord failed" in str(err)
    else:
        assert report.partial and "decord failed" in report.error
        assert 1 <= len(frames) < 6


def test_demux_error_mid_stream_is_partial(tmp_path, monkeypatch):
    path = encode_video(indexed(), tmp_path / "v.mp4", fps=SRC_FPS, codec="h264")
    real_open = av.open

    class FailsMidway:
        """A real container whose demuxer raises an FFmpeg error after 15 packets."""

        def __init__(self, *args, **kwargs):
            self._c = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._c, name)

        def demux(self, *args, **kwargs):
            for i, packet in enumerate(self._c.demux(*args, **kwargs)):
                if i == 15:
                    raise av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")
                yield packet

    monkeypatch.setattr(decode_module.av, "open", FailsMidway)
    frames, report = sample(path, 2.0, backend="pyav", duration_hint_s=2.5)
    assert report.partial and "reading packets failed" in report.error
    assert report.expected_samples == 5
    assert 1 <= len(frames) < 5
    assert [shown(f.image) for f in frames] == [6 * k for k in range(len(frames))]


# ---------------------------------------------------------------- backend choice and fallback


class FlakyReader:
    """A real decord VideoReader whose get_batch fails after `fail_from` calls."""

    fail_from = 0
    real = decord.VideoReader

    def __init__(self, *args, **kwargs):
        self._vr = self.real(*args, **kwargs)
        self._calls = 0

    def __len__(self):
        return len(self._vr)

    def __getattr__(self, name):
        return getattr(self._vr, name)

    def get_batch(self, indices):
        self._calls += 1
        if self._calls > self.fail_from:
            raise RuntimeError("simulated decord failure")
        return self._vr.get_batch(indices)


@pytest.fixture(scope="module")
def mjpeg_clip(tmp_path_factory) -> Path:
    # MJPEG: the codec "auto" hands to decord first. 10 s, so decord needs several batches.
    levels = (np.full((H, W, 3), 8 * (i % N) + 4, np.uint8) for i in range(120))  # `shown` tells i mod N
    return encode_video(levels, tmp_path_factory.mktemp("mjpeg") / "v.avi", fps=SRC_FPS, codec="mjpeg")


def test_auto_falls_back_to_pyav_when_decord_cannot_open(mjpeg_clip, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("simulated: cannot open")

    monkeypatch.setattr(decord, "VideoReader", refuse)
    frames, report = sample(mjpeg_clip, 5.0)
    assert report.backend == "pyav" and len(frames) == 50
    assert report.fallback_reason.startswith("decord: ") and "simulated: cannot open" in report.fallback_reason
    assert not report.partial


def test_auto_falls_back_when_decord_fails_before_yielding(mjpeg_clip, monkeypatch):
    monkeypatch.setattr(FlakyReader, "fail_from", 0)
    monkeypatch.setattr(decord, "VideoReader", FlakyReader)
    frames, report = sample(mjpeg_clip, 5.0)
    assert report.backend == "pyav" and len(frames) == 50 and not report.partial
    assert "simulated decord failure" in report.fallback_reason


@pytest.mark.parametrize("backend", ["auto", "decord"])
def test_decord_failing_after_yielding_is_partial(mjpeg_clip, monkeypatch, backend):
    monkeypatch.setattr(FlakyReader, "fail_from", 2)  # a 1-frame batch (it tells the frame size), then a full one
    monkeypatch.setattr(decord, "VideoReader", FlakyReader)
    frames, report = sample(mjpeg_clip, 5.0, backend=backend, duration_hint_s=10.0)
    assert report.backend == "decord" and report.fallback_reason is None
    delivered = 1 + decode_module._DECORD_BATCH_FRAMES  # every sample is a different frame here
    assert len(frames) == report.samples == delivered
    times = [i / SRC_FPS for i in range(120)]
    assert [shown(f.image) for f in frames] == [frame_at(f.time_s, times) % N for f in frames]
    assert report.partial and "simulated decord failure" in report.error
    assert report.expected_samples == 50


def test_auto_falls_back_to_decord_when_pyav_cannot_open(tmp_path, monkeypatch):
    path = encode_video(indexed(), tmp_path / "v.mp4", fps=SRC_FPS, codec="h264")

    def refuse(self):
        raise DecodeError("open_failed", f"{self.path}: cannot open: simulated")

    monkeypatch.setattr(decode_module._PyAVSource, "open", refuse)
    frames, report = sample(path, 2.0)
    assert report.backend == "decord" and len(frames) == 5
    assert report.fallback_reason == "pyav: cannot open: simulated"
    # AV1 is beyond decord: the PyAV error stands, no fallback is tried.
    with pytest.raises(DecodeError) as info:
        sample(path, 2.0, codec_hint="av1")
    assert info.value.code == "open_failed" and "fallback" not in str(info.value)


def test_unexpected_errors_are_classified(tmp_path, monkeypatch):
    path = encode_video(indexed(), tmp_path / "v.mp4", fps=SRC_FPS, codec="h264")
    real = decode_module.VideoReformatter

    class Breaks:
        """Converts `works` frames, then fails like a bug would."""

        works = 0

        def __init__(self):
            self._inner = real()
            self._n = 0

        def reformat(self, frame, **kwargs):
            self._n += 1
            if self._n > self.works:
                raise ValueError("simulated bug")
            return self._inner.reformat(frame, **kwargs)

    monkeypatch.setattr(decode_module, "VideoReformatter", Breaks)
    with pytest.raises(DecodeError) as info:
        sample(path, 2.0, backend="pyav")
    assert info.value.code == "decode_error" and "ValueError: simulated bug" in str(info.value)
    monkeypatch.setattr(Breaks, "works", 3)
    frames, report = sample(path, 2.0, backend="pyav")
    assert len(frames) == 3 and report.partial and "ValueError: simulated bug" in report.error


# ---------------------------------------------------------------- resources


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc")
def test_pyav_decodes_on_the_calling_thread(tmp_path):
    paths = [encode_video(indexed(), tmp_path / f"v.{ext}", fps=SRC_FPS, codec=codec)
             for codec, ext in [("h264", "mp4"), ("vp9", "webm"), ("av1", "mkv"), ("h265", "mkv")]]
    before = len(os.listdir("/proc/self/task"))
    for path in paths:
        for _ in FrameSampler(path, 2.0, backend="pyav", rotation=0):
            assert len(os.listdir("/proc/self/task")) == before


def test_concurrent_samplers_agree(tmp_path):
    paths = [encode_video(indexed(), tmp_path / f"v{i}.{ext}", fps=SRC_FPS, codec=codec)
             for i, (codec, ext) in enumerate(COMBOS[::2])]

    def run(path):
        return [(f.index, f.pts_s, shown(f.image)) for f in FrameSampler(path, 5.0)]

    sequential = [run(p) for p in paths]
    with ThreadPoolExecutor(max_workers=6) as pool:
        assert list(pool.map(run, paths * 3)) == sequential * 3


def test_iterating_again_starts_over(tmp_path):
    path = encode_video(indexed(), tmp_path / "v.mp4", fps=SRC_FPS, codec="h264")
    sampler = FrameSampler(path, 2.0)
    first = [(f.index, shown(f.image)) for f in sampler]
    report = sampler.report
    assert [(f.index, shown(f.image)) for f in sampler] == first
    assert sampler.report == report and sampler.report is not report


def test_stopping_early_closes_cleanly(tmp_path):
    path = encode_video(indexed(), tmp_path / "v.mp4", fps=SRC_FPS, codec="h264")
    sampler = FrameSampler(path, 5.0)
    it = iter(sampler)
    assert next(it).index == 0 and next(it).index == 1
    it.close()
    assert sampler.report.samples == 2


_PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from stages.frames.decode import FrameSampler
    n = sum(1 for _ in FrameSampler(sys.argv[1], 2.0, backend=sys.argv[2], rotation=0))
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_memory_does_not_grow_with_length(tmp_path):
    # 10 s and 100 s of 320x240: keeping every sample of the long one would add 46 MB, keeping
    # every decoded frame 170 MB; streaming adds nothing (measured: PyAV +0.1 MB, decord +1-6 MB).
    paths = {}
    for seconds in (10, 100):
        paths[seconds] = tmp_path / f"{seconds}s.mp4"
        run_ffmpeg(["-f", "lavfi", "-i", f"testsrc=size=320x240:rate=15:duration={seconds}", "-c:v", "libx264",
                    "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p", str(paths[seconds])])
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    runs = {(s, b): subprocess.Popen([sys.executable, "-c", _PEAK_RSS, str(p), b], stdout=subprocess.PIPE, text=True, env=env)
            for s, p in paths.items() for b in ("pyav", "decord")}
    peak = {}
    for key, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        n, kib = map(int, out.split())
        assert n == 2 * key[0]
        peak[key] = kib / 1024
    assert peak[(100, "pyav")] - peak[(10, "pyav")] < 5, peak
    # decord's own queues between its demuxing and decoding threads are unbounded and fill
    # unevenly (a few MB here, more at higher resolutions), but do not accumulate.
    assert peak[(100, "decord")] - peak[(10, "decord")] < 16, peak


@pytest.mark.parametrize("hw,cap,expected", [((48, 64), 16, (16, 21)), ((64, 48), 16, (21, 16)), ((48, 64), 100, (48, 64))])
def test_max_short_side_shrinks_during_conversion_never_enlarges(tmp_path, hw, cap, expected):
    from media_fixtures import make_video

    clip = make_video(tmp_path / "c.mp4", seed=3, frames=12, fps=12, size=hw)
    full = [s.image for s in FrameSampler(clip, 4.0, backend="pyav")]
    small = [s.image for s in FrameSampler(clip, 4.0, backend="pyav", max_short_side=cap)]
    assert len(small) == len(full) and all(im.shape == (*expected, 3) for im in small)
    if expected != hw:
        # The same picture, only smaller: its mean colour is kept.
        ref = full[0].astype(float).mean(axis=(0, 1))
        assert np.abs(small[0].astype(float).mean(axis=(0, 1)) - ref).max() < 8
