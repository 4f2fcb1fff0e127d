"""Decode one video and sample it at a fixed rate on the video's own timestamps.

Sample k is the frame on display at time k / fps after the first frame: the latest decoded frame
whose timestamp (relative to the first frame's) is at most k / fps. The rule lives in `_Grid`,
shared by both backends, so they pick the same frames.

Why it is built this way (PITFALLS.md "Video decoding", DESIGN.md "Environment facts"):

- Sampling 2-4 fps from 24-30 fps sources still needs nearly every frame decoded (inter-frame
  coding), so the decoder runs sequentially and the sampler keeps the frames whose timestamps
  cross the grid. Only those are converted to RGB: converting every decoded frame would add
  20-30% to the decoding time of 480p-1080p H.264 (measured), for frames thrown away.
- One decoder thread, no scaler threads: the stage scales by running one process per core,
  which beats threads inside each decoder; decord's VP9 decoder also fails unless
  `num_threads=1`.
- Streaming: the sampler holds the previous decoded frame and, for decord, one small batch of
  RGB frames, so memory does not grow with the video's length (measured peak RSS of a whole
  process for 10 s and 100 s: 320x240 PyAV 50.5 and 50.5 MB, decord 70 and 73 MB; 1280x720
  PyAV 62.2 and 62.4 MB, decord 131 and 132 MB).
- Timestamps come from the file, not from a frame counter, so variable frame rate sources and
  streams that start at a non-zero time still give evenly spaced samples.

Backends. PyAV (FFmpeg 8) decodes every codec FFmpeg does. decord 0.6 bundles an older FFmpeg,
cannot open AV1, cannot read Ogg files (it needs a frame count Ogg does not have), has no
timestamps for H.264 in AVI (and then returns a neighbouring frame now and then), and applies
the display matrix itself: a half turn comes out rotated, a quarter turn fails on every frame.
It decodes in a thread of its own, reports errors of frames it decoded ahead on whichever fetch
comes next, and its queues between threads make its peak memory uneven. Measured CPU seconds (all threads, best of 5-7 runs on a shared 2-core machine)
for sampling 2 fps from 20 s of 30 fps H.264, next to the decode-only baseline
`ffmpeg -threads 1 -i SRC -vf fps=2 -f null -` (its process start, about 0.02 s, included):

    240p: PyAV 0.12, decord 0.17, ffmpeg 0.14   480p: PyAV 0.40, decord 0.42, ffmpeg 0.42
    1080p: PyAV 2.02, decord 2.14, ffmpeg 1.99

PyAV keeps pace with FFmpeg itself and is as fast as or faster than decord on every inter-coded
codec measured (H.264, H.265, VP8, VP9, MPEG-4, within 5-10% where they tie); decord wins on
intra-only MJPEG (0.08 against 0.20 s for 10 s of 480p), where it seeks straight to the frames
it needs instead of decoding all of them. So "auto" starts with decord for MJPEG and with PyAV
for everything else, and tries the other backend when the first fails before yielding anything
(`DecodeReport.fallback_reason` says why).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from stages.errors import StageError
from stages.ingest.probe import rotation_cw as _rotation_cw

__all__ = ["DecodeError", "DecodeReport", "FrameSampler", "SampledFrame"]

# Failure codes (DecodeError.code).
OPEN_FAILED = "open_failed"
NO_VIDEO_STREAM = "no_video_stream"
UNSUPPORTED_CODEC = "unsupported_codec"
UNDECODABLE = "undecodable"
TOO_SHORT = "too_short"
DECODE_ERROR = "decode_error"

BACKENDS = ("auto", "pyav", "decord")

# Timestamps are compared with this slack: a frame stamped 0.49999999 s (millisecond Matroska
# clocks, float time bases) is the frame for t = 0.5 s.
_EPS = 1e-6

# A decode is partial when it covers less than this share of the duration the probe measured.
# Probe and decoder disagree by a frame or two at most on whole files (the last frame's
# duration, edit lists); a cut-short or corrupt file loses far more.
_PARTIAL_COVERAGE = 0.9

# Codecs decord cannot decode (AV1: no decoder in its FFmpeg build) or that live in containers
# it cannot index (Theora in Ogg: no frame count, "broken metadata"); measured, see the tests.
_DECORD_CANNOT_CODECS = frozenset({"av1", "theora"})
_DECORD_CANNOT_FORMATS = frozenset({"ogg"})
# Codecs where "auto" tries decord first: intra-only streams decord samples by seeking, without
# decoding the frames between samples (measured 1.3-2.7x less CPU than decoding every frame).
_DECORD_FIRST_CODECS = frozenset({"mjpeg"})
# Failures after which "auto" tries the other backend; a missing video stream or a video
# shorter than one sample interval is the file's property, not the backend's.
_FALLBACK_CODES = frozenset({OPEN_FAILED, UNSUPPORTED_CODEC, UNDECODABLE, DECODE_ERROR})

# decord batches: at most this many frames, and at most this many bytes of RGB, per get_batch.
# Larger batches are no faster (measured 1 to 16 frames) but raise decord's peak memory: at
# 1280x720, 16-frame batches peaked near 300 MB where 4-frame batches stayed near 130 MB.
_DECORD_BATCH_FRAMES = 4
_DECORD_BATCH_BYTES = 16 << 20
# Frame timestamps are read from decord in chunks of this many frames (bounded memory on long files).
_DECORD_TS_CHUNK = 4096
# decord reports FFmpeg's AV_NOPTS_VALUE, converted to seconds, for frames without a timestamp.
_DECORD_NO_TS = -1e9

_DECORD_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class DecodeError(StageError):
    """A video that yields no samples; `code` says why, `str(err)` names the file and the cause."""


@dataclass(frozen=True)
class SampledFrame:
    index: int  # k: the frame on display at time k / fps after the first frame
    time_s: float  # k / fps
    pts_s: float  # the chosen frame's timestamp relative to the first frame's
    image: np.ndarray  # (H, W, 3) uint8 RGB, display orientation, C-contiguous; consecutive samples of one frame share it


@dataclass
class DecodeReport:
    backend: str  # "decord" or "pyav": the backend that produced the frames
    fps: float  # sampling rate requested
    frames_decoded: int  # frames the decoder produced (decord: frames it went through, up to the last one fetched)
    samples: int  # SampledFrames yielded
    duration_s: float  # last timestamp + its frame's duration - first timestamp, over decoded frames
    expected_samples: int  # floor(expected duration * fps); the hint's duration when one was given
    partial: bool  # samples were yielded but decoding stopped early, lost frames, or covers < 90% of the hint
    error: str | None  # what made it partial
    fallback_reason: str | None  # why "auto" left its first backend for the other, if it did
    decode_errors: int = 0  # packets the decoder rejected after the first frame (skipped, like ffmpeg does)


class _Stopped(Exception):
    """A backend could not go on mid-stream; what it delivered before stands."""


class FrameSampler:
    """Iterate over the frames of one video sampled at `fps` (see the module docstring).

    Each iteration opens its own decoder, so a sampler can be iterated again, and samplers can
    run in many threads or processes at once. `report` describes the last iteration and is
    complete once it finishes.
    """

    def __init__(
        self,
        path: str | Path,
        fps: float,
        *,
        backend: str = "auto",
        rotation: int | None = None,
        duration_hint_s: float | None = None,
        codec_hint: str | None = None,
        max_short_side: int | None = None,
    ):
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rotation is not None and rotation % 90:
            raise ValueError(f"rotation must be a multiple of 90 degrees, got {rotation!r}")
        self.path = Path(path)
        self.fps = float(fps)
        self.backend = backend
        self.rotation = None if rotation is None else int(rotation) % 360
        self.duration_hint_s = None if duration_hint_s is None else float(duration_hint_s)
        self.codec_hint = codec_hint.lower() if codec_hint else None
        # Callers that only need frames at most this small (the views' largest scale) let PyAV
        # shrink them inside the YUV->RGB conversion, one swscale pass instead of a full-size
        # conversion plus a separate resize.
        self.max_short_side = max_short_side
        self.report = self._new_report()

    def _new_report(self) -> DecodeReport:
        return DecodeReport(backend="", fps=self.fps, frames_decoded=0, samples=0, duration_s=0.0, expected_samples=0,
                            partial=False, error=None, fallback_reason=None)

    def __iter__(self) -> Iterator[SampledFrame]:
        self.report = self._new_report()
        hint = self.duration_hint_s
        if hint is not None and hint < 1 / self.fps - _EPS:
            raise DecodeError(TOO_SHORT, f"{self.path}: {hint:.3f} s long, shorter than one sample interval at {self.fps:g} fps")
        order = self._order()
        codec = self.codec_hint
        first_error: DecodeError | None = None
        for position, name in enumerate(order):
            if not self._usable(name, codec):
                continue
            source = _PyAVSource(self.path, self.max_short_side) if name == "pyav" else _DecordSource(self.path)
            progress = [0]
            try:
                yield from self._attempt(source, progress, order[position + 1 :])
                return
            except DecodeError as err:
                codec = codec or source.codec
                if progress[0] or not self._can_fall_back(order[position + 1 :], codec) or err.code not in _FALLBACK_CODES:
                    if first_error is None:
                        raise
                    raise DecodeError(first_error.code, f"{first_error.message}; {name} (fallback) also failed: "
                                                        f"{err.message.removeprefix(f'{self.path}: ')}") from err
                first_error = err
                self.report.fallback_reason = f"{name}: {err.message.removeprefix(f'{self.path}: ')}"
            finally:
                source.close()

    def _usable(self, name: str, codec: str | None) -> bool:
        """Whether "auto" should try backend `name` on a video in `codec`."""
        if self.backend != "auto" or name != "decord":
            return True
        return codec not in _DECORD_CANNOT_CODECS and self.rotation not in (90, 270)

    def _can_fall_back(self, rest: tuple[str, ...], codec: str | None) -> bool:
        return any(self._usable(name, codec) for name in rest)

    def _order(self) -> tuple[str, ...]:
        if self.backend != "auto":
            return (self.backend,)
        codec = self.codec_hint or _sniff_codec(self.path)
        if codec in _DECORD_FIRST_CODECS:
            return ("decord", "pyav")
        return ("pyav", "decord")

    def _attempt(self, source, progress: list[int], rest: tuple[str, ...]) -> Iterator[SampledFrame]:
        """Run one backend (`rest`: the backends left to try). Raises DecodeError only while
        nothing has been yielded."""
        fps = self.fps
        report = self.report
        source.open()
        may_fall_back = self._can_fall_back(rest, self.codec_hint or source.codec)
        report.backend = source.name
        stop_error = None
        # Sample 0 is held back until sample 1 exists or the stream ends long enough: a video
        # shorter than one sample interval must raise before anything is yielded.
        held: SampledFrame | None = None
        oriented: tuple[np.ndarray, np.ndarray] | None = None  # (as decoded, as displayed), reused by repeats
        grid = _Grid(fps)
        try:
            for k, pts_s, image in source.samples(grid):
                if oriented is not None and oriented[0] is image:
                    display = oriented[1]
                else:
                    wanted = self.rotation if self.rotation is not None else source.rotation_cw
                    display = _orient(image, (wanted - source.applied_cw) % 360)
                    oriented = (image, display)
                sample = SampledFrame(index=k, time_s=k / fps, pts_s=pts_s, image=display)
                if k == 0:
                    held = sample
                    continue
                if held is not None:
                    yield from self._emit(held, source, progress)
                    held = None
                yield from self._emit(sample, source, progress)
        except _Stopped as exc:
            if not progress[0] and may_fall_back:
                raise DecodeError(DECODE_ERROR, f"{self.path}: {exc}") from exc
            stop_error = str(exc)
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - the contract is a classified error, never a raw trace
            if not progress[0]:
                raise DecodeError(DECODE_ERROR, f"{self.path}: unexpected error while decoding: {type(exc).__name__}: {exc}") from exc
            stop_error = f"unexpected error while decoding: {type(exc).__name__}: {exc}"
        if stop_error and source.duration_s <= 0:
            # Stopped mid-stream: the frames delivered reach as far as the grid has seen.
            source.duration_s = grid.rel or 0.0
        stop_error = stop_error or source.stop_error
        report.frames_decoded = source.frames_decoded
        report.duration_s = source.duration_s
        report.decode_errors = source.decode_errors
        if source.frames_decoded == 0:
            cause = f": {stop_error}" if stop_error else ""
            raise DecodeError(UNDECODABLE, f"{self.path}: no frame decodes ({source.describe()}){cause}")
        if not progress[0] and source.duration_s < 1 / fps - _EPS:
            cause = f" (decoding stopped: {stop_error})" if stop_error else ""
            raise DecodeError(TOO_SHORT, f"{self.path}: {source.duration_s:.3f} s of video decoded, shorter than one "
                                         f"sample interval at {fps:g} fps{cause}")
        if held is not None:
            yield from self._emit(held, source, progress)
        self._finish(source, stop_error)

    def _emit(self, sample: SampledFrame, source, progress: list[int]) -> Iterator[SampledFrame]:
        progress[0] += 1
        self.report.samples = progress[0]
        self.report.frames_decoded = source.frames_decoded
        yield sample

    def _finish(self, source, stop_error: str | None) -> None:
        report = self.report
        hint = self.duration_hint_s
        expected = hint if hint is not None else source.duration_s
        report.expected_samples = math.floor(expected * self.fps + _EPS)
        reasons = []
        if stop_error:
            reasons.append(f"decoding stopped after {source.duration_s:.3f} s: {stop_error}")
        if source.decode_errors:
            reasons.append(f"{source.decode_errors} packets failed to decode after the first frame "
                           f"(first: {source.first_decode_error})")
        if hint is not None and source.duration_s < _PARTIAL_COVERAGE * hint:
            reasons.append(f"decoded {source.duration_s:.3f} s of the {hint:.3f} s expected")
        report.partial = bool(reasons)
        report.error = "; ".join(reasons) if reasons else None


class _Grid:
    """The sampling rule, fed frames in display order.

    `push` returns, for every sample the new frame closes, (k, the previous frame's relative
    timestamp, the previous frame's item): a frame at p ends the reign of the frame before it for
    every t_k < p. `finish` lets the last frame serve every t_k before the end of the video.
    A frame whose timestamp does not increase (broken files) is dropped.
    """

    __slots__ = ("fps", "k", "rel", "item")

    def __init__(self, fps: float):
        self.fps = fps
        self.k = 0
        self.rel: float | None = None
        self.item = None

    def push(self, rel: float, item, out: list) -> bool:
        """Offer the next frame; return whether it was kept."""
        if self.rel is not None:
            if rel <= self.rel:
                return False
            k, fps = self.k, self.fps
            while k / fps + _EPS < rel:
                out.append((k, self.rel, self.item))
                k += 1
            self.k = k
        self.rel = rel
        self.item = item
        return True

    def finish(self, duration_s: float, out: list) -> None:
        if self.rel is None:
            return
        k, fps = self.k, self.fps
        while k / fps < duration_s - _EPS:
            out.append((k, self.rel, self.item))
            k += 1
        self.k = k


class _PyAVSource:
    """Sequential decoding with PyAV: one decoder thread, RGB conversion of sampled frames only."""

    name = "pyav"

    def __init__(self, path: Path, max_short_side: int | None = None):
        self.path = path
        self.max_short_side = max_short_side
        self.container = None
        self.stream = None
        self.codec: str | None = None
        self.rotation_cw = 0  # the file's display rotation, clockwise, read from the first frame
        self.applied_cw = 0  # PyAV hands out frames as stored
        self.frames_decoded = 0
        self.duration_s = 0.0
        self.stop_error: str | None = None
        self.decode_errors = 0
        self.first_decode_error: str | None = None
        self._leading_errors = 0
        self._packets = 0

    def open(self) -> None:
        try:
            container = av.open(str(self.path), mode="r", metadata_errors="replace")
        except (av.FFmpegError, OSError) as exc:
            raise DecodeError(OPEN_FAILED, f"{self.path}: cannot open: {_reason(exc)}") from exc
        self.container = container
        stream = _video_stream(self.path, container)
        ctx = stream.codec_context
        if ctx is None:
            raise DecodeError(UNSUPPORTED_CODEC, f"{self.path}: FFmpeg has no decoder for this video stream's codec")
        self.codec = ctx.codec.canonical_name
        # One decoder thread: the stage runs one process per core (PITFALLS.md), so threads
        # inside the decoder would only compete with the other workers for the same cores.
        ctx.thread_type = "NONE"
        ctx.thread_count = 1
        self.stream = stream

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None

    def describe(self) -> str:
        parts = [f"{self.codec or 'unknown codec'}", f"{self._packets} packets"]
        if self._leading_errors:
            parts.append(f"{self._leading_errors} rejected by the decoder, first: {self.first_decode_error}")
        return "; ".join(parts)

    def samples(self, grid: _Grid) -> Iterator[tuple[int, float, np.ndarray]]:
        stream, ctx = self.stream, self.stream.codec_context
        tb = float(stream.time_base) if stream.time_base else 0.0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frame_s = 1 / float(rate) if rate else 0.0
        if not tb:
            tb = frame_s or 1 / 25
        default_ticks = max(1, round(frame_s / tb)) if frame_s else 1
        # AVI stores no presentation times: FFmpeg's AVI demuxer makes them up from the decode
        # order, and after B-frame reordering they jump back and forth, while each decoded
        # frame's packet dts still counts frames in display order.
        use_dts = self.container.format.name == "avi"
        reformatter = VideoReformatter()
        out: list = []
        first_ts = last_ts = None
        last_dur = last_delta = 0
        converted = None  # (frame, rgb array): the last frame converted, reused by consecutive samples

        def emit():
            nonlocal converted
            for k, rel, frame in out:
                if converted is None or converted[0] is not frame:
                    size = _shrunk_size(frame.width, frame.height, self.max_short_side)
                    rgb = reformatter.reformat(frame, format="rgb24", threads=1, interpolation="AREA", **size).to_ndarray()
                    converted = (frame, rgb)
                yield k, rel, converted[1]
            out.clear()

        def take(frames) -> None:
            nonlocal first_ts, last_ts, last_dur, last_delta
            for frame in frames:
                if self.frames_decoded == 0:
                    self.rotation_cw = _rotation_cw(frame.rotation, stream.metadata)
                self.frames_decoded += 1
                # Frames drained from the decoder at the end carry no dts; in AVI they are
                # synthesised below, elsewhere the pts is the real one.
                ts = frame.dts if use_dts else (frame.pts if frame.pts is not None else frame.dts)
                if ts is None:
                    ts = 0 if last_ts is None else last_ts + (last_dur or default_ticks)
                if first_ts is None:
                    first_ts = ts
                if grid.push((ts - first_ts) * tb, frame, out):
                    if last_ts is not None:
                        last_delta = ts - last_ts
                    last_ts = ts
                    last_dur = frame.duration or 0

        packets = self.container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except (av.FFmpegError, OSError) as exc:
                self.stop_error = f"reading packets failed after {self.frames_decoded} frames: {_reason(exc)}"
                break
            if packet.size:
                self._packets += 1
            try:
                take(ctx.decode(packet))
            except av.FFmpegError as exc:
                self._decode_failed(exc)
            if out:
                yield from emit()
        if self.stop_error is not None:
            # The demuxer gave up: the frames the decoder still holds back for reordering are real.
            try:
                take(ctx.decode(None))
            except av.FFmpegError as exc:
                self._decode_failed(exc)
        if grid.rel is None:
            return
        end_ticks = last_dur or last_delta or default_ticks
        self.duration_s = grid.rel + end_ticks * tb
        grid.finish(self.duration_s, out)
        yield from emit()

    def _decode_failed(self, exc: Exception) -> None:
        # FFmpeg's own CLI skips a packet the decoder rejects and goes on; so do we. Rejections
        # before the first frame (a stream cut before its first keyframe) cost nothing of the
        # video; later ones lose frames and make the decode partial.
        if self.first_decode_error is None:
            self.first_decode_error = _reason(exc)
        if self.frames_decoded:
            self.decode_errors += 1
        else:
            self._leading_errors += 1


class _DecordSource:
    """decord's VideoReader: timestamps up front, sampled frames fetched in small sorted batches."""

    name = "decord"

    def __init__(self, path: Path):
        self.path = path
        self.vr = None
        self.codec: str | None = None
        self.rotation_cw = 0  # the file's display rotation, clockwise
        self.applied_cw = 0  # what decord already applied of it
        self.frames_decoded = 0
        self.duration_s = 0.0
        self.stop_error: str | None = None
        self.decode_errors = 0
        self.first_decode_error: str | None = None
        self._n = 0
        self._batch_frames = 1  # until the first batch tells the frame size

    def open(self) -> None:
        try:
            import decord
        except ImportError as exc:
            raise DecodeError(OPEN_FAILED, f"{self.path}: decord is not installed") from exc
        if not self.path.is_file():
            raise DecodeError(OPEN_FAILED, f"{self.path}: cannot open: no such file")
        try:
            # num_threads=1: decord's VP9 decoding fails with its default threading (DESIGN.md).
            self.vr = decord.VideoReader(str(self.path), num_threads=1, ctx=decord.cpu(0))
        except Exception as exc:  # noqa: BLE001 - decord raises DECORDError or RuntimeError
            raise self._open_failure(exc) from exc
        self._n = len(self.vr)
        # decord applies the display matrix itself, but into a buffer of the stored size: a
        # half turn comes out rotated, a quarter turn fails on every frame ("The size must
        # exactly match"). So the file's rotation is needed whatever the caller says.
        self.rotation_cw = _detect_rotation(self.path)
        if self.rotation_cw in (90, 270):
            raise DecodeError(OPEN_FAILED, f"{self.path}: decord cannot decode a video displayed rotated by "
                                           f"{self.rotation_cw} degrees")
        self.applied_cw = self.rotation_cw
        head = self._timestamps(0, min(self._n, 16)) if self._n else np.zeros((0, 2))
        if len(head) and not _valid_stamps(head).any():
            # H.264 in AVI carries no timestamps; decord then finds frames by timestamp anyway
            # and now and then hands out a neighbour of the frame asked for (measured).
            raise DecodeError(OPEN_FAILED, f"{self.path}: decord reports no frame timestamps for this file "
                                           f"and cannot fetch its frames reliably")

    def _open_failure(self, exc: Exception) -> DecodeError:
        reason = _decord_reason(exc)
        try:
            with av.open(str(self.path), mode="r", metadata_errors="replace") as container:
                stream = _video_stream(self.path, container)
                ctx = stream.codec_context
                self.codec = ctx.codec.canonical_name if ctx is not None else None
                if self.codec in _DECORD_CANNOT_CODECS or container.format.name in _DECORD_CANNOT_FORMATS:
                    return DecodeError(UNSUPPORTED_CODEC, f"{self.path}: decord cannot decode {self.codec} in "
                                                          f"{container.format.name} ({reason})")
        except DecodeError as err:
            return err
        except (av.FFmpegError, OSError):
            pass
        return DecodeError(OPEN_FAILED, f"{self.path}: decord cannot open it: {reason}")

    def close(self) -> None:
        self.vr = None

    def describe(self) -> str:
        return f"decord, {self._n} frames indexed"

    def samples(self, grid: _Grid) -> Iterator[tuple[int, float, np.ndarray]]:
        n = self._n
        if n == 0:
            return
        avg_fps = float(self.vr.get_avg_fps() or 0.0)
        pending: list = []  # samples closed by the grid, waiting for their batch
        distinct = 0  # frames they name (one push closes samples of a single frame)
        first = kept_start = kept_end = None
        delta = 0.0
        for lo in range(0, n, _DECORD_TS_CHUNK):
            stamps = self._timestamps(lo, min(n, lo + _DECORD_TS_CHUNK))
            valid = _valid_stamps(stamps)
            if not valid.all():
                raise _Stopped(f"decord reports no timestamp for frame {lo + int(np.argmin(valid))} of {n}")
            if first is None:
                first = float(stamps[0, 0])
            for j, (start, end) in enumerate(stamps.tolist()):
                size = len(pending)
                if grid.push(start - first, lo + j, pending):
                    if kept_start is not None:
                        delta = start - kept_start
                    kept_start, kept_end = start, end
                if len(pending) > size:
                    distinct += 1
                    if distinct >= self._batch_frames:
                        yield from self._fetch(pending)
                        pending.clear()
                        distinct = 0
        # The last frame lasts until its end stamp; some muxers leave it equal to the start
        # (VP9 in MP4), then it lasts as long as the gap before it.
        last_s = kept_end - kept_start if kept_end > kept_start else delta
        if last_s <= 0 and avg_fps > 0:
            last_s = 1 / avg_fps
        self.duration_s = kept_start - first + last_s
        grid.finish(self.duration_s, pending)
        if pending:
            yield from self._fetch(pending)

    def _timestamps(self, lo: int, hi: int) -> np.ndarray:
        try:
            return np.asarray(self.vr.get_frame_timestamp(np.arange(lo, hi)), dtype=np.float64).reshape(-1, 2)
        except Exception as exc:  # noqa: BLE001 - decord raises DECORDError or RuntimeError
            raise _Stopped(f"decord cannot read frame timestamps: {_decord_reason(exc)}") from exc

    def _fetch(self, entries: list) -> Iterator[tuple[int, float, np.ndarray]]:
        """Fetch the frames `entries` (k, rel, index) name in one batch and yield them in order."""
        rel_of = {}
        for _, rel, i in entries:
            rel_of.setdefault(i, rel)
        indices = sorted(rel_of)
        try:
            images = self._get(indices, rel_of)
        except _Stopped:
            if len(indices) == 1:
                raise
            images = None
        if images is None:
            # A batch fails as a whole when one of its frames does not decode: fetch the frames
            # one by one to keep those before the damage.
            images = {}
            for i in indices:
                images.update(self._get([i], rel_of))
                yield from ((k, rel, images[j]) for k, rel, j in entries if j == i)
            return
        for k, rel, i in entries:
            yield k, rel, images[i]

    def _get(self, indices: list[int], rel_of: dict[int, float]) -> dict[int, np.ndarray]:
        try:
            batch = self.vr.get_batch(indices).asnumpy()
        except Exception as exc:  # noqa: BLE001 - decord raises DECORDError or RuntimeError
            # What was delivered reaches up to the first frame that could not be fetched.
            self.duration_s = rel_of[indices[0]] if self.frames_decoded else 0.0
            raise _Stopped(f"decord failed fetching frame {indices[0]}"
                           f"{f'-{indices[-1]}' if len(indices) > 1 else ''} of {self._n}: {_decord_reason(exc)}") from exc
        if batch.ndim != 4 or batch.shape[0] != len(indices) or batch.shape[-1] != 3:
            raise _Stopped(f"decord returned an array of shape {batch.shape} for {len(indices)} frames")
        self.frames_decoded = max(self.frames_decoded, indices[-1] + 1)
        self._batch_frames = max(1, min(_DECORD_BATCH_FRAMES, _DECORD_BATCH_BYTES // max(1, batch[0].nbytes)))
        return {i: batch[j] for j, i in enumerate(indices)}


def _valid_stamps(stamps: np.ndarray) -> np.ndarray:
    """Which rows of decord's (start, end) seconds carry a real start time."""
    return np.isfinite(stamps[:, 0]) & (stamps[:, 0] > _DECORD_NO_TS)


def _video_stream(path: Path, container):
    """The first real video stream; cover art (attached pictures) does not count."""
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise DecodeError(NO_VIDEO_STREAM, f"{path}: no video stream ({', '.join(kinds)})")
    return videos[0]


def _sniff_codec(path: Path) -> str | None:
    """The video codec from the container header (no decoding), or None if it cannot be read."""
    try:
        with av.open(str(path), mode="r", metadata_errors="replace") as container:
            ctx = _video_stream(path, container).codec_context
            return ctx.codec.canonical_name if ctx is not None else None
    except (av.FFmpegError, OSError, DecodeError):
        return None


def _detect_rotation(path: Path) -> int:
    """Clockwise display rotation, read from the first decoded frame as the probe does."""
    try:
        with av.open(str(path), mode="r", metadata_errors="replace") as container:
            stream = _video_stream(path, container)
            if stream.codec_context is not None:
                stream.codec_context.thread_type = "NONE"
                stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                return _rotation_cw(frame.rotation, stream.metadata)
    except (av.FFmpegError, OSError, DecodeError):
        pass
    return 0


def _shrunk_size(width: int, height: int, max_short: int | None) -> dict[str, int]:
    """reformat() size arguments that bring the shorter side down to `max_short` (never up);
    the shorter side is the same before and after a quarter-turn rotation."""
    short = min(width, height)
    if not max_short or short <= max_short:
        return {}
    scale = max_short / short
    if width <= height:
        return {"width": max_short, "height": max(1, int(height * scale + 0.5))}
    return {"width": max(1, int(width * scale + 0.5)), "height": max_short}


def _orient(image: np.ndarray, rotation_cw: int) -> np.ndarray:
    if rotation_cw:
        image = np.rot90(image, k=-(rotation_cw // 90))  # np.rot90 turns counter-clockwise for k > 0
    return np.ascontiguousarray(image)


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words without PyAV's "[Errno N]" prefix and repeated file name."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _decord_reason(exc: BaseException) -> str:
    """The first line of a decord error, without its C++ log prefix."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    while _DECORD_LOG_PREFIX.match(text):
        text = _DECORD_LOG_PREFIX.sub("", text, count=1)
    return text
