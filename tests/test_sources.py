"""Listing a dataset's source into entries (stages/ingest/sources.py).

Only names matter for listing, so the "videos" here are small placeholder files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.config import ConfigError, DatasetConfig, IngestConfig
from stages.ingest.sources import default_video_id, list_source

INGEST = IngestConfig()


def touch(path: Path, content: bytes = b"not really a video") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def listing(source, ingest: IngestConfig = INGEST, **kw):
    return list_source(DatasetConfig(name="ds", source=str(source), **kw), ingest)


def rows(lst):
    return [(e.video_id, e.label, e.split) for e in lst.entries]


@pytest.fixture(autouse=True)
def _cwd_elsewhere(tmp_path, monkeypatch):
    """Relative paths must be resolved against the source, never the working directory."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)


# ---------------------------------------------------------------- directories


def test_flat_directory(tmp_path):
    root = tmp_path / "flat"
    for name in ["b.mp4", "a.AVI", "c.webm", "notes.txt", "thumb.jpg", ".hidden.mp4"]:
        touch(root / name)
    lst = listing(root)
    assert lst.layout == "directory"
    assert [e.video_id for e in lst.entries] == ["a", "b", "c"]
    assert [e.source for e in lst.entries] == [str(root / n) for n in ["a.AVI", "b.mp4", "c.webm"]]
    assert all(e.label is None and e.split is None and e.error is None for e in lst.entries)
    assert not lst.labeled and lst.classes == [] and lst.duplicates == []


def test_directory_respects_configured_extensions(tmp_path):
    root = tmp_path / "flat"
    for name in ["a.mp4", "b.webm", "c.WEBM"]:
        touch(root / name)
    lst = listing(root, IngestConfig(extensions=["webm"]))
    assert [e.video_id for e in lst.entries] == ["b", "c"]


def test_folder_per_class(tmp_path):
    root = tmp_path / "fpc"
    for rel in ["dog/1.mp4", "cat/2.mp4", "cat/1.mp4", "cat/readme.md"]:
        touch(root / rel)
    lst = listing(root)
    assert lst.layout == "folder_per_class"
    # Same file name in two classes: two videos, two ids.
    assert rows(lst) == [("cat/1", "cat", None), ("cat/2", "cat", None), ("dog/1", "dog", None)]
    assert lst.classes == ["cat", "dog"] and lst.labeled


def test_folder_per_class_with_split_folders(tmp_path):
    root = tmp_path / "splitted"
    for rel in ["train/cat/a.mp4", "train/dog/b.mp4", "Validation/dog/c.mp4", "test/cat/d.mp4"]:
        touch(root / rel)
    lst = listing(root)
    assert lst.layout == "folder_per_class"
    assert sorted((e.label, e.split) for e in lst.entries) == [("cat", "test"), ("cat", "train"), ("dog", "train"), ("dog", "val")]
    assert lst.classes == ["cat", "dog"]
    # Ids keep the split folder, so the same clip name in train and test cannot collide.
    assert {e.video_id for e in lst.entries} == {"train/cat/a", "train/dog/b", "Validation/dog/c", "test/cat/d"}


def test_top_level_videos_mean_flat_layout(tmp_path):
    root = tmp_path / "mixed"
    touch(root / "top.mp4")
    touch(root / "sub" / "deep.mp4")
    lst = listing(root)
    assert lst.layout == "directory"
    assert [e.video_id for e in lst.entries] == ["sub/deep", "top"]
    assert not lst.labeled


# ---------------------------------------------------------------- UCF101

