"""`vimpac`: the command line. Heavy imports (prefect, mlflow) happen only in the commands that
run flows, after the data root's environment is set, so `vimpac sql` and `vimpac status`
answer in well under a second."""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from pathlib import Path

from stages import threads
from stages.config import (
    PRESETS,
    STAGES,
    ConfigError,
    LAYOUTS,
    PIXEL_STAGE,
    DatasetConfig,
    GridConfig,
    PipelineConfig,
    PixelPretrainConfig,
    build,
    deep_merge,
    load_pipeline_file,
    preset,
    resolve_pipeline,
    scratch_pixels_preset,
)
from warehouse.layout import DataRoot

# Commands whose process trains, encodes or decodes: they take a share of the cores (stages/threads.py).
COMPUTING_COMMANDS = ("run", "demo", "tokens-png")
SCRATCH_ROW = "scratch"  # the demo's report compares every row with the from-scratch baseline
# The demo's data stages alone: what `vimpac demo --grid` and bench/effect.py run before a grid.
DEMO_DATA_STAGES = "stages=[ingest,frames,tokenizer,tokenize]"

# Sections of `vimpac status`, in order: a query, or None for the catalog's per-dataset summary
# of that title (warehouse/summaries.py: kept by compaction, so no section reads every row).
STATUS_SQL = {
    "datasets": None,
    "frame samples": None,
    "token samples": None,
    "units of work": """
        SELECT stage, dataset, count(*) AS units, sum(n_samples) AS samples, sum(n_failed) AS failed,
               strftime(max(created_at), '%Y-%m-%d %H:%M:%S') AS last_commit
        FROM shards GROUP BY stage, dataset ORDER BY stage, dataset""",
    "pretrained models": """
        SELECT summary->>'run_name' AS recipe, dataset AS trained_on, CAST(summary->>'steps' AS INTEGER) AS steps,
               round(CAST(summary->>'eval_mask_acc' AS DOUBLE), 3) AS mask_acc,
               round(CAST(summary->>'eval_mask_acc_baseline' AS DOUBLE), 3) AS most_frequent_baseline,
               round(CAST(summary->>'eval_cl_acc' AS DOUBLE), 3) AS cl_acc, summary->>'model_uri' AS model
        FROM runs WHERE stage = 'pretrain' AND status = 'completed' ORDER BY finished_at DESC LIMIT 5""",
    "results (top-1, %)": """
        SELECT pretrain_recipe AS pretrained, dataset, split, finetune_recipe AS finetune, protocol,
               round(100 * value, 1) AS top1, n_videos AS videos, grid
        FROM results WHERE metric = 'top1' ORDER BY created_at DESC LIMIT 12""",
    "recent runs": """
        SELECT run_id, stage, dataset, status, strftime(started_at, '%Y-%m-%d %H:%M:%S') AS started,
               round(epoch(finished_at) - epoch(started_at), 1) AS seconds, mlflow_run_id
        FROM runs ORDER BY started_at DESC LIMIT 8""",
    "failures by cause": None,
}


