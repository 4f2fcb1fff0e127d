"""Which videos a fine-tuning cell trains on and evaluates on, with their class indices.

A split is named the way the paper reports it: a split set (`1`, `2`, `3`: UCF101 and HMDB51
have three official train/test splits, App. C; the catalog stores them in `videos.splits`), a
`train:val` pair of split names (SSv2, Diving48, Kinetics, manifests), or `auto` (split set 1
when the dataset has split sets, else train vs val, else train vs test).

A few-shot split, `10shot` or `10shot@SPLIT` (HVM-1's protocol on SSv2 and Kinetics-700), trains
on k videos per class drawn from SPLIT's training side (default `auto`) and evaluates on SPLIT's
whole evaluation side. The draw is fixed by the cell's seed (`train.seed`, a grid's `seeds:`):
each class's videos ordered by sha256(seed, video id), the first k taken, so the same seed gives
the same videos on every machine and a new seed a new draw.

Class indices are positions in the dataset's class list (`datasets.classes`: classInd.txt
order for UCF101, labels.json ids for SSv2, ...), so a model's output k means the same class
in every split and every run.

A token backbone reads the videos of one tokenizer's token shards (`select_split`); an ST-MAE
reads pixels from the frame shards (`select_frame_split`). Both resolve the split, labels,
few-shot draws and warnings with the same code, so the two families of one grid train and test
on the same videos wherever both have them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from stages.config import ConfigError
from stages.frames.read import FrameShard, frame_shards
from stages.pretrain.data import TokenShard, token_shards
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

_LISTED = 10
_FEW_SHOT = re.compile(r"^(\d+)shot(?:@(.+))?$")


def parse_few_shot(split: str) -> tuple[int | None, str]:
    """"10shot" -> (10, "auto"); "5shot@train:val" -> (5, "train:val"); "1" -> (None, "1")."""
    m = _FEW_SHOT.match(split.strip())
    if not m:
        return None, split
    k = int(m.group(1))
    if k < 1:
        raise ConfigError(f"few-shot split {split!r}: the number of videos per class must be at least 1")
    return k, m.group(2) or "auto"


def few_shot(train: dict[str, int], video_ids: dict[str, str], k: int, seed: int) -> dict[str, int]:
    """k training samples per class, fixed by `seed`: each class's videos ordered by
    sha256(seed, video id), the first k kept (all of a class with fewer)."""
    by_class: dict[int, list[str]] = {}
    for key in train:
        by_class.setdefault(train[key], []).append(key)
    chosen: dict[str, int] = {}
    for label, keys in by_class.items():
        keys.sort(key=lambda key: hashlib.sha256(f"{seed}:{video_ids[key]}".encode()).hexdigest())
        chosen.update((key, label) for key in keys[:k])
    return chosen


@dataclass(frozen=True)
class EvalVideo:
    key: str  # "dataset/key", as the token (and frame) shards name the sample
    video_id: str
    label: str
    label_index: int
    shard: str


@dataclass
class SplitSelection:
    dataset: str
    split: str  # as resolved: "1", "train:val"
    train_split: str  # human-readable, e.g. "train of split set 1"
    eval_split: str
    classes: list[str]
    flip_sensitive: bool
    tokenizer: str  # "" for frame shards (an ST-MAE's pixels)
    train: dict[str, int]  # "dataset/key" -> class index
    eval: list[EvalVideo]
    train_shards: list[TokenShard] | list[FrameShard]
    eval_shards: list[TokenShard] | list[FrameShard]
    warnings: list[str] = field(default_factory=list)
    base: str = ""  # the split whose evaluation videos these are ("1" for "10shot@1"); = split otherwise

    @property
    def shards(self) -> list[TokenShard] | list[FrameShard]:
        return list({s.path: s for s in self.train_shards + self.eval_shards}.values())


def _names(items: list[str]) -> str:
    more = f" and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return ", ".join(items[:_LISTED]) + more


def dataset_tokenizers(root: DataRoot, dataset: str) -> list[str]:
    return [t for (t,) in Catalog(root).rows(
        "SELECT DISTINCT tokenizer FROM token_samples WHERE dataset = ? AND status = 'ok' ORDER BY 1", [dataset])]


def _resolve_split(dataset: str, split: str, rows: list[tuple]) -> tuple[str, str, str, int | None]:
    """-> (resolved split, train name, eval name, split-set index or None)."""
    n_sets = max((len(r[4] or []) for r in rows), default=0)
    names = {r[3] for r in rows if r[3]}
    if split == "auto":
        if n_sets:
            split = "1"
        elif "train" in names and ("val" in names or "test" in names):
            split = "train:val" if "val" in names else "train:test"
        else:
            raise ConfigError(
                f"dataset {dataset} has no split information (no split sets, split names {sorted(names) or 'none'}): "
                "give it a layout with split files or a manifest with a split column, or name the split as TRAIN:EVAL")
    if split.isdigit():
        k = int(split)
        if not 1 <= k <= n_sets:
            raise ConfigError(f"dataset {dataset} has {n_sets} split sets; split {split} does not exist")
        return split, "train", "test", k - 1
    train, sep, held_out = split.partition(":")
    if not sep or not train or not held_out:
        raise ConfigError(f"split {split!r} of {dataset} is neither a split-set number nor TRAIN:EVAL split names")
    missing = [n for n in (train, held_out) if n not in names]
    if missing:
        raise ConfigError(f"dataset {dataset} has no videos in split(s) {', '.join(missing)} (splits: {', '.join(sorted(names)) or 'none'})")
    return split, train, held_out, None


def select_split(root: DataRoot, dataset: str, split: str, tokenizer: str, *, size: int | None = None,
                 variant: str | None = None, seed: int = 0) -> SplitSelection:
    """The training and evaluation videos of `split` that have committed tokens of `tokenizer`
    (`seed` draws a few-shot split's training videos)."""
    shots, split = parse_few_shot(split)
    catalog = Catalog(root)
    classes, flip_sensitive = _dataset_info(catalog, dataset)
    if variant is None:
        variants = {v for (v,) in catalog.rows(
            "SELECT DISTINCT variant FROM token_samples WHERE dataset = ? AND tokenizer = ? AND status = 'ok'", [dataset, tokenizer])}
        variant = "downstream" if "downstream" in variants else None
    try:
        shards = token_shards(root, [dataset], tokenizer, size, variant=variant)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return _select(catalog, dataset, split, shots, seed, classes, flip_sensitive, shards, _TOKENS, tokenizer)


def frame_split_shards(root: DataRoot, dataset: str, *, size: int | None = None, variant: str | None = None) -> list[FrameShard]:
    """The committed frame shards an ST-MAE cell of `dataset` reads: of `variant` (default
    downstream if the dataset has it) and `size` (default the only one), one frames setting."""
    found = [s for s in frame_shards(root, dataset, size=size) if s.n_ok > 0]
    if variant is None:
        variant = "downstream" if any(s.variant == "downstream" for s in found) else None
    chosen = [s for s in found if variant is None or s.variant == variant]
    if not chosen:
        which = ", ".join(f"{k}={v}" for k, v in (("size", size), ("variant", variant)) if v is not None)
        raise ConfigError(f"dataset {dataset} has no committed frame shards{f' with {which}' if which else ''} "
                          "(run the frames stage on it first)")
    settings = sorted({(s.variant, s.size, s.fps, s.config_hash) for s in chosen})
    if len(settings) > 1:
        listed = "; ".join(f"{v} {z}px {f:g} FPS (config {h[:8]})" for v, z, f, h in settings)
        raise ConfigError(f"dataset {dataset} has frame shards of several settings ({listed}): set finetune data.size / "
                          "data.variant, or remove the frames you no longer want")
    return chosen


def select_frame_split(root: DataRoot, dataset: str, split: str, *, size: int | None = None, variant: str | None = None,
                       seed: int = 0) -> SplitSelection:
    """As `select_split`, over the videos with committed frames (an ST-MAE reads pixels)."""
    shots, split = parse_few_shot(split)
    catalog = Catalog(root)
    classes, flip_sensitive = _dataset_info(catalog, dataset)
    shards = frame_split_shards(root, dataset, size=size, variant=variant)
    return _select(catalog, dataset, split, shots, seed, classes, flip_sensitive, shards, _FRAMES, "")


@dataclass(frozen=True)
class _Samples:
    """Where a family's per-video rows are: a catalog view and what "usable" means there."""

    table: str  # token_samples | frame_samples
    usable: str  # SQL condition on the view's alias t
    what: str  # adjective for messages: "tokenized", "framed"
    missing: str  # why an ingested video has none


_TOKENS = _Samples("token_samples", "t.status = 'ok'", "tokenized", "failed frames or tokenize")
_FRAMES = _Samples("frame_samples", "t.status <> 'failed'", "framed", "failed frames")


def _dataset_info(catalog: Catalog, dataset: str) -> tuple[list[str], bool]:
    """(class list, flip-sensitive) of a labeled dataset; ConfigError for anything else."""
    info = catalog.rows("SELECT classes, flip_sensitive FROM datasets WHERE dataset = ?", [dataset])
    if not info:
        raise ConfigError(f"dataset {dataset} is not in the catalog (ingest it first)")
    classes, flip_sensitive = list(info[0][0] or []), bool(info[0][1])
    if len(classes) < 2:
        raise ConfigError(f"dataset {dataset} has {len(classes)} classes; fine-tuning needs a labeled dataset with at least 2")
    return classes, flip_sensitive


def _select(catalog: Catalog, dataset: str, split: str, shots: int | None, seed: int, classes: list[str], flip_sensitive: bool,
            shards: list, samples: _Samples, tokenizer: str) -> SplitSelection:
    """The split's videos among `shards` (rows of `samples`): labels, few-shot draw, warnings."""
    sql = f"""SELECT t.key, t.video_id, t.shard, v.split, v.splits, v.label, v.status
             FROM {samples.table} t JOIN videos v ON v.dataset = t.dataset AND v.video_id = t.video_id
             WHERE t.dataset = ? AND {samples.usable} AND t.shard IN (SELECT unnest(?::VARCHAR[]))
             ORDER BY t.video_id"""
    rows = [(f"{dataset}/{k}", vid, shard, sp, sps, label, status)
            for k, vid, shard, sp, sps, label, status in catalog.rows(sql, [dataset, [s.path for s in shards]])]
    if not rows:
        raise ConfigError(f"dataset {dataset} has no {samples.what} videos" + (f" of {tokenizer}" if tokenizer else ""))
    resolved, train_name, eval_name, set_index = _resolve_split(dataset, split, rows)

    def side(split_name: str | None, split_sets: list[str] | None) -> str | None:
        if set_index is not None:
            sets = split_sets or []
            return sets[set_index] if set_index < len(sets) else None
        return split_name

    index = {c: i for i, c in enumerate(classes)}
    warnings: list[str] = []
    unlabeled, unknown = [], []
    train: dict[str, int] = {}
    video_ids: dict[str, str] = {}
    evaluation: list[EvalVideo] = []
    for key, vid, shard, split_name, split_sets, label, status in rows:
        which = side(split_name, split_sets)
        if which not in (train_name, eval_name) or status != "ok":
            continue
        if label is None:
            unlabeled.append(vid)
            continue
        if label not in index:
            unknown.append(f"{vid} ({label})")
            continue
        if which == train_name:
            train[key] = index[label]
            video_ids[key] = vid
        else:
            evaluation.append(EvalVideo(key, vid, label, index[label], shard))
    if unlabeled:
        warnings.append(f"{dataset}: {len(unlabeled)} videos of split {resolved} have no label and are left out: {_names(unlabeled)}")
    if unknown:
        warnings.append(f"{dataset}: {len(unknown)} videos have labels outside the class list and are left out: {_names(unknown)}")
    where = f"split {resolved}" if set_index is None else f"split set {resolved}"
    if not train:
        raise ConfigError(f"dataset {dataset} has no {samples.what} training videos in {where} ({train_name})")
    if not evaluation:
        raise ConfigError(f"dataset {dataset} has no {samples.what} evaluation videos in {where} ({eval_name})")
    trained = set(train.values())
    untrained = sorted({v.label for v in evaluation if v.label_index not in trained}, key=index.get)
    if untrained:
        raise ConfigError(f"dataset {dataset}, {where}: {len(untrained)} classes have evaluation videos but no training "
                          f"videos, so no model can learn them: {_names(untrained)}")
    base, train_side = resolved, f"{train_name}{f' of split set {resolved}' if set_index is not None else ''}"
    if shots is not None:
        counts = {i: 0 for i in trained}
        for label in train.values():
            counts[label] += 1
        short = [f"{classes[i]} ({n})" for i, n in sorted(counts.items()) if n < shots]
        if short:
            warnings.append(f"{dataset}, {where}: {len(short)} classes have fewer than {shots} training videos and keep "
                            f"all they have: {_names(short)}")
        train = few_shot(train, video_ids, shots, seed)
        resolved = f"{shots}shot@{resolved}"
        train_side = f"{shots} per class (seed {seed}) of {train_side}"
    absent = [c for i, c in enumerate(classes) if i not in trained]
    if absent:
        warnings.append(f"{dataset}, {where}: {len(absent)} classes of the class list have no training videos: {_names(absent)}")
    missing = catalog.rows(
        f"""SELECT count(*) FROM videos v WHERE v.dataset = ? AND v.status = 'ok' AND {'v.splits[?]' if set_index is not None else 'v.split'} = ?
            AND NOT EXISTS (SELECT 1 FROM {samples.table} t WHERE t.dataset = v.dataset AND t.video_id = v.video_id
                            AND {samples.usable} AND t.shard IN (SELECT unnest(?::VARCHAR[])))""",
        [dataset, *([set_index + 1] if set_index is not None else []), eval_name, [s.path for s in shards]],
    )[0][0]
    if missing:
        noun = "tokens" if samples is _TOKENS else "frames"
        warnings.append(f"{dataset}: {missing} ingested {eval_name} videos of {where} have no {noun} ({samples.missing}) "
                        "and are not evaluated")
    train_paths = {r[2] for r in rows if r[0] in train}
    eval_paths = {v.shard for v in evaluation}
    suffix = f" of split set {base}" if set_index is not None else ""
    return SplitSelection(
        dataset, resolved, train_side, f"{eval_name}{suffix}", classes, flip_sensitive, tokenizer, train, evaluation,
        [s for s in shards if s.path in train_paths], [s for s in shards if s.path in eval_paths], warnings, base,
    )
