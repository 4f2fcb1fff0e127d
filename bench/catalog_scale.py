"""The catalog at HowTo100M scale: queries before and after compaction, in one run.

    python bench/catalog_scale.py [--videos 1200000] [--labeled 13320] [--home DIR] [--record]

Builds a data root of N videos through the warehouse's own writers (`write_parquet_atomic`:
temporary name, fsync, rename; synthetic rows, no video files), laid out as the stages lay it
out: N - L unlabeled pretraining videos (dataset `howto100m`) and L labeled ones (`ucf101`,
101 classes, a train/test split), each ingested in units of `--per-unit` videos (one `videos`
file and one commit marker per unit), framed into shards of `--per-shard` videos (one
`frame_samples` file beside each shard and a marker) and tokenized likewise (`token_samples`).
At the defaults: 75,000 ingest units and about 260,000 catalog files, written at about 1.8 ms
a file on 2 cores (the Parquet encoding of small files dominates): 8 minutes; the whole run
takes about 15 (the build, five queries cut at --before-timeout, compaction, the rest).

Then, each as a user runs it (a fresh `vimpac` process, wall time):

    count     vimpac sql "SELECT count(*) FROM videos"
    filtered  vimpac sql "... FROM videos WHERE dataset = 'ucf101' AND status = 'ok' GROUP BY split"
    status    vimpac status
    plan      vimpac plan --config <ucf101: ingest, frames, tokenize>
    finetune  the catalog lookups of one fine-tune cell on ucf101 (stages.finetune.splits.select_split,
              timed inside its process: the lookups without the imports)

before compaction (each cut at --before-timeout seconds: at this scale they take minutes),
then `vimpac compact` (timed; beside it, as the baseline, `vimpac compact --readers 1` on a copy
of the same catalog: one DuckDB connection reading the unit files in turn), the same after, and an incremental step: 1,000 more videos
ingested into howto100m and `vimpac compact` again (rows it rewrote: about 1,000, not the
catalog). The last line reads

    catalog-scale: videos=N units=U files=F status_s=X count_s=Y plan_s=Z

with U the ingest units, F the catalog's Parquet files after compaction and the times after
compaction (targets on 2 cores: status <= 2 s, count <= 1 s, plan <= 5 s; compaction <= 120 s).
`--record` appends the table to bench/RESULTS.md. The build writes with --workers processes;
run it on a quiet machine (it is I/O and CPU bound; other processes change every figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from warehouse.layout import DataRoot  # noqa: E402
from warehouse.tables import SCHEMAS, write_parquet_atomic  # noqa: E402

PRETRAIN, LABELED = "howto100m", "ucf101"
N_CLASSES = 101
TOKENIZER_FILE = "bench-tokenizer.ckpt"
TARGETS = {"status": 2.0, "count": 1.0, "plan": 5.0}
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Dataset:
    name: str
    first: int  # global index of its first video (ids and hashes are unique across datasets)
    n: int
    labeled: bool

    @property
    def variant(self) -> str:
        return "downstream" if self.labeled else "pretrain"

    @property
    def views(self) -> list[str]:
        from stages.frames.views import view_names

        return view_names(self.variant)

    @property
    def frames_dir(self) -> str:
        return f"shards/frames/{self.name}/fps{4 if self.labeled else 2}-s128-{self.variant}-bench00000"

    def tokens_dir(self, identity: str) -> str:
        return f"shards/tokens/{self.name}/{Path(self.frames_dir).name}--tok-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"


def video_id(ds: Dataset, i: int) -> str:
    return f"{ds.name}-{ds.first + i:08d}"


def label(i: int) -> str:
    return f"class{i % N_CLASSES:03d}"


def split(i: int) -> str:
    return "test" if i % 10 < 3 else "train"


def manifest_rows(ds: Dataset, start: int, stop: int) -> list[dict]:
    return [{"video_id": video_id(ds, i), "source": f"https://videos.example/{video_id(ds, i)}.mp4",
             "label": label(i), "split": split(i)} for i in range(start, stop)]


def _strings(fmt: str, ids: list[str]) -> pa.Array:
    return pa.array([fmt.format(v) for v in ids], pa.string())


def videos_table(ds: Dataset, start: int, stop: int, per_unit: int, ingest: tuple[dict, str] | None) -> pa.Table:
    """`videos` rows of videos [start, stop) of `ds` as ingest writes them; `ingest` = (video_id ->
    (fingerprint, entry key), config hash) as ingest would record them."""
    n = stop - start
    idx = np.arange(start, stop)
    ids = [video_id(ds, i) for i in range(start, stop)]
    rng = np.random.default_rng(ds.first + start)
    failed = rng.random(n) < 0.03
    duration = np.where(ds.labeled, rng.uniform(2, 12, n), rng.uniform(60, 900, n))
    sha = [hashlib.sha256(v.encode()).hexdigest() for v in ids]
    keys, cfg_hash = ingest or ({}, "bench")
    cols = {
        "dataset": pa.array([ds.name] * n),
        "video_id": pa.array(ids),
        "source": _strings("https://videos.example/{}.mp4", ids),
        "sha256": pa.array(sha),
        "bytes": pa.array(rng.integers(10**6, 10**8, n)),
        "label": pa.array([label(i) for i in range(start, stop)] if ds.labeled else [None] * n, pa.string()),
        "split": pa.array([split(i) for i in range(start, stop)] if ds.labeled else [None] * n, pa.string()),
        "status": pa.array(np.where(failed, "failed", "ok").astype(object)),
        "error": pa.array([f"https://videos.example/{v}.mp4: HTTP 404" if f else None for v, f in zip(ids, failed)], pa.string()),
        "error_code": pa.array(np.where(failed, "http_404", None).astype(object), pa.string()),
        "retryable": pa.array(np.zeros(n, bool)),
        "duration_s": pa.array(duration, mask=failed),
        "fps": pa.array(np.full(n, 30.0)),
        "n_frames": pa.array((duration * 30).astype(np.int64)),
        "width": pa.array(np.full(n, 640, np.int32)),
        "height": pa.array(np.full(n, 360, np.int32)),
        "codec": pa.array(["h264"] * n),
        "container": pa.array(["mov,mp4,m4a,3gp,3g2,mj2"] * n),
        "rotation": pa.array(np.zeros(n, np.int32)),
        "has_video": pa.array(~failed, mask=failed),
        "has_audio": pa.array(~failed, mask=failed),
        "start_time_s": pa.array(np.zeros(n)),
        "raw_path": pa.array([f"raw/{s[:2]}/{s}" for s in sha]),
        "ingested_at": pa.array([T0 + timedelta(milliseconds=int(i)) for i in ds.first + idx], SCHEMAS["videos"].field("ingested_at").type),
        "fingerprint": pa.array([keys.get(v, (None, None))[0] or s for v, s in zip(ids, sha)]),
        "entry_key": pa.array([keys.get(v, (None, None))[1] or s for v, s in zip(ids, sha)]),
        "config_hash": pa.array([cfg_hash] * n),
        "code_version": pa.array(["ingest-1"] * n),
        "run_id": pa.array(["ingest-bench"] * n),
        "unit": pa.array([f"{ds.name}-u{i // per_unit:07d}" for i in range(start, stop)]),
    }
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in SCHEMAS["videos"]}, schema=SCHEMAS["videos"])


def samples_table(kind: str, ds: Dataset, start: int, stop: int, per_shard: int, identity: str) -> pa.Table:
    """`frame_samples` or `token_samples` rows of videos [start, stop), shard by shard."""
    n = stop - start
    ids = [video_id(ds, i) for i in range(start, stop)]
    shard_no = [i // per_shard for i in range(start, stop)]
    views = ds.views
    frames = 28 if ds.labeled else 1200
    common = {
        "dataset": pa.array([ds.name] * n), "video_id": pa.array(ids), "variant": pa.array([ds.variant] * n),
        "n_frames": pa.array(np.full(n, frames, np.int64)), "views": pa.array([views] * n, pa.list_(pa.string())),
        "fps": pa.array(np.full(n, 4.0 if ds.labeled else 2.0)), "size": pa.array(np.full(n, 128, np.int32)),
        "key": pa.array([v.replace("-", "_") for v in ids]), "status": pa.array(["ok"] * n),
        "config_hash": pa.array(["bench"] * n), "run_id": pa.array([f"{kind}-bench"] * n),
        "created_at": pa.array([T0 + timedelta(days=1 if kind == "frames" else 2, seconds=s) for s in shard_no],
                               SCHEMAS["shards"].field("created_at").type),
    }
    frames_shard = [f"{ds.frames_dir}/{s:05d}.tar" for s in shard_no]
    if kind == "frames":
        cols = common | {
            "shard": pa.array(frames_shard), "sha256": pa.array([hashlib.sha256(v.encode()).hexdigest() for v in ids]),
            "backend": pa.array(["pyav"] * n), "source_duration_s": pa.array(np.full(n, 300.0)),
            "decode_s": pa.array(np.full(n, 12.0)), "bytes": pa.array(np.full(n, 5 * 2**20, np.int64)),
            "encoding": pa.array(["jpg"] * n), "expected_frames": pa.array(np.full(n, frames, np.int64)),
            "unit": pa.array([f"{ds.name}-f{s:06d}" for s in shard_no]), "code_version": pa.array(["frames-1"] * n),
        }
        schema = SCHEMAS["frame_samples"]
    else:
        cols = common | {
            "shard": pa.array([f"{ds.tokens_dir(identity)}/{s:05d}.tar" for s in shard_no]),
            "tokenizer": pa.array([identity] * n), "grid_h": pa.array(np.full(n, 16, np.int32)),
            "grid_w": pa.array(np.full(n, 16, np.int32)), "n_views": pa.array(np.full(n, len(views), np.int32)),
            "codebook_size": pa.array(np.full(n, 8192, np.int64)), "frames_shard": pa.array(frames_shard),
            "frames_unit": pa.array([f"{ds.name}-f{s:06d}" for s in shard_no]),
            "unit": pa.array([f"{ds.name}-t{s:06d}" for s in shard_no]), "code_version": pa.array(["tokenize-1"] * n),
        }
        schema = SCHEMAS["token_samples"]
    return pa.table({f.name: cols.get(f.name, pa.nulls(n, f.type)) for f in schema}, schema=schema)


def marker(stage: str, ds: Dataset, unit: str, path: str, rows: pa.Table, created: datetime) -> pa.Table:
    row = {"stage": stage, "dataset": ds.name, "unit": unit, "path": path, "n_samples": rows.num_rows,
           "n_failed": rows.num_rows - (pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0), "bytes": 0,
           "config_hash": "bench", "code_version": f"{stage}-1", "run_id": f"{stage}-bench", "created_at": created}
    return pa.Table.from_pylist([row], schema=SCHEMAS["shards"])


def write_range(home: str, kind: str, ds: Dataset, first_group: int, last_group: int, group: int, identity: str,
                ingest: tuple[dict, str] | None) -> int:
    """Every unit (or shard) in [first_group, last_group) of `ds`: rows file, then its marker,
    as the stages commit them. Runs in a worker process; threads overlap the fsyncs."""
    root = DataRoot(home)
    start, stop = first_group * group, min(last_group * group, ds.n)
    table = (videos_table(ds, start, stop, group, ingest) if kind == "ingest"
             else samples_table(kind, ds, start, stop, group, identity))

    def one(g: int) -> None:
        rows = table.slice(g * group - start, min(group, stop - g * group))
        if kind == "ingest":
            unit = f"{ds.name}-u{g:07d}"
            path = root.table_dir("videos", ds.name, f"{unit}.parquet")
            write_parquet_atomic(rows, path)
            created = T0 + timedelta(hours=1, milliseconds=g)
            write_parquet_atomic(marker("ingest", ds, unit, root.relative(path), rows, created),
                                 root.table_dir("shards", "ingest", f"{ds.name}--{unit}.parquet"))
            return
        folder = ds.frames_dir if kind == "frames" else ds.tokens_dir(identity)
        unit = f"{ds.name}-{'f' if kind == 'frames' else 't'}{g:06d}"
        write_parquet_atomic(rows, root.home / folder / f"{g:05d}.parquet")
        created = T0 + timedelta(days=1 if kind == "frames" else 2, seconds=g, milliseconds=1)
        write_parquet_atomic(marker(kind, ds, unit, f"{folder}/{g:05d}.tar", rows, created),
                             root.table_dir("shards", kind, f"{ds.name}--{Path(folder).name}--{g:05d}.parquet"))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(first_group, last_group)))
    return last_group - first_group


def build(home: Path, datasets: list[Dataset], per_unit: int, per_shard: int, workers: int, identity: str,
          ingest: dict[str, tuple[dict, str]], ranges: dict[str, tuple[int, int]] | None = None) -> int:
    """Write the datasets' units (`ingest`: what `videos_table` takes, per dataset); `ranges`
    (dataset -> video range) adds ingest units to an existing root."""
    jobs = []
    for ds in datasets:
        lo, hi = (ranges or {}).get(ds.name, (0, ds.n))
        stages = [("ingest", per_unit)] + ([] if ranges else [("frames", per_shard), ("tokenize", per_shard)])
        for kind, group in stages:
            first, last = lo // group, -(-hi // group)
            step = 2048
            for g in range(first, last, step):
                jobs.append((str(home), kind, ds, g, min(g + step, last), group, identity,
                             ingest.get(ds.name) if kind == "ingest" else None))
    with ProcessPoolExecutor(workers) as pool:
        return sum(pool.map(_write_job, jobs))


def _write_job(job: tuple) -> int:
    return write_range(*job)


def prepare_labeled(home: Path, ds: Dataset) -> tuple[Path, tuple[dict, str]]:
    """The labeled dataset's manifest, and per video the fingerprint and entry key ingest
    would record for it, so that `vimpac plan` finds every video cached as after a real ingest."""
    from stages.config import DatasetConfig, IngestConfig, config_hash
    from stages.ingest.sources import list_source
    from stages.ingest.stage import entry_key

    path = home / "sources" / f"{ds.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in manifest_rows(ds, 0, ds.n)))
    cfg = IngestConfig()
    listing = list_source(DatasetConfig(name=ds.name, source=str(path)), cfg)
    h = config_hash(cfg)
    return path, ({e.video_id: (e.fingerprint, entry_key(ds.name, e, h)) for e in listing.entries}, h)


def write_datasets(root: DataRoot, datasets: list[Dataset], manifest: Path) -> None:
    from warehouse.tables import write_rows

    for ds in datasets:
        write_rows("datasets", [{"dataset": ds.name, "source": str(manifest) if ds.labeled else "https://videos.example/howto100m.csv",
                                 "layout": "manifest", "labeled": ds.labeled, "flip_sensitive": False,
                                 "classes": [label(i) for i in range(N_CLASSES)] if ds.labeled else [], "n_entries": ds.n,
                                 "updated_at": T0}], root.table_dir("datasets", ds.name, "current.parquet"))


def plan_file(home: Path, manifest: Path, tokenizer: Path) -> Path:
    path = home / "sources" / "plan.yaml"  # JSON is YAML
    path.write_text(json.dumps({"name": "catalog-scale", "datasets": [{"name": LABELED, "source": str(manifest)}],
                                "stages": ["ingest", "frames", "tokenize"], "tokenize": {"tokenizer": str(tokenizer)}}))
    return path


FINETUNE = """
import sys, time
sys.path.insert(0, {repo!r})
from stages.finetune.splits import select_split
from warehouse.layout import DataRoot
t0 = time.perf_counter()
s = select_split(DataRoot({home!r}), {dataset!r}, "train:test", {identity!r})
print(f"finetune_s={{time.perf_counter() - t0:.3f}} train={{len(s.train)}} eval={{len(s.eval)}}")
"""


def commands(home: Path, plan: Path, identity: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "flows.cli", "--home", str(home)]
    return {
        "count": cli + ["sql", "SELECT count(*) AS videos FROM videos", "--format", "csv"],
        "filtered": cli + ["sql", f"SELECT split, count(*) AS videos, round(sum(duration_s) / 3600, 1) AS hours FROM videos "
                                  f"WHERE dataset = '{LABELED}' AND status = 'ok' GROUP BY split ORDER BY split"],
        "status": cli + ["status"],
        "plan": cli + ["plan", "--config", str(plan)],
        "finetune": [sys.executable, "-c", FINETUNE.format(repo=str(REPO), home=str(home), dataset=LABELED, identity=identity)],
    }


def timed(cmd: list[str], timeout: float | None) -> tuple[float | None, str]:
    """(wall seconds, output) of a command; None when it ran past `timeout` (then killed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIMPAC_HOME",)}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited with {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return seconds, p.stdout


def measure(home: Path, plan: Path, identity: str, timeout: float | None, phase: str) -> tuple[dict[str, float | None], dict]:
    times: dict[str, float | None] = {}
    outputs = {}
    for name, cmd in commands(home, plan, identity).items():
        seconds, out = timed(cmd, timeout)
        if name == "finetune" and seconds is not None:
            seconds = float(out.split("finetune_s=")[1].split()[0])  # the lookups, not importing torch
        times[name] = seconds
        outputs[name] = out
        shown = f"{seconds:.2f} s" if seconds is not None else f"> {timeout:.0f} s (stopped)"
        print(f"  {phase:<17} {name:<9} {shown}", flush=True)
    return times, outputs


def catalog_files(home: Path) -> int:
    return sum(1 for p in home.rglob("*.parquet") if "_schema" not in p.parts and "summaries" not in p.parts
               and "sources" not in p.parts)


def compact(home: Path, *options: str) -> tuple[float, str]:
    seconds, out = timed([sys.executable, "-m", "flows.cli", "--home", str(home), "compact", *options], None)
    return seconds, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1_200_000, help="videos in the catalog, both datasets (default 1.2M: HowTo100M)")
    ap.add_argument("--labeled", type=int, default=13_320, help="of which in the labeled dataset (default 13,320: UCF101)")
    ap.add_argument("--per-unit", type=int, default=16, help="videos per ingest unit (ingest.batch_size; default 16)")
    ap.add_argument("--per-shard", type=int, default=45, help="videos per frame and token shard (45: 256 MB of 6-minute "
                    "videos at 2 FPS, 128 px)")
    ap.add_argument("--add", type=int, default=1000, help="videos added after compaction for the incremental step")
    ap.add_argument("--home", type=Path, default=REPO / "vimpac-data" / "bench-catalog-scale")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes writing the catalog")
    ap.add_argument("--before-timeout", type=float, default=30.0, help="stop each query before compaction after this many "
                    "seconds (0: no limit)")
    ap.add_argument("--record", action="store_true", help="append the results to bench/RESULTS.md")
    args = ap.parse_args()
    if not 0 < args.labeled < args.videos:
        ap.error(f"--labeled must be between 1 and --videos - 1 (got {args.labeled} of {args.videos})")
    home = args.home.resolve()
    t_all = time.perf_counter()
    load = os.getloadavg()[0]
    shutil.rmtree(home, ignore_errors=True)
    root = DataRoot(home).ensure()
    from warehouse.catalog import Catalog

    # The catalog file's views, written while the root is empty: binding them later would read
    # every unit file (what compaction is for); they find files added after them anyway.
    Catalog(root).refresh()
    labeled = Dataset(LABELED, 0, args.labeled, True)
    pretrain = Dataset(PRETRAIN, args.labeled, args.videos - args.labeled, False)
    tokenizer = home / "sources" / TOKENIZER_FILE
    tokenizer.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.write_bytes(b"catalog-scale bench tokenizer\n")
    from stages.tokenize.stage import file_identity

    identity = file_identity(tokenizer)
    manifest, labeled_ingest = prepare_labeled(home, labeled)
    print(f"building {args.videos} videos ({pretrain.n} {PRETRAIN}, {labeled.n} {LABELED}) in {home} ...", flush=True)
    t0 = time.perf_counter()
    build(home, [pretrain, labeled], args.per_unit, args.per_shard, args.workers, identity, {LABELED: labeled_ingest})
    write_datasets(root, [pretrain, labeled], manifest)
    os.sync()  # what the build wrote is on disk before anything is timed
    build_s = time.perf_counter() - t0
    units = -(-pretrain.n // args.per_unit) + -(-labeled.n // args.per_unit)
    files_before = catalog_files(home)
    print(f"built in {build_s:.0f} s: {units} ingest units, {files_before} catalog files", flush=True)
    plan = plan_file(home, manifest, tokenizer)

    timeout = args.before_timeout or None
    before, _ = measure(home, plan, identity, timeout, "before compaction")
    # The baseline, in the same run: the same catalog compacted with one reader (how compaction
    # read its unit files before they were read in chunks side by side), on a copy.
    baseline_home = home.with_name(home.name + "-one-reader")
    shutil.rmtree(baseline_home, ignore_errors=True)
    shutil.copytree(home, baseline_home, symlinks=True)
    os.sync()
    compact_s, compact_out = compact(home)
    print(f"  vimpac compact    {compact_s:.1f} s\n" + "\n".join("    " + line for line in compact_out.splitlines()), flush=True)
    one_reader_s, one_reader_out = compact(baseline_home, "--readers", "1")
    print(f"  vimpac compact --readers 1 (baseline) {one_reader_s:.1f} s\n"
          + "\n".join("    " + line for line in one_reader_out.splitlines()), flush=True)
    shutil.rmtree(baseline_home, ignore_errors=True)
    files_after = catalog_files(home)
    after, outputs = measure(home, plan, identity, None, "after compaction")
    counted = outputs["count"].split()[-1]
    if counted != str(args.videos):
        raise RuntimeError(f"count after compaction says {counted} videos, expected {args.videos}:\n{outputs['count']}")

    # Incremental: more videos, ingested in new units (as a later ingest run batches them), then
    # compaction again.
    start = -(-pretrain.n // args.per_unit) * args.per_unit
    grown = Dataset(PRETRAIN, args.labeled, start + args.add, False)
    build(home, [grown], args.per_unit, args.per_shard, args.workers, identity, {}, ranges={PRETRAIN: (start, grown.n)})
    os.sync()
    add_s, add_out = compact(home)
    rewritten = sum(int(line.split(" rows in ")[0].rsplit(" ", 1)[-1]) for line in add_out.splitlines()
                    if line.startswith("compact ") and " rows in " in line)
    print(f"  +{args.add} videos: vimpac compact {add_s:.1f} s, {rewritten} rows written", flush=True)
    total = timed(commands(home, plan, identity)["count"], None)[1].split()[-1]
    if total != str(args.videos + args.add):
        raise RuntimeError(f"count after the addition says {total} videos, expected {args.videos + args.add}")

    def cell(v: float | None, limit: float | None = None) -> str:
        return f"> {limit:.0f}" if v is None else f"{v:.2f}"

    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    lines = [f"{args.videos:,} videos ({pretrain.n:,} {PRETRAIN} + {labeled.n:,} {LABELED}), {units:,} ingest units of "
             f"{args.per_unit}, shards of {args.per_shard}; {files_before:,} catalog files before compaction, "
             f"{files_after:,} after; {machine}; load average {load:.2f} at the start; build {build_s:.0f} s, "
             f"{(time.perf_counter() - t_all) / 60:.1f} min in all.", "",
             "| command | before compaction s | after s | target s |", "|---|---:|---:|---:|"]
    for name in before:
        lines.append(f"| {name} | {cell(before[name], timeout)} | {cell(after[name])} | {TARGETS.get(name, '-')} |")
    lines += [f"| vimpac compact (all of it) | | {compact_s:.1f} | 120 |",
              f"| baseline: vimpac compact --readers 1 (a copy of the same catalog) | | {one_reader_s:.1f} | |",
              f"| vimpac compact after +{args.add:,} videos | | {add_s:.1f} ({rewritten:,} rows written) | |", ""]
    final = (f"catalog-scale: videos={args.videos} units={units} files={files_after} status_s={after['status']:.2f} "
             f"count_s={after['count']:.2f} plan_s={after['plan']:.2f}")
    if args.record:
        block = (f"\n## Catalog at scale (`python bench/catalog_scale.py --videos {args.videos}`), {date.today().isoformat()}\n\n"
                 + "\n".join(lines) + f"\n- `{final}`\n")
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(block)
        print("appended to bench/RESULTS.md")
    else:
        print("\n".join(lines))
    print(final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