def _print_table(table, title: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for name in table.column_names:
        t.add_column(name, overflow="fold")
    for row in table.to_pylist():
        t.add_row(*["" if v is None else str(v) for v in row.values()])
    Console(width=max(120, Console().width)).print(t)


def _emit(table, fmt: str) -> None:
    if fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in table.to_pylist():
            writer.writerow(["" if v is None else v for v in row.values()])
    elif fmt == "json":
        json.dump(table.to_pylist(), sys.stdout, default=str, indent=1)
        sys.stdout.write("\n")
    else:
        _print_table(table)


def cmd_sql(args: argparse.Namespace) -> int:
    from warehouse.catalog import Catalog

    _emit(Catalog(args.home).query(args.query), args.format)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from warehouse.catalog import Catalog
    from warehouse.summaries import SUMMARIES, read_summary

    catalog = Catalog(args.home)
    print(f"data root: {catalog.root.home}")
    for title, sql in STATUS_SQL.items():
        table = read_summary(catalog, SUMMARIES[title]) if sql is None else catalog.query(sql)
        if table.num_rows:
            _print_table(table, title)
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    """Merge committed unit files into large per-dataset files (docs/catalog.md, "Compaction")."""
    from warehouse.compact import compact_all

    root = DataRoot(args.home)
    if not (root.tables / "shards").is_dir():
        raise FileNotFoundError(f"no vimpac catalog under {root.home} (run a stage first, or pass --home)")
    t0 = time.perf_counter()
    sizes = {"target_rows": args.target_rows} if args.target_rows else {}
    if args.readers:
        sizes["readers"] = args.readers
    results = compact_all(root, datasets=args.dataset, wait=args.wait, report=lambda r: print(r.describe(), flush=True), **sizes)
    done = [r for r in results if not r.skipped]
    print(f"compacted {len(done)} of {len(results)} (stage, dataset) pairs in {time.perf_counter() - t0:.1f} s: "
          f"{sum(r.rows for r in done)} rows in {sum(r.files_written for r in done)} files written, "
          f"{sum(r.files_removed for r in done)} files removed")
    return 0


def _flows(home: str | None):
    """Set Prefect/MLflow state under the data root (before Prefect is imported: it reads its
    settings then) and return the `flows` package, whose flow modules load on first use
    (flows/__init__.py): importing every flow costs about 6 s of torch and model code that
    `vimpac run ingest` or `frames` never uses (measured: 8.9 s for flows.pipeline against 3.1 s
    for flows.ingest)."""
    from flows.env import configure_environment

    root = configure_environment(home)
    import flows

    return root, flows


def _stage_flow(home: str | None, stage: str):
    """The data root and the flow of `vimpac run STAGE`, its module alone imported: the
    deployments' table (flows/serve.py) names each stage's flow; pretrain-pixels is not served."""
    from flows.serve import SPECS, load_flow

    root, _ = _flows(home)
    return root, load_flow("flows.pretrain:pretrain_pixels" if stage == PIXEL_STAGE else SPECS[stage].flow)


def _has_tokens(home: str | None, dataset: str) -> bool:
    from warehouse.catalog import Catalog

    try:
        return bool(Catalog(home).rows("SELECT count(*) FROM token_samples WHERE dataset = ?", [dataset])[0][0])
    except FileNotFoundError:
        return False


def _dataset_from_args(args: argparse.Namespace, file_data: dict) -> DatasetConfig:
    """--source, else the --config file's entry, else what the catalog recorded at ingest."""
    if args.source:
        fields = {"name": args.dataset, "source": args.source, "flip_sensitive": args.flip_sensitive}
        if args.layout:
            fields["layout"] = args.layout
        return build(DatasetConfig, fields)
    for ds in file_data.get("datasets") or []:
        if isinstance(ds, dict) and ds.get("name") == args.dataset:
            return build(DatasetConfig, ds)
    if args.stage != "ingest":
        from warehouse.catalog import Catalog

        try:
            rows = Catalog(args.home).rows("SELECT source, layout, flip_sensitive FROM datasets WHERE dataset = ?", [args.dataset])
        except FileNotFoundError:
            rows = []
        if rows:
            source, _, flip = rows[0]
            return build(DatasetConfig, {"name": args.dataset, "source": source, "flip_sensitive": bool(flip) or args.flip_sensitive})
        if args.stage == "pretrain" and _has_tokens(args.home, args.dataset):
            # Pretraining reads token shards only: tokens made elsewhere and copied in are enough.
            return build(DatasetConfig, {"name": args.dataset, "source": f"token shards of {args.dataset}"})
        raise ConfigError(f"dataset {args.dataset!r} has not been ingested into {DataRoot(args.home).home} (run `vimpac run ingest` first)")
    raise ConfigError(f"dataset {args.dataset!r}: give --source, or a --config file that defines it")


def load_grid(path: Path, overrides: list[str]) -> GridConfig:
    """A grid file (YAML/TOML). `--set` keys that are grid fields (parallel=2, name=x) set the
    grid; any other key (train.epochs=3) is a fine-tune override for every cell."""
    data = load_pipeline_file(path)
    for m in data.get("models") or []:
        ref = m.get("ref") if isinstance(m, dict) else m
        # A checkpoint path in the grid file is relative to the file, like dataset sources; the
        # named rows (scratch, scratch-pixels:PRESET) and registry or URL refs are not paths.
        if (isinstance(ref, str) and ref != "scratch" and scratch_pixels_preset(ref) is None and not ref.startswith("models:/")
                and "://" not in ref and not Path(ref).expanduser().is_absolute()):
            resolved = str((path.parent / Path(ref).expanduser()).resolve())
            if isinstance(m, dict):
                m["ref"] = resolved
            else:
                data["models"][data["models"].index(m)] = resolved
    grid_keys = [o for o in overrides if o.partition("=")[0].split(".")[0] in GridConfig.model_fields]
    cell_keys = [o for o in overrides if o not in grid_keys]
    data["set"] = list(data.get("set") or []) + cell_keys
    return build(GridConfig, data, grid_keys)


def _pipeline_presets(args: argparse.Namespace) -> dict[str, str]:
    """`--preset STAGE=NAME` flags of pipeline-wide commands."""
    presets = {}
    for item in args.preset or []:
        stage, sep, name = item.partition("=")
        if not sep:
            raise ConfigError(f"pipeline presets are STAGE=NAME, got {item!r}")
        presets[stage] = name
    return presets


def cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.set or [])
    if getattr(args, "dask", None) and args.stage not in ("ingest", "frames", "tokenize", "pipeline"):
        raise ConfigError("--dask applies to `vimpac run ingest|frames|tokenize|pipeline`")
    if args.stage == "evaluate":
        if not args.grid:
            raise ConfigError("vimpac run evaluate needs --grid FILE (models, datasets and splits; see README)")
        grid = load_grid(args.grid, overrides)
        root, flows = _flows(args.home)
        outcome = flows.evaluate.evaluate(grid, str(root.home), args.force)
        print(f"{len(outcome['cells'])} cells done; report: vimpac report --grid {grid.name}")
        cmd_report(argparse.Namespace(home=str(root.home), metric="top1", grid=grid.name, out=None))
        return 0
    if args.stage == "finetune":
        return _finetune_one(args, overrides)
    if args.stage == "pipeline":
        dask = [f"dask={args.dask}"] if getattr(args, "dask", None) else []
        cfg = resolve_pipeline(args.config, overrides + dask, _pipeline_presets(args))
        if not cfg.datasets:
            raise ConfigError("the pipeline has no datasets: give --config FILE naming some")
        _config_threads(cfg.threads)
        root, flows = _flows(args.home)
        flows.pipeline.pipeline(cfg, str(root.home), args.force)
        return 0
    if not args.dataset:
        raise ConfigError(f"vimpac run {args.stage} needs --dataset NAME")
    file_data = load_pipeline_file(args.config) if args.config else {}
    if file_data.get("threads") is not None:
        _config_threads(build(PipelineConfig, {"threads": file_data["threads"]}).threads)
    stage_data = dict(file_data.get(args.stage) or {})
    if args.preset:
        stage_data = deep_merge(preset(args.stage, args.preset[0]), stage_data)
    # `--set batch_size=4` and `--set ingest.batch_size=4` both address the stage config.
    stage_overrides = [o[len(args.stage) + 1 :] if o.startswith(args.stage + ".") else o for o in overrides]
    for flag, stages in (("fps", ("frames",)), ("size", ("frames", "tokenizer", "tokenize")), ("views", ("frames",)),
                         ("tokenizer", ("tokenize", "pretrain"))):
        value = getattr(args, flag, None)
        if value is not None:
            if args.stage not in stages:
                raise ConfigError(f"--{flag} applies to `vimpac run {'|'.join(stages)}`")
            stage_overrides.append(f"{flag}={value}")
    cfg_model = PixelPretrainConfig if args.stage == "pretrain-pixels" else PipelineConfig.model_fields[args.stage].annotation
    stage_cfg = build(cfg_model, stage_data, stage_overrides)
    if args.stage in ("pretrain", "pretrain-pixels") and int(os.environ.get("RANK", "0")) > 0:
        return _pretrain_worker_rank(args, stage_cfg)
    dataset = _dataset_from_args(args, file_data)
    root, stage_flow = _stage_flow(args.home, args.stage)
    # --dask, else a pipeline file's top-level `dask:` (flows/dask_runner.py).
    dask = getattr(args, "dask", None) or (file_data.get("dask") if args.stage in ("ingest", "frames", "tokenize") else None)
    if dask:
        from flows.dask_runner import parse_dask

        try:
            parse_dask(dask)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    summary = stage_flow(dataset, stage_cfg, str(root.home), args.force, **({"dask": dask} if dask else {}))
    print(json.dumps(summary, indent=1, default=str))
    return 0


