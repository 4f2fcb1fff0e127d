"""Pretraining input: two token clips per video, streamed from token shards.

VIMPAC Sec. 3.2: for every video two clips c_i, c'_i of T frames are sampled uniformly and
independently; the clips of the other videos in the batch are the negatives of the contrastive
loss. App. C.1: pretraining frames are the resized, center-cropped view without flip (`s100_c`),
no other augmentation. App. F.2.3 (Table 10): an optional maximum distance d_max, in seconds,
between the starts of the two clips (default: none).

How an epoch is laid out, so that it is deterministic, equal-length on every DDP rank and
resumable mid-epoch:

* per epoch, one permutation of all shards drawn from (seed, epoch);
* S = world_size * W slots, W = max(1, num_workers); slot s = rank * W + logical worker takes
  the shards perm[s::S] and cycles through them (re-permuted each cycle) until it has made its
  batches; with fewer shards than slots it draws shards with replacement from the whole list.
  Either way each rank yields exactly `batches_per_epoch` batches: DDP ranks whose batch counts
  differ hang in the first collective after the shorter one stops;
* samples pass a shuffle buffer per slot; global batch b is made by logical worker b % W, which
  is the worker the DataLoader takes batch b from;
* the clip positions of batch b, and the torch.Generator handed to the transform (masking),
  are seeded by (seed, epoch, rank, b) alone. Resuming at batch k therefore replays only the
  shard order and the shuffle buffer (reading tars and npy headers) and never decodes tokens,
  samples clips or runs the transform for the skipped batches.

The same loader feeds fine-tuning (stages/finetune): one clip per video, a random one of the
stored views per sample and step (App. C: the 12 fixed spatial augmentations, 6 for
flip-sensitive datasets), and only the videos of the training split, each with its label.

Memory: the shuffle buffer holds each sample's whole `tokens.npy` (all its views), so a
buffer of 256 downstream-variant videos (12 views) weighs 12 times one of pretrain-variant
videos; the view is cut out only when the batch is made.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import multiprocessing as mp
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from stages.frames.views import PRETRAIN_VIEW
from stages.threads import loader_worker_init
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

# Last entry of every RNG seed: keeps the streams of one (seed, epoch, ...) independent.
_PERMUTATION, _SHARD_ORDER, _SHUFFLE, _CLIPS, _TRANSFORM = range(1, 6)
_MAX_LISTED = 20

Transform = Callable[[dict, torch.Generator], dict]


@dataclass(frozen=True)
class TokenShard:
    dataset: str
    path: str  # tar path relative to the data root
    tokenizer: str
    n_samples: int
    grid: tuple[int, int]
    fps: float
    codebook_size: int


def holdout_videos(root: DataRoot, shards: list[TokenShard], fraction: float, seed: int) -> dict[str, str]:
    """Videos of `shards` kept out of pretraining to validate on: "dataset/key" -> shard path.

    The ceil(fraction x n) videos whose hash of (seed, video) is smallest, at least one when
    fraction > 0 and the corpus has two or more videos, never all of them. The choice depends only
    on the seed and the video's name, so a video stays held out (or not) when others are added."""
    if fraction <= 0:
        return {}
    paths = [s.path for s in shards]
    rows = Catalog(root).rows(
        f"SELECT DISTINCT dataset, key, shard FROM token_samples WHERE status = 'ok' AND shard IN ({', '.join('?' * len(paths))})",
        paths)
    videos = {f"{d}/{k}": shard for d, k, shard in rows}
    if len(videos) < 2:
        return {}
    n = min(len(videos) - 1, max(1, math.ceil(fraction * len(videos))))
    ranked = sorted(videos, key=lambda v: hashlib.sha256(f"{seed}/{v}".encode()).digest())
    return {v: videos[v] for v in ranked[:n]}


