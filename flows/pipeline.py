"""The `pipeline` flow: every configured stage, in DAG order, under one parent MLflow run.

ingest and frames run per dataset; the tokenizer is trained once (on the pretraining
datasets) and registered; tokenize then encodes every dataset with it; pretrain trains the
VIMPAC model once on the pretraining datasets' tokens and registers the backbone; evaluate
fine-tunes that backbone (and the from-scratch baseline) on the labeled datasets and writes
the results table.

pretrain-pixels, when `pretrain_pixels` is set, trains an ST-MAE on the pretraining datasets'
frame shards (it needs frames only, so a failure of the token stages does not stop it, nor its
failure them) and registers the encoder; evaluate fine-tunes it as the `pretrained-pixels` row.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from stages import threads
from stages.config import (PIXEL_STAGE, PRETRAINED, PRETRAINED_PIXELS, ConfigError, GridConfig, GridDataset, GridModel, GridPretrain,
                           PipelineConfig, pipeline_pixel_config, pipeline_pixel_recipe_base)
from warehouse.catalog import Catalog
from warehouse.layout import DataRoot

from flows.evaluate import evaluate
from flows.frames import frames
from flows.ingest import ingest
from flows.pretrain import pretrain, pretrain_pixels
from flows.stage_flow import run_name_from
from flows.tokenizer import tokenize, tokenizer
from flows.tracking import tracked_run


def pretraining_datasets(catalog: Catalog, config: PipelineConfig, chosen: list[str] | None, setting: str) -> list[str]:
    """`chosen` if the config names datasets for this stage, else the unlabeled ones (the paper
    pretrains on HowTo100M, no labels), else all."""
    names = [d.name for d in config.datasets]
    labeled = dict(catalog.rows("SELECT dataset, labeled FROM datasets"))
    picked = chosen or [n for n in names if not labeled.get(n)] or names
    unknown = sorted(set(picked) - set(names))
    if unknown:
        raise ConfigError(f"{setting} names datasets the pipeline does not have: {', '.join(unknown)}")
    return picked


def stage_failed(failed, dataset: str) -> bool:
    """Whether an earlier stage of this run failed for `dataset` (`failed` holds "<dataset>/<stage>: <message>")."""
    return any(f.startswith(f"{dataset}/") for f in failed)


def data_failed(failed, dataset: str) -> bool:
    """Whether ingest or frames of this run failed for `dataset`: what stops a stage that reads
    frame shards only (pretrain-pixels), where a token stage's failure must not."""
    return any(f.startswith((f"{dataset}/ingest:", f"{dataset}/frames:")) for f in failed)


def usable_validation(catalog: Catalog, config: PipelineConfig, cfg, failed: list[str], logger):
    """Pretraining validates on `validation.datasets` that have tokens: one that this pipeline
    does not include and never tokenized, or whose earlier stage failed, is left out with a
    warning instead of failing the pretraining (with none left, held-out videos validate)."""
    wanted = cfg.validation.datasets
    if not wanted:
        return cfg
    names = {d.name for d in config.datasets}
    tokenized = {r[0] for r in catalog.rows("SELECT DISTINCT dataset FROM token_samples WHERE status = 'ok'")}
    usable = [n for n in wanted if not stage_failed(failed, n) and (n in names or n in tokenized)]
    if usable != list(wanted):
        dropped = [n for n in wanted if n not in usable]
        fallback = "" if usable else f"; validating on {cfg.validation.holdout:g} of the pretraining videos held out instead"
        logger.warning(f"pretrain: validation dataset(s) {', '.join(dropped)} left out (not in this pipeline and never "
                       f"tokenized, or an earlier stage failed){fallback}")
    return cfg.model_copy(update={"validation": cfg.validation.model_copy(update={"datasets": usable or None})})


