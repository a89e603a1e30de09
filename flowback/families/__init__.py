"""The model families: each module in this package (but `base`) is one family, named after its file, whose `FAMILY`
object gives the stages everything they need (flowback/families/base.py). Adding a family is one module here plus its
model code; nothing else branches on the family.

Family modules are found by name without being imported, and are imported only when a run of that family is resolved,
so the pipeline's code dependencies of a run hold its own family's code and no other's.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Family

FAMILIES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                                         if m.name != "base" and not m.name.startswith("_")))


def module_name(name: str) -> str:
    """The module that holds family `name` (the pipeline adds its code to the family's runs' dependencies)."""
    if name not in FAMILIES:
        raise KeyError(f"no model family {name!r}; families: {', '.join(FAMILIES)}")
    return f"{__name__}.{name}"


def family(name: str) -> "Family":
    return importlib.import_module(module_name(name)).FAMILY
