"""Joining Ray, and what is checked on the cluster before any worker starts: room for the
workers, and checkpoint storage every node can see."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Sequence

from sscl.config import Config


def init_ray(*, dashboard: bool = True) -> None:
    """Joins the cluster in ``RAY_ADDRESS`` (a job or ``ray start``), else starts a local one and
    starts warming its task workers (``warm_task_workers``).

    Args:
        dashboard: start the dashboard with a local cluster. Only a single Train run may go without:
            Ray Train's placement-group cleaner asks the dashboard whether a finished run's controller
            is gone, so runs that follow one another on the same cluster (a sweep) need it.
    """
    import ray

    from pipelines import console

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
        ray.init(**console.ray_init_options())
        return
    # A new local cluster (not one `ray start` left running: set RAY_ADDRESS=auto to join that).
    # On small machines, more logical CPUs than cores keep the Train workers and the Ray Data
    # actors from waiting on each other.
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=dashboard,
             **console.ray_init_options())
    global _started_here
    _started_here = True
    warm_task_workers(int(ray.cluster_resources().get("CPU", 1)))


_started_here = False  # whether init_ray started the local cluster this process is joined to


def stop_local_ray() -> None:
    """Stops the local cluster ``init_ray`` started (never one it joined), with the output of its
    last moments (the raylet's notices as workers exit) in the log file rather than the console."""
    import ray

    from pipelines import console

    global _started_here
    if _started_here and ray.is_initialized():
        with console.library_output():
            ray.shutdown()
    _started_here = False


_warming: list = []


def warm_task_workers(n: int) -> None:
    """Sends ``n`` tasks (one per logical CPU: Ray Data runs that many at once) that import what the
    Ray Data tasks import (torch, PIL, the decoding and augmentation modules), without waiting: a
    fresh worker spends 1.5-3 s on those imports, which the first epoch's first batch would otherwise
    wait for (`benchmark ingest`: warming only as many as cores halved the first epoch's rate). One
    also runs a tiny Ray Data pipeline, which starts the actors Ray Data creates on its first
    execution. ``wait_warm`` waits."""
    import ray

    task = ray.remote(_warm_worker).options(num_cpus=1)
    _warming[:] = [task.remote(first=i == 0) for i in range(n)]


def wait_warm(timeout_s: float = 120.0) -> None:
    """Waits for ``warm_task_workers``'s tasks (a benchmark's start line; runs need not wait)."""
    import ray

    if _warming:
        ray.wait(_warming, num_returns=len(_warming), timeout=timeout_s)
        _warming.clear()


def _warm_worker(*, first: bool) -> None:
    import importlib

    import PIL.Image  # noqa: F401
    import PIL.JpegImagePlugin  # noqa: F401
    import PIL.PngImagePlugin  # noqa: F401
    import ray.data

    import sscl.data.augment  # noqa: F401
    import sscl.data.sources  # noqa: F401

    # Ray Data's own task modules, by their 2.60 names: another Ray version only warms less.
    for internal in ("ray.data._internal.datasource.binary_datasource",
                     "ray.data._internal.execution.operators.map_transformer"):
        try:
            importlib.import_module(internal)
        except ImportError:
            pass
    if first:
        ray.data.range(2, override_num_blocks=1).materialize()


def check_ray_address(address: str, timeout_s: float = 10.0) -> None:
    """Something must listen at ``RAY_ADDRESS`` (``host:port`` or ``ray://host:port``) within ``timeout_s``:
    ``ray.init`` would otherwise retry for minutes. ``auto`` and ``local`` pass.

    Raises:
        ConnectionError: naming the address.
    """
    import socket

    target = address.split("://", 1)[-1].rstrip("/")
    if address in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as err:
        raise ConnectionError(f"RAY_ADDRESS={address!r}: no Ray cluster answers there ({err}); start one (ray start "
                              "--head, make cluster-up) or unset RAY_ADDRESS to run on a local one") from None


def storage_path(path: str) -> str | None:
    """Ray Train needs absolute local paths; URIs (s3://, gs://) pass through."""
    if not path or "://" in path:
        return path or None
    return str(Path(path).expanduser().resolve())


def check_storage_path(path: str) -> None:
    """A local ``train.storage_path`` must be a folder that exists or can be created (URIs pass).

    Raises:
        ValueError: naming the key, the path and why it cannot hold checkpoints.
    """
    if "://" in (path or ""):
        return
    folder = Path(storage_path(path) or Path("~/ray_results").expanduser())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".sscl-write-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"train.storage_path={path or '~/ray_results'!r}: cannot hold checkpoints at {folder} "
                         f"({err.strerror or err}); give a writable folder or an s3:// / gs:// URI") from None


def alive_resources() -> list[dict[str, float]]:
    """Each alive node's resources (``ray.nodes()``)."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def check_resources(cfg: Config, nodes: Sequence[dict[str, float]]) -> None:
    """Fails at once when ``scaling`` asks for more than the cluster's alive ``nodes`` hold.

    Raises:
        ValueError: naming the scaling keys, what they ask for and what the cluster has.
    """
    s = cfg.scaling
    gpus = 1.0 if s.use_gpu else 0.0
    total_cpu = sum(n.get("CPU", 0.0) for n in nodes)
    total_gpu = sum(n.get("GPU", 0.0) for n in nodes)
    # Workers are placed whole: count how many fit node by node.
    fit = sum(min(math.floor(n.get("CPU", 0.0) / s.cpus_per_worker + 1e-9),
                  math.floor(n.get("GPU", 0.0) / gpus) if gpus else 10**9) for n in nodes)
    if fit < s.num_workers:
        ask = f"{s.cpus_per_worker:g} CPU{' + 1 GPU' if gpus else ''}"
        raise ValueError(
            f"scaling.num_workers={s.num_workers} x ({ask}) (scaling.cpus_per_worker, scaling.use_gpu) does not fit: "
            f"the cluster has {total_cpu:g} CPUs and {total_gpu:g} GPUs on {len(nodes)} node(s), room for {fit} "
            "worker(s); lower scaling.num_workers / scaling.cpus_per_worker or add nodes"
        )


def _path_exists(path: str) -> bool:
    return os.path.exists(path)


def check_storage(path: str) -> None:
    """On a multi-node cluster, a local ``train.storage_path`` must be visible from every node.

    A marker file written here is looked for by a task pinned to each alive node. URIs (s3://,
    gs://, ...) pass; so does anything on one node.

    Raises:
        ValueError: naming the nodes that cannot see the path, and what to use instead.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2 or "://" in (path or ""):
        return
    root = Path(storage_path(path) or Path("~/ray_results").expanduser())
    root.mkdir(parents=True, exist_ok=True)
    marker = root / f".sscl-shared-{os.getpid()}-{time.time_ns()}"
    marker.write_text("written by the driver: is this storage shared by every node?")
    try:
        probe = ray.remote(num_cpus=0)(_path_exists)
        seen = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(marker)) for n in nodes], timeout=120)
    finally:
        marker.unlink(missing_ok=True)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise ValueError(
            f"train.storage_path={path or '~/ray_results'!r} is local to this node: node(s) {', '.join(blind)} of this "
            f"{len(nodes)}-node cluster cannot see it. Use storage every node shares: an NFS mount at the same path "
            "on all nodes, or object storage (s3://bucket/path, gs://bucket/path)"
        )