def _config_threads(value: int | None) -> None:
    """A pipeline config's `threads`, read after the process claimed its share (--threads wins)."""
    if value is not None:
        threads.claim(config=value)


def _finetune_one(args: argparse.Namespace, overrides: list[str]) -> int:
    """One grid cell from flags: --model REF --dataset NAME [--split S] [--preset P] [--set ...].
    Under torchrun, rank 0 runs the evaluate flow and the other ranks the same cell without
    Prefect or MLflow (as for pretraining)."""
    if not args.dataset or not args.model:
        raise ConfigError("vimpac run finetune needs --model REF (scratch, models:/NAME/VERSION or a path) and --dataset NAME")
    grid = build(GridConfig, {"name": args.grid_name or "adhoc", "models": [args.model],
                              "datasets": [{"name": args.dataset, "splits": [args.split or "auto"]}],
                              "presets": args.preset or ["default"], "set": overrides})
    if int(os.environ.get("RANK", "0")) > 0:
        from stages.finetune.train import ModelSource, finetune_cell

        from stages.finetune.grid import expand_grid

        cell = expand_grid(grid)[0]
        ref = cell.model.ref
        if ref.startswith("models:/"):
            from flows.env import configure_environment
            from flows.registry import download_version

            configure_environment(args.home)
            local, uri = download_version(ref)
            source = ModelSource(uri, local)
        else:
            source = ModelSource(ref, None if ref == "scratch" else Path(ref))
        finetune_cell(DataRoot(args.home), source, cell.dataset, cell.split, cell.config, preset=cell.preset, grid=grid.name,
                      force=args.force)
        return 0
    root, flows = _flows(args.home)
    outcome = flows.evaluate.evaluate(grid, str(root.home), args.force)
    print(json.dumps(outcome["cells"], indent=1, default=str))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The results grid like the paper's Table 7: rows = pretraining recipe (and protocol),
    columns = datasets, mean +- std over seeds; with --baseline, paired differences and 95% CIs."""
    from stages.evaluate.report import build_report
    from warehouse.catalog import Catalog

    baseline = getattr(args, "baseline", None)  # callers from before --baseline pass no such field
    try:
        report = build_report(Catalog(args.home), metric=args.metric, grid=args.grid, baseline=baseline,
                              pretrain_metrics=getattr(args, "pretrain_metrics", False))
    except ValueError as e:  # results exist, but none for this metric or grid (or no such baseline): say which there are
        raise ConfigError(str(e)) from None
    if not report.rows:
        print("no results yet (run `vimpac run evaluate --grid FILE`)")
        return 0
    _print_table(report.to_arrow(), report.title)
    print(f"Metric: {report.caption()}.")
    if baseline is not None:
        _print_table(report.diff_to_arrow(), report.diff_title())
    out = Path(args.out) if args.out else DataRoot(args.home).home / "reports"
    out.mkdir(parents=True, exist_ok=True)
    name = f"results-{args.grid or 'all'}-{args.metric}" + (f"-vs-{baseline}" if baseline is not None else "")
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    (out / f"{stem}.md").write_text(report.to_markdown())
    (out / f"{stem}.csv").write_text(report.to_csv())
    print(f"wrote {out / stem}.md and .csv")
    return 0


def _pretrain_worker_rank(args: argparse.Namespace, cfg) -> int:
    """Ranks other than 0 under torchrun: the same training function, no Prefect flow and no
    MLflow (rank 0's flow tracks the run, and one writer keeps the catalog and MLflow's SQLite
    store sane: PITFALLS.md)."""
    from stages.pretrain.train import pretrain, resolve_tokenizer_identity

    root = DataRoot(args.home)
    datasets = cfg.datasets or [args.dataset]
    if args.stage == "pretrain-pixels":
        from stages.pretrain.pixels import pretrain_pixels

        pretrain_pixels(root, datasets, cfg, force=args.force)
        return 0
    cfg = cfg.model_copy(update={"tokenizer": resolve_tokenizer_identity(root, datasets, cfg.tokenizer)})
    pretrain(root, datasets, cfg, force=args.force)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Every backbone preset with its parameter counts and the mask block counts per resolution."""
    from rich.console import Console
    from rich.table import Table

    import torch

    from models.backbone import PRESETS as BACKBONES
    from models.backbone import VideoTransformer
    from models.masking import blocks_for_ratio, induced_ratio
    from models.pretrain import PretrainModelConfig, VIMPACPretrainer
    from stages.config import PretrainConfig
    from stages.pretrain.train import model_config

    resolutions = [(5, 128), (5, 256), (10, 128), (10, 256)]
    table = Table(title="backbone presets (Table 3); heads as in each pretrain preset")
    for col in ("preset", "layers x dim", "heads x dim", "mlp", "layout", "backbone", "heads", "vocab"):
        table.add_column(col)
    for name, make in BACKBONES.items():
        cfg = make()
        stage = build(PretrainConfig, preset("pretrain", name) if name in PRESETS["pretrain"] else {})
        with torch.device("meta"):
            model = VIMPACPretrainer(PretrainModelConfig(backbone=cfg, cl_hidden=stage.model.cl_hidden,
                                                         cl_layers=stage.model.cl_layers, cl_dim=stage.model.cl_dim))
        table.add_row(name, f"{cfg.n_layers} x {cfg.dim}", f"{cfg.n_heads} x {cfg.head_dim}", str(cfg.mlp_dim), cfg.layout,
                      f"{model.backbone.num_params() / 1e6:.2f}M", f"{model.head_params() / 1e6:.2f}M", str(cfg.n_codes))
    blocks = Table(title="block masking per input resolution (Table 2): blocks closest to 15%, induced ratio")
    blocks.add_column("frames x size")
    blocks.add_column("token map")
    blocks.add_column("blocks")
    blocks.add_column("ratio")
    for t, s in resolutions + [(5, 64)]:
        g = s // 8
        n = blocks_for_ratio(t, g, g)
        blocks.add_row(f"{t} x {s}", f"{t} x {g} x {g}", str(n), f"{100 * induced_ratio(t, g, g, n):.1f}%")
    recipes = Table(title="pretraining presets (Table 4: Analysis = small/base, Results = large_half then large_half_256)")
    for col in ("preset", "model", "T x S", "lr", "warm-up", "epochs", "batch", "negatives"):
        recipes.add_column(col)
    for name in ("small", "base", "large_half", "large_half_256", "tiny"):
        c = build(PretrainConfig, preset("pretrain", name))
        t = c.train
        epochs = f"{t.epochs:g} of {t.schedule_epochs:g}" if t.schedule_epochs else f"{t.epochs:g}"
        if name == "large_half_256":
            epochs += " (continue_from)"
        recipes.add_row(name, c.model.preset, f"{c.data.frames} x {c.data.size or 'any'}", f"{t.lr:g}", f"{t.warmup:g}", epochs,
                        f"{t.batch_size} x {t.accumulate} = {t.batch_size * t.accumulate}", str(t.batch_size - 1))
    sizes = Table(title="model sizes of Table 6 as overrides of a preset (--set model.layers=L --set model.dim=D)")
    for col in ("layers x dim", "overrides", "heads x dim", "mlp", "backbone"):
        sizes.add_column(col)
    for layers, dim in ((6, 512), (6, 768), (12, 512), (12, 768)):
        c = build(PretrainConfig, preset("pretrain", "small"), [f"model.layers={layers}", f"model.dim={dim}"])
        b = model_config(c, 8192, 16).backbone
        with torch.device("meta"):
            n = VideoTransformer(b).num_params()
        sizes.add_row(f"{layers} x {dim}", f"model.layers={layers} model.dim={dim}", f"{b.n_heads} x {b.head_dim}", str(b.mlp_dim),
                      f"{n / 1e6:.1f}M")
    console = Console(width=max(120, Console().width))
    console.print(table)
    console.print(blocks)
    console.print(recipes)
    console.print(sizes)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from stages.demo_data import generate_demo_corpus

    t0 = time.perf_counter()
    datasets = generate_demo_corpus(args.out_dir, scale=args.scale, seed=args.seed, progress=print)
    for d in datasets:
        print(f"{d.name}: {d.n_videos} videos, layout {d.layout}, {len(d.classes)} classes -> {d.path}")
    print(f"demo corpus ready in {time.perf_counter() - t0:.1f} s")
    return 0


