"""Typed configs, presets, `--set` overrides, pipeline files and the cache hash (stages/config.py)."""

from __future__ import annotations

import copy
import re

import pytest

from stages.config import (
    PRESETS,
    STAGES,
    ConfigError,
    FinetuneConfig,
    DatasetConfig,
    IngestConfig,
    PipelineConfig,
    PixelPretrainConfig,
    TrackingConfig,
    apply_overrides,
    build,
    cache_dict,
    config_hash,
    load_pipeline_file,
    parse_override,
    preset,
    resolve_pipeline,
)

# ---------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    "item, path, expected",
    [
        ("ingest.workers=8", ("ingest", "workers"), 8),
        ("ingest.max_bytes=1024", ("ingest", "max_bytes"), 1024),
        ("ingest.backoff_s=0.5", ("ingest", "backoff_s"), 0.5),
        ("ingest.read_timeout_s=60", ("ingest", "read_timeout_s"), 60.0),
        ("ingest.retry_failed=true", ("ingest", "retry_failed"), True),
        ("ingest.retry_failed=false", ("ingest", "retry_failed"), False),
        ("ingest.extensions=[mp4, .AVI]", ("ingest", "extensions"), [".avi", ".mp4"]),
        ("stages=[ingest]", ("stages",), ["ingest"]),
        ("name=nightly", ("name",), "nightly"),
        # Text fields keep the text as written: no int, no dropped zeros, no YAML comment.
        ("tracking.experiment=2024", ("tracking", "experiment"), "2024"),
        ("name=001", ("name",), "001"),
        ("name=true", ("name",), "true"),
        ("name=run #3", ("name",), "run #3"),
        ("name='quoted run'", ("name",), "quoted run"),
    ],
)
def test_override_values_are_typed(item, path, expected):
    cfg = build(PipelineConfig, {}, [item])
    value = cfg
    for key in path:
        value = getattr(value, key)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    "item, path, value",
    [
        ("a.b=[1, 2]", ["a", "b"], [1, 2]),
        ("a=x=y", ["a"], "x=y"),
        (" a.b = 3 ", ["a", "b"], 3),
        ("a=", ["a"], ""),
        ("a=[unclosed", ["a"], "[unclosed"),  # not YAML: kept as text, validation decides
    ],
)
def test_parse_override(item, path, value):
    assert parse_override(item) == (path, value)


@pytest.mark.parametrize("item", ["workers", "=3", "  =3"])
def test_parse_override_rejects_malformed(item):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override(item)


@pytest.mark.parametrize(
    "item, key",
    [
        ("ingest.workers=many", "ingest.workers"),
        ("ingest.workers=0", "ingest.workers"),  # ge=1
        ("ingest.batch_size=2.5", "ingest.batch_size"),
        ("ingest.backoff_s=-1", "ingest.backoff_s"),
        ("ingest.retry_failed=[1]", "ingest.retry_failed"),
        ("ingest.extensions=5", "ingest.extensions"),
        ("stages=[pretrian]", "stages.0"),
        ("pretrain.train.lr=-1", "pretrain.train.lr"),
        ("pretrain.model.objective=mlm", "pretrain.model.objective"),
        ("ingest=5", "ingest"),
    ],
)
def test_wrongly_typed_override_names_the_key(item, key):
    with pytest.raises(ConfigError) as err:
        build(PipelineConfig, {}, [item])
    assert re.search(rf"^\s*{re.escape(key)}:", str(err.value), re.M), str(err.value)


@pytest.mark.parametrize(
    "item, key, model",
    [
        ("bogus=1", "bogus", PipelineConfig),
        ("ingest.bogus=1", "ingest.bogus", IngestConfig),
        ("tracking.bogus=x", "tracking.bogus", TrackingConfig),
        ("ingest.workrs.deep=1", "ingest.workrs", IngestConfig),
    ],
)
def test_unknown_override_key_lists_valid_keys(item, key, model):
    with pytest.raises(ConfigError) as err:
        build(PipelineConfig, {}, [item])
    msg = str(err.value)
    assert repr(key) in msg
    valid = msg.split("valid here:")[1]
    assert sorted(k.strip() for k in valid.split(",")) == sorted(model.model_fields)


def test_overrides_on_a_stage_model_and_base_is_not_mutated():
    base = {"workers": 2, "extensions": [".mp4"]}
    snapshot = copy.deepcopy(base)
    cfg = build(IngestConfig, base, ["batch_size=4", "extensions=[webm]"])
    assert (cfg.workers, cfg.batch_size, cfg.extensions) == (2, 4, [".webm"])
    assert base == snapshot
    data = apply_overrides(base, ["retries=0"], model=IngestConfig)
    assert data["retries"] == 0 and "retries" not in base


