"""`vimpac plan`: what a pipeline run would do, and why, checked against what real runs then do.

One small pipeline (an unlabeled set and a labeled set, every stage on CPU-sized presets) runs
once for the module; each test plans on a copy of that data root, changes something (config,
data, code version, --force) and compares the plan with the catalog, or with a real run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from media_fixtures import make_video
from stages.config import resolve_pipeline
from stages.plan import CACHED, CODE, CONFIG, FORCED, NEW, _shard_bounds, upstream
from warehouse.catalog import Catalog



def _corpus(folder: Path) -> Path:
    for i in range(2):
        make_video(folder / "pre" / f"p{i}.mp4", seed=i, frames=24, fps=12)
    for c, cls in enumerate(("Up", "Down")):
        for i in range(2):
            make_video(folder / "lab" / "train" / cls / f"{cls}{i}.mp4", seed=100 + 10 * c + i, frames=24, fps=12)
        make_video(folder / "lab" / "val" / cls / f"{cls}v.mp4", seed=150 + c, frames=24, fps=12)
    return folder


def _config_file(corpus: Path) -> Path:
    spec = {
        "name": "plan-test",
        "datasets": [{"name": "pre", "source": "pre"}, {"name": "lab", "source": "lab", "fps": 4.0}],
        "ingest": {"workers": 1},
        "frames": {"size": 32, "fps": 2.0, "workers": 2},
        "tokenizer": {"preset": "tiny", "steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1,
                      "register_as": "plan-test-tokenizer"},
        "pretrain": {"model": {"preset": "micro", "cl_hidden": 32, "cl_dim": 16, "dropout": 0.0},
                     "train": {"batch_size": 4, "lr": 1e-3, "warmup": 1, "epochs": 1, "log_every": 1}, "data": {"workers": 0},
                     "register_as": "plan-test-backbone"},
        "evaluate": {"models": ["pretrained"], "presets": ["micro"]},
    }
    path = corpus / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(prefect_harness, tmp_path_factory):
    """The small pipeline run once: (corpus folder with pipeline.yaml, data root)."""
    from flows.pipeline import pipeline

    base = tmp_path_factory.mktemp("plan")
    corpus = _corpus(base / "corpus")
    home = base / "home"
    pipeline(resolve_pipeline(_config_file(corpus)), str(home))
    return corpus, home


@pytest.fixture
def copy(built, tmp_path):
    """A private copy of the built data root, for a test that runs the pipeline again. The corpus
    stays where it is: a source's path is part of its videos' fingerprints."""
    corpus, home = built
    shutil.copytree(home, tmp_path / "home")
    return corpus, tmp_path / "home"


def _plan(corpus: Path, home: Path, *extra: str, capsys) -> dict:
    """`vimpac plan --format json` as a user runs it; rows keyed by (stage, dataset)."""
    capsys.readouterr()
    assert main(["--home", str(home), "plan", "--config", str(corpus / "pipeline.yaml"), "--format", "json", *extra]) == 0
    out = json.loads(capsys.readouterr().out)
    out["rows"] = {(r["stage"], r["dataset"]): r for r in out["stages"]}
    return out


def _snapshot(home: Path) -> dict[str, int]:
    return {str(p.relative_to(home)): p.stat().st_mtime_ns for p in sorted(home.rglob("*"))}


def test_shard_bounds_when_durations_are_unknown():
    assert _shard_bounds(0, 4, 100) == (0, 0)
    assert _shard_bounds(1, 4, 100) == (1, 1)
    assert _shard_bounds(2, 2, 100) == (2, 2), "two workers: the target is half the total, so two videos make two shards"
    assert _shard_bounds(3, 1, 100) == (1, 3)
    assert _shard_bounds(10, 8, 3) == (4, 10)


def test_plan_on_an_empty_data_root_is_all_new_and_creates_nothing(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus")
    _config_file(corpus)
    home = tmp_path / "home"
    plan = _plan(corpus, home, capsys=capsys)
    assert not home.exists(), "plan never creates the data root"
    rows = plan["rows"]
    assert rows[("ingest", "pre")]["reasons"] == {NEW: 2} and rows[("ingest", "pre")]["run"] == 1
    assert rows[("ingest", "lab")]["reasons"] == {NEW: 6} and rows[("ingest", "lab")]["videos"] == 6
    # Durations are unknown before ingest: two workers cut 2..6 shards of six videos.
    assert (rows[("frames", "lab")]["run"], rows[("frames", "lab")]["run_max"]) == (2, 6)
    assert rows[("frames", "lab")]["to_run"] == "2-6 shards (6 videos)" and rows[("frames", "lab")]["reasons"] == {NEW: 6}
    assert rows[("tokenizer", "pre")]["reasons"] == {upstream("frames", "pre"): 1}
    assert rows[("pretrain", "pre")]["reasons"] == {upstream("tokenizer", "pre"): 1}
    assert rows[("evaluate", "lab")]["run"] == 1 and all(r["pending"] for r in plan["stages"])


@pytest.mark.slow
def test_after_a_full_run_everything_is_cached(built, capsys):
    corpus, home = built
    before = _snapshot(home)
    plan = _plan(corpus, home, capsys=capsys)
    assert [r["stage"] for r in plan["stages"]] == ["ingest", "ingest", "frames", "frames", "tokenizer", "tokenize", "tokenize",
                                                    "pretrain", "evaluate"]
    assert all(not r["pending"] and r["reason"] == CACHED and not r["error"] for r in plan["stages"]), plan["stages"]
    rows = plan["rows"]
    catalog = Catalog(home)
    frames_shards = dict(catalog.rows("SELECT dataset, count(*) FROM shards WHERE stage = 'frames' GROUP BY ALL"))
    token_shards = dict(catalog.rows("SELECT dataset, count(*) FROM shards WHERE stage = 'tokenize' GROUP BY ALL"))
    assert rows[("ingest", "lab")]["cached"] == 6 and rows[("ingest", "pre")]["cached"] == 2
    assert {d: rows[("frames", d)]["cached"] for d in ("pre", "lab")} == frames_shards
    assert {d: rows[("tokenize", d)]["cached"] for d in ("pre", "lab")} == token_shards
    assert rows[("tokenizer", "pre")]["cached"] == rows[("pretrain", "pre")]["cached"] == 1
    assert rows[("evaluate", "lab")]["cached"] == 1, "the pretrained model's cell, found by its eval id"
    assert plan["summary"].startswith("plan: nothing to run")

    assert main(["--home", str(home), "plan", "--config", str(corpus / "pipeline.yaml")]) == 0
    table = capsys.readouterr().out
    assert "tokenizer" in table and "cached" in table and "nothing to run" in table
    assert _snapshot(home) == before, "plan writes nothing to the data root"


@pytest.mark.slow
def test_plan_never_touches_the_data_root(built, capsys):
    corpus, home = built
    before = _snapshot(home)
    _plan(corpus, home, "--force", capsys=capsys)
    # A new frames variant: a frames run would save its shards' plan files first; plan must not.
    rows = _plan(corpus, home, "--set", "frames.size=48", "--set", "tokenizer.steps=3", capsys=capsys)["rows"]
    assert rows[("frames", "lab")]["run"] > 0
    assert main(["--home", str(home), "plan", "--config", str(corpus / "pipeline.yaml"), "--preset", "frames=tiny"]) == 0
    assert _snapshot(home) == before, "no file added, removed or rewritten"


@pytest.mark.slow
def test_config_change_shows_changed_config(built, capsys):
    corpus, home = built
    plan = _plan(corpus, home, "--set", "frames.size=48", capsys=capsys)
    rows = plan["rows"]
    assert rows[("ingest", "pre")]["reason"] == CACHED
    for ds, videos in (("pre", 2), ("lab", 6)):
        frames = rows[("frames", ds)]
        assert frames["reasons"] == {CONFIG: frames["run"]} and frames["exact"] and frames["videos"] == videos
        assert f"frames {ds}: config: size 32 -> 48" in "\n".join(f"frames {ds}: {n}" for n in frames["notes"])
        assert frames["cached"] == 0, "a new variant: none of the 32-px shards is reused"
    assert rows[("tokenizer", "pre")]["reasons"] == {upstream("frames", "pre"): 1}
    # The new tokenizer version tokenizes every frame shard, old size and new.
    committed = dict(Catalog(home).rows("SELECT dataset, count(*) FROM shards WHERE stage = 'frames' GROUP BY ALL"))
    for ds in ("pre", "lab"):
        new_shards = rows[("frames", ds)]["run"]
        assert rows[("tokenize", ds)]["reasons"] == {upstream("tokenizer", "pre"): committed[ds], upstream("frames", ds): new_shards}
        assert rows[("tokenize", ds)]["run"] == committed[ds] + new_shards
    assert rows[("evaluate", "plan-test")]["skipped"] == "skipped: no models", "no backbone from a pretrain run that fails"
    assert rows[("pretrain", "pre")]["error"] and "several frame settings" in rows[("pretrain", "pre")]["error"], \
        "pre would have 32- and 48-px token shards of the new tokenizer: pretraining refuses that"

    # (The new variant's shards are cut by plan_frames itself, the function the frames run plans
    # with, on the same ingested videos: the count is exact; the data-change test below runs it.)


@pytest.mark.slow
def test_data_change_plans_exactly_what_the_real_run_does(copy, capsys):
    corpus, home = copy
    added = [make_video(corpus / "lab" / "train" / "Up" / "new0.mp4", seed=500, frames=24, fps=12),
             make_video(corpus / "lab" / "train" / "Down" / "new1.mp4", seed=501, frames=24, fps=12)]
    try:
        _data_change(corpus, home, capsys)
    finally:
        for path in added:  # the corpus is the module's
            path.unlink()


def _data_change(corpus: Path, home: Path, capsys) -> None:
    from flows.pipeline import pipeline

    before = _snapshot(home)
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert _snapshot(home) == before
    assert rows[("ingest", "lab")]["reasons"] == {NEW: 2} and rows[("ingest", "lab")]["run"] == 1
    assert rows[("ingest", "lab")]["cached"] == 6 and rows[("ingest", "pre")]["reason"] == CACHED
    frames = rows[("frames", "lab")]
    assert frames["exact"] and frames["run"] == 2 and frames["reasons"] == {NEW: 2} and frames["videos"] == 2
    assert rows[("frames", "pre")]["reason"] == CACHED
    # The tokenizer trains on the unlabeled set only: new labeled videos leave its key alone.
    assert rows[("tokenizer", "pre")]["reason"] == CACHED
    assert rows[("tokenize", "lab")]["reasons"] == {upstream("frames", "lab"): 2} and rows[("tokenize", "pre")]["reason"] == CACHED
    assert rows[("pretrain", "pre")]["reason"] == CACHED
    assert rows[("evaluate", "lab")]["reasons"] == {upstream("tokenize", "lab"): 1}

    summaries = pipeline(resolve_pipeline(corpus / "pipeline.yaml"), str(home))
    assert summaries["ingest/lab"]["processed"] == 2 and summaries["ingest/lab"]["batches"] == 1
    assert summaries["ingest/pre"]["processed"] == 0
    assert summaries["frames/lab"]["shards_built"] == 2 and summaries["frames/pre"]["shards_built"] == 0
    assert summaries["tokenizer/pre"]["cached"] is True
    assert summaries["tokenize/lab"]["shards_built"] == 2 and summaries["tokenize/pre"]["shards_built"] == 0
    assert summaries["pretrain/pre"]["cached"] is True
    cells = summaries["evaluate/plan-test"]["cells"]
    assert len(cells) == 1 and not any(c["cached"] for c in cells.values())
    after = _plan(corpus, home, capsys=capsys)
    assert not any(r["pending"] for r in after["stages"]), after["stages"]


@pytest.mark.slow
def test_force_marks_everything_forced(built, capsys):
    corpus, home = built
    plan = _plan(corpus, home, "--force", capsys=capsys)
    assert plan["force"] is True
    for row in plan["stages"]:
        # (ingest counts its reasons in videos, everything else in units)
        units = row["videos"] if row["stage"] == "ingest" else row["run"]
        assert row["pending"] and row["reasons"] == {FORCED: units} and row["cached"] == 0, row
    rows = plan["rows"]
    assert rows[("ingest", "lab")]["videos"] == 6 and rows[("tokenizer", "pre")]["run"] == 1 and rows[("evaluate", "lab")]["run"] == 1


@pytest.mark.slow
def test_code_version_change_shows_changed_code_version(built, capsys, monkeypatch):
    import stages.finetune.train
    import stages.frames.stage
    import stages.ingest.stage
    import stages.pretrain.train
    import stages.tokenizer.train

    corpus, home = built
    monkeypatch.setattr(stages.frames.stage, "CODE_VERSION", "frames-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    for ds in ("pre", "lab"):
        assert rows[("frames", ds)]["reasons"] == {CODE: rows[("frames", ds)]["run"]} and rows[("frames", ds)]["run"] > 0
    assert rows[("ingest", "lab")]["reason"] == CACHED
    assert rows[("tokenizer", "pre")]["reasons"] == {upstream("frames", "pre"): 1}
    monkeypatch.undo()

    # Ingest: every video re-ingested for the code change, but the same bytes: frames keep their shards.
    monkeypatch.setattr(stages.ingest.stage, "CODE_VERSION", "ingest-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert rows[("ingest", "lab")]["reasons"] == {CODE: 6} and rows[("frames", "lab")]["reason"] == CACHED
    monkeypatch.undo()

    # Tokenize keys its output folder by frames and tokenizer only: a real run keeps the shards,
    # so the plan says cached, and says why.
    import stages.tokenize.stage

    monkeypatch.setattr(stages.tokenize.stage, "CODE_VERSION", "tokenize-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert rows[("tokenize", "lab")]["reason"] == CACHED and "made by tokenize-1" in rows[("tokenize", "lab")]["notes"][0]
    monkeypatch.undo()

    # Training stages: the finished runs' metadata says which part of the key changed.
    monkeypatch.setattr(stages.tokenizer.train, "CODE_VERSION", "tokenizer-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert rows[("tokenizer", "pre")]["reasons"] == {CODE: 1}
    assert rows[("tokenize", "pre")]["reasons"] == {upstream("tokenizer", "pre"): rows[("tokenize", "pre")]["run"]}
    monkeypatch.undo()
    monkeypatch.setattr(stages.pretrain.train, "CODE_VERSION", "pretrain-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert rows[("pretrain", "pre")]["reasons"] == {CODE: 1}
    assert rows[("evaluate", "lab")]["reasons"] == {upstream("pretrain", "pre"): 1}
    monkeypatch.undo()
    monkeypatch.setattr(stages.finetune.train, "CODE_VERSION", "finetune-test")
    rows = _plan(corpus, home, capsys=capsys)["rows"]
    assert rows[("evaluate", "lab")]["reasons"] == {CODE: 1}
    monkeypatch.undo()

    # A config change of a training stage, for comparison: named as such, with the field.
    rows = _plan(corpus, home, "--set", "pretrain.train.lr=0.002", capsys=capsys)["rows"]
    assert rows[("pretrain", "pre")]["reasons"] == {CONFIG: 1}
    assert any("train.lr 0.001 -> 0.002" in n for n in rows[("pretrain", "pre")]["notes"])
