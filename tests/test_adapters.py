"""Downstream dataset adapters (stages/ingest/sources.py) on generated miniatures of each real
layout: UCF101, HMDB51, Something-Something v2, Diving48, Kinetics, folder-per-class and a CSV
manifest. The videos are tiny real files; the annotation files have the real names and formats.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from media_fixtures import make_video
from stages.config import ConfigError, DatasetConfig, IngestConfig
from stages.ingest.sources import list_source
from stages.ingest.stage import run_ingest
from stages.reporting import RecordingReporter
from warehouse.catalog import Catalog

FAST = dict(workers=2, batch_size=4, retries=1, backoff_s=0.01)
CODECS = {".mp4": "h264", ".webm": "vp8", ".avi": "mpeg4"}


def video(path: Path, seed: int) -> Path:
    """A 4-frame clip whose bytes depend on `seed` (ingest marks equal bytes as duplicates)."""
    return make_video(path, seed=seed, frames=4, codec=CODECS[path.suffix])


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1))
    return path


def listing(source: Path, **kw):
    return list_source(DatasetConfig(name="ds", source=str(source), **kw), IngestConfig())


def by_id(lst) -> dict[str, tuple]:
    return {e.video_id: (e.label, e.split) for e in lst.entries}


def ingest(root, source: Path, name: str, **kw):
    rep = RecordingReporter()
    outcome = run_ingest(root, DatasetConfig(name=name, source=str(source), **kw), IngestConfig(**FAST), run_id="t", reporter=rep)
    catalog = Catalog(root)
    catalog.refresh()
    rows = {r["video_id"]: r for r in catalog.query(f"SELECT * FROM videos WHERE dataset = '{name}'").to_pylist()}
    (dataset,) = catalog.query(f"SELECT * FROM datasets WHERE dataset = '{name}'").to_pylist()
    return outcome, rows, dataset, rep


@pytest.fixture(autouse=True)
def _cwd_elsewhere(tmp_path, monkeypatch):
    """Annotation files must be found from the source, never the working directory."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


# ---------------------------------------------------------------- miniatures of the real layouts


def make_ucf101(root: Path) -> Path:
    """UCF-101/<Class>/v_<Class>_gNN_cNN.avi plus ucfTrainTestlist/ (classInd and 3 split sets)."""
    clips = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01", "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01", "Archery/v_Archery_g01_c01"]
    for i, clip in enumerate(clips):
        video(root / f"{clip}.avi", seed=i)
    lists = root / "ucfTrainTestlist"
    write(lists / "classInd.txt", "1 ApplyEyeMakeup\r\n2 Archery\r\n3 BabyCrawling\r\n")
    for k in (1, 2, 3):
        train, test = (clips[0], clips[1]) if k != 2 else (clips[1], clips[0])
        write(lists / f"trainlist0{k}.txt", f"{train}.avi 1\r\n{clips[2]}.avi 2\r\n")
        write(lists / f"testlist0{k}.txt", f"{test}.avi\r\n")
    return root


def make_hmdb51(root: Path) -> Path:
    """hmdb51/<class>/<clip>.avi plus testTrainMulti_7030_splits/<class>_test_split<N>.txt."""
    clips = {"brush_hair": ["April_09_brush_hair_u_nm_np1_ba_goo_0", "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0"],
             "cartwheel": ["Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8"]}
    seed = 0
    for cls, names in clips.items():
        for name in names:
            video(root / cls / f"{name}.avi", seed=seed)
            seed += 1
    splits = root / "testTrainMulti_7030_splits"
    for k in (1, 2, 3):
        first, second = ("1", "2") if k != 3 else ("2", "1")
        write(splits / f"brush_hair_test_split{k}.txt", f"{clips['brush_hair'][0]}.avi {first} \n{clips['brush_hair'][1]}.avi {second} \n")
        write(splits / f"cartwheel_test_split{k}.txt", f"{clips['cartwheel'][0]}.avi 1 \n")
    return root


