"""Probe a downloaded video with PyAV: its metadata for the catalog, or a classified failure.

There is no ffprobe on these machines, and the header alone is not to be trusted: downloads get
cut short, servers return HTML error pages under a video's name, and some files hold nothing a
decoder accepts. So before trusting the header, and in one pass over the file:

0. compare the file's size with the sizes its top-level structure records (MP4 boxes, the
   Matroska Segment, AVI RIFF chunks), which catches a cut anywhere, even inside the header;
1. demux every packet (no decoding: I/O bound and cheap) to count the video frames and measure
   their time span, and compare both with what the container declares, which catches files
   that were cut short but still open;
2. decode the first few video frames on the way, which catches files whose container is fine
   but whose payload is not;
3. read the display rotation from the first decoded frame, where FFmpeg attaches the stream's
   display matrix (PyAV has no getter for stream-level side data).

Every failure becomes a `ProbeError` whose `code` the catalog stores in `videos.error`.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av

from stages.errors import StageError

__all__ = ["ProbeError", "ProbeResult", "probe_video"]

# Failure codes (ProbeError.code).
EMPTY_FILE = "empty_file"
NOT_MEDIA = "not_media"
NO_VIDEO_STREAM = "no_video_stream"
TRUNCATED = "truncated"
UNDECODABLE = "undecodable"
PROBE_ERROR = "probe_error"

# A file is truncated when the demuxed video covers less than this share of what the header
# declares. Muxers round durations and may count a trailing empty packet, so exact equality is
# too strict; a download cut short loses far more than 5%.
COVERAGE_THRESHOLD = 0.95
# ...and at least this many frames (or frame durations) are missing, so that rounding in
# one-second test clips of a handful of frames never reads as truncation.
MIN_MISSING_FRAMES = 2

# Decoders may swallow a few packets before the first picture (reordering delay, hidden VP9 and
# AV1 reference frames, a stream that starts before its first keyframe). The decode check gives
# up after this many packets beyond the number of frames it wants.
DECODE_PACKET_SLACK = 64

# Demuxers whose declared durations are read from the file's header or index, not estimated
# from the bit rate or the last timestamps. Comparing an estimate with the demuxed packets
# proves nothing (and an estimate from the bit rate can be far off), so other formats are
# checked by their declared frame count only.
_HEADER_DURATION_FORMATS = frozenset({"mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "flv", "asf"})

# First bytes of containers whose index or header sits where a cut-short download loses it:
# an MP4/MOV whose moov atom was written at the end fails to open at all. ISO-BMFF files start
# with an `ftyp` box; old QuickTime files may start with `wide`, `mdat`, `free` or `moov`.
_ISOBMFF_FIRST_BOXES = (b"ftyp", b"wide", b"mdat", b"free", b"skip", b"moov")
# Top-level boxes of ISO-BMFF / QuickTime files (plain, fragmented and DASH segments).
_TOP_LEVEL_BOXES = frozenset(
    {b"ftyp", b"styp", b"moov", b"mdat", b"moof", b"mfra", b"free", b"skip", b"wide", b"meta",
     b"sidx", b"ssix", b"emsg", b"prft", b"pdin", b"uuid", b"udta", b"pnot", b"PICT"}
)
_EBML_MAGIC = b"\x1a\x45\xdf\xa3"  # Matroska / WebM
# AVI written to a pipe cannot go back to fill in its frame count and leaves FFmpeg's
# placeholder (2**30) there; counts this large (a year at 30 fps) mean "unknown".
_UNKNOWN_FRAME_COUNT = 1 << 30
# Fragmented MP4 has a moof/mdat pair per fragment; an hour of 1-second fragments is 7200 boxes.
_MAX_TOP_LEVEL_BOXES = 100_000

_MKV_DURATION = re.compile(r"^(\d+):(\d{2}):(\d{2}(?:\.\d+)?)$")


class ProbeError(StageError):
    """A video that cannot be catalogued; `code` says why, `str(err)` says it in a sentence."""


@dataclass(frozen=True)
class ProbeResult:
    container: str  # PyAV's format name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "matroska,webm"
    codec: str  # FFmpeg's codec id name ("h264", "hevc", "vp9", "av1"), not the decoder's
    width: int  # as stored, before rotation
    height: int
    rotation: int  # degrees clockwise to rotate for display: 0, 90, 180 or 270
    fps: float  # average frame rate: frames over the demuxed span (the header's, if it agrees)
    duration_s: float  # span of the demuxed video packets: end of the last minus start of the first
    n_frames: int  # demuxed video packets with a payload
    has_video: bool
    has_audio: bool
    start_time_s: float  # presentation time of the first video packet
    declared_frames: int  # frame count in the container's header, 0 if it has none


def probe_video(path: str | Path, *, decode_check_frames: int = 2) -> ProbeResult:
    """Probe `path` and return its metadata, or raise `ProbeError` with a failure code.

    Demuxes the whole file (every packet is read, none is decoded except the first
    `decode_check_frames` video frames; at least one frame is always decoded). Opens and closes
    its own container and decodes on one thread, so callers can run it in many threads at once.
    """
    if decode_check_frames < 0:
        raise ValueError(f"decode_check_frames must be >= 0, got {decode_check_frames}")
    path = Path(path)
    try:
        return _probe(path, max(1, decode_check_frames))
    except ProbeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract is a classified error, never a raw trace
        raise ProbeError(PROBE_ERROR, f"{path}: unexpected error while probing: {type(exc).__name__}: {exc}") from exc


def _probe(path: Path, decode_target: int) -> ProbeResult:
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise ProbeError(PROBE_ERROR, f"{path}: file does not exist") from exc
    except OSError as exc:
        raise ProbeError(PROBE_ERROR, f"{path}: cannot stat file: {exc.strerror or exc}") from exc
    if not path.is_file():
        raise ProbeError(PROBE_ERROR, f"{path}: not a regular file")
    if size == 0:
        raise ProbeError(EMPTY_FILE, f"{path}: file is empty (0 bytes)")

    shortfall = _size_shortfall(path, size)
    try:
        result = _probe_media(path, size, decode_target)
    except ProbeError as err:
        if shortfall and err.code != TRUNCATED:
            # A file cut inside its header can look like anything (no streams, a lone data
            # stream, an I/O error); the missing bytes are the cause worth reporting.
            reason = err.message.removeprefix(f"{path}: ")
            raise ProbeError(TRUNCATED, f"{path}: truncated: {shortfall}; FFmpeg then reports: {reason}") from err
        raise
    if shortfall:
        # Every declared frame is there, yet the file ends inside its last box: the tail of the
        # last frame (or of the index after it) never arrived.
        raise ProbeError(TRUNCATED, f"{path}: truncated: {shortfall}")
    return result


def _probe_media(path: Path, size: int, decode_target: int) -> ProbeResult:
    try:
        container = av.open(str(path), mode="r", metadata_errors="replace")
    except (av.error.InvalidDataError, av.error.EOFError) as exc:
        raise _open_failure(path, size, exc) from exc
    except av.FFmpegError as exc:
        raise ProbeError(PROBE_ERROR, f"{path}: FFmpeg could not open the file: {_ffmpeg_reason(exc)}") from exc

    with container:
        video = _pick_video_stream(path, container)
        scan = _scan(container, video, decode_target)
        return _result(path, container, video, scan, decode_target)


def _size_shortfall(path: Path, size: int) -> str | None:
    """Why the file is shorter than its own top-level structure says it is, or None.

    MP4/MOV boxes, Matroska's Segment and AVI's RIFF chunks carry their byte sizes, so a file
    cut short betrays itself before any demuxing, even when the cut falls inside the header or
    removes only the tail of the last frame. Formats without sizes (Ogg, MPEG-TS, raw streams)
    and sizes written as "unknown" (live WebM) give no verdict.
    """
    with open(path, "rb") as f:
        head = f.read(16)
        if head[4:8] in _ISOBMFF_FIRST_BOXES:
            return _isobmff_shortfall(f, size)
        if head.startswith(_EBML_MAGIC):
            return _ebml_shortfall(f, size)
        if head.startswith(b"RIFF"):
            return _riff_shortfall(f, size)
    return None


def _isobmff_shortfall(f, size: int) -> str | None:
    offset = 0
    for _ in range(_MAX_TOP_LEVEL_BOXES):
        if offset + 8 > size:
            return None
        f.seek(offset)
        header = f.read(16)
        box_size, kind = struct.unpack(">I4s", header[:8])
        if box_size == 0:
            return None  # the last box runs to the end of the file by definition
        if box_size == 1:
            if len(header) < 16:
                return f"the file has {size} bytes and ends inside the header of its {_box_name(kind)} box"
            box_size = struct.unpack(">Q", header[8:16])[0]
        if box_size < 8 or kind not in _TOP_LEVEL_BOXES:
            # Not a box we know (junk appended after the last box, say): leave the verdict to
            # FFmpeg rather than call a playable file truncated on the strength of stray bytes.
            return None
        if offset + box_size > size:
            return f"the file has {size} bytes but its {_box_name(kind)} box ends at byte {offset + box_size}"
        offset += box_size
    return None


def _ebml_shortfall(f, size: int) -> str | None:
    f.seek(0)
    head = f.read(64)
    header_size, n = _read_vint(head, 4)  # after the 4-byte EBML header ID
    if header_size is None:
        return None
    segment_at = 4 + n + header_size
    f.seek(segment_at)
    seg = f.read(12)
    if seg[:4] != b"\x18\x53\x80\x67":
        return None
    segment_size, n = _read_vint(seg, 4)
    if segment_size is None:
        return None  # size unknown (live streams): nothing to compare
    end = segment_at + 4 + n + segment_size
    if end > size:
        return f"the file has {size} bytes but its Matroska Segment ends at byte {end}"
    return None


def _read_vint(data: bytes, pos: int) -> tuple[int | None, int]:
    """An EBML variable-length size at `pos`: (value or None when unknown/unreadable, length)."""
    if pos >= len(data) or data[pos] == 0:
        return None, 1
    first = data[pos]
    length = 8 - first.bit_length() + 1
    if pos + length > len(data):
        return None, length
    value = first & ((1 << (8 - length)) - 1)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    if value == (1 << (7 * length)) - 1:
        return None, length  # all ones: "unknown size"
    return value, length


def _riff_shortfall(f, size: int) -> str | None:
    # OpenDML AVIs over 1 GB chain several RIFF chunks (AVI , AVIX, ...): follow them all.
    offset = 0
    for _ in range(_MAX_TOP_LEVEL_BOXES):
        if offset + 8 > size:
            return None
        f.seek(offset)
        header = f.read(12)
        if header[:4] != b"RIFF":
            return None
        chunk_size = struct.unpack("<I", header[4:8])[0]
        if chunk_size in (0, 0xFFFFFFFF):
            return None  # written to a pipe: the size was never filled in
        end = offset + 8 + chunk_size + (chunk_size & 1)
        if offset + 8 + chunk_size > size:
            form = header[8:12].decode("latin-1").strip() if len(header) == 12 else ""
            name = f"RIFF {form!r} chunk" if form else "RIFF chunk"
            return f"the file has {size} bytes but its {name} ends at byte {offset + 8 + chunk_size}"
        offset = end
    return None


def _box_name(kind: bytes) -> str:
    return repr(kind.decode("latin-1"))


def _open_failure(path: Path, size: int, exc: Exception) -> ProbeError:
    """Tell a cut-short MP4/MKV (its index never arrived) from a file that is not media at all."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] in _ISOBMFF_FIRST_BOXES:
        return ProbeError(
            TRUNCATED,
            f"{path}: starts like an MP4/MOV file ({head[4:8].decode()!r} box) but cannot be opened "
            f"({_ffmpeg_reason(exc)}): the moov atom is missing, so the file was most likely cut short "
            f"({size} bytes)",
        )
    if head.startswith(_EBML_MAGIC):
        return ProbeError(
            TRUNCATED,
            f"{path}: starts like a Matroska/WebM file but cannot be opened ({_ffmpeg_reason(exc)}): "
            f"its header is incomplete, so the file was most likely cut short ({size} bytes)",
        )
    return ProbeError(
        NOT_MEDIA,
        f"{path}: not a recognised media container ({_ffmpeg_reason(exc)}); "
        f"it starts with {_describe_head(head)}",
    )


