"""Each data source reads a small file set written in its real on-disk format."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sscl.config import load_config
from sscl.data.sources import CorruptDataError, read_cifar, read_image_files, read_split, read_stl10


def rng_images(n, side, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def data_cfg(**overrides):
    return load_config(None, [f"data.{k}={v}" for k, v in overrides.items()]).data


# ---------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    expected = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        imgs = rng_images(per_batch, 32, seed=i)
        labels = [(i + k) % 10 for k in range(per_batch)]
        entry = {b"batch_label": name.encode(), b"labels": labels,
                 b"data": imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1), b"filenames": [b"x.png"] * per_batch}
        (folder / name).write_bytes(pickle.dumps(entry))
        expected[name] = (imgs, labels)
    return expected


def test_cifar10_pickles_round_trip(tmp_path):
    expected = write_cifar10(tmp_path)
    train = read_cifar(tmp_path, name="cifar10", train=True)
    test = read_cifar(tmp_path, name="cifar10", train=False)
    assert train.images.shape == (20, 32, 32, 3) and test.images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(train.images[:4], expected["data_batch_1"][0])
    np.testing.assert_array_equal(test.images, expected["test_batch"][0])
    assert train.labels[:4].tolist() == expected["data_batch_1"][1]
    split = read_split(data_cfg(source="cifar10", root=str(tmp_path)), "eval_test")
    np.testing.assert_array_equal(split.images, test.images)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = rng_images(3, 32)
    for name in ("train", "test"):
        entry = {b"data": imgs.transpose(0, 3, 1, 2).reshape(3, -1), b"fine_labels": [5, 77, 99], b"coarse_labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(entry))
    out = read_cifar(tmp_path, name="cifar100", train=True)
    assert out.labels.tolist() == [5, 77, 99]
    np.testing.assert_array_equal(out.images, imgs)


def test_cifar_missing_and_truncated_files_are_named(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    content = batch.read_bytes()
    batch.write_bytes(content[: len(content) // 2])
    with pytest.raises(CorruptDataError, match="data_batch_3 is truncated"):
        read_cifar(tmp_path, name="cifar10", train=True)
    batch.unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*data.download=true"):
        read_cifar(tmp_path, name="cifar10", train=True)


# ---------------------------------------------------------------- STL-10


def write_stl(root: Path, split: str, imgs: np.ndarray, labels: list[int] | None):
    folder = root / "stl10_binary"
    folder.mkdir(exist_ok=True)
    (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(imgs.transpose(0, 3, 2, 1)).tobytes())  # column-major
    if labels is not None:
        (folder / f"{split}_y.bin").write_bytes(np.asarray(labels, dtype=np.uint8).tobytes())


def test_stl10_binaries_round_trip_and_pretrain_joins_unlabeled(tmp_path):
    train, unl, test = rng_images(3, 96, 1), rng_images(5, 96, 2), rng_images(2, 96, 3)
    write_stl(tmp_path, "train", train, [1, 10, 4])
    write_stl(tmp_path, "unlabeled", unl, None)
    write_stl(tmp_path, "test", test, [2, 3])
    out = read_stl10(tmp_path, split="train")
    np.testing.assert_array_equal(out.images, train)
    assert out.labels.tolist() == [0, 9, 3]  # 1-10 on disk
    cfg = data_cfg(source="stl10", root=str(tmp_path))
    pretrain = read_split(cfg, "pretrain")
    assert len(pretrain.images) == 8 and (pretrain.labels == -1).sum() == 5
    assert read_split(cfg, "eval_test").labels.tolist() == [1, 2]


def test_stl10_truncated_binary_is_named(tmp_path):
    write_stl(tmp_path, "train", rng_images(2, 96), [1, 2])
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(CorruptDataError, match="train_X.bin is truncated"):
        read_stl10(tmp_path, split="train")
    with pytest.raises(FileNotFoundError, match="test_X.bin"):
        read_stl10(tmp_path, split="test")


# ---------------------------------------------------------------- image folders and parquet


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, per_class=3, side=40):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(rng_images(per_class, side, seed=c)):
            (root / name / f"{i}.png").write_bytes(png_bytes(img))


def test_imagefolder_labels_from_directories_and_resizes(tmp_path):
    write_folder(tmp_path)
    out, classes = read_image_files(tmp_path, size=32)
    assert classes == ["cat", "dog"] and out.images.shape == (6, 32, 32, 3)
    assert sorted(out.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    cfg = data_cfg(source="imagefolder", root=str(tmp_path), test_fraction=0.5)
    train, test = read_split(cfg, "eval_train"), read_split(cfg, "eval_test")
    assert len(train.images) + len(test.images) == 6 and len(read_split(cfg, "pretrain").images) == 6


def test_imagefolder_without_class_dirs_is_unlabelled(tmp_path):
    for i, img in enumerate(rng_images(2, 32)):
        (tmp_path / f"{i}.jpg").write_bytes(png_bytes(img))
    out, classes = read_image_files(tmp_path, size=32)
    assert classes == [] and out.labels.tolist() == [-1, -1]
    with pytest.raises(ValueError, match="no labels"):
        read_split(data_cfg(source="imagefolder", root=str(tmp_path)), "eval_test")


def test_imagefolder_corrupt_image_fails_or_is_skipped_and_counted(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(CorruptDataError, match="broken.png"):
        read_image_files(tmp_path, size=32)
    out, _ = read_image_files(tmp_path, size=32, skip_corrupt=True)
    assert out.skipped == 1 and len(out.images) == 6
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_image_files(tmp_path / "nowhere", size=32)


def test_parquet_with_encoded_bytes_and_labels(tmp_path):
    imgs = rng_images(4, 32)
    pq.write_table(pa.table({"img": [png_bytes(i) for i in imgs], "y": [0, 1, 2, 3]}), tmp_path / "part-0.parquet")
    cfg = data_cfg(source="parquet", root=str(tmp_path), image_column="img", label_column="y", test_fraction=0.25)
    full = read_split(cfg, "pretrain")
    np.testing.assert_array_equal(full.images, imgs)  # PNG is lossless
    assert full.labels.tolist() == [0, 1, 2, 3] and len(read_split(cfg, "eval_test").images) == 1
    with pytest.raises(ValueError, match="data.image_column='image'.*columns: img, y"):
        read_split(data_cfg(source="parquet", root=str(tmp_path)), "pretrain")


def test_parquet_corrupt_row_is_named(tmp_path):
    pq.write_table(pa.table({"image": [png_bytes(rng_images(1, 8)[0]), b"garbage"], "label": [0, 1]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(CorruptDataError, match="bad.parquet row 1"):
        read_split(data_cfg(source="parquet", root=str(tmp_path)), "pretrain")


def test_digits_offline_split():
    cfg = data_cfg(source="digits")
    train, test = read_split(cfg, "eval_train"), read_split(cfg, "eval_test")
    assert len(train.images) + len(test.images) == 1797 and train.images.shape[1:] == (32, 32, 3)
    assert set(test.labels.tolist()) == set(range(10))
