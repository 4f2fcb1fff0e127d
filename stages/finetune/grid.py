"""A results grid as cells: models x datasets x presets x splits, each with its validated
fine-tune config. Shared by the evaluate flow, which runs the cells, and `vimpac plan`, which
predicts them, so both see the same cells and the same errors."""

from __future__ import annotations

from dataclasses import dataclass

from stages.config import FinetuneConfig, GridConfig, GridModel, build, deep_merge, preset


@dataclass
class Cell:
    model: GridModel
    dataset: str
    split: str
    preset: str
    config: FinetuneConfig

    @property
    def label(self) -> str:
        return f"{self.model.name or self.model.ref} | {self.dataset} | split {self.split} | {self.preset}"


def expand_grid(grid: GridConfig) -> list[Cell]:
    """Every cell with its validated fine-tune config; a bad preset or override fails the whole
    grid up front (a typo should not cost the cells before it)."""
    cells = []
    for model in grid.models:
        for ds in grid.datasets:
            presets = [ds.preset] if ds.preset else [model.preset] if model.preset else grid.presets
            for name in presets:
                cfg = build(FinetuneConfig, deep_merge(preset("finetune", name), grid.finetune), grid.set)
                for split in ds.splits:
                    cells.append(Cell(model, ds.name, split, name, cfg))
    return cells
