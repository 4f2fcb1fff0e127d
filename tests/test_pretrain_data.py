"""The pretraining loader: two clips per video from token shards, deterministic, resumable,
equal batch counts per rank, bad shards reported and skipped (VIMPAC Sec. 3.2, App. C.1)."""

from __future__ import annotations

import functools
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from stages.pretrain.data import (
    ClipLoader,
    ClipSampling,
    TokenShard,
    batch_generator,
    sample_clip_starts,
    token_shards,
    video_index,
)
from warehouse.catalog import Catalog
from warehouse.shards import ShardWriter, commit_shard
from warehouse.tables import now

T = 5
GRID = (4, 4)
PAD = 1027
TOKENIZER = "ckpt:aaaaaaaaaaaaaaaa"
DOWN_VIEWS = ["s100_tl", "s100_c", "s100_br"]


def length(vid: int) -> int:
    """Frames of test video `vid`: a few shorter than T (3, 4) and one exactly T."""
    return [3, 5, 9, 14, 20][vid % 5] + vid // 5


def encode(vid: int, n: int, n_views: int) -> np.ndarray:
    """Token value = vid * 1000 + view * 100 + frame, constant over the grid."""
    values = vid * 1000 + np.arange(n_views)[:, None] * 100 + np.arange(n)[None, :]
    return np.broadcast_to(values[:, :, None, None], (n_views, n, *GRID)).astype(np.uint16)


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_shard(root, dataset: str, number: int, vids: list[int], *, views=("s100_c",), variant="pretrain", tokenizer=TOKENIZER,
                grid=GRID, codebook=1024, fps=2.0, size=32, commit=True, make_tokens=None) -> str:
    out_dir = f"shards/tokens/{dataset}/{variant}-{size}--tok-{tokenizer[-4:]}"
    rel = f"{out_dir}/{number:05d}.tar"
    writer = ShardWriter(root.home / rel)
    rows = []
    unit = f"{dataset}-{variant}-{tokenizer[-4:]}-{size}-{number}"
    for vid in vids:
        tokens = encode(vid, length(vid), len(views))
        if grid != GRID:
            tokens = np.zeros((len(views), length(vid), *grid), np.uint16)
        if make_tokens is not None:  # (views, frames, h, w) codes of the caller's choosing
            tokens = make_tokens(vid, length(vid), len(views))
        meta = {"video_id": f"v{vid:03d}", "dataset": dataset, "views": list(views), "fps": fps, "size": size,
                "n_frames": length(vid), "grid": list(grid), "tokenizer": tokenizer, "codebook_size": codebook}
        writer.add(f"v{vid:03d}", {"tokens.npy": npy(tokens), "json": json.dumps(meta).encode()})
        rows.append({"dataset": dataset, "video_id": meta["video_id"], "shard": rel, "tokenizer": tokenizer, "variant": variant,
                     "n_frames": length(vid), "grid_h": grid[0], "grid_w": grid[1], "n_views": len(views), "views": list(views),
                     "fps": fps, "size": size, "codebook_size": codebook, "key": f"v{vid:03d}", "status": "ok", "unit": unit,
                     "created_at": now()})
    if not commit:
        writer.close_tar()
        return rel
    marker = {"stage": "tokenize", "dataset": dataset, "unit": unit, "path": rel, "n_samples": len(rows), "n_failed": 0,
              "bytes": 0, "created_at": now()}
    commit_shard(writer, "token_samples", rows, {"count": len(rows)}, marker, root.table_dir("shards", "tokenize", f"{unit}.parquet"))
    return rel


@pytest.fixture
def corpus(root):
    """Two pretrain-variant shards of "pre" and one downstream-variant shard of "down" (s100_c second)."""
    Catalog(root).ensure_tables()
    write_shard(root, "pre", 0, [0, 1, 2, 3, 4])
    write_shard(root, "pre", 1, [5, 6, 7, 8, 9])
    write_shard(root, "down", 0, [10, 11, 12, 13, 14], views=DOWN_VIEWS, variant="downstream")
    return token_shards(root, ["pre", "down"])


def make_loader(root, shards, **kw) -> ClipLoader:
    args = {"batch_size": 3, "batches_per_epoch": 7, "pad_id": PAD, "seed": 3, "shuffle_buffer": 4}
    sampling = kw.pop("sampling", ClipSampling(n_frames=T))
    args.update(kw)
    return ClipLoader(root, shards, sampling, **args)


