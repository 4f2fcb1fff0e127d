"""Turn a dataset's source into entries: (video_id, source, label, split) per video.

Sources: a directory (flat, folder-per-class, or a downstream dataset's own layout: UCF101 and
HMDB51 with their split files, Something-Something v2 and Diving48 with their JSON annotations,
Kinetics with its CSV annotations), a manifest (CSV, JSONL or Parquet with a `source` column and
optional `label`, `split`, `video_id`), a plain list (.txt, one source per line), a single video
file, or a URL of any of these. A malformed manifest or annotation row, or a label outside the
dataset's class list, becomes an entry that carries its error, so it is recorded as a failed
video instead of stopping the dataset. Videos an annotation file names but the disk lacks are
counted and named in a listing warning. docs/datasets.md describes each layout.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlparse

from stages.config import ConfigError, DatasetConfig, IngestConfig
from stages.ingest.fetch import is_url, local_path

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".csv", ".jsonl", ".ndjson", ".parquet"}
LIST_SUFFIXES = {".txt", ".lst"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass
class Entry:
    video_id: str
    source: str
    label: str | None = None
    split: str | None = None
    splits: list[str] | None = None
    error: str | None = None
    # Why `error` is set, as the catalog's error_code; None means a malformed manifest row.
    error_code: str | None = None
    fingerprint: str = ""

    def identity(self) -> dict:
        return {"video_id": self.video_id, "source": self.source, "label": self.label, "split": self.split, "splits": self.splits}


@dataclass
class SourceListing:
    layout: str
    entries: list[Entry]
    classes: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # The layout itself says left/right carries meaning (SSv2): no flipped views downstream.
    flip_sensitive: bool = False

    @property
    def labeled(self) -> bool:
        return any(e.label is not None for e in self.entries)


def _suffix(source: str) -> str:
    path = urlparse(source).path if is_url(source) else source
    return PurePosixPath(path).suffix.lower()


def _short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def default_video_id(source: str) -> str:
    """Stable id for a source that names none: its file stem plus a hash of the full source,
    so two sources with the same file name never collide and adding sources never renames
    an existing video."""
    path = urlparse(source).path if is_url(source) else source
    stem = PurePosixPath(path).stem or "video"
    stem = re.sub(r"[^A-Za-z0-9_\-]+", "_", stem).strip("_") or "video"
    return f"{stem}-{_short_hash(source)}"


def fingerprint(entry: Entry) -> str:
    """What identifies an entry's input: for local files path, size and mtime (cheap, and a
    changed file is re-ingested); for URLs the URL. Label and split are part of it."""
    local = local_path(entry.source) if entry.source else None  # "" would stat the working directory
    if local is not None:
        try:
            st = local.stat()
            src = f"{local.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            src = f"{local}|missing"
    else:
        src = entry.source
    blob = json.dumps([src, entry.identity(), entry.error], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _video_files(root: Path, extensions: list[str], exclude: Path | None = None) -> list[Path]:
    exts = set(extensions)
    files = []
    for p in root.rglob("*"):
        if exclude is not None and exclude in p.parents:
            continue
        if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."):
            files.append(p)
    return sorted(files)


def _id_from(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


# Layouts whose ids are file paths without the extension: two different files with one stem
# (clip.mp4 beside clip.webm, as yt-dlp leaves them) must become two videos.
PATH_ID_LAYOUTS = ("directory", "folder_per_class")


def _file_digest(source: str) -> str | None:
    """sha256 of a local file (None for a URL or an unreadable file: then it counts as different)."""
    path = local_path(source)
    if path is None or not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def _same_bytes(sources: list[str]) -> bool:
    digests = [_file_digest(s) for s in sources]
    return digests[0] is not None and all(d == digests[0] for d in digests)


def clash_error(video_id: str, sources: list[str]) -> str:
    return (f"video id {video_id!r} names {len(sources)} different files ({', '.join(sources)}); the dataset's ids "
            "must name one file each: remove or rename all but one")


# ---------------------------------------------------------------- directory layouts

MAX_NAMED = 10  # absent videos named in a warning; the rest are only counted


def _missing_warning(name: str, missing: list[str], root: Path) -> str:
    """The warning for videos an annotation file lists but the disk lacks: not fatal, since
    partial downloads are common, but named so the user can fetch them."""
    more = f" (and {len(missing) - MAX_NAMED} more)" if len(missing) > MAX_NAMED else ""
    return f"{name}: {len(missing)} listed videos are not in {root}: {', '.join(missing[:MAX_NAMED])}{more}"


def _find_split_dir(root: Path, splits_dir: str | None, pattern: str) -> Path | None:
    if splits_dir:
        d = Path(splits_dir)
        if not d.is_dir():
            raise ConfigError(f"splits_dir {d} is not a directory")
        # Only a folder that holds this layout's split files counts (else HMDB51 reads as UCF101).
        return d if any(d.glob(pattern)) else None
    for candidate in _annotation_dirs(root, None):
        if any(candidate.glob(pattern)):
            return candidate
    return None


def _annotation_dirs(root: Path, splits_dir: str | None) -> list[Path]:
    """Where split and annotation files may lie: splits_dir alone when given, else the source
    root and its immediate subfolders (`ucfTrainTestlist/`, `labels/`, `annotations/`)."""
    if splits_dir:
        d = Path(splits_dir)
        if not d.is_dir():
            raise ConfigError(f"splits_dir {d} is not a directory")
        return [d]
    return [root, *sorted(p for p in root.iterdir() if p.is_dir())]


def detect_layout(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if _find_split_dir(root, cfg.splits_dir, "trainlist0[1-9].txt"):
        return "ucf101"
    if _find_split_dir(root, cfg.splits_dir, "*_test_split[1-9].txt"):
        return "hmdb51"
    if _find_ssv2(root, cfg.splits_dir):
        return "ssv2"
    if _find_diving48(root, cfg.splits_dir):
        return "diving48"
    if _find_kinetics(root, cfg.splits_dir):
        return "kinetics"
    if cfg.splits_dir:
        raise ConfigError(
            f"splits_dir {cfg.splits_dir} has no UCF101 (trainlistNN.txt) or HMDB51 (<class>_test_splitN.txt) split files, "
            "nor SSv2 (something-something-v2-labels.json or labels.json), Diving48 (Diving48_V2_train.json) or "
            "Kinetics (train.csv / validate.csv / test.csv with a youtube_id column) annotations"
        )
    exts = set(ingest.extensions)
    top_videos = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not top_videos and subdirs and any(_video_files(d, ingest.extensions) for d in subdirs):
        return "folder_per_class"
    return "directory"


def _class_key(path: Path) -> str:
    """How split files name a video: class folder / file name (UCF101 and HMDB51 both)."""
    return f"{path.parent.name}/{path.name}"


def _ucf101_classes(split_dir: Path) -> list[str]:
    class_ind = split_dir / "classInd.txt"
    if not class_ind.exists():
        return []
    return [parts[1] for line in class_ind.read_text().splitlines() if len(parts := line.split()) >= 2]


def _ucf101_assignments(root: Path, split_dir: Path, known: set[str]) -> tuple[dict[str, list[str | None]], int, list[str]]:
    """Split per split set for every listed video on disk, the number of split sets, and a
    warning per split file that lists absent videos."""
    set_ids = sorted({m.group(1) for p in split_dir.glob("*list0*.txt") if (m := re.search(r"list(\d+)\.txt$", p.name))})
    n_sets = max((int(sid) for sid in set_ids), default=0)  # splits[k-1] is split set k, even if a set is missing
    assignments: dict[str, list[str | None]] = {}
    warnings: list[str] = []
    for sid in set_ids:
        i = int(sid) - 1
        for kind in ("train", "test"):
            path = split_dir / f"{kind}list{sid}.txt"
            if i < 0 or not path.exists():
                continue
            missing = []
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                key = "/".join(line.split()[0].replace("\\", "/").split("/")[-2:])
                if key not in known:
                    missing.append(key)
                    continue
                assignments.setdefault(key, [None] * n_sets)[i] = kind
            if missing:
                warnings.append(_missing_warning(path.name, missing, root))
    return assignments, n_sets, warnings


def _list_ucf101(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    split_dir = _find_split_dir(root, cfg.splits_dir, "trainlist0[1-9].txt")
    if split_dir is None:
        raise ConfigError(f"{root}: UCF101 layout needs trainlistNN.txt / testlistNN.txt split files")
    files = _video_files(root, ingest.extensions, exclude=split_dir if split_dir != root else None)
    classes = _ucf101_classes(split_dir)
    assignments, n_sets, warnings = _ucf101_assignments(root, split_dir, {_class_key(f) for f in files})
    entries = []
    for f in files:
        splits = [s or "unused" for s in assignments.get(_class_key(f), [None] * n_sets)]
        vid, label, error = _id_from(f, f.parent.parent), f.parent.name, None
        if classes and label not in classes:
            # A class folder classInd.txt does not name has no class index for fine-tuning: it
            # fails visibly instead of becoming a silent new class.
            label, error = None, f"label {label!r} of video {vid} is not in {split_dir / 'classInd.txt'}"
        entries.append(
            Entry(video_id=vid, source=str(f), label=label, split=splits[0] if splits else None, splits=splits or None,
                  error=error, error_code="bad_label" if error else None)
        )
    if not classes:
        classes = sorted({e.label for e in entries if e.label})
    return SourceListing("ucf101", entries, classes, warnings=warnings)


def _list_hmdb51(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    split_dir = _find_split_dir(root, cfg.splits_dir, "*_test_split[1-9].txt")
    if split_dir is None:
        raise ConfigError(f"{root}: HMDB51 layout needs <class>_test_split<N>.txt files")
    files = _video_files(root, ingest.extensions, exclude=split_dir if split_dir != root else None)
    by_key = {_class_key(f): f for f in files}
    split_files = sorted(split_dir.glob("*_test_split[1-9].txt"))
    n_sets = max(int(p.stem[-1]) for p in split_files)
    codes = {"1": "train", "2": "test", "0": "unused"}
    assignments: dict[str, list[str | None]] = {}
    warnings: list[str] = []
    for p in split_files:
        cls, k = p.stem.rsplit("_test_split", 1)
        missing = []
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            key = f"{cls}/{parts[0]}"
            if key not in by_key:
                missing.append(key)
                continue
            assignments.setdefault(key, [None] * n_sets)[int(k) - 1] = codes.get(parts[1], "unused")
        if missing:
            warnings.append(_missing_warning(p.name, missing, root))
    entries = []
    for key, f in sorted(by_key.items()):
        splits = [s or "unused" for s in assignments.get(key, [None] * n_sets)]
        entries.append(Entry(video_id=_id_from(f, f.parent.parent), source=str(f), label=f.parent.name, split=splits[0], splits=splits))
    classes = sorted({e.label for e in entries if e.label})
    return SourceListing("hmdb51", entries, classes, warnings=warnings)


def _list_folder_per_class(root: Path, ingest: IngestConfig) -> SourceListing:
    entries = []
    for f in _video_files(root, ingest.extensions):
        parts = f.relative_to(root).parts
        split = SPLIT_NAMES.get(parts[0].lower()) if len(parts) >= 3 else None
        label_parts = parts[1:-1] if split else parts[:-1]
        label = label_parts[0] if label_parts else None
        entries.append(Entry(video_id=_id_from(f, root), source=str(f), label=label, split=split))
    classes = sorted({e.label for e in entries if e.label})
    return SourceListing("folder_per_class", entries, classes)


def _list_directory(root: Path, ingest: IngestConfig) -> SourceListing:
    return SourceListing("directory", [Entry(video_id=_id_from(f, root), source=str(f)) for f in _video_files(root, ingest.extensions)])


# ---------------------------------------------------------------- annotation-file layouts (SSv2, Diving48, Kinetics)


def _read_json(path: Path, kind: type, what: str):
    """An annotation file's JSON; an unreadable or wrongly shaped file stops the dataset."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read annotation file {path}: {e}") from None
    if not isinstance(data, kind):
        raise ConfigError(f"annotation file {path}: expected {what}, got a JSON {type(data).__name__}")
    return data


