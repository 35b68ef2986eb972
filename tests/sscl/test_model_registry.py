"""ONNX export of a registered encoder: onnxruntime gives the registered (pt2) encoder's features at any
batch size, on random inputs and on real digits under the evaluation transform; the command refuses
what it must with exit status 2 and a message naming the flag or URI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import QUICKSTART
from pipelines import registry
from sscl import model_registry, tracking
from sscl.build import encode, model_from_config
from sscl.config import Config, load_config
from sscl.data.augment import normalize_images
from sscl.data.digits import load_digits_images

pytestmark = pytest.mark.integration
MODEL = "models:/onnx-test/1"


class OnnxEncoder(nn.Module):
    """An onnxruntime session in the encoder's place: images (B, 3, S, S) -> features (B, F)."""

    def __init__(self, path: Path) -> None:
        import onnxruntime

        super().__init__()
        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(["features"], {"images": images.numpy()})[0])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Config, Path]:
    """A sqlite store holding the quickstart encoder as ``onnx-test`` version 1, its batch norms' running
    statistics taken from digits (so folding them into the convolutions is not the identity)."""
    folder = tmp_path_factory.mktemp("onnx")
    uri = f"sqlite:///{folder}/mlflow.db"
    cfg = load_config(QUICKSTART)
    torch.manual_seed(0)
    encoder = model_from_config(cfg).encoder.train()
    images, _ = load_digits_images(cfg.augment.crop_size)
    with torch.no_grad():
        for start in range(0, 512, 128):
            encoder(normalize_images(torch.as_tensor(images[start:start + 128]), mean=tuple(cfg.augment.mean),
                                     std=tuple(cfg.augment.std)))
    run_id = tracking.open_run(uri, "onnx", run_name="r", params={}, config_text="")
    info = tracking.log_encoder(uri, run_id, encoder, image_size=cfg.augment.crop_size, model_name="onnx-test")
    assert str(info.registered_model_version) == "1"
    return uri, cfg, folder


def test_onnxruntime_gives_the_registered_encoders_features(store):
    import onnx

    uri, cfg, folder = store
    (folder / "out").mkdir()
    path = folder / "out" / "encoder.onnx"
    result = model_registry.export_onnx(uri, MODEL, path)
    assert [p.name for p in path.parent.iterdir()] == ["encoder.onnx"]  # no scratch file left
    assert result["image_size"] == cfg.augment.crop_size and result["feature_dim"] == 128  # resnet18 at width 0.25
    assert result["max_abs_diff"] <= result["atol"]

    graph = onnx.load(str(path)).graph
    onnx.checker.check_model(str(path))
    (images_in,), (features_out,) = graph.input, graph.output
    dims = images_in.type.tensor_type.shape.dim
    assert images_in.name == "images" and features_out.name == "features"
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # a symbolic batch
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert result["opset"] == next(o.version for o in onnx.load(str(path)).opset_import if o.domain == "")

    registered, exported = model_registry.load_registered(uri, MODEL), OnnxEncoder(path)
    generator = torch.Generator().manual_seed(1)
    for batch in (4, 7):  # neither the traced batch (2) nor the checked ones (3, 5)
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            want = registered(images).numpy()
        have = exported(images).numpy()
        assert have.shape == (batch, 128)
        np.testing.assert_allclose(have, want, rtol=0, atol=model_registry.onnx_atol(want))

    # Real images through the evaluation pipeline's own path (normalisation, 512-image batches).
    digits, _ = load_digits_images()
    want = encode(registered, digits[:600], cfg, image_size=result["image_size"]).numpy()
    have = encode(exported, digits[:600], cfg, image_size=result["image_size"]).numpy()
    assert want.shape == (600, 128) and np.abs(want).max() > 1  # features of real size, not all zeros
    np.testing.assert_allclose(have, want, rtol=0, atol=model_registry.onnx_atol(want))


@pytest.mark.parametrize("model, onnx_path, named", [
    (MODEL, "taken.onnx", "pass --overwrite"),
    (MODEL, "no_folder/encoder.onnx", "--onnx"),
    ("onnx-test@champion", "new.onnx", "models:/<name>@<alias> or models:/<name>/<version>"),
    ("models:/onnx-test@champion", "new.onnx", "models:/onnx-test@champion"),  # no such alias
    ("models:/onnx-test/9", "new.onnx", "models:/onnx-test/9"),
])
def test_the_export_command_refuses_bad_input_with_exit_status_2(store, model, onnx_path, named, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over --tracking-uri
    uri, _, folder = store
    (folder / "taken.onnx").write_bytes(b"kept")
    with pytest.raises(SystemExit) as stop:
        registry.cli(["--tracking-uri", uri, "export", model, "--onnx", str(folder / onnx_path)])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and named in message and "Traceback" not in message
    assert (folder / "taken.onnx").read_bytes() == b"kept" and not (folder / "new.onnx").exists()
    if onnx_path == "taken.onnx":
        assert str(folder / "taken.onnx") in message


def test_the_export_command_replaces_a_file_with_overwrite(store, monkeypatch, capsys):
    import onnx

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, _, folder = store
    path = folder / "replaced.onnx"
    path.write_bytes(b"old")
    out = registry.cli(["--tracking-uri", uri, "export", MODEL, "--onnx", str(path), "--overwrite"])
    assert out["onnx"] == str(path) and f'"onnx": "{path}"' in capsys.readouterr().out
    onnx.checker.check_model(str(path))