def test_later_override_wins():
    cfg = build(PipelineConfig, {}, ["ingest.workers=2", "ingest.workers=5"])
    assert cfg.ingest.workers == 5


def test_extensions_are_normalised():
    cfg = IngestConfig(extensions=["MP4", ".avi", "mp4", "..mkv"])
    assert cfg.extensions == [".avi", ".mkv", ".mp4"]


def test_unknown_key_in_base_data_is_rejected():
    with pytest.raises(ConfigError, match=r"ingest\.wrkers: Extra inputs are not permitted"):
        build(PipelineConfig, {"ingest": {"wrkers": 3}})


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("stage, name", [(s, n) for s, names in PRESETS.items() for n in names])
def test_every_preset_builds(stage, name):
    # Fine-tuning presets configure grid cells and pretrain-pixels its own stage, not pipeline fields.
    model = {"finetune": FinetuneConfig, "pretrain-pixels": PixelPretrainConfig}.get(stage) or PipelineConfig.model_fields[stage].annotation
    cfg = build(model, preset(stage, name)).model_dump()

    def check(expected: dict, actual: dict) -> None:
        for key, value in expected.items():
            if isinstance(value, dict):
                check(value, actual[key])  # nested presets (pretrain) set only what they name
            else:
                assert actual[key] == value

    check(PRESETS[stage][name], cfg)


def test_hvm1_finetune_preset_is_hvm1s_fine_tuning():
    """eminorhan/mae_st (HVM-1's fine-tuning code): finetune.py defaults and scripts/finetune/*.sh,
    models_vit.py's [CLS] head; lr = blr 1.2e-3 x (16 x 2) / 256."""
    cfg = build(FinetuneConfig, preset("finetune", "hvm1"))
    t, m = cfg.train, cfg.model
    assert (t.layer_decay, t.label_smoothing, t.weight_decay, t.warmup, t.grad_clip) == (0.8, 0.1, 1e-4, 0, 5.0)
    assert (t.batch_size, t.accumulate, t.beta1, t.beta2) == (16, 2, 0.9, 0.999)
    assert t.lr == pytest.approx(1.2e-3 * 16 * 2 / 256)
    assert (m.pool, m.drop_path, m.head_dropout, m.dropout) == ("cls", 0.1, 0.3, 0.0)
    default = FinetuneConfig()
    assert (default.train.layer_decay, default.train.label_smoothing, default.model.drop_path) == (1.0, 0.0, 0.0), \
        "the paper's recipe has none of HVM-1's regularisers"


