"""What every training stage needs to save and resume exactly: atomic files, bare state-dict
keys, and the random number generators' states (PITFALLS.md, "Training")."""

from __future__ import annotations

import os
import random
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch



@dataclass
class KeyedRun:
    """A training run named by its key (code version, config, data): its checkpoints live in
    `run_dir`, `last.pt` while it trains and `final.pt` once it is done. A finished key is
    not trained again unless forced."""

    run_key: str
    data_fingerprint: str
    run_dir: Path

    @property
    def final(self) -> Path:
        return self.run_dir / "final.pt"

    @property
    def last(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def finished(self) -> bool:
        return self.final.exists()


def strip_prefixes(state: dict) -> dict:
    """Keys as a bare model names them: torch.compile adds `_orig_mod.`, DDP adds `module.`."""
    out = {}
    for key, value in state.items():
        # A compiled submodule puts `_orig_mod.` mid-key (backbone._orig_mod.layers...).
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def read_checkpoint(path: str | Path, fmt: str, what: str) -> dict:
    """One of our own checkpoint files, loaded safely (weights_only) on CPU. ValueError naming the
    file for a missing, unreadable or foreign file (`fmt` is the format tag its writer set)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise ValueError(f"{what} checkpoint {path} is not a readable checkpoint: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        raise ValueError(f"{what} checkpoint {path} is not a {fmt} checkpoint")
    return ckpt


def atomic_save(obj: dict, path: Path) -> None:
    # Same folder as the target, so os.replace is a rename: a crash never leaves half a file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_states(device: torch.device) -> dict:
    np_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        # weights_only loading accepts plain lists, not numpy arrays.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Subnormal floats turn up in CPU training and can make each step 10-20x slower."""
    flush = device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX tiles or AVX512-BF16).
    Without them bf16 goes through conversions on the fp32 units, with nothing to gain (not
    measured here: this machine has both), so autocast stays off."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and bool(probe()) for probe in probes)
