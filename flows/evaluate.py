"""The `evaluate` flow: a grid of fine-tuning + multi-view evaluation cells (models x datasets x
splits x presets), each a Prefect task with its own nested MLflow run, written to the catalog's
`results` and `predictions` views.

Cells run one after another (one GPU, or CPU), or `parallel` at a time over the visible GPUs;
cells running at once split the process's compute threads (stages/threads.py).
A cell whose evaluation is already in the catalog is reported as cached and does no work; one
failed cell is logged and listed and does not stop the others; the flow fails at the end if
any cell failed, after everything else was committed.

Rows may be token backbones (scratch, VIMPAC checkpoints, `pretrain:` recipes) or pixel ones
(pretrain-pixels ST-MAE checkpoints, `scratch-pixels:PRESET`, `pretrain_pixels:` recipes); the
stage picks each cell's family from its checkpoint.
The bag-of-codes floor is a probe on a tokenizer's codes: in a grid of pixel rows only, on a
dataset without token shards, it is not applicable and is skipped with a log line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stages import threads
from stages.config import ConfigError, DatasetConfig, GridConfig, GridModel, build, scratch_pixels_preset
from stages.finetune.grid import BAG_OF_CODES, PROBE, Cell, expand_grid, recipe_configs
from stages.finetune.probe import bag_of_codes_cell, probe_cells
from stages.finetune.splits import dataset_tokenizers
from stages.finetune.train import SCRATCH, TOKEN_FAMILY, ModelSource, finetune_cell, record_grid_cells, source_family
from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot
from warehouse.runs import mark_crashed_runs

from flows.pretrain import pretrain, pretrain_pixels
from flows.registry import download_version
from flows.stage_flow import run_lock, run_name_from
from flows.tracking import tracked_run


def resolve_model(model: GridModel) -> ModelSource:
    """scratch, scratch-pixels:PRESET, a registry URI (downloaded into MLflow's local cache) or a checkpoint path."""
    if model.is_recipe:
        raise ConfigError(f"recipe {model.name} has not been pretrained yet (the evaluate flow trains recipes before their cells)")
    if model.ref == SCRATCH or scratch_pixels_preset(model.ref) is not None:
        return ModelSource(model.ref, None, model.name)
    if model.ref.startswith("models:/"):
        import mlflow

        try:
            local, uri = download_version(model.ref)
        except (LookupError, mlflow.exceptions.MlflowException) as e:
            raise ConfigError(f"cannot load model {model.ref}: {getattr(e, 'message', e)}") from None
        return ModelSource(uri, local, model.name)
    path = Path(model.ref).expanduser()
    if not path.exists():
        raise ConfigError(f"model {model.ref}: no such checkpoint file or folder")
    return ModelSource(str(path.resolve()), path, model.name)


# The stage keys and caches cells itself (by eval id, in the catalog), so Prefect's own result
# caching stays off: it would hide a cell whose results were deleted.
@task(name="finetune-cell", task_run_name="{cell.dataset}-{cell.split}-{cell.preset}", cache_policy=NO_CACHE)
def run_cell(cell: Cell, home: str, grid_name: str, experiment: str, force: bool, parallel: int = 1) -> dict:
    """One cell; `parallel` cells run at once in this process, each on its part of the threads."""
    with threads.one_of(parallel):
        logger = get_run_logger()
        share = threads.rebalance(logger.info)
        if parallel > 1 and share.threads is not None:
            logger.info(f"{parallel} cells at once: {share.part(parallel)} threads each ({share.describe()})")
        return _run_cell(cell, home, grid_name, experiment, force)


def _run_cell(cell: Cell, home: str, grid_name: str, experiment: str, force: bool) -> dict:
    logger = get_run_logger()
    root = DataRoot(home)
    config = {"model": cell.model.model_dump(), "dataset": cell.dataset, "split": cell.split, "preset": cell.preset, "kind": cell.kind,
              "methods": cell.methods, "seed": cell.seed, "grid": grid_name, "finetune": cell.config.model_dump(), "force": force}
    stage = {PROBE: "probe", BAG_OF_CODES: "bag_of_codes"}.get(cell.kind, "finetune")
    name = f"{stage}-{cell.model.label if cell.model.is_recipe else Path(cell.model.label).name}-{cell.dataset}-{cell.split}"
    # The same cell started twice at once (two grids, two UI clicks) trains once: the second
    # waits, then finds the first one's result in the catalog.
    identity = hashlib.sha256(json.dumps([cell.model.ref, cell.kind, cell.methods, cell.split, cell.preset, cell.config.model_dump()],
                                         sort_keys=True, default=str).encode()).hexdigest()[:12]
    with run_lock(root, stage, f"{cell.dataset}-{identity}", logger), \
            tracked_run(root, stage, config, logger=logger, run_name=name, dataset=cell.dataset, experiment=experiment) as ctx:
        if cell.kind == BAG_OF_CODES:
            result = bag_of_codes_cell(root, cell.dataset, cell.split, cell.config, grid=grid_name, reporter=ctx.reporter, force=force,
                                       run_id=ctx.record.run_id)
            record_grid_cells(root, grid_name, cell.dataset, [result.eval_id], ctx.record.run_id)
            ctx.record.summary = result.summary()
            return result.summary()
        source = resolve_model(cell.model)
        if cell.kind == PROBE:
            results = probe_cells(root, source, cell.dataset, cell.split, cell.config, methods=cell.methods, grid=grid_name,
                                  reporter=ctx.reporter, force=force, run_id=ctx.record.run_id, device=_probe_device(cell))
            ctx.set_run_name(f"probe-{results[0].pretrain_recipe}-{cell.dataset}-s{results[0].split}")
            record_grid_cells(root, grid_name, cell.dataset, [r.eval_id for r in results], ctx.record.run_id)
            summary = {"cached": all(r.cached for r in results), "dataset": cell.dataset, "split": results[0].split,
                       "pretrain_recipe": results[0].pretrain_recipe, "seed": cell.seed,
                       **{f"{r.protocol}/{k}": v for r in results for k, v in r.metrics.items()}}
            ctx.record.summary = summary
            return summary
        result = finetune_cell(root, source, cell.dataset, cell.split, cell.config, preset=cell.preset, grid=grid_name,
                               reporter=ctx.reporter, force=force, run_id=ctx.record.run_id)
        ctx.set_run_name(f"finetune-{result.pretrain_recipe}-{cell.dataset}-s{result.split}-{result.finetune_recipe}")
        summary = result.summary()
        ctx.record.summary = summary
        if result.checkpoint is not None and result.checkpoint.name == "last.pt":
            raise RuntimeError(f"{cell.label}: training stopped early at step {result.steps}; run the grid again to continue")
        record_grid_cells(root, grid_name, cell.dataset, [result.eval_id], ctx.record.run_id)
        return summary


def _probe_device(cell: Cell):
    from stages.checkpoints import resolve_device

    return resolve_device(cell.config.train.device)


def _pretraining_dataset(root: DataRoot, name: str, shards: str = "token") -> DatasetConfig:
    rows = Catalog(root).rows("SELECT source FROM datasets WHERE dataset = ?", [name])
    return build(DatasetConfig, {"name": name, "source": (rows[0][0] if rows and rows[0][0] else f"{shards} shards of {name}")})


def train_recipes(grid: GridConfig, root: DataRoot, force: bool, logger) -> tuple[dict[tuple[str, int | None], GridModel], list[str]]:
    """Pretrain every (recipe row, seed) of the grid that is not trained yet (the pretrain and
    pretrain-pixels flows cache by run key, so a finished recipe costs a lookup) and return the
    finished model each stands for, plus the recipes that failed."""
    trained: dict[tuple[str, int | None], GridModel] = {}
    failed: list[str] = []
    for model, seed, cfg in recipe_configs(grid):
        label = f"{'pixel ' if model.is_pixel_recipe else ''}recipe {model.name}" + (f" seed {seed}" if seed is not None else "")
        if model.is_pixel_recipe:
            state = pretrain_pixels(_pretraining_dataset(root, cfg.datasets[0], "frame"), cfg, str(root.home), force,
                                    train_on=list(cfg.datasets), return_state=True)
        else:
            state = pretrain(_pretraining_dataset(root, cfg.datasets[0]), cfg, str(root.home), force, train_on=list(cfg.datasets),
                             return_state=True)
        if not state.is_completed():
            failed.append(f"{label}: pretraining failed: {state.message}")
            logger.error(failed[-1])
            continue
        summary = state.result()
        checkpoint = summary.get("checkpoint")
        if not checkpoint or not checkpoint.endswith("final.pt"):
            failed.append(f"{label}: pretraining stopped before the end ({checkpoint}); run the grid again to continue")
            logger.error(failed[-1])
            continue
        logger.info(f"{label}: {'cached' if summary.get('cached') else 'trained'} {summary.get('run_name')} ({checkpoint})")
        trained[(model.name, seed)] = GridModel(ref=checkpoint, name=model.name, preset=model.preset)
    return trained, failed


@flow(name="evaluate", flow_run_name=run_name_from("evaluate", "grid"), description="Fine-tune every (model, dataset, split, preset) cell of a grid and evaluate it with multi-view "
      "testing; results go to the catalog's results/predictions views. Finished cells are skipped.")
def evaluate(grid: GridConfig, home: str | None = None, force: bool = False) -> dict:
    """Fine-tune and evaluate every cell of a grid not in the results table yet.

    Args:
        grid: models (scratch, models:/NAME/VERSION or a checkpoint) x datasets (with split sets) x fine-tune presets.
        home: the data root (default: the server's VIMPAC_HOME).
        force: retrain and re-evaluate cells that are already in the results table.
    """
    logger = get_run_logger()
    root = DataRoot(home).ensure()
    Catalog(root).refresh()
    for run_id in mark_crashed_runs(root):
        logger.warning(f"run {run_id} was interrupted earlier; its finished cells are kept, the rest is redone")
    cells = expand_grid(grid)
    recipe_configs(grid)  # a bad recipe override fails the grid before anything trains
    outcomes: dict[str, dict] = {}
    failed: list[str] = []
    with tracked_run(root, "evaluate", grid.model_dump() | {"force": force}, logger=logger, run_name=f"evaluate-{grid.name}",
                     experiment=grid.experiment) as ctx:
        seeds = f" x {len(grid.seeds)} seeds" if grid.seeds else ""
        logger.info(f"grid {grid.name}: {len(cells)} cells ({len(grid.models)} models x {len(grid.datasets)} datasets{seeds}; "
                    f"protocols {', '.join(grid.protocols)})")
        trained, failed = train_recipes(grid, root, force, logger)
        runnable = []
        for c in cells:
            if not c.model.is_recipe:
                runnable.append(c)
            elif (c.model.name, c.seed) in trained:
                runnable.append(dataclasses.replace(c, model=trained[(c.model.name, c.seed)]))
            else:
                failed.append(f"{c.label}: its recipe was not pretrained")
        cells = applicable(runnable, grid, root, logger)
        args = (str(root.home), grid.name, grid.experiment, force)
        parallel = cells_at_once(grid.parallel, logger.warning)
        if parallel > 1:
            futures = [run_cell.with_options(task_run_name=f"{c.dataset}-{c.split}-{c.preset}").submit(
                _on_device(c, i, parallel), *args, parallel=parallel) for i, c in enumerate(cells)]
            states = [f.wait() or f.state for f in futures]
        else:
            states = [run_cell(c, *args, return_state=True) for c in cells]
        for cell, state in zip(cells, states):
            if state.is_completed():
                outcomes[cell.label] = state.result()
            else:
                failed.append(f"{cell.label}: {state.message}")
                logger.error(f"cell {cell.label} failed: {state.message}")
        cached = sum(1 for o in outcomes.values() if o.get("cached"))
        ctx.record.summary = {"cells": len(cells), "done": len(outcomes), "cached": cached, "failed": failed}
        logger.info(f"grid {grid.name}: {len(outcomes)} cells done ({cached} cached), {len(failed)} failed")
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(cells)} grid cells failed: " + "; ".join(failed))
    return {"cells": outcomes, "failed": failed}