SSV2_LABELS = {  # key order is not id order: the class index is the id
    "Pushing something from left to right": "2",
    "Approaching something with your camera": "0",
    "Holding something next to something": "1",
}


def ssv2_item(vid: str, template: str, *things: str) -> dict:
    label = template
    for thing in things:
        label = label.replace("[something]", thing, 1)
    return {"id": vid, "label": label, "template": template, "placeholders": list(things)}


def make_ssv2(root: Path, annotations: Path | None = None, prefix: str = "something-something-v2-") -> Path:
    """20bn-something-something-v2/<id>.webm plus the labels / train / validation / test JSON files."""
    annotations = annotations or root
    for seed, vid in enumerate(["78687", "42326", "100904", "24", "1420", "7"]):
        video(root / "20bn-something-something-v2" / f"{vid}.webm", seed=seed)
    write(annotations / f"{prefix}labels.json", SSV2_LABELS)
    write(annotations / f"{prefix}train.json", [
        ssv2_item("78687", "Holding [something] next to [something]", "potato", "vicks vaporub bottle"),
        ssv2_item("42326", "Pushing [something] from left to right", "a pen"),
        ssv2_item("100904", "Approaching [something] with your camera", "a cup"),
    ])
    write(annotations / f"{prefix}validation.json", [ssv2_item("24", "Approaching [something] with your camera", "a door")])
    write(annotations / f"{prefix}test.json", [{"id": "1420"}])
    return root


DIVING48_VOCAB = [["Back", "15som", "05Twis", "FREE"], ["Back", "15som", "15Twis", "FREE"], ["Forward", "25som", "NoTwis", "PIKE"]]
DIVING48_CLASSES = ["Back_15som_05Twis_FREE", "Back_15som_15Twis_FREE", "Forward_25som_NoTwis_PIKE"]


def diving(name: str, label) -> dict:
    return {"vid_name": name, "label": label, "start_frame": 0, "end_frame": 79}


def make_diving48(root: Path, prefix: str = "Diving48_V2_", vocab: bool = True) -> Path:
    """rgb/<vid_name>.mp4 plus Diving48_V2_{train,test}.json and Diving48_vocab.json."""
    for seed, name in enumerate(["-mmq0PT-u8k_00155", "-mmq0PT-u8k_00156", "5nYzDM1MjTw_00010"]):
        video(root / "rgb" / f"{name}.mp4", seed=seed)
    if vocab:
        write(root / "Diving48_vocab.json", DIVING48_VOCAB)
    write(root / f"{prefix}train.json", [diving("-mmq0PT-u8k_00155", 2), diving("-mmq0PT-u8k_00156", 0)])
    write(root / f"{prefix}test.json", [diving("5nYzDM1MjTw_00010", 1)])
    return root


KINETICS_ROWS = {  # file -> (label, youtube_id, time_start, time_end, split)
    "train.csv": [("air drumming", "--07WQ2iBlw", 1, 11, "train"), ("abseiling", "-3B32lodo2M", 59, 69, "train")],
    "validate.csv": [("zumba", "0_m2jTzGz2g", 30, 40, "val")],
    "test.csv": [(None, "zzTtSMOWWO8", 102, 112, "test")],
}


def kinetics_stem(yid: str, start: int, end: int) -> str:
    return f"{yid}_{start:06d}_{end:06d}"


