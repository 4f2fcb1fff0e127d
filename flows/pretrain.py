"""Prefect flows for the pretrain stages: train (or resume, or reuse) and register the backbone
(VIMPAC over token shards; ST-MAE over pixel clips, `pretrain-pixels`)."""

from __future__ import annotations

import json

from prefect import flow

from stages import threads
from stages.config import DatasetConfig, PixelPretrainConfig, PretrainConfig, config_hash
from stages.pretrain.pixels import FAMILY as PIXEL_FAMILY
from stages.pretrain.pixels import pretrain_pixels as run_pretrain_pixels
from stages.pretrain.train import pretrain as run_pretrain
from stages.pretrain.train import resolve_tokenizer_identity

from flows.registry import register_checkpoint
from flows.stage_flow import record_outcome, run_name_from, stage_flow_run


@flow(
    name="pretrain",
    flow_run_name=run_name_from("pretrain"),
    description="VIMPAC pretraining (mask-then-predict + contrastive) over the token shards of the given datasets; "
    "metrics stream to MLflow, an interrupted run resumes from its last checkpoint, and the final backbone is "
    "registered in the MLflow model registry with its tokenizer and datasets.",
)
def pretrain(dataset: DatasetConfig, config: PretrainConfig | None = None, home: str | None = None, force: bool = False,
             train_on: list[str] | None = None) -> dict:
    """Pretrain (or resume, or reuse) the VIMPAC backbone and register it.

    Args:
        dataset: the dataset whose token shards to pretrain on (its name is enough once it is tokenized).
        config: model, masking, contrastive and training settings (Tables 3-4 presets: small, base, large_half).
        home: the data root (default: the server's VIMPAC_HOME).
        force: train again even if a finished run with this recipe and data exists.
        train_on: several datasets' token shards at once (default: config.datasets, else `dataset`).
    """
    config = config or PretrainConfig()
    datasets = train_on or config.datasets or [dataset.name]
    resolved = {"dataset": dataset.model_dump(), "pretrain": config.model_dump(), "train_on": datasets, "force": force}
    # Locked per recipe and data: two recipes may train at once on two GPUs, the same one never twice.
    with stage_flow_run("pretrain", dataset.name, home, resolved, lock_key="+".join(sorted(datasets)) + "-" + config_hash(config)[:8]) as ctx:
        identity = resolve_tokenizer_identity(ctx.root, datasets, config.tokenizer)
        config = config.model_copy(update={"tokenizer": identity})
        threads.rebalance(ctx.reporter.info)  # the share training starts with, in the flow's log when it changed
        result = run_pretrain(ctx.root, datasets, config, reporter=ctx.reporter, force=force)
        ctx.set_run_name(f"pretrain-{result.run_name}")
        summary = {"dataset": dataset.name, "run_name": result.run_name, "run_key": result.run_key,
                   "checkpoint": str(result.checkpoint), "cached": result.cached, "steps": result.steps,
                   "tokenizer": result.tokenizer, "datasets": ",".join(result.datasets),
                   **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
        if result.checkpoint.name == "final.pt":
            summary["model_uri"] = register_checkpoint(
                result.checkpoint, config.register_as, result.run_key,
                {"vimpac.tokenizer": result.tokenizer, "vimpac.datasets": ",".join(result.datasets),
                 "vimpac.data_fingerprint": result.data_fingerprint, "vimpac.recipe": result.run_name,
                 "vimpac.config": json.dumps(config.model_dump(), sort_keys=True)[:4000]},
                artifact_path="backbone", description="VIMPAC video transformer pretrained by vimpac",
            )
            ctx.reporter.info(f"backbone {'reused' if result.cached else 'trained'}: {summary['model_uri']} ({result.checkpoint})")
        return record_outcome(ctx, "pretrain", summary, [], [])


@flow(
    name="pretrain-pixels",
    flow_run_name=run_name_from("pretrain-pixels"),
    description="ST-MAE pretraining on pixel clips of the frame shards (HVM-1's method): a ViT over tubelets learns "
    "to reconstruct 90% masked tubelets; metrics and a reconstruction grid go to MLflow, an interrupted run resumes, "
    "and the encoder is registered with the model-family tag st_mae.",
)
def pretrain_pixels(dataset: DatasetConfig, config: PixelPretrainConfig | None = None, home: str | None = None,
                    force: bool = False, train_on: list[str] | None = None) -> dict:
    """Pretrain (or resume, or reuse) an ST-MAE on pixels and register it.

    Args:
        dataset: the dataset whose frame shards to pretrain on.
        config: model (base/large/huge ViT, masking), clips and training (presets mae_st, hvm1, tiny).
        home: the data root (default: the server's VIMPAC_HOME).
        force: train again even if a finished run with this recipe and data exists.
        train_on: several datasets' frame shards at once (default: config.datasets, else `dataset`).
    """
    config = config or PixelPretrainConfig()
    datasets = train_on or config.datasets or [dataset.name]
    resolved = {"dataset": dataset.model_dump(), "pretrain-pixels": config.model_dump(), "train_on": datasets, "force": force}
    with stage_flow_run("pretrain-pixels", dataset.name, home, resolved,
                        lock_key="+".join(sorted(datasets)) + "-" + config_hash(config)[:8]) as ctx:
        threads.rebalance(ctx.reporter.info)
        result = run_pretrain_pixels(ctx.root, datasets, config, reporter=ctx.reporter, force=force)
        ctx.set_run_name(f"pretrain-pixels-{result.run_name}")
        summary = {"dataset": dataset.name, "run_name": result.run_name, "run_key": result.run_key,
                   "checkpoint": str(result.checkpoint), "cached": result.cached, "steps": result.steps,
                   "datasets": ",".join(result.datasets),
                   **{k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
        if result.checkpoint.name == "final.pt":
            summary["model_uri"] = register_checkpoint(
                result.checkpoint, config.register_as, result.run_key,
                {"vimpac.family": PIXEL_FAMILY, "vimpac.datasets": ",".join(result.datasets), "vimpac.recipe": result.run_name,
                 "vimpac.config": json.dumps(config.model_dump(), sort_keys=True)[:4000]},
                artifact_path="backbone", description="ST-MAE video encoder pretrained on pixels by vimpac",
            )
            ctx.reporter.info(f"encoder {'reused' if result.cached else 'trained'}: {summary['model_uri']} ({result.checkpoint})")
        return record_outcome(ctx, "pretrain-pixels", summary, [], [])
