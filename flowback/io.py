"""Atomic, hash-checked file I/O: every output FlowBack writes goes through here.

A crash (or kill -9, or a full disk) while writing must never leave a half-written file under the final name: we
write to a temporary file in the same directory, fsync it, and `os.replace` it over the target, which POSIX makes
atomic. The temporary file's name carries the writer's host and pid (`.<name>.<host>.<pid>.<random>.tmp`), so the
next writer of the same file removes what a dead writer left behind. Outputs get the permissions the umask allows
(mkstemp's 0600 would hide results from a shared group). A full disk is an error naming the file and the space it
needed. Checkpoints are loaded with `weights_only=True` only, and a file that is not one is described in plain words.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .errors import FlowBackError

if TYPE_CHECKING:
    import torch


class FlowBackFileError(FlowBackError):
    """A file FlowBack reads is missing, truncated or not what it should be; the message names the file."""


class DiskFullError(FlowBackFileError):
    """The disk filled up while writing; the previous file (if any) is intact."""


_HOST = socket.gethostname().split(".")[0].replace(".", "_") or "host"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that dead writers of `path` (on this host) left beside it; returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) != 3 or parts[0] != _HOST or not parts[1].isdigit():
            continue  # another host's writer, or not our naming: leave it
        if int(parts[1]) != os.getpid() and not _alive(int(parts[1])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _gib(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _disk_full(e: BaseException | None) -> bool:
    """Whether `e` or an exception it was raised from is ENOSPC/EDQUOT: torch.save reports a full disk as a
    RuntimeError of its zip writer (inline_container.cc) raised while handling the file's OSError."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically, on error it is removed.

    `size_hint` (bytes) only improves the message of a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as e:
            if _disk_full(e):
                written = tmp.stat().st_size if tmp.exists() else 0
                need = max(size_hint or 0, written)
                raise DiskFullError(
                    f"{path}: no space left on the device while writing it ({'about ' + _gib(need) if need else 'size unknown'}"
                    f" needed, {_gib(_free_bytes(path.parent))} free); "
                    f"{'the previous file is intact' if path.exists() else 'nothing was written'} - free space and "
                    f"run again") from e
            raise
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def save_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def save_network(directory: str | os.PathLike, state: dict, config: dict,
                 weights_file: str = "model.safetensors") -> Path:
    """A network directory: `weights_file` (safetensors: plain tensors, nothing to unpickle) then config.json, each
    written atomically; the weights first, so a directory with a config always has the weights it describes."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / weights_file) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    save_json(directory / "config.json", config)
    return directory / weights_file


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FlowBackFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlowBackFileError(f"{path}: not valid JSON ({e})") from e


def _tensor_bytes(obj: Any) -> int:
    import torch  # here, not at the top: reading params and the pipeline should not load torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save straight into a temp file (no second in-memory copy of a multi-GB state), then renamed.

    Only tensors, numbers, strings, lists and dicts: loadable with weights_only."""
    import torch

    with atomic_path(path, size_hint=_tensor_bytes(obj)) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)


def describe_checkpoint_error(path: Path, e: Exception) -> str:
    """What is wrong with a file torch.load refused, in plain words (never torch's advice to unpickle it anyway)."""
    size = path.stat().st_size if path.exists() else 0
    text = str(e)
    if size == 0:
        return "empty file (a write that never finished, or a copy that failed)"
    if "GLOBAL" in text or "Unsupported class" in text or "global" in text.split("WeightsUnpickler error:")[-1]:
        import re

        named = re.search(r"GLOBAL ([\w.]+)", text)
        what = f" ({'GLOBAL ' + named.group(1)})" if named else ""
        return (f"refused: it contains pickled code or objects other than tensors and plain values{what}, which "
                f"FlowBack never unpickles; if you wrote this file yourself, re-save it as a state dict")
    if isinstance(e, EOFError) or "unexpected EOF" in text or "failed finding central directory" in text \
            or "truncated" in text.lower() or (zipfile.is_zipfile(path) and "PytorchStreamReader" in text):
        return f"truncated ({size} bytes): a write that was cut short; re-run the stage that makes it"
    if not zipfile.is_zipfile(path) or "Unsupported operand" in text:
        return f"not a checkpoint ({size} bytes that are not torch's format)"
    return f"not a readable checkpoint ({type(e).__name__})"


def load_torch(path: str | os.PathLike, map_location: "str | torch.device" = "cpu") -> Any:
    """Load a checkpoint with weights_only=True (no arbitrary unpickling), with errors that name the file."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FlowBackFileError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on the damage
        raise FlowBackFileError(f"{path}: {describe_checkpoint_error(path, e)}") from None


def check_meta(path: str | Path, meta: dict, expected: dict | None) -> None:
    """A model file copied from another run (experiment, seed, strategy, position) fits the architecture and would be
    sampled and scored as this run's without a word: compare what its meta records with the run (keys it lacks, as
    in older files, are not compared)."""
    if expected is None:
        return
    diff = [f"{k}: checkpoint {meta[k]!r} vs run {v!r}" for k, v in expected.items() if k in meta and meta[k] != v]
    if diff:
        raise FlowBackFileError(f"{path}: holds the model of another run ({', '.join(diff)}); re-train this run or "
                                f"restore its own model file")


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path, size_hint=sum(a.nbytes for a in arrays.values())) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz, never unpickled; what is wrong with another file is said in plain words (numpy takes
    anything that is not a zip for a pickle and advises loading it unsafely)."""
    path = Path(path)
    if not path.exists():
        raise FlowBackFileError(f"{path}: file not found")
    if not zipfile.is_zipfile(path):
        raise FlowBackFileError(f"{path}: not an .npz file ({path.stat().st_size} bytes that are not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:
        why = ("refused: it holds pickled (object) arrays, which FlowBack never unpickles" if "pickle" in str(e)
               else f"cannot read .npz ({type(e).__name__}: {e})")
        raise FlowBackFileError(f"{path}: {why}") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    """Rows as a CSV with a header, atomically (rewritten whole: training logs stay small). The columns are every
    row's keys in order of first appearance (a run resumed with validation turned on gains a column); a row without
    one leaves its cell empty."""
    import csv
    import io as _io

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)) or ["step"])
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buf.getvalue().encode())