def make_kinetics(root: Path, layout: str = "crawler", annotations: Path | None = None) -> Path:
    """The CSVs in annotations/; clips under <split>/<label>/ (ActivityNet crawler) or <split>/ (cvdfoundation)."""
    annotations = annotations or root / "annotations"
    seed = 0
    for name, rows in KINETICS_ROWS.items():
        split = {"train.csv": "train", "validate.csv": "val", "test.csv": "test"}[name]
        if name == "test.csv":  # the test CSV of the releases has no label column
            text = "youtube_id,time_start,time_end,split\n" + "".join(f"{y},{s},{e},{sp}\n" for _, y, s, e, sp in rows)
        else:
            text = "label,youtube_id,time_start,time_end,split,is_cc\n" + "".join(f"{lb},{y},{s},{e},{sp},0\n" for lb, y, s, e, sp in rows)
        write(annotations / name, text)
        for label, yid, start, end, _ in rows:
            folder = root / split / label.replace(" ", "_") if layout == "crawler" and label else root / split
            video(folder / f"{kinetics_stem(yid, start, end)}.mp4", seed=seed)
            seed += 1
    return root


# ---------------------------------------------------------------- listings per layout


def test_ucf101_listing(tmp_path):
    lst = listing(make_ucf101(tmp_path / "UCF-101"))
    assert lst.layout == "ucf101" and lst.classes == ["ApplyEyeMakeup", "Archery", "BabyCrawling"]
    assert {e.video_id: (e.label, e.splits) for e in lst.entries} == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01": ("ApplyEyeMakeup", ["train", "test", "train"]),
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01": ("ApplyEyeMakeup", ["test", "train", "test"]),
        "Archery/v_Archery_g01_c01": ("Archery", ["train", "train", "train"]),
    }
    assert lst.warnings == [] and not lst.flip_sensitive


def test_hmdb51_listing(tmp_path):
    lst = listing(make_hmdb51(tmp_path / "hmdb51"))
    assert lst.layout == "hmdb51" and lst.classes == ["brush_hair", "cartwheel"]
    splits = {e.video_id: e.splits for e in lst.entries}
    assert splits == {
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0": ["train", "train", "test"],
        "brush_hair/Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0": ["test", "test", "train"],
        "cartwheel/Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8": ["train", "train", "train"],
    }


@pytest.mark.parametrize("prefix", ["something-something-v2-", "labels/"])
def test_ssv2_listing(tmp_path, prefix):
    root = tmp_path / "ssv2"
    if prefix == "labels/":  # labels/{labels,train,validation,test}.json
        make_ssv2(root, annotations=root / "labels", prefix="")
    else:
        make_ssv2(root, prefix=prefix)
    lst = listing(root)
    assert lst.layout == "ssv2" and lst.flip_sensitive
    assert lst.classes == ["Approaching something with your camera", "Holding something next to something",
                           "Pushing something from left to right"]
    assert by_id(lst) == {
        "78687": ("Holding something next to something", "train"),
        "42326": ("Pushing something from left to right", "train"),
        "100904": ("Approaching something with your camera", "train"),
        "24": ("Approaching something with your camera", "val"),
        "1420": (None, "test"),
        "7": (None, "unused"),  # on disk, in no annotation file
    }
    assert lst.entries[0].source.endswith(".webm") and lst.warnings == [] and all(e.error is None for e in lst.entries)


def test_ssv2_annotations_in_splits_dir(tmp_path):
    root = make_ssv2(tmp_path / "videos", annotations=tmp_path / "ssv2-annotations")
    lst = listing(root, splits_dir=str(tmp_path / "ssv2-annotations"))
    assert lst.layout == "ssv2" and by_id(lst)["24"] == ("Approaching something with your camera", "val")


@pytest.mark.parametrize("prefix", ["Diving48_V2_", "Diving48_"])
def test_diving48_listing(tmp_path, prefix):
    lst = listing(make_diving48(tmp_path / "Diving48", prefix=prefix))
    assert lst.layout == "diving48" and lst.classes == DIVING48_CLASSES and not lst.flip_sensitive
    assert by_id(lst) == {
        "-mmq0PT-u8k_00155": ("Forward_25som_NoTwis_PIKE", "train"),
        "-mmq0PT-u8k_00156": ("Back_15som_05Twis_FREE", "train"),
        "5nYzDM1MjTw_00010": ("Back_15som_15Twis_FREE", "test"),
    }


