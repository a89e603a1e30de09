"""Reading a params file: strict YAML (a repeated key is an error), validation with errors that name the key, and
every run of the grid resolved up front, so a bad row fails before any work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ParamsError
from .schema import Params

def _format(err: ValidationError, where: str | None) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if where:
            loc = f"{where}: {loc}"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        suffix = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{suffix}")
    if len(lines) == 1:
        return "invalid params: " + lines[0].strip()
    return "invalid params:\n" + "\n".join(lines)


def validate(raw: dict[str, Any], where: str | None = None) -> Params:
    if not isinstance(raw, dict):
        raise ParamsError("invalid params: the top level must be a mapping of keys")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format(e, where)) from None
    return params


def validate_all(params: Params) -> Params:
    """Resolve every run (overrides, seeds and positions) so a bad row fails now, not when its turn comes."""
    for run in params.runs():
        params.run(run)
    return params


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping is an error: YAML's last-one-wins would
    silently change what an experiment or a section means."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ParamsError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r} (first at line "
                                  f"{seen[key] + 1}); YAML would silently keep only the last one")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a params file strictly: duplicate keys and an empty file are errors naming the file."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    if not path.is_file():
        raise ParamsError(f"{path}: is a directory, not a params file (e.g. params.yaml or profiles/imagenet64.yaml)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not a UTF-8 text file (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                          f"a params file is YAML text") from None
    except OSError as e:
        raise ParamsError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if raw is None:
        raise ParamsError(f"{path}: the params file is empty (only comments or blank lines); FlowBack never falls "
                          f"back to built-in defaults: copy params.yaml or a file from profiles/")
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    raw = read_yaml(path)
    try:
        return validate_all(validate(raw))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None




def project_dir(params_file: str | Path) -> Path | None:
    """The checkout a params file belongs to: the nearest directory at or above it that holds dvc.yaml or a
    Snakefile (profiles/x.yaml belongs to the checkout above profiles/); None outside any."""
    for d in Path(params_file).resolve().parents:
        if (d / "dvc.yaml").is_file() or (d / "Snakefile").is_file():
            return d
    return None


def check_working_directory(params: Params, params_file: str | Path, reads: list[str] | None = None) -> None:
    """Relative paths resolve against the working directory, never against the params file: DVC and Snakemake run
    every stage from the checkout, with paths relative to it. So a params file that writes a relative `results` (the
    runner's locks and key files) or `data.root` (when `reads`, a stage's declared keys, cover it) is refused from a
    working directory where they would land elsewhere: not its checkout, or (outside a checkout) not its directory
    or one above. A key the file leaves to its default means "under the working directory" by definition."""
    def read(key: str) -> bool:
        return reads is None or any(key == r or key.startswith(r + ".") for r in reads)

    written = [("results", params, "results"), ("data.root", params.data, "root")]
    relative = [f"{key}: {getattr(section, name)}" for key, section, name in written
                if name in section.model_fields_set and read(key) and not Path(getattr(section, name)).is_absolute()]
    if not relative:
        return
    cwd, home = Path.cwd().resolve(), project_dir(params_file)
    where = Path(params_file).resolve().parent
    if cwd == home or (home is None and (cwd == where or cwd in where.parents)):
        return
    raise ParamsError(f"{params_file}: its relative paths ({', '.join(relative)}) would resolve against the working "
                      f"directory {cwd}, not {home or where}: run from {home or where}, or make the paths absolute")
