"""The Ray Datasets of a run: the lazy training stream (two fresh views per image every epoch) and
the evaluation sets, and how Ray Train shards them across the workers."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Iterator

from pipelines import console
from sscl.build import decodes_on_device, views_in_trainer
from sscl.config import Config
from sscl.data.augment import two_views
from sscl.data.decode import BadImages, DataError
from sscl.data.sources import build_dataset
from sscl.evaluate import check_bank

if TYPE_CHECKING:
    import ray.train

EVAL_DATASETS = ("eval_train", "eval_test")


def use_data_settings() -> None:
    """Ray Data settings for this process's datasets: a dataset keeps a copy of them from when it is
    created, and Ray Train hands the driver's to the run, so call before building any.

    Ray Data reserves half of its CPUs and memory for its operators in equal shares. A run's stream
    has two (reading; decoding with the views), and the second needs nearly all of it: without the
    reservation `benchmark ingest` (2-core VM, 4,000 64-px JPEGs) went from 1,193-1,209 to 1,532-1,550
    img/s in the first epoch and from 1.48-1.52x to 1.79-1.92x torchvision in the steady state, the
    first batch from 2.7 to 2.0 s; 500x375 photos from 375 to 520 img/s.
    """
    import ray.data

    ray.data.DataContext.get_current().op_resource_reservation_enabled = False


def build_datasets(cfg: Config, bad_images: Any = None) -> tuple[dict[str, Any], int]:
    """The lazy training and evaluation datasets (listing only: nothing is decoded here); prints what
    the listing left out (``console.print_notes``).

    Returns:
        ``{"train", "eval_train", "eval_test"}`` Ray Datasets and the number of pretraining images.

    Raises:
        FileNotFoundError, ConnectionError, ValueError: naming the path or key, before any worker starts.
    """
    use_data_settings()
    pretrain = build_dataset(cfg.data, "pretrain", seed=cfg.train.seed, bad_images=bad_images,
                             encoded=decodes_on_device(cfg))
    if pretrain.num_images < cfg.data.batch_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size}: larger than the {pretrain.num_images} pretraining "
                         "images")
    bank = build_dataset(cfg.data, "eval_train", max_images=cfg.train.knn_max_images, bad_images=bad_images)
    test = build_dataset(cfg.data, "eval_test", bad_images=bad_images)
    check_bank(cfg.train.knn_k, bank.num_images)
    console.print_notes(pretrain, bank, test)
    datasets = {"train": train_stream(cfg, pretrain.dataset), "eval_train": bank.dataset, "eval_test": test.dataset}
    return datasets, pretrain.num_images


def train_stream(cfg: Config, pretrain):
    """Two fresh views per image every epoch, made in the Ray Data tasks that decode the images
    unless made on the training device; with ``placement.decode=device``, the encoded images themselves.

    No global shuffle (an all-to-all barrier that would read the whole dataset before the first
    batch): the files are read in a new seeded order each epoch and the workers shuffle locally.
    """
    import ray.data

    if decodes_on_device(cfg):  # the encoded bytes as stored, and each file's name for errors
        return pretrain.select_columns(["bytes", "where"])
    pretrain = pretrain.select_columns(["image"])
    if not views_in_trainer(cfg):
        # Plain tasks, fused with decoding, scale with the cluster's free CPUs; a fixed actor pool
        # caps decoding at its size (on 2 cores both give ~800 img/s: `benchmark ingest`).
        # Not materialised: Ray Data re-executes the map every epoch, so the views are fresh.
        tasks = ray.data.TaskPoolStrategy(size=cfg.placement.max_tasks) if cfg.placement.max_tasks else None
        pretrain = pretrain.map_batches(two_views, fn_kwargs={"augment": dataclasses.asdict(cfg.augment)}, batch_size=256,
                                        batch_format="numpy", compute=tasks)
    return pretrain


def data_config() -> ray.train.DataConfig:
    """Ray Train's dataset sharding: the training set split equally (every DDP worker takes the
    same number of steps), the evaluation sets split exactly (every image evaluated once)."""
    import copy

    import ray.train

    class ExactEvalSplit(ray.train.DataConfig):
        # Built with DataConfig's defaults: shard locality on and no execution_options, so every shard
        # gets default_ingest_options(), as Ray's configure gives the training set. Ray keeps both settings
        # in private attributes; the evaluation split relies on the defaults instead of reading them.

        # Ray Train configures one dataset per call, when the workers first ask for its shard.
        def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                      worker_node_ids: list[str] | None, **kwargs: Any) -> list[dict[str, Any]]:
            exact = {k: v for k, v in datasets.items() if k in EVAL_DATASETS}
            output = super().configure({k: v for k, v in datasets.items() if k not in exact}, world_size,
                                       worker_handles, worker_node_ids, **kwargs)
            for name, ds in exact.items():
                ds = ds.copy(ds)
                ds.set_name(name)
                # A copy, as Ray's configure makes: a shard's options must not alias the driver's context.
                ds.context.execution_options = copy.deepcopy(self.default_ingest_options())
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    output[i][name] = split
            return output

    return ExactEvalSplit()


def bad_images_actor():
    """A ``BadImages`` actor: the decoding tasks report undecodable images to it."""
    import ray

    return ray.remote(BadImages).options(num_cpus=0).remote()


@contextlib.contextmanager
def named_data_errors(bad_images: Any) -> Iterator[None]:
    """Inside, a failure that a decoding task reported to ``bad_images`` is raised as that
    ``DataError`` (naming the file): Ray's wrappers of task and worker errors carry it only as text.
    Anything else is raised unchanged."""
    import ray

    try:
        yield
    except Exception:
        message = ray.get(bad_images.first_error.remote(), timeout=30)
        if message:
            raise DataError(message) from None
        raise
