"""`vimpac serve`: every stage flow and `pipeline` as Prefect deployments, served from this process.

Each deployment is named `vimpac` (`frames/vimpac`, `pipeline/vimpac`, ...), carries the flow's
description and tags, and a parameter schema that Prefect derives from the flow's typed
signature: the stage configs are pydantic models, so the UI's run form shows every field with
its description and bounds. The deployment's default parameters are the stage's resolved
defaults (or a pipeline file's settings), so the form opens filled in.

A run started from the UI executes in a subprocess of this server with this process's
environment: the same data root, the same MLflow store, the same parent/nested MLflow runs as
`vimpac run`. deploy/prefect.yaml defines the same deployments for work pools instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from stages.config import FramesConfig, IngestConfig, PipelineConfig, PretrainConfig, TokenizeConfig, TokenizerConfig
from warehouse.layout import DataRoot

DEPLOYMENT = "vimpac"


@dataclass(frozen=True)
class DeploymentSpec:
    flow: str  # module:function under flows/
    tags: tuple[str, ...]
    config: type[BaseModel] | None  # the stage config whose defaults fill the form's `config`


# Data stages: CPU, I/O, one task per shard (can run on Dask). Training stages want a GPU.
SPECS: dict[str, DeploymentSpec] = {
    "ingest": DeploymentSpec("flows.ingest:ingest", ("vimpac", "data"), IngestConfig),
    "frames": DeploymentSpec("flows.frames:frames", ("vimpac", "data"), FramesConfig),
    "tokenizer": DeploymentSpec("flows.tokenizer:tokenizer", ("vimpac", "training"), TokenizerConfig),
    "tokenize": DeploymentSpec("flows.tokenizer:tokenize", ("vimpac", "data"), TokenizeConfig),
    "pretrain": DeploymentSpec("flows.pretrain:pretrain", ("vimpac", "training"), PretrainConfig),
    "evaluate": DeploymentSpec("flows.evaluate:evaluate", ("vimpac", "training"), None),
    "pipeline": DeploymentSpec("flows.pipeline:pipeline", ("vimpac", "pipeline"), None),
}


def load_flow(ref: str):
    """The flow `module:function` names, importing that module only."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def default_parameters(name: str, root: DataRoot, pipeline: PipelineConfig | None = None) -> dict[str, Any]:
    """What the UI's form shows before the user edits it."""
    spec = SPECS[name]
    params: dict[str, Any] = {"home": str(root.home)}
    if name == "pipeline":
        params["config"] = (pipeline or PipelineConfig()).model_dump(mode="json")
    elif spec.config is not None:
        stage_cfg = getattr(pipeline, name) if pipeline is not None else spec.config()
        params["config"] = stage_cfg.model_dump(mode="json")
    return params


def build_deployments(root: DataRoot, pipeline: PipelineConfig | None = None, names: list[str] | None = None) -> list:
    from prefect.flows import EntrypointType

    deployments = []
    for name in names or list(SPECS):
        spec = SPECS[name]
        flow = load_flow(spec.flow)
        deployments.append(flow.to_deployment(
            name=DEPLOYMENT,
            description=flow.description,
            tags=list(spec.tags),
            parameters=default_parameters(name, root, pipeline),
            # Import by module path: the runs work from any working directory.
            entrypoint_type=EntrypointType.MODULE_PATH,
        ))
    return deployments


def serve_deployments(root: DataRoot, pipeline: PipelineConfig | None = None, *, limit: int | None = None,
                      names: list[str] | None = None) -> None:
    from prefect import serve

    serve(*build_deployments(root, pipeline, names), limit=limit, print_starting_message=True)
