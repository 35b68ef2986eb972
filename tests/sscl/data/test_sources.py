"""Each data source, read lazily by Ray Data from small file sets written in their real on-disk formats."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sscl.config import load_config
from sscl.data.decode import BadImages, CorruptDataError, DataError
from sscl.data.formats import list_folder, read_cifar_file
from sscl.data.sources import build_dataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("ray_cluster")]


def rng_images(n, side, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def data_cfg(**overrides):
    size = overrides.get("image_size", 32)  # the crop follows small decoded images
    return load_config(None, [f"data.{k}={v}" for k, v in overrides.items()] + [f"augment.crop_size={size}"]).data


def rows(split):
    """(images, labels) of a built split, sorted by content so order does not matter."""
    table = split.dataset.take_all()
    images = np.stack([r["image"] for r in table]) if table else np.zeros((0,))
    labels = np.array([r["label"] for r in table])
    order = sorted(range(len(table)), key=lambda i: images[i].tobytes())
    return images[order], labels[order]


def sorted_images(images):
    return images[sorted(range(len(images)), key=lambda i: images[i].tobytes())]


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
    cfg = data_cfg(source="cifar10", root=str(tmp_path))
    train, test = build_dataset(cfg, "pretrain"), build_dataset(cfg, "eval_test")
    assert train.num_images == 20 and test.num_images == 4
    images, labels = rows(test)
    np.testing.assert_array_equal(images, sorted_images(expected["test_batch"][0]))
    train_images, _ = rows(train)
    all_train = np.concatenate([expected[f"data_batch_{j}"][0] for j in range(1, 6)])
    np.testing.assert_array_equal(train_images, sorted_images(all_train))
    one = read_cifar_file((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes(), label_key=b"labels",
                          where="data_batch_1")
    assert one["label"].tolist() == expected["data_batch_1"][1]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = rng_images(3, 32)
    for name in ("train", "test"):
        entry = {b"data": imgs.transpose(0, 3, 1, 2).reshape(3, -1), b"fine_labels": [5, 77, 99], b"coarse_labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(entry))
    _, labels = rows(build_dataset(data_cfg(source="cifar100", root=str(tmp_path)), "eval_train"))
    assert sorted(labels.tolist()) == [5, 77, 99]


def test_cifar_missing_and_truncated_files_are_named(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    content = batch.read_bytes()
    with pytest.raises(CorruptDataError, match="data_batch_3 is truncated"):
        read_cifar_file(content[: len(content) // 2], label_key=b"labels", where=str(batch))
    batch.unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3.*data.download=true"):
        build_dataset(data_cfg(source="cifar10", root=str(tmp_path)), "pretrain")


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
    cfg = data_cfg(source="stl10", root=str(tmp_path))
    images, labels = rows(build_dataset(cfg, "eval_train"))
    np.testing.assert_array_equal(images, sorted_images(train))
    by_content = {img.tobytes(): int(y) for img, y in zip(images, labels)}
    assert [by_content[img.tobytes()] for img in train] == [0, 9, 3]  # 1-10 on disk
    pretrain = build_dataset(cfg, "pretrain")
    _, pretrain_labels = rows(pretrain)
    assert pretrain.num_images == 8 and (pretrain_labels == -1).sum() == 5
    assert sorted(rows(build_dataset(cfg, "eval_test"))[1].tolist()) == [1, 2]


def test_stl10_truncated_binary_is_named_before_reading(tmp_path):
    write_stl(tmp_path, "train", rng_images(2, 96), [1, 2])
    x = tmp_path / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    cfg = data_cfg(source="stl10", root=str(tmp_path))
    with pytest.raises(CorruptDataError, match="train_X.bin is truncated"):
        build_dataset(cfg, "eval_train")
    with pytest.raises(FileNotFoundError, match="test_X.bin"):
        build_dataset(cfg, "eval_test")


# ---------------------------------------------------------------- image folders


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, per_class=3, side=40, classes=("cat", "dog")):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(rng_images(per_class, side, seed=c)):
            (root / name / f"{i}.png").write_bytes(png_bytes(img))


def test_imagefolder_labels_from_directories_resizes_and_skips_hidden_files(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "dog" / "._0.png").write_bytes(b"AppleDouble metadata, not an image")
    (tmp_path / "loose.png").write_bytes(png_bytes(rng_images(1, 40, seed=9)[0]))  # no class: pretraining only
    cfg = data_cfg(source="imagefolder", root=str(tmp_path), test_fraction=0.5)
    pretrain = build_dataset(cfg, "pretrain")
    images, labels = rows(pretrain)
    assert pretrain.num_images == 7 and images.shape == (7, 32, 32, 3)
    assert sorted(labels.tolist()) == [-1, 0, 0, 0, 1, 1, 1]
    (_, train_y), (_, test_y) = rows(build_dataset(cfg, "eval_train")), rows(build_dataset(cfg, "eval_test"))
    assert len(train_y) + len(test_y) == 6 and -1 not in train_y.tolist() + test_y.tolist()


def test_held_out_split_is_disjoint_deterministic_and_needs_no_listing_order(tmp_path):
    write_folder(tmp_path, per_class=30, side=8, classes=("a", "b", "c"))
    cfg = data_cfg(source="imagefolder", root=str(tmp_path), test_fraction=0.25, image_size=8)
    test_a = {img.tobytes() for img in rows(build_dataset(cfg, "eval_test"))[0]}
    test_b = {img.tobytes() for img in rows(build_dataset(cfg, "eval_test"))[0]}
    train = {img.tobytes() for img in rows(build_dataset(cfg, "eval_train"))[0]}
    assert test_a == test_b and not (test_a & train) and len(test_a) + len(train) == 90
    assert 10 <= len(test_a) <= 35  # about a quarter of 90


def test_knn_max_images_is_an_exact_stable_subset_and_eval_root_is_the_test_set(tmp_path):
    write_folder(tmp_path / "train", per_class=20, side=8)
    write_folder(tmp_path / "val", per_class=2, side=8, classes=("cat", "dog"))
    cfg = data_cfg(source="imagefolder", root=str(tmp_path / "train"), eval_root=str(tmp_path / "val"), image_size=8)
    bank = build_dataset(cfg, "eval_train", max_images=15)
    first, second = rows(bank)[0], rows(build_dataset(cfg, "eval_train", max_images=15))[0]
    assert bank.num_images == 15 and len(first) == 15 and np.array_equal(first, second)
    assert len(rows(build_dataset(cfg, "eval_train"))[1]) == 40  # with eval_root, the whole train tree
    _, test_labels = rows(build_dataset(cfg, "eval_test"))
    assert sorted(test_labels.tolist()) == [0, 0, 1, 1]


def test_pretrain_file_order_changes_each_epoch_and_repeats_after_a_restart(tmp_path, monkeypatch):
    import ray.data

    # The files' order is the seed's; rows come as tasks finish unless the order is preserved (a loaded
    # machine finishes them in another order).
    monkeypatch.setattr(ray.data.DataContext.get_current().execution_options, "preserve_order", True)
    write_folder(tmp_path, per_class=40, side=8)
    cfg = data_cfg(source="imagefolder", root=str(tmp_path), image_size=8)

    def epoch_orders(seed):
        ds = build_dataset(cfg, "pretrain", seed=seed).dataset
        return [[bytes(r["image"].tobytes()) for r in ds.iter_rows()] for _ in range(2)]

    first, again = epoch_orders(3), epoch_orders(3)
    assert first[0] != first[1]  # a new order per epoch
    assert sorted(first[0]) == sorted(first[1])  # of the same images
    assert first == again  # the same sequence of orders after a restart


def test_imagefolder_corrupt_image_fails_naming_it_or_is_skipped_and_counted(tmp_path):
    import ray

    write_folder(tmp_path)
    (tmp_path / "dog" / "broken.png").write_bytes(b"not an image at all")
    good = png_bytes(rng_images(1, 40, seed=5)[0])
    (tmp_path / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    cfg = data_cfg(source="imagefolder", root=str(tmp_path))
    failures = ray.remote(BadImages).remote()
    with pytest.raises(Exception, match=r"broken.png|truncated.png"):
        rows(build_dataset(cfg, "pretrain", bad_images=failures))
    first_error = ray.get(failures.first_error.remote())  # what the driver reports when Ray truncates the traceback
    assert re.search(r"cannot decode image .*(broken|truncated)\.png.*data\.skip_corrupt=true", first_error)
    counter = ray.remote(BadImages).remote()
    skipping = data_cfg(source="imagefolder", root=str(tmp_path), skip_corrupt=True)
    split = build_dataset(skipping, "pretrain", bad_images=counter)
    assert split.num_images == 8 and len(rows(split)[0]) == 6
    assert len(rows(split)[0]) == 6  # a second epoch skips the same two files, counted once
    assert ray.get(counter.count.remote()) == 2
    assert [Path(p).name for p in ray.get(counter.examples.remote())] == ["broken.png", "truncated.png"]


def test_imagefolder_bad_roots_are_named_before_anything_is_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(data_cfg(source="imagefolder", root=str(tmp_path / "nowhere")), "pretrain")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images .* under .*empty"):
        build_dataset(data_cfg(source="imagefolder", root=str(tmp_path / "empty")), "pretrain")
    for i, img in enumerate(rng_images(2, 16)):
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{i}.jpg").write_bytes(png_bytes(img))
    with pytest.raises(DataError, match="0 class folder.s. holding images .none.: evaluation needs labelled images of "
                                         "at least two classes"):
        build_dataset(data_cfg(source="imagefolder", root=str(tmp_path / "flat")), "eval_test")


def test_unreachable_bucket_is_named(monkeypatch):
    from conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    root = f"s3://no-such-bucket/images?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    for source in ("imagefolder", "parquet"):
        with pytest.raises(ConnectionError, match="cannot reach s3://no-such-bucket/images"):
            build_dataset(data_cfg(source=source, root=root), "pretrain")


# ---------------------------------------------------------------- Parquet


def test_parquet_with_encoded_bytes_and_labels(tmp_path):
    imgs = rng_images(40, 32)
    pq.write_table(pa.table({"img": [png_bytes(i) for i in imgs], "y": list(range(40))}), tmp_path / "part-0.parquet")
    cfg = data_cfg(source="parquet", root=str(tmp_path), image_column="img", label_column="y", test_fraction=0.25)
    pretrain = build_dataset(cfg, "pretrain")
    images, labels = rows(pretrain)
    np.testing.assert_array_equal(images, sorted_images(imgs))  # PNG is lossless
    assert pretrain.num_images == 40 and sorted(labels.tolist()) == list(range(40))
    test_y, train_y = rows(build_dataset(cfg, "eval_test"))[1], rows(build_dataset(cfg, "eval_train"))[1]
    assert sorted(test_y.tolist() + train_y.tolist()) == list(range(40)) and 3 <= len(test_y) <= 17
    with pytest.raises(ValueError, match="data.image_column='image'.*columns: img, y"):
        build_dataset(data_cfg(source="parquet", root=str(tmp_path)), "pretrain")


def test_parquet_corrupt_row_is_named(tmp_path):
    pq.write_table(pa.table({"image": [png_bytes(rng_images(1, 8)[0]), b"garbage"], "label": [0, 1]}),
                   tmp_path / "bad.parquet")
    with pytest.raises(Exception, match=r"cannot decode image image value with digest [0-9a-f]+"):
        rows(build_dataset(data_cfg(source="parquet", root=str(tmp_path)), "pretrain"))


# ---------------------------------------------------------------- digits


def test_digits_offline_split():
    cfg = data_cfg(source="digits")
    train, test = build_dataset(cfg, "eval_train"), build_dataset(cfg, "eval_test")
    assert train.num_images + test.num_images == 1797
    images, labels = rows(test)
    assert images.shape[1:] == (32, 32, 3) and set(labels.tolist()) == set(range(10))
    assert build_dataset(cfg, "eval_train", max_images=300).num_images == 300


# ---------------------------------------------------------------- without Ray


def local_rows(cfg, split, *, max_images=0, seed=None):
    from sscl.data.local import local_split

    local = local_split(cfg, split, max_images=max_images)
    assert local.num_images == build_dataset(cfg, split, max_images=max_images).num_images
    batches = list(local.batches(3, seed=seed))
    assert all(len(b["label"]) == 3 for b in batches[:-1])
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    order = sorted(range(len(labels)), key=lambda i: images[i].tobytes())
    return images[order], labels[order]


def every_source(root: Path) -> dict[str, object]:
    write_cifar10(root / "cifar")
    (root / "stl").mkdir()
    write_stl(root / "stl", "train", rng_images(3, 96, 1), [1, 10, 4])
    write_stl(root / "stl", "unlabeled", rng_images(5, 96, 2), None)
    write_stl(root / "stl", "test", rng_images(2, 96, 3), [2, 3])
    write_folder(root / "folder", per_class=6)
    (root / "folder" / "loose.png").write_bytes(png_bytes(rng_images(1, 40, seed=9)[0]))
    (root / "parquet").mkdir()
    imgs = rng_images(40, 32)
    pq.write_table(pa.table({"image": [png_bytes(i) for i in imgs], "label": list(range(40))}),
                   root / "parquet" / "part-0.parquet", row_group_size=16)
    return {"cifar10": data_cfg(source="cifar10", root=str(root / "cifar")),
            "stl10": data_cfg(source="stl10", root=str(root / "stl")),
            "imagefolder": data_cfg(source="imagefolder", root=str(root / "folder"), test_fraction=0.5),
            "parquet": data_cfg(source="parquet", root=str(root / "parquet"), test_fraction=0.25),
            "digits": data_cfg(source="digits")}


@pytest.mark.parametrize("split", ["pretrain", "eval_train", "eval_test"])
def test_local_split_reads_exactly_what_the_ray_dataset_streams(tmp_path, split):
    for name, cfg in every_source(tmp_path).items():
        for bound in (0, 8):
            ray_images, ray_labels = rows(build_dataset(cfg, split, max_images=bound))
            images, labels = local_rows(cfg, split, max_images=bound, seed=3 if split == "pretrain" else None)
            assert len(labels) == len(ray_labels) > 0, (name, bound)
            np.testing.assert_array_equal(images, ray_images, err_msg=f"{name} {split} bound {bound}")
            np.testing.assert_array_equal(labels, ray_labels)


def test_local_split_shuffles_by_seed_in_worker_processes_and_name_bad_files(tmp_path):
    from sscl.data.local import local_split

    cfg = every_source(tmp_path)["imagefolder"]

    def order(seed, workers=0):
        return [b["image"].tobytes() for b in local_split(cfg, "pretrain").batches(4, seed=seed, workers=workers)]

    assert order(1) == order(1, workers=2) and order(1) != order(2)
    (tmp_path / "folder" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CorruptDataError, match=r"broken.png.*data.skip_corrupt"):
        list(local_split(cfg, "pretrain").batches(4))
    skipping = data_cfg(source="imagefolder", root=str(tmp_path / "folder"), skip_corrupt="true")
    assert sum(len(b["label"]) for b in local_split(skipping, "pretrain").batches(4)) == 13
    assert [len(b["label"]) for b in local_split(skipping, "pretrain").batches(4, drop_last=True)] == [4, 4, 4]


# ---------------------------------------------------------------- one listing, one set of rules


def test_one_listing_rules_underscores_in_hidden_out_links_inside_only(tmp_path):
    import os

    write_folder(tmp_path / "root", per_class=3, side=8, classes=("_private", "cat"))
    (tmp_path / "root" / "cat" / ".hidden.png").write_bytes(b"not read")
    (tmp_path / "root" / ".cache").mkdir()
    (tmp_path / "root" / ".cache" / "x.png").write_bytes(b"not read")
    (tmp_path / "root" / "cat" / "_3.PNG").write_bytes(png_bytes(rng_images(1, 8, seed=5)[0]))  # any case
    (tmp_path / "root" / "cat" / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "root", tmp_path / "root" / "cat" / "loop")  # a link back to the root
    write_folder(tmp_path / "elsewhere", per_class=2, side=8, classes=("more",))
    os.symlink(tmp_path / "elsewhere" / "more", tmp_path / "root" / "linked")  # outside the root: left out
    os.symlink(tmp_path / "root" / "cat", tmp_path / "root" / "alias")  # a second way into a listed folder
    listing = list_folder(str(tmp_path / "root"))
    names = [p[len(listing.base) + 1:] for p in listing.paths]
    assert names == ["_private/0.png", "_private/1.png", "_private/2.png", "cat/0.png", "cat/1.png", "cat/2.png",
                     "cat/_3.PNG"]
    assert listing.classes == ["_private", "cat"] and listing.links_left_out == 1
    cfg = data_cfg(source="imagefolder", root=str(tmp_path / "root"), image_size=8)
    from sscl.data.local import local_split

    for split in ("pretrain", "eval_train"):  # both back-ends read the same images and say the same
        ray_split, local = build_dataset(cfg, split), local_split(cfg, split)
        assert ray_split.num_images == local.num_images and ray_split.notes == local.notes
        (note,) = local.notes
        assert "left out 1 folder link(s) leading outside the root (linked -> " in note
    assert build_dataset(cfg, "pretrain").num_images == 7
    assert sorted(rows(build_dataset(cfg, "pretrain"))[1].tolist()) == [0] * 3 + [1] * 4


def test_eval_root_classes_are_matched_by_name_and_unknown_ones_named(tmp_path):
    write_folder(tmp_path / "train", per_class=4, side=8, classes=("ant", "bee", "cat"))
    write_folder(tmp_path / "val", per_class=2, side=8, classes=("bee", "cat"))  # index 0 here is bee
    cfg = data_cfg(source="imagefolder", root=str(tmp_path / "train"), eval_root=str(tmp_path / "val"), image_size=8)
    assert sorted(rows(build_dataset(cfg, "eval_test"))[1].tolist()) == [1, 1, 2, 2]  # train's indices
    write_folder(tmp_path / "val", per_class=1, side=8, classes=("dog", "eel"))
    with pytest.raises(DataError, match="has class folder.s. that data.root=.* lacks: dog, eel"):
        build_dataset(cfg, "eval_test")


def test_one_class_and_an_empty_held_out_side_are_errors_with_counts(tmp_path):
    write_folder(tmp_path / "one", per_class=5, side=8, classes=("cat",))
    cfg = data_cfg(source="imagefolder", root=str(tmp_path / "one"), image_size=8)
    assert build_dataset(cfg, "pretrain").num_images == 5  # pretraining needs no labels
    with pytest.raises(DataError, match=r"1 class folder.s. holding images \(cat: 5\)"):
        build_dataset(cfg, "eval_train")
    write_folder(tmp_path / "two", per_class=1, side=8, classes=("cat", "dog"))
    cfg = data_cfg(source="imagefolder", root=str(tmp_path / "two"), image_size=8, test_fraction=0.01)
    with pytest.raises(DataError, match="held-out side of .* is empty: of its 2 images, 2 are labelled"):
        build_dataset(cfg, "eval_test")


# ---------------------------------------------------------------- keys (pipelines.embed)


def test_keyed_splits_name_every_image_once_and_change_nothing_else(tmp_path):
    forms = {"cifar10": r"(data_batch_[1-5]|test_batch):\d+", "stl10": r"(unlabeled|train|test)_X\.bin:\d+",
             "imagefolder": r"(cat|dog)/\d\.png|loose\.png", "parquet": r"[0-9a-f]{16}", "digits": r"digits:\d+"}
    for name, cfg in every_source(tmp_path).items():
        for split in ("pretrain", "eval_test"):
            keyed = build_dataset(cfg, split, keyed=True)
            table = keyed.dataset.take_all()
            keys = [r["key"] for r in table]
            assert len(keys) == len(set(keys)) > 0, (name, split)
            assert len(keys) == keyed.num_images or name == "parquet"  # Parquet counts rows before the held-out hash
            assert all(re.fullmatch(forms[name], k) for k in keys), (name, keys[:3])
            images, labels = rows(build_dataset(cfg, split))
            order = sorted(range(len(table)), key=lambda i: table[i]["image"].tobytes())
            np.testing.assert_array_equal(np.stack([table[i]["image"] for i in order]), images)
            np.testing.assert_array_equal([table[i]["label"] for i in order], labels)
    expected = write_cifar10(tmp_path / "named")  # a key names the image: file and index in it
    table = build_dataset(data_cfg(source="cifar10", root=str(tmp_path / "named")), "pretrain", keyed=True)
    by_key = {r["key"]: r["image"] for r in table.dataset.take_all()}
    np.testing.assert_array_equal(by_key["data_batch_3:2"], expected["data_batch_3"][0][2])