def model_family(model: GridModel) -> str:
    """A grid row's backbone family: token recipes and scratch are token backbones, pixel recipes
    and scratch-pixels pixel ones; a checkpoint or registry model says (one that cannot be read
    counts as a token backbone: its own cells then fail with the reason)."""
    if scratch_pixels_preset(model.ref) is not None or model.is_pixel_recipe:
        return PIXEL_FAMILY
    if model.is_recipe or model.ref == SCRATCH:
        return TOKEN_FAMILY
    try:
        return source_family(resolve_model(model))
    except ConfigError:
        return TOKEN_FAMILY


def applicable(cells: list[Cell], grid: GridConfig, root: DataRoot, logger) -> list[Cell]:
    """The cells that can run: a bag-of-codes cell is left out, with a log line, where the grid's
    rows are all pixel (ST-MAE) backbones and the dataset has no token shards to count codes in."""
    bags = [c for c in cells if c.kind == BAG_OF_CODES and not dataset_tokenizers(root, c.dataset)]
    if not bags or any(model_family(m) == TOKEN_FAMILY for m in grid.models):
        return cells
    for cell in bags:
        logger.info(f"{cell.label}: not applicable, skipped: every model of grid {grid.name} is a pixel (ST-MAE) backbone and "
                    f"{cell.dataset} has no token shards; the bag-of-codes floor is a probe on a tokenizer's codes (tokenize "
                    f"{cell.dataset} to get it)")
    skipped = {id(c) for c in bags}
    return [c for c in cells if id(c) not in skipped]