def token_shards(
    root: DataRoot,
    datasets: list[str],
    tokenizer: str | None = None,
    size: int | None = None,
    *,
    variant: str | None = None,
    fps: float | None = None,
) -> list[TokenShard]:
    """Committed token shards of `datasets` (catalog view `token_samples`), ordered by dataset
    and path, checked to form one pretraining corpus: a single tokenizer, one grid and
    vocabulary, and per dataset one frames setting (variant, size, fps); two settings of one
    dataset would draw each of its videos twice as often as the others'."""
    names = list(dict.fromkeys(datasets))
    if not names:
        raise ValueError("token_shards: no datasets given")
    sql = f"""SELECT dataset, shard, tokenizer, variant, size, fps, grid_h, grid_w, codebook_size, count(*) AS n
              FROM token_samples WHERE status = 'ok' AND dataset IN ({", ".join("?" * len(names))})"""
    params: list = list(names)
    filters = []
    for column, value in (("tokenizer", tokenizer), ("size", size), ("variant", variant), ("fps", fps)):
        if value is not None:
            sql += f" AND {column} = ?"
            params.append(value)
            filters.append(f"{column}={value!r}")
    sql += " GROUP BY ALL ORDER BY dataset, shard"
    rows = Catalog(root).rows(sql, params)

    found = {r[0] for r in rows}
    missing = [d for d in names if d not in found]
    if missing:
        which = f" with {', '.join(filters)}" if filters else ""
        raise ValueError(f"no committed token shards{which} for dataset(s) {', '.join(missing)} (run the tokenize stage first)")

    def listing(groups: dict, label: Callable) -> str:
        return "; ".join(f"{label(k)} (datasets: {', '.join(sorted(v))})" for k, v in sorted(groups.items(), key=lambda kv: str(kv[0])))

    tokenizers: dict[str, set[str]] = {}
    shapes: dict[tuple, set[str]] = {}
    settings: dict[str, set[tuple]] = {}
    for ds, _, tok, var, sz, f, gh, gw, codes, _ in rows:
        tokenizers.setdefault(tok, set()).add(ds)
        shapes.setdefault((gh, gw, codes), set()).add(ds)
        settings.setdefault(ds, set()).add((var, sz, f))
    if len(tokenizers) > 1:
        raise ValueError(
            f"token shards of several tokenizers match {', '.join(names)}: {listing(tokenizers, str)}; pass tokenizer= to choose one"
        )
    for ds, found_settings in settings.items():
        if len(found_settings) > 1:
            text = "; ".join(f"variant={v} size={s} fps={f:g}" for v, s, f in sorted(found_settings))
            raise ValueError(f"dataset {ds} has token shards of several frame settings ({text}): pass variant=, size= or fps= to choose one")
    if len(shapes) > 1:
        raise ValueError(
            "token shards do not share one token grid and codebook: "
            + listing(shapes, lambda k: f"grid {k[0]}x{k[1]}, {k[2]} codes")
            + "; one model needs one grid and vocabulary (pass tokenizer= or size=)"
        )
    return [TokenShard(r[0], r[1], r[2], int(r[9]), (int(r[6]), int(r[7])), float(r[5]), int(r[8])) for r in rows]


@dataclass(frozen=True)
class ClipSampling:
    """Per-video clip sampling: pretraining's two clips of the center view (Sec. 3.2; d_max from
    App. F.2.3, Table 10), or fine-tuning's one clip of a random stored view (App. C)."""

    n_frames: int = 5  # T
    max_distance_s: float | None = None  # d_max: |start2 - start1| <= round(d_max * fps) frames
    view: str | None = PRETRAIN_VIEW  # None: a random one of each sample's stored views, per sample and batch
    clips: int = 2

    def __post_init__(self) -> None:
        if self.n_frames < 1:
            raise ValueError(f"ClipSampling.n_frames must be >= 1, got {self.n_frames}")
        if self.clips not in (1, 2):
            raise ValueError(f"ClipSampling.clips must be 1 (fine-tuning) or 2 (pretraining), got {self.clips}")
        if self.max_distance_s is not None and not self.max_distance_s >= 0:
            raise ValueError(f"ClipSampling.max_distance_s must be >= 0 or None, got {self.max_distance_s}")


