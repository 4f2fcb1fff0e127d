"""WebDataset shards: deterministic tar files with a Parquet index and a stats commit marker.

A shard is `NNNNN.tar` (one sample per video) beside `NNNNN.parquet` (one row per member
video, including those that failed and have no sample) and `NNNNN_stats.json`, following
the img2dataset/video2dataset convention. Commit order: tar, Parquet, stats JSON, then the
catalog's marker row; each file is written under a temporary name and renamed, so a crash
never leaves a half shard that looks whole, and the catalog shows a shard only once its
marker exists.

Tar members carry no timestamps, owners or modes from the writing machine, so the same
samples always give byte-identical tar files (a crashed shard rebuilt by a rerun is the
same file).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from warehouse.tables import write_rows


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def check_key(key: str) -> str:
    """WebDataset splits a member name at the first dot of its base name: keys carry none."""
    if not key or "." in key.rsplit("/", 1)[-1] or key.startswith("_"):
        raise ValueError(f"invalid WebDataset key {key!r}: no dots, not starting with '_'")
    return key


class ShardWriter:
    """Stream samples into `<dir>/<NNNNN>.tar.partial-…`; `commit` makes the shard visible."""

    def __init__(self, tar_path: str | os.PathLike[str]):
        self.tar_path = Path(tar_path)
        self.tar_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.tar_path.parent / f".{self.tar_path.name}.{uuid.uuid4().hex[:8]}.partial"
        self._file = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        """One sample: `members` maps extension (e.g. "json", "s100_c.jpg") to bytes."""
        check_key(key)
        for ext in sorted(members):
            data = members[ext]
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
        self.samples += 1

    def close_tar(self) -> Path:
        """Finish the tar (still under its temporary name) and move it into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.tar_path)
        return self.tar_path

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def stats_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.stem + "_stats.json")


def write_json_atomic(obj: Any, path: Path) -> Path:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def commit_shard(
    writer: ShardWriter, table: str, rows: Iterable[Mapping[str, Any]], stats: Mapping[str, Any], marker: Mapping[str, Any], marker_path: Path
) -> Path:
    """tar -> Parquet index -> stats JSON -> catalog marker, each atomically."""
    tar_path = writer.close_tar()
    write_rows(table, rows, tar_path.with_suffix(".parquet"))
    write_json_atomic(dict(stats), stats_path(tar_path))
    write_rows("shards", [marker], marker_path)
    return tar_path


def read_samples(tar_path: str | os.PathLike[str]) -> dict[str, dict[str, bytes]]:
    """All samples of a shard as key -> {extension: bytes} (tests and small tools)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            prefix = info.name[: len(info.name) - len(base)]
            key, _, ext = base.partition(".")
            samples.setdefault(prefix + key, {})[ext] = tar.extractfile(info).read()
    return samples
