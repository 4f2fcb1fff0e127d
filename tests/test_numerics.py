"""Numerical and semantic details of pretraining (issue 15, section 3): per-clip [CLS] dropout,
fp32 losses under bf16 autocast, d_max = 0 (Table 10) and contrastive learning on unmasked
clips (Table 12)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from models import backbone as B
from models.backbone import VideoTransformer
from models.losses import info_nce
from models.pretrain import PretrainModelConfig, VIMPACPretrainer, default_cl_input
from stages.config import ConfigError, PretrainConfig, build, preset
from stages.pretrain.data import ClipSampling, sample_clip_starts
from stages.pretrain.train import model_config, pretrain, run_name
from test_losses import masked_batch
from test_pretrain_data import write_shard
from warehouse.catalog import Catalog


def _clips(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) -> (2B, ...): all first clips, then all second clips, as the pretrainer orders them."""
    return x.transpose(0, 1).reshape(2 * x.shape[0], *x.shape[2:])


# ---------------------------------------------------------------- [CLS] dropout


def test_cls_dropout_masks_differ_between_clips_in_training_only():
    """Without layers the backbone returns the embedded [CLS] itself, so its dropout is all that
    can tell identical clips apart: one mask per clip, not one shared by the batch."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(B.micro(), n_layers=0, dropout=0.5)
    model = VideoTransformer(cfg)
    tokens = torch.randint(0, cfg.n_codes, (1, cfg.frames, cfg.grid, cfg.grid)).expand(6, -1, -1, -1)  # 6 identical clips

    cls, _ = model.train()(tokens)  # (6, D)
    dropped = cls == 0
    assert dropped.any(dim=1).all(), "p = 0.5 over 32 dimensions drops some in every clip"
    assert not (dropped == dropped[0]).all(), "every clip of the batch got the same [CLS] dropout mask"
    assert not torch.equal(cls[0], cls[1])

    with torch.no_grad():
        cls_eval, _ = model.eval()(tokens)
        expected = model.embed_norm(model.cls + model.pos_cls)
    assert torch.equal(cls_eval, expected.expand(6, -1)), "eval mode: no dropout, every clip the same [CLS]"


# ---------------------------------------------------------------- fp32 losses under bf16 autocast


def _fixed_backbone(model: VIMPACPretrainer, monkeypatch, cls: torch.Tensor, hidden: torch.Tensor) -> None:
    """Make the backbone return fixed fp32 outputs, so only the heads and losses see autocast."""
    monkeypatch.setattr(model.backbone, "forward", lambda tokens, pad_mask=None: (cls, hidden))


def test_losses_under_bf16_autocast_equal_the_fp32_losses(monkeypatch):
    """The token logits and the contrastive similarities are computed with autocast off, so on
    the same fp32 backbone outputs the losses do not move under bf16 autocast. Weights are drawn
    large (logits of a few units, as in a trained model): bf16 logits would be off by ~1e-2."""
    torch.manual_seed(0)
    backbone = dataclasses.replace(B.micro(), init_std=0.5)
    model = VIMPACPretrainer(PretrainModelConfig(backbone=backbone, cl_hidden=64, cl_dim=16))
    inputs, targets, predict = masked_batch(backbone, 8, 0)
    gen = torch.Generator().manual_seed(1)
    cls = torch.randn(16, backbone.dim, generator=gen)  # (2B, D)
    hidden = torch.randn(16, backbone.frames, backbone.grid, backbone.grid, backbone.dim, generator=gen)  # (2B, T, H, W, D)
    _fixed_backbone(model, monkeypatch, cls, hidden)

    reference = model(inputs, targets, predict)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(inputs, targets, predict)
    n = float(reference["n_predicted"])
    assert float(reference["mask_ce_sum"]) / n > 1.0, "logits of a few units: a loss bf16 rounding would move"
    assert abs(float(mixed["mask_ce_sum"]) - float(reference["mask_ce_sum"])) / n < 1e-4
    assert abs(float(mixed["cl_loss"]) - float(reference["cl_loss"])) < 1e-4
    assert abs(float(mixed["loss"].detach()) - float(reference["loss"].detach())) < 1e-4
    assert mixed["loss"].dtype == torch.float32


def test_info_nce_is_fp32_for_any_caller_under_autocast():
    """The similarity matmul turns autocast off itself, so a caller outside the model (bench/)
    gets the fp32 loss too; a bf16 matmul of the same features moves it by more than 1e-4."""
    torch.manual_seed(0)
    f, f2 = torch.randn(16, 16), torch.randn(16, 16)
    exact, _ = info_nce(f, f2, 0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = info_nce(f, f2, 0.2)
        n, n2 = torch.nn.functional.normalize(f, dim=-1), torch.nn.functional.normalize(f2, dim=-1)
        rounded_similarities = n @ n2.t()
    assert abs(float(inside) - float(exact)) < 1e-5
    assert rounded_similarities.dtype == torch.bfloat16
    assert (rounded_similarities.float() - n @ n2.t()).abs().max() > 1e-3


# ---------------------------------------------------------------- d_max = 0 (Table 10)


def test_max_distance_zero_is_accepted_and_samples_the_same_clip_twice():
    cfg = build(PretrainConfig, {"data": {"max_distance_s": 0}})
    assert cfg.data.max_distance_s == 0
    with pytest.raises(ConfigError):
        build(PretrainConfig, {"data": {"max_distance_s": -1}})
    sampling = ClipSampling(n_frames=cfg.data.frames, max_distance_s=cfg.data.max_distance_s, view=cfg.data.view)
    starts = sample_clip_starts(np.full(500, 80), np.full(500, 2.0), sampling, np.random.default_rng(0))
    assert (starts[:, 0] == starts[:, 1]).all()
    assert len(np.unique(starts[:, 0])) > 10, "the pair's start is still uniform over the video"


# ---------------------------------------------------------------- CL on masked or unmasked clips (Table 12)


def test_cl_input_defaults_follow_the_paper_and_old_checkpoints_load():
    assert PretrainModelConfig().cl_input == "masked"
    assert PretrainModelConfig(objective="cl").cl_input == "unmasked"
    old = PretrainModelConfig(backbone=B.micro(), objective="cl").to_dict()
    del old["cl_input"]  # a checkpoint written before the field existed
    assert PretrainModelConfig.from_dict(old).cl_input == "unmasked"
    old["objective"] = "mp+cl"
    assert PretrainModelConfig.from_dict(old).cl_input == "masked"
    with pytest.raises(ValueError, match="cl_input"):
        PretrainModelConfig(cl_input="both")


@pytest.mark.parametrize("objective,cl_input,masks", [
    ("mp+cl", None, True), ("mp+cl", "unmasked", True), ("cl", None, False), ("cl", "masked", True), ("mp", None, True),
])
def test_the_trainer_masks_the_inputs_when_a_head_needs_them_masked(objective, cl_input, masks):
    cfg = build(PretrainConfig, {"model": {"preset": "micro", "objective": objective, "cl_input": cl_input}})
    mcfg = model_config(cfg, 32, 4)
    assert mcfg.masks_inputs is masks
    # Every explicit cl_input here differs from its objective's default: the run name says so.
    assert (f"-cl{cl_input}" in run_name(cfg, 32)) is (cl_input is not None)


def _by_hand(model: VIMPACPretrainer, tokens: torch.Tensor, video_index: torch.Tensor) -> torch.Tensor:
    cls, _ = model.backbone(_clips(tokens))  # (2B, D)
    feats = model.contrastive_head(cls)  # (2B, E)
    return info_nce(feats[:8], feats[8:], model.config.temperature, video_index)[0]


@pytest.mark.parametrize("cl_input", ["masked", "unmasked"])
def test_contrastive_loss_comes_from_the_clips_cl_input_names(cl_input):
    """unmasked: a second forward on the intact clips feeds the contrastive head, while the mask
    loss still comes from the masked forward (Table 12); masked: one shared forward (Sec. 3.3)."""
    torch.manual_seed(0)
    backbone = B.micro()  # no dropout: two forwards of the same clips agree
    model = VIMPACPretrainer(PretrainModelConfig(backbone=backbone, cl_hidden=64, cl_dim=16, cl_input=cl_input))
    inputs, targets, predict = masked_batch(backbone, 8, 0)
    videos = torch.arange(8)
    out = model(inputs, targets, predict, videos)
    with torch.no_grad():
        masked, unmasked = _by_hand(model, inputs, videos), _by_hand(model, targets, videos)
        _, hidden = model.backbone(_clips(inputs))
        where = _clips(predict)
        mask_ce = torch.nn.functional.cross_entropy(model.token_head(hidden[where]), _clips(targets)[where], reduction="sum")
    assert abs(float(masked) - float(unmasked)) > 1e-3, "the test tells the two inputs apart"
    assert torch.allclose(out["cl_loss"], unmasked if cl_input == "unmasked" else masked, atol=1e-5)
    assert torch.allclose(out["mask_ce_sum"], mask_ce, atol=1e-4), "mask-then-predict keeps the masked forward"


def test_unmasked_cl_gradient_is_the_sum_of_the_two_forwards_gradients():
    """L = L_mask(masked forward) + alpha * gamma * L_cl(intact forward), eq. (6) with Table 12's
    unmasked contrastive input: the backbone's gradient is the sum of both forwards' gradients."""
    torch.manual_seed(0)
    backbone = B.micro()
    model = VIMPACPretrainer(PretrainModelConfig(backbone=backbone, cl_hidden=64, cl_dim=16, cl_input="unmasked"))
    inputs, targets, predict = masked_batch(backbone, 8, 1)
    videos = torch.arange(8)
    model(inputs, targets, predict, videos)["loss"].backward()
    combined = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad()
    _, hidden = model.backbone(_clips(inputs))
    where = _clips(predict)
    mask_loss = torch.nn.functional.cross_entropy(model.token_head(hidden[where]), _clips(targets)[where])
    cl_loss = _by_hand(model, targets, videos)
    (mask_loss + model.config.alpha * model.config.temperature * cl_loss).backward()
    for k, p in model.named_parameters():
        assert torch.allclose(combined[k], p.grad, atol=1e-6, rtol=1e-4), k


def test_contrastive_only_on_masked_clips_uses_the_inputs_it_is_given():
    """Table 12's second row (CL alone, CL-Mask): no token head, the contrastive head sees the masked inputs."""
    torch.manual_seed(0)
    backbone = B.micro()
    model = VIMPACPretrainer(PretrainModelConfig(backbone=backbone, objective="cl", cl_hidden=64, cl_dim=16, cl_input="masked"))
    inputs, targets, predict = masked_batch(backbone, 8, 2)
    out = model(inputs, targets, predict, torch.arange(8))
    with torch.no_grad():
        expected = _by_hand(model, inputs, torch.arange(8))
    assert "mask_ce_sum" not in out
    assert torch.allclose(out["cl_loss"], expected, atol=1e-5)