def test_file_settings_merge_into_nested_presets(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("pretrain:\n  train:\n    lr: 0.0005\n")
    cfg = resolve_pipeline(path, [], {"pretrain": "large_half"})
    assert cfg.pretrain.train.lr == 0.0005, "the file's value wins"
    assert cfg.pretrain.train.accumulate == 4 and cfg.pretrain.model.cl_hidden == 4096, "the preset's other values stay"


def test_preset_returns_a_copy():
    p = preset("ingest", "web")
    p["workers"] = 1
    assert PRESETS["ingest"]["web"]["workers"] == 16


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        preset("ingest", "turbo")
    msg = str(err.value)
    assert "'turbo'" in msg
    assert msg.endswith("known: " + ", ".join(sorted(PRESETS["ingest"])))


def test_unknown_preset_stage():
    with pytest.raises(ConfigError, match="known: none"):
        preset("evaluate", "default")


def test_unknown_preset_through_resolve_pipeline():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        resolve_pipeline(presets={"ingest": "nope"})


# ---------------------------------------------------------------- pipeline files

YAML_TEXT = """\
name: nightly
datasets:
  - name: ucf
    source: videos/ucf
    splits_dir: splits
  - name: remote
    source: https://example.com/list.txt
    layout: list
    flip_sensitive: true
ingest:
  workers: 3
  retries: 1
  extensions: [mp4, avi]
"""

TOML_TEXT = """\
name = "nightly"

[[datasets]]
name = "ucf"
source = "videos/ucf"
splits_dir = "splits"

[[datasets]]
name = "remote"
source = "https://example.com/list.txt"
layout = "list"
flip_sensitive = true

[ingest]
workers = 3
retries = 1
extensions = ["mp4", "avi"]
"""


@pytest.fixture
def conf_dir(tmp_path, monkeypatch):
    """A folder for config files; the working directory is elsewhere, so relative paths
    can only come out right if they are resolved against the file."""
    d = tmp_path / "conf"
    d.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return d


def test_yaml_and_toml_files_give_the_same_config(conf_dir):
    (conf_dir / "p.yaml").write_text(YAML_TEXT)
    (conf_dir / "p.toml").write_text(TOML_TEXT)
    from_yaml = resolve_pipeline(conf_dir / "p.yaml")
    from_toml = resolve_pipeline(conf_dir / "p.toml")
    assert from_yaml.model_dump() == from_toml.model_dump()
    assert from_yaml.name == "nightly"
    assert from_yaml.ingest.workers == 3 and from_yaml.ingest.extensions == [".avi", ".mp4"]
    assert [d.name for d in from_yaml.datasets] == ["ucf", "remote"]
    assert from_yaml.datasets[1].flip_sensitive is True


def test_relative_dataset_paths_resolve_against_the_file(conf_dir, tmp_path):
    sub = conf_dir / "sub"
    sub.mkdir()
    (sub / "p.yaml").write_text(
        "datasets:\n"
        "  - {name: rel, source: ../data/v, splits_dir: s}\n"
        f"  - {{name: abs, source: {tmp_path / 'abs'}}}\n"
        "  - {name: url, source: 's3://bucket/manifest.csv'}\n"
    )
    cfg = resolve_pipeline(sub / "p.yaml")
    rel, abs_, url = cfg.datasets
    assert rel.source == str((conf_dir / "data" / "v").resolve())
    assert rel.splits_dir == str((sub / "s").resolve())
    assert abs_.source == str(tmp_path / "abs")
    assert url.source == "s3://bucket/manifest.csv"


def test_home_relative_dataset_source_is_the_home_folder(conf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (conf_dir / "p.yaml").write_text("datasets:\n  - {name: h, source: ~/videos}\n")
    assert resolve_pipeline(conf_dir / "p.yaml").datasets[0].source == str(tmp_path / "home" / "videos")


def test_overrides_beat_file_values_beat_presets(conf_dir):
    (conf_dir / "p.yaml").write_text("ingest:\n  workers: 3\n  retries: 1\n")
    cfg = resolve_pipeline(conf_dir / "p.yaml", overrides=["ingest.retries=9"], presets={"ingest": "web"})
    web = PRESETS["ingest"]["web"]
    assert cfg.ingest.workers == 3  # file beats preset (web says 16)
    assert cfg.ingest.retries == 9  # override beats file and preset
    assert cfg.ingest.backoff_s == web["backoff_s"]  # preset beats the default
    assert cfg.ingest.read_timeout_s == web["read_timeout_s"]
    assert cfg.ingest.batch_size == IngestConfig().batch_size  # untouched default


def test_resolve_pipeline_without_file():
    cfg = resolve_pipeline(overrides=["name=adhoc"], presets={"ingest": "local"})
    assert cfg.name == "adhoc"
    assert cfg.ingest.batch_size == PRESETS["ingest"]["local"]["batch_size"]
    assert cfg.datasets == [] and cfg.stages == list(STAGES)


def test_duplicate_dataset_names_are_rejected(conf_dir):
    (conf_dir / "p.yaml").write_text(
        "datasets:\n  - {name: a, source: x}\n  - {name: b, source: y}\n  - {name: a, source: z}\n"
    )
    with pytest.raises(ConfigError, match="unique; repeated: a$"):
        resolve_pipeline(conf_dir / "p.yaml")


@pytest.mark.parametrize("name", ["", "has space", "-leading", "_leading", "a/b", "a.b", "ümlaut"])
def test_invalid_dataset_names_are_rejected(name):
    with pytest.raises(ConfigError, match=r"datasets\.0\.name"):
        build(PipelineConfig, {"datasets": [{"name": name, "source": "/x"}]})


@pytest.mark.parametrize("name", ["ucf101", "HMDB-51", "k400_mini", "7"])
def test_valid_dataset_names(name):
    assert build(DatasetConfig, {"name": name, "source": "/x"}).name == name


@pytest.mark.parametrize(
    "data, key",
    [
        ({"name": "a"}, "source"),
        ({"name": "a", "source": "/x", "layout": "zip"}, "layout"),
        ({"name": "a", "source": "/x", "extra": 1}, "extra"),
    ],
)
def test_invalid_dataset_fields(data, key):
    with pytest.raises(ConfigError, match=rf"(?m)^\s*{key}:"):
        build(DatasetConfig, data)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n", ""])
def test_non_mapping_yaml_is_rejected(conf_dir, text):
    (conf_dir / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_pipeline_file(conf_dir / "p.yaml")


@pytest.mark.parametrize("name, text, kind", [("p.yaml", "a: [1, 2\n", "YAML"), ("p.toml", "a = [1, 2\n", "TOML")])
def test_syntax_errors_name_the_format(conf_dir, name, text, kind):
    (conf_dir / name).write_text(text)
    with pytest.raises(ConfigError, match=f"not valid {kind}"):
        load_pipeline_file(conf_dir / name)


@pytest.mark.parametrize("target", ["missing.yaml", "."])
def test_unreadable_file_gives_config_error(conf_dir, target):
    path = conf_dir / target
    with pytest.raises(ConfigError, match="cannot read pipeline config"):
        load_pipeline_file(path)


def test_typo_in_file_is_an_error(conf_dir):
    (conf_dir / "p.toml").write_text("[ingest]\nwrkers = 3\n")
    with pytest.raises(ConfigError, match=r"ingest\.wrkers"):
        resolve_pipeline(conf_dir / "p.toml")


# ---------------------------------------------------------------- cache key

OPERATIONAL = {
    "workers": 7,
    "batch_size": 3,
    "connect_timeout_s": 1.5,
    "read_timeout_s": 99.0,
    "total_timeout_s": 5.0,
    "retries": 0,
    "backoff_s": 0.0,
    "max_redirects": 0,
    "retry_failed": True,
}
OUTPUT_AFFECTING = {
    "max_bytes": 1000,
    "decode_check_frames": 5,
    "extensions": [".mp4"],
}


def test_field_lists_cover_the_ingest_config():
    # Keeps the two parametrised tests below honest when a field is added.
    assert set(OPERATIONAL) | set(OUTPUT_AFFECTING) == set(IngestConfig.model_fields)


@pytest.mark.parametrize("field, value", OPERATIONAL.items())
def test_operational_fields_do_not_change_the_hash(field, value):
    base = IngestConfig(workers=2)
    changed = base.model_copy(update={field: value})
    assert getattr(changed, field) != getattr(base, field)
    assert config_hash(changed) == config_hash(base)
    assert field not in cache_dict(base)


@pytest.mark.parametrize("field, value", OUTPUT_AFFECTING.items())
def test_output_affecting_fields_change_the_hash(field, value):
    base = IngestConfig()
    changed = build(IngestConfig, {field: value})
    assert config_hash(changed) != config_hash(base)
    assert cache_dict(changed)[field] == getattr(changed, field)


def test_hash_is_stable_and_short():
    a = build(IngestConfig, {"extensions": ["MP4", "avi"]})
    b = build(IngestConfig, {"extensions": [".avi", ".mp4"], "workers": 1})
    assert config_hash(a) == config_hash(b)
    assert re.fullmatch(r"[0-9a-f]{16}", config_hash(a))


def test_operational_presets_do_not_change_the_hash():
    default = resolve_pipeline()
    for name in PRESETS["ingest"]:
        assert config_hash(resolve_pipeline(presets={"ingest": name}).ingest) == config_hash(default.ingest)


def test_cache_dict_recurses_and_drops_nested_operational_fields():
    cfg = build(PipelineConfig, {}, ["name=x", "tracking.experiment=y"])
    d = cache_dict(cfg)
    assert "name" not in d
    assert d["tracking"] == {}
    assert d["ingest"] == cache_dict(cfg.ingest)
    assert config_hash(cfg) == config_hash(PipelineConfig())


def test_a_grid_pixel_recipe_needs_a_name_a_base_with_datasets_and_builds_over_its_preset():
    from stages.config import GridConfig
    from stages.finetune.grid import recipe_configs

    rows = [{"name": "st-mae", "pretrain_pixels": {"model.mask_ratio": 0.5}}]
    base = {"datasets": ["raw"], "preset": "tiny", "set": ["train.epochs=3"]}
    grid = build(GridConfig, {"models": rows, "datasets": ["toy"], "seeds": [0, 2], "pretrain_pixels": base})
    [(_, s0, c0), (_, s2, c2)] = recipe_configs(grid)
    assert (s0, s2, c0.train.seed, c2.train.seed) == (0, 2, 0, 2)
    assert (c2.model.preset, c2.model.mask_ratio, c2.train.epochs, c2.data.frames, c2.datasets) == ("tiny", 0.5, 3, 8, ["raw"])
    with pytest.raises(ConfigError, match="needs a `pretrain_pixels:` section"):
        build(GridConfig, {"models": rows, "datasets": ["toy"]})
    with pytest.raises(ConfigError, match="must name the datasets whose frame shards"):
        build(GridConfig, {"models": rows, "datasets": ["toy"], "pretrain_pixels": {"preset": "tiny"}})
    with pytest.raises(ConfigError, match="needs a `name`"):
        build(GridConfig, {"models": [{"pretrain_pixels": {}}], "datasets": ["toy"], "pretrain_pixels": base})
    with pytest.raises(ConfigError, match="not pretrain and pretrain_pixels"):
        build(GridConfig, {"models": [{"name": "x", "pretrain": {}, "pretrain_pixels": {}}], "datasets": ["toy"],
                           "pretrain_pixels": base, "pretrain": {"datasets": ["raw"]}})
    with pytest.raises(ConfigError, match="unknown config key 'model.mask_ratioo'"):
        recipe_configs(build(GridConfig, {"models": [{"name": "x", "pretrain_pixels": {"model.mask_ratioo": 1}}],
                                          "datasets": ["toy"], "pretrain_pixels": base}))
