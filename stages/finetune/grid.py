"""A results grid as cells: models x datasets x presets x splits x seeds, each with its validated
fine-tune config and the protocol it runs. Shared by the evaluate flow, which runs the cells,
and `vimpac plan`, which predicts them, so both see the same cells and the same errors.

Protocols (grid `protocols:`): `finetune` is one cell per model, dataset, preset, split and
seed; `linear_probe` and `knn` share one `probe` cell per model, dataset, split and seed (the
frozen features are computed once, with the first preset's clip settings); `bag_of_codes` is one
cell per dataset, split and seed, whatever the models. A model is a token backbone or a pixel
(ST-MAE) one; which, its checkpoint tells when the cell runs, so nothing here depends on it. Seeds (grid `seeds:`) set every cell's
`train.seed` and, for recipe rows (token `pretrain:` and pixel `pretrain_pixels:` recipes alike),
the pretraining seed (flows/evaluate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stages.config import (
    FinetuneConfig,
    GridConfig,
    GridModel,
    GridPixelPretrain,
    GridPretrain,
    PixelPretrainConfig,
    PretrainConfig,
    build,
    deep_merge,
    preset,
)

FINETUNE, PROBE, BAG_OF_CODES = "finetune", "probe", "bag_of_codes"
PROBE_METHODS = ("linear_probe", "knn")
BAG_MODEL = GridModel(ref="bag-of-codes", name="bag-of-codes")


@dataclass
class Cell:
    model: GridModel
    dataset: str
    split: str
    preset: str
    config: FinetuneConfig
    kind: str = FINETUNE  # finetune | probe | bag_of_codes
    seed: int | None = None  # the grid's seed (None: the config's own)
    methods: list[str] = field(default_factory=list)  # probe cells: linear_probe and/or knn

    @property
    def label(self) -> str:
        text = f"{self.model.label} | {self.dataset} | split {self.split} | {self.preset}"
        if self.kind != FINETUNE:
            text += f" | {'+'.join(self.methods) if self.kind == PROBE else BAG_OF_CODES}"
        return text + (f" | seed {self.seed}" if self.seed is not None else "")


def _seeded(cfg: FinetuneConfig, seed: int | None) -> FinetuneConfig:
    if seed is None:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})


def expand_grid(grid: GridConfig) -> list[Cell]:
    """Every cell with its validated fine-tune config; a bad preset or override fails the whole
    grid up front (a typo should not cost the cells before it)."""
    seeds: list[int | None] = list(grid.seeds) if grid.seeds else [None]
    probes = [m for m in PROBE_METHODS if m in grid.protocols]
    configs: dict[str, FinetuneConfig] = {}

    def config(name: str) -> FinetuneConfig:
        if name not in configs:
            configs[name] = build(FinetuneConfig, deep_merge(preset("finetune", name), grid.finetune), grid.set)
        return configs[name]

    cells = []
    for seed in seeds:
        for model in grid.models:
            for ds in grid.datasets:
                presets = [ds.preset] if ds.preset else [model.preset] if model.preset else grid.presets
                for split in ds.splits:
                    if FINETUNE in grid.protocols:
                        for name in presets:
                            cells.append(Cell(model, ds.name, split, name, _seeded(config(name), seed), seed=seed))
                    if probes:
                        cells.append(Cell(model, ds.name, split, presets[0], _seeded(config(presets[0]), seed), PROBE, seed, probes))
        if BAG_OF_CODES in grid.protocols:
            for ds in grid.datasets:
                name = ds.preset or grid.presets[0]
                for split in ds.splits:
                    cells.append(Cell(BAG_MODEL, ds.name, split, name, _seeded(config(name), seed), BAG_OF_CODES, seed))
    return cells


def recipe_config(base: GridPretrain, model: GridModel, seed: int | None) -> PretrainConfig:
    """A recipe row's pretraining config: the base preset and settings, the recipe's own
    overrides, then the seed. The model name is not part of it (the run key is the recipe)."""
    overrides = list(base.set) + model.recipe_overrides() + ([f"train.seed={seed}"] if seed is not None else [])
    data = deep_merge(preset("pretrain", base.preset), base.config)
    data = deep_merge(data, {"datasets": list(base.datasets), "tokenizer": base.tokenizer})
    return build(PretrainConfig, data, overrides)


def pixel_recipe_config(base: GridPixelPretrain, model: GridModel, seed: int | None) -> PixelPretrainConfig:
    """A pixel recipe row's pretrain-pixels config, built as a token recipe's: the base preset and
    settings, the recipe's own overrides, then the seed (so each seed is its own run key)."""
    overrides = list(base.set) + model.recipe_overrides() + ([f"train.seed={seed}"] if seed is not None else [])
    data = deep_merge(deep_merge(preset("pretrain-pixels", base.preset), base.config), {"datasets": list(base.datasets)})
    return build(PixelPretrainConfig, data, overrides)


def recipe_configs(grid: GridConfig) -> list[tuple[GridModel, int | None, PretrainConfig | PixelPretrainConfig]]:
    """Every (recipe row, seed) pretraining the grid needs, validated up front: a PretrainConfig
    for a token recipe, a PixelPretrainConfig for a pixel one (`model.is_pixel_recipe`)."""
    seeds: list[int | None] = list(grid.seeds) if grid.seeds else [None]
    out: list[tuple[GridModel, int | None, PretrainConfig | PixelPretrainConfig]] = []
    for s in seeds:
        for m in grid.models:
            if m.is_pixel_recipe and grid.pretrain_pixels is not None:
                out.append((m, s, pixel_recipe_config(grid.pretrain_pixels, m, s)))
            elif m.pretrain is not None and grid.pretrain is not None:
                out.append((m, s, recipe_config(grid.pretrain, m, s)))
    return out
