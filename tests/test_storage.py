"""`train.storage_path` on a two-node Ray cluster (two raylets on this machine)."""

from __future__ import annotations

import pytest


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_storage_every_node_sees_passes_and_leaves_no_marker(tmp_path, two_nodes):
    import ray

    from pipelines.pretrain import check_storage

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    check_storage(str(tmp_path / "shared"))  # both raylets share this machine's disk
    assert list((tmp_path / "shared").iterdir()) == []
    check_storage("s3://bucket/sscl")  # object storage is not probed
