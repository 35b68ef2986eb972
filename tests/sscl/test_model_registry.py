"""ONNX export of a registered encoder: onnxruntime gives the registered (pt2) encoder's features at any
batch size, on random inputs and on real digits under the evaluation transform; the command refuses
what it must with exit status 2 and a message naming the flag or URI. The torchvision export: a ResNet-18
at width 1 with the ImageNet stem becomes a state dict that torchvision's resnet18 takes (only ``fc``
missing) and computes the registered features with; other encoders are refused, saying why."""

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


# ---------------------------------------------------------------------------- torchvision state dict

TORCHVISION_MODEL, CIFAR_MODEL = "models:/torchvision-test/1", "models:/torchvision-test/2"


@pytest.fixture(scope="module")
def torchvision_store(tmp_path_factory) -> tuple[str, Path]:
    """A sqlite store holding ``torchvision-test`` version 1, a ResNet-18 at width 1 with the ImageNet stem,
    and version 2, one at width 0.25 with the CIFAR stem; both 32 px, their batch norms' affine parameters
    and running statistics away from their initial values (so a load that dropped them would show)."""
    from sscl.models import build_encoder

    folder = tmp_path_factory.mktemp("torchvision")
    uri = f"sqlite:///{folder}/mlflow.db"
    run_id = tracking.open_run(uri, "torchvision", run_name="r", params={}, config_text="")
    torch.manual_seed(0)
    for version, (stem, width) in enumerate((("imagenet", 1.0), ("cifar", 0.25)), start=1):
        encoder = build_encoder("resnet18", stem=stem, width=width).train()
        for module in encoder.modules():
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.weight, 0.5, 1.5)
                nn.init.normal_(module.bias, std=0.1)
        with torch.no_grad():
            for _ in range(3):
                encoder(torch.randn(8, 3, 32, 32) * 2 + 0.5)
        info = tracking.log_encoder(uri, run_id, encoder, image_size=32, model_name="torchvision-test")
        assert str(info.registered_model_version) == str(version)
    return uri, folder


def test_torchvision_resnet18_takes_the_exported_state_dict_and_gives_the_registered_features(torchvision_store,
                                                                                              tmp_path, monkeypatch):
    import torchvision

    uri, _ = torchvision_store
    monkeypatch.chdir(tmp_path)
    result = model_registry.export_torchvision(uri, TORCHVISION_MODEL, "resnet18.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["resnet18.pt"]  # no temporary file left
    assert result["torchvision"] == "resnet18.pt" and result["architecture"] == "resnet18"
    assert result["feature_dim"] == 512 and result["missing"] == ["fc.weight", "fc.bias"]

    state = torch.load("resnet18.pt", weights_only=True)  # plain tensors: nothing else unpickles
    assert type(state) is dict and all(type(t) is torch.Tensor for t in state.values())
    assert float(state["bn1.running_var"].sub(1).abs().max()) > 0.1  # trained statistics, not the initial ones
    model = torchvision.models.resnet18(weights=None)
    loaded = model.load_state_dict(state, strict=False)
    assert loaded.missing_keys == ["fc.weight", "fc.bias"] and loaded.unexpected_keys == []
    model.fc = nn.Identity()
    model.eval()

    registered = model_registry.load_registered(uri, TORCHVISION_MODEL)
    generator = torch.Generator().manual_seed(1)
    for batch in (4, 7):
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            want, have = registered(images), model(images)
        assert have.shape == (batch, 512) and float(want.abs().max()) > 0.1
        torch.testing.assert_close(have, want, rtol=0, atol=1e-5)


def test_torchvision_export_refuses_a_cifar_stem_at_width_quarter_saying_why(torchvision_store, tmp_path):
    uri, _ = torchvision_store
    with pytest.raises(ValueError) as refused:
        model_registry.export_torchvision(uri, CIFAR_MODEL, tmp_path / "resnet18.pt")
    assert str(refused.value).startswith(f"{CIFAR_MODEL} is resnet18 at width 0.25 with the cifar stem: torchvision's "
                                         "resnet18 has width 1 and the imagenet stem")
    assert "mlflow.pytorch.load_model" in str(refused.value) and "--onnx" in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_the_export_command_refuses_torchvision_for_a_cifar_encoder_with_exit_status_2(torchvision_store, tmp_path,
                                                                                     monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # it would win over --tracking-uri
    uri, _ = torchvision_store
    with pytest.raises(SystemExit) as stop:
        registry.cli(["--tracking-uri", uri, "export", CIFAR_MODEL, "--torchvision", str(tmp_path / "resnet18.pt")])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in message
    assert ("resnet18 at width 0.25 with the cifar stem: torchvision's resnet18 has width 1 and the imagenet stem"
            in message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("typed, named", [
    ("./taken.pt", "--torchvision ./taken.pt: exists; pass --overwrite"),
    ("no_folder/resnet18.pt", "--torchvision no_folder/resnet18.pt: its folder"),
    ("sub/", "--torchvision sub/: is a folder"),
    ("mlflow.db", "--torchvision mlflow.db: is the MLflow store"),
])
def test_the_export_command_keeps_the_torchvision_file_rules(torchvision_store, typed, named, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, folder = torchvision_store
    monkeypatch.chdir(folder)  # relative paths, so the message can be seen to name them as typed
    (folder / "taken.pt").write_bytes(b"kept")
    (folder / "sub").mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as stop:
        registry.cli(["--tracking-uri", uri, "export", TORCHVISION_MODEL, "--torchvision", typed])
    message = capsys.readouterr().err
    assert stop.value.code == 2 and named in message and "Traceback" not in message
    assert (folder / "taken.pt").read_bytes() == b"kept" and list((folder / "sub").iterdir()) == []


def test_the_export_command_replaces_a_torchvision_file_with_overwrite(torchvision_store, tmp_path, monkeypatch,
                                                                      capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, _ = torchvision_store
    path = tmp_path / "resnet18.pt"
    path.write_bytes(b"old")
    out = registry.cli(["--tracking-uri", uri, "export", TORCHVISION_MODEL, "--torchvision", str(path), "--overwrite"])
    assert out["torchvision"] == str(path) and f'"torchvision": "{path}"' in capsys.readouterr().out
    assert sorted(torch.load(path, weights_only=True)) == sorted(
        k.removeprefix("encoder.") for k in model_registry.load_registered(uri, TORCHVISION_MODEL).state_dict())


@pytest.mark.parametrize("flags, named", [
    (["--onnx", "a.onnx", "--torchvision", "a.pt"], "not allowed with argument"),
    ([], "one of the arguments --onnx --torchvision is required"),
])
def test_the_export_command_takes_exactly_one_of_onnx_and_torchvision(flags, named, capsys):
    with pytest.raises(SystemExit) as stop:
        registry.cli(["export", TORCHVISION_MODEL, *flags])
    assert stop.value.code == 2 and named in capsys.readouterr().err
