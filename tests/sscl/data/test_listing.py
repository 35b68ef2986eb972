"""One rule for links in an image folder's listing, shared by the Ray back-end's driver-side listing
(``folder_files``, as ``sscl.data.sources`` calls it) and the local one (``local_split``), on real
files and links in ``tmp_path``: no Ray is started."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import console
from sscl.config import load_config
from sscl.data.formats import Selection, folder_files, list_folder, listing_notes
from sscl.data.local import local_split


def write_images(folder: Path, n: int, fmt: str = "JPEG", seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(folder / f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)


def data_cfg(root: Path, **overrides: str):
    settings = {"source": "imagefolder", "root": str(root), "image_size": "8", **overrides}
    return load_config(None, [f"data.{k}={v}" for k, v in settings.items()] + ["augment.crop_size=8"]).data


def below(listing) -> list[str]:
    return [p[len(listing.base) + 1:] for p in listing.paths]


def reported_layout(tmp_path: Path) -> Path:
    """The report's layout: a parent holding the root and sibling datasets; ``root/b/upup -> ../..``."""
    parent = tmp_path / "datasets"
    write_images(parent / "root" / "a", 3)
    write_images(parent / "root" / "b", 2, seed=1)
    write_images(parent / "flowers" / "rose", 5, seed=2)
    write_images(parent / "flowers" / "tulip", 5, fmt="PNG", seed=3)
    write_images(parent / "cars", 4, fmt="PNG", seed=4)
    os.symlink("../..", parent / "root" / "b" / "upup")
    return parent / "root"


def line(key: str, root: Path, links: str) -> str:
    return (f"{key}={root}: left out 1 folder link(s) leading outside the root ({links}); to read those images, "
            "copy them into the root or link each file")


def test_a_link_to_an_ancestor_is_left_out_and_counted(tmp_path):
    root = reported_layout(tmp_path)
    listing = list_folder(str(root))
    assert below(listing) == ["a/0.jpg", "a/1.jpg", "a/2.jpg", "b/0.jpg", "b/1.jpg"]  # root's own images only
    assert listing.classes == ["a", "b"] and listing.class_counts() == {"a": 3, "b": 2}
    assert listing.links_left_out == 1
    assert listing.first_link_left_out == f"b/upup -> {os.path.realpath(tmp_path / 'datasets')}"


def test_links_inside_the_root_are_followed_once_and_to_the_root_itself_add_nothing(tmp_path):
    root = tmp_path / "root"
    write_images(root / "a", 2)
    write_images(root / "b", 2, seed=1)
    write_images(root / ".store" / "c", 2, fmt="PNG", seed=2)  # hidden: read only through the link below
    os.symlink("../a", root / "b" / "also_a")  # a sibling inside the root, listed already as a
    os.symlink(".store/c", root / "c")
    os.symlink("..", root / "a" / "back")  # the root itself: nothing to add, nothing left out
    listing = list_folder(str(root))
    assert below(listing) == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/1.jpg", "c/0.png", "c/1.png"]
    assert listing.classes == ["a", "b", "c"]
    assert listing.links_left_out == 0 and listing.first_link_left_out == ""
    assert listing_notes(listing, str(root), str(root)) == ()


def test_a_folder_link_outside_is_left_out_but_file_links_anywhere_are_read(tmp_path):
    root = tmp_path / "root"
    write_images(root / "a", 2)
    write_images(root / "b", 1, seed=1)
    write_images(tmp_path / "elsewhere" / "more", 2, seed=2)
    os.symlink(tmp_path / "elsewhere" / "more", root / "more")  # an unrelated folder outside
    os.symlink(tmp_path / "elsewhere" / "more" / "1.jpg", root / "b" / "far.jpg")  # a file outside: read
    os.symlink(tmp_path / "missing", root / "gone")  # broken links: skipped, not counted
    os.symlink(tmp_path / "missing.jpg", root / "a" / "gone.jpg")
    listing = list_folder(str(root))
    assert below(listing) == ["a/0.jpg", "a/1.jpg", "b/0.jpg", "b/far.jpg"]
    assert listing.classes == ["a", "b"] and listing.links_left_out == 1
    assert listing_notes(listing, str(root), str(root)) == (
        line("data.root", root, f"more -> {os.path.realpath(tmp_path / 'elsewhere' / 'more')}"),)


def test_both_back_ends_list_the_reported_layout_alike_and_carry_one_note(tmp_path):
    root = reported_layout(tmp_path)
    note = line("data.root", root, f"b/upup -> {os.path.realpath(tmp_path / 'datasets')}")
    # The Ray back-end's driver-side listing, as sscl.data.sources._image_folder calls it.
    for selection in (Selection(), Selection(labelled_only=True)):
        listing, files = folder_files(str(root), selection, str(root))
        assert len(files(listing.paths)) == 5 and listing_notes(listing, str(root), str(root)) == (note,)
    cfg = data_cfg(root)
    pretrain, bank = local_split(cfg, "pretrain"), local_split(cfg, "eval_train")
    assert pretrain.num_images == 5 and pretrain.notes == bank.notes == (note,)
    labels = np.concatenate([b["label"] for b in pretrain.batches(4)])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]  # classes a and b only


def test_the_user_sees_one_line_per_root_that_left_links_out(tmp_path, capsys):
    root = reported_layout(tmp_path)
    write_images(tmp_path / "val" / "a", 2, seed=5)
    write_images(tmp_path / "val" / "b", 2, seed=6)
    os.symlink(tmp_path / "datasets" / "flowers", tmp_path / "val" / "flowers")
    cfg = data_cfg(root, eval_root=str(tmp_path / "val"))
    splits = [local_split(cfg, split) for split in ("pretrain", "eval_train", "eval_test")]
    console.print_notes(*splits)
    flowers = f"flowers -> {os.path.realpath(tmp_path / 'datasets' / 'flowers')}"
    assert capsys.readouterr().out.splitlines() == [
        line("data.root", root, f"b/upup -> {os.path.realpath(tmp_path / 'datasets')}"),  # pretrain and bank: once
        line("data.eval_root", tmp_path / "val", flowers)]
    console.print_notes(local_split(data_cfg(tmp_path / "val"), "pretrain"))
    assert capsys.readouterr().out == line("data.root", tmp_path / "val", flowers) + "\n"
