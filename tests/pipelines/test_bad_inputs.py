"""What a confused user types, entry point by entry point: each mistake ends with exit status 2, no
traceback, and a message naming the key, file or flag (and what would be valid).

Every case runs the real command in a fresh process, from a folder holding the files it needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
QUICK = str(ROOT / "pipelines" / "configs" / "quickstart.yaml")
SPACE = str(ROOT / "tune_spaces" / "sscl_priors.yaml")
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Files a user might point a command at by mistake."""
    here = tmp_path_factory.mktemp("inputs")
    (here / "a_folder").mkdir()
    (here / "partial_features").mkdir()  # an embedding job's output that was killed before it finished
    (here / "partial_features" / "_STARTED").write_text('{"token": "0123456789ab"}')
    (here / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (here / "list.yaml").write_text("- loss\n- train\n")
    (here / "number_key.yaml").write_text("loss:\n  0.5: beta\n")
    (here / "broken.yaml").write_text("loss: {temperature: [0.5\n")
    (here / "unknown_space.yaml").write_text("loss.temprature: {grid: [0.1, 0.2]}\n")
    (here / "notes.txt").write_text("these are not images\n")
    (here / "notes.npy").write_text("a user's file of that name\n")
    users_files(here / "users_files")
    (here / "empty_started").mkdir()
    (here / "empty_started" / "_STARTED").write_text("")
    np.save(here / "images.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    np.savez(here / "images.npz", images=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    np.save(here / "gray.npy", np.zeros((2, 8, 8), dtype=np.uint8))
    (here / "empty_cifar").mkdir()
    (here / "twice.yaml").write_text("loss:\n  temperature: 0.1\n  temperature: 0.2\n")
    (here / "twice_space.yaml").write_text("loss.beta: {grid: [0.5, 1.0]}\nloss.beta: {grid: [2.0]}\n")
    garbage = here / "garbage_cifar" / "cifar-10-batches-py"
    garbage.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (garbage / name).write_bytes(bytes(range(256)) * 8)
    _image_tree(here / "one_class", {"cat": 12})
    _image_tree(here / "train_tree", {"cat": 8, "dog": 8})
    _image_tree(here / "other_val", {"eel": 2, "fox": 2})
    import pyarrow as pa
    import pyarrow.parquet as pq

    (here / "nulls").mkdir()
    png = _png(np.zeros((8, 8, 3), dtype=np.uint8))
    pq.write_table(pa.table({"image": [png, None] * 40, "label": [0, 1] * 40}), here / "nulls" / "part-0.parquet")
    (here / "strings").mkdir()
    pq.write_table(pa.table({"image": [png] * 80, "label": ["cat", "dog"] * 40}), here / "strings" / "part-0.parquet")
    return here


def users_files(folder: Path) -> list[str]:
    """A folder of a user's own files, which no command may delete; returns what it holds."""
    (folder / "sub").mkdir(parents=True)
    for name in ("notes.txt", "photo.png", "sub/thesis.docx"):
        (folder / name).write_text(f"the user's {name}")
    return holding(folder)


def holding(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def _png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _image_tree(root: Path, counts: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))


P, T, E, R, L, B, S, M = ("pipelines.pretrain", "pipelines.tune", "pipelines.evaluate", "pipelines.registry",
                          "pipelines.train_local", "pipelines.benchmark", "pipelines.cli", "pipelines.embed")
CASES = [
    # (module, arguments ({f} = the fixture folder), what the message must name)
    (P, "--config nope.yaml", "config file not found: nope.yaml"),
    (P, f"--config {ROOT}/pipelines/configs/quikstart.yaml", "did you mean"),
    (P, f"--config {ROOT}/pipelines/configs/quikstart.yaml", "quickstart.yaml"),
    (P, "--config {f}/a_folder", "is a folder"),
    (P, "--config {f}/binary.yaml", "not a text file"),
    (P, "--config {f}/list.yaml", "must be a mapping of sections"),
    (P, "--config {f}/number_key.yaml", "loss.0.5: keys must be names"),
    (P, "--config {f}/broken.yaml", "not valid YAML"),
    (P, f"--config {QUICK} --config {QUICK}", "--config given twice"),
    (P, f"--config {QUICK} loss.temperature=-1", "loss.temperature=-1"),
    (P, f"--config {QUICK} loss.temprature=0.5", "did you mean loss.temperature"),
    (P, f"--config {QUICK} lossy.temperature=1", "did you mean loss"),
    (P, f"--config {QUICK} train.epochs=1000000000000", "train.epochs=1000000000000: must be <= 100000"),
    (P, f"--config {QUICK} data.batch_size=0", "data.batch_size=0"),
    (P, f"--config {QUICK} data.batch_size=3000000", "data.batch_size=3000000: must be <= 1048576"),
    (P, f"--config {QUICK} scaling.num_workers=0", "scaling.num_workers=0"),
    (P, f"--config {QUICK} augment.device=gpu", "renamed; use placement.views=trainer"),
    (P, f"--config {QUICK} placement.views=gpu", "placement.views='gpu'"),
    (P, f"--config {QUICK} model.encoder=vit", "model.encoder='vit'"),
    (P, f"--config {QUICK} loss.name=infonce", "loss.name='infonce'"),
    (P, f"--config {QUICK} optim.name=rmsprop", "optim.name='rmsprop'"),
    (P, f"--config {QUICK} train.amp=maybe", "train.amp"),
    (P, f"--config {QUICK} augment.crop_scale=[0.9,0.1]", "augment.crop_scale"),
    (P, f"--config {QUICK} loss.n_hard=1000", "loss.n_hard=1000"),
    (P, f"--config {QUICK} temperature=1", "temperature"),
    (P, f"--config {QUICK} loss.temperature", "key=value"),
    (P, f"--config {QUICK} data.source=imagefolder", "data.root='data'"),
    (P, f"--config {QUICK} data.source=imagefolder data.root=/nonexistent/images", "data.root='/nonexistent/images'"),
    (P, f"--config {QUICK} data.source=cifar10 data.root={{f}}/empty_cifar", "missing file"),
    (P, f"--config {QUICK} data.source=webdataset", "data.source='webdataset'"),
    (P, f"--config {QUICK} train.run_name=a/b", "train.run_name='a/b'"),
    (P, f"--config {QUICK} tracking.model_name=it's\"q", "may hold ' or \" but not both"),
    (P, f"--config {QUICK} tracking.uri=http://127.0.0.1:9", "unreachable"),
    (P, f"--config {QUICK} tracking.uri=http://user:secret@127.0.0.1:9", "http://***@127.0.0.1:9 is unreachable"),
    (P, "--config {f}/twice.yaml", "found the key 'temperature' twice"),
    (P, f"--config {QUICK} model.method=moco model.momentum=1.0", "model.momentum=1.0: must be < 1"),
    (P, f"--config {QUICK} optim.warmup_epochs=20", "optim.warmup_epochs=20: must be < train.epochs=10"),
    (P, f"--config {QUICK} loss.n_synthetic=1000000000", "loss.n_synthetic=1000000000: must be <= 16384"),
    (P, f"--config {QUICK} augment.crop_size=64", "augment.crop_size=64: larger than the decoded images (32 px"),
    (P, f"--config {QUICK} train.knn_k=5000", "train.knn_k=5000: more neighbours than the 1438 images"),
    (P, f"--config {QUICK} tracking.experiment=", "tracking.experiment='': Invalid experiment name"),
    (P, f"--config {QUICK} tracking.model_name=a/b", "tracking.model_name='a/b': Invalid model name"),
    (P, f"--config {QUICK} tracking.uri=file:///tmp/mlruns", "MLflow 3.17 serves no plain file store"),
    (P, f"--config {QUICK} tracking.uri=sqlite:///{{f}}/a_folder", "a_folder is a folder"),
    (P, f"--config {QUICK} train.storage_path={{f}}/notes.txt/ray", "train.storage_path='{f}/notes.txt/ray': cannot hold"),
    (P, f"--config {QUICK} data.source=imagefolder data.root={{f}}/one_class data.batch_size=8 loss.n_hard=8",
     "1 class folder(s) holding images (cat: 12)"),
    (P, f"--config {QUICK} data.source=imagefolder data.root={{f}}/train_tree data.eval_root={{f}}/other_val "
        "data.batch_size=8 loss.n_hard=8", "lacks: eel, fox"),
    (T, f"--config {QUICK} --space {{f}}/twice_space.yaml", "found the key 'loss.beta' twice"),
    (L, f"--config {QUICK} data.source=parquet data.root={{f}}/nulls data.image_size=32 data.batch_size=16 "
        "loss.n_hard=8", "the cell is empty (null)"),
    (L, f"--config {QUICK} data.source=parquet data.root={{f}}/strings data.batch_size=16 loss.n_hard=8",
     "data.label_column='label' holds 'cat'"),
    (L, f"--config {QUICK} data.source=cifar10 data.root={{f}}/garbage_cifar", "is truncated or not a CIFAR pickle"),
    (L, f"--config {QUICK} train.knn_k=5000", "train.knn_k=5000: more neighbours than the 1438 images"),
    (R, "promote sscl-digits 1 --alias latest", "'latest' alias name (case insensitive) is reserved"),
    (R, "promote sscl-digits 1 --alias v3", "Version alias name 'v3' is reserved"),
    (R, "promote sscl-digits 1 --alias=", "alias name cannot be empty"),
    (P, f"--config {QUICK} placement.decode=device", "placement.decode=device: digits images are not stored encoded"),
    (P, f"--config {QUICK} data.source=imagefolder data.root=x placement.decode=device",
     "placement.views=ray_data: with placement.decode=device the images exist only on the training device"),
    (B, "ingest --memory-sizes 5k", "give comma-separated integers"),
    (B, "ingest --epochs 1", "--epochs must be >= 2 (the first epoch, then the steady state)"),
    (B, "ingest --root {f}/no_such_folder", "no_such_folder: no such folder"),
    ("pipelines.gpu_check", "--device tpu", "--device 'tpu'"),
    ("pipelines.local_cluster", "up --ray-port 99999", "99999: a port is 1-65535"),
    (T, f"--config {QUICK} --space nope.yaml", "search space not found: nope.yaml"),
    (T, f"--config {QUICK} --space nope.yaml", "sscl_priors.yaml"),
    (T, f"--config {QUICK} --space {{f}}/a_folder", "is a folder"),
    (T, f"--config {QUICK} --space {{f}}/binary.yaml", "not a text file"),
    (T, f"--config {QUICK}", "--space"),
    (T, f"--config {QUICK} --space {{f}}/unknown_space.yaml", "loss.temprature"),
    (T, f"--config {QUICK} --config {QUICK} --space {SPACE}", "--config given twice"),
    (T, f"--config {QUICK} --space {SPACE} tune.name=a/b", "tune.name='a/b'"),
    (T, f"--config {QUICK} --space {SPACE} tune.metric=accuracy", "tune.metric='accuracy'"),
    (T, f"--config {QUICK} --space {SPACE} tune.num_samples=0", "tune.num_samples=0"),
    (E, f"--config {QUICK} --model champion", "--model must look like models:/<name>@<alias>"),
    (E, f"--config {QUICK} --model models:/x@champion tracking.uri=sqlite:///{{f}}/typo.db", "typo.db does not exist"),
    (E, f"--config {QUICK}", "--model"),
    (E, "--config nope.yaml --model models:/x@champion", "config file not found: nope.yaml"),
    (E, f"--config {QUICK} --model models:/x/1 train.knn_k=0", "train.knn_k=0"),
    (E, f"--config {QUICK} --features {{f}}/partial_features --test-features {{f}}/partial_features",
     "--features: {f}/partial_features is not a complete embedding (no _SUCCESS: the embedding job that wrote it "
     "did not finish)"),
    (E, f"--config {QUICK} --features {{f}}/missing --test-features {{f}}/missing", "--features: {f}/missing: no such"),
    (E, f"--config {QUICK} --features {{f}}/partial_features", "give --model, or --features with --test-features"),
    (E, f"--config {QUICK} --model models:/x@champion --features {{f}}/a --test-features {{f}}/b", "(not both)"),
    (M, f"--config {QUICK} --model champion --out {{f}}/o", "--model must look like models:/<name>@<alias>"),
    (M, f"--config {QUICK} --model models:/x@champion", "--out"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/o --split test", "invalid choice: 'test'"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/o embed.actors=0", "embed.actors=0"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/o tune.name=x",
     "tune.name: a setting of python -m pipelines.tune"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/notes.txt/o",
     "--out {f}/notes.txt/o: {f}/notes.txt is a file"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/notes.txt", "a file, not a folder"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/garbage_cifar",
     "holds files python -m pipelines.embed did not write (cifar-10-batches-py); nothing was changed"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/users_files --overwrite",
     "did not write (notes.txt, photo.png, sub); nothing was changed"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/train_tree data.source=imagefolder "
        "data.root={f}/train_tree --overwrite", "--out {f}/train_tree: is data.root ({f}/train_tree)"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/train_tree/cat/features data.source=imagefolder "
        "data.root={f}/train_tree", "lies inside data.root ({f}/train_tree)"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}} data.source=imagefolder data.root={{f}}/train_tree",
     "holds data.root ({f}/train_tree)"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/st tracking.uri=sqlite:///{{f}}/st/mlflow.db",
     "holds the MLflow store"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/empty_started",
     "its _STARTED cannot be read as JSON (it is empty), so it is not a marker written by python -m pipelines.embed"),
    (R, "embed models:/x@champion --images {f}/images.npy --out {f}/features", "--out {f}/features: must end in .npy"),
    (R, "embed models:/x@champion --images {f}/images.npy --out {f}/images.npy", "--out {f}/images.npy: is --images"),
    (R, "embed models:/x@champion --images {f}/images.npy --out {f}/notes.npy", "--out {f}/notes.npy: exists; pass "
        "--overwrite"),
    (R, "export models:/x@champion --onnx {f}/a_folder", "--onnx {f}/a_folder: is a folder"),
    (R, "--tracking-uri sqlite:///{f}/st/mlflow.db export models:/x@champion --onnx {f}/st/mlflow.db --overwrite",
     "is the MLflow store"),
    (L, f"--config {QUICK} --out-dir {{f}}/users_files", "--out-dir {f}/users_files: holds files python -m "
        "pipelines.train_local did not write (notes.txt, photo.png, sub)"),
    (L, f"--config {QUICK} --out-dir {{f}}/train_tree/out data.source=imagefolder data.root={{f}}/train_tree",
     "--out-dir {f}/train_tree/out: lies inside data.root"),
    (B, "embed --workdir {f}/users_files", "--workdir {f}/users_files: holds files python -m pipelines.benchmark did "
        "not write"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/o tracking.uri=sqlite:///{{f}}/typo.db",
     "typo.db does not exist"),
    (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/o data.source=imagefolder data.root={{f}}/nope",
     "data.root='{f}/nope'"),
    (R, "--tracking-uri sqlite:///{f}/typo.db list", "typo.db does not exist"),
    (R, "--tracking-uri sqlite:///{f}/typo.db show models:/x@champion", "typo.db does not exist"),
    (R, "show champion", "model must look like models:/<name>@<alias>"),
    (R, "embed models:/x@champion --images {f}/missing.npy --out {f}/o.npy", "--images: file not found"),
    (R, "embed models:/x@champion --images {f}/images.npz --out {f}/o.npy", ".npz archive"),
    (R, "embed models:/x@champion --images {f}/notes.txt --out {f}/o.npy", "not a .npy array file"),
    (R, "embed models:/x@champion --images {f}/gray.npy --out {f}/o.npy", "must hold uint8 (N, H, W, 3)"),
    (R, "promote sscl-digits", "version"),
    (R, "frobnicate", "invalid choice"),
    (L, f"--config {QUICK} --device tpu", "--device 'tpu'"),
    (L, f"--config {QUICK} --workers -1", "--workers must be >= 0"),
    (L, f"--config {QUICK} data.batch_size=0", "data.batch_size=0"),
    (L, "--config nope.yaml", "config file not found: nope.yaml"),
    (L, f"--config {QUICK} data.source=imagefolder data.root=/nonexistent/images", "/nonexistent/images"),
    (L, f"--config {QUICK} data.batch_size=100000", "data.batch_size=100000: larger than the 1438 pretraining"),
    (L, f"--config {QUICK} --batch-size 0", "unrecognized arguments: --batch-size"),
    (B, "train --batch-size 0", "--batch-size must be >= 2"),
    (B, "loss --threads 0", "--threads must be >= 1"),
    (B, "loss --device tpu", "--device 'tpu'"),
    (B, "nonsense", "invalid choice: 'nonsense'"),
    (S, "pretrian", "unknown command 'pretrian'; did you mean pretrain?"),
    (S, "frobnicate", "unknown command 'frobnicate'"),
    (S, "config --config nope.yaml", "config file not found: nope.yaml"),
    (S, f"train-local --config {QUICK} --device tpu", "--device 'tpu'"),
]
if NO_GPU:
    CASES += [(L, f"--config {QUICK} --device cuda", "--device 'cuda': no such GPU here"),
              (B, "loss --device cuda", "--device 'cuda': no such GPU here")]


