"""The fixed spatial views (names, crop geometry, flips, zoom, resize contract, determinism) and
the contact sheet that shows them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.frames.contact_sheet import BACKGROUND, GAP, MARGIN, VIDEO_GAP, contact_sheet, frame_indices
from stages.frames.views import (
    PRETRAIN_VIEW,
    crop_offset,
    make_views,
    parse_view_name,
    resize_short_side,
    scaled_size,
    view_names,
    view_specs,
)

UNFLIPPED = ["s100_tl", "s100_c", "s100_br", "s125_tl", "s125_c", "s125_br"]

# Quadrant colours of the synthetic source frame: top-left, top-right, bottom-left, bottom-right.
TL, TR, BL, BR = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(h: int, w: int, t: int = 2) -> np.ndarray:
    """(t, h, w, 3) frames split into four flat colours at row h // 2 and column w // 2."""
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[: h // 2, : w // 2] = TL
    frame[: h // 2, w // 2 :] = TR
    frame[h // 2 :, : w // 2] = BL
    frame[h // 2 :, w // 2 :] = BR
    return np.repeat(frame[None], t, axis=0)


def noise(h: int, w: int, t: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def expected_quadrant_view(h: int, w: int, size: int, scale: str, crop: str) -> tuple[np.ndarray, np.ndarray]:
    """(expected colours, mask of pixels whose filter footprint stays inside one quadrant).

    Maps each output pixel back to source coordinates the way a resampling filter does
    (centre of output pixel k -> (k + 0.5) * in / out) and keeps only pixels farther from the
    quadrant boundary than the filter's reach (1 source pixel, widened by the reduction factor
    when downscaling, plus a half-pixel margin); those must be exactly the quadrant colour.
    """
    short = scaled_size(size, scale)
    rh, rw = resize_short_side(np.zeros((1, h, w, 3), np.uint8), short).shape[1:3]
    top, left = crop_offset(rh, rw, size, crop)
    fy, fx = h / rh, w / rw
    u = (top + np.arange(size) + 0.5) * fy
    v = (left + np.arange(size) + 0.5) * fx
    clean_y = np.abs(u - h // 2) >= max(1.0, fy) + 0.5
    clean_x = np.abs(v - w // 2) >= max(1.0, fx) + 0.5
    lower = (u >= h // 2)[:, None]
    right = (v >= w // 2)[None, :]
    colours = np.array([[TL, TR], [BL, BR]], dtype=np.uint8)
    expected = colours[lower.astype(int) + np.zeros_like(right, dtype=int), right.astype(int) + np.zeros_like(lower, dtype=int)]
    return expected, clean_y[:, None] & clean_x[None, :]


# --------------------------------------------------------------------------- names


def test_downstream_names_and_order():
    assert view_names("downstream") == UNFLIPPED + [n + "_flip" for n in UNFLIPPED]


@pytest.mark.parametrize(
    ("kind", "flip_sensitive", "count"),
    [("downstream", False, 12), ("downstream", True, 6), ("pretrain", False, 1), ("pretrain", True, 1)],
)
def test_view_counts_unique_and_dot_free(kind, flip_sensitive, count):
    names = view_names(kind, flip_sensitive)
    assert len(names) == count == len(set(names))
    assert all("." not in n and n.isascii() and n == n.lower() for n in names)


def test_flip_sensitive_is_the_unflipped_prefix_and_pretrain_is_center():
    assert view_names("downstream", flip_sensitive=True) == UNFLIPPED
    assert view_names("pretrain") == [PRETRAIN_VIEW] == ["s100_c"]


def test_specs_parse_back_and_unknowns_raise():
    for spec in view_specs("downstream"):
        assert parse_view_name(spec.name) == spec
    assert parse_view_name("s125_br_flip").flip and parse_view_name("s125_br_flip").crop == "br"
    with pytest.raises(ValueError, match="unknown view name"):
        parse_view_name("s150_c")
    with pytest.raises(ValueError, match="unknown view kind"):
        view_names("train")  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "s125"), [(128, 160), (256, 320), (64, 80), (30, 38), (10, 12), (7, 9)])
def test_scale_125_rounds(size, s125):
    assert scaled_size(size, "s100") == size
    assert scaled_size(size, "s125") == s125 == int(round(1.25 * size))


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("scale", ["s100", "s125"])
@pytest.mark.parametrize("long_extra", [0, 27, 28], ids=["square", "odd-excess", "even-excess"])
@pytest.mark.parametrize("portrait", [False, True], ids=["landscape", "portrait"])
def test_crops_are_exact_slices_when_no_resize_is_needed(scale, long_extra, portrait):
    """A source whose shorter side already equals the scale is only cropped: pixel-exact slices."""
    size = 24
    s = scaled_size(size, scale)
    h, w = (s + long_extra, s) if portrait else (s, s + long_extra)
    src = noise(h, w, t=3)
    views = make_views(src, size, "downstream")
    offsets = {"tl": (0, 0), "c": ((h - size) // 2, (w - size) // 2), "br": (h - size, w - size)}
    for crop, (top, left) in offsets.items():
        view = views[f"{scale}_{crop}"]
        np.testing.assert_array_equal(view, src[:, top : top + size, left : left + size])
        np.testing.assert_array_equal(views[f"{scale}_{crop}_flip"], src[:, top : top + size, left : left + size][:, :, ::-1])


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [
        (96, 160, 32),  # landscape, downscale
        (160, 96, 32),  # portrait, downscale
        (100, 100, 40),  # square
        (101, 167, 24),  # odd sides: floor() centering
        (20, 30, 48),  # landscape smaller than S: upscale
        (30, 20, 48),  # portrait smaller than S: upscale
    ],
)
def test_each_view_shows_the_right_part_of_the_frame(h, w, size):
    views = make_views(quadrants(h, w), size, "downstream")
    for spec in view_specs("downstream"):
        expected, clean = expected_quadrant_view(h, w, size, spec.scale, spec.crop)
        if spec.flip:
            expected, clean = expected[:, ::-1], clean[:, ::-1]
        assert clean.mean() > 0.5, f"{spec.name}: too few pixels away from the quadrant boundary to judge"
        for frame in views[spec.name]:
            np.testing.assert_array_equal(frame[clean], expected[clean], err_msg=spec.name)


@pytest.mark.parametrize(("h", "w"), [(64, 128), (128, 64), (80, 80)])
def test_corners_land_in_their_crops(h, w):
    views = make_views(quadrants(h, w, t=1), 32, "downstream")
    for scale in ("s100", "s125"):
        assert tuple(views[f"{scale}_tl"][0, 0, 0]) == TL
        assert tuple(views[f"{scale}_br"][0, -1, -1]) == BR
        # The flipped top-left crop shows the frame's top-left corner at its top-right.
        assert tuple(views[f"{scale}_tl_flip"][0, 0, -1]) == TL


def test_center_crop_is_centered():
    """On a symmetric frame (a centred bright square) the center view is itself symmetric.

    Sizes keep the excess of the resized frame over S even at both scales (48 - 32, 60 - 32),
    where floor((W - S) / 2) is exactly half; odd excesses are covered by the slice test.
    """
    h, w, size = 80, 120, 32
    frame = np.zeros((1, h, w, 3), dtype=np.uint8)
    frame[:, 30:50, 50:70] = 200
    for scale in ("s100", "s125"):
        view = make_views(frame, size, "downstream")[f"{scale}_c"][0]
        np.testing.assert_array_equal(view, view[::-1])
        np.testing.assert_array_equal(view, view[:, ::-1])
        assert view[size // 2, size // 2, 0] == 200


def test_flipped_views_mirror_their_unflipped_partner():
    views = make_views(noise(45, 70, t=3), 32, "downstream")
    for name in UNFLIPPED:
        np.testing.assert_array_equal(views[name + "_flip"], views[name][:, :, ::-1])


def test_s125_views_zoom_in():
    """A 6% border band fills the s100 center view's edges and never reaches s125's (10% cut)."""
    n, size = 200, 40
    band, inside = (0, 200, 0), (90, 90, 90)
    frame = np.empty((1, n, n, 3), dtype=np.uint8)
    frame[:] = band
    frame[:, 12:-12, 12:-12] = inside
    views = make_views(frame, size, "downstream")
    s100, s125 = views["s100_c"][0], views["s125_c"][0]
    for edge in (s100[0], s100[-1], s100[:, 0], s100[:, -1]):
        assert tuple(edge[size // 2]) == band
    assert (s125 == np.array(inside, dtype=np.uint8)).all()
    assert (views["s125_tl"][0, 0, 0] == band).all()


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize(("kind", "flip_sensitive"), [("downstream", False), ("downstream", True), ("pretrain", False)])
@pytest.mark.parametrize(("h", "w"), [(36, 64), (64, 36), (50, 50), (10, 14)])
def test_output_contract(kind, flip_sensitive, h, w):
    views = make_views(noise(h, w, t=3), 32, kind, flip_sensitive)
    assert list(views) == view_names(kind, flip_sensitive)
    for view in views.values():
        assert view.shape == (3, 32, 32, 3)
        assert view.dtype == np.uint8
        assert view.flags.c_contiguous


def test_pretrain_view_equals_downstream_center():
    src = noise(48, 80, t=2)
    np.testing.assert_array_equal(make_views(src, 32, "pretrain")["s100_c"], make_views(src, 32, "downstream")["s100_c"])


def test_deterministic_and_chunkable_along_time():
    src = noise(90, 160, t=5, seed=3)
    first, second = make_views(src, 32, "downstream"), make_views(src.copy(), 32, "downstream")
    parts = [make_views(src[:2], 32, "downstream"), make_views(src[2:], 32, "downstream")]
    for name in view_names("downstream"):
        np.testing.assert_array_equal(first[name], second[name])
        np.testing.assert_array_equal(first[name], np.concatenate([p[name] for p in parts]))


@pytest.mark.parametrize(
    ("shape", "short", "out"),
    [
        ((1, 1080, 1920, 3), 160, (1, 160, 284, 3)),
        ((1, 1920, 1080, 3), 160, (1, 284, 160, 3)),
        ((1, 240, 320, 3), 128, (1, 128, 171, 3)),
        ((1, 2, 5, 3), 3, (1, 3, 8, 3)),  # 7.5 rounds half up
        ((1, 20, 20, 3), 64, (1, 64, 64, 3)),
    ],
)
def test_resize_short_side_shapes(shape, short, out):
    assert resize_short_side(np.zeros(shape, np.uint8), short).shape == out


def test_resize_keeps_flat_colour_and_same_size_is_identity():
    flat = np.full((2, 300, 500, 3), (12, 200, 77), dtype=np.uint8)
    assert (resize_short_side(flat, 40) == np.array((12, 200, 77), np.uint8)).all()
    src = noise(40, 60)
    np.testing.assert_array_equal(resize_short_side(src, 40), src)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 32, 32, 3), np.float32),
        np.zeros((32, 32, 3), np.uint8),
        np.zeros((2, 32, 32, 4), np.uint8),
        np.zeros((0, 32, 32, 3), np.uint8),
        [[0]],
    ],
    ids=["float", "no-time-axis", "rgba", "empty", "list"],
)
def test_bad_frames_raise(frames):
    with pytest.raises(ValueError, match="frames"):
        make_views(frames, 16, "downstream")


def test_bad_size_raises():
    with pytest.raises(ValueError, match="size"):
        make_views(noise(16, 16), 0, "downstream")


# --------------------------------------------------------------------------- contact sheet


def indexed(t: int, size: int) -> np.ndarray:
    """Frame k is flat grey 10 * k + 5, so a pasted frame tells which one it is."""
    return np.repeat((10 * np.arange(t, dtype=np.uint8) + 5)[:, None, None, None], size, axis=1).repeat(size, axis=2).repeat(3, axis=3)


@pytest.mark.parametrize(
    ("n", "most", "expected"),
    [(20, 8, [0, 3, 5, 8, 11, 14, 16, 19]), (3, 8, [0, 1, 2]), (1, 8, [0]), (9, 1, [0]), (8, 8, list(range(8)))],
)
def test_frame_indices_evenly_spaced(n, most, expected):
    assert frame_indices(n, most) == expected


def test_sheet_size_and_frame_positions(tmp_path):
    size, label = 24, 14
    rows = [
        ("vid_a", {"s100_c": indexed(20, size), "s100_c_flip": indexed(20, size)}),
        ("vid_b", {"s100_c": indexed(3, size)}),
    ]
    path = contact_sheet(rows, tmp_path / "sub" / "sheet.png", max_frames=8, label_height=label)
    assert path == tmp_path / "sub" / "sheet.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        sheet = np.asarray(im.convert("RGB"))
    row_h = label + size + GAP
    width = 8 * size + 7 * GAP
    height = 3 * row_h - GAP + VIDEO_GAP
    assert sheet.shape == (height + 2 * MARGIN, width + 2 * MARGIN, 3)

    def cell(row: int, col: int, video: int) -> np.ndarray:
        top = MARGIN + row * row_h + video * VIDEO_GAP + label
        left = MARGIN + col * (size + GAP)
        return sheet[top : top + size, left : left + size]

    # vid_a's first row shows frames 0, 3, 5, ..., 19; its 4th cell is frame 8 (grey 85).
    assert (cell(0, 3, 0) == 85).all()
    assert (cell(1, 7, 0) == 10 * 19 + 5).all()
    # vid_b (3 frames) starts after the video gap and shows its last frame in the third cell.
    assert (cell(2, 2, 1) == 25).all()
    # Its fourth cell is empty background, and labels put light pixels in the label strips.
    assert (cell(2, 3, 1) == BACKGROUND).all()
    label_strip = sheet[MARGIN : MARGIN + label, MARGIN : MARGIN + width]
    assert label_strip.max() > 200


def test_sheet_of_real_views_is_wide_enough_for_labels(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 60, 3), dtype=np.uint8)
    views = make_views(frames, 16, "downstream")
    path = contact_sheet([("a_rather_long_video_identifier", views)], tmp_path / "s.png", max_frames=2)
    with Image.open(path) as im:
        w, h = im.size
    assert w > 2 * 16 + GAP + 2 * MARGIN  # widened to fit the label text
    assert h == 2 * MARGIN + 12 * (14 + 16 + GAP) - GAP


@pytest.mark.parametrize(
    ("rows", "match"),
    [([], "nothing to draw"), ([("v", {})], "nothing to draw"), ([("v", {"s100_c": np.zeros((0, 8, 8, 3), np.uint8)})], "no frames"),
     ([("v", {"s100_c": np.zeros((2, 8, 8), np.uint8)})], "uint8")],
)
def test_bad_rows_raise(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        contact_sheet(rows, tmp_path / "x.png")