def evaluation_grid(catalog: Catalog, config: PipelineConfig, pretrained_ref: str | None, tokenizer_ref: str = "",
                    pixels_ref: str | None = None) -> GridConfig | None:
    """The pipeline's evaluate settings as a grid: `pretrained` becomes the backbone this run's
    pretrain stage registered and `pretrained-pixels` the encoder its pretrain-pixels stage
    registered (each left out, with a warning, when there is none; `pretrained-pixels` without
    a word when the stage is off, as it is by default), the datasets default to the labeled
    ones, and recipe rows pretrain like the pipeline's pretrain stage (its settings, datasets
    and tokenizer) with their own overrides, pixel recipe rows like its pretrain-pixels stage."""
    stage = config.evaluate
    pixels_on = PIXEL_STAGE in config.stages and config.pretrain_pixels is not None
    models = []
    for m in stage.models:
        if m.ref == PRETRAINED:
            if pretrained_ref is None:
                get_run_logger().warning("evaluate: no pretrained backbone from this pipeline run; only the other models are evaluated")
                continue
            m = GridModel(ref=pretrained_ref, name=m.name, preset=m.preset)
        elif m.ref == PRETRAINED_PIXELS:
            if pixels_ref is None:
                if pixels_on:
                    get_run_logger().warning("evaluate: no pixel (ST-MAE) encoder from this pipeline run's pretrain-pixels stage; "
                                             "only the other models are evaluated")
                continue
            m = GridModel(ref=pixels_ref, name=m.name, preset=m.preset)
        models.append(m)
    labeled = dict(catalog.rows("SELECT dataset, labeled FROM datasets"))
    datasets = stage.datasets or [GridDataset(name=d.name) for d in config.datasets if labeled.get(d.name)]
    unknown = sorted({d.name for d in datasets} - {d.name for d in config.datasets})
    if unknown:
        raise ConfigError(f"evaluate.datasets names datasets the pipeline does not have: {', '.join(unknown)}")
    if not models or not datasets:
        get_run_logger().warning("evaluate skipped: no labeled datasets" if not datasets else "evaluate skipped: no models")
        return None
    base = pixel_base = None
    if any(m.pretrain is not None for m in models):
        base = GridPretrain(datasets=pretraining_datasets(catalog, config, config.pretrain.datasets, "pretrain.datasets"), preset="default",
                            tokenizer=config.pretrain.tokenizer or tokenizer_ref,
                            config=config.pretrain.model_dump(mode="json", exclude={"datasets", "tokenizer"}))
    if any(m.is_pixel_recipe for m in models):
        pixel_base = pipeline_pixel_recipe_base(config, pretraining_datasets(
            catalog, config, pipeline_pixel_config(config).datasets, "pretrain_pixels.datasets"))
    return GridConfig(name=config.name, models=models, datasets=datasets, presets=stage.presets, finetune=stage.finetune,
                      set=stage.set, protocols=stage.protocols, seeds=stage.seeds, pretrain=base, pretrain_pixels=pixel_base,
                      parallel=stage.parallel, experiment=config.tracking.experiment)


