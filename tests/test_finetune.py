"""Fine-tuning and multi-view evaluation (VIMPAC App. A.2, C; Table 4): splits, the loader's
random views, checkpoint compatibility, caching, resume, re-fusion and lineage."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from finetune_fixtures import CODEBOOK, TOKENIZER, labeled_dataset
from models.backbone import PRESETS as BACKBONES
from models.classifier import ClassifierConfig, VideoClassifier
from models.pretrain import PretrainModelConfig, VIMPACPretrainer
from stages.checkpoints import atomic_save
from stages.config import ConfigError, FinetuneConfig, build, preset
from stages.evaluate.metrics import metrics_from_predictions
from stages.finetune.splits import select_split
from stages.finetune.train import ModelSource, finetune_cell, load_pretrained_backbone
from stages.pretrain.data import ClipLoader, ClipSampling
from warehouse.catalog import Catalog


def micro(*overrides: str) -> FinetuneConfig:
    return build(FinetuneConfig, preset("finetune", "micro"), list(overrides))


def pretrain_checkpoint(path, *, seed: int = 0, n_codes: int = CODEBOOK, frames: int = 4, grid: int = 4, tokenizer: str = TOKENIZER,
                        name: str = "micro-4x32-mp+cl"):
    """A finished pretrain checkpoint as the pretrain stage writes it (random weights)."""
    backbone = BACKBONES["micro"]()
    backbone.n_codes, backbone.frames, backbone.grid = n_codes, frames, grid
    cfg = PretrainModelConfig(backbone=backbone, cl_hidden=32, cl_dim=16)
    torch.manual_seed(seed)
    model = VIMPACPretrainer(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"format": "vimpac-pretrain", "kind": "final", "model": model.state_dict(), "model_config": cfg.to_dict(),
                 "metadata": {"run_key": f"pre{seed:013d}", "run_name": name, "tokenizer": tokenizer, "steps": 1,
                              "config": {"model": {"preset": "micro"}}}}, path)
    return path


@pytest.fixture
def toy(root):
    labeled_dataset(root, "toy")
    return root


def test_split_sets_and_named_splits_select_the_right_videos(root):
    info = labeled_dataset(root, "ucf", per_class=3)
    for k in (1, 2, 3):
        sel = select_split(root, "ucf", str(k), TOKENIZER)
        expected_test = {v for v, (_, _, splits) in info.items() if splits[k - 1] == "test"}
        assert {v.video_id for v in sel.eval} == expected_test
        assert len(sel.train) == len(info) - len(expected_test)
        assert sel.classes == ["Run", "Jump", "Swim"] and sel.eval_split == f"test of split set {k}"
    assert select_split(root, "ucf", "auto", TOKENIZER).split == "1"
    with pytest.raises(ConfigError, match="3 split sets; split 4 does not exist"):
        select_split(root, "ucf", "4", TOKENIZER)
    labeled_dataset(root, "named", split_names=True, first_vid=300)
    sel = select_split(root, "named", "auto", TOKENIZER)
    assert sel.split == "train:val" and {v.video_id for v in sel.eval} and len(sel.train) == 12
    with pytest.raises(ConfigError, match="no videos in split"):
        select_split(root, "named", "train:test", TOKENIZER)


@pytest.mark.parametrize("k, base", [(1, ""), (3, "@2"), (2, "@train:val")])
def test_few_shot_splits_hold_k_per_class_from_the_base_split_and_are_stable_per_seed(root, k, base):
    """HVM-1's protocol: k training videos per class, the base split's whole evaluation side."""
    named = base == "@train:val"
    labeled_dataset(root, "ucf", per_class=12, split_names=named)
    full = select_split(root, "ucf", base[1:] or "auto", TOKENIZER)
    draws = {seed: select_split(root, "ucf", f"{k}shot{base}", TOKENIZER, seed=seed) for seed in (0, 1, 2)}
    for seed, sel in draws.items():
        assert sorted(Counter(sel.train.values()).values()) == [k, k, k]
        assert set(sel.train.items()) <= set(full.train.items())
        assert [v.key for v in sel.eval] == [v.key for v in full.eval]  # evaluated on the whole evaluation side
        assert sel.split == f"{k}shot@{full.split}" and sel.base == full.split
        assert f"{k} per class (seed {seed})" in sel.train_split
        assert {s.path for s in sel.train_shards} <= {s.path for s in full.train_shards}
        assert select_split(root, "ucf", f"{k}shot{base}", TOKENIZER, seed=seed).train == sel.train  # stable per seed
    assert len({tuple(sorted(sel.train)) for sel in draws.values()}) > 1  # another seed, another draw


def test_a_few_shot_split_larger_than_a_class_keeps_all_and_says_so(root):
    labeled_dataset(root, "ucf", per_class=6)  # 4 training videos per class in split set 1
    sel = select_split(root, "ucf", "10shot@1", TOKENIZER)
    assert len(sel.train) == 12 and "3 classes have fewer than 10 training videos" in " ".join(sel.warnings)
    with pytest.raises(ConfigError, match="at least 1"):
        select_split(root, "ucf", "0shot", TOKENIZER)


def test_a_class_without_training_videos_is_a_clear_error(root):
    # Every Swim video is a test video of split set 1: no model can learn Swim from that split.
    labeled_dataset(root, "bad", video_splits=lambda vid, split, splits: ("test", ["test"] * 3) if int(vid[1:]) >= 112 else (split, splits))
    with pytest.raises(ConfigError, match=r"1 classes have evaluation videos but no training videos.*Swim"):
        select_split(root, "bad", "1", TOKENIZER)


def test_labels_outside_the_class_list_and_unlabeled_videos_are_listed_and_left_out(root):
    labeled_dataset(root, "odd", labels=lambda vid, name: {"v100": "Fly", "v101": None}.get(vid, name))
    sel = select_split(root, "odd", "1", TOKENIZER)
    assert not any(k.endswith(("v100", "v101")) for k in sel.train) and all(v.video_id not in ("v100", "v101") for v in sel.eval)
    text = " ".join(sel.warnings)
    assert "v100 (Fly)" in text and "labels outside the class list" in text and "no label" in text and "v101" in text


@pytest.mark.parametrize("flip_sensitive", [False, True])
def test_loader_draws_random_stored_views_and_only_training_videos(root, flip_sensitive):
    labeled_dataset(root, "toy", flip_sensitive=flip_sensitive)
    sel = select_split(root, "toy", "1", TOKENIZER)
    loader = ClipLoader(root, sel.train_shards, ClipSampling(n_frames=4, view=None, clips=1), batch_size=4, batches_per_epoch=30,
                        pad_id=999, seed=1, shuffle_buffer=4, labels=sel.train)
    keys, views = [], set()
    for batch in loader.epoch(0):
        assert batch["tokens"].shape == (4, 1, 4, 4, 4)
        # class_tokens: codes 8 * label .. 8 * label + 3, so the tokens show the label
        assert torch.equal(batch["tokens"][:, 0, 0].flatten(1).min(1).values // 8, batch["labels"])
        keys += batch["keys"]
        views.update(batch["views"].tolist())
    assert set(keys) <= set(sel.train) and len(set(keys)) == len(sel.train)
    assert views == set(range(6 if flip_sensitive else 12)), "every stored view is used, flipped ones only when allowed"


def test_scratch_and_pretrained_cells_train_evaluate_and_cache(toy, tmp_path):
    scratch = finetune_cell(toy, ModelSource("scratch"), "toy", "1", micro("train.epochs=10"), preset="micro")
    assert not scratch.cached and scratch.metrics["top1"] > 0.6, scratch.metrics  # 3 learnable classes
    ckpt = pretrain_checkpoint(tmp_path / "pre.pt")
    pre = finetune_cell(toy, ModelSource(str(ckpt), ckpt), "toy", "1", micro("train.epochs=10"), preset="micro")
    assert scratch.steps == 4 * pre.steps, "from scratch trains 4x as long on a small dataset"
    assert pre.pretrain_recipe == "micro-4x32-mp+cl" and scratch.pretrain_recipe == "scratch"
    assert pre.finetune_recipe.startswith("micro-4x32+") and scratch.finetune_recipe == pre.finetune_recipe
    again = finetune_cell(toy, ModelSource(str(ckpt), ckpt), "toy", "1", micro("train.epochs=10"), preset="micro")
    assert again.cached and again.metrics == pytest.approx(pre.metrics) and again.eval_id == pre.eval_id
    rows = Catalog(toy).rows("SELECT pretrain_recipe, metric, value, protocol, view_protocol, seed, n_train FROM results ORDER BY ALL")
    assert len(rows) == 6 and {r[3:] for r in rows} == {("finetune", "2x3", 0, 12)}
    forced = finetune_cell(toy, ModelSource(str(ckpt), ckpt), "toy", "1", micro("train.epochs=10"), preset="micro", force=True)
    assert not forced.cached and forced.metrics == pytest.approx(pre.metrics), "same seed, same result"
    plain = finetune_cell(toy, ModelSource(str(ckpt), ckpt), "toy", "1", micro(), preset="micro")
    assert plain.finetune_recipe == "micro-4x32", "the preset as is: no hash"


def test_stored_view_scores_refuse_to_the_stored_metrics(toy):
    result = finetune_cell(toy, ModelSource("scratch"), "toy", "1", micro("train.epochs=4", "eval.clips=3"), preset="micro")
    predictions = Catalog(toy).query("SELECT label_index, views, view_scores FROM predictions WHERE eval_id = ?", [result.eval_id])
    assert predictions.num_rows == result.n_eval == 6 and len(predictions["views"][0].as_py()) == 9  # 3 clips x 3 crops
    assert metrics_from_predictions(predictions, 3) == pytest.approx(result.metrics)
    center = metrics_from_predictions(predictions, 3, crops=["s100_c"])
    assert set(center) == {"top1", "top5", "mean_class"}


def test_flip_sensitive_datasets_are_evaluated_on_center_crops(root):
    labeled_dataset(root, "ssv2ish", flip_sensitive=True)
    result = finetune_cell(root, ModelSource("scratch"), "ssv2ish", "1", micro(), preset="micro")
    assert result.view_protocol == "2x1-center"
    views = Catalog(root).rows("SELECT views FROM predictions WHERE eval_id = ? LIMIT 1", [result.eval_id])[0][0]
    assert views == ["0/s100_c", "1/s100_c"]


def test_lineage_from_a_result_row_to_source_video_hashes(toy):
    result = finetune_cell(toy, ModelSource("scratch"), "toy", "1", micro(), preset="micro")
    evaluated = Catalog(toy).rows(
        """SELECT DISTINCT v.sha256 FROM results r JOIN predictions p USING (eval_id)
           JOIN videos v ON v.dataset = r.dataset AND v.video_id = p.video_id
           WHERE r.eval_id = ? AND r.metric = 'top1'""", [result.eval_id])
    trained = Catalog(toy).rows(
        """SELECT DISTINCT v.sha256 FROM results r, unnest(r.token_shards) AS s(shard)
           JOIN token_samples t ON t.shard = s.shard AND t.tokenizer = r.tokenizer
           JOIN videos v ON v.dataset = t.dataset AND v.video_id = t.video_id
           WHERE r.eval_id = ? AND r.metric = 'top1' AND v.splits[1] = 'train'""", [result.eval_id])
    assert len(evaluated) == 6 and len(trained) == 12
    assert {h for (h,) in evaluated} == {f"{vid:064x}" for vid in range(100, 118) if (vid - 100) % 6 % 3 == 0}


def test_vocabulary_and_tokenizer_mismatches_name_the_mismatch(toy, tmp_path):
    wrong_vocab = pretrain_checkpoint(tmp_path / "v.pt", n_codes=128)
    with pytest.raises(ConfigError, match=r"vocabulary of 128 codes but the tokens of toy .* have 64"):
        finetune_cell(toy, ModelSource("v", wrong_vocab), "toy", "1", micro())
    other_tokenizer = pretrain_checkpoint(tmp_path / "t.pt", tokenizer="models:/other/3")
    with pytest.raises(ConfigError, match=r"pretrained on tokens of models:/other/3, but dataset toy has tokens only of ckpt:a+"):
        finetune_cell(toy, ModelSource("t", other_tokenizer), "toy", "1", micro())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable checkpoint"):
        finetune_cell(toy, ModelSource("junk", tmp_path / "junk.pt"), "toy", "1", micro())


def test_positional_tables_are_interpolated_when_fine_tuning_at_more_frames(toy, tmp_path):
    ckpt = pretrain_checkpoint(tmp_path / "pre.pt", frames=2, grid=2)
    result = finetune_cell(toy, ModelSource("p", ckpt), "toy", "1", micro("data.frames=6"))
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["model"]["backbone.pos_t"].shape[0] == 6 and state["model"]["backbone.pos_h"].shape[0] == 4
    source = load_pretrained_backbone(ModelSource("p", ckpt))
    model = VideoClassifier(ClassifierConfig(source.backbone, n_classes=3))
    assert torch.count_nonzero(model.fc.weight) == 0 and torch.count_nonzero(model.fc.bias) == 0, "zero-initialised classifier"


def test_stopped_cell_resumes_to_the_uninterrupted_weights(toy, tmp_path):
    from warehouse.layout import DataRoot

    cfg = micro("train.epochs=3", "train.checkpoint_every=100")
    other = DataRoot(tmp_path / "other").ensure()
    labeled_dataset(other, "toy")
    whole = finetune_cell(other, ModelSource("scratch"), "toy", "1", cfg)
    reference = torch.load(whole.checkpoint, weights_only=True)["model"]
    part = finetune_cell(toy, ModelSource("scratch"), "toy", "1", cfg, max_steps=5)
    assert part.checkpoint.name == "last.pt" and part.steps == 5 and not part.metrics
    rest = finetune_cell(toy, ModelSource("scratch"), "toy", "1", cfg)
    resumed = torch.load(rest.checkpoint, weights_only=True)["model"]
    assert rest.steps == whole.steps and all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert rest.metrics == pytest.approx(whole.metrics)


def test_evaluation_clips_pad_videos_shorter_than_t():
    """A video shorter than T is scored on its frames followed by [PAD], never on wrapped frames
    (the uniform start positions themselves are tested with clip_starts in test_eval_metrics)."""
    from stages.finetune.evaluate import _clips

    tokens = np.arange(3)[:, None, None] * np.ones((3, 2, 2), np.int64)  # 3 frames, value = frame index
    clips = _clips(tokens, [0, 0], 5, pad_id=-1)
    assert clips.shape == (2, 5, 2, 2) and (clips[:, 3:] == -1).all() and (clips[0, :3, 0, 0] == [0, 1, 2]).all()
