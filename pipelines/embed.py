"""Embeds a dataset with a registered encoder on the cluster and writes the features as Parquet.

    python -m pipelines.embed --model models:/sscl-digits@champion --config pipelines/configs/quickstart.yaml \\
        --split eval_train --out features/train
    python -m pipelines.embed --model models:/sscl-folder/3 --config my.yaml data.root=s3://bucket/catalogue \\
        --out s3://bucket/features/catalogue embed.actors=8 scaling.use_gpu=true

The input is any source pretraining reads (``data.*``), read and decoded by the same Ray Data code
(``sscl.data.sources``); ``--split`` picks which of its images: ``pretrain`` (the default: every image
training reads, e.g. all of an image folder), ``eval_train`` or ``eval_test``. A pool of
``embed.actors`` Ray actors each loads the encoder once (one GPU each with ``scaling.use_gpu``) and
encodes ``data.eval_batch_size`` images at a time under its evaluation transform; the Parquet files are
written as batches finish, one row per image (``sscl.data.features``: key, label, features).

The job is an MLflow run in the model's experiment (its version, data and output, images/s), and the
model version's ``latest_embedding_run`` tag points at it. An output is complete once it holds
``_SUCCESS``; an existing one is replaced only with ``--overwrite``, and the partial output of a job
that was killed is cleared by the next one.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipelines import console
from pipelines.errors import guarded
from sscl.config import Config, setting
from sscl.data.features import Output, feature_table
from sscl.outputs import check_apart, data_paths, mlflow_store_paths

SPLITS = ("pretrain", "eval_train", "eval_test")


@dataclass(frozen=True)
class Embedding:
    """The job's own settings: a preset's ``embed:`` block and ``embed.*`` overrides
    (``sscl.config.TOOL_SECTIONS``)."""

    actors: int = setting(2, "encoder actors, each loading the model once (one GPU each with scaling.use_gpu; "
                          "scaling.cpus_per_worker CPUs each)", ge=1, le=100_000)
    progress_every_s: float = setting(10.0, "seconds between progress lines", gt=0, le=3600)


class Progress:
    """A Ray actor (``num_cpus=0``): images encoded so far, told by the encoder actors."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def count(self) -> int:
        return self.done


class EncodeBatches:
    """A Ray Data actor: loads the encoder once from its pt2 archive (read from the registry by the
    driver: the actors need neither MLflow nor its credentials), then encodes batches of decoded
    images (``image``, ``label``, ``key``) into rows of the stored layout."""

    def __init__(self, program: Any, transform: dict[str, Any], use_gpu: bool, progress: Any) -> None:
        import ray

        from sscl.model_registry import program_module

        self.device = torch.device("cuda" if use_gpu else "cpu")
        archive = ray.get(program) if isinstance(program, ray.ObjectRef) else program
        self.encoder = program_module(archive).to(self.device)
        self.transform, self.progress = transform, progress
        side = transform["image_size"]
        with torch.no_grad():  # the feature size, for the empty batches' rows
            self.dim = self.encoder(torch.zeros(2, 3, side, side, device=self.device)).shape[1]

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        from sscl.evaluate import extract_features

        if len(batch["key"]) == 0:  # every image of a decoding batch skipped (data.skip_corrupt)
            return feature_table([], np.zeros(0), np.zeros((0, self.dim), dtype=np.float32))
        with torch.no_grad():
            features, _ = extract_features(self.encoder, [batch], device=self.device, **self.transform)
        self.progress.add.remote(len(features))
        return feature_table(batch["key"], batch["label"], features.cpu().numpy())