def test_diving48_without_vocabulary_names_classes_by_index(tmp_path):
    lst = listing(make_diving48(tmp_path / "Diving48", vocab=False))
    assert lst.classes == ["class_00", "class_01", "class_02"]
    assert by_id(lst)["-mmq0PT-u8k_00155"] == ("class_02", "train")


@pytest.mark.parametrize("layout", ["crawler", "flat"])
def test_kinetics_listing(tmp_path, layout):
    lst = listing(make_kinetics(tmp_path / "kinetics400", layout))
    assert lst.layout == "kinetics" and lst.classes == ["abseiling", "air drumming", "zumba"]
    assert by_id(lst) == {
        "--07WQ2iBlw_000001_000011": ("air drumming", "train"),
        "-3B32lodo2M_000059_000069": ("abseiling", "train"),
        "0_m2jTzGz2g_000030_000040": ("zumba", "val"),
        "zzTtSMOWWO8_000102_000112": (None, "test"),
    }


def test_kinetics_val_csv_and_splits_dir(tmp_path):
    root = make_kinetics(tmp_path / "k400", "flat", annotations=tmp_path / "k400-annotations")
    (tmp_path / "k400-annotations" / "validate.csv").rename(tmp_path / "k400-annotations" / "val.csv")
    lst = listing(root, splits_dir=str(tmp_path / "k400-annotations"))
    assert lst.layout == "kinetics" and by_id(lst)["0_m2jTzGz2g_000030_000040"] == ("zumba", "val")


def test_folder_per_class_listing(tmp_path):
    root = tmp_path / "fpc"
    for seed, rel in enumerate(["train/dog/a.mp4", "train/cat/b.mp4", "val/cat/c.mp4", "test/dog/d.mp4"]):
        video(root / rel, seed)
    lst = listing(root)
    assert lst.layout == "folder_per_class" and lst.classes == ["cat", "dog"]
    assert by_id(lst) == {"train/dog/a": ("dog", "train"), "train/cat/b": ("cat", "train"), "val/cat/c": ("cat", "val"),
                          "test/dog/d": ("dog", "test")}


def test_csv_manifest_listing(tmp_path):
    for seed, name in enumerate(["a.mp4", "b.mp4"]):
        video(tmp_path / "clips" / name, seed)
    manifest = write(tmp_path / "m.csv", "source,label,split,video_id\nclips/a.mp4,run,train,first\nclips/b.mp4,jump,validation,\n")
    lst = listing(manifest)
    assert lst.layout == "manifest" and lst.classes == ["jump", "run"]
    assert by_id(lst)["first"] == ("run", "train")
    (other,) = [e for e in lst.entries if e.video_id != "first"]
    assert (other.label, other.split, other.source) == ("jump", "val", str(tmp_path / "clips" / "b.mp4"))


# ---------------------------------------------------------------- auto-detection


@pytest.mark.parametrize("layout,make", [
    ("ucf101", make_ucf101), ("hmdb51", make_hmdb51), ("ssv2", make_ssv2), ("diving48", make_diving48), ("kinetics", make_kinetics),
])
def test_auto_detection(tmp_path, layout, make):
    root = make(tmp_path / "data")
    assert listing(root).layout == layout
    assert listing(root, layout=layout).layout == layout


def test_a_train_csv_that_is_not_kinetics_keeps_folder_per_class(tmp_path):
    root = tmp_path / "fpc"
    video(root / "cat" / "a.mp4", 0)
    write(root / "meta" / "train.csv", "source,label\ncat/a.mp4,cat\n")
    assert listing(root).layout == "folder_per_class"


@pytest.mark.parametrize("layout", ["ssv2", "diving48", "kinetics"])
def test_explicit_layout_without_its_annotations_is_an_error(tmp_path, layout):
    video(tmp_path / "d" / "cat" / "a.mp4", 0)
    with pytest.raises(ConfigError, match=f"(?i){layout[:4]}.* layout needs"):
        listing(tmp_path / "d", layout=layout)


