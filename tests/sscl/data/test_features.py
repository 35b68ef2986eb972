"""Stored features: the layout, the folder's markers through a job's life (claimed, started,
finished, refused), and reading back only what a complete job wrote."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from sscl.data.decode import DataError
from sscl.data.features import COMPLETE, STARTED, Claim, Output, feature_table, read_features

TOKEN = "0123456789ab"
NOTHING = Claim("", {}, (), ())


def write_rows(folder, name, keys, labels, features):
    pq.write_table(feature_table(keys, labels, features), folder / name)


def finished_output(tmp_path, n=6, dim=4, claim=NOTHING, folder="out"):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    keys = [f"k{i:02d}" for i in range(n)][::-1]
    labels = [i % 3 - 1 for i in range(n)]  # -1: none
    output = Output.at(str(tmp_path / folder))
    output.start(TOKEN, claim, run_id="run-1")
    write_rows(tmp_path / folder, f"{TOKEN}_a_000000-0.parquet", keys[:4], labels[:4], features[:4])
    write_rows(tmp_path / folder, f"{TOKEN}_a_000001-0.parquet", keys[4:], labels[4:], features[4:])
    return output, keys, labels, features


def users_folder(folder):
    """A folder of a user's own files (what an output must never delete)."""
    (folder / "sub").mkdir(parents=True)
    for name in ("notes.txt", "photo.png", "sub/thesis.docx"):
        (folder / name).write_text(f"the user's {name}")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_the_layout_is_key_label_and_a_fixed_size_float32_list():
    table = feature_table(["a", "b"], [3, -1], np.ones((2, 5), dtype=np.float64))
    assert str(table.schema.field("features").type) == "fixed_size_list<item: float>[5]"
    assert table.column("label").to_pylist() == [3, None] and table.column("key").to_pylist() == ["a", "b"]


def test_a_finished_job_removes_the_replaced_jobs_late_writes_only_and_reads_back_in_key_order(tmp_path):
    replaced = "fedcba987654"
    output, keys, labels, features = finished_output(tmp_path, claim=Claim("x", {}, (), (replaced,)))
    late = tmp_path / "out" / f"{replaced}_x_000000-0.parquet"  # the killed job's write, landed late
    write_rows(tmp_path / "out", late.name, ["k99"], [0], features[:1])
    manifest = output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    assert manifest["rows"] == 6 and manifest["stray_files_removed"] == 1 and not late.exists()
    assert manifest["token"] == TOKEN
    assert not (tmp_path / "out" / STARTED).exists() and (tmp_path / "out" / COMPLETE).exists()
    stored = read_features(str(tmp_path / "out"))
    order = np.argsort(keys)
    assert list(stored.keys) == sorted(keys)
    np.testing.assert_array_equal(stored.labels, np.asarray(labels)[order])
    np.testing.assert_array_equal(stored.features, features[order])
    assert stored.manifest["model"] == "models:/m/1"


def test_a_parquet_file_no_job_of_ours_wrote_is_neither_removed_nor_read(tmp_path):
    output, keys, labels, features = finished_output(tmp_path)
    other = tmp_path / "out" / "theirs.parquet"
    write_rows(tmp_path / "out", other.name, ["k99"], [0], features[:1])
    manifest = output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    assert other.exists() and manifest["stray_files_removed"] == 0
    assert "k99" not in read_features(str(tmp_path / "out")).keys


