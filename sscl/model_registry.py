"""The model registry as the ``registry`` and ``evaluate`` commands use it: list, describe, alias, load.

Registering a training's encoder (and promoting it) is part of closing its run: :mod:`sscl.tracking`.
Every function takes the tracking URI and checks that the store answers before asking it anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from sscl.tracking import check_names, check_tracking_server, client, filter_literal, model_flavour_uri, redact_uri

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["describe_version", "list_versions", "load_registered", "registered_image_size", "set_alias"]


def _checked_client(uri: str) -> MlflowClient:
    check_tracking_server(uri)
    return client(uri)


def _version_row(v: Any) -> dict[str, Any]:
    return {"name": v.name, "version": str(v.version), "aliases": list(v.aliases), "run_id": v.run_id,
            "knn_top1": v.tags.get("knn_top1"), "dataset": v.tags.get("dataset")}


def list_versions(uri: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every version of every registered model (or of ``name``), newest first."""
    registry = _checked_client(uri)
    names = [name] if name else [m.name for m in registry.search_registered_models()]
    rows = []
    for model in names:
        rows += [_version_row(v) for v in registry.search_model_versions(f"name = {filter_literal(model)}")]
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


def describe_version(uri: str, name: str, *, alias: str | None = None, version: str | None = None) -> dict[str, Any]:
    """One version (by ``alias`` or ``version``) with its run's metrics and params.

    Raises:
        ValueError: naming the model when the registry does not have it.
    """
    from mlflow.exceptions import MlflowException

    registry = _checked_client(uri)
    try:
        found = registry.get_model_version_by_alias(name, alias) if alias else registry.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"models:/{name}{f'@{alias}' if alias else f'/{version}'}: not in the registry "
                         f"({err.message})") from None
    run = registry.get_run(found.run_id)
    return _version_row(found) | {"metrics": run.data.metrics, "params": run.data.params}


def set_alias(uri: str, name: str, version: str, alias: str) -> dict[str, Any]:
    """Points ``alias`` at ``version`` of ``name``; returns the version's row.

    Raises:
        ValueError: when the alias breaks MLflow's rules or the registry has no such version.
    """
    from mlflow.exceptions import MlflowException

    check_names(alias=alias)
    registry = _checked_client(uri)
    try:
        registry.get_model_version(name, version)
    except MlflowException as err:
        raise ValueError(f"{name} version {version}: not in the registry ({err.message})") from None
    registry.set_registered_model_alias(name, alias, version)
    return _version_row(registry.get_model_version(name, version))


def load_registered(uri: str, model_uri: str) -> nn.Module:
    """The encoder registered at ``model_uri`` (``models:/<name>@<alias>`` or ``/<version>``), loaded
    from its pt2 program (nothing unpickled).

    Raises:
        ConnectionError: when the tracking server is unreachable. ValueError: when the registry lacks the model.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    check_tracking_server(uri)
    try:
        with model_flavour_uri(uri):
            return mlflow.pytorch.load_model(model_uri)
    except MlflowException as err:
        raise ValueError(f"cannot load {model_uri} from {redact_uri(uri)}: {err.message}") from None


def registered_image_size(uri: str, model_uri: str) -> int | None:
    """The image side the encoder at ``model_uri`` was exported for (its signature's (-1, 3, H, W)
    input), or None when its signature does not say. torch.export fixes it: other sizes fail its guards."""
    import mlflow

    with model_flavour_uri(uri):
        signature = mlflow.models.get_model_info(model_uri).signature
    shape = getattr(signature.inputs.inputs[0], "shape", None) if signature is not None and signature.inputs else None
    return int(shape[-1]) if shape and len(shape) == 4 and shape[-1] > 0 else None