# ---------------------------------------------------------------- bad input


def test_absent_listed_videos_are_named_and_counted(tmp_path):
    root = make_ssv2(tmp_path / "ssv2")
    extra = [ssv2_item(str(900 + i), "Approaching [something] with your camera", "x") for i in range(12)]
    write(root / "something-something-v2-validation.json",
          [ssv2_item("24", "Approaching [something] with your camera", "a door"), *extra])
    lst = listing(root)
    (warning,) = lst.warnings
    assert warning.startswith(f"something-something-v2-validation.json: 12 listed videos are not in {root}: 900, 901, ")
    assert "909" in warning and "910" not in warning and warning.endswith("(and 2 more)")
    assert by_id(lst)["24"] == ("Approaching something with your camera", "val")  # the rest still listed


@pytest.mark.parametrize("layout", ["ucf101", "hmdb51", "diving48", "kinetics"])
def test_absent_listed_videos_in_each_split_file_layout(tmp_path, layout):
    if layout == "ucf101":
        root = make_ucf101(tmp_path / "UCF-101")
        path, absent = root / "ucfTrainTestlist" / "testlist01.txt", "Archery/v_Archery_g07_c02.avi"
        path.write_text(path.read_text() + f"{absent}\r\n")
    elif layout == "hmdb51":
        root = make_hmdb51(tmp_path / "hmdb51")
        path, absent = root / "testTrainMulti_7030_splits" / "cartwheel_test_split1.txt", "ghost_cartwheel_f_cm_np1_ba_bad_1.avi"
        path.write_text(path.read_text() + f"{absent} 2 \n")
        absent = f"cartwheel/{absent}"
    elif layout == "diving48":
        root = make_diving48(tmp_path / "Diving48")
        path, absent = root / "Diving48_V2_test.json", "zzzz_00001"
        write(path, [diving("5nYzDM1MjTw_00010", 1), diving(absent, 0)])
    else:
        root = make_kinetics(tmp_path / "k400")
        path, absent = root / "annotations" / "validate.csv", kinetics_stem("notDownload", 5, 15)
        path.write_text(path.read_text() + "zumba,notDownload,5,15,val,0\n")
    lst = listing(root)
    assert lst.warnings == [f"{path.name}: 1 listed videos are not in {root}: {absent}"]
    assert len(lst.entries) >= 3 and all(e.error is None for e in lst.entries)


def test_ucf101_class_folder_outside_classind_fails_that_video(tmp_path):
    root = make_ucf101(tmp_path / "UCF-101")
    video(root / "YoYo" / "v_YoYo_g01_c01.avi", seed=9)
    lst = listing(root)
    bad = next(e for e in lst.entries if e.video_id == "YoYo/v_YoYo_g01_c01")
    assert bad.error == f"label 'YoYo' of video YoYo/v_YoYo_g01_c01 is not in {root / 'ucfTrainTestlist' / 'classInd.txt'}"
    assert bad.error_code == "bad_label" and bad.label is None and bad.splits == ["unused"] * 3
    assert "YoYo" not in lst.classes and sum(e.error is not None for e in lst.entries) == 1


def test_malformed_annotation_rows_become_failed_entries(tmp_path):
    root = make_kinetics(tmp_path / "k400", "flat")
    csv_path = root / "annotations" / "train.csv"
    csv_path.write_text(csv_path.read_text() + "abseiling,,1,11,train,0\nabseiling,abc,start,11,train,0\n")
    errors = {e.video_id: (e.error, e.error_code) for e in listing(root).entries if e.error}
    assert errors == {
        "train.csv:row4": ("train.csv row 4: no youtube_id or non-numeric time_start/time_end", None),
        "train.csv:row5": ("train.csv row 5: no youtube_id or non-numeric time_start/time_end", None),
    }