UCF_VIDEOS = [
    "ApplyLipstick/v_ApplyLipstick_g01_c01.avi",
    "ApplyLipstick/v_ApplyLipstick_g02_c01.avi",
    "Basketball/v_Basketball_g01_c01.avi",
    "Basketball/v_Basketball_g02_c01.avi",
    "Basketball/v_Basketball_g03_c01.avi",  # in no split file: unused everywhere
]
UCF_SPLIT_FILES = {
    "classInd.txt": "1 ApplyLipstick\n2 Basketball\n3 YoYo\n",
    "trainlist01.txt": "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 1\r\nBasketball/v_Basketball_g01_c01.avi 2\r\n\r\n",
    "testlist01.txt": "ApplyLipstick/v_ApplyLipstick_g02_c01.avi\nBasketball/v_Basketball_g02_c01.avi\n",
    "trainlist02.txt": "ApplyLipstick/v_ApplyLipstick_g02_c01.avi 1\nBasketball/v_Basketball_g02_c01.avi 2\n",
    "testlist02.txt": "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\nBasketball/v_Basketball_g01_c01.avi\n",
    "trainlist03.txt": "ApplyLipstick/v_ApplyLipstick_g01_c01.avi 1\nBasketball/v_Basketball_g02_c01.avi 2\n",
    # Names a video that is not on disk: a warning, not a failure.
    "testlist03.txt": "ApplyLipstick/v_ApplyLipstick_g02_c01.avi\nYoYo/v_YoYo_g01_c01.avi\n",
}
UCF_EXPECTED = {
    "ApplyLipstick/v_ApplyLipstick_g01_c01": ["train", "test", "train"],
    "ApplyLipstick/v_ApplyLipstick_g02_c01": ["test", "train", "test"],
    "Basketball/v_Basketball_g01_c01": ["train", "test", "unused"],
    "Basketball/v_Basketball_g02_c01": ["test", "train", "train"],
    "Basketball/v_Basketball_g03_c01": ["unused", "unused", "unused"],
}


def make_ucf(videos_root: Path, split_dir: Path, split_files=UCF_SPLIT_FILES) -> None:
    for rel in UCF_VIDEOS:
        touch(videos_root / rel)
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, text in split_files.items():
        (split_dir / name).write_text(text)


@pytest.mark.parametrize("where", ["subfolder", "root", "splits_dir"])
def test_ucf101(tmp_path, where):
    root = tmp_path / "UCF-101"
    split_dir = {"subfolder": root / "ucfTrainTestlist", "root": root, "splits_dir": tmp_path / "elsewhere"}[where]
    make_ucf(root, split_dir)
    kw = {"splits_dir": str(split_dir)} if where == "splits_dir" else {}
    lst = listing(root, **kw)
    assert lst.layout == "ucf101"
    assert {e.video_id: e.splits for e in lst.entries} == UCF_EXPECTED
    assert all(e.split == e.splits[0] for e in lst.entries)  # `split` is split set 1
    assert [e.video_id for e in lst.entries] == sorted(UCF_EXPECTED)
    assert {e.video_id: e.label for e in lst.entries} == {k: k.split("/")[0] for k in UCF_EXPECTED}
    assert lst.classes == ["ApplyLipstick", "Basketball", "YoYo"]  # from classInd.txt, in its order
    assert len(lst.warnings) == 1 and "testlist03.txt" in lst.warnings[0] and "1 listed" in lst.warnings[0]


def test_ucf101_without_class_index_uses_folder_names(tmp_path):
    root = tmp_path / "ucf"
    files = {k: v for k, v in UCF_SPLIT_FILES.items() if k != "classInd.txt"}
    make_ucf(root, root / "lists", files)
    lst = listing(root)
    assert lst.classes == ["ApplyLipstick", "Basketball"]


def test_ucf101_missing_split_set_keeps_positions(tmp_path):
    root = tmp_path / "ucf"
    files = {k: v for k, v in UCF_SPLIT_FILES.items() if not k.endswith("02.txt")}
    make_ucf(root, root / "lists", files)
    splits = {e.video_id: e.splits for e in listing(root).entries}
    assert splits["ApplyLipstick/v_ApplyLipstick_g01_c01"] == ["train", "unused", "train"]
    assert splits["Basketball/v_Basketball_g02_c01"] == ["test", "unused", "train"]


def test_explicit_ucf101_layout_without_split_files_is_an_error(tmp_path):
    root = tmp_path / "ucf"
    touch(root / "A" / "v_A_g01_c01.avi")
    with pytest.raises(ConfigError, match="trainlist"):
        listing(root, layout="ucf101")


# ---------------------------------------------------------------- HMDB51

