"""Declared reads only: a stage receives a config in which every params key it did not declare raises when used, so
its declared keys (what DVC and Snakemake track) can never silently fall short."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ..errors import FlowBackError

if TYPE_CHECKING:
    from .schema import Params

# --------------------------------------------------------------------------------------------- declared reads only
class UndeclaredParamError(FlowBackError, AttributeError):
    """A stage read a params key its pipeline spec does not list (so dvc and snakemake would not rerun it)."""


class Undeclared:
    """Stands in for a params value a stage did not declare: any use of it is an UndeclaredParamError naming the key,
    so a stage's declared reads (its DVC params and Snakemake params) can never silently fall short."""

    __slots__ = ("_key", "_stage")

    def __init__(self, key: str, stage: str):
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_stage", stage)

    def _fail(self, *args, **kwargs):
        key, stage = object.__getattribute__(self, "_key"), object.__getattribute__(self, "_stage")
        raise UndeclaredParamError(f"stage {stage!r} read params key {key!r}, which its `reads()` in "
                                   f"flowback/stages/{stage}.py does not list; list it so dvc and snakemake rerun the "
                                   f"stage when it changes")

    def __repr__(self) -> str:
        return f"<undeclared params key {object.__getattribute__(self, '_key')}>"

    __getattr__ = __bool__ = __int__ = __float__ = __index__ = __str__ = __format__ = __fspath__ = _fail
    __iter__ = __len__ = __getitem__ = __contains__ = __hash__ = __eq__ = __ne__ = __lt__ = __le__ = _fail
    __gt__ = __ge__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _fail
    __rtruediv__ = __floordiv__ = __mod__ = __neg__ = __call__ = _fail


def _restrict(node: BaseModel, path: str, keys: set[str], stage: str) -> BaseModel:
    update = {}
    for name in type(node).model_fields:
        key = f"{path}{name}"
        if key in keys:
            continue
        value = getattr(node, name)
        below = any(k.startswith(key + ".") for k in keys)
        if below and isinstance(value, BaseModel):
            update[name] = _restrict(value, key + ".", keys, stage)
        elif below and isinstance(value, dict):
            update[name] = {k: (v if f"{key}.{k}" in keys else
                                _restrict(v, f"{key}.{k}.", keys, stage) if isinstance(v, BaseModel) and
                                any(s.startswith(f"{key}.{k}.") for s in keys) else Undeclared(f"{key}.{k}", stage))
                            for k, v in value.items()}
        else:
            update[name] = Undeclared(key, stage)
    return node.model_copy(update=update)


def restrict(params: Params, keys: list[str], stage: str) -> Params:
    """`params` with every value outside `keys` (dotted paths; a key covers everything below it) replaced by an
    Undeclared stand-in: what a stage receives, so it can read nothing it did not declare."""
    for k in keys:
        _lookup(params, k)  # a declared key must exist
    return _restrict(params, "", set(keys), stage)


def _lookup(node: Any, key: str) -> Any:
    for part in key.split("."):
        if isinstance(node, BaseModel) and part in type(node).model_fields:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"declared params key {key!r} does not exist")
    return node


def values(params: Params, keys: list[str]) -> dict[str, Any]:
    """{key: JSON value} of declared keys: what dvc records in dvc.lock and snakemake in its params."""
    out = {}
    for k in sorted(set(keys)):
        v = _lookup(params, k)
        out[k] = v.model_dump(mode="json") if isinstance(v, BaseModel) else json.loads(json.dumps(
            {kk: (vv.model_dump(mode="json") if isinstance(vv, BaseModel) else vv) for kk, vv in v.items()}
            if isinstance(v, dict) else v, default=str))
    return out