@pytest.mark.parametrize("content,match", [("{not json", "cannot read annotation file"), ('{"a": 1}', "expected a list of videos")])
def test_unreadable_annotation_file_is_a_config_error(tmp_path, content, match):
    root = make_ssv2(tmp_path / "ssv2")
    (root / "something-something-v2-train.json").write_text(content)
    with pytest.raises(ConfigError, match=match):
        listing(root)


# ---------------------------------------------------------------- real ingest through the stage


def test_ssv2_ingest_records_labels_bad_labels_and_flip_sensitivity(root, tmp_path):
    src = make_ssv2(tmp_path / "ssv2")
    video(src / "20bn-something-something-v2" / "55.webm", seed=20)
    write(src / "something-something-v2-validation.json", [
        ssv2_item("24", "Approaching [something] with your camera", "a door"),
        ssv2_item("55", "Spinning [something] so it continues spinning", "a coin"),  # not in labels.json
        ssv2_item("31337", "Approaching [something] with your camera", "a car"),  # not on disk
    ])
    outcome, rows, dataset, rep = ingest(root, src, "ssv2")
    assert outcome.summary["ok"] == 6 and outcome.summary["failed"] == 1
    assert {v: (r["label"], r["split"], r["status"]) for v, r in rows.items() if r["status"] == "ok"} == {
        "78687": ("Holding something next to something", "train", "ok"),
        "42326": ("Pushing something from left to right", "train", "ok"),
        "100904": ("Approaching something with your camera", "train", "ok"),
        "24": ("Approaching something with your camera", "val", "ok"),
        "1420": (None, "test", "ok"),
        "7": (None, "unused", "ok"),
    }
    bad = rows["55"]
    assert (bad["status"], bad["error_code"], bad["split"], bad["label"]) == ("failed", "bad_label", "val", None)
    assert bad["error"] == ("label 'Spinning something so it continues spinning' of video 55 in something-something-v2-validation.json "
                            "is not in something-something-v2-labels.json")
    assert "31337" not in rows
    assert f"ssv2: something-something-v2-validation.json: 1 listed videos are not in {src}: 31337" in rep.text()
    assert dataset["layout"] == "ssv2" and dataset["flip_sensitive"] is True and dataset["labeled"] is True
    assert dataset["classes"] == ["Approaching something with your camera", "Holding something next to something",
                                  "Pushing something from left to right"]


def test_diving48_ingest_fails_a_label_outside_the_vocabulary(root, tmp_path):
    src = make_diving48(tmp_path / "Diving48")
    video(src / "rgb" / "5nYzDM1MjTw_00011.mp4", seed=30)
    write(src / "Diving48_V2_test.json", [diving("5nYzDM1MjTw_00010", 1), diving("5nYzDM1MjTw_00011", 48)])
    outcome, rows, dataset, _ = ingest(root, src, "diving48")
    assert outcome.summary["ok"] == 3 and outcome.summary["failed"] == 1
    assert {v: (r["label"], r["split"]) for v, r in rows.items() if r["status"] == "ok"} == {
        "-mmq0PT-u8k_00155": ("Forward_25som_NoTwis_PIKE", "train"),
        "-mmq0PT-u8k_00156": ("Back_15som_05Twis_FREE", "train"),
        "5nYzDM1MjTw_00010": ("Back_15som_15Twis_FREE", "test"),
    }
    bad = rows["5nYzDM1MjTw_00011"]
    assert (bad["status"], bad["error_code"]) == ("failed", "bad_label")
    assert bad["error"] == "label 48 of video 5nYzDM1MjTw_00011 in Diving48_V2_test.json is not in Diving48_vocab.json"
    assert dataset["classes"] == DIVING48_CLASSES and dataset["flip_sensitive"] is False