class _StemMatcher:
    """Entries of a layout whose annotation files name videos by file stem, wherever they lie
    under the root (SSv2 `<id>.webm`, Diving48 `rgb/<vid_name>.mp4`, Kinetics `<split>/[<label>/]<ytid>_<start>_<end>.mp4`).

    Videos on disk that no annotation file names are kept with split "unused" (as UCF101 does):
    they still serve pretraining, and a partial annotation download loses no video."""

    def __init__(self, root: Path, ingest: IngestConfig):
        self.root = root
        self.files: dict[str, Path] = {}
        self.duplicates: list[str] = []
        # A stem that several files share: the same bytes twice is one video (the first path, the
        # rest counted as duplicates); different files are a clash, a failed row naming them all.
        self.clashes: dict[str, str] = {}
        same_stem: dict[str, list[Path]] = {}
        for f in _video_files(root, ingest.extensions):
            same_stem.setdefault(f.stem, []).append(f)
        for stem, paths in same_stem.items():
            self.files[stem] = paths[0]
            if len(paths) > 1:
                if _same_bytes([str(p) for p in paths]):
                    self.duplicates += [stem] * (len(paths) - 1)
                else:
                    self.clashes[stem] = clash_error(stem, [str(p) for p in paths])
        self.entries: list[Entry] = []
        self.warnings: list[str] = []
        self._missing: list[str] = []

    def add(self, stem: str, split: str, label: str | None = None, bad_label: str | None = None) -> None:
        """A listed video; `bad_label` is the error for a label outside the class list."""
        path = self.files.get(stem)
        if path is None:
            self._missing.append(stem)
            return
        clash = self.clashes.get(stem)
        error = clash or bad_label
        self.entries.append(
            Entry(video_id=stem, source=str(path), label=None if bad_label else label, split=split,
                  error=error, error_code="id_clash" if clash else "bad_label" if bad_label else None)
        )

    def bad_row(self, video_id: str, split: str, error: str) -> None:
        """A malformed annotation row: a failed entry, like a bad manifest row (its file, when
        the row names one that exists, is the source)."""
        path = self.files.get(video_id)
        self.entries.append(Entry(video_id=video_id, source=str(path) if path else "", split=split, error=error))

    def end_file(self, name: str) -> None:
        if self._missing:
            self.warnings.append(_missing_warning(name, self._missing, self.root))
        self._missing = []

    def listing(self, layout: str, classes: list[str], flip_sensitive: bool = False) -> SourceListing:
        named = {e.video_id for e in self.entries}
        unused = [Entry(video_id=stem, source=str(f), split="unused", error=self.clashes.get(stem),
                        error_code="id_clash" if stem in self.clashes else None)
                  for stem, f in self.files.items() if stem not in named]
        return SourceListing(layout, self.entries + unused, classes, duplicates=list(self.duplicates),
                             warnings=self.warnings, flip_sensitive=flip_sensitive)


