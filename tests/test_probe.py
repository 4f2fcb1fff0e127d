"""probe_video: metadata of good files in every supported codec/container, and each failure class.

Fixtures are tiny (64x48, 2 s at 15 fps) and made with the bundled ffmpeg, so the whole file
runs in a few seconds.
"""

from __future__ import annotations

import pickle
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

from stages.ingest import probe as probe_module
from stages.ingest.probe import ProbeError, ProbeResult, probe_video
from stages.media import encode_video, ffmpeg_exe, run_ffmpeg

W, H, FPS, N = 64, 48, 15, 30
FRAME_S = 1 / FPS


def frames(n: int = N, *, noise: bool = False, seed: int = 0):
    """A moving bar on a ramp, or noise (noise makes the payload large next to the header, so a
    cut at 60% of the file lands well inside the packets)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        if noise:
            yield rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        else:
            f = np.zeros((H, W, 3), np.uint8)
            f[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, :]
            f[:, (2 * i) % W, 1] = 255
            yield f


def truncate(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def top_level_boxes(data: bytes):
    """(offset, size, type) of the top-level ISO-BMFF boxes."""
    offset = 0
    while offset + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        if size < 8:
            break
        yield offset, size, kind
        offset += size


@pytest.fixture(scope="module")
def base_mp4(tmp_path_factory) -> Path:
    """H.264 in MP4 with the moov atom at the end (FFmpeg's default)."""
    return encode_video(frames(noise=True), tmp_path_factory.mktemp("base") / "base.mp4", fps=FPS, codec="h264")


# ---------------------------------------------------------------- good files


COMBOS = [
    ("h264", "mp4", "h264"),
    ("h265", "mp4", "hevc"),
    ("vp8", "webm", "vp8"),
    ("vp9", "webm", "vp9"),
    ("av1", "mkv", "av1"),
    ("mpeg4", "avi", "mpeg4"),
    ("mjpeg", "avi", "mjpeg"),
    ("theora", "ogv", "theora"),
    ("h264", "mov", "h264"),
    ("h264", "mkv", "h264"),
]


@pytest.mark.parametrize(("codec", "ext", "codec_name"), COMBOS, ids=[f"{c}-{e}" for c, e, _ in COMBOS])
def test_codec_container_combos(tmp_path, codec, ext, codec_name):
    path = encode_video(frames(), tmp_path / f"v.{ext}", fps=FPS, codec=codec)
    r = probe_video(path)
    assert isinstance(r, ProbeResult)
    assert r.codec == codec_name
    assert (r.width, r.height) == (W, H)
    assert r.fps == pytest.approx(FPS, rel=0.01)
    assert abs(r.n_frames - N) <= 1
    assert r.duration_s == pytest.approx(N / FPS, abs=FRAME_S)
    assert r.start_time_s == pytest.approx(0.0, abs=FRAME_S)
    assert r.rotation == 0
    assert r.has_video and not r.has_audio
    with av.open(str(path)) as c:
        assert r.container == c.format.name
    # Formats whose header counts frames report it; Matroska and Ogg written by FFmpeg do not.
    assert r.declared_frames in (0, N)


def test_container_names_are_pyav_format_names(base_mp4):
    assert probe_video(base_mp4).container == "mov,mp4,m4a,3gp,3g2,mj2"


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_nonzero_start_time(tmp_path, base_mp4, ext):
    src = base_mp4 if ext != "webm" else encode_video(frames(), tmp_path / "src.webm", fps=FPS, codec="vp9")
    shifted = tmp_path / f"shifted.{ext}"
    run_ffmpeg(["-i", str(src), "-c", "copy", "-output_ts_offset", "2", str(shifted)])
    r = probe_video(shifted)
    assert r.start_time_s == pytest.approx(2.0, abs=FRAME_S)
    # FFmpeg's Matroska muxer declares the end time (4 s) as the duration; the span is still 2 s.
    assert r.duration_s == pytest.approx(N / FPS, abs=FRAME_S)
    assert abs(r.n_frames - N) <= 1


@pytest.mark.parametrize(("ext", "display_rotation", "clockwise"), [("mp4", "-90", 90), ("mp4", "90", 270), ("mov", "180", 180), ("mkv", "-90", 90)])
def test_rotation_from_display_matrix(tmp_path, base_mp4, ext, display_rotation, clockwise):
    # ffmpeg's -display_rotation is counter-clockwise; a phone's portrait clip is 90 clockwise.
    rotated = tmp_path / f"rotated.{ext}"
    run_ffmpeg(["-display_rotation", display_rotation, "-i", str(base_mp4), "-c", "copy", str(rotated)])
    r = probe_video(rotated)
    assert r.rotation == clockwise
    assert (r.width, r.height) == (W, H)  # stored size, before rotation


def test_rotation_matches_what_ffmpeg_displays(tmp_path):
    # A white square in the top-left corner ends up top-right after a 90 degree clockwise turn.
    marked = np.zeros((H, W, 3), np.uint8)
    marked[:8, :8] = 255
    src = encode_video([marked] * 3, tmp_path / "marked.mp4", fps=FPS, codec="h264")
    rotated = tmp_path / "rotated.mp4"
    run_ffmpeg(["-display_rotation", "-90", "-i", str(src), "-c", "copy", str(rotated)])
    shown = tmp_path / "shown.gray"
    run_ffmpeg(["-i", str(rotated), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", str(shown)])
    picture = np.fromfile(shown, np.uint8).reshape(W, H)  # autorotated: portrait
    assert picture[:8, -8:].mean() > 200 and picture[:8, :8].mean() < 50
    assert probe_video(rotated).rotation == 90


def test_variable_frame_rate(tmp_path):
    # 15 frames 1/15 s apart, then 15 frames 1/30 s apart: 1.5 s, 20 fps on average.
    src = encode_video(frames(), tmp_path / "src.mp4", fps=30, codec="h264")
    vfr = tmp_path / "vfr.mp4"
    run_ffmpeg(
        ["-i", str(src), "-vf", "setpts='if(lt(N,15),2*N,N+15)/(30*TB)'", "-fps_mode", "vfr", "-c:v", "libx264", "-preset", "veryfast", str(vfr)]
    )
    r = probe_video(vfr)
    assert r.n_frames == N
    assert r.duration_s == pytest.approx(1.5, abs=1 / 30)
    assert r.fps == pytest.approx(20.0, rel=0.03)


def test_audio_track_is_reported(tmp_path, base_mp4):
    muxed = tmp_path / "av.mp4"
    run_ffmpeg(["-i", str(base_mp4), "-f", "lavfi", "-i", "sine=duration=2", "-c:v", "copy", "-c:a", "aac", "-shortest", str(muxed)])
    r = probe_video(muxed)
    assert r.has_audio and r.has_video
    assert r.n_frames == N


def test_audio_longer_than_video_is_not_truncation(tmp_path):
    # Without per-stream DURATION tags only the container's duration (the longest stream's)
    # is declared; the video ending a second before the audio is not a cut-short file.
    video = encode_video(frames(), tmp_path / "v.webm", fps=FPS, codec="vp9")
    muxed = tmp_path / "av.webm"
    run_ffmpeg(["-i", str(video), "-f", "lavfi", "-i", "sine=duration=3", "-c:v", "copy", "-c:a", "libopus", str(muxed)])
    untagged = tmp_path / "untagged.webm"
    untagged.write_bytes(muxed.read_bytes().replace(b"DURATION", b"XURATION"))
    with av.open(str(untagged)) as c:
        assert "DURATION" not in c.streams.video[0].metadata
    r = probe_video(untagged)
    assert r.has_audio
    assert r.duration_s == pytest.approx(N / FPS, abs=FRAME_S)


@pytest.mark.parametrize(("codec", "ext", "fmt"), [("vp9", "webm", "webm"), ("mpeg4", "avi", "avi"), ("h264", "mp4", "mp4")])
def test_files_written_to_a_pipe_are_whole(tmp_path, codec, ext, fmt):
    # Written without seeking back, these leave sizes and counts as "unknown" placeholders
    # (Matroska's all-ones sizes, AVI's 2**30 frames): placeholders are not declarations.
    src = encode_video(frames(), tmp_path / f"src.{ext}", fps=FPS, codec=codec)
    piped = tmp_path / f"piped.{ext}"
    extra = ["-movflags", "frag_keyframe+empty_moov"] if fmt == "mp4" else []
    with open(piped, "wb") as out:
        subprocess.run([ffmpeg_exe(), "-loglevel", "error", "-i", str(src), "-c", "copy", *extra, "-f", fmt, "pipe:1"], stdout=out, check=True)
    r = probe_video(piped)
    assert r.n_frames == N
    assert r.duration_s == pytest.approx(N / FPS, abs=FRAME_S)


def test_bytes_appended_after_the_last_box_are_harmless(tmp_path, base_mp4):
    path = tmp_path / "appended.mp4"
    path.write_bytes(base_mp4.read_bytes() + b"\x13\x37junk appended by some tool" * 3)
    assert probe_video(path).n_frames == N


def test_decode_check_frames_bounds(base_mp4):
    assert probe_video(base_mp4, decode_check_frames=0).n_frames == N
    assert probe_video(base_mp4, decode_check_frames=N + 10).n_frames == N
    with pytest.raises(ValueError):
        probe_video(base_mp4, decode_check_frames=-1)


def test_concurrent_probes_agree(tmp_path):
    paths = [encode_video(frames(seed=i), tmp_path / f"v{i}.{ext}", fps=FPS, codec=codec) for i, (codec, ext, _) in enumerate(COMBOS)]
    sequential = [probe_video(p) for p in paths]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(probe_video, paths * 3))
    assert parallel == sequential * 3


# ---------------------------------------------------------------- bad files


def expect(code: str, path: Path) -> ProbeError:
    with pytest.raises(ProbeError) as info:
        probe_video(path)
    err = info.value
    assert err.code == code, str(err)
    assert str(path) in str(err)
    return err


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").touch()
    err = expect("empty_file", tmp_path / "empty.mp4")
    assert "empty" in str(err)


@pytest.mark.parametrize(
    "content",
    ["this is a text file, not a video\n" * 20, "<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body></body></html>\n"],
    ids=["text", "html-error-page"],
)
def test_not_media(tmp_path, content):
    path = tmp_path / "fake.mp4"
    path.write_text(content)
    err = expect("not_media", path)
    assert "not a recognised media container" in str(err)


@pytest.mark.parametrize("ext", ["m4a", "mp4"])
def test_audio_only(tmp_path, ext):
    path = tmp_path / f"audio.{ext}"
    run_ffmpeg(["-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(path)])
    err = expect("no_video_stream", path)
    assert "audio-only (1 audio stream)" in str(err)


def test_cover_art_is_not_a_video(tmp_path, base_mp4):
    path = tmp_path / "song.m4a"
    run_ffmpeg(
        ["-f", "lavfi", "-i", "sine=duration=1", "-i", str(base_mp4), "-map", "0:a", "-map", "1:v", "-frames:v", "1",
         "-c:a", "aac", "-c:v", "mjpeg", "-disposition:v", "attached_pic", str(path)]
    )
    err = expect("no_video_stream", path)
    assert "1 attached picture" in str(err)


def test_truncated_mp4_moov_at_end(tmp_path, base_mp4):
    kinds = [kind for _, _, kind in top_level_boxes(base_mp4.read_bytes())]
    assert kinds.index(b"moov") > kinds.index(b"mdat")
    err = expect("truncated", truncate(base_mp4, tmp_path / "cut.mp4"))
    assert "moov" in str(err)


def test_truncated_faststart_mp4(tmp_path):
    src = encode_video(frames(noise=True), tmp_path / "fs.mp4", fps=FPS, codec="h264", extra_output={"movflags": "+faststart"})
    kinds = [kind for _, _, kind in top_level_boxes(src.read_bytes())]
    assert kinds.index(b"moov") < kinds.index(b"mdat")
    with av.open(str(truncate(src, tmp_path / "cut.mp4"))) as c:
        assert c.streams.video[0].frames == N  # still opens and still declares every frame
    err = expect("truncated", tmp_path / "cut.mp4")
    assert f"declares {N} video frames" in str(err)


@pytest.mark.parametrize(("codec", "ext"), [("h264", "mkv"), ("vp9", "webm"), ("mpeg4", "avi")])
def test_truncated_other_containers(tmp_path, codec, ext):
    src = encode_video(frames(noise=True), tmp_path / f"v.{ext}", fps=FPS, codec=codec)
    assert probe_video(src).n_frames == N
    err = expect("truncated", truncate(src, tmp_path / f"cut.{ext}"))
    assert "declares" in str(err)


def test_truncated_webm_with_only_a_segment_duration(tmp_path):
    # Web-served WebM often lacks per-stream DURATION tags; the Segment's duration must do.
    src = encode_video(frames(noise=True), tmp_path / "v.webm", fps=FPS, codec="vp9")
    untagged = tmp_path / "untagged.webm"
    untagged.write_bytes(src.read_bytes().replace(b"DURATION", b"XURATION"))
    assert probe_video(untagged).n_frames == N
    err = expect("truncated", truncate(untagged, tmp_path / "cut.webm"))
    assert "(container)" in str(err)


@pytest.mark.parametrize(("codec", "ext", "structure"), [("h264", "mp4", "'mdat' box"), ("h264", "mkv", "Matroska Segment"), ("mpeg4", "avi", "RIFF 'AVI' chunk")])
def test_tail_cut_is_truncation_even_with_every_frame_present(tmp_path, codec, ext, structure):
    # A few bytes short: every packet is still indexed and counted, but the file ends inside
    # the structure its own sizes describe.
    extra = {"movflags": "+faststart"} if ext == "mp4" else None
    src = encode_video(frames(noise=True), tmp_path / f"v.{ext}", fps=FPS, codec=codec, extra_output=extra)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(src.read_bytes()[:-20])
    err = expect("truncated", cut)
    assert structure in str(err)


@pytest.mark.parametrize(("codec", "ext"), [("h264", "mp4"), ("h264", "mkv"), ("mpeg4", "avi")])
@pytest.mark.parametrize("keep_bytes", [40, 300])
def test_cut_inside_the_header_is_truncation(tmp_path, codec, ext, keep_bytes):
    extra = {"movflags": "+faststart"} if ext == "mp4" else None
    src = encode_video(frames(), tmp_path / f"v.{ext}", fps=FPS, codec=codec, extra_output=extra)
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(src.read_bytes()[:keep_bytes])
    expect("truncated", cut)


def test_demux_error_mid_file_is_truncation(tmp_path, base_mp4, monkeypatch):
    real_open = av.open

    class FailsMidway:
        """A real container whose demuxer raises an FFmpeg error after a few packets."""

        def __init__(self, *args, **kwargs):
            self._c = real_open(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self._c, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._c.close()

        def demux(self, *args, **kwargs):
            for i, packet in enumerate(self._c.demux(*args, **kwargs)):
                if i == 10:
                    raise av.error.InvalidDataError(-1094995529, "Invalid data found when processing input")
                yield packet

    monkeypatch.setattr(probe_module.av, "open", FailsMidway)
    err = expect("truncated", base_mp4)
    assert "reading packets failed after 10 video frames" in str(err)


@pytest.mark.parametrize("fill", ["random", "zeros"])
def test_garbage_payload_is_undecodable(tmp_path, base_mp4, fill):
    data = bytearray(base_mp4.read_bytes())
    (offset, size, _), = [b for b in top_level_boxes(bytes(data)) if b[2] == b"mdat"]
    payload = size - 8
    data[offset + 8 : offset + size] = (
        np.random.default_rng(1).integers(0, 256, payload, dtype=np.uint8).tobytes() if fill == "random" else bytes(payload)
    )
    path = tmp_path / "garbage.mp4"
    path.write_bytes(bytes(data))
    with av.open(str(path)) as c:  # the container is intact: every packet is still there
        assert sum(1 for p in c.demux(c.streams.video[0]) if p.size) == N
    err = expect("undecodable", path)
    assert "0 of the first 2 frames decoded" in str(err)


def test_missing_file_and_directory(tmp_path):
    expect("probe_error", tmp_path / "nope.mp4")
    expect("probe_error", tmp_path)


def test_unexpected_errors_become_probe_errors(base_mp4, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(probe_module, "_scan", boom)
    err = expect("probe_error", base_mp4)
    assert "RuntimeError: simulated bug" in str(err)


def test_probe_error_pickles():
    err = pickle.loads(pickle.dumps(ProbeError("truncated", "x.mp4: cut short")))
    assert (err.code, str(err)) == ("truncated", "x.mp4: cut short")