@pytest.mark.parametrize("module,arguments,named", CASES, ids=[f"{m.split('.')[-1]} {a}"[:90] for m, a, _ in CASES])
def test_a_mistake_exits_2_naming_what_is_wrong(folder, module, arguments, named):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["PYTHONPATH"] = str(ROOT)
    argv = [a.replace("{f}", str(folder)) for a in arguments.split()]
    out = subprocess.run([sys.executable, "-m", module, *argv], cwd=folder, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert named.replace("{f}", str(folder)) in out.stderr, out.stderr[-2000:]
    assert not (folder / "typo.db").exists()  # a read-only command never creates a store


def test_no_command_deletes_a_users_files_or_its_data_with_or_without_overwrite(folder):
    """The cases above exit 2; here, what the folders hold afterwards is what they held before."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))} | {"PYTHONPATH": str(ROOT)}
    users, tree = holding(folder / "users_files"), holding(folder / "train_tree")
    for module, arguments in (
            (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/users_files --overwrite"),
            (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/users_files"),
            (M, f"--config {QUICK} --model models:/x@champion --out {{f}}/train_tree data.source=imagefolder "
                "data.root={f}/train_tree --overwrite"),
            (L, f"--config {QUICK} --out-dir {{f}}/users_files --overwrite"),
            (L, f"--config {QUICK} --out-dir {{f}}/train_tree data.source=imagefolder data.root={{f}}/train_tree "
                "--overwrite"),
            (B, "embed --workdir {f}/users_files")):
        argv = [a.replace("{f}", str(folder)) for a in arguments.split()]
        out = subprocess.run([sys.executable, "-m", module, *argv], cwd=folder, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 2, out.stderr[-2000:]
        assert holding(folder / "users_files") == users and holding(folder / "train_tree") == tree, arguments


def test_there_are_at_least_sixty_cases():
    assert len(CASES) >= 60


def test_names_with_quotes_backslashes_and_unicode_reach_mlflow_queries_intact(tmp_path):
    from sscl import model_registry, tracking

    uri = f"sqlite:///{tmp_path}/names.db"
    names = ["it's", 'say "hi"', "back\\slash", "naïve-日本", "a'b\\'c", "trailing\\", "\\'"]
    ids = {name: tracking.open_run(uri, "names", run_name=name, params={"x": 1}, config_text="x: 1\n") for name in names}
    assert len(set(ids.values())) == len(names)  # each its own run
    for name, run_id in ids.items():
        assert tracking.open_run(uri, "names", run_name=name, params={}, config_text="") == run_id  # found again
        assert tracking.named_run(uri, "names", name)[0] == run_id
    assert model_registry.list_versions(uri, "o'brien \\ 日本") == []  # a model name with quotes is a query value, not syntax
    with pytest.raises(ValueError, match="not both"):
        tracking.filter_literal("it's \"quoted\"")


def test_sigterm_to_a_local_run_leaves_no_ray_process_behind(tmp_path):
    import shutil
    import signal
    import tempfile
    import time

    ray_tmp = Path(tempfile.mkdtemp(prefix="sscl-", dir="/tmp"))  # short: Ray's socket paths must fit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env |= {"PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    overrides = [f"train.storage_path={tmp_path}/ray", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "train.epochs=5",
                 "model.width=0.125", "data.batch_size=64", "train.linear_epochs=5", "train.knn_k=20"]
    log = tmp_path / "driver.log"
    try:
        with open(log, "w") as out:
            driver = subprocess.Popen([sys.executable, "-m", "pipelines.pretrain", "--config", QUICK, *overrides],
                                      cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while "epoch   1/5 [" not in log.read_text():  # training is under way
            assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        assert subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True).stdout  # its cluster runs
        driver.send_signal(signal.SIGTERM)  # the workers are stopped, the run marked KILLED, the cluster shut down
        assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
        said = log.read_text()
        assert "run interrupted; MLflow run" in said and "marked KILLED" in said and "resume it with:" in said
        assert "Traceback" not in said, said[-3000:]
        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
        (run,) = client.search_runs([client.get_experiment_by_name("sscl-quickstart").experiment_id])
        assert run.info.status == "KILLED"
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-f", str(ray_tmp)], capture_output=True).stdout:
            assert time.monotonic() < deadline, subprocess.run(["pgrep", "-af", str(ray_tmp)], capture_output=True,
                                                               text=True).stdout
            time.sleep(1)
    finally:
        subprocess.run(["pkill", "-9", "-f", str(ray_tmp)])
        shutil.rmtree(ray_tmp, ignore_errors=True)
