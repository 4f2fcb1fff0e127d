"""The evaluate flow: a 2 x 2 grid (two pretrained checkpoints x two datasets) end to end on the
micro preset, cached on the second run, one failed cell not losing the others, and the report."""

from __future__ import annotations

import pytest
import yaml

from finetune_fixtures import labeled_dataset
from flows.cli import load_grid, main
from stages.config import ConfigError
from stages.evaluate.report import build_report
from test_finetune import pretrain_checkpoint
from warehouse.catalog import Catalog


@pytest.fixture
def grid_file(root, tmp_path):
    labeled_dataset(root, "alpha")
    labeled_dataset(root, "beta", classes=("Left", "Right"), flip_sensitive=True, first_vid=200)
    pretrain_checkpoint(tmp_path / "ckpts" / "a.pt", seed=0, name="micro-4x32-mp+cl")
    pretrain_checkpoint(tmp_path / "ckpts" / "b.pt", seed=1, name="micro-4x32-mp")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({
        "name": "g2x2", "models": ["ckpts/a.pt", {"ref": "ckpts/b.pt", "name": "mp-only"}],
        "datasets": [{"name": "alpha", "splits": [1]}, "beta"], "presets": ["micro"],
    }))
    return path


@pytest.mark.slow
def test_two_by_two_grid_runs_once_and_the_second_run_does_no_work(prefect_harness, root, grid_file, capsys):
    from mlflow.tracking import MlflowClient

    from flows.evaluate import evaluate

    grid = load_grid(grid_file, ["train.epochs=2"])
    assert grid.models[0].ref == str(grid_file.parent / "ckpts" / "a.pt"), "paths in a grid file are relative to it"
    first = evaluate(grid, str(root.home))
    assert len(first["cells"]) == 4 and not first["failed"]
    assert not any(c["cached"] for c in first["cells"].values())
    results = Catalog(root).rows("SELECT pretrain_recipe, dataset, split, view_protocol, metric FROM results WHERE grid = 'g2x2' ORDER BY ALL")
    assert len(results) == 12  # 4 cells x 3 metrics
    (recipe,) = {r[0] for r in Catalog(root).rows("SELECT finetune_recipe FROM results")}
    assert recipe.startswith("micro-4x32+"), "train.epochs=2 is not the micro preset: the recipe says so"
    assert {(r[0], r[1], r[2], r[3]) for r in results} == {
        ("micro-4x32-mp+cl", "alpha", "1", "2x3"), ("mp-only", "alpha", "1", "2x3"),
        ("micro-4x32-mp+cl", "beta", "1", "2x1-center"), ("mp-only", "beta", "1", "2x1-center")}
    finetune_runs = Catalog(root).rows("SELECT run_id, mlflow_run_id, status FROM runs WHERE stage = 'finetune'")
    assert len(finetune_runs) == 4 and {r[2] for r in finetune_runs} == {"completed"}
    run = MlflowClient().get_run(finetune_runs[0][1])
    assert {"loss", "train_acc", "lr", "eval_top1", "eval_mean_class"} <= set(run.data.metrics)
    assert {a.path for a in MlflowClient().list_artifacts(run.info.run_id)} >= {"confusion_matrix.png", "per_class_accuracy.csv"}
    assert run.data.tags.get("mlflow.parentRunId"), "nested under the grid's run"

    written = sorted(p.stat().st_mtime_ns for p in (root.home / "tables" / "results").rglob("*.parquet"))
    second = evaluate(grid, str(root.home))
    assert all(c["cached"] for c in second["cells"].values()) and len(second["cells"]) == 4
    assert sorted(p.stat().st_mtime_ns for p in (root.home / "tables" / "results").rglob("*.parquet")) == written
    assert not list((root.home / "checkpoints" / "finetune").rglob("last.pt"))

    assert main(["--home", str(root.home), "report", "--grid", "g2x2"]) == 0
    out = capsys.readouterr().out
    assert "mp-only" in out and "alpha" in out and "beta" in out
    markdown = (root.home / "reports" / "results-g2x2-top1.md").read_text()
    assert "| mp-only |" in markdown and "| Pretraining | alpha | beta |" in markdown

    # A second grid naming a cell the first computed finds it evaluated, and its report holds it
    # (the result row keeps the grid that computed it; grid_cells records the second).
    other = grid_file.parent / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "other", "models": [{"ref": "ckpts/b.pt", "name": "mp-only"}],
                                     "datasets": [{"name": "alpha", "splits": [1]}], "presets": ["micro"]}))
    shared = evaluate(load_grid(other, ["train.epochs=2"]), str(root.home))
    assert [c["cached"] for c in shared["cells"].values()] == [True]
    assert Catalog(root).rows("SELECT DISTINCT grid FROM results") == [("g2x2",)]
    assert Catalog(root).rows("SELECT grid, count(*) FROM grid_cells GROUP BY grid ORDER BY grid") == [("g2x2", 4), ("other", 1)]
    other_report = build_report(Catalog(root), metric="top1", grid="other").to_markdown()
    assert "| mp-only |" in other_report and "micro-4x32-mp+cl" not in other_report and "beta" not in other_report


