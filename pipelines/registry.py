"""Registry lookups for SSCL encoders.

    python -m pipelines.registry list [--name sscl-digits]
    python -m pipelines.registry show models:/sscl-digits@champion
    python -m pipelines.registry promote sscl-digits 3 [--alias champion]
    python -m pipelines.registry embed models:/sscl-digits@champion --images batch.npy --out emb.npy [--overwrite]
    python -m pipelines.registry export models:/sscl-digits@champion --onnx encoder.onnx [--overwrite]
    python -m pipelines.registry export models:/sscl-digits@champion --torchvision resnet18.pt [--overwrite]

``embed`` reads uint8 (N, H, W, 3) images from ``.npy`` and writes (N, F) features, using the
evaluation transform of ``--config`` (normalisation and crop size).

``export`` writes the encoder as ONNX (needs ``pip install 'sscl[onnx]'``): input ``images`` float32
(B, 3, S, S), normalised as in evaluation, dynamic batch B; output ``features`` (B, F). It is checked in
onnxruntime against the registered encoder before it is written. ``--torchvision`` writes instead a
plain state dict of ``torchvision.models.resnetXX`` (``load_state_dict(..., strict=False)`` leaves only
``fc`` missing), for ResNets at width 1 with the ImageNet stem; other encoders are refused, saying why.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipelines.errors import guarded
from sscl import tracking
from sscl.config import load_config
from sscl.outputs import check_file_out, mlflow_store_paths, replace_file

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def _uri(tracking_uri: str) -> str:
    """The tracking URI of a read-only command: a sqlite store must exist (never created here)."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_store_exists(uri)
    return uri


def list_versions(name: str | None = None, tracking_uri: str = "") -> list[dict[str, Any]]:
    """Every version of every registered model (or of ``name``), newest first."""
    from sscl import model_registry

    return model_registry.list_versions(_uri(tracking_uri), name)


