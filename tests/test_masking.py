"""Block masking against Table 2, its geometry, i.i.d. masking and the replacement rules."""

from __future__ import annotations

import pytest
import torch

from models.masking import block_mask, blocks_for_ratio, copy_prediction, corrupt, induced_ratio, iid_mask, tube_mask

# Table 2: induced masking ratio (%) for 4..8 blocks, per (frames, token map size).
TABLE_2 = {
    (5, 16): [11.9, 14.5, 17.0, 19.4, 21.7],
    (5, 32): [10.6, 13.1, 15.2, 17.5, 19.5],
    (10, 16): [10.4, 12.8, 15.0, 17.1, 19.2],
    (10, 32): [9.3, 11.4, 13.4, 15.4, 17.2],
}
BOLD = {(5, 16): 5, (5, 32): 6, (10, 16): 6, (10, 32): 7}  # the counts the paper used


@pytest.mark.parametrize("t,g", list(TABLE_2))
def test_monte_carlo_mask_ratio_matches_every_cell_of_table_2(t, g):
    gen = torch.Generator().manual_seed(t * 100 + g)
    for n_blocks, paper in zip(range(4, 9), TABLE_2[(t, g)]):
        ratio = torch.cat([block_mask((500, t, g, g), n_blocks, gen).float().mean((1, 2, 3)) for _ in range(4)]).mean()
        assert abs(100 * float(ratio) - paper) < 0.5, f"{t}x{g}, {n_blocks} blocks: {100 * float(ratio):.2f}% vs {paper}%"
        assert abs(100 * induced_ratio(t, g, g, n_blocks) - paper) < 0.2


@pytest.mark.parametrize("t,g", list(BOLD))
def test_block_count_is_the_one_closest_to_15_percent(t, g):
    assert blocks_for_ratio(t, g, g) == BOLD[(t, g)]


