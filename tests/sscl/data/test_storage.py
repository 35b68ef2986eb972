"""A two-node Ray cluster (two raylets on this machine): `train.storage_path` and streaming ingest."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture
def two_nodes(own_ray):
    import ray
    from ray.cluster_utils import Cluster

    from conftest import free_port

    # The dashboard answers Ray's state API (which node ran a task) and Ray Train's cleaner.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True,
                                                             "dashboard_port": free_port()})
    cluster.add_node(num_cpus=3)
    context = ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    yield context
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.integration
def test_storage_every_node_sees_passes_and_leaves_no_marker(tmp_path, two_nodes):
    import ray

    from pipelines.ray_checks import check_storage

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    check_storage(str(tmp_path / "shared"))  # both raylets share this machine's disk
    assert list((tmp_path / "shared").iterdir()) == []
    check_storage("s3://bucket/sscl")  # object storage is not probed


@pytest.mark.integration
def test_decoding_runs_on_both_nodes_and_training_completes(tmp_path, two_nodes, monkeypatch):
    import ray
    from ray.util.state import list_tasks

    from pipelines.bench.ingest import write_jpeg_folder
    from pipelines.pretrain import main
    from sscl.config import load_config
    from conftest import QUICKSTART, quick_overrides

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = write_jpeg_folder(tmp_path / "images", 600, side=32, n_classes=4)
    cfg = load_config(QUICKSTART, quick_overrides(tmp_path, "data.source=imagefolder", f"data.root={root}",
                                                  "train.epochs=1", "tracking.register=false"))
    result = main(cfg)
    assert result["epochs"] == 1 and 0 <= result["final_knn_top1"] <= 1
    address = f"http://{two_nodes.dashboard_url}"  # this cluster's, not the latest one started on the machine
    decoders = list_tasks(address=address, filters=[("name", "=", "ReadBinary->MapBatches(decode_files)")],
                          limit=10_000, raise_on_missing_output=False)
    if not decoders:  # Ray Data may name the fused read and decode stage differently
        decoders = [t for t in list_tasks(address=address, limit=10_000, raise_on_missing_output=False)
                    if "decode_files" in t.name]
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    ran_on = {t.node_id for t in decoders if t.node_id}  # tasks cancelled before scheduling have none
    assert ran_on == nodes, [(t.name, t.node_id) for t in decoders][:20]


@pytest.mark.integration
def test_embedding_actors_run_on_both_nodes_into_one_complete_output(tmp_path, two_nodes, monkeypatch):
    import ray
    from ray.util.state import list_actors

    from pipelines import embed
    from pipelines.bench.embed import MODEL, register_encoder
    from pipelines.bench.ingest import write_jpeg_folder
    from sscl.config import load_config
    from sscl.data.features import read_features

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = write_jpeg_folder(tmp_path / "images", 400, side=32, n_classes=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    register_encoder(uri, width=0.125)
    # Two CPUs per actor on nodes of three: one actor per node.
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.image_size=32",
                             f"tracking.uri={uri}", "scaling.cpus_per_worker=2"])
    result = embed.main(cfg, embed.Embedding(actors=2), model_uri=MODEL, out=str(tmp_path / "features"))
    stored = read_features(str(tmp_path / "features"))
    assert result["images"] == 400 and list(stored.keys) == sorted(p.relative_to(root).as_posix()
                                                                    for p in root.rglob("*.jpg"))
    encoders = [a for a in list_actors(address=f"http://{two_nodes.dashboard_url}", detail=True, limit=10_000)
                if "EncodeBatches" in a.class_name]
    assert {a.node_id for a in encoders} == {n["NodeID"] for n in ray.nodes() if n["Alive"]}, encoders


def _can_mask_a_folder() -> bool:
    """Whether this machine lets a process see a folder differently (a private mount namespace)."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("unshare") is None or not _can_mask_a_folder(),
                    reason="needs mount namespaces (unshare) to give one node a different view of a folder")
def test_storage_a_node_cannot_see_is_refused_naming_the_keys_and_the_fix(tmp_path, own_ray):
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.ray_checks import check_storage

    storage = tmp_path / "storage"
    storage.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    # The second node is a real raylet on this machine whose processes see an empty tmpfs over
    # ``storage``: what a node without the NFS mount sees.
    ray_bin = Path(sys.executable).parent / "ray"
    blind = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {storage} && exec {ray_bin} start --address={cluster.address} --num-cpus=1 --block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        deadline = time.monotonic() + 120
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert blind.poll() is None and time.monotonic() < deadline, "the second node did not join"
            time.sleep(1)
        with pytest.raises(ValueError) as err:
            check_storage(str(storage))
        message = str(err.value)
        assert f"train.storage_path={str(storage)!r} is local to this node" in message
        assert "of this 2-node cluster cannot see it" in message and "s3://" in message
        assert list(storage.iterdir()) == []  # the marker is gone
    finally:
        ray.shutdown()
        os.killpg(blind.pid, signal.SIGTERM)
        blind.wait(timeout=60)
        cluster.shutdown()
