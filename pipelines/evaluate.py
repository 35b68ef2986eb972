"""Evaluates a registered encoder: kNN and linear probe on the configured dataset's evaluation sets,
streamed by Ray Data to a Ray task on one worker's device (a GPU with ``scaling.use_gpu=true``).

    python -m pipelines.evaluate --model models:/sscl-digits@champion --config pipelines/configs/quickstart.yaml

Or of features an embedding job stored (``python -m pipelines.embed``), without encoding anything again:

    python -m pipelines.evaluate --features features/train --test-features features/test --config ...

The protocol is the pipeline's own in both: ``train.knn_k``, ``train.knn_temperature``,
``train.linear_epochs`` and ``train.seed``; the features of both sets must come from the same model version.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import torch

from pipelines import console
from pipelines.errors import guarded
from sscl.config import Config, to_dict
from sscl.data.sources import build_dataset, check_roots
from sscl.data.decode import DataError
from sscl.evaluate import evaluate_encoder, score_features


def load_encoder(model_uri: str, tracking_uri: str = "", *, resolve: bool = True) -> torch.nn.Module:
    """Loads a registered encoder (pt2, no unpickling): ``models:/<name>@<alias>`` or ``/<version>``.

    Args:
        model_uri: the registry address.
        tracking_uri: the tracking server or store.
        resolve: let ``MLFLOW_TRACKING_URI`` win over ``tracking_uri`` (off in Ray tasks, which get
            the driver's resolved URI and may have another process's environment).

    Raises:
        ValueError: naming the model when the registry does not have it.
    """
    from sscl import model_registry, tracking

    uri = tracking.resolve_tracking_uri(tracking_uri) if resolve else tracking_uri
    return model_registry.load_registered(uri, model_uri)


def _evaluate_remote(cfg_dict: dict[str, Any], program: bytes, train_ds, test_ds,
                     image_size: int | None = None) -> dict[str, float]:
    """Runs as a Ray task with a Train worker's resources: streams both evaluation sets through the
    encoder (its pt2 archive, read by the driver: the task needs no MLflow) on that task's device."""
    from sscl.build import eval_transform
    from sscl.config import from_dict
    from sscl.model_registry import program_module

    cfg = from_dict(cfg_dict)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    encoder = program_module(program).to(device)
    batches = lambda ds: ds.iter_torch_batches(batch_size=cfg.data.eval_batch_size)  # noqa: E731
    return evaluate_encoder(encoder, batches(train_ds), batches(test_ds), device=device, k=cfg.train.knn_k,
                            temperature=cfg.train.knn_temperature, linear_epochs=cfg.train.linear_epochs,
                            seed=cfg.train.seed, **eval_transform(cfg, image_size))


def main(cfg: Config, model_uri: str) -> dict[str, Any]:
    """kNN and linear top-1 of the registered encoder on ``cfg.data``'s evaluation sets (frozen
    features), computed in a Ray task on one worker's device (``scaling.use_gpu``), streamed from storage."""
    import ray

    from pipelines.datasets import use_data_settings
    from pipelines.ray_checks import init_ray
    from sscl import model_registry, tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_store_exists(uri)  # read-only: never create a store
    check_roots(cfg.data)
    program = model_registry.registered_program(uri, model_uri)  # a missing model or server fails here
    image_size = model_registry.registered_image_size(uri, model_uri)  # the size its export was traced for
    init_ray(dashboard=False)
    use_data_settings()
    train = build_dataset(cfg.data, "eval_train", max_images=cfg.train.knn_max_images)
    test = build_dataset(cfg.data, "eval_test")
    console.print_notes(train, test, file=sys.stderr)  # stdout is the result's JSON
    task = ray.remote(_evaluate_remote).options(num_cpus=cfg.scaling.cpus_per_worker,
                                                 num_gpus=1 if cfg.scaling.use_gpu else 0)
    metrics = ray.get(task.remote(to_dict(cfg), ray.put(program), train.dataset, test.dataset, image_size))
    result = {"model": model_uri, "dataset": cfg.data.source, **metrics}
    print(json.dumps(result, indent=2))
    return result


def of_features(cfg: Config, bank_uri: str, test_uri: str) -> dict[str, Any]:
    """kNN and linear top-1 of stored features (``sscl.data.features``): the labelled rows of
    ``bank_uri`` as the kNN bank and probe training set, those of ``test_uri`` as the test set.

    Raises:
        DataError: naming the flag when an output is incomplete, has no labelled rows, or the two
            come from different model versions.
    """
    from sscl.data.features import read_features

    bank, test = read_features(bank_uri, "--features"), read_features(test_uri, "--test-features")
    made_by = [(f["model_version"], f["run_id"], f["model"]) for f in (bank.manifest, test.manifest)]
    if made_by[0][0] != made_by[1][0] or _model_name(made_by[0][2]) != _model_name(made_by[1][2]):
        raise DataError(f"--features {bank_uri} holds features of {made_by[0][2]} (version {made_by[0][0]}) but "
                        f"--test-features {test_uri} those of {made_by[1][2]} (version {made_by[1][0]}): embed both "
                        "with the same model version")
    sets = []
    for flag, stored in (("--features", bank), ("--test-features", test)):
        labelled = stored.labels >= 0
        if not labelled.any():
            raise DataError(f"{flag}: none of its {len(stored.labels)} rows has a label; embed a labelled split "
                            "(--split eval_train / eval_test)")
        sets += [torch.from_numpy(stored.features[labelled]), torch.from_numpy(stored.labels[labelled])]
    t = cfg.train
    metrics = score_features(*sets, k=t.knn_k, temperature=t.knn_temperature, linear_epochs=t.linear_epochs,
                             seed=t.seed)
    result = {"features": bank_uri, "test_features": test_uri, "model": bank.manifest["model"],
              "version": made_by[0][0], "bank_images": len(sets[1]), "test_images": len(sets[3]), **metrics}
    print(json.dumps(result, indent=2))
    return result


def _model_name(model_uri: str) -> str:
    from pipelines.registry import model_uri_parts

    return model_uri_parts(model_uri)["name"]


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config_and_flags
    from pipelines.registry import model_uri_parts

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help="models:/<name>@<alias> or models:/<name>/<version>")
        parser.add_argument("--features", help="stored features of the kNN bank / probe training set (an "
                                               "embedding job's --out), instead of --model")
        parser.add_argument("--test-features", help="with --features: stored features of the test set")

    cfg, args = parse_config_and_flags(argv, prog="python -m pipelines.evaluate", description=__doc__, add_flags=flags)
    prog = "python -m pipelines.evaluate"
    if bool(args.model) == bool(args.features) or bool(args.features) != bool(args.test_features):
        problem = "give --model, or --features with --test-features (not both)"
    else:
        problem = ""
        try:
            if args.model:
                model_uri_parts(args.model, "--model")
        except ValueError as err:
            problem = str(err)
    if problem:
        print(f"{prog}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.features:
        return guarded(prog, lambda: of_features(cfg, args.features, args.test_features))
    return guarded(prog, lambda: main(cfg, args.model))


if __name__ == "__main__":
    cli()
