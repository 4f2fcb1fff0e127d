"""Turn a dataset's source into entries: (video_id, source, label, split) per video.

Sources: a directory (flat, folder-per-class, UCF101 or HMDB51 layout with split files), a
manifest (CSV, JSONL or Parquet with a `source` column and optional `label`, `split`,
`video_id`), a plain list (.txt, one source per line), a single video file, or a URL of any
of these. A malformed manifest row becomes an entry that carries its error, so it is recorded
as a failed video instead of stopping the dataset.
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


# ---------------------------------------------------------------- directory layouts


def _find_split_dir(root: Path, splits_dir: str | None, pattern: str) -> Path | None:
    if splits_dir:
        d = Path(splits_dir)
        if not d.is_dir():
            raise ConfigError(f"splits_dir {d} is not a directory")
        # Only a folder that holds this layout's split files counts (else HMDB51 reads as UCF101).
        return d if any(d.glob(pattern)) else None
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if any(candidate.glob(pattern)):
            return candidate
    return None


def detect_layout(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    if _find_split_dir(root, cfg.splits_dir, "trainlist0[1-9].txt"):
        return "ucf101"
    if _find_split_dir(root, cfg.splits_dir, "*_test_split[1-9].txt"):
        return "hmdb51"
    if cfg.splits_dir:
        raise ConfigError(f"splits_dir {cfg.splits_dir} has no UCF101 (trainlistNN.txt) or HMDB51 (<class>_test_splitN.txt) split files")
    exts = set(ingest.extensions)
    top_videos = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if not top_videos and subdirs and any(_video_files(d, ingest.extensions) for d in subdirs):
        return "folder_per_class"
    return "directory"


def _class_key(path: Path) -> str:
    """How split files name a video: class folder / file name (UCF101 and HMDB51 both)."""
    return f"{path.parent.name}/{path.name}"


def _list_ucf101(root: Path, cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    split_dir = _find_split_dir(root, cfg.splits_dir, "trainlist0[1-9].txt")
    if split_dir is None:
        raise ConfigError(f"{root}: UCF101 layout needs trainlistNN.txt / testlistNN.txt split files")
    files = _video_files(root, ingest.extensions, exclude=split_dir if split_dir != root else None)
    classes: list[str] = []
    class_ind = split_dir / "classInd.txt"
    if class_ind.exists():
        for line in class_ind.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2:
                classes.append(parts[1])
    set_ids = sorted({m.group(1) for p in split_dir.glob("*list0*.txt") if (m := re.search(r"list(\d+)\.txt$", p.name))})
    n_sets = max((int(sid) for sid in set_ids), default=0)  # splits[k-1] is split set k, even if a set is missing
    assignments: dict[str, list[str | None]] = {}
    warnings: list[str] = []
    known = {_class_key(f) for f in files}
    for sid in set_ids:
        i = int(sid) - 1
        if i < 0:
            continue
        for kind in ("train", "test"):
            path = split_dir / f"{kind}list{sid}.txt"
            if not path.exists():
                continue
            missing = 0
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                rel = line.split()[0].replace("\\", "/")
                key = "/".join(rel.split("/")[-2:])
                if key not in known:
                    missing += 1
                    continue
                assignments.setdefault(key, [None] * n_sets)[i] = kind
            if missing:
                warnings.append(f"{path.name}: {missing} listed videos are not in {root}")
    entries = []
    for f in files:
        splits = assignments.get(_class_key(f), [None] * n_sets)
        splits = [s or "unused" for s in splits]
        entries.append(
            Entry(video_id=_id_from(f, f.parent.parent), source=str(f), label=f.parent.name,
                  split=splits[0] if splits else None, splits=splits or None)
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
        missing = 0
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            key = f"{cls}/{parts[0]}"
            if key not in by_key:
                missing += 1
                continue
            assignments.setdefault(key, [None] * n_sets)[int(k) - 1] = codes.get(parts[1], "unused")
        if missing:
            warnings.append(f"{p.name}: {missing} listed videos are not in {root}")
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


def list_source(cfg: DatasetConfig, ingest: IngestConfig) -> SourceListing:
    """Every entry of a dataset's source, de-duplicated by video_id (first one kept)."""
    source = cfg.source
    local = local_path(source)
    if local is not None and local.is_dir():
        root = local.resolve()
        layout = detect_layout(root, cfg, ingest)
        listing = {
            "ucf101": lambda: _list_ucf101(root, cfg, ingest),
            "hmdb51": lambda: _list_hmdb51(root, cfg, ingest),
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
    seen: dict[str, Entry] = {}
    for e in result.entries:
        if e.video_id in seen:
            result.duplicates.append(e.video_id)
            continue
        seen[e.video_id] = e
    result.entries = sorted(seen.values(), key=lambda e: e.video_id)
    for e in result.entries:
        e.fingerprint = fingerprint(e)
    return result
