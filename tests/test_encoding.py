"""Storage encodings of a view: exact/lossy round trips, layout, determinism, validation."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from stages.frames import encoding
from stages.frames.encoding import DEFAULT_ENCODING, ENCODINGS, decode_view, encode_view, extension, measure_encoding, psnr


# q95 4:4:4 gives 37-40 dB on `natural` frames of 32-128 px (42 dB on the camera content of the
# encoding module's table); 35 leaves room for libjpeg-turbo versions without hiding a broken
# layout, which would fall far below it.
JPG_MIN_PSNR = 35.0


def natural(t: int, size: int, seed: int = 0) -> np.ndarray:
    """Natural-looking frames: smooth random colour fields with edges, drifting over time."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    out = np.empty((t, size, size, 3), dtype=np.uint8)
    waves = rng.uniform(1, 6, (3, 4, 2))
    phases = rng.uniform(0, 2 * np.pi, (3, 4))
    for k in range(t):
        shift = 0.05 * k
        chans = []
        for c in range(3):
            field = sum(np.sin(2 * np.pi * (waves[c, i, 0] * (x + shift) + waves[c, i, 1] * y) + phases[c, i]) for i in range(4))
            chans.append(128 + 25 * field)
        img = np.stack(chans, axis=-1)
        img[(x - 0.5 - shift % 0.5) ** 2 + (y - 0.5) ** 2 < 0.04] = (230, 200, 40)
        img += rng.normal(0, 2, img.shape)
        out[k] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def flat_indexed(t: int, size: int) -> np.ndarray:
    """Frame k is a flat colour that encodes k, so the order survives a lossy round trip."""
    out = np.empty((t, size, size, 3), dtype=np.uint8)
    for k in range(t):
        out[k] = (16 * (k % 14) + 8, 16 * (k // 14 % 14) + 8, 128)
    return out


def test_encoding_names_and_extensions():
    assert ENCODINGS == ("npy.zst", "jpg")
    assert DEFAULT_ENCODING in ENCODINGS
    assert [extension(e) for e in ENCODINGS] == ["npy.zst", "jpg"]
    with pytest.raises(ValueError, match="unknown encoding"):
        extension(".jpg")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("t", "size"), [(1, 8), (5, 32), (16, 64), (3, 37)])
@pytest.mark.parametrize("content", ["natural", "noise"])
def test_npy_zst_round_trip_is_exact(t, size, content):
    frames = natural(t, size) if content == "natural" else np.random.default_rng(1).integers(0, 256, (t, size, size, 3), dtype=np.uint8)
    data = encode_view(frames, "npy.zst")
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    out = decode_view(data, "npy.zst", frames=t, size=size)
    assert out.dtype == np.uint8 and out.shape == frames.shape and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, frames)


def test_npy_zst_is_a_plain_zstd_npy():
    """Any zstd tool can unpack a member: the payload is exactly np.save's output."""
    frames = natural(2, 16)
    npy = io.BytesIO()
    np.save(npy, frames)
    raw = pa.Codec("zstd").decompress(encode_view(frames, "npy.zst"), decompressed_size=len(npy.getvalue()), asbytes=True)
    assert raw == npy.getvalue()


@pytest.mark.parametrize("encoding_name", ENCODINGS)
def test_non_contiguous_input_round_trips(encoding_name):
    frames = natural(4, 32)
    mirrored = frames[:, :, ::-1]
    out = decode_view(encode_view(mirrored, encoding_name), encoding_name)
    assert psnr(out, mirrored) > JPG_MIN_PSNR


@pytest.mark.parametrize(("t", "size"), [(8, 64), (4, 128), (6, 40), (3, 37)])
def test_jpg_round_trip_shape_and_psnr(t, size):
    frames = natural(t, size)
    data = encode_view(frames, "jpg")
    out = decode_view(data, "jpg", frames=t, size=size)
    assert out.shape == frames.shape and out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.writeable
    assert psnr(out, frames) > JPG_MIN_PSNR


def test_jpg_quality_trades_bytes_for_error():
    frames = natural(6, 64)
    hi, lo = encode_view(frames, "jpg", quality=95), encode_view(frames, "jpg", quality=60)
    assert len(lo) < len(hi)
    assert psnr(decode_view(lo, "jpg"), frames) < psnr(decode_view(hi, "jpg"), frames)


def test_jpg_is_one_tall_strip():
    frames = natural(5, 32)
    with Image.open(io.BytesIO(encode_view(frames, "jpg"))) as im:
        assert im.size == (32, 5 * 32)
        assert im.info["comment"] == b"vimpac-view frames=5 size=32 cols=1"


def test_jpg_strip_without_comment_decodes():
    frames = flat_indexed(4, 16)
    buf = io.BytesIO()
    Image.fromarray(frames.reshape(64, 16, 3)).save(buf, "JPEG", quality=95)
    out = decode_view(buf.getvalue(), "jpg", frames=4, size=16)
    # Pillow's default here is 4:2:0, a little coarser than the encoder's 4:4:4.
    assert np.abs(out.astype(int) - frames).max() <= 6


def test_jpg_wraps_into_columns_beyond_the_side_limit(monkeypatch):
    monkeypatch.setattr(encoding, "_MAX_JPEG_SIDE", 64)
    frames = flat_indexed(10, 16)  # at most 4 rows per column: 3 columns of 4, 2 padding cells
    data = encode_view(frames, "jpg")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (3 * 16, 4 * 16)
        assert im.info["comment"] == b"vimpac-view frames=10 size=16 cols=3"
        sheet = np.asarray(im)
    # Column-major: frame 5 is the second cell of the second column.
    assert np.abs(sheet[16 + 8, 16 + 8].astype(int) - frames[5, 0, 0]).max() <= 3
    out = decode_view(data, "jpg", frames=10, size=16)
    assert np.abs(out.astype(int) - frames).max() <= 3