def clip_starts(batch) -> list[tuple[int, int, int]]:
    """Check a batch against the known token contents; return (vid, start1, start2) per video."""
    tokens, n_valid, keys = batch["tokens"], batch["n_valid"], batch["keys"]
    b = len(keys)
    assert tokens.shape == (b, 2, T, *GRID) and tokens.dtype == torch.int64
    assert n_valid.shape == (b, 2) and n_valid.dtype == torch.int64
    assert batch["video_index"].shape == (b,) and batch["video_index"].dtype == torch.int64
    out = []
    for i, key in enumerate(keys):
        dataset, name = key.split("/")
        vid, n = int(name[1:]), length(int(name[1:]))
        m = min(n, T)
        assert n_valid[i].tolist() == [m, m]
        assert int(batch["video_index"][i]) == video_index(key) and 0 <= video_index(key) < 2**63
        starts = []
        for c in range(2):
            clip = tokens[i, c]
            assert (clip == clip[:, :1, :1]).all(), "a frame is one token map, copied whole"
            values = clip[:m, 0, 0]
            assert (values // 1000 == vid).all(), "tokens come from the video named by the key"
            view = (values % 1000) // 100
            assert (view == (DOWN_VIEWS.index("s100_c") if dataset == "down" else 0)).all(), "the pretrain view only"
            frames = values % 100
            assert torch.equal(frames, frames[0] + torch.arange(m)), "a clip is contiguous frames"
            assert 0 <= int(frames[0]) and int(frames[-1]) < n
            assert (clip[m:] == PAD).all(), "frames past the video's end are PAD"
            starts.append(int(frames[0]))
        out.append((vid, *starts))
    return out


def same_batches(a: list[dict], b: list[dict]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.keys() != y.keys():
            return False
        for k in x.keys() - {"pid"}:  # which process made a batch is not part of its content
            if isinstance(x[k], torch.Tensor):
                if not torch.equal(x[k], y[k]):
                    return False
            elif x[k] != y[k]:
                return False
    return True


def record_draws(batch: dict, generator: torch.Generator, n: int) -> dict:
    batch["draws"] = torch.randint(0, 2**62, (n,), generator=generator)
    batch["pid"] = os.getpid()
    return batch


def test_token_shards_from_catalog(root, corpus):
    assert [(s.dataset, s.path.rsplit("/", 1)[-1]) for s in corpus] == [("down", "00000.tar"), ("pre", "00000.tar"), ("pre", "00001.tar")]
    for s in corpus:
        assert s.n_samples == 5 and s.grid == GRID and s.fps == 2.0 and s.codebook_size == 1024 and s.tokenizer == TOKENIZER
        assert root.absolute(s.path).exists()
    assert [s.dataset for s in token_shards(root, ["pre"])] == ["pre", "pre"]


def test_token_shards_errors_are_clear(root, corpus):
    with pytest.raises(ValueError, match="nope"):
        token_shards(root, ["pre", "nope"])
    with pytest.raises(ValueError, match="tokenizer='ckpt:zzzz'.*pre"):
        token_shards(root, ["pre"], tokenizer="ckpt:zzzz")
    write_shard(root, "pre", 0, [0, 1], tokenizer="ckpt:bbbbbbbbbbbbbbbb")
    with pytest.raises(ValueError, match="several tokenizers.*ckpt:aaaaaaaaaaaaaaaa.*ckpt:bbbbbbbbbbbbbbbb"):
        token_shards(root, ["pre", "down"])
    assert len(token_shards(root, ["pre", "down"], tokenizer=TOKENIZER)) == 3
    write_shard(root, "pre", 0, [0, 1], variant="downstream", views=DOWN_VIEWS)
    with pytest.raises(ValueError, match="pre has token shards of several frame settings.*variant="):
        token_shards(root, ["pre"], tokenizer=TOKENIZER)
    assert len(token_shards(root, ["pre"], tokenizer=TOKENIZER, variant="pretrain")) == 2
    write_shard(root, "big", 0, [0, 1], grid=(8, 8), codebook=8192)
    with pytest.raises(ValueError, match="grid 4x4, 1024 codes.*grid 8x8, 8192 codes"):
        token_shards(root, ["down", "big"])
    with pytest.raises(ValueError, match="no datasets"):
        token_shards(root, [])


def test_batches_hold_two_clips_of_one_video(root, corpus):
    loader = make_loader(root, corpus, batches_per_epoch=12)
    batches = list(loader.epoch(0))
    assert len(batches) == 12
    seen = {}
    for batch in batches:
        assert batch["errors"] == []
        for vid, s1, s2 in clip_starts(batch):
            seen.setdefault(vid, []).append((s1, s2))
    assert set(seen) == set(range(15)), "every video of every shard is drawn"
    for vid, pairs in seen.items():
        last = max(length(vid) - T, 0)
        assert all(0 <= s <= last for pair in pairs for s in pair)
    assert any(s1 != s2 for pairs in seen.values() for s1, s2 in pairs), "the two clips are drawn independently"


def test_max_distance_bounds_second_clip():
    rng = np.random.default_rng(0)
    n = np.full(4000, 60)
    fps = np.full(4000, 2.0)
    free = sample_clip_starts(n, fps, ClipSampling(n_frames=T), rng)
    assert free.min() == 0 and free.max() == 60 - T
    assert np.abs(free[:, 1] - free[:, 0]).max() > 30
    near = sample_clip_starts(n, fps, ClipSampling(n_frames=T, max_distance_s=3.0), rng)
    assert np.abs(near[:, 1] - near[:, 0]).max() == 6 and near.min() == 0 and near.max() == 60 - T
    half = sample_clip_starts(n, fps, ClipSampling(n_frames=T, max_distance_s=1.25), rng)
    assert np.abs(half[:, 1] - half[:, 0]).max() == 2, "round(1.25 s * 2 fps) = 2 frames"
    same = sample_clip_starts(n, fps, ClipSampling(n_frames=T, max_distance_s=0.0), rng)
    assert (same[:, 0] == same[:, 1]).all()
    short = sample_clip_starts(np.array([1, 3, T]), np.full(3, 2.0), ClipSampling(n_frames=T), rng)
    assert (short == 0).all()


def test_max_distance_in_loader(root, corpus):
    def distances(sampling):
        loader = make_loader(root, corpus, sampling=sampling, batches_per_epoch=30)
        return [abs(s2 - s1) for batch in loader.epoch(0) for _, s1, s2 in clip_starts(batch)]

    assert max(distances(ClipSampling(n_frames=T, max_distance_s=1.0))) == 2
    assert max(distances(ClipSampling(n_frames=T))) > 2


def test_deterministic_and_varies_with_epoch_and_rank(root, corpus):
    loader = make_loader(root, corpus)
    first = list(loader.epoch(0))
    assert same_batches(first, list(loader.epoch(0)))
    assert same_batches(first, list(make_loader(root, corpus).epoch(0)))
    assert not same_batches(first, list(loader.epoch(1)))
    assert not same_batches(first, list(make_loader(root, corpus, seed=4).epoch(0)))
    rank0 = list(make_loader(root, corpus, world_size=2, rank=0).epoch(0))
    rank1 = list(make_loader(root, corpus, world_size=2, rank=1).epoch(0))
    assert [b["keys"] for b in rank0] != [b["keys"] for b in rank1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(root, corpus, num_workers):
    loader = make_loader(root, corpus, num_workers=num_workers, transform=functools.partial(record_draws, n=2))
    full = list(loader.epoch(2))
    assert len(full) == 7
    for k in (1, 2, 3):
        resumed = list(loader.epoch(2, skip_batches=k))
        assert len(resumed) == 7 - k and same_batches(full[k:], resumed), f"resume at {k}"
    assert list(loader.epoch(2, skip_batches=7)) == []
    with pytest.raises(ValueError, match="skip_batches"):
        loader.epoch(2, skip_batches=8)


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (2, 2), (3, 1)])
def test_every_rank_yields_exactly_batches_per_epoch(root, corpus, world_size, num_workers):
    # (2, 0): 2 slots, 3 shards, one rank owns 2 shards and the other 1; (2, 2) and (3, 1):
    # more slots than shards, each slot draws shards with replacement.
    keys = []
    for rank in range(world_size):
        loader = make_loader(root, corpus, world_size=world_size, rank=rank, num_workers=num_workers, batches_per_epoch=9)
        batches = list(loader.epoch(0))
        assert len(batches) == 9
        for batch in batches:
            clip_starts(batch)
        keys.append([b["keys"] for b in batches])
    assert all(keys[r] != keys[0] for r in range(1, world_size)), "ranks see different streams"


def test_transform_runs_in_worker_with_generator_of_seed_epoch_rank_batch(root, corpus):
    transform = functools.partial(record_draws, n=4)
    in_process = list(make_loader(root, corpus, num_workers=0, rank=1, world_size=2, transform=transform).epoch(5))
    workers = list(make_loader(root, corpus, num_workers=2, rank=1, world_size=2, transform=transform).epoch(5))
    for b, (x, y) in enumerate(zip(in_process, workers, strict=True)):
        expected = torch.randint(0, 2**62, (4,), generator=batch_generator(3, 5, 1, b))
        assert torch.equal(x["draws"], expected) and torch.equal(y["draws"], expected)
    assert {x["pid"] for x in in_process} == {os.getpid()}
    assert os.getpid() not in {y["pid"] for y in workers} and len({y["pid"] for y in workers}) == 2
    assert len({tuple(x["draws"].tolist()) for x in in_process}) == len(in_process)


def test_damaged_and_missing_shards_are_reported_and_skipped(root, corpus):
    damaged = root.absolute(corpus[1].path)
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2])
    missing = root.absolute(corpus[2].path)
    missing.unlink()
    batches = list(make_loader(root, corpus, batches_per_epoch=10).epoch(0))
    assert len(batches) == 10
    errors = [e for b in batches for e in b["errors"]]
    assert any(str(damaged) in e for e in errors)
    assert any(str(missing) in e and "No such file" in e for e in errors)
    vids = {vid for b in batches for vid, _, _ in clip_starts(b)}
    assert set(range(10, 15)) <= vids, "the intact shard still feeds batches"
    assert vids <= set(range(10, 15)) | {0, 1, 2, 3, 4}, "only samples before the damage come from the damaged shard"