def test_ceil_for_the_temporal_bound_would_not_reproduce_table_2():
    """Appendix B.1 says 'round up'; the floor is what matches the table (DESIGN.md)."""
    assert abs(100 * induced_ratio(5, 16, 16, 5) - 14.5) < 0.1
    # With ceil(2T/3) = 4 frames the ratio would be clearly higher than Table 2's 14.5%.
    from models import masking

    original = masking._axis_max_len
    try:
        masking._axis_max_len = lambda size, temporal: -(-2 * size // 3) if temporal else size // 2
        assert 100 * masking.induced_ratio(5, 16, 16, 5) > 15.5
    finally:
        masking._axis_max_len = original


@pytest.mark.parametrize("t,h,w", [(5, 16, 16), (10, 32, 32), (4, 8, 6), (1, 2, 2)])
def test_one_block_is_a_cuboid_within_the_length_bounds(t, h, w):
    gen = torch.Generator().manual_seed(1)
    masks = block_mask((400, t, h, w), 1, gen)
    extents = []
    for m in masks:
        idx = m.nonzero()
        lo, hi = idx.min(0).values, idx.max(0).values
        size = hi - lo + 1
        assert int(m.sum()) == int(size.prod()), "one block is a solid cuboid"
        extents.append(size)
    extents = torch.stack(extents)
    bounds = torch.tensor([max(1, 2 * t // 3), max(1, h // 2), max(1, w // 2)])
    assert bool((extents >= 1).all()) and bool((extents <= bounds).all())
    assert torch.equal(extents.max(0).values, bounds), "every length up to the bound occurs"


def test_masks_differ_per_sample_and_follow_the_generator():
    a = block_mask((8, 5, 16, 16), 5, torch.Generator().manual_seed(3))
    b = block_mask((8, 5, 16, 16), 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({m.numpy().tobytes() for m in a}) == 8


@pytest.mark.parametrize("t,h,w,n_blocks", [(5, 8, 8, 2), (5, 16, 16, 3), (10, 32, 32, 5), (3, 4, 6, 1)])
def test_tube_masks_hide_a_position_in_every_frame_or_none_at_the_exact_induced_ratio(t, h, w, n_blocks):
    gen = torch.Generator().manual_seed(t + h + n_blocks)
    masks = tube_mask((2000, t, h, w), n_blocks, gen)
    assert torch.equal(masks, masks[:, :1].expand_as(masks)), "a tube spans all frames"
    assert abs(float(masks.float().mean()) - induced_ratio(t, h, w, n_blocks, tube=True)) < 0.01
    # So the copy-paste answer has nothing to copy from: no masked token has a visible frame.
    tokens = torch.randint(0, 50, masks[:16].shape, generator=gen)
    _, has_guess = copy_prediction(tokens, masks[:16])
    assert not bool(has_guess.any())


def test_tube_block_count_is_the_one_closest_to_the_target():
    n = blocks_for_ratio(5, 8, 8, 0.15, tube=True)
    ratios = {k: induced_ratio(5, 8, 8, k, tube=True) for k in range(1, 10)}
    assert n == min(ratios, key=lambda k: abs(ratios[k] - 0.15))
    assert ratios[n] > induced_ratio(5, 8, 8, n), "the same rectangles hide more once they span every frame"


def test_iid_mask_ratio():
    m = iid_mask((200, 5, 16, 16), 0.15, torch.Generator().manual_seed(0))
    assert abs(float(m.float().mean()) - 0.15) < 0.005


def test_corrupt_predicts_masked_real_tokens_only():
    tokens = torch.randint(0, 100, (4, 5, 8, 8))
    tokens[:, 3:] = 100  # PAD = 100: frames beyond the video's end
    mask = block_mask(tokens.shape, 6, torch.Generator().manual_seed(0))
    inputs, predict = corrupt(tokens, mask, pad_id=100, mask_id=101, n_codes=100)
    assert torch.equal(predict, mask & (tokens != 100))
    assert bool((inputs[predict] == 101).all())
    assert torch.equal(inputs[~predict], tokens[~predict]), "everything else, PAD included, is untouched"


def test_bert_replacement_is_80_10_10():
    tokens = torch.randint(0, 1000, (64, 5, 16, 16))
    mask = iid_mask(tokens.shape, 0.5, torch.Generator().manual_seed(0))
    inputs, predict = corrupt(tokens, mask, pad_id=1000, mask_id=1001, n_codes=1000, replacement="bert",
                              generator=torch.Generator().manual_seed(1))
    chosen_in, chosen_orig = inputs[predict], tokens[predict]
    as_mask = float((chosen_in == 1001).float().mean())
    kept = float((chosen_in == chosen_orig).float().mean())
    assert abs(as_mask - 0.8) < 0.01
    assert abs(kept - (0.1 + 0.1 / 1000)) < 0.01  # kept on purpose, or replaced by the same code by chance
    assert bool((chosen_in < 1000).logical_or(chosen_in == 1001).all())
    assert torch.equal(inputs[~predict], tokens[~predict])


def test_copy_prediction_takes_the_nearest_visible_frame():
    # One clip of 4 frames, 1 x 2 positions; position (0, 0) changes code every frame.
    tokens = torch.tensor([[[[10, 1]], [[11, 1]], [[12, 1]], [[13, 1]]]])  # (1, 4, 1, 2)
    predict = torch.zeros_like(tokens, dtype=torch.bool)
    predict[0, 1:3, 0, 0] = True  # frames 1 and 2 of the changing position
    predict[0, :, 0, 1] = True  # every frame of the static position: nothing to copy from
    guess, found = copy_prediction(tokens, predict)
    assert guess[0, :, 0, 0].tolist() == [-1, 10, 13, -1]  # frame 1 <- frame 0; frame 2 <- frame 3
    assert not found[0, :, 0, 1].any() and (guess[0, :, 0, 1] == -1).all()
    assert found.sum() == 2


def test_copy_prediction_is_exact_on_a_static_clip_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 50, (3, 1, 6, 6), generator=g)
    tokens = frame.expand(3, 5, 6, 6).clone()  # (B, T, H, W): the same frame five times
    predict = block_mask((3, 5, 6, 6), 3, generator=g)
    guess, found = copy_prediction(tokens, predict)
    assert (guess[found] == tokens[found]).all()
    assert (found == predict & ~predict.all(1, keepdim=True)).all()
    pad = torch.zeros_like(predict)
    pad[:, 0] = True  # the first frame is padding: never a source
    tokens[:, 0] = 99
    guess, found = copy_prediction(tokens, predict & ~pad, pad)
    assert not (guess == 99).any()