def _pick_video_stream(path: Path, container):
    """The first real video stream; cover art (attached pictures) in audio files does not count."""
    if not container.streams:
        raise ProbeError(NOT_MEDIA, f"{path}: FFmpeg opened it as {container.format.name!r} but found no streams")
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if videos:
        return videos[0]
    counts: dict[str, int] = {}
    for s in container.streams:
        kind = "attached picture" if s.type == "video" else f"{s.type} stream"
        counts[kind] = counts.get(kind, 0) + 1
    listed = ", ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items())
    audio_only = "audio stream" in counts and set(counts) <= {"audio stream", "attached picture"}
    raise ProbeError(NO_VIDEO_STREAM, f"{path}: {'audio-only' if audio_only else 'no video stream'} ({listed})")


@dataclass
class _Scan:
    """What one pass over the packets found."""

    n_frames: int = 0  # video packets with a payload, not flagged for discard
    n_packets: int = 0  # every timed video packet (empty ones included), to compare with headers
    first_pts: int | None = None
    end_pts: int | None = None  # max of pts + duration over counted video packets
    end_has_duration: bool = True
    # stream index -> [first timestamp, max end timestamp] over every stream, in its time base
    stream_spans: dict[int, list[int]] = field(default_factory=dict)
    demux_error: str | None = None
    decoded: int = 0
    fed: int = 0
    decode_error: str | None = None
    rotation_ccw: int = 0
    frame_size: tuple[int, int] | None = None


