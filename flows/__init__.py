"""The Prefect flows, one module per stage (DESIGN.md). `flows.<module>` is imported on first
use (PEP 562): `import flows` stays cheap, a command pays only for the flows it touches, and a
caller never has to import a flow module before reaching it through the package."""

from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":  # no such flow module; a missing dependency still raises as itself
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
