"""Stored features: the layout, the folder's markers through a job's life (claimed, started,
finished, refused), and reading back only what a complete job wrote."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sscl.data.decode import DataError
from sscl.data.features import COMPLETE, STARTED, Output, feature_table, read_features

TOKEN = "0123456789ab"


def write_rows(folder, name, keys, labels, features):
    pq.write_table(feature_table(keys, labels, features), folder / name)


def finished_output(tmp_path, n=6, dim=4):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    keys = [f"k{i:02d}" for i in range(n)][::-1]
    labels = [i % 3 - 1 for i in range(n)]  # -1: none
    output = Output.at(str(tmp_path / "out"))
    output.start(TOKEN, run_id="run-1")
    write_rows(tmp_path / "out", f"{TOKEN}_a_000000-0.parquet", keys[:4], labels[:4], features[:4])
    write_rows(tmp_path / "out", f"{TOKEN}_a_000001-0.parquet", keys[4:], labels[4:], features[4:])
    return output, keys, labels, features


def test_the_layout_is_key_label_and_a_fixed_size_float32_list():
    table = feature_table(["a", "b"], [3, -1], np.ones((2, 5), dtype=np.float64))
    assert str(table.schema.field("features").type) == "fixed_size_list<item: float>[5]"
    assert table.column("label").to_pylist() == [3, None] and table.column("key").to_pylist() == ["a", "b"]


def test_a_finished_job_keeps_only_its_own_files_and_reads_back_in_key_order(tmp_path):
    output, keys, labels, features = finished_output(tmp_path)
    stray = tmp_path / "out" / "fedcba987654_x_000000-0.parquet"  # a killed job's late write
    write_rows(tmp_path / "out", stray.name, ["k99"], [0], features[:1])
    manifest = output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    assert manifest["rows"] == 6 and manifest["stray_files_removed"] == 1 and not stray.exists()
    assert not (tmp_path / "out" / STARTED).exists() and (tmp_path / "out" / COMPLETE).exists()
    stored = read_features(str(tmp_path / "out"))
    order = np.argsort(keys)
    assert list(stored.keys) == sorted(keys)
    np.testing.assert_array_equal(stored.labels, np.asarray(labels)[order])
    np.testing.assert_array_equal(stored.features, features[order])
    assert stored.manifest["model"] == "models:/m/1"


def test_a_complete_output_or_a_foreign_folder_is_replaced_only_with_overwrite(tmp_path):
    output, *_ = finished_output(tmp_path)
    output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    with pytest.raises(FileExistsError, match=r"already holds a complete embedding \(6 images of models:/m/1\); "
                                              r"pass --overwrite"):
        output.check_free(overwrite=False)
    assert output.check_free(overwrite=True) == ("a complete embedding (6 images of models:/m/1)", {})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's own file")
    with pytest.raises(FileExistsError, match=r"1 other file\(s\) or folder\(s\); pass --overwrite"):
        Output.at(str(tmp_path / "mine")).check_free(overwrite=False)
    assert (tmp_path / "mine" / "notes.txt").exists()  # checking changes nothing
    assert Output.at(str(tmp_path / "new")).check_free(overwrite=False) == ("", {})


def test_an_unfinished_jobs_output_is_refused_by_readers_and_cleared_by_the_next_job(tmp_path):
    output, *_ = finished_output(tmp_path)
    with pytest.raises(DataError, match="not a complete embedding .*did not finish"):
        read_features(str(tmp_path / "out"))
    held, unfinished = output.check_free(overwrite=False)
    assert held == "the partial output of an embedding job that did not finish"
    assert unfinished == {"token": TOKEN, "run_id": "run-1"}
    output.clear()
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_places_are_named(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*/a_file/out: .*a_file is a file, not a folder"):
        Output.at(str(tmp_path / "a_file" / "out"))
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        Output.at(str(tmp_path / "a_file")).check_free(overwrite=True)
    deep = Output.at(str(tmp_path / "new" / "folders" / "out"))  # created when the job starts
    assert deep.check_free(overwrite=False) == ("", {}) and not (tmp_path / "new").exists()
    deep.start(TOKEN)
    assert (tmp_path / "new" / "folders" / "out" / STARTED).is_file()
    with pytest.raises(FileNotFoundError, match="--test-features: .*missing: no such folder"):
        read_features(str(tmp_path / "missing"), "--test-features")
    (tmp_path / "plain").mkdir()
    pq.write_table(feature_table(["a"], [0], np.zeros((1, 2))), tmp_path / "plain" / "part.parquet")
    with pytest.raises(DataError, match="not the output of python -m pipelines.embed"):
        read_features(str(tmp_path / "plain"))


def test_a_folder_changed_after_the_job_is_refused(tmp_path):
    output, keys, labels, features = finished_output(tmp_path)
    manifest = output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    write_rows(tmp_path / "out", manifest["files"][0], keys[:1], labels[:1], features[:1])
    with pytest.raises(DataError, match="holds 3 rows but its manifest says 6"):
        read_features(str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / COMPLETE).read_text())["rows"] == 6


def test_rows_other_than_the_images_read_leave_the_output_incomplete(tmp_path):
    output, *_ = finished_output(tmp_path)
    with pytest.raises(RuntimeError, match="wrote 6 rows for 7 images"):
        output.finish(TOKEN, expected_rows=7, model="models:/m/1", model_version="1", run_id="run-1")
    assert not (tmp_path / "out" / COMPLETE).exists() and (tmp_path / "out" / STARTED).exists()