def sample_clip_starts(n_frames: np.ndarray, fps: np.ndarray, sampling: ClipSampling, rng: np.random.Generator) -> np.ndarray:
    """Start frames (B, clips) of the clips of B videos with `n_frames` frames each (Sec. 3.2).

    Both starts are uniform and independent over [0, n - T]; with d_max the second is uniform
    over the starts within round(d_max * fps) frames of the first (Table 10). A video shorter
    than T gets start 0 for both clips (the loader pads it).
    """
    last = np.maximum(np.asarray(n_frames, np.int64) - sampling.n_frames, 0)
    first = rng.integers(0, last, endpoint=True)
    if sampling.clips == 1:
        return first[:, None]
    if sampling.max_distance_s is None:
        second = rng.integers(0, last, endpoint=True)
    else:
        # np.rint rounds half to even, as Python's round() does.
        d = np.rint(sampling.max_distance_s * np.asarray(fps, np.float64)).astype(np.int64)
        second = rng.integers(np.maximum(first - d, 0), np.minimum(first + d, last), endpoint=True)
    return np.stack([first, second], axis=1)


def video_index(key: str) -> int:
    """Stable 63-bit id of "dataset/key": equal ids mark two draws of one video, which the
    contrastive loss must not treat as negatives of each other."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 1


def batch_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The generator the transform gets for global batch `batch`: a function of these four
    numbers only, so masks do not depend on worker count or on resuming."""
    hi, lo = np.random.SeedSequence([seed, epoch, rank, batch, _TRANSFORM]).generate_state(2, np.uint32)
    generator = torch.Generator()
    generator.manual_seed((int(hi) << 31) | (int(lo) >> 1))
    return generator


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


@dataclass
class _Record:
    """A validated sample waiting in the shuffle buffer; tokens stay encoded until batching."""

    key: str  # "dataset/key"
    npy: bytes
    view_index: int | None  # None: drawn per batch among n_views
    n_views: int
    n_frames: int
    fps: float
    label: int = -1


def _describe(exn: BaseException) -> str:
    # WebDataset appends streams and urls to exception args; keep the message itself.
    if isinstance(exn, OSError) and exn.strerror:
        return f"{type(exn).__name__}: {exn.strerror}"
    first = str(exn.args[0]) if exn.args else ""
    return f"{type(exn).__name__}: {first.split(' @ ')[0]}"


def _check(sample: dict, shard: TokenShard, path: str, view: str | None) -> tuple[_Record | None, str | None]:
    """Validate a sample from its json and npy header only (no token decoding), so a resumed
    epoch rejects exactly the samples the full epoch rejected while skipping their decoding."""
    where = f"token shard {path}: sample {sample.get('__key__')}"
    missing = [m for m in ("json", "tokens.npy") if m not in sample]
    if missing:
        return None, f"{where}: missing {', '.join(missing)}"
    try:
        meta = json.loads(sample["json"])
    except ValueError as e:
        return None, f"{where}: unreadable json ({e})"
    views = meta.get("views") if isinstance(meta, dict) else None
    if not isinstance(views, list) or not views or (view is not None and view not in views):
        return None, f"{where}: no view {view!r} (views: {views})"
    raw = sample["tokens.npy"]
    header = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(header)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(header)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(header)
        else:
            return None, f"{where}: unsupported npy format version {version}"
    except (ValueError, TypeError, SyntaxError) as e:
        return None, f"{where}: unreadable tokens.npy ({e})"
    if dtype.kind not in "iu":
        return None, f"{where}: tokens.npy has dtype {dtype}, expected integers"
    if len(shape) != 4 or shape[0] != len(views):
        return None, f"{where}: tokens.npy has shape {shape}, expected ({len(views)} views, T, h, w)"
    if tuple(shape[2:]) != tuple(shard.grid):
        return None, f"{where}: token grid {tuple(shape[2:])} differs from the shard's {tuple(shard.grid)}"
    if len(raw) - header.tell() < math.prod(shape) * dtype.itemsize:
        return None, f"{where}: tokens.npy is truncated"
    if shape[1] == 0:
        return None, f"{where}: no frames"
    try:
        fps = float(meta.get("fps", shard.fps))
    except (TypeError, ValueError):
        return None, f"{where}: bad fps {meta.get('fps')!r}"
    index = views.index(view) if view is not None else None
    return _Record(f"{shard.dataset}/{sample['__key__']}", raw, index, len(views), int(shape[1]), fps), None