def cells_at_once(parallel: int, warn: Callable[[str], None]) -> int:
    """`parallel`, lowered to at most one cell per GPU (1 without two GPUs) so no two cells
    share a device. Cells running at once are threads of this process, and fine-tuning seeds and
    draws from torch's global generators (the classifier's initialisation, dropout): on a shared
    device each cell's random stream depends on when the others draw, and the same grid gave
    different tables run to run (on CPU one seed moved by up to 10 points; bench/RESULTS.md,
    stop 28). With a GPU per cell, dropout draws from each device's own generator, but the
    initialisation and the reseeding in seed_everything still touch shared generators: not yet
    reproducible either (not measured, for want of a multi-GPU machine)."""
    import torch

    gpus = torch.cuda.device_count()
    at_once = min(parallel, gpus) if gpus >= 2 else 1
    if at_once < parallel:
        warn(f"parallel: {parallel} lowered to {at_once} ({gpus} GPUs): cells sharing a device would share torch's random "
             "generators, and their results would depend on thread timing")
    return at_once


def _on_device(cell: Cell, index: int, parallel: int) -> Cell:
    """Cell i trains on GPU i mod parallel (unless its config names a device); `parallel` is
    at most the number of GPUs (cells_at_once)."""
    if cell.config.train.device != "auto":
        return cell
    train = cell.config.train.model_copy(update={"device": f"cuda:{index % parallel}"})
    return dataclasses.replace(cell, config=cell.config.model_copy(update={"train": train}))