def _scan(container, video, decode_target: int) -> _Scan:
    scan = _Scan()
    ctx = video.codec_context
    if ctx is not None:
        # The caller parallelises over files; a decoder spawning a thread per core in each of
        # many concurrent probes only oversubscribes the machine.
        ctx.thread_type = "NONE"
        ctx.thread_count = 1
    decoding = ctx is not None
    video_index = video.index
    try:
        for packet in container.demux():
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # PyAV's end-of-stream flush marker, not a packet of the file
            _track_all_streams(scan, packet)
            if packet.stream_index != video_index:
                continue
            _count_video_packet(scan, packet)
            if decoding:
                decoding = _decode_step(scan, video, packet, decode_target)
    except (av.FFmpegError, OSError) as exc:
        scan.demux_error = _ffmpeg_reason(exc)
    if decoding and scan.decoded < decode_target:
        _drain(scan, video)
    return scan


def _track_all_streams(scan: _Scan, packet) -> None:
    # Plain integers in the stream's own time base: Fraction arithmetic on every packet would
    # cost more than the demuxing itself on long files with audio.
    ts = packet.pts if packet.pts is not None else packet.dts
    if ts is None:
        return
    end = ts + (packet.duration or 0)
    span = scan.stream_spans.get(packet.stream_index)
    if span is None:
        scan.stream_spans[packet.stream_index] = [ts, end]
    else:
        if ts < span[0]:
            span[0] = ts
        if end > span[1]:
            span[1] = end