def test_shard_cut_at_a_member_boundary_is_reported(root, corpus):
    path = root.absolute(corpus[0].path)
    with tarfile.open(path) as tar:
        third = [m for m in tar.getmembers()][4]  # two members per sample: cut before sample 3
    path.write_bytes(path.read_bytes()[: third.offset])
    batches = list(make_loader(root, corpus, batches_per_epoch=4).epoch(0))
    assert any(f"{path}: only 2 of 5 samples readable" in e for b in batches for e in b["errors"])


def test_bad_samples_are_skipped_with_their_key(root):
    rel = "shards/tokens/odd/x/00000.tar"
    writer = ShardWriter(root.home / rel)
    good = {"views": ["s100_c"], "fps": 2.0}
    writer.add("v000", {"tokens.npy": npy(encode(0, 9, 1)), "json": json.dumps(good).encode()})
    writer.add("v001", {"tokens.npy": npy(encode(1, 9, 1)), "json": json.dumps({"views": ["s100_tl"], "fps": 2.0}).encode()})
    writer.add("v002", {"json": json.dumps(good).encode()})
    writer.add("v003", {"tokens.npy": npy(np.zeros((1, 0, *GRID), np.uint16)), "json": json.dumps(good).encode()})
    writer.add("v004", {"tokens.npy": npy(encode(4, 9, 1))[:-10], "json": json.dumps(good).encode()})
    writer.add("v005", {"tokens.npy": npy(np.zeros((1, 9, 8, 8), np.uint16)), "json": json.dumps(good).encode()})
    writer.add("v006", {"tokens.npy": b"garbage", "json": json.dumps(good).encode()})
    writer.close_tar()
    shard = TokenShard("odd", rel, TOKENIZER, 7, GRID, 2.0, 1024)
    batches = list(make_loader(root, [shard], batch_size=2, batches_per_epoch=2, shuffle_buffer=1).epoch(0))
    assert [b["keys"] for b in batches] == [["odd/v000", "odd/v000"], ["odd/v000", "odd/v000"]]
    errors = batches[0]["errors"]
    path = root.absolute(rel)
    for key, why in [("v001", "no view 's100_c'"), ("v002", "missing tokens.npy"), ("v003", "no frames"),
                     ("v004", "truncated"), ("v005", "grid (8, 8)"), ("v006", "unreadable tokens.npy")]:
        assert any(e.startswith(f"token shard {path}: sample {key}: ") and why in e for e in errors), (key, errors)


def test_everything_broken_raises_naming_the_shards(root, corpus):
    for s in corpus:
        root.absolute(s.path).write_bytes(b"\0not a tar" * 100)
    for workers in (0, 2):
        with pytest.raises(ValueError, match="no usable sample in any of the 3 token shards") as info:
            list(make_loader(root, corpus, num_workers=workers).epoch(0))
        assert all(s.path in str(info.value) for s in corpus)


def test_loader_rejects_bad_arguments(root, corpus):
    with pytest.raises(ValueError, match="rank"):
        make_loader(root, corpus, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no token shards"):
        make_loader(root, [])
    with pytest.raises(ValueError, match="n_frames"):
        ClipSampling(n_frames=0)
