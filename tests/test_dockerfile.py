"""Docker cannot run on CI machines: check what the Dockerfile installs against what CI installs."""

from __future__ import annotations

import pytest

import re
import shutil
import subprocess
from pathlib import Path

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]


def pins() -> dict[str, str]:
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^\s#]+)", line.strip())
        if match:
            found[match.group(1).lower()] = match.group(3)
    return found


def test_dockerfile_installs_the_ci_requirements_on_the_pinned_ray_gpu_image_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    versions = pins()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M).group(1)
    assert base == f"rayproject/ray:{versions['ray']}-py311-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.M)
    # The CUDA torch wheels at exactly the pinned versions, then the same requirements.txt as CI.
    assert f"torch=={versions['torch']}" in text and f"torchvision=={versions['torchvision']}" in text
    assert "download.pytorch.org/whl/${TORCH_CUDA}" in text
    assert "pip install --no-cache-dir -r requirements.txt" in text
    assert "-r requirements.txt" in (ROOT / "Makefile").read_text()  # what `make test` (CI) installs
    # Runs as the image's non-root user from before the first install to the end.
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and set(users) == {"ray"} and text.index("USER ray") < text.index("RUN ")
    # Everything it copies exists; what it must not ship is ignored.
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists(), name
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv/", "data/", "mlflow.db", "mlruns/"} <= set(ignored)


def test_job_upload_leaves_out_venv_data_mlflow_store_and_checkpoints(tmp_path):
    """Ray's own packager (what `ray job submit --working-dir .` uploads) on a copy of the project
    with local state in it: only the project's files go in."""
    from zipfile import ZipFile

    from ray._private.runtime_env.packaging import create_package

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tree = tmp_path / "project"
    for name in tracked:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    state = [".venv/bin/python", "data/cifar-10-batches-py/data_batch_1", "mlflow.db", "mlruns/0/x/meta.yaml",
             "mlartifacts/1/model.pt2", "outputs/ray_results/quickstart/checkpoint_0/state.pt", ".cluster/pids.json",
             "checkpoints/last.pt"]
    for name in state:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    create_package(str(tree), tmp_path / "package.zip", include_gitignore=True)
    packed = set(ZipFile(tmp_path / "package.zip").namelist())
    assert {"sscl/losses/two_view.py", "pipelines/pretrain.py", "tune_spaces/sscl_priors.yaml"} <= packed
    assert not [name for name in state if name in packed]