def model_uri_parts(model_uri: str, flag: str = "model") -> re.Match[str]:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` split into name, alias and version.

    Raises:
        ValueError: naming the URI when it has neither form.
    """
    match = _MODEL_URI.match(model_uri)
    if not match:
        raise ValueError(f"{flag} must look like models:/<name>@<alias> or models:/<name>/<version>, got {model_uri!r}")
    return match


def show(model_uri: str, tracking_uri: str = "") -> dict[str, Any]:
    """One version, resolved from ``models:/<name>@<alias>`` or ``models:/<name>/<version>``, with its run."""
    from sscl import model_registry

    match = model_uri_parts(model_uri)
    return model_registry.describe_version(_uri(tracking_uri), match["name"], alias=match["alias"],
                                           version=match["version"])


def promote(name: str, version: str, alias: str = "champion", tracking_uri: str = "") -> dict[str, Any]:
    """Points ``alias`` at ``version`` (e.g. to roll back the champion by hand)."""
    from sscl import model_registry

    try:
        tracking.check_names(alias=alias)  # before the store: a wrong alias is wrong anywhere
    except ValueError as err:
        raise ValueError(f"--alias: {err}") from None
    return model_registry.set_alias(_uri(tracking_uri), name, version, alias)


def embed(model_uri: str, images_path: str, out_path: str, config: str | None = None, tracking_uri: str = "", *,
          overwrite: bool = False) -> tuple[int, int]:
    """Writes the encoder's features of the images in ``images_path`` to ``out_path``, a ``.npy`` file
    written exactly as named (an existing one replaced only with ``overwrite``).

    Raises:
        ValueError, FileNotFoundError, FileExistsError, IsADirectoryError: naming the flag and the path
            as given, before the encoder is loaded.
    """
    from sscl.build import encode
    from pipelines.evaluate import load_encoder
    from sscl import model_registry

    cfg = load_config(config)
    path = Path(images_path)
    if not path.is_file():
        raise FileNotFoundError(f"--images: file not found: {images_path}")
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.tracking.uri)
    out = check_file_out(out_path, "--out", overwrite=overwrite, suffix=".npy",
                         inputs={"--images": images_path, **mlflow_store_paths(uri)})
    images = _load_images(path)
    uri = _uri(uri)
    encoder = load_encoder(model_uri, uri, resolve=False)
    features = encode(encoder, images, cfg, image_size=model_registry.registered_image_size(uri, model_uri)).numpy()

    def save(temporary: Path) -> None:
        with open(temporary, "wb") as fh:  # a file object: np.save would add .npy to a name without it
            np.save(fh, features)

    replace_file(out, save)
    return features.shape


def export(model_uri: str, onnx_path: str, *, overwrite: bool = False, tracking_uri: str = "") -> dict[str, Any]:
    """Writes the encoder at ``model_uri`` to ``onnx_path`` as ONNX, checked in onnxruntime first.

    Raises:
        ValueError: for a malformed ``model_uri``, a model the registry lacks, or a missing ``onnx`` extra.
        FileExistsError: when ``onnx_path`` exists and ``overwrite`` is not set.
        FileNotFoundError / IsADirectoryError: when ``onnx_path``'s folder is missing or it is a folder.
    """
    from sscl import model_registry

    model_uri_parts(model_uri)
    out = check_file_out(onnx_path, "--onnx", overwrite=overwrite,
                         inputs=mlflow_store_paths(tracking.resolve_tracking_uri(tracking_uri)))
    try:
        model_registry.require_onnx()
    except ImportError as err:  # the user's to fix: exit 2 with the install command, not a traceback
        raise ValueError(f"--onnx: {err}") from None
    return model_registry.export_onnx(_uri(tracking_uri), model_uri, out)


def _load_images(path: Path) -> np.ndarray:
    """A ``.npy`` file holding one uint8 (N, H, W, 3) array.

    Raises:
        ValueError: naming the file and what it holds instead.
    """
    try:
        images = np.load(path, allow_pickle=False)
    except ValueError:  # numpy's "allow_pickle=False" refusal: the file is not a plain .npy array
        raise ValueError(f"--images {path}: not a .npy array file (numpy.save of a uint8 (N, H, W, 3) array)") from None
    except (OSError, EOFError) as err:
        raise ValueError(f"--images {path}: cannot be read as .npy ({err})") from None
    if not isinstance(images, np.ndarray):
        images.close()
        raise ValueError(f"--images {path}: a .npz archive; give a .npy file with one uint8 (N, H, W, 3) array")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"--images {path} must hold uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    return images


def cli(argv: Sequence[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(prog="python -m pipelines.registry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", default="", help="else MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list")
    p_list.add_argument("--name")
    p_show = sub.add_parser("show")
    p_show.add_argument("model")
    p_promote = sub.add_parser("promote")
    p_promote.add_argument("name")
    p_promote.add_argument("version")
    p_promote.add_argument("--alias", default="champion")
    p_embed = sub.add_parser("embed")
    p_embed.add_argument("model")
    p_embed.add_argument("--images", required=True)
    p_embed.add_argument("--out", required=True, help="the .npy file to write")
    p_embed.add_argument("--overwrite", action="store_true", help="replace the --out file if it exists")
    p_embed.add_argument("--config")
    p_export = sub.add_parser("export")
    p_export.add_argument("model")
    target = p_export.add_mutually_exclusive_group(required=True)
    target.add_argument("--onnx", metavar="FILE")
    target.add_argument("--torchvision", metavar="FILE", help="a state dict for torchvision.models.resnetXX")
    p_export.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    args = parser.parse_args(argv)

    def run() -> Any:
        if args.command == "list":
            return list_versions(args.name, args.tracking_uri)
        if args.command == "show":
            return show(args.model, args.tracking_uri)
        if args.command == "promote":
            return promote(args.name, args.version, args.alias, args.tracking_uri)
        if args.command == "export" and args.torchvision:
            from sscl import model_registry

            model_uri_parts(args.model)
            return model_registry.export_torchvision(_uri(args.tracking_uri), args.model, args.torchvision,
                                                     overwrite=args.overwrite)
        if args.command == "export":
            return export(args.model, args.onnx, overwrite=args.overwrite, tracking_uri=args.tracking_uri)
        return {"features_shape": list(embed(args.model, args.images, args.out, args.config, args.tracking_uri,
                                             overwrite=args.overwrite)),
                "out": args.out}

    out = guarded("python -m pipelines.registry", run)
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    cli()
