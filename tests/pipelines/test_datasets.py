"""How Ray Train shards a run's datasets: ``pipelines.datasets.data_config``."""

from __future__ import annotations

import inspect
import threading

import pytest

from pipelines.datasets import data_config


def test_the_evaluation_split_assumes_only_what_ray_does_with_data_configs_defaults():
    # data_config's evaluation split reads no private DataConfig state: it relies on a DataConfig built
    # without arguments having shard locality on and giving every shard default_ingest_options() (a copy).
    # This reads Ray's private attributes on purpose, to fail when Ray changes what those defaults do.
    import ray.train

    config = data_config()
    assert isinstance(config, ray.train.DataConfig)
    assert ray.train.DataConfig()._enable_shard_locality is True
    resolved = ray.train.DataConfig()._resolve_execution_options("eval_test")
    assert vars(resolved) == vars(config.default_ingest_options())
    # The override keeps the signature Ray Train calls it with.
    assert list(inspect.signature(ray.train.DataConfig.configure).parameters) == [
        "self", "datasets", "world_size", "worker_handles", "worker_node_ids", "kwargs"]


@pytest.mark.integration
def test_evaluation_sets_are_split_exactly_and_the_training_set_equally(ray_cluster):
    import ray
    import ray.data

    node = ray.get_runtime_context().get_node_id()
    datasets = {"train": ray.data.range(9), "eval_test": ray.data.range(7)}
    shards = data_config().configure(datasets, 2, None, [node, node])
    rows: dict[tuple[int, str], list[int]] = {}

    def read(rank: int, name: str) -> None:  # the splits of one dataset are consumed together, as workers do
        rows[rank, name] = [row["id"] for row in shards[rank][name].iter_rows()]

    threads = [threading.Thread(target=read, args=(rank, name)) for rank in (0, 1) for name in datasets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(rows[0, "eval_test"] + rows[1, "eval_test"]) == list(range(7))  # every image once
    assert len(rows[0, "train"]) == len(rows[1, "train"]) == 4  # equal steps; the odd row is dropped
    assert not set(rows[0, "train"]) & set(rows[1, "train"])
