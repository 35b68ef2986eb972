"""The model registry as the ``registry`` and ``evaluate`` commands use it: list, describe, alias, load,
and export a registered encoder to ONNX (for runtimes other than PyTorch) or as a state dict of
torchvision's ResNet (for code that builds ``torchvision.models.resnetXX``).

Registering a training's encoder (and promoting it) is part of closing its run: :mod:`sscl.tracking`.
Every function takes the tracking URI and checks that the store answers before asking it anything.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from sscl.outputs import check_file_out, mlflow_store_paths, replace_file
from sscl.tracking import (check_names, check_tracking_server, client, filter_literal, find_runs, model_flavour_uri,
                           redact_uri)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["EMBEDDING_OF", "LATEST_EMBEDDING", "ONNX_TOLERANCE", "OnnxUnavailable", "close_embedding_run",
           "describe_version", "end_unfinished_run", "export_onnx", "export_torchvision", "list_versions",
           "load_registered", "onnx_atol", "open_embedding_run", "program_module", "registered_image_size",
           "registered_program", "require_onnx", "set_alias", "torchvision_architecture", "torchvision_atol"]

EMBEDDING_OF = "sscl.embedding_of"  # an embedding run's tag: "<name>/<version>" of the encoder it ran
LATEST_EMBEDDING = "latest_embedding_run"  # a version's tag: the run id of its latest finished embedding

# |onnxruntime - torch| allowed on a feature, relative to the features' scale (max |f|, at least 1). Both are
# float32; the ONNX optimiser folds batch norm into the convolutions, which reorders the sums. Measured on
# 600 digits with the quickstart ResNet-18 (32 px, batch norms' statistics from digits): 3.3e-6 at scale 5.7
# (width 0.25) and 2.1e-6 at scale 1.1 (width 1), at most 1.9e-6 relative: 1e-4 leaves ~50x headroom.
ONNX_TOLERANCE = 1e-4
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
# |torchvision - registered| allowed on a feature, relative to the features' scale (max |f|, at least 1): the
# same float32 operations in the same order, eager against the pt2 program: measured 0.0 on a 32-px ResNet-18 at
# width 1 (features up to 2.4), so 1e-5 only absorbs kernels that may pick another summation order.
TORCHVISION_TOLERANCE = 1e-5
# The batch traced and the batches checked differ, so a batch size baked into the graph cannot pass the check.
TRACE_BATCH, CHECK_BATCHES = 2, (3, 5)


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
    return _version_row(found) | {"metrics": run.data.metrics, "params": run.data.params,
                                  "embeddings": _embedding_rows(registry, run.info.experiment_id, name, found.version)}


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


def registered_program(uri: str, model_uri: str) -> bytes:
    """The pt2 archive of the encoder at ``model_uri``, read once (e.g. by a driver, for workers that
    should not each ask the tracking server, nor need its credentials), after MLflow has checked
    that it holds no pickled objects and loads. ``program_module`` turns it into the encoder.

    Raises:
        ConnectionError, ValueError: as ``load_registered``.
    """
    import mlflow

    load_registered(uri, model_uri)  # missing, unreachable or unpickling: refused here
    with tempfile.TemporaryDirectory() as folder, model_flavour_uri(uri):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=folder))
        return (local / "data" / "model.pt2").read_bytes()


def program_module(program: bytes) -> nn.Module:
    """The encoder of a pt2 archive from ``registered_program`` (torch only: no MLflow needed)."""
    import io

    return torch.export.load(io.BytesIO(program)).module()


def registered_image_size(uri: str, model_uri: str) -> int | None:
    """The image side the encoder at ``model_uri`` was exported for (its signature's (-1, 3, H, W)
    input), or None when its signature does not say. torch.export fixes it: other sizes fail its guards."""
    import mlflow

    with model_flavour_uri(uri):
        signature = mlflow.models.get_model_info(model_uri).signature
    shape = getattr(signature.inputs.inputs[0], "shape", None) if signature is not None and signature.inputs else None
    return int(shape[-1]) if shape and len(shape) == 4 and shape[-1] > 0 else None


class OnnxUnavailable(ImportError):
    """The ``onnx`` extra (onnx, onnxruntime, onnxscript) is not installed."""


def require_onnx() -> None:
    """Checks that the ``onnx`` extra is installed, without importing it.

    Raises:
        OnnxUnavailable: naming the missing packages and the install command.
    """
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise OnnxUnavailable(f"ONNX export needs {', '.join(missing)}: pip install 'sscl[onnx]' "
                              "(or the pinned onnx, onnxruntime and onnxscript of requirements.txt)")


def onnx_atol(features: np.ndarray) -> float:
    """The largest difference :data:`ONNX_TOLERANCE` allows from the torch ``features`` (N, F)."""
    return ONNX_TOLERANCE * max(1.0, float(np.abs(features).max(initial=0.0)))


def export_onnx(uri: str, model_uri: str, path: str | Path, *, opset: int | None = None) -> dict[str, Any]:
    """Writes the encoder registered at ``model_uri`` to ``path`` as ONNX and checks it in onnxruntime.

    The graph takes ``images`` float32 (B, 3, S, S), normalised as in evaluation, with a dynamic batch
    B, and returns ``features`` (B, F). It is traced from the loaded pt2 program (``torch.onnx.export``
    with ``dynamo=True``), then run in onnxruntime (CPU) against that program on random batches of sizes
    other than the traced one. It is written beside ``path`` and moved there only once it passed, so a
    failed export leaves no file; the weights are kept inside the file (ONNX's 2 GB limit).

    Args:
        uri: the tracking URI.
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        path: the ``.onnx`` file to write (replaced if it exists); its folder must exist.
        opset: the ONNX opset to target; None takes the exporter's default.

    Returns:
        ``onnx`` (the path), ``model``, ``image_size`` S, ``feature_dim`` F, ``opset``, ``batch_sizes``
        checked, ``max_abs_diff`` measured and ``atol`` allowed.

    Raises:
        OnnxUnavailable: without the ``onnx`` extra. ValueError: when the registry lacks the model or its
        signature gives no image size. RuntimeError: when onnxruntime disagrees with torch.
    """
    require_onnx()
    path = Path(path)
    encoder = load_registered(uri, model_uri)
    image_size = registered_image_size(uri, model_uri)
    if image_size is None:
        raise ValueError(f"{model_uri}: its signature gives no (-1, 3, S, S) image input, so the ONNX input "
                         "size is unknown; register it with sscl.tracking.log_encoder")
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(TRACE_BATCH, 3, image_size, image_size, generator=generator)
    with warnings.catch_warnings():
        # The loaded program says ``training`` (and refuses ``.eval()``), but it was traced in eval mode:
        # its batch norms use the running statistics.
        warnings.filterwarnings("ignore", message="Exporting a model while it is in training mode")
        program = torch.onnx.export(encoder, (example,), dynamo=True, input_names=["images"],
                                    output_names=["features"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                    opset_version=opset, verbose=False)
    checks = [torch.randn(n, 3, image_size, image_size, generator=generator) for n in CHECK_BATCHES]
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as scratch:
        written = Path(scratch) / path.name
        program.save(written, external_data=False)  # one file: external weights would name the scratch file
        feature_dim, diff, atol = _compare_in_onnxruntime(written, encoder, checks)
        written.replace(path)
    return {"onnx": str(path), "model": model_uri, "image_size": image_size, "feature_dim": feature_dim,
            "opset": program.model.opset_imports[""], "batch_sizes": list(CHECK_BATCHES), "max_abs_diff": diff,
            "atol": atol}


def _compare_in_onnxruntime(onnx_path: Path, encoder: nn.Module,
                            batches: list[torch.Tensor]) -> tuple[int, float, float]:
    """(F, max |onnxruntime - torch|, the tolerance) over ``batches`` of images (B, 3, S, S).

    Raises:
        RuntimeError: when a shape differs or a difference exceeds the tolerance.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [encoder(images).numpy() for images in batches]
    got = [session.run(["features"], {"images": images.numpy()})[0] for images in batches]
    for want, have in zip(expected, got):
        if want.shape != have.shape:
            raise RuntimeError(f"ONNX export: onnxruntime gave features {have.shape}, torch {want.shape}")
    diff = max(float(np.abs(have - want).max()) for want, have in zip(expected, got))
    atol = onnx_atol(np.concatenate(expected))
    if not diff <= atol:  # also catches NaN
        raise RuntimeError(f"ONNX export: onnxruntime differs from torch by {diff:.3g} (> {atol:.3g})")
    return expected[0].shape[1], diff, atol


# ---------------------------------------------------------------------------- torchvision state dict


def torchvision_atol(features: torch.Tensor) -> float:
    """The largest difference :data:`TORCHVISION_TOLERANCE` allows from the registered ``features`` (N, F)."""
    return TORCHVISION_TOLERANCE * max(1.0, float(features.abs().max()))


def export_torchvision(uri: str, model_uri: str, path: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Writes the weights of the encoder registered at ``model_uri`` to ``path`` as a state dict of
    torchvision's ResNet of the same name, once torchvision's model gives its features.

    Only a ResNet of :mod:`sscl.models` at width 1 with the ImageNet stem is torchvision's model (same
    parameter names and shapes, without ``fc``); the architecture is read from the registered weights
    themselves, not from the run's config. The file is ``torch.save`` of a plain dict of tensors (nothing
    pickled but tensors, so ``torch.load``'s default ``weights_only`` reads it), such that
    ``torchvision.models.resnetXX(weights=None).load_state_dict(state, strict=False)`` misses only
    ``fc.weight`` and ``fc.bias``. Before it is written, that model with ``fc = nn.Identity()`` is run
    against the registered (pt2) encoder on random batches. The output follows :mod:`sscl.outputs`
    (checked before the model is loaded; written beside ``path`` and moved there, so a failed export
    leaves no file).

    Args:
        uri: the tracking URI.
        model_uri: ``models:/<name>@<alias>`` or ``models:/<name>/<version>``.
        path: the file to write, named in errors as given; not a folder, its folder present, apart from
            a sqlite store's files.
        overwrite: replace ``path`` if it exists.

    Returns:
        ``torchvision`` (the path), ``model``, ``architecture`` (e.g. ``resnet18``), ``image_size`` S
        checked, ``feature_dim`` F, ``tensors`` written, ``missing`` (``fc.weight``, ``fc.bias``),
        ``max_abs_diff`` measured, ``atol`` allowed and ``load``: the Python that loads the file.

    Raises:
        IsADirectoryError, FileNotFoundError, FileExistsError: for a ``path`` that is a folder, whose folder
        is missing, or that exists without ``overwrite``. ValueError: for a ``path`` on the store's files,
        when the registry lacks the model, its signature gives no image size, or its encoder is not
        torchvision's (naming why).
        RuntimeError: when torchvision's model does not give the registered features.
    """
    shown = str(path)
    # Before the slow load; never onto the store's own files, which a sqlite store keeps beside its users' files.
    out = check_file_out(shown, "--torchvision", overwrite=overwrite, inputs=mlflow_store_paths(uri))
    encoder = load_registered(uri, model_uri)
    image_size = registered_image_size(uri, model_uri)
    if image_size is None:
        raise ValueError(f"{model_uri}: its signature gives no (-1, 3, S, S) image input, so its features cannot "
                         "be checked against torchvision's; register it with sscl.tracking.log_encoder")
    # Copies: the file must not save the program's storages (torch.save writes whole storages).
    state = {name.removeprefix("encoder."): tensor.detach().clone()  # EncoderForExport's attribute
             for name, tensor in encoder.state_dict().items()}
    architecture = torchvision_architecture(state, model_uri)
    model, missing = _load_into_torchvision(architecture, state)
    generator = torch.Generator().manual_seed(0)
    checks = [torch.randn(n, 3, image_size, image_size, generator=generator) for n in CHECK_BATCHES]
    with torch.no_grad():
        expected, got = [encoder(images) for images in checks], [model(images) for images in checks]
    diff = max(float((have - want).abs().max()) for want, have in zip(expected, got))
    atol = torchvision_atol(torch.cat(expected))
    if not diff <= atol:  # also catches NaN
        raise RuntimeError(f"torchvision export of {model_uri}: torchvision's {architecture} differs from the "
                           f"registered encoder by {diff:.3g} (> {atol:.3g})")
    replace_file(out, lambda written: torch.save(state, written))
    return {"torchvision": shown, "model": model_uri, "architecture": architecture, "image_size": image_size,
            "feature_dim": expected[0].shape[1], "tensors": len(state), "missing": missing, "max_abs_diff": diff,
            "atol": atol, "load": f"m = torchvision.models.{architecture}(weights=None); "
                                  f"m.load_state_dict(torch.load({shown!r}), strict=False)"}


def torchvision_architecture(state: dict[str, torch.Tensor], model_uri: str) -> str:
    """The torchvision ResNet (``resnet18``, ...) whose parameters, without ``fc``, are exactly ``state``'s.

    Args:
        state: an encoder's state dict, names without the ``encoder.`` prefix.
        model_uri: the model, for the message.

    Raises:
        ValueError: naming what differs: not a ResNet of :mod:`sscl.models`, its width, its stem, or a shape.
    """
    references = _torchvision_shapes()
    for name, reference in references.items():
        if reference.keys() == state.keys():  # names alone fix the depth and block; width and stem change shapes
            break
    else:
        raise ValueError(f"{model_uri}: its weights are not those of a ResNet of sscl.models "
                         f"({', '.join(references)}), so no torchvision model takes them; {_other_ways(model_uri)}")
    conv1 = state["conv1.weight"]  # (C, 3, k, k): C = 64 x width; k = 7 for the ImageNet stem, 3 for CIFAR's
    width, stem = conv1.shape[0] / 64, "imagenet" if conv1.shape[-1] == 7 else "cifar"
    wanted = [want for want, ok in (("width 1", width == 1), ("the imagenet stem (7x7 stride-2 convolution, then "
                                                             "max-pool)", stem == "imagenet")) if not ok]
    if wanted:
        raise ValueError(f"{model_uri} is {name} at width {width:.4g} with the {stem} stem: torchvision's {name} has "
                         f"{' and '.join(wanted)}, so its weights do not fit it; {_other_ways(model_uri)}")
    for key, shape in reference.items():
        if state[key].shape != shape:
            raise ValueError(f"{model_uri}: {key} is {tuple(state[key].shape)} where torchvision's {name} has "
                             f"{tuple(shape)}; {_other_ways(model_uri)}")
    return name


def _other_ways(model_uri: str) -> str:
    """What a refused torchvision export can do instead, for its message."""
    return (f"in PyTorch, use it as registered (mlflow.pytorch.load_model({model_uri!r}) loads its pt2 program, "
            "nothing unpickled); for other runtimes, export it with --onnx")


def _torchvision_shapes() -> dict[str, dict[str, torch.Size]]:
    """Parameter and buffer shapes, without ``fc``, of torchvision's model of each ResNet of :mod:`sscl.models`."""
    # Imported here: torchvision adds ~1.4 s to every registry command, and only this export needs it.
    import torchvision

    from sscl.models import ENCODERS

    shapes = {}
    for name in ENCODERS:
        with torch.device("meta"):  # shapes only: nothing allocated, no initialisation computed
            reference = getattr(torchvision.models, name)(weights=None).state_dict()
        shapes[name] = {k: v.shape for k, v in reference.items() if not k.startswith("fc.")}
    return shapes


def _load_into_torchvision(architecture: str, state: dict[str, torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """torchvision's ``architecture`` holding ``state``, in eval mode with ``fc = nn.Identity()``; and the
    keys the load missed.

    Raises:
        RuntimeError: when the load misses more than ``fc`` or finds keys torchvision lacks.
    """
    import torchvision

    model = getattr(torchvision.models, architecture)(weights=None)
    result = model.load_state_dict(state, strict=False)
    if sorted(result.missing_keys) != ["fc.bias", "fc.weight"] or result.unexpected_keys:
        raise RuntimeError(f"torchvision's {architecture} misses {result.missing_keys} and does not know "
                           f"{result.unexpected_keys} of the exported state (only fc may be missing)")
    model.fc = nn.Identity()  # the registered encoder ends at the pooled features
    return model.eval(), list(result.missing_keys)


# ---------------------------------------------------------------------------- lineage of embedding jobs


def open_embedding_run(uri: str, name: str, version: str, *, params: dict[str, Any]) -> str:
    """A new run, in the experiment of the run that trained ``name`` version ``version``, for one
    embedding job: tagged with the version it ran (``EMBEDDING_OF``), ``params`` logged. Returns its id."""
    from mlflow.entities import Param

    registry = _checked_client(uri)
    source = registry.get_model_version(name, version)
    experiment_id = registry.get_run(source.run_id).info.experiment_id
    run = registry.create_run(experiment_id, run_name=f"embed-{name}-v{version}",
                              tags={EMBEDDING_OF: f"{name}/{version}", "sscl.source_run": source.run_id})
    registry.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def close_embedding_run(uri: str, run_id: str, name: str, version: str, *, metrics: dict[str, float],
                        status: str = "FINISHED") -> None:
    """Logs the job's ``metrics`` and ends its run; a finished job's run id becomes the version's
    ``LATEST_EMBEDDING`` tag."""
    from mlflow.entities import Metric

    registry = client(uri)
    now = int(time.time() * 1000)
    registry.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    registry.set_terminated(run_id, status)
    if status == "FINISHED":
        registry.set_model_version_tag(name, version, LATEST_EMBEDDING, run_id)


def end_unfinished_run(uri: str, run_id: str) -> None:
    """Marks an embedding run that is still RUNNING as KILLED: its job's output was found unfinished
    (its driver was killed before it could say so). A run that no longer exists is left alone."""
    from mlflow.exceptions import MlflowException

    registry = client(uri)
    try:
        if registry.get_run(run_id).info.status == "RUNNING":
            registry.set_terminated(run_id, "KILLED")
    except MlflowException:
        pass


def _embedding_rows(registry: MlflowClient, experiment_id: str, name: str, version: str) -> list[dict[str, Any]]:
    runs = find_runs(registry, [experiment_id], {EMBEDDING_OF: f"{name}/{version}"}, max_results=100)
    return [{"run_id": r.info.run_id, "status": r.info.status, "out": r.data.params.get("out"),
             "source": r.data.params.get("data.source"), "root": r.data.params.get("data.root"),
             "split": r.data.params.get("split"), "images": r.data.metrics.get("images"),
             "images_per_second": r.data.metrics.get("images_per_second")} for r in runs]