# Something-Something v2: the 20BN download names its files something-something-v2-<kind>.json;
# many copies keep them as labels/<kind>.json.
SSV2_PREFIXES = ("something-something-v2-", "")
SSV2_SPLITS = {"train": "train", "validation": "val", "test": "test"}


def _find_ssv2(root: Path, splits_dir: str | None) -> tuple[Path, str] | None:
    """(folder, file name prefix) of the SSv2 annotation files: labels.json plus a split file."""
    for d in _annotation_dirs(root, splits_dir):
        for prefix in SSV2_PREFIXES:
            if (d / f"{prefix}labels.json").is_file() and any((d / f"{prefix}{k}.json").is_file() for k in SSV2_SPLITS):
                return d, prefix
    return None


def _ssv2_class(template: str) -> str:
    # Split files give the template with its placeholders bracketed ("Holding [something]");
    # labels.json names the class without the brackets.
    return template.replace("[", "").replace("]", "")


def _ssv2_classes(path: Path) -> list[str]:
    """Class names in the order of their ids in labels.json: the id is the class index."""
    ids = _read_json(path, dict, "an object mapping each template to its class id")
    try:
        order = sorted(ids, key=lambda template: int(ids[template]))
    except (TypeError, ValueError):
        raise ConfigError(f"annotation file {path}: class ids must be integers, got {sorted(map(str, ids.values()))[:5]}") from None
    return [_ssv2_class(t) for t in order]


