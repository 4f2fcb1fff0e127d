"""How one view's frames, a (T, S, S, 3) uint8 array, are stored in a WebDataset sample.

Two encodings:

- ``npy.zst`` (lossless): the array as an ``.npy`` file (``np.save``, so shape and dtype travel
  with the bytes), compressed as a standard zstd frame (pyarrow's codec, level
  ``ZSTD_LEVEL``). Any zstd tool can unpack a member; the decompressed size is read from the
  frame header, which pyarrow's one-shot compressor always writes.
- ``jpg`` (lossy): the T frames stacked vertically into one tall JPEG (Pillow/libjpeg-turbo,
  4:4:4 chroma), so a view costs one encode and one decode call instead of T. A JPEG side is
  limited to 65535 pixels, so beyond ``65500 // S`` frames (511 at S=128, 409 at S=160) the
  frames continue in further columns (column-major, unused cells black); a COM segment
  ``vimpac-view frames=T size=S cols=C`` records the layout. A single-column JPEG without that
  segment (any tall strip of S x S frames) decodes too.

Measurements (``measure_encoding``, one core of the AMD EPYC dev machine, best of 3): the 12
downstream views (T=32 each, 36 views per S) of 120 frames sampled at 2 FPS from natural
content, sklearn's china.jpg and flower.jpg photographs panned and zoomed at 640x426, encoded
with libx264 CRF 23 and decoded with PyAV. Per frame; timings vary by about 20% between runs:

================  ===  ===========  =========  =========  =======
encoding          S    bytes/frame  encode ms  decode ms  PSNR dB
================  ===  ===========  =========  =========  =======
raw uint8         128       49,152          -          -      inf
npy.zst level 1   128       39,976      0.111      0.063      inf
npy.zst level 3   128       37,084      0.256      0.082      inf
npy.zst level 9   128       35,687      0.817      0.051      inf
npy.zst level 19  128       33,914      9.488      0.081      inf
jpg q95 4:4:4     128        9,547      0.096      0.193    41.77
jpg q90 4:4:4     128        6,664      0.088      0.173    38.27
jpg q95 4:2:0     128        7,359      0.063      0.139    37.26
jpg q90 4:2:0     128        5,154      0.056      0.151    35.21
raw uint8         160       76,800          -          -      inf
npy.zst level 1   160       60,712      0.163      0.064      inf
npy.zst level 3   160       56,102      0.383      0.092      inf
npy.zst level 9   160       53,748      1.271      0.082      inf
npy.zst level 19  160       51,148     17.699      0.123      inf
jpg q95 4:4:4     160       13,904      0.176      0.300    42.37
jpg q90 4:4:4     160        9,729      0.148      0.262    38.87
jpg q95 4:2:0     160       10,843      0.121      0.234    38.31
jpg q90 4:2:0     160        7,599      0.091      0.213    36.09
================  ===  ===========  =========  =========  =======

For scale: computing the 12 views themselves costs 4.5-4.9 ms per source frame of this video.

Default: ``jpg`` at quality 95 with 4:4:4 chroma. Camera-like content barely compresses
losslessly (zstd saves 25%), while q95 JPEG is 3.9-4.0x smaller than ``npy.zst`` at an error
(about 42 dB PSNR) far below what a VQ-VAE tokenizer loses when it reconstructs frames
(typically well under 30 dB), and it is as fast to encode; its decode (0.2-0.3 ms per frame) is small
next to the tokenizer's forward pass. At S=128 a 10-minute pretraining video (one view, 2 FPS)
takes about 11 MB instead of 45 MB, a 7-second downstream clip (12 views, 4 FPS) 3.2 MB
instead of 12.5 MB.
4:2:0 saves another 23% but costs 4.5 dB, halves colour resolution and lets chroma
upsampling bleed across stacked frames. ``npy.zst`` stays available where pixels must be exact
(checking a resize, tokenizer PSNR on unaltered frames); level 3 because level 1 is 8% larger
and level 9 saves 4% for 3x the encode time.

Frames are stacked on whole 8-pixel JPEG blocks when S is a multiple of 8 (64, 128, 160, 256),
so no block mixes two frames; other sizes still round-trip, with slightly more error at the
seams.

Both encoders give the same bytes for the same input and library versions (tested); across
zstd or libjpeg-turbo versions the bytes may change while ``npy.zst`` still decodes to the same
array, so caches should key on configs and inputs, never on encoded bytes.
"""

from __future__ import annotations

import io
import re
import time

import numpy as np
import pyarrow as pa
from PIL import Image, JpegImagePlugin