@pytest.mark.slow
def test_one_failed_cell_does_not_lose_the_others(prefect_harness, root, grid_file, tmp_path):
    from flows.evaluate import evaluate

    # A checkpoint with another vocabulary cannot read these tokens: its cells fail, clearly.
    pretrain_checkpoint(tmp_path / "ckpts" / "wrong.pt", n_codes=128)
    ckpts = grid_file.parent / "ckpts"
    grid = load_grid(grid_file, ["train.epochs=1", f"models=[{ckpts / 'a.pt'}, {ckpts / 'wrong.pt'}]"])
    with pytest.raises(RuntimeError, match=r"2 of 4 grid cells failed.*vocabulary of 128 codes"):
        evaluate(grid, str(root.home))
    assert Catalog(root).rows("SELECT count(DISTINCT eval_id) FROM results")[0][0] == 2
    failed = Catalog(root).rows("SELECT error FROM runs WHERE stage = 'finetune' AND status = 'failed'")
    assert len(failed) == 2 and all("vocabulary of 128 codes" in e for (e,) in failed)


@pytest.mark.parametrize("gpus, parallel, expected", [(0, 1, 1), (0, 2, 1), (1, 4, 1), (2, 2, 2), (2, 4, 2), (8, 3, 3)])
def test_cells_run_at_once_only_one_per_gpu(monkeypatch, gpus, parallel, expected):
    """Cells running at once share torch's global random generators on a shared device (the same
    grid gave another table on every run): no two share one, and a lowered `parallel` is logged."""
    import torch

    from flows.evaluate import cells_at_once

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    warnings: list[str] = []
    assert cells_at_once(parallel, warnings.append) == expected
    assert len(warnings) == (expected < parallel)
    assert all(f"parallel: {parallel} lowered to {expected}" in w for w in warnings)


def test_grid_typos_fail_before_any_cell_runs(root, grid_file):
    from stages.finetune.grid import expand_grid

    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        expand_grid(load_grid(grid_file, ["presets=[nope]"]))
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        expand_grid(load_grid(grid_file, ["train.epoch=3"]))
    cells = expand_grid(load_grid(grid_file, []))
    assert [(c.dataset, c.split) for c in cells] == [("alpha", "1"), ("beta", "auto")] * 2


@pytest.mark.slow
def test_torchrun_fine_tunes_one_cell_on_two_ranks(root):
    """The README's many-GPU command on 2 CPU processes (gloo): rank 0 runs the flow and writes
    the results once; rank 1 trains and scores its half of the videos without Prefect or MLflow."""
    import json
    import os
    import subprocess
    import sys

    from test_pretrain_train import REPO

    labeled_dataset(root, "alpha")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "VIMPAC_"))}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flows.cli", "run", "finetune",
           "--home", str(root.home), "--model", "scratch", "--dataset", "alpha", "--split", "1", "--preset", "micro",
           "--set", "train.epochs=2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    cells = json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])
    (cell,) = cells.values()
    assert cell["n_eval"] == 6 and cell["steps"] == 2 * 4 * 2  # 12 videos / (4 x 2 ranks) = 2 batches, 2 epochs, 4x scratch
    assert Catalog(root).rows("SELECT count(*) FROM predictions")[0][0] == 6, "both ranks' scores, written once"
    assert Catalog(root).rows("SELECT status FROM runs WHERE stage = 'finetune'") == [("completed",)]