class ClipLoader:
    """Batches of two clips per video for masked-token + contrastive pretraining (Sec. 3.2,
    App. C.1); see the module docstring for the epoch layout that makes it resumable."""

    def __init__(
        self,
        root: DataRoot,
        shards: list[TokenShard],
        sampling: ClipSampling,
        *,
        batch_size: int,
        batches_per_epoch: int,
        pad_id: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 256,
        transform: Transform | None = None,
        pin_memory: bool = False,
        labels: dict[str, int] | None = None,
        exclude: frozenset[str] | None = None,
        only: frozenset[str] | None = None,
    ):
        """`labels` (fine-tuning): only these "dataset/key" videos, with their class index.
        `exclude` / `only` (pretraining validation): leave these videos out / read only these."""
        if not shards:
            raise ValueError("ClipLoader: no token shards")
        grids = sorted({tuple(s.grid) for s in shards})
        if len(grids) > 1:
            raise ValueError(f"ClipLoader: token shards have several grids {grids}")
        for name, value, low in (("batch_size", batch_size, 1), ("batches_per_epoch", batches_per_epoch, 1), ("world_size", world_size, 1),
                                 ("num_workers", num_workers, 0), ("shuffle_buffer", shuffle_buffer, 1), ("seed", seed, 0)):
            if value < low:
                raise ValueError(f"ClipLoader: {name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ClipLoader: rank {rank} outside [0, {world_size})")
        self.root = root
        self.shards = list(shards)
        self.sampling = sampling
        self.grid = grids[0]
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.pad_id = int(pad_id)
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.pin_memory = pin_memory
        # Fine-tuning: "dataset/key" -> class index; samples not in it (other splits) are skipped.
        self.labels = labels
        self.exclude = exclude or frozenset()
        self.only = only

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict]:
        """Batches skip_batches .. batches_per_epoch - 1 of `epoch`, identical to the same
        batches of an uninterrupted epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= skip_batches <= self.batches_per_epoch:
            raise ValueError(f"skip_batches must be in [0, {self.batches_per_epoch}], got {skip_batches}")
        if skip_batches == self.batches_per_epoch:
            return iter(())
        # A private generator: DataLoader otherwise draws its workers' base seed from the global
        # torch RNG, so a resumed run (one iterator created mid-epoch) would see other dropout
        # masks than an uninterrupted one. Our streams are seeded explicitly anyway.
        loader = DataLoader(
            _EpochStream(self, epoch, skip_batches), batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            generator=torch.Generator().manual_seed(0),
            multiprocessing_context=_worker_context() if self.num_workers else None,
            # One thread per worker (torch's own default there too, but also OpenMP/MKL/OpenBLAS
            # and what a worker starts): the training process keeps its share of the cores.
            worker_init_fn=loader_worker_init if self.num_workers else None,
        )
        return _owned(iter(loader))


def _worker_context() -> mp.context.BaseContext:
    """Loader workers come from a fork server, not a fork of the training process.

    A training process runs Prefect and MLflow threads (the pretrain flow); a plain fork copies
    them half-alive, and the workers then die at exit (exit code 1, "database is locked" from
    Prefect's services). The fork server is a clean interpreter that has imported torch once,
    so a worker still starts in milliseconds. Its sys.path is the parent's at the time it starts.
    """
    ctx = mp.get_context("forkserver")
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:  # not started yet: choose what it preloads
        ctx.set_forkserver_preload(["torch", "numpy", "webdataset", "stages.pretrain.data", "stages.pretrain.train"])
    return ctx


def _owned(batches: Iterator[dict]) -> Iterator[dict]:
    """Yield from a DataLoader iterator and stop its workers as soon as we are done with it.

    An exception raised through the DataLoader sits in a reference cycle with the iterator;
    left to the garbage collector, worker shutdown then waits out its timeouts (5 s per
    worker) instead of exiting at once. The same applies to an epoch abandoned midway.
    """
    try:
        yield from batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # absent without worker processes
        if shutdown is not None:
            shutdown()


class _EpochStream(IterableDataset):
    def __init__(self, loader: ClipLoader, epoch: int, skip: int):
        self.loader = loader
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.loader.num_workers)
        info = get_worker_info()
        if info is not None and info.num_workers != workers:
            raise RuntimeError(f"epoch stream built for {workers} workers runs in {info.num_workers}")
        physical = info.id if info is not None else 0
        # The DataLoader takes the i-th batch it yields from worker i % W; after skipping k
        # batches that is global batch k + i, owned by logical worker (k + i) % W.
        return _Slot(self.loader, self.epoch, (physical + self.skip) % workers).batches(self.skip)


class _Slot:
    """One (rank, logical worker) slot of an epoch: its shard order, shuffle buffer and batches."""

    def __init__(self, loader: ClipLoader, epoch: int, worker: int):
        self.loader = loader
        self.epoch = epoch
        self.worker = worker
        self.n_workers = max(1, loader.num_workers)
        self.n_slots = loader.world_size * self.n_workers
        self.index = loader.rank * self.n_workers + worker
        self.errors: list[str] = []  # reported with the batch being made when they occur
        self.dead: dict[int, str] = {}  # shards that gave no usable sample -> why
        self.shard_rng = _rng(loader.seed, epoch, self.n_slots, self.index, _SHARD_ORDER)

    def _shard_order(self) -> Iterator[int]:
        shards = self.loader.shards
        n = len(shards)
        if n >= self.n_slots:
            own = _rng(self.loader.seed, self.epoch, _PERMUTATION).permutation(n)[self.index :: self.n_slots]
            order = own
            while any(int(i) not in self.dead for i in own):
                for i in order:
                    if int(i) not in self.dead:
                        yield int(i)
                order = self.shard_rng.permutation(own)
        # Fewer shards than slots, or none of this slot's shards is usable: draw from all.
        while True:
            live = [i for i in range(n) if i not in self.dead]
            if not live:
                listed = "; ".join(why for _, why in sorted(self.dead.items())[:_MAX_LISTED])
                more = f"; and {n - _MAX_LISTED} more" if n > _MAX_LISTED else ""
                raise ValueError(f"no usable sample in any of the {n} token shards: {listed}{more}")
            yield live[int(self.shard_rng.integers(len(live)))]

    def _read(self, i: int) -> Iterator[_Record]:
        shard = self.loader.shards[i]
        path = str(self.loader.root.absolute(shard.path))
        view = self.loader.sampling.view
        problems: list[str] = []
        reported: list[str] = []

        def handler(exn: BaseException) -> bool:
            # WebDataset's default handler re-raises: one damaged tar would end the run. A
            # truncated member raises twice (tar member, then tar stream): report it once.
            message = f"token shard {path}: {_describe(exn)}"
            if message not in problems and (not reported or reported[-1] != message):
                problems.append(message)
            return True

        def flush() -> None:
            reported.extend(problems)
            self.errors.extend(problems)
            problems.clear()

        labels, exclude, only = self.loader.labels, self.loader.exclude, self.loader.only
        seen = good = skipped = 0
        for sample in wds.tarfile_to_samples(handler=handler)(iter([{"url": path}])):
            flush()
            seen += 1
            key = f"{shard.dataset}/{sample.get('__key__')}"
            if (labels is not None and key not in labels) or key in exclude or (only is not None and key not in only):
                skipped += 1
                continue  # another split's video, or a validation video: not an error
            record, error = _check(sample, shard, path, view)
            if error is not None:
                reported.append(error)
                self.errors.append(error)
                continue
            if labels is not None:
                record.label = labels[record.key]
            good += 1
            yield record
        flush()
        if not reported and seen < shard.n_samples:
            # A tar cut at a member boundary reads as a clean, shorter archive.
            message = f"token shard {path}: only {seen} of {shard.n_samples} samples readable (truncated?)"
            reported.append(message)
            self.errors.append(message)
        if good == 0:  # never read again this epoch; a shard of only left-out videos is not broken, just empty here
            self.dead[i] = (reported[-1] if reported else f"token shard {path}: all {seen} videos left out" if skipped == seen > 0
                            else f"token shard {path}: no samples")

    def _records(self) -> Iterator[_Record]:
        for i in self._shard_order():
            yield from self._read(i)

    def _shuffled(self, records: Iterator[_Record]) -> Iterator[_Record]:
        rng = _rng(self.loader.seed, self.epoch, self.n_slots, self.index, _SHUFFLE)
        # A buffer larger than the corpus would only hold repeats, and filling it is paid
        # at the start of every epoch.
        loader = self.loader
        corpus = (len(loader.labels) if loader.labels is not None else len(loader.only) if loader.only is not None
                  else sum(s.n_samples for s in loader.shards) - len(loader.exclude))
        size = min(self.loader.shuffle_buffer, max(1, corpus))
        buffer: list[_Record] = []
        for record in records:
            buffer.append(record)
            if len(buffer) >= size:
                j = int(rng.integers(len(buffer)))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                yield buffer.pop()

    def batches(self, skip: int) -> Iterator[dict]:
        loader = self.loader
        stream = self._shuffled(self._records())
        for b in range(self.worker, loader.batches_per_epoch, self.n_workers):
            records = [next(stream) for _ in range(loader.batch_size)]
            errors, self.errors = self.errors, []
            if b < skip:
                continue
            batch = self._assemble(b, records, errors)
            if loader.transform is not None:
                batch = loader.transform(batch, batch_generator(loader.seed, self.epoch, loader.rank, b))
            yield batch

    def _assemble(self, b: int, records: list[_Record], errors: list[str]) -> dict:
        loader = self.loader
        t, clips = loader.sampling.n_frames, loader.sampling.clips
        h, w = loader.grid
        n = np.array([r.n_frames for r in records], np.int64)
        fps = np.array([r.fps for r in records], np.float64)
        rng = _rng(loader.seed, self.epoch, loader.rank, b, _CLIPS)
        starts = sample_clip_starts(n, fps, loader.sampling, rng)
        # Fine-tuning's random spatial augmentation: one of the stored views per sample (drawn
        # after the starts, so pretraining's streams are unchanged).
        views = [r.view_index if r.view_index is not None else int(rng.integers(r.n_views)) for r in records]
        valid = np.minimum(n, t)
        tokens = np.full((len(records), clips, t, h, w), loader.pad_id, np.int64)
        for i, record in enumerate(records):
            frames = np.load(io.BytesIO(record.npy), allow_pickle=False)[views[i]]  # (n, h, w)
            m = valid[i]
            for c in range(clips):
                tokens[i, c, :m] = frames[starts[i, c] : starts[i, c] + m]
        batch = {
            "tokens": torch.from_numpy(tokens),
            "n_valid": torch.from_numpy(np.repeat(valid[:, None], clips, axis=1)),
            "video_index": torch.tensor([video_index(r.key) for r in records], dtype=torch.int64),
            "keys": [r.key for r in records],
            "errors": errors,
        }
        if loader.labels is not None:
            batch["labels"] = torch.tensor([r.label for r in records], dtype=torch.int64)
            batch["views"] = torch.tensor(views, dtype=torch.int64)
        return batch