def demo_pipeline_file(out_dir: Path, datasets) -> Path:
    import yaml

    # Paper settings scaled for CPU (DESIGN.md: tiny inputs for the demo): 2 FPS for the long
    # pretraining videos, 4 FPS for the short labeled clips, 64 px views.
    spec = {
        "name": "demo",
        "datasets": [
            {"name": d.name, "source": str(Path(d.path).resolve()), "flip_sensitive": d.flip_sensitive, "fps": 4.0 if d.labeled else 2.0}
            for d in datasets
        ],
        "frames": {"size": 64},
        # A tiny VQ-VAE trained on the pretraining set (CPU: about a minute and a half).
        "tokenizer": PRESETS["tokenizer"]["tiny"] | {"register_as": "vimpac-tokenizer-demo"},
        # The tiny VIMPAC model on the pretraining set's tokens: 300 steps of 8 videos (CPU:
        # about 80 s). Eight one-minute videos, so an epoch is one batch. Validated as the paper
        # does (on the downstream videos, Tables 6-16), so no pretraining video is held out; the
        # uncopyable mask accuracy there says whether it learned the motion (docs/learning.md).
        "pretrain": deep_merge(PRESETS["pretrain"]["tiny"], {
            "train": {"epochs": 300}, "register_as": "vimpac-backbone-demo",
            "validation": {"datasets": [d.name for d in datasets if d.labeled], "every": 100}}),
        # Table 7 in miniature: the from-scratch baseline and the backbone pretrained above,
        # fine-tuned on both labeled sets (split 1) with the tiny CPU preset, beside a linear
        # probe on their frozen features and the bag-of-codes floor.
        "evaluate": {"models": ["scratch", "pretrained"], "presets": ["tiny"], "protocols": ["finetune", "linear_probe", "bag_of_codes"]},
    }
    path = out_dir / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from stages.demo_data import generate_demo_corpus

    t0 = time.perf_counter()
    root = DataRoot(args.home).ensure()
    out_dir = root.home / "demo-corpus"
    print(f"[1/3] generating the demo corpus (scale {args.scale}) into {out_dir}")
    datasets = generate_demo_corpus(out_dir, scale=args.scale, seed=args.seed, progress=print)
    config_file = demo_pipeline_file(out_dir, datasets)
    grid = load_grid(args.grid, []) if getattr(args, "grid", None) else None
    cfg = resolve_pipeline(config_file, list(args.set or []) + ([DEMO_DATA_STAGES] if grid else []))
    _config_threads(cfg.threads)
    print(f"[2/3] running the pipeline ({', '.join(cfg.stages)}) from {config_file}")
    root, flows = _flows(str(root.home))
    flows.pipeline.pipeline(cfg, str(root.home), args.force)
    if grid is not None:
        print(f"[2/3] running grid {grid.name} from {args.grid}")
        flows.evaluate.evaluate(grid, str(root.home), args.force)
    print("[3/3] catalog summary (vimpac status):")
    cmd_status(argparse.Namespace(home=str(root.home)))
    name = grid.name if grid is not None else cfg.name
    cmd_report(argparse.Namespace(home=str(root.home), metric="top1", grid=name, out=None, baseline=SCRATCH_ROW))
    print(f"demo finished in {time.perf_counter() - t0:.1f} s; query it with: vimpac --home {root.home} sql \"SELECT * FROM videos\"")
    return 0