def main(cfg: Config, embedding: Embedding, *, model_uri: str, out: str, split: str = "pretrain",
         overwrite: bool = False) -> dict[str, Any]:
    """Embeds ``split`` of ``cfg.data`` with the encoder at ``model_uri`` into ``out``; returns the
    job's figures and its MLflow run id.

    Raises:
        ValueError, FileNotFoundError, FileExistsError, ConnectionError: naming the flag, key or URI,
        before Ray starts.
    """
    import ray

    from pipelines.datasets import bad_images_actor, named_data_errors, use_data_settings
    from pipelines.ray_checks import init_ray
    from pipelines.registry import model_uri_parts, show
    from sscl import model_registry, tracking
    from sscl.build import eval_transform
    from sscl.data.sources import build_dataset, check_roots

    started = time.perf_counter()
    model_uri_parts(model_uri, "--model")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    output = Output.at(out)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    check_apart(out, "--out", {**data_paths(cfg.data), **mlflow_store_paths(uri)})
    claim = output.check_free(overwrite)  # checked first, cleared once everything else is
    check_roots(cfg.data)
    tracking.check_store_exists(uri)  # never creates a store: the model must already be in one
    version = show(model_uri, uri)  # a missing model or server fails here, before any data is read
    image_size = model_registry.registered_image_size(uri, model_uri)
    program = model_registry.registered_program(uri, model_uri)
    init_ray(dashboard=False)
    use_data_settings()
    console.quiet_ray_data()
    bad_images = bad_images_actor()
    data = build_dataset(cfg.data, split, bad_images=bad_images, keyed=True)
    progress = ray.remote(Progress).options(num_cpus=0).remote()
    # On CPUs Ray Data fuses the decoding into the actors (one hop less); with GPUs the resources
    # differ, so decoding stays in CPU tasks that feed the GPU actors.
    features = data.dataset.map_batches(
        EncodeBatches, batch_size=cfg.data.eval_batch_size,
        compute=ray.data.ActorPoolStrategy(size=embedding.actors),
        fn_constructor_kwargs={"program": ray.put(program), "transform": eval_transform(cfg, image_size),
                               "use_gpu": cfg.scaling.use_gpu, "progress": progress},
        num_cpus=cfg.scaling.cpus_per_worker, num_gpus=1 if cfg.scaling.use_gpu else 0)
    params = {"model": model_uri, "model.name": version["name"], "model.version": version["version"],
              "model.run_id": version["run_id"], "data.source": cfg.data.source, "data.root": cfg.data.root,
              "split": split, "out": output.uri, "data.eval_batch_size": cfg.data.eval_batch_size,
              "embed.actors": embedding.actors}
    run_id = model_registry.open_embedding_run(uri, version["name"], version["version"], params=params)
    token = uuid.uuid4().hex[:12]
    status, figures = "FAILED", {}
    try:
        output.start(token, claim, run_id=run_id, model=model_uri)
        if claim.what:
            print(f"cleared {output.uri}: it held {claim.what}")
        if claim.unfinished.get("run_id"):  # the killed job's run: its driver could not end it
            model_registry.end_unfinished_run(uri, claim.unfinished["run_id"])
        print(f"embedding {data.num_images} images ({cfg.data.source} {split}) with {model_uri} (version "
              f"{version['version']}) on {embedding.actors} actor(s), batch {cfg.data.eval_batch_size} -> {output.uri}")
        console.print_notes(data)
        with named_data_errors(bad_images), console.library_output() as shown, _ProgressLines(
                progress, data.num_images, shown, embedding.progress_every_s):
            features.write_parquet(output.path, filesystem=output.fs, filename_provider=_named(token))
        skipped = ray.get(bad_images.count.remote())
        expected = data.num_images - skipped if _exact_count(cfg, split) else None
        manifest = output.finish(token, expected_rows=expected, model=model_uri, model_version=version["version"],
                                 run_id=run_id, source=cfg.data.source, root=cfg.data.root, split=split,
                                 skipped_images=skipped)
        seconds = time.perf_counter() - started
        figures = {"images": manifest["rows"], "skipped_images": skipped, "seconds": seconds,
                   "images_per_second": manifest["rows"] / max(seconds, 1e-9),
                   "feature_dim": _feature_dim(output, manifest)}
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        with console.library_output():  # MLflow prints a link to each run it ends on a server
            model_registry.close_embedding_run(uri, run_id, version["name"], version["version"], metrics=figures,
                                               status=status)
    if skipped:
        print(f"skipped {skipped} undecodable image(s) (data.skip_corrupt=true)")
    print(f"embedded {figures['images']} images, {figures['feature_dim']} features each, in {seconds:.1f} s "
          f"({figures['images_per_second']:.0f} images/s) -> {output.uri}")
    print(f"lineage: run {run_id} in the model's experiment; python -m pipelines.registry show {model_uri}")
    return {"out": output.uri, "run_id": run_id, "model": model_uri, "version": version["version"], **figures}


def _named(token: str) -> Any:
    """Parquet file names that start with this job's token (``Output.finish`` keeps only those)."""
    from ray.data.datasource import FilenameProvider

    return FilenameProvider(dataset_uuid=token, file_format="parquet")


def _exact_count(cfg: Config, split: str) -> bool:
    """Whether ``build_dataset``'s image count is exact for this split (Parquet's evaluation splits
    count all rows, of which a hash keeps a part)."""
    return cfg.data.source != "parquet" or split == "pretrain"


def _feature_dim(output: Output, manifest: dict[str, Any]) -> int:
    import pyarrow.parquet as pq

    if not manifest["files"]:
        return 0
    schema = pq.read_schema(f"{output.path}/{manifest['files'][0]}", filesystem=output.fs)
    return schema.field("features").type.list_size


class _ProgressLines(console.Every):
    """While open, prints images done and images/s every ``every_s`` seconds."""

    def __init__(self, progress: Any, total: int, shown: Any, every_s: float) -> None:
        super().__init__(self._line, every_s, name="sscl-embed-progress")
        self.progress, self.total, self.shown, self.started = progress, total, shown, time.perf_counter()

    def _line(self) -> None:
        import ray

        if self.stop.is_set():
            return  # the final figures follow
        try:
            done = ray.get(self.progress.count.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the display must never stop the job
            return
        if not done:
            print(f"  0/{self.total:,} images (the encoder actors are starting)", file=self.shown, flush=True)
            return
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        print(f"  {done:,}/{self.total:,} images  {rate:.0f} images/s", file=self.shown, flush=True)


def cli(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from pipelines.config_cli import parse_config_and_flags
    from pipelines.ray_checks import stop_local_ray

    def flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", required=True, help="models:/<name>@<alias> or models:/<name>/<version>")
        parser.add_argument("--out", required=True, help="output folder: a path or a URI (s3://, gs://, ...)")
        parser.add_argument("--split", default="pretrain", choices=SPLITS, help="which images of data.* to embed")
        parser.add_argument("--overwrite", action="store_true", help="replace a complete output at --out")

    cfg, args = parse_config_and_flags(argv, prog="python -m pipelines.embed", description=__doc__, add_flags=flags,
                                       tool=("embed", Embedding))
    try:
        return guarded("python -m pipelines.embed", lambda: main(cfg, args.tool, model_uri=args.model, out=args.out,
                                                                 split=args.split, overwrite=args.overwrite))
    finally:
        stop_local_ray()


if __name__ == "__main__":
    cli()
