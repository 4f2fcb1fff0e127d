"""Where every byte lives: one data root holds all state (DESIGN.md, "Data root").

    <home>/
      raw/ab/<sha256>              content-addressed source videos (same bytes stored once)
      tables/<table>/<part>.parquet  catalog tables, one immutable Parquet file per unit of work
      tables/shards/<stage>/...      one commit marker per unit; a unit is visible only once it has one
      tables/compacted/<table>/dataset=<name>/...  committed units merged into large files (warehouse/compact.py)
      tables/summaries/...           per-dataset summaries for `vimpac status` (warehouse/summaries.py)
      catalog.duckdb               DuckDB views over the Parquet files (rebuildable at any time)
      mlflow/mlflow.db, mlflow/artifacts/
      prefect/                     PREFECT_HOME and result storage
      tmp/                         partial downloads and files being written; safe to delete
      locks/                       advisory locks (one writer per stage and dataset)
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

DEFAULT_HOME = "./vimpac-data"


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """--home, then $VIMPAC_HOME, then ./vimpac-data."""
    return Path(home or os.environ.get("VIMPAC_HOME") or DEFAULT_HOME).expanduser().resolve()


class DataRoot:
    def __init__(self, home: str | os.PathLike[str] | None = None):
        self.home = resolve_home(home)

    def __repr__(self) -> str:
        return f"DataRoot({str(self.home)!r})"

    @property
    def raw(self) -> Path:
        return self.home / "raw"

    @property
    def tables(self) -> Path:
        return self.home / "tables"

    @property
    def tmp(self) -> Path:
        return self.home / "tmp"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def prefect_dir(self) -> Path:
        return self.home / "prefect"

    def ensure(self) -> "DataRoot":
        for d in (self.raw, self.tables, self.tmp, self.locks, self.mlflow_dir, self.prefect_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def table_dir(self, table: str, *parts: str) -> Path:
        return self.tables.joinpath(table, *parts)

    def raw_path(self, sha256: str) -> Path:
        return self.raw / sha256[:2] / sha256

    def relative(self, path: str | os.PathLike[str]) -> str:
        """Paths stored in tables are relative to the root, so copying the root moves everything."""
        return Path(path).resolve().relative_to(self.home).as_posix()

    def absolute(self, relative: str) -> Path:
        return self.home / relative

    def temp_file(self, prefix: str = "") -> Path:
        """A fresh path under tmp/; `prefix` lets the owner of a crashed run find its leftovers."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp / f"{prefix}{uuid.uuid4().hex}.partial"

    def store_raw(self, tmp_file: Path, sha256: str) -> tuple[Path, bool]:
        """Move a fully written, hashed temp file into the raw store.

        Returns (final path, newly stored). If the content is already there, the temp file is
        dropped: identical bytes are kept once however many sources point at them.
        """
        final = self.raw_path(sha256)
        if final.exists():
            tmp_file.unlink(missing_ok=True)
            return final, False
        final.parent.mkdir(parents=True, exist_ok=True)
        # Data on disk before the name: after a power loss a content-addressed name must
        # never point at missing bytes, since nothing would ever rewrite it.
        fd = os.open(tmp_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_file, final)
        return final, True