def cmd_tokens_png(args: argparse.Namespace) -> int:
    """Decode a video's tokens back to frames through the tokenizer's decoder."""
    root, flows = _flows(args.home)
    from stages.tokenize.render import render_tokens
    from stages.tokenize.stage import pick_device

    loaded = flows.tokenizer.resolve_tokenizer(args.tokenizer, pick_device("auto"))
    out = render_tokens(root, args.dataset, args.video_id, loaded, args.out, views=args.view or None, max_frames=args.max_frames)
    print(f"wrote {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """The resolved pipeline config; with --preset pretrain=large_half (any STAGE=NAME) that stage's
    preset under it, so a preset's numbers can be read before anything runs."""
    cfg = resolve_pipeline(args.config, list(args.set or []), _pipeline_presets(args))
    print(json.dumps(cfg.model_dump(), indent=2, default=str))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """What `vimpac run pipeline` with the same arguments would run, and why; runs nothing and
    writes nothing to the data root (docs/plan.md)."""
    from stages.plan import plan_pipeline

    presets = _pipeline_presets(args)
    cfg = resolve_pipeline(args.config, list(args.set or []), presets)
    if not cfg.datasets:
        raise ConfigError("the pipeline has no datasets: give --config FILE naming some")
    plan = plan_pipeline(cfg, args.home, force=args.force)
    if args.format == "json":
        json.dump(plan.to_json(), sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan for {cfg.name} in {plan.home}" + (" (--force)" if plan.force else ""))
    for column in ("stage", "dataset", "to run", "cached", "reason"):
        table.add_column(column, overflow="fold")
    for row in plan.table_rows():
        table.add_row(*row.values())
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in plan.notes():
        console.print(f"  note: {note}", highlight=False, soft_wrap=True)
    console.print(plan.summary(), highlight=False, soft_wrap=True)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from flows.env import configure_environment
    from flows.server import run_servers

    root = configure_environment(args.home)
    return run_servers(root, args.host, args.prefect_port, args.mlflow_port)


def cmd_serve(args: argparse.Namespace) -> int:
    """Register every stage flow and `pipeline` as deployments and run the flow runs the UI starts."""
    from flows.env import configure_environment

    pipeline_cfg = resolve_pipeline(args.config, list(args.set or [])) if args.config or args.set else None
    root = configure_environment(args.home)
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("vimpac serve needs a Prefect server: start `vimpac server` for this data root in another shell "
                          "(or set PREFECT_API_URL to a running server)")
    from flows.serve import DEPLOYMENT, SPECS, serve_deployments

    unknown = sorted(set(args.only or []) - set(SPECS))
    if unknown:
        raise ConfigError(f"--only: no deployment for {', '.join(unknown)} (there are {', '.join(SPECS)})")
    names = args.only or list(SPECS)
    print(f"serving {', '.join(f'{n}/{DEPLOYMENT}' for n in names)} from {root.home} to {os.environ['PREFECT_API_URL']}")
    serve_deployments(root, pipeline_cfg, limit=args.limit, names=names)
    return 0


def _threads_arg(value: str) -> str:
    try:
        threads.parse_threads(value, "--threads")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def _claim_threads(args: argparse.Namespace) -> None:
    """Before anything imports torch (OpenMP reads its settings when it loads): a computing
    command takes its share of the cores; `serve` hands --threads and the wait policy to the flow
    runs it starts, which take their share where they start computing."""
    given = getattr(args, "threads", None)
    try:
        if args.command in COMPUTING_COMMANDS:
            threads.claim(given, report=lambda text: print(f"vimpac: {text}", file=sys.stderr))
        elif args.command == "serve":
            if given is not None:
                os.environ["VIMPAC_THREADS"] = given
            threads.parse_threads(os.environ.get("VIMPAC_THREADS") or "1", "VIMPAC_THREADS")  # a bad value fails now
    except ValueError as e:  # a bad VIMPAC_THREADS
        raise ConfigError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", default=argparse.SUPPRESS, help="data root (default: $VIMPAC_HOME or ./vimpac-data)")
    common.add_argument("--threads", type=_threads_arg, default=argparse.SUPPRESS, metavar="N|off",
                        help="compute threads of this process (default: $VIMPAC_THREADS, the config's `threads`, "
                             "$OMP_NUM_THREADS, else the cores divided among the vimpac processes computing on this machine; "
                             "off: torch's default, every core)")
    parser = argparse.ArgumentParser(
        prog="vimpac", description="VIMPAC pipeline: raw videos -> tokens -> pretrained video transformer -> results.",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", parents=[common], help="generate the demo corpus into the data root and run the pipeline on it")
    p.add_argument("--scale", type=float, default=1.0, help="corpus size multiplier (default 1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="pipeline config override, e.g. ingest.workers=2")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.add_argument("--grid", type=Path, help="run this grid file (e.g. grids/table7-demo.yaml) on the demo data instead of the demo's own "
                   "evaluate stage")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-data", parents=[common], help="write the deterministic synthetic demo corpus to OUT_DIR")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("run", parents=[common], help="run one stage, or the whole pipeline, as a Prefect flow")
    p.add_argument("stage", choices=[*STAGES, "pretrain-pixels", "finetune", "pipeline"])
    p.add_argument("--dataset", help="dataset name (stage runs)")
    p.add_argument("--source", help="directory, manifest (.csv/.jsonl/.parquet), list (.txt), video file or URL")
    p.add_argument("--layout", choices=list(LAYOUTS))
    p.add_argument("--flip-sensitive", action="store_true", help="horizontal flips change this dataset's labels")
    p.add_argument("--fps", type=float, help="frames: sampling rate (paper: 2 for long videos, 4 for short clips)")
    p.add_argument("--size", type=int, help="frames: view side S in pixels")
    p.add_argument("--views", choices=["auto", "pretrain", "downstream"], help="frames: which fixed views to cut")
    p.add_argument("--tokenizer", help="tokenize: models:/NAME/VERSION, a checkpoint path, or dalle:ENC[,DEC]; "
                   "pretrain: whose token shards (models:/NAME/VERSION|latest)")
    p.add_argument("--config", type=Path, help="pipeline config file (YAML or TOML)")
    p.add_argument("--grid", type=Path, help="evaluate: grid file naming models, datasets, splits and presets")
    p.add_argument("--model", help="finetune: scratch, models:/NAME/VERSION|latest, or a pretrain checkpoint path")
    p.add_argument("--split", help="finetune: split set (1, 2, 3), TRAIN:EVAL split names, or auto")
    p.add_argument("--grid-name", help="finetune: grid name recorded with the results (default: adhoc)")
    p.add_argument("--preset", action="append", metavar="NAME",
                   help="stage preset (stage runs: NAME; pipeline: STAGE=NAME)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. batch_size=8")
    p.add_argument("--force", action="store_true", help="recompute even what is cached")
    p.add_argument("--dask", metavar="CLUSTER", help="ingest, frames, tokenize, pipeline: run the units on a Dask cluster: "
                   "local, local:N (N worker processes) or a scheduler address such as tcp://host:8786 (docs/scale-out.md)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", parents=[common], help="backbone presets, parameter counts and mask blocks per resolution")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("report", parents=[common], help="the results grid as a table (rows: pretraining recipe, columns: datasets)")
    p.add_argument("--metric", default="top1", choices=["top1", "top5", "mean_class"])
    p.add_argument("--grid", help="only this grid's results (default: all)")
    p.add_argument("--out", type=Path, help="folder for the Markdown and CSV copies (default: <home>/reports)")
    p.add_argument("--pretrain-metrics", action="store_true",
                   help="add each recipe's pretraining validation metrics (mask accuracy, beyond-copy accuracy, CL loss) "
                        "as columns, as the paper's Tables 6 and 8-16 show them")
    p.add_argument("--baseline", metavar="NAME",
                   help="a row label or recipe (e.g. scratch): add each row's paired difference against it, with a 95%% "
                        "confidence interval over seeds")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("sql", parents=[common], help="query the catalog (read-only)")
    p.add_argument("query")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser("status", parents=[common], help="short catalog summary")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("compact", parents=[common],
                       help="merge committed unit files into large per-dataset files (stage runs do it at their end)")
    p.add_argument("--dataset", action="append", metavar="NAME", help="only this dataset (repeatable; default: all)")
    p.add_argument("--target-rows", type=int, help="rows per compacted file (default 1,000,000)")
    p.add_argument("--readers", type=int, help="DuckDB connections reading each compaction's unit files side by side "
                   "(default: half the cores, at most 2, as two compactions run at a time)")
    p.add_argument("--wait", action="store_true",
                   help="wait for a running stage of a dataset instead of skipping it (it compacts when it ends anyway)")
    p.set_defaults(func=cmd_compact)

    p = sub.add_parser("server", parents=[common], help="run a Prefect server and an MLflow server for the data root (Ctrl-C stops both)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address both servers bind to (default 127.0.0.1; neither has authentication: bind wider only on purpose)")
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("serve", parents=[common], help="serve every stage flow and `pipeline` as Prefect deployments (needs `vimpac server`)")
    p.add_argument("--config", type=Path, help="pipeline file whose settings fill the deployments' parameter forms")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override in those defaults")
    p.add_argument("--only", action="append", metavar="NAME", help="serve only these deployments (repeatable)")
    p.add_argument("--limit", type=int, help="most flow runs executing at once (default: no limit)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("tokens-png", parents=[common], help="render a video's tokens back to a frame grid PNG")
    p.add_argument("--dataset", required=True)
    p.add_argument("--video-id", required=True)
    p.add_argument("--tokenizer", required=True, help="the tokenizer that made the tokens (models:/NAME/VERSION or a path)")
    p.add_argument("--view", action="append", help="views to render (default: all)")
    p.add_argument("--max-frames", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("tokens.png"))
    p.set_defaults(func=cmd_tokens_png)

    p = sub.add_parser("config", parents=[common], help="print the resolved pipeline config")
    p.add_argument("--config", type=Path)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--preset", action="append", metavar="STAGE=NAME", help="stage preset, e.g. pretrain=large_half (Table 4)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("plan", parents=[common], help="show which units of which stages `run pipeline` would run and why; runs nothing")
    p.add_argument("--config", type=Path, help="pipeline config file (YAML or TOML)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, as for `run pipeline`")
    p.add_argument("--preset", action="append", metavar="STAGE=NAME", help="stage preset, as for `run pipeline`")
    p.add_argument("--force", action="store_true", help="plan a forced run (everything recomputed)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not hasattr(args, "home"):
        args.home = None
    try:
        _claim_threads(args)
        return args.func(args)
    except ConfigError as e:
        print(f"vimpac: configuration error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"vimpac: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a flow's failure is reported, not dumped as a trace
        import duckdb

        if isinstance(e, duckdb.Error):
            print(f"vimpac: SQL error: {e}", file=sys.stderr)
            return 2
        print(f"vimpac: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
