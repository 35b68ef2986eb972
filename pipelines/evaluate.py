"""Evaluates a registered encoder: kNN and linear probe on the configured dataset's test split.

    python -m pipelines.evaluate --model models:/sscl-digits@champion --config pipelines/configs/quickstart.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch

from sscl.config import Config, ConfigError, load_config
from sscl.data.sources import read_split
from sscl.evaluate import knn_top1, linear_probe_top1


def load_encoder(model_uri: str, tracking_uri: str = "") -> torch.nn.Module:
    """Loads a registered encoder (pt2, no unpickling): ``models:/<name>@<alias>`` or ``/<version>``.

    Raises:
        ValueError: naming the model when the registry does not have it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from sscl import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking.check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.pytorch.load_model(model_uri)
    except MlflowException as err:
        raise ValueError(f"cannot load {model_uri} from {tracking.redact_uri(uri)}: {err.message}") from None


def main(cfg: Config, model_uri: str) -> dict[str, Any]:
    """kNN and linear top-1 of the registered encoder on ``cfg.data`` (frozen features)."""
    from pipelines.pretrain import encode

    encoder = load_encoder(model_uri, cfg.tracking.uri)
    train, test = read_split(cfg.data, "eval_train"), read_split(cfg.data, "eval_test")
    train_f, test_f = encode(encoder, train.images, cfg), encode(encoder, test.images, cfg)
    train_y, test_y = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    result = {
        "model": model_uri,
        "dataset": cfg.data.source,
        "knn_top1": knn_top1(train_f, train_y, test_f, test_y, k=cfg.train.knn_k, temperature=cfg.train.knn_temperature),
        "linear_top1": linear_probe_top1(train_f, train_y, test_f, test_y, epochs=cfg.train.linear_epochs,
                                         seed=cfg.train.seed),
    }
    print(json.dumps(result, indent=2))
    return result


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m pipelines.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
    parser.add_argument("--config", help="preset naming the dataset and evaluation settings")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        return main(load_config(args.config, args.overrides), args.model)
    except (ConfigError, ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