def _count_video_packet(scan: _Scan, packet) -> None:
    scan.n_packets += 1
    # Packets an MP4 edit list cuts away are demuxed but never shown: they count against the
    # header's sample count, not as frames of the video.
    if packet.size == 0 or packet.is_discard:
        return
    scan.n_frames += 1
    ts = packet.pts if packet.pts is not None else packet.dts
    if ts is None:
        return
    end = ts + (packet.duration or 0)
    scan.first_pts = ts if scan.first_pts is None else min(scan.first_pts, ts)
    if scan.end_pts is None or end > scan.end_pts:
        scan.end_pts = end
        scan.end_has_duration = bool(packet.duration)


def _decode_step(scan: _Scan, video, packet, decode_target: int) -> bool:
    """Feed one packet to the decoder; return whether to keep decoding."""
    scan.fed += 1
    try:
        _take_frames(scan, video.decode(packet))
    except av.FFmpegError as exc:
        scan.decode_error = _ffmpeg_reason(exc)
    return scan.decoded < decode_target and scan.fed < decode_target + DECODE_PACKET_SLACK


def _drain(scan: _Scan, video) -> None:
    """Flush frames the decoder still holds (reordering delay) once the packets ran out."""
    try:
        _take_frames(scan, video.decode(None))
    except av.FFmpegError as exc:
        scan.decode_error = _ffmpeg_reason(exc)