def _add_ssv2_item(m: _StemMatcher, name: str, i: int, item, split: str, known: set[str], labels_name: str) -> None:
    vid = _clean(item.get("id")) if isinstance(item, dict) else None
    if vid is None:
        m.bad_row(f"{name}:item{i}", split, f"{name} item {i}: no video 'id'")
    elif split == "test":  # the test file lists ids only: the labels were withheld
        m.add(vid, split)
    elif not isinstance(item.get("template"), str):
        m.bad_row(vid, split, f"video {vid} in {name} has no 'template' (its class)")
    else:
        label = _ssv2_class(item["template"])
        error = None if label in known else f"label {label!r} of video {vid} in {name} is not in {labels_name}"
        m.add(vid, split, label, bad_label=error)


def _list_ssv2(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    found = _find_ssv2(root, cfg.splits_dir)
    if found is None:
        raise ConfigError(
            f"{cfg.splits_dir or root}: SSv2 layout needs something-something-v2-labels.json (or labels/labels.json) "
            "and its train / validation / test JSON files"
        )
    folder, prefix = found
    labels_path = folder / f"{prefix}labels.json"
    classes = _ssv2_classes(labels_path)
    known = set(classes)
    m = _StemMatcher(root, ingest)
    for kind, split in SSV2_SPLITS.items():
        path = folder / f"{prefix}{kind}.json"
        if path.is_file():
            for i, item in enumerate(_read_json(path, list, "a list of videos")):
                _add_ssv2_item(m, path.name, i, item, split, known, labels_path.name)
            m.end_file(path.name)
    # Left/right is part of many SSv2 classes ("Pushing something from left to right").
    return m.listing("ssv2", classes, flip_sensitive=True)


# Diving48: V2 relabelled the V1 annotations; both ship as Diving48[_V2]_{train,test}.json.
DIVING48_PREFIXES = ("Diving48_V2_", "Diving48_")
DIVING48_VOCAB = "Diving48_vocab.json"


def _find_diving48(root: Path, splits_dir: str | None) -> tuple[Path, str] | None:
    """(folder, file name prefix) of the Diving48 split files, V2 preferred over V1."""
    for d in _annotation_dirs(root, splits_dir):
        for prefix in DIVING48_PREFIXES:
            if any((d / f"{prefix}{k}.json").is_file() for k in ("train", "test")):
                return d, prefix
    return None


def _class_index(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    return int(value) if isinstance(value, str) and value.strip().isdigit() else None


def _diving48_classes(vocab_path: Path, items: list) -> tuple[dict[int, str], str | None]:
    """Class name by label index (in class-list order), and the vocabulary file's name.
    Without the vocabulary the names are the indices seen in the split files."""
    if vocab_path.is_file():
        vocab = _read_json(vocab_path, list, "a list of [takeoff, somersault, twist, flight] entries")
        return {i: "_".join(map(str, v)) if isinstance(v, list) else str(v) for i, v in enumerate(vocab)}, vocab_path.name
    seen = {i for item in items if isinstance(item, dict) and (i := _class_index(item.get("label"))) is not None}
    return {i: f"class_{i:02d}" for i in sorted(seen)}, None


def _add_diving48_item(m: _StemMatcher, name: str, i: int, item, split: str, names: dict[int, str], vocab_name: str | None) -> None:
    vid = _clean(item.get("vid_name")) if isinstance(item, dict) else None
    if vid is None:
        m.bad_row(f"{name}:item{i}", split, f"{name} item {i}: no 'vid_name'")
        return
    raw = item.get("label")
    index = _class_index(raw)
    if index in names:
        m.add(vid, split, names[index])
    else:
        where = vocab_name or "a non-negative integer class index"
        m.add(vid, split, bad_label=f"label {raw!r} of video {vid} in {name} is not in {where}")


def _list_diving48(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    found = _find_diving48(root, cfg.splits_dir)
    if found is None:
        raise ConfigError(f"{cfg.splits_dir or root}: Diving48 layout needs Diving48_V2_train.json / Diving48_V2_test.json (or the V1 names)")
    folder, prefix = found
    split_files = [(folder / f"{prefix}{k}.json", k) for k in ("train", "test") if (folder / f"{prefix}{k}.json").is_file()]
    data = {path: _read_json(path, list, "a list of videos") for path, _ in split_files}
    names, vocab_name = _diving48_classes(folder / DIVING48_VOCAB, [item for items in data.values() for item in items])
    m = _StemMatcher(root, ingest)
    for path, split in split_files:
        for i, item in enumerate(data[path]):
            _add_diving48_item(m, path.name, i, item, split, names, vocab_name)
        m.end_file(path.name)
    return m.listing("diving48", list(names.values()))


# Kinetics-400/600/700: the release CSVs. validate.csv (ActivityNet release) and val.csv
# (cvdfoundation mirror) are the same split: the first present is read.
KINETICS_FILES = (("train.csv", "train"), ("validate.csv", "val"), ("val.csv", "val"), ("test.csv", "test"))
KINETICS_COLUMNS = {"youtube_id", "time_start", "time_end"}


def _is_kinetics_csv(path: Path) -> bool:
    """A file is a Kinetics annotation by its header, so another dataset's train.csv is not."""
    if not path.is_file():
        return False
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        return KINETICS_COLUMNS <= {c.strip() for c in f.readline().split(",")}


def _find_kinetics(root: Path, splits_dir: str | None) -> list[tuple[Path, str]]:
    """The Kinetics annotation CSVs with their splits, from the first folder that has any."""
    for d in _annotation_dirs(root, splits_dir):
        found: dict[str, Path] = {}
        for name, split in KINETICS_FILES:
            if split not in found and _is_kinetics_csv(d / name):
                found[split] = d / name
        if found:
            return [(path, split) for split, path in found.items()]
    return []


def _kinetics_stem(row: dict) -> str | None:
    """The file stem the download tools give a clip: <youtube_id>_<time_start:06d>_<time_end:06d>."""
    yid = _clean(row.get("youtube_id"))
    try:
        start, end = int(float(row.get("time_start") or "")), int(float(row.get("time_end") or ""))
    except (ValueError, OverflowError):  # empty, text, NaN or infinite
        return None
    return f"{yid}_{start:06d}_{end:06d}" if yid else None


def _read_kinetics_csv(path: Path) -> list[tuple[int, dict]]:
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig", errors="replace")))
        return [(reader.line_num, {(k or "").strip(): v for k, v in row.items()}) for row in reader]
    except (OSError, csv.Error) as e:
        raise ConfigError(f"cannot read annotation file {path}: {e}") from None


def _list_kinetics(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    split_files = _find_kinetics(root, cfg.splits_dir)
    if not split_files:
        raise ConfigError(
            f"{cfg.splits_dir or root}: Kinetics layout needs train.csv / validate.csv (or val.csv) / test.csv "
            "with columns label,youtube_id,time_start,time_end (in the root, annotations/ or splits_dir)"
        )
    rows = {path: _read_kinetics_csv(path) for path, _ in split_files}
    # Every label in the CSVs is a class, so none can fall outside the list.
    classes = sorted({label for table in rows.values() for _, row in table if (label := _clean(row.get("label")))})
    m = _StemMatcher(root, ingest)
    for path, split in split_files:
        for lineno, row in rows[path]:
            stem = _kinetics_stem(row)
            if stem is None:
                m.bad_row(f"{path.name}:row{lineno}", split, f"{path.name} row {lineno}: no youtube_id or non-numeric time_start/time_end")
            else:
                m.add(stem, split, _clean(row.get("label")))
        m.end_file(path.name)
    return m.listing("kinetics", classes)


# ---------------------------------------------------------------- manifests and lists


def _read_text(source: str, ingest: IngestConfig) -> bytes:
    local = local_path(source)
    try:
        if local is not None:
            return local.read_bytes()
        if urlparse(source).scheme in ("http", "https"):
            import requests

            r = requests.get(source, timeout=(ingest.connect_timeout_s, ingest.read_timeout_s))
            r.raise_for_status()
            return r.content
        import fsspec

        with fsspec.open(source, "rb") as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - any reason a manifest cannot be read stops this dataset only
        raise ConfigError(f"cannot read manifest {source}: {e}") from None


def _resolve(base: str, value: str) -> str:
    """Relative sources in a manifest are relative to the manifest itself."""
    if is_url(value) or Path(value).is_absolute():
        return value
    if is_url(base) and not base.startswith("file://"):
        if urlparse(base).scheme in ("http", "https"):
            return urljoin(base, value)
        # urljoin leaves s3://, gs://, memory:// ... bases out (it would return `value` alone).
        head, _, path = base.rpartition("://")
        return f"{head}://{PurePosixPath(path).parent / value}"
    base_path = local_path(base)
    return str((base_path.parent / value).resolve())


def _manifest_rows(source: str, data: bytes) -> list[tuple[int, dict | None, str | None]]:
    """(row number, row dict or None, parse error) for each data row."""
    suffix = _suffix(source)
    rows: list[tuple[int, dict | None, str | None]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1):
            rows.append((i, row, None))
    elif suffix in (".jsonl", ".ndjson"):
        for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((i, None, f"not valid JSON ({e.msg})"))
                continue
            rows.append((i, row, None) if isinstance(row, dict) else (i, None, "not a JSON object"))
    else:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig", errors="replace")))
        if not reader.fieldnames or "source" not in [f.strip() for f in reader.fieldnames]:
            raise ConfigError(f"manifest {source} has no 'source' column (columns: {reader.fieldnames})")
        for row in reader:  # line_num, not a count: blank lines are skipped but still numbered
            rows.append((reader.line_num, {(k or "").strip(): v for k, v in row.items()}, None))
    return rows


def _clean(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _list_manifest(source: str, ingest: IngestConfig) -> SourceListing:
    data = _read_text(source, ingest)
    entries = []
    name = PurePosixPath(urlparse(source).path if is_url(source) else source).name
    for lineno, row, problem in _manifest_rows(source, data):
        row = row or {}
        src = _clean(row.get("source"))
        vid = _clean(row.get("video_id"))
        if problem is None and src is None:
            problem = "missing 'source'"
        if problem is not None:
            entries.append(Entry(video_id=vid or f"{name}:row{lineno}", source=src or "", error=f"manifest {name} row {lineno}: {problem}"))
            continue
        resolved = _resolve(source, src)
        split = _clean(row.get("split"))
        entries.append(
            Entry(video_id=vid or default_video_id(resolved), source=resolved, label=_clean(row.get("label")),
                  split=SPLIT_NAMES.get(split.lower(), split) if split else None)
        )
    classes = sorted({e.label for e in entries if e.label})
    return SourceListing("manifest", entries, classes)


def _list_plain(source: str, ingest: IngestConfig) -> SourceListing:
    entries = []
    for line in _read_text(source, ingest).decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        resolved = _resolve(source, line)
        entries.append(Entry(video_id=default_video_id(resolved), source=resolved))
    return SourceListing("list", entries)


def list_source(cfg: DatasetConfig, ingest: IngestConfig, known: dict[str, str] | None = None) -> SourceListing:
    """Every entry of a dataset's source, one per video_id.

    The same source listed twice is one entry. Different files with one id: in the layouts whose
    ids are paths without the extension (directory, folder_per_class) each becomes its own video,
    the one `known` (the catalog's video_id -> source) already has, else the first path, keeping
    the bare id and the others the id with their extension ("clip.webm"); ingest's sha256 then
    records a byte-identical one as a duplicate of the first. Where the dataset defines the ids
    (UCF101 and HMDB51 names, SSv2/Diving48/Kinetics ids, manifests), the same bytes twice is one
    video and different files are one failed entry (error_code id_clash) naming every path."""
    source = cfg.source
    local = local_path(source)
    if local is not None and local.is_dir():
        root = local.resolve()
        layout = detect_layout(root, cfg, ingest)
        listing = {
            "ucf101": lambda: _list_ucf101(root, cfg, ingest),
            "hmdb51": lambda: _list_hmdb51(root, cfg, ingest),
            "ssv2": lambda: _list_ssv2(root, cfg, ingest),
            "diving48": lambda: _list_diving48(root, cfg, ingest),
            "kinetics": lambda: _list_kinetics(root, cfg, ingest),
            "folder_per_class": lambda: _list_folder_per_class(root, ingest),
            "directory": lambda: _list_directory(root, ingest),
        }.get(layout)
        if listing is None:
            raise ConfigError(f"layout {layout!r} does not apply to a directory source ({root})")
        result = listing()
    elif local is not None and not local.exists():
        raise ConfigError(f"source {source} does not exist")
    else:
        suffix = _suffix(source)
        if cfg.layout == "manifest" or (cfg.layout == "auto" and suffix in MANIFEST_SUFFIXES):
            result = _list_manifest(source, ingest)
        elif cfg.layout == "list" or (cfg.layout == "auto" and suffix in LIST_SUFFIXES):
            result = _list_plain(source, ingest)
        elif cfg.layout in ("auto", "directory"):
            # A single video file or URL.
            resolved = str(local.resolve()) if local is not None else source
            result = SourceListing("list", [Entry(video_id=default_video_id(resolved), source=resolved)])
        else:
            raise ConfigError(f"layout {cfg.layout!r} needs a directory source, got {source}")
    result.entries = _one_entry_per_id(result, known or {})
    for e in result.entries:
        e.fingerprint = fingerprint(e)
    return result


def _one_entry_per_id(result: SourceListing, known: dict[str, str]) -> list[Entry]:
    groups: dict[str, list[Entry]] = {}
    for e in result.entries:
        groups.setdefault(e.video_id, []).append(e)
    taken = set(groups)
    out: list[Entry] = []
    for vid, group in groups.items():
        distinct = list({e.source: e for e in group}.values())
        result.duplicates += [vid] * (len(group) - len(distinct))
        if len(distinct) == 1:
            out.append(distinct[0])
        elif result.layout in PATH_ID_LAYOUTS:
            keep = next((e for e in distinct if known.get(vid) == e.source), distinct[0])
            out.append(keep)
            for e in distinct:
                if e is keep:
                    continue
                new_id = vid + PurePosixPath(e.source).suffix.lower()
                if new_id in taken:
                    new_id = f"{vid}-{_short_hash(e.source)}"
                taken.add(new_id)
                e.video_id = new_id
                out.append(e)
        elif _same_bytes([e.source for e in distinct]):
            out.append(distinct[0])
            result.duplicates += [vid] * (len(distinct) - 1)
        else:
            first = distinct[0]
            out.append(Entry(video_id=vid, source=first.source, label=first.label, split=first.split, splits=first.splits,
                             error=clash_error(vid, [e.source for e in distinct]), error_code="id_clash"))
    return sorted(out, key=lambda e: e.video_id)