def test_a_complete_output_is_replaced_only_with_overwrite_and_only_its_own_files(tmp_path):
    output, *_ = finished_output(tmp_path)
    manifest = output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    with pytest.raises(FileExistsError, match=r"already holds a complete embedding \(6 images of models:/m/1\); "
                                              r"pass --overwrite"):
        output.check_free(overwrite=False)
    claim = output.check_free(overwrite=True)
    assert claim.what == "a complete embedding (6 images of models:/m/1)" and claim.unfinished == {}
    assert set(claim.files) == {COMPLETE, *manifest["files"]} and claim.tokens == (TOKEN,)
    output.start("aaaaaaaaaaaa", claim, run_id="run-2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [STARTED]
    assert Output.at(str(tmp_path / "new")).check_free(overwrite=False) == NOTHING


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_a_folder_of_a_users_files_is_refused_naming_them_and_left_as_it_was(tmp_path, overwrite, as_uri):
    before = users_folder(tmp_path / "mine")
    where = (tmp_path / "mine").as_uri() if as_uri else str(tmp_path / "mine")  # pyarrow's filesystem layer
    with pytest.raises(FileExistsError, match=r"holds files python -m pipelines.embed did not write \(notes.txt, "
                                              r"photo.png, sub\); nothing was changed"):
        Output.at(where).check_free(overwrite=overwrite)
    assert sorted(p.relative_to(tmp_path / "mine").as_posix() for p in (tmp_path / "mine").rglob("*")) == before


def test_a_finished_output_with_a_users_file_beside_it_is_refused_even_with_overwrite(tmp_path):
    output, *_ = finished_output(tmp_path)
    output.finish(TOKEN, model="models:/m/1", model_version="1", run_id="run-1")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        output.check_free(overwrite=True)


@pytest.mark.parametrize("marker, content, problem", [
    (STARTED, "", r"_STARTED cannot be read as JSON \(it is empty\)"),
    (STARTED, '{"note": "mine"}', r"_STARTED holds no 'token'"),
    (COMPLETE, "done", r"_SUCCESS cannot be read as JSON \(Expecting value"),
    (COMPLETE, "[1, 2]", r"_SUCCESS holds no 'files'"),
])
def test_a_marker_we_cannot_read_is_named_and_nothing_is_touched(tmp_path, marker, content, problem):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / marker).write_text(content)
    with pytest.raises(FileExistsError, match=problem + ".*, so it is not a marker written by python -m pipelines.embed"):
        Output.at(str(tmp_path / "out")).check_free(overwrite=True)
    assert (tmp_path / "out" / marker).read_text() == content


def test_a_stray_started_marker_beside_a_users_files_does_not_make_them_ours(tmp_path):
    users_folder(tmp_path / "mine")
    (tmp_path / "mine" / STARTED).write_text(json.dumps({"token": TOKEN}))
    with pytest.raises(FileExistsError, match="did not write"):
        Output.at(str(tmp_path / "mine")).check_free(overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").exists()


def test_an_unfinished_jobs_output_is_refused_by_readers_and_cleared_by_the_next_job(tmp_path):
    output, *_ = finished_output(tmp_path)
    with pytest.raises(DataError, match="not a complete embedding .*did not finish"):
        read_features(str(tmp_path / "out"))
    claim = output.check_free(overwrite=False)
    assert claim.what == "the partial output of an embedding job that did not finish"
    assert claim.unfinished["token"] == TOKEN and claim.unfinished["run_id"] == "run-1"
    output.start("bbbbbbbbbbbb", claim, run_id="run-2")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [STARTED]


def test_a_job_killed_while_clearing_leaves_a_folder_the_next_job_still_knows_as_ours(tmp_path):
    output, *_ = finished_output(tmp_path)
    claim = output.check_free(overwrite=False)
    # the next job wrote its _STARTED and was killed before deleting the earlier files
    output._write(STARTED, {"token": "cccccccccccc", "replaces": list(claim.tokens),
                            "replaces_files": [n for n in claim.files if n != STARTED]})
    again = output.check_free(overwrite=False)
    assert set(again.files) == set(claim.files) and set(again.tokens) == {TOKEN, "cccccccccccc"}


def test_bad_places_are_named(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError, match="--out .*/a_file/out: .*a_file is a file, not a folder"):
        Output.at(str(tmp_path / "a_file" / "out"))
    with pytest.raises(FileExistsError, match="a file, not a folder"):
        Output.at(str(tmp_path / "a_file")).check_free(overwrite=True)
    deep = Output.at(str(tmp_path / "new" / "folders" / "out"))  # created when the job starts
    assert deep.check_free(overwrite=False) == NOTHING and not (tmp_path / "new").exists()
    deep.start(TOKEN, NOTHING)
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