def _take_frames(scan: _Scan, frames) -> None:
    for frame in frames:
        if scan.decoded == 0:
            # FFmpeg copies the stream's display matrix onto every decoded frame; PyAV exposes it
            # as a counter-clockwise angle in [-180, 180].
            scan.rotation_ccw = frame.rotation
            scan.frame_size = (frame.width, frame.height)
        scan.decoded += 1


def _result(path: Path, container, video, scan: _Scan, decode_target: int) -> ProbeResult:
    tb = video.time_base
    header_rate = video.average_rate or video.guessed_rate or video.base_rate
    declared_frames = _declared_frames(video)

    if scan.first_pts is not None and tb:
        start_s = float(scan.first_pts * tb)
        span_s = float((scan.end_pts - scan.first_pts) * tb)
        if not scan.end_has_duration and header_rate:
            # The last packet carries no duration (some muxers omit it): it lasts one frame.
            span_s += float(1 / header_rate)
        end_s = start_s + span_s
    else:
        # Raw elementary streams carry no timestamps: the header's rate is all there is.
        start_s = 0.0
        span_s = float(scan.n_frames / header_rate) if header_rate else 0.0
        end_s = span_s

    fps = _average_fps(scan.n_frames, span_s, header_rate)
    frame_s = 1 / fps if fps > 0 else 0.0

    if scan.demux_error is not None:
        raise ProbeError(
            TRUNCATED,
            f"{path}: reading packets failed after {scan.n_frames} video frames "
            f"({_declared_text(declared_frames, None)}): {scan.demux_error}; the file is truncated or corrupt",
        )
    # A declared frame count is compared with the frames the packets' timestamps cover at the
    # header's rate, not with the number of packets: a variable-frame-rate AVI counts its drop
    # entries as frames (86 declared at 15 fps, 18 real ones whose timestamps span the whole 6 s)
    # and is whole; a cut file's timestamps stop early.
    covered = max(scan.n_packets, round(span_s * float(header_rate))) if header_rate and scan.first_pts is not None else scan.n_packets
    if declared_frames and _clearly_short(covered, declared_frames, 1):
        found = f"only {scan.n_packets} were found" if covered == scan.n_packets else \
            f"the packets' timestamps cover only {covered} ({scan.n_packets} packets)"
        raise ProbeError(
            TRUNCATED,
            f"{path}: truncated: the header declares {declared_frames} video frames but {found} ({covered / declared_frames:.0%})",
        )
    declared = _declared_duration(container, video)
    if declared is not None:
        declared_s, scope = declared
        if scope == "stream":
            found_span, found_end = span_s, end_s
        else:
            first, last = _all_streams_extent(container, scan, start_s, end_s)
            found_span, found_end = last - first, last
        # Muxers disagree on whether a declared duration is a span or an end time (FFmpeg's
        # Matroska muxer writes the end time, so a file starting at 2 s declares 4 s for 2 s of
        # video): the file is whole if either reading covers the declaration.
        found_s = max(found_span, found_end)
        if _clearly_short(found_s, declared_s, frame_s):
            raise ProbeError(
                TRUNCATED,
                f"{path}: truncated: the container declares {declared_s:.3f} s ({scope}) but the "
                f"demuxed packets end at {found_s:.3f} s ({scan.n_frames} video frames found, "
                f"{_declared_text(declared_frames, fps * declared_s if fps else None)})",
            )

    if scan.n_frames == 0:
        raise ProbeError(UNDECODABLE, f"{path}: the video stream holds no frames (no packets with data)")
    if video.codec_context is None:
        raise ProbeError(UNDECODABLE, f"{path}: FFmpeg has no decoder for this video stream's codec")
    needed = min(decode_target, scan.n_frames)
    if scan.decoded < needed:
        cause = f": {scan.decode_error}" if scan.decode_error else ""
        raise ProbeError(
            UNDECODABLE,
            f"{path}: {_codec_name(video)} payload does not decode: {scan.decoded} of the first {needed} "
            f"frames decoded after feeding {scan.fed} packets{cause}",
        )

    width = video.codec_context.width or (scan.frame_size[0] if scan.frame_size else 0)
    height = video.codec_context.height or (scan.frame_size[1] if scan.frame_size else 0)
    return ProbeResult(
        container=container.format.name,
        codec=_codec_name(video),
        width=int(width),
        height=int(height),
        rotation=rotation_cw(scan.rotation_ccw, video.metadata),
        fps=fps,
        duration_s=span_s,
        n_frames=scan.n_frames,
        has_video=True,
        has_audio=len(container.streams.audio) > 0,
        start_time_s=start_s,
        declared_frames=declared_frames,
    )