def test_the_trainer_runs_table_12s_rows(root, monkeypatch):
    """Both non-default rows train end to end, and the clips reach the model masked or not as
    cl_input says (contrastive alone on masked clips: the loader masks though no token head exists)."""
    Catalog(root).ensure_tables()
    write_shard(root, "pre", 0, list(range(8)), codebook=64,
                make_tokens=lambda vid, n, views: np.random.default_rng(vid).integers(0, 64, (views, n, 4, 4)).astype(np.uint16))
    seen: list[bool] = []
    forward = VIMPACPretrainer.forward

    def spy(self, inputs, targets=None, *args, **kwargs):
        seen.append(bool((inputs != targets).any()))
        return forward(self, inputs, targets, *args, **kwargs)

    monkeypatch.setattr(VIMPACPretrainer, "forward", spy)
    for objective, cl_input, masked in (("mp+cl", "unmasked", True), ("cl", "masked", True), ("cl", None, False)):
        seen.clear()
        sets = ["train.epochs=1", f"model.objective={objective}"] + ([f"model.cl_input={cl_input}"] if cl_input else [])
        result = pretrain(root, ["pre"], build(PretrainConfig, preset("pretrain", "micro"), sets))
        assert np.isfinite(result.metrics["loss"]) and np.isfinite(result.metrics["eval_cl_loss"])
        assert seen and all(s is masked for s in seen), (objective, cl_input)
        assert result.model_config["cl_input"] == (cl_input or default_cl_input(objective))
        assert ("-cl" + str(cl_input) in result.run_name) is (cl_input is not None)
