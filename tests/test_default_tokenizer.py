"""`vimpac run tokenize` without --tokenizer uses the data root's newest tokenizer for the dataset."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from stages.config import ConfigError
from stages.tokenize.stage import default_tokenizer
from warehouse.catalog import Catalog
from warehouse.runs import RunRecord, new_run_id, save_run

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _tokenizer_run(root, uri: str, train_on: list[str], minutes: int, status: str = "completed") -> None:
    save_run(root, RunRecord(run_id=new_run_id("tokenizer"), stage="tokenizer", config={"train_on": train_on}, status=status,
                             summary={"model_uri": uri}, finished_at=T0 + timedelta(minutes=minutes)))


def test_newest_tokenizer_trained_on_the_dataset_wins(tmp_path):
    cat = Catalog(tmp_path)
    cat.ensure_tables()
    _tokenizer_run(cat.root, "models:/t/1", ["a"], 1)
    _tokenizer_run(cat.root, "models:/t/2", ["a", "b"], 2)
    _tokenizer_run(cat.root, "models:/t/3", ["c"], 3)
    _tokenizer_run(cat.root, "models:/t/4", ["a"], 4, status="failed")
    assert default_tokenizer(cat.root, "a")[0] == "models:/t/2"
    assert default_tokenizer(cat.root, "b")[0] == "models:/t/2"
    ref, why = default_tokenizer(cat.root, "z")  # none trained on it: the newest of the data root, and it says so
    assert ref == "models:/t/3" and "none was trained on z" in why


def test_no_tokenizer_names_the_command_that_trains_one(tmp_path):
    cat = Catalog(tmp_path)
    cat.ensure_tables()
    with pytest.raises(ConfigError, match="vimpac run tokenizer --dataset clips"):
        default_tokenizer(cat.root, "clips")