def test_jpg_handles_more_frames_than_one_column_holds():
    frames = flat_indexed(2100, 32)  # 2100 * 32 = 67,200 px > 65,535
    out = decode_view(encode_view(frames, "jpg"), "jpg", frames=2100, size=32)
    assert np.abs(out.astype(int) - frames).max() <= 3


@pytest.mark.parametrize("encoding_name", ENCODINGS)
def test_encoding_is_deterministic(encoding_name):
    frames = natural(6, 48, seed=4)
    assert encode_view(frames, encoding_name) == encode_view(frames.copy(), encoding_name)


# --------------------------------------------------------------------------- validation


def _npy_zst(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return pa.Codec("zstd").compress(buf.getvalue(), asbytes=True)


def _jpeg(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt)
    return buf.getvalue()


def _corrupt_cases() -> list[tuple[str, str, bytes]]:
    good_z = encode_view(natural(3, 16), "npy.zst")
    good_j = encode_view(natural(3, 16), "jpg")
    return [
        ("npy.zst", "empty", b""),
        ("npy.zst", "random", np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()),
        ("npy.zst", "truncated", good_z[: len(good_z) // 2]),
        ("npy.zst", "jpeg-bytes", good_j),
        ("npy.zst", "not-npy", pa.Codec("zstd").compress(b"hello world" * 20, asbytes=True)),
        ("npy.zst", "float-array", _npy_zst(np.zeros((2, 8, 8, 3), np.float32))),
        ("npy.zst", "non-square", _npy_zst(np.zeros((2, 8, 9, 3), np.uint8))),
        ("npy.zst", "no-time-axis", _npy_zst(np.zeros((8, 8, 3), np.uint8))),
        ("jpg", "empty", b""),
        ("jpg", "random", np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()),
        ("jpg", "truncated", good_j[: len(good_j) // 2]),
        ("jpg", "zstd-bytes", good_z),
        ("jpg", "png", _jpeg(np.zeros((32, 16, 3), np.uint8), fmt="PNG")),
        ("jpg", "grayscale", _jpeg(np.zeros((32, 16, 3), np.uint8), mode="L")),
        ("jpg", "not-a-strip", _jpeg(np.zeros((40, 16, 3), np.uint8))),
    ]


@pytest.mark.parametrize(("encoding_name", "case", "data"), _corrupt_cases(), ids=[f"{e}-{c}" for e, c, _ in _corrupt_cases()])
def test_corrupt_bytes_raise_value_error(encoding_name, case, data):
    with pytest.raises(ValueError, match=encoding_name.replace(".", r"\.") + " view"):
        decode_view(data, encoding_name)


@pytest.mark.parametrize("encoding_name", ENCODINGS)
def test_unexpected_shape_raises(encoding_name):
    data = encode_view(natural(4, 16), encoding_name)
    with pytest.raises(ValueError, match="expected 5 frames, got 4"):
        decode_view(data, encoding_name, frames=5)
    with pytest.raises(ValueError, match="expected 32x32 frames, got 16x16"):
        decode_view(data, encoding_name, size=32)
    assert decode_view(data, encoding_name, frames=4, size=16).shape == (4, 16, 16, 3)


@pytest.mark.parametrize("encoding_name", ENCODINGS)
def test_oversized_header_is_refused_before_allocating(monkeypatch, encoding_name):
    data = encode_view(natural(2, 16), encoding_name)
    monkeypatch.setattr(encoding, "_MAX_DECOMPRESSED", 1000)
    with pytest.raises(ValueError, match="above the 1000-byte limit"):
        decode_view(data, encoding_name)


def test_long_clips_pass_pillows_decompression_bomb_guard(monkeypatch):
    """Pillow's own limit (89 Mpx) is smaller than an hour of 2 FPS frames at S=128."""
    frames = natural(8, 32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_view(encode_view(frames, "jpg"), "jpg").shape == frames.shape


@pytest.mark.parametrize(
    ("frames", "kwargs", "match"),
    [
        (np.zeros((2, 8, 9, 3), np.uint8), {}, r"\(T, S, S, 3\)"),
        (np.zeros((2, 8, 8, 3), np.float32), {}, "uint8"),
        (np.zeros((8, 8, 3), np.uint8), {}, r"\(T, S, S, 3\)"),
        (np.zeros((0, 8, 8, 3), np.uint8), {}, "at least one"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"quality": 0}, "quality"),
        (np.zeros((2, 8, 8, 3), np.uint8), {"quality": 101}, "quality"),
    ],
)
def test_bad_input_to_encode_raises(frames, kwargs, match):
    with pytest.raises(ValueError, match=match):
        encode_view(frames, "jpg", **kwargs)


def test_unknown_encoding_raises():
    with pytest.raises(ValueError, match="unknown encoding"):
        encode_view(natural(1, 8), "png")
    with pytest.raises(ValueError, match="unknown encoding"):
        decode_view(b"", "npy")


def test_measure_encoding_reports_per_frame_costs():
    views = [natural(4, 32, seed=s) for s in range(3)]
    lossless = measure_encoding(views, "npy.zst", repeat=1)
    lossy = measure_encoding(views, "jpg", repeat=1)
    assert lossless["psnr_db"] == float("inf") and JPG_MIN_PSNR < lossy["psnr_db"] < float("inf")
    assert 0 < lossy["bytes_per_frame"] < lossless["bytes_per_frame"] <= 32 * 32 * 3 + 128
    assert all(r[k] > 0 for r in (lossless, lossy) for k in ("encode_ms_per_frame", "decode_ms_per_frame"))