@flow(name="pipeline", flow_run_name=run_name_from("pipeline", "config"), description="Run the configured stages (in DAG order) over the configured datasets.")
def pipeline(config: PipelineConfig, home: str | None = None, force: bool = False) -> dict:
    """Every configured stage in DAG order, under one parent MLflow run.

    Args:
        config: datasets (name, source, layout) and every stage's settings; `stages` picks which stages run.
        home: the data root (default: the server's VIMPAC_HOME).
        force: recompute every configured stage, even units that are cached.
    """
    logger = get_run_logger()
    # The config's `threads` (a served run has no CLI to read it); --threads still wins.
    logger.info(threads.claim(config=config.threads).describe())
    root = DataRoot(home).ensure()
    catalog = Catalog(root)
    catalog.refresh()
    summaries: dict[str, dict] = {}
    failed: list[str] = []

    def run(stage: str, stage_flow, key: str, *args, **kwargs) -> dict | None:
        # One dataset's failure (an unreadable source, say) must not stop the others.
        state = stage_flow(*args, return_state=True, **kwargs)
        if state.is_completed():
            summaries[f"{stage}/{key}"] = state.result()
            return summaries[f"{stage}/{key}"]
        failed.append(f"{key}/{stage}: {state.message}")
        logger.error(f"{stage} of {key} failed: {state.message}")
        return None

    with tracked_run(root, "pipeline", config.model_dump() | {"force": force}, logger=logger, run_name=config.name,
                     experiment=config.tracking.experiment) as ctx:
        per_dataset = {"ingest": (ingest, config.ingest), "frames": (frames, config.frames)}
        for ds in config.datasets:
            for stage in (s for s in config.stages if s in per_dataset):
                if stage_failed(failed, ds.name):
                    # A later stage never runs on a dataset whose earlier stage failed.
                    logger.warning(f"{stage} of {ds.name} skipped: an earlier stage failed")
                    continue
                stage_flow, stage_cfg = per_dataset[stage]
                run(stage, stage_flow, ds.name, ds, stage_cfg, str(root.home), force, dask=config.dask)

        tokenizer_ref = config.tokenize.tokenizer
        pretrained_ref: str | None = None
        if "tokenizer" in config.stages and config.datasets:
            train_on = pretraining_datasets(catalog, config, config.tokenizer.datasets, "tokenizer.datasets")
            first = next(d for d in config.datasets if d.name == train_on[0])
            # Its PSNR is reported on every dataset the pipeline tokenizes with it.
            evaluate_on = [d.name for d in config.datasets if not stage_failed(failed, d.name)] \
                if "tokenize" in config.stages else None
            trained = run("tokenizer", tokenizer, "+".join(train_on), first, config.tokenizer, str(root.home), force,
                          frame_size=config.tokenizer.size or config.frames.size, train_on=train_on, evaluate_on=evaluate_on)
            if trained is not None and not tokenizer_ref:
                tokenizer_ref = trained["model_uri"]
        if "tokenize" in config.stages:
            tokenize_cfg = config.tokenize.model_copy(update={"tokenizer": tokenizer_ref})
            for ds in config.datasets:
                if stage_failed(failed, ds.name) or not tokenizer_ref:
                    logger.warning(f"tokenize of {ds.name} skipped: an earlier stage failed or no tokenizer is available")
                    continue
                run("tokenize", tokenize, ds.name, ds, tokenize_cfg, str(root.home), force, dask=config.dask)
        if "pretrain" in config.stages and config.datasets:
            pretrain_on = pretraining_datasets(catalog, config, config.pretrain.datasets, "pretrain.datasets")
            blocked = [n for n in pretrain_on if stage_failed(failed, n)]
            pretrain_cfg = config.pretrain
            if not pretrain_cfg.tokenizer and tokenizer_ref:
                pretrain_cfg = pretrain_cfg.model_copy(update={"tokenizer": tokenizer_ref})
            pretrain_cfg = usable_validation(catalog, config, pretrain_cfg, failed, logger)
            if blocked:
                logger.warning(f"pretrain skipped: an earlier stage failed for {', '.join(blocked)}")
            else:
                first = next(d for d in config.datasets if d.name == pretrain_on[0])
                trained = run("pretrain", pretrain, "+".join(pretrain_on), first, pretrain_cfg, str(root.home), force,
                              train_on=pretrain_on)
                if trained is not None:
                    pretrained_ref = trained.get("model_uri") or trained.get("checkpoint")
        pixels_ref: str | None = None
        if PIXEL_STAGE in config.stages and config.pretrain_pixels is not None and config.datasets:
            pixel_cfg = pipeline_pixel_config(config)
            pixels_on = pretraining_datasets(catalog, config, pixel_cfg.datasets, "pretrain_pixels.datasets")
            blocked = [n for n in pixels_on if data_failed(failed, n)]
            if blocked:
                logger.warning(f"{PIXEL_STAGE} skipped: ingest or frames failed for {', '.join(blocked)}")
            else:
                first = next(d for d in config.datasets if d.name == pixels_on[0])
                trained = run(PIXEL_STAGE, pretrain_pixels, "+".join(pixels_on), first, pixel_cfg, str(root.home), force,
                              train_on=pixels_on)
                if trained is not None:
                    pixels_ref = trained.get("model_uri") or trained.get("checkpoint")
        elif config.pretrain_pixels is not None:
            logger.info(f"{PIXEL_STAGE} not run: `pretrain_pixels` is set but `stages` does not list {PIXEL_STAGE}")
        if "evaluate" in config.stages and config.datasets:
            grid = evaluation_grid(catalog, config, pretrained_ref, tokenizer_ref or "", pixels_ref)
            blocked = [d.name for d in grid.datasets if stage_failed(failed, d.name)] if grid else []
            if blocked:
                logger.warning(f"evaluate skipped: an earlier stage failed for {', '.join(blocked)}")
            elif grid is not None:
                run("evaluate", evaluate, grid.name, grid, str(root.home), force)
        ctx.record.summary = {"stages": summaries, "failed": failed}
        if failed:
            raise RuntimeError(f"{len(failed)} stage runs failed: " + "; ".join(failed))
    return summaries
