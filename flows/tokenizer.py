"""Prefect flows for the tokenizer (train + register) and tokenize stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from prefect import flow

from stages.config import ConfigError, DatasetConfig, TokenizeConfig, TokenizerConfig, config_hash
from stages.tokenize.stage import LoadedTokenizer, default_tokenizer, load_tokenizer, pick_device, run_tokenize

from flows.dask_runner import unit_runner
from flows.registry import download_version, register_checkpoint
from flows.stage_flow import record_outcome, run_name_from, stage_flow_run

def resolve_tokenizer(ref: str, device: str) -> LoadedTokenizer:
    """Registry URIs become a local checkpoint (downloaded once into MLflow's cache); the
    identity recorded on every token sample is then `models:/NAME/VERSION`."""
    if not ref.startswith("models:/"):
        return load_tokenizer(ref, device=device)
    import mlflow

    try:
        local, identity = download_version(ref)
    except LookupError as e:
        raise ConfigError(f"cannot load tokenizer {ref}: {e}") from None
    except mlflow.exceptions.MlflowException as e:
        raise ConfigError(f"cannot load tokenizer {ref}: {e.message}") from None
    checkpoint = local / "final.pt" if local.is_dir() else local
    loaded = load_tokenizer(str(checkpoint), device=device)
    return dataclasses.replace(loaded, identity=identity)


@flow(
    name="tokenizer",
    flow_run_name=run_name_from("tokenizer"),
    description="Train a VQ-VAE image tokenizer on frames of the given datasets and register it in the MLflow "
    "model registry. A finished training run with the same config and data is reused.",
)
def tokenizer(dataset: DatasetConfig, config: TokenizerConfig | None = None, home: str | None = None, force: bool = False,
              frame_size: int | None = None, train_on: list[str] | None = None, evaluate_on: list[str] | None = None) -> dict:
    """Train (or reuse) a VQ-VAE tokenizer and register it.

    Args:
        dataset: the dataset whose frames to train on.
        config: VQ-VAE size, codebook and training settings (presets: tiny, small).
        home: the data root (default: the server's VIMPAC_HOME).
        force: train again even if a finished run with this config and data exists.
        frame_size: side of the frames to train on (default: the frames stage's size).
        train_on: several datasets' frames at once (default: config.datasets, else `dataset`).
        evaluate_on: datasets whose reconstruction PSNR to report besides the training datasets (the pipeline
            passes every dataset it tokenizes); a warning names each one reconstructed within 3 dB of its mean frame.
            Not part of the run key: a trained tokenizer is reused whatever is evaluated.
    """
    from stages.tokenizer.train import train_tokenizer

    config = config or TokenizerConfig()
    datasets = train_on or config.datasets or [dataset.name]
    resolved = {"dataset": dataset.model_dump(), "tokenizer": config.model_dump(), "train_on": datasets, "force": force,
                "evaluate_on": list(evaluate_on or [])}
    with stage_flow_run("tokenizer", dataset.name, home, resolved, lock_key="+".join(sorted(datasets)) + "-" + config_hash(config)[:8]) as ctx:
        trained = train_tokenizer(ctx.root, datasets, config, reporter=ctx.reporter, frame_size=frame_size, force=force,
                                  evaluate_on=evaluate_on)
        uri = register_checkpoint(
            trained.checkpoint, config.register_as, trained.run_key,
            {"vimpac.data_fingerprint": trained.data_fingerprint, "vimpac.datasets": ",".join(datasets),
             "vimpac.config": json.dumps(config.model_dump(), sort_keys=True)[:4000]},
            artifact_path="tokenizer", description="VQ-VAE image tokenizer trained by vimpac",
        )
        ctx.reporter.info(f"tokenizer {'reused' if trained.cached else 'trained'}: {uri} ({trained.checkpoint})")
        summary = {"dataset": dataset.name, "model_uri": uri, "checkpoint": str(trained.checkpoint), "cached": trained.cached,
                   "steps": trained.steps, "run_key": trained.run_key, "data_fingerprint": trained.data_fingerprint,
                   **{k: v for k, v in trained.metrics.items() if isinstance(v, (int, float))},
                   "evaluated": {name: {k: r[k] for k in ("psnr", "baseline_psnr", "frames", "videos", "held_out")}
                                 for name, r in trained.evaluation.items()},
                   "warnings": trained.warnings}
        if trained.grid_png is not None and Path(trained.grid_png).exists():
            ctx.reporter.artifact(trained.grid_png)
        if (Path(trained.checkpoint).parent / "eval.json").exists():
            ctx.reporter.artifact(Path(trained.checkpoint).parent / "eval.json")  # per-dataset figures
        return record_outcome(ctx, "tokenizer", summary, [], [])


@flow(
    name="tokenize",
    flow_run_name=run_name_from("tokenize"),
    description="Encode every stored view of every frame of a dataset into tokenizer code indices, one token "
    "shard per frame shard (catalog: `token_samples`). Same tokenizer and frames: no work. `dask`: run the shards "
    "on a Dask cluster (`local`, `local:N` or a scheduler address; docs/scale-out.md).",
)
def tokenize(dataset: DatasetConfig, config: TokenizeConfig | None = None, home: str | None = None, force: bool = False,
             dask: str | None = None) -> dict:
    """Encode a dataset's frame shards into token shards with a tokenizer.

    Args:
        dataset: the dataset whose frame shards to tokenize (its name is enough).
        config: the tokenizer (models:/NAME/VERSION, a checkpoint path or dalle:ENC[,DEC]), device and batching.
        home: the data root (default: the server's VIMPAC_HOME).
        force: re-tokenize every frame shard, even those with token shards.
        dask: run the units on a Dask cluster: `local` (one worker process per core), `local:N` (N workers) or a
            scheduler address such as tcp://host:8786; empty: threads in this flow run (docs/scale-out.md).
    """
    config = config or TokenizeConfig()
    resolved = {"dataset": dataset.model_dump(), "tokenize": config.model_dump(), "force": force} | ({"dask": dask} if dask else {})
    with stage_flow_run("tokenize", dataset.name, home, resolved) as ctx, \
            unit_runner(dask, ctx.root, reporter=ctx.reporter) as runner:
        if not config.tokenizer:
            chosen, why = default_tokenizer(ctx.root, dataset.name)
            ctx.reporter.info(f"no tokenizer given: using {chosen}, {why}")
            config = config.model_copy(update={"tokenizer": chosen})
        loaded = resolve_tokenizer(config.tokenizer, pick_device(config.device))
        ctx.reporter.info(f"tokenizer {loaded.identity} on {loaded.device}")
        outcome = run_tokenize(
            ctx.root, dataset, config, loaded, run_id=ctx.record.run_id, force=force, reporter=ctx.reporter, runner=runner
        )
        if dask:
            outcome.summary.update(runner.summary())
        return record_outcome(ctx, "tokenize", outcome.summary, outcome.failures, outcome.errors)
