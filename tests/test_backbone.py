"""The backbone: Table 3 sizes, each attention pattern's receptive field, padding, layouts,
positional interpolation."""

from __future__ import annotations

import pytest
import torch

from models import backbone as B
from models.backbone import BackboneConfig, VideoTransformer, flops_per_clip, load_state_resized
from models.pretrain import PretrainModelConfig, VIMPACPretrainer


@pytest.mark.parametrize("preset,paper_millions", [("small", 29.4), ("base", 119.7), ("large_half", 210.1)])
def test_parameter_counts_match_table_3(preset, paper_millions):
    with torch.device("meta"):  # no memory for 210M parameters
        model = VideoTransformer(B.PRESETS[preset]())
    count = model.num_params() / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.005, f"{preset}: {count:.2f}M vs Table 3 {paper_millions}M"


@pytest.mark.parametrize("layout,paper_millions", [("TxHxW", 23.1), ("T,H,W", 35.8), ("T,H|W", 29.4)])
def test_table_13_layouts_have_the_papers_sizes(layout, paper_millions):
    cfg = B.small()
    cfg.layout = layout
    with torch.device("meta"):
        count = VideoTransformer(cfg).num_params() / 1e6
    assert abs(count - paper_millions) / paper_millions < 0.005


def test_heads_are_not_backbone_parameters_and_the_decoder_is_tied():
    model = VIMPACPretrainer(PretrainModelConfig(backbone=B.micro(), cl_hidden=16, cl_dim=8))
    assert model.token_head.embedding is model.backbone.embedding
    d, v = model.config.backbone.dim, model.config.backbone.n_codes
    token_head = d * d + d + 2 * d + v  # dense, LayerNorm, output bias; decoder weight is the embedding
    cl_head = d * 16 + 16 + 2 * 16 + 16 * 8
    assert model.head_params() == token_head + cl_head


def _block_grad(cfg: BackboneConfig, patterns: list[str], query: tuple[int, int, int], zero_heads: slice | None = None):
    torch.manual_seed(0)
    block = B.MultiPatternAttention(cfg, patterns).eval()
    if zero_heads is not None:  # silence some heads' share of the output projection
        with torch.no_grad():
            block.proj.weight[:, zero_heads] = 0
    x = torch.randn(1, 3, 4, 5, cfg.dim, requires_grad=True)  # (B, T, H, W, D): distinct sizes per axis
    cls = torch.randn(1, cfg.dim, requires_grad=True)
    out, _ = block(x, cls, None)
    # A random readout: a plain sum of a LayerNorm output is constant and has no gradient.
    (out[(0, *query)] @ torch.randn(cfg.dim)).backward()
    touched = x.grad[0].abs().sum(-1) > 0  # (T, H, W)
    return touched, cls.grad.abs().sum() > 0


def _expected(query, same_axes):
    t, h, w = query
    grid = torch.zeros(3, 4, 5, dtype=torch.bool)
    idx = [slice(None)] * 3
    for axis, value in zip("THW", (t, h, w)):
        if axis in same_axes:
            idx["THW".index(axis)] = value
    grid[tuple(idx)] = True
    return grid


@pytest.mark.parametrize("query", [(0, 0, 0), (1, 2, 3), (2, 3, 4)])
def test_each_attention_pattern_sees_exactly_its_row_and_cls(query):
    cfg = B.micro()
    cfg.dropout = 0.0
    # Temporal block: same (h, w).
    touched, via_cls = _block_grad(cfg, ["T"], query)
    assert torch.equal(touched, _expected(query, "HW")) and via_cls
    half = cfg.attn_dim // 2
    # The spatial block with the width heads silenced: height attention, same (t, w).
    touched, via_cls = _block_grad(cfg, ["H", "W"], query, zero_heads=slice(half, None))
    assert torch.equal(touched, _expected(query, "TW")) and via_cls
    # ... and with the height heads silenced: width attention, same (t, h).
    touched, via_cls = _block_grad(cfg, ["H", "W"], query, zero_heads=slice(0, half))
    assert torch.equal(touched, _expected(query, "TH")) and via_cls
    # Both halves together: the union, nothing else.
    touched, _ = _block_grad(cfg, ["H", "W"], query)
    assert torch.equal(touched, _expected(query, "TW") | _expected(query, "TH"))
    # Full attention sees everything.
    touched, _ = _block_grad(cfg, ["TxHxW"], query)
    assert touched.all()