@pytest.mark.slow
def test_recipe_rows_pretrain_once_per_seed_and_every_seed_is_its_own_row(prefect_harness, root):
    """A grid row that is a pretraining recipe is trained on demand (once per seed), cached by
    its run key on the next run, and evaluated with the other protocols; seeds give distinct rows."""
    import numpy as np

    from flows.evaluate import evaluate
    from stages.config import GridConfig, build
    from test_pretrain_data import write_shard

    labeled_dataset(root, "alpha")
    codes = lambda vid, n, nv: np.random.default_rng(vid).integers(0, 64, size=(nv, n, 4, 4)).astype(np.uint16)  # noqa: E731
    write_shard(root, "pre", 0, list(range(6)), codebook=64, make_tokens=codes)
    grid = build(GridConfig, {
        "name": "recipes", "models": ["scratch", {"name": "mask-only", "pretrain": {"model": {"objective": "mp"}}}],
        "datasets": [{"name": "alpha", "splits": [1]}], "presets": ["micro"], "protocols": ["finetune", "knn", "bag_of_codes"],
        "seeds": [0, 1], "pretrain": {"datasets": ["pre"], "preset": "micro", "set": ["train.epochs=2"]}, "set": ["train.epochs=1"]})
    first = evaluate(grid, str(root.home))
    assert not first["failed"] and len(first["cells"]) == 2 * (2 * 2 + 1)  # seeds x (models x {finetune, probe} + bag of codes)
    catalog = Catalog(root)
    pretrains = catalog.rows("SELECT summary->>'run_key', summary->>'cached' FROM runs WHERE stage = 'pretrain' ORDER BY ALL")
    assert len(pretrains) == 2 and len({k for k, _ in pretrains}) == 2, "one pretraining per seed"
    rows = catalog.rows("SELECT pretrain_recipe, protocol, seed, count(DISTINCT eval_id) FROM results WHERE metric = 'top1' GROUP BY ALL ORDER BY ALL")
    assert rows == sorted([(r, p, s, 1) for s in (0, 1) for r in ("mask-only", "scratch") for p in ("finetune", "knn:cls", "knn:mean")]
                          + [("bag-of-codes", "bag_of_codes", s, 1) for s in (0, 1)])
    again = evaluate(grid, str(root.home))
    assert all(c["cached"] for c in again["cells"].values())
    cached = catalog.rows("SELECT summary->>'cached' FROM runs WHERE stage = 'pretrain' AND status = 'completed' ORDER BY finished_at DESC LIMIT 2")
    assert [c for (c,) in cached] == ["true", "true"], "the recipe is trained once: the second run reuses it"


def test_grid_file_paths_resolve_against_the_file_and_named_rows_stay_as_written(tmp_path):
    """A relative checkpoint in a grid file is the file's neighbour; `scratch`, `scratch-pixels:PRESET`
    and registry refs (`models:/NAME/VERSION`, which has no `://`) are names, never paths."""
    grid = tmp_path / "grids" / "g.yaml"
    grid.parent.mkdir()
    grid.write_text("name: g\nmodels: [scratch, 'scratch-pixels:tiny', 'models:/vimpac-backbone/3', ckpts/a.pt,\n"
                    "         {ref: 'models:/vimpac-backbone-pixels/latest', name: px}]\ndatasets: [d]\n")
    refs = [m.ref for m in load_grid(grid, []).models]
    assert refs == ["scratch", "scratch-pixels:tiny", "models:/vimpac-backbone/3", str(tmp_path / "grids" / "ckpts" / "a.pt"),
                    "models:/vimpac-backbone-pixels/latest"]