HMDB_SPLITS = {
    "brush_hair_test_split1.txt": "a.avi 1\nb.avi 2 \nc.avi 0\n",
    "brush_hair_test_split2.txt": "a.avi 2\nb.avi 1\nc.avi 1\n",
    "cartwheel_test_split1.txt": "d.avi 1\nghost.avi 2\n\n",
}
HMDB_EXPECTED = {
    "brush_hair/a": ("brush_hair", ["train", "test"]),
    "brush_hair/b": ("brush_hair", ["test", "train"]),
    "brush_hair/c": ("brush_hair", ["unused", "train"]),
    "cartwheel/d": ("cartwheel", ["train", "unused"]),  # no cartwheel split-2 file
}


def make_hmdb(root: Path, split_dir: Path) -> None:
    for vid in HMDB_EXPECTED:
        touch(root / f"{vid}.avi")
    split_dir.mkdir(parents=True, exist_ok=True)
    for name, text in HMDB_SPLITS.items():
        (split_dir / name).write_text(text)


@pytest.mark.parametrize("where", ["subfolder", "splits_dir"])
def test_hmdb51(tmp_path, where):
    root = tmp_path / "hmdb51"
    split_dir = root / "testTrainMulti_7030_splits" if where == "subfolder" else tmp_path / "hmdb_splits"
    make_hmdb(root, split_dir)
    kw = {"splits_dir": str(split_dir)} if where == "splits_dir" else {}
    lst = listing(root, **kw)
    assert lst.layout == "hmdb51"
    assert {e.video_id: (e.label, e.splits) for e in lst.entries} == HMDB_EXPECTED
    assert all(e.split == e.splits[0] for e in lst.entries)
    assert lst.classes == ["brush_hair", "cartwheel"]
    assert len(lst.warnings) == 1 and "cartwheel_test_split1.txt" in lst.warnings[0]


def test_splits_dir_without_split_files_is_an_error(tmp_path):
    root = tmp_path / "fpc"
    touch(root / "cat" / "a.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no UCF101 .* or HMDB51"):
        listing(root, splits_dir=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="not a directory"):
        listing(root, splits_dir=str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="HMDB51 layout needs"):
        listing(root, layout="hmdb51", splits_dir=str(tmp_path / "empty"))


# ---------------------------------------------------------------- manifests

MANIFEST_ROWS = [
    {"source": "clips/b.mp4", "label": "dog", "split": "Training"},
    {"source": "clips/a.mp4", "label": "cat", "split": "test"},
    {"source": "https://example.com/v/c.mp4", "label": "cat", "split": "validation"},
    {"source": "clips/d.mp4", "label": "", "split": "holdout", "video_id": "named"},
]


def write_manifest(path: Path, rows_: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["source", "label", "split", "video_id"]
    if path.suffix == ".csv":
        lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in rows_]
        path.write_text("\n".join(lines) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    else:
        pq.write_table(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in rows_]), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_manifest_formats(tmp_path, suffix):
    folder = tmp_path / "data"
    manifest = write_manifest(folder / f"m{suffix}", MANIFEST_ROWS)
    lst = listing(manifest)
    assert lst.layout == "manifest"
    by_source = {e.source: e for e in lst.entries}
    b, a, d = (str((folder / "clips" / n).resolve()) for n in ["b.mp4", "a.mp4", "d.mp4"])
    assert set(by_source) == {a, b, d, "https://example.com/v/c.mp4"}
    assert (by_source[b].label, by_source[b].split) == ("dog", "train")
    assert (by_source[a].label, by_source[a].split) == ("cat", "test")
    assert by_source["https://example.com/v/c.mp4"].split == "val"
    assert (by_source[d].video_id, by_source[d].label, by_source[d].split) == ("named", None, "holdout")
    assert by_source[a].video_id == default_video_id(a)
    assert [e.video_id for e in lst.entries] == sorted(e.video_id for e in lst.entries)
    assert lst.classes == ["cat", "dog"]
    assert all(e.error is None for e in lst.entries)


def test_manifest_formats_agree(tmp_path):
    listed = [rows(listing(write_manifest(tmp_path / f"m{s}", MANIFEST_ROWS))) for s in (".csv", ".jsonl", ".parquet")]
    assert listed[0] == listed[1] == listed[2]