ENCODINGS = ("npy.zst", "jpg")
DEFAULT_ENCODING = "jpg"
ZSTD_LEVEL = 3
JPEG_QUALITY = 95

# libjpeg's hard limit is 65535 per side; a little below it keeps a margin for encoders that
# round dimensions up to whole MCUs.
_MAX_JPEG_SIDE = 65500
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_NPY_MAGIC = b"\x93NUMPY"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Refuse to allocate more than this on the strength of a frame header alone (a corrupt or
# hostile header could claim any size); 4 GiB is far above any view (1200 frames at S=320: 369 MB).
_MAX_DECOMPRESSED = 4 << 30
_COMMENT = re.compile(rb"^vimpac-view frames=(\d+) size=(\d+) cols=(\d+)$")


def _codec() -> pa.Codec:
    return pa.Codec("zstd", compression_level=ZSTD_LEVEL)


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def extension(encoding: str) -> str:
    """Tar member suffix for `encoding`, without the leading dot (``npy.zst`` or ``jpg``)."""
    _check_encoding(encoding)
    return encoding


def _check_view(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"view frames must be a uint8 numpy array, got {getattr(frames, 'dtype', type(frames))}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] != frames.shape[2]:
        raise ValueError(f"view frames must have shape (T, S, S, 3), got {frames.shape}")
    if frames.shape[0] < 1 or frames.shape[1] < 1:
        raise ValueError(f"view frames must hold at least one non-empty frame, got shape {frames.shape}")


def _grid(t_len: int, size: int) -> tuple[int, int]:
    """(rows, cols) of the JPEG layout: one column while it fits, balanced columns beyond."""
    max_rows = _MAX_JPEG_SIDE // size
    if max_rows < 1:
        raise ValueError(f"frame size {size} exceeds the JPEG side limit {_MAX_JPEG_SIDE}")
    cols = -(-t_len // max_rows)
    rows = -(-t_len // cols)
    if cols * size > _MAX_JPEG_SIDE:
        raise ValueError(f"{t_len} frames of {size}px do not fit in one JPEG; store fewer frames per view")
    return rows, cols


def _encode_jpg(frames: np.ndarray, quality: int) -> bytes:
    t_len, size = frames.shape[:2]
    rows, cols = _grid(t_len, size)
    if cols == 1:
        sheet = np.ascontiguousarray(frames).reshape(t_len * size, size, 3)
    else:
        cells = np.zeros((cols * rows, size, size, 3), dtype=np.uint8)
        cells[:t_len] = frames
        sheet = np.ascontiguousarray(cells.reshape(cols, rows, size, size, 3).transpose(1, 2, 0, 3, 4)).reshape(rows * size, cols * size, 3)
    buf = io.BytesIO()
    comment = f"vimpac-view frames={t_len} size={size} cols={cols}".encode()
    # 4:4:4: chroma subsampling would halve the colour resolution of 128-px frames for a
    # 23% saving (module docstring). Huffman optimisation stays off: on the same content it
    # saved 3.5% of the bytes for 2.4x the encode time.
    Image.fromarray(sheet).save(buf, "JPEG", quality=quality, subsampling=0, comment=comment)
    return buf.getvalue()


def _decode_jpg(data: bytes) -> np.ndarray:
    if data[:3] != _JPEG_MAGIC:
        raise ValueError("jpg view: not a JPEG (bad magic number)")
    try:
        # The JPEG plugin is opened directly rather than through Image.open, whose
        # decompression-bomb guard (about 89 Mpx) would refuse long clips: 2 FPS for an hour at
        # S=128 is 118 Mpx. The size check below is the guard instead, on the same budget as
        # npy.zst.
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height * 3 > _MAX_DECOMPRESSED:
                raise ValueError(f"a {width}x{height} image is above the {_MAX_DECOMPRESSED}-byte limit")
            if im.mode != "RGB":
                raise ValueError(f"expected an RGB JPEG, got mode {im.mode}")
            im.load()
            comment = im.info.get("comment", b"")
            # np.array, not np.asarray: the latter is read-only, unlike npy.zst's arrays.
            sheet = np.array(im)
    except ValueError as exc:
        raise ValueError(f"jpg view: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, etc. on bad data
        raise ValueError(f"jpg view: cannot decode ({type(exc).__name__}: {exc})") from exc
    height, width = sheet.shape[:2]
    match = _COMMENT.match(comment) if comment else None
    if match:
        t_len, size, cols = (int(g) for g in match.groups())
    else:
        size, cols = width, 1
        t_len = height // size if size else 0
    rows = -(-t_len // cols) if cols else 0
    if size < 1 or t_len < 1 or (height, width) != (rows * size, cols * size):
        raise ValueError(f"jpg view: a {width}x{height} image does not hold {t_len} frames of {size}px in {cols} column(s)")
    if cols == 1:
        return sheet.reshape(t_len, size, size, 3)
    cells = sheet.reshape(rows, size, cols, size, 3).transpose(2, 0, 1, 3, 4).reshape(cols * rows, size, size, 3)
    return np.ascontiguousarray(cells[:t_len])


def _zstd_content_size(data: bytes) -> int:
    """Decompressed size from a zstd frame header (RFC 8878, 3.1.1.1)."""
    if len(data) < 6 or data[:4] != _ZSTD_MAGIC:
        raise ValueError("npy.zst view: not a zstd frame (bad magic number)")
    fhd = data[4]
    fcs_flag, single_segment, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    n = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if n == 0:
        raise ValueError("npy.zst view: zstd frame does not record its decompressed size")
    if len(data) < pos + n:
        raise ValueError("npy.zst view: truncated zstd frame header")
    value = int.from_bytes(data[pos : pos + n], "little")
    return value + 256 if n == 2 else value


def _encode_npy_zst(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return _codec().compress(buf.getvalue(), asbytes=True)


def _decode_npy_zst(data: bytes) -> np.ndarray:
    raw_size = _zstd_content_size(data)
    if raw_size > _MAX_DECOMPRESSED:
        raise ValueError(f"npy.zst view: header claims {raw_size} bytes, above the {_MAX_DECOMPRESSED}-byte limit")
    try:
        raw = _codec().decompress(data, decompressed_size=raw_size, asbytes=True)
    except Exception as exc:  # noqa: BLE001 - Arrow raises OSError or ArrowException on bad data
        raise ValueError(f"npy.zst view: cannot decompress ({type(exc).__name__}: {exc})") from exc
    if raw[:6] != _NPY_MAGIC:
        raise ValueError("npy.zst view: the zstd payload is not an .npy file")
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError or EOFError on a bad payload
        raise ValueError(f"npy.zst view: cannot read the .npy payload ({type(exc).__name__}: {exc})") from exc
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"npy.zst view: expected a (T, S, S, 3) uint8 array, got {arr.dtype} {arr.shape}")
    return arr


def encode_view(frames: np.ndarray, encoding: str, *, quality: int = JPEG_QUALITY) -> bytes:
    """Bytes of one view, (T, S, S, 3) uint8, in `encoding`; `quality` applies to ``jpg`` only."""
    _check_encoding(encoding)
    _check_view(frames)
    if encoding == "jpg":
        if not 1 <= quality <= 100:
            raise ValueError(f"jpg quality must be in 1..100, got {quality}")
        return _encode_jpg(frames, quality)
    return _encode_npy_zst(frames)


def decode_view(data: bytes, encoding: str, *, frames: int | None = None, size: int | None = None) -> np.ndarray:
    """The (T, S, S, 3) uint8 array stored in `data`.

    `frames` and `size`, when given, are the expected T and S: a mismatch raises ValueError, as
    do corrupt or truncated bytes.
    """
    _check_encoding(encoding)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{encoding} view: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    arr = _decode_jpg(data) if encoding == "jpg" else _decode_npy_zst(data)
    if frames is not None and arr.shape[0] != frames:
        raise ValueError(f"{encoding} view: expected {frames} frames, got {arr.shape[0]}")
    if size is not None and arr.shape[1] != size:
        raise ValueError(f"{encoding} view: expected {size}x{size} frames, got {arr.shape[1]}x{arr.shape[2]}")
    return arr


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 arrays (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def measure_encoding(views: list[np.ndarray], encoding: str, *, quality: int = JPEG_QUALITY, repeat: int = 3) -> dict[str, float]:
    """Per-frame cost of `encoding` over some views: bytes, encode/decode ms (best of `repeat`), PSNR."""
    n_frames = sum(v.shape[0] for v in views)
    blobs: list[bytes] = []
    best_enc = best_dec = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        blobs = [encode_view(v, encoding, quality=quality) for v in views]
        best_enc = min(best_enc, time.perf_counter() - t0)
        t0 = time.perf_counter()
        decoded = [decode_view(b, encoding) for b in blobs]
        best_dec = min(best_dec, time.perf_counter() - t0)
    return {
        "bytes_per_frame": sum(len(b) for b in blobs) / n_frames,
        "encode_ms_per_frame": 1000 * best_enc / n_frames,
        "decode_ms_per_frame": 1000 * best_dec / n_frames,
        "psnr_db": psnr(np.concatenate(views), np.concatenate(decoded)),
    }