def test_kinetics_ingest(root, tmp_path):
    src = make_kinetics(tmp_path / "kinetics400")
    outcome, rows, dataset, rep = ingest(root, src, "k400")
    assert outcome.summary["ok"] == 4 and outcome.summary["failed"] == 0
    assert {v: (r["label"], r["split"], r["status"]) for v, r in rows.items()} == {
        "--07WQ2iBlw_000001_000011": ("air drumming", "train", "ok"),
        "-3B32lodo2M_000059_000069": ("abseiling", "train", "ok"),
        "0_m2jTzGz2g_000030_000040": ("zumba", "val", "ok"),
        "zzTtSMOWWO8_000102_000112": (None, "test", "ok"),
    }
    assert rows["0_m2jTzGz2g_000030_000040"]["source"] == str(src / "val" / "zumba" / "0_m2jTzGz2g_000030_000040.mp4")
    assert dataset["layout"] == "kinetics" and dataset["classes"] == ["abseiling", "air drumming", "zumba"]
    assert dataset["flip_sensitive"] is False and not [m for level, m in rep.messages if level == "warning"]


def test_user_flip_flag_is_kept_for_layouts_that_do_not_set_it(root, tmp_path):
    _, _, dataset, _ = ingest(root, make_diving48(tmp_path / "Diving48"), "d48", flip_sensitive=True)
    assert dataset["flip_sensitive"] is True


def test_ucf101_ingest_fails_a_class_outside_classind(root, tmp_path):
    src = make_ucf101(tmp_path / "UCF-101")
    video(src / "YoYo" / "v_YoYo_g01_c01.avi", seed=9)
    outcome, rows, dataset, _ = ingest(root, src, "ucf")
    assert outcome.summary["ok"] == 3 and outcome.summary["failed"] == 1
    assert rows["YoYo/v_YoYo_g01_c01"]["error_code"] == "bad_label"
    assert "label 'YoYo'" in rows["YoYo/v_YoYo_g01_c01"]["error"] and "classInd.txt" in rows["YoYo/v_YoYo_g01_c01"]["error"]
    assert rows["Archery/v_Archery_g01_c01"]["splits"] == ["train", "train", "train"]
    assert dataset["classes"] == ["ApplyEyeMakeup", "Archery", "BabyCrawling"]


def test_annotation_rows_without_id_or_class_fail_alone(tmp_path):
    root = make_ssv2(tmp_path / "ssv2")
    write(root / "something-something-v2-validation.json", [
        ssv2_item("24", "Approaching [something] with your camera", "a door"),
        {"label": "no id here", "template": "Approaching [something] with your camera"},
        {"id": "7", "label": "a cup"},
    ])
    errors = {e.video_id: (e.error, e.source) for e in listing(root).entries if e.error}
    assert errors == {
        "something-something-v2-validation.json:item1": ("something-something-v2-validation.json item 1: no video 'id'", ""),
        "7": ("video 7 in something-something-v2-validation.json has no 'template' (its class)",
              str(root / "20bn-something-something-v2" / "7.webm")),
    }


def test_ssv2_id_with_two_different_files_is_a_failed_row_and_a_copy_is_one_video(tmp_path):
    """An SSv2 id is a file stem: 42326.webm and a different 42326.mp4 clash (a failed row naming
    both, never a silent drop); 24.webm with a byte-identical 24.mkv is one video."""
    import shutil

    root = make_ssv2(tmp_path / "ssv2")
    clips = root / "20bn-something-something-v2"
    video(clips / "42326.mp4", seed=99)
    shutil.copy(clips / "24.webm", clips / "24.mkv")
    lst = listing(root)
    by = {e.video_id: e for e in lst.entries}
    clash = by["42326"]
    assert clash.error_code == "id_clash" and "42326.mp4" in clash.error and "42326.webm" in clash.error
    assert by["24"].error is None and lst.duplicates == ["24"]
    assert by["78687"].error is None