@pytest.mark.parametrize("layout", ["T,H|W", "TxHxW", "T,HxW", "T,H,W"])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padded_positions_never_change_unpadded_outputs(layout, norm):
    cfg = B.micro()
    cfg.layout, cfg.norm = layout, norm
    torch.manual_seed(0)
    model = VideoTransformer(cfg).eval()
    tokens = torch.randint(0, cfg.n_codes, (3, cfg.frames, cfg.grid, cfg.grid))
    valid = torch.tensor([cfg.frames, 2, 1])  # frames per clip; the rest is padding
    pad = torch.arange(cfg.frames)[None, :, None, None] >= valid[:, None, None, None]
    pad = pad.expand_as(tokens)
    padded = tokens.masked_fill(pad, cfg.pad_id)
    other = torch.where(pad, torch.randint(0, cfg.n_codes, tokens.shape), tokens)  # garbage where padded
    with torch.no_grad():
        cls_a, x_a = model(padded)
        cls_b, x_b = model(other, pad_mask=pad)
    keep = ~pad
    assert torch.allclose(x_a[keep], x_b[keep], atol=1e-5)
    assert torch.allclose(cls_a, cls_b, atol=1e-5)
    assert torch.isfinite(x_a).all()


def test_factorized_and_full_attention_agree_when_only_one_axis_is_long():
    """With H = W = 1, temporal attention is full attention: same weights, same output."""
    torch.manual_seed(0)
    full_cfg, temporal_cfg = B.micro(), B.micro()
    full_cfg.layout, temporal_cfg.layout = "TxHxW", "T"
    full, temporal = VideoTransformer(full_cfg).eval(), VideoTransformer(temporal_cfg).eval()
    temporal.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 32, (2, 4, 1, 1))
    with torch.no_grad():
        a, b = full(tokens), temporal(tokens)
    assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)


def test_positional_interpolation_keeps_a_constant_table_and_changes_shape():
    cfg = B.micro()
    model = VideoTransformer(cfg)
    with torch.no_grad():
        model.pos_t.fill_(0.5)
        model.pos_h.copy_(torch.linspace(0, 1, cfg.grid)[:, None].expand(-1, cfg.dim))
    model.resize_positions(frames=8, grid=8)
    assert model.pos_t.shape == (8, cfg.dim) and model.pos_h.shape == (8, cfg.dim) and model.pos_w.shape == (8, cfg.dim)
    assert torch.allclose(model.pos_t, torch.full_like(model.pos_t, 0.5))
    assert bool((model.pos_h[1:, 0] >= model.pos_h[:-1, 0]).all()), "a ramp stays monotone"
    cls, x = model(torch.randint(0, 32, (1, 8, 8, 8)))
    assert x.shape == (1, 8, 8, 8, cfg.dim)


def test_a_checkpoint_loads_into_a_model_of_another_resolution():
    small_cfg = B.micro()
    src = VideoTransformer(small_cfg)
    big_cfg = B.micro()
    big_cfg.frames, big_cfg.grid = 8, 8
    dst = VideoTransformer(big_cfg)
    load_state_resized(dst, src.state_dict())
    assert dst.pos_t.shape[0] == 8 and torch.equal(dst.embedding.weight, src.embedding.weight)
    wrong = B.micro()
    wrong.dim = 48
    wrong.head_dim = 12
    with pytest.raises(ValueError, match="does not match"):
        load_state_resized(VideoTransformer(wrong), src.state_dict())


def test_inputs_beyond_the_positional_tables_are_refused():
    model = VideoTransformer(B.micro())
    with pytest.raises(ValueError, match="interpolate"):
        model(torch.zeros(1, 9, 4, 4, dtype=torch.long))


def test_bad_layouts_are_named():
    with pytest.raises(ValueError, match="bad attention pattern"):
        BackboneConfig(layout="T,Q")
    with pytest.raises(ValueError, match="heads"):
        BackboneConfig(layout="T,H|W|T", n_heads=8)


def test_flops_count_grows_with_the_input_as_attention_predicts():
    cfg = B.small()
    f128, f256 = flops_per_clip(cfg, 5, 16, 16), flops_per_clip(cfg, 5, 32, 32)
    # Linear layers scale with tokens (4x); 1-D attention rows grow with sqrt(tokens) on top.
    assert 4.0 < f256 / f128 < 4.5
    assert flops_per_clip(cfg, 5, 16, 16) > 2 * 25e6 * 5 * 16 * 16  # at least 2 x non-embedding params x tokens