def _all_streams_extent(container, scan: _Scan, start_s: float, end_s: float) -> tuple[float, float]:
    """Earliest start and latest end, in seconds, over the packets of every stream."""
    first, last = start_s, end_s
    for index, (ts, end) in scan.stream_spans.items():
        tb = container.streams[index].time_base
        if tb:
            first = min(first, float(ts * tb))
            last = max(last, float(end * tb))
    return first, last


def _clearly_short(found: float, declared: float, unit: float) -> bool:
    """Found covers clearly less than declared: under the threshold share, by a few units."""
    missing = declared - found
    return found < COVERAGE_THRESHOLD * declared and missing >= MIN_MISSING_FRAMES * unit


def _declared_frames(video) -> int:
    if video.frames and video.frames < _UNKNOWN_FRAME_COUNT:
        return int(video.frames)
    # mkvmerge writes per-track statistics tags; FFmpeg's Matroska muxer does not.
    tag = video.metadata.get("NUMBER_OF_FRAMES")
    if tag and tag.strip().isdigit():
        return int(tag.strip())
    return 0


def _declared_duration(container, video) -> tuple[float, str] | None:
    """Duration the header declares, in seconds, and whether it is the video stream's own."""
    if container.format.name not in _HEADER_DURATION_FORMATS:
        return None
    if video.duration and video.time_base:
        return float(video.duration * video.time_base), "stream"
    tag = video.metadata.get("DURATION")
    if tag:
        parsed = _parse_mkv_duration(tag)
        if parsed:
            return parsed, "stream"
    if container.duration and container.duration > 0:
        # A container-wide duration spans every stream: compare it with every stream's packets,
        # since an audio track may legitimately outlast the video.
        return container.duration / av.time_base, "container"
    return None


def _parse_mkv_duration(tag: str) -> float | None:
    m = _MKV_DURATION.match(tag.strip())
    if not m:
        return None
    hours, minutes, seconds = m.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _average_fps(n_frames: int, span_s: float, header_rate: Fraction | None) -> float:
    """Frames over the demuxed span; the header's exact rate where the two agree within 1%.

    Matroska stores millisecond timestamps, so 30 frames at 15 fps span 1.999 s; the header's
    15 is the better number. Where they disagree (variable frame rate, a wrong header) the
    packets win.
    """
    measured = n_frames / span_s if span_s > 0 and n_frames > 0 else 0.0
    header = float(header_rate) if header_rate else 0.0
    if measured and header and abs(measured - header) <= 0.01 * header:
        return header
    return measured or header


def rotation_cw(rotation_ccw: int, metadata) -> int:
    """Clockwise display rotation snapped to a quarter turn, from the display matrix or a tag."""
    if rotation_ccw:
        degrees = -float(rotation_ccw)
    else:
        # Older FFmpeg builds and some muxers left a `rotate` tag (clockwise) instead of a matrix.
        try:
            degrees = float(metadata.get("rotate", 0) or 0)
        except ValueError:
            degrees = 0.0
    if not math.isfinite(degrees):
        return 0
    return int(round(degrees / 90.0)) * 90 % 360


def _codec_name(video) -> str:
    ctx = video.codec_context
    if ctx is not None and ctx.codec is not None:
        # canonical_name is the codec id ("av1"); ctx.name is the decoder ("libdav1d").
        return ctx.codec.canonical_name
    return "unknown"


def _declared_text(declared_frames: int, estimated: float | None) -> str:
    if declared_frames:
        return f"{declared_frames} declared"
    if estimated:
        return f"about {round(estimated)} expected"
    return "no frame count declared"


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's own words without PyAV's "[Errno N]" prefix and repeated file name."""
    strerror = getattr(exc, "strerror", None)
    return strerror or str(exc) or type(exc).__name__


def _describe_head(head: bytes) -> str:
    text = head[:12]
    if text and all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        return f"text {text.decode('ascii')!r}"
    return f"bytes {text.hex(' ')}"