def test_manifest_via_file_url(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", MANIFEST_ROWS[:1])
    (e,) = listing(manifest.as_uri()).entries
    assert e.source == str((tmp_path / "clips" / "b.mp4").resolve())


def test_csv_rows_without_source_become_failed_entries(tmp_path):
    manifest = tmp_path / "m.csv"
    # Header whitespace is tolerated; the blank line still counts when numbering lines.
    manifest.write_text(" source , label\nok.mp4,x\n\n,y\n   ,z\n")
    lst = listing(manifest)
    failed = sorted((e for e in lst.entries if e.error), key=lambda e: e.error)
    assert [e.error for e in failed] == ["manifest m.csv row 4: missing 'source'", "manifest m.csv row 5: missing 'source'"]
    assert all(e.source == "" and e.video_id.startswith("m.csv:row") for e in failed)
    (ok,) = [e for e in lst.entries if not e.error]
    assert ok.source == str(tmp_path / "ok.mp4") and ok.label == "x"


def test_csv_without_source_column_is_a_config_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.mp4,x\n")
    with pytest.raises(ConfigError, match="no 'source' column"):
        listing(manifest)


def test_jsonl_bad_lines_become_failed_entries(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"source": "a.mp4"}\n'
        "\n"
        "{not json\n"
        '["a list"]\n'
        '{"label": "x", "video_id": "v9"}\n'
        '{"source": "b.mp4", "label": 3}\n'
    )
    lst = listing(manifest)
    errors = {e.video_id: e.error for e in lst.entries if e.error}
    assert errors == {
        "m.jsonl:row3": errors["m.jsonl:row3"],
        "m.jsonl:row4": "manifest m.jsonl row 4: not a JSON object",
        "v9": "manifest m.jsonl row 5: missing 'source'",
    }
    assert errors["m.jsonl:row3"].startswith("manifest m.jsonl row 3: not valid JSON")
    good = {Path(e.source).name: e.label for e in lst.entries if not e.error}
    assert good == {"a.mp4": None, "b.mp4": "3"}


def test_missing_manifest_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        listing(tmp_path / "absent.csv")


def test_unreadable_remote_manifest_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot read manifest memory://vimpac-tests/absent.csv"):
        listing("memory://vimpac-tests/absent.csv")


def test_remote_manifest_resolves_relative_sources_against_itself():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/vimpac-tests/dir/m.csv", b"source,label\nclips/a.mp4,cat\nhttps://example.com/b.mp4,dog\n")
    try:
        lst = listing("memory://vimpac-tests/dir/m.csv")
    finally:
        fs.rm("/vimpac-tests", recursive=True)
    assert sorted(e.source for e in lst.entries) == ["https://example.com/b.mp4", "memory://vimpac-tests/dir/clips/a.mp4"]


# ---------------------------------------------------------------- lists and single files


def test_plain_list(tmp_path):
    folder = tmp_path / "lists"
    absolute = touch(tmp_path / "abs" / "x.mp4")
    (folder).mkdir()
    (folder / "videos.txt").write_text(
        f"# a comment\n\n  rel/a.mp4  \n{absolute}\nhttps://example.com/b.mp4\n   # indented comment\n"
    )
    lst = listing(folder / "videos.txt")
    assert lst.layout == "list"
    expected_sources = {str((folder / "rel" / "a.mp4").resolve()), str(absolute), "https://example.com/b.mp4"}
    assert {e.source for e in lst.entries} == expected_sources
    assert {e.video_id for e in lst.entries} == {default_video_id(s) for s in expected_sources}
    assert not lst.labeled


def test_single_video_file(tmp_path):
    video = touch(tmp_path / "one clip.mp4")
    lst = listing(video)
    (e,) = lst.entries
    assert e.source == str(video.resolve())
    assert e.video_id == default_video_id(str(video.resolve()))
    assert e.video_id.startswith("one_clip-")


@pytest.mark.parametrize("layout", ["ucf101", "hmdb51", "folder_per_class"])
def test_directory_layouts_need_a_directory(tmp_path, layout):
    video = touch(tmp_path / "a.mp4")
    with pytest.raises(ConfigError, match="needs a directory"):
        listing(video, layout=layout)


@pytest.mark.parametrize("layout", ["manifest", "list"])
def test_file_layouts_on_a_directory_are_errors(tmp_path, layout):
    touch(tmp_path / "d" / "a.mp4")
    with pytest.raises(ConfigError, match="does not apply to a directory"):
        listing(tmp_path / "d", layout=layout)


def test_missing_local_source_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        listing(tmp_path / "nowhere")


