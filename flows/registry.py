"""The MLflow model registry: trained checkpoints become versioned models, once per training run key."""

from __future__ import annotations

from pathlib import Path

REGISTRY_TAG = "vimpac.run_key"


def register_checkpoint(checkpoint: Path, name: str, run_key: str, tags: dict[str, str], *, artifact_path: str,
                        description: str) -> str:
    """Log the checkpoint with the active MLflow run and register it as a version of `name`,
    unless a version with the same training run key exists already. Returns models:/NAME/VERSION."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=description)
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(REGISTRY_TAG) == run_key:
            return f"models:/{name}/{version.version}"
    mlflow.log_artifact(str(checkpoint), artifact_path=artifact_path)
    # MLflow 3's register_model wants a LoggedModel; a model version over the run's artifact
    # folder keeps the plain checkpoint file as the registered artifact.
    version = client.create_model_version(
        name, source=mlflow.get_artifact_uri(artifact_path), run_id=mlflow.active_run().info.run_id,
        tags={REGISTRY_TAG: run_key, **tags},
    )
    return f"models:/{name}/{version.version}"


def download_version(ref: str) -> tuple[Path, str]:
    """models:/NAME/VERSION|latest -> (local folder or file, models:/NAME/<number>)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, _, version = ref[len("models:/"):].partition("/")
    client = MlflowClient()
    if version in ("", "latest"):
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise LookupError(f"no registered versions of {name!r}")
        version = str(max(int(v.version) for v in versions))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}"))
    return local, f"models:/{name}/{version}"
