"""The embedding job (``pipelines.embed``: Ray Data decoding, a pool of encoder actors, Parquet) vs
the one-process loop a user would write (read, decode, encode in batches, one array), on the same
JPEG folder and the same registered encoder: whole-command images/s, each from its start to the
last feature, and the largest difference between their features."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.bench.harness import BENCHMARK
from sscl.outputs import claim_folder

MODEL = "models:/bench-encoder/1"


def register_encoder(uri: str, width: float) -> None:
    """The quickstart's encoder at ``width`` (untrained: throughput does not depend on the weights),
    registered in the store at ``uri`` as ``MODEL``."""
    from sscl import tracking
    from sscl.build import model_from_config
    from sscl.config import load_config

    cfg = load_config(None, ["model.stem=cifar", f"model.width={width}"])
    run_id = tracking.open_run(uri, "bench-embed", run_name="encoder", params={}, config_text="")
    tracking.log_encoder(uri, run_id, model_from_config(cfg).encoder, image_size=cfg.augment.crop_size,
                         model_name=MODEL.split("/")[1])


def _one_process(root: Path, uri: str, cfg: Any) -> tuple[float, np.ndarray, list[str]]:
    """Seconds, features and keys of the plain loop: load, then for each batch of files read,
    decode and encode (the evaluation transform, ``sscl.build.encode``)."""
    from pipelines.evaluate import load_encoder
    from sscl import model_registry
    from sscl.build import encode
    from sscl.data.decode import decode_image
    from sscl.data.formats import list_folder

    start = time.perf_counter()
    encoder = load_encoder(MODEL, uri, resolve=False)
    size = model_registry.registered_image_size(uri, MODEL)
    listing = list_folder(str(root))
    keys = [p[len(listing.base) + 1:] for p in listing.paths]
    step, parts = cfg.data.eval_batch_size, []
    for i in range(0, len(keys), step):
        images = np.stack([decode_image((root / k).read_bytes(), cfg.data.image_size, k) for k in keys[i:i + step]])
        parts.append(encode(encoder, images, cfg, image_size=size).numpy())
    return time.perf_counter() - start, np.concatenate(parts), keys


def bench_embed(n_images: int = 4000, *, side: int = 64, width: float = 0.25, actors: int = 2, workdir: str = "",
                json_path: str = "") -> dict[str, float]:
    """Prints and returns images/s of the one-process loop and of the embedding job (a local
    cluster started before the clock), their ratio, and the largest feature difference.

    Args:
        n_images, side: generated JPEGs (``side`` pixels square), decoded to 32 px as the quickstart.
        width: the encoder's ResNet-18 width.
        actors: ``embed.actors``.
    """
    from pipelines import embed
    from pipelines.bench.ingest import write_jpeg_folder
    from pipelines.ray_checks import init_ray, wait_warm
    from sscl.config import load_config
    from sscl.data.features import read_features

    work = Path(workdir or tempfile.mkdtemp(prefix="sscl-bench-embed-"))
    claim_folder(work, "--workdir", BENCHMARK, may_hold=["images", "mlflow.db", "mlruns", "features"])
    root = write_jpeg_folder(work / "images", n_images, side=side)
    uri = f"sqlite:///{work}/mlflow.db"
    register_encoder(uri, width)
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}", "data.image_size=32",
                             f"tracking.uri={uri}", "model.stem=cifar", f"model.width={width}"])
    init_ray(dashboard=False)
    wait_warm()
    seconds, features, keys = _one_process(root, uri, cfg)
    start = time.perf_counter()
    embed.main(cfg, embed.Embedding(actors=actors), model_uri=MODEL, out=str(work / "features"), overwrite=True)
    job_seconds = time.perf_counter() - start
    stored = read_features(str(work / "features"))
    order = np.argsort(keys)
    assert list(stored.keys) == [keys[i] for i in order], "the job's keys differ from the folder's files"
    figures = {"images": n_images, "one_process_images_per_s": n_images / seconds,
               "embed_images_per_s": n_images / job_seconds, "ratio": seconds / job_seconds,
               "max_abs_feature_difference": float(np.abs(stored.features - features[order]).max()),
               "torch_threads": torch.get_num_threads(), "actors": actors}
    print(f"{n_images} JPEGs ({side} px -> 32 px), ResNet-18 x{width} encoder, {actors} actor(s), "
          f"batch {cfg.data.eval_batch_size}")
    print(f"one-process loop (read, decode, encode):  {figures['one_process_images_per_s']:8.0f} images/s")
    print(f"pipelines.embed (Ray Data -> Parquet):    {figures['embed_images_per_s']:8.0f} images/s  "
          f"({figures['ratio']:.2f}x; the job's start included)")
    print(f"largest feature difference: {figures['max_abs_feature_difference']:.2e}")
    if json_path:
        Path(json_path).write_text(json.dumps(figures, indent=2))
    return figures