# ---------------------------------------------------------------- ids, duplicates, order


def test_a_video_id_naming_several_files_is_one_failed_entry_naming_them(tmp_path):
    """Never a silent drop (issue 16): the manifest defines the id, three files claim it."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"source": "first.mp4", "video_id": "x"}\n'
        '{"source": "other.mp4", "video_id": "y"}\n'
        '{"source": "second.mp4", "video_id": "x"}\n'
        '{"source": "third.mp4", "video_id": "x"}\n'
    )
    lst = listing(manifest)
    assert [e.video_id for e in lst.entries] == ["x", "y"]
    x = lst.entries[0]
    assert x.error_code == "id_clash" and all(n in x.error for n in ("first.mp4", "second.mp4", "third.mp4"))
    assert lst.entries[1].error is None and lst.duplicates == []


def test_same_line_twice_in_a_list_is_a_duplicate(tmp_path):
    (tmp_path / "l.txt").write_text("a.mp4\nb.mp4\na.mp4\n")
    lst = listing(tmp_path / "l.txt")
    assert len(lst.entries) == 2 and len(lst.duplicates) == 1


def test_default_video_id():
    a, b = "/data/one/clip.mp4", "/data/two/clip.mp4"
    assert default_video_id(a) == default_video_id(a)
    assert default_video_id(a) != default_video_id(b)
    assert default_video_id(a).startswith("clip-") and default_video_id(b).startswith("clip-")
    assert default_video_id("https://h.com/x/My Clip (1).mp4?sig=2").startswith("My_Clip_1-")
    assert default_video_id("https://h.com/x/c.mp4?sig=1") != default_video_id("https://h.com/x/c.mp4?sig=2")
    assert default_video_id("https://h.com/").startswith("video-")


def test_entries_are_sorted_by_video_id(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,video_id\nz.mp4,zeta\na.mp4,beta\nm.mp4,alpha\n")
    assert [e.video_id for e in listing(manifest).entries] == ["alpha", "beta", "zeta"]


# ---------------------------------------------------------------- fingerprints


def fingerprints(lst):
    return {e.video_id: e.fingerprint for e in lst.entries}


def test_fingerprint_follows_file_content_and_mtime(tmp_path):
    root = tmp_path / "fpc"
    a = touch(root / "cat" / "a.mp4", b"aaaa")
    touch(root / "cat" / "b.mp4", b"bbbb")
    first = fingerprints(listing(root))
    assert len(set(first.values())) == 2 and all(len(f) == 64 for f in first.values())
    assert fingerprints(listing(root)) == first  # stable

    st = a.stat()
    a.write_bytes(b"aaaaaaaa")  # new content (and size)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    after_edit = fingerprints(listing(root))
    assert after_edit["cat/a"] != first["cat/a"] and after_edit["cat/b"] == first["cat/b"]

    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    after_touch = fingerprints(listing(root))
    assert after_touch["cat/a"] not in (first["cat/a"], after_edit["cat/a"])
    assert after_touch["cat/b"] == first["cat/b"]


@pytest.mark.parametrize("change", [{"label": "dog"}, {"split": "test"}])
def test_fingerprint_follows_label_and_split(tmp_path, change):
    touch(tmp_path / "a.mp4")
    touch(tmp_path / "b.mp4")
    manifest = tmp_path / "m.jsonl"
    base = [{"source": "a.mp4", "video_id": "a", "label": "cat", "split": "train"},
            {"source": "b.mp4", "video_id": "b", "label": "cat", "split": "train"}]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in base))
    before = fingerprints(listing(manifest))
    manifest.write_text("".join(json.dumps(r | (change if r["video_id"] == "a" else {})) + "\n" for r in base))
    after = fingerprints(listing(manifest))
    assert after["a"] != before["a"]
    assert after["b"] == before["b"]


def test_failed_entry_fingerprint_does_not_depend_on_working_directory(tmp_path, monkeypatch):
    manifest = tmp_path / "m.csv"
    manifest.write_text("source,label\n,x\n")
    (e1,) = listing(manifest).entries
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (e2,) = listing(manifest).entries
    touch(work / "new-file")  # changes the working directory's mtime
    (e3,) = listing(manifest).entries
    assert e1.error and e1.fingerprint == e2.fingerprint == e3.fingerprint
