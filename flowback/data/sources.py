"""Where ImageNet's JPEGs are: a list of `ImageRef`s (file, byte range, label) for each official split.

Two layouts are read, detected from what `source` holds:

- folders: `source/train/<wnid>/*.JPEG` and `source/val/<wnid>/*.JPEG` (the usual layout after the devkit's valprep
  script; also what torchvision's ImageFolder reads).
- the official tar files: `source/ILSVRC2012_img_train.tar` (one inner tar per class, `<wnid>.tar`) and
  `source/ILSVRC2012_img_val.tar` (50,000 flat JPEGs) with a labels file beside it, `source/LOC_val_solution.csv`
  (Kaggle's: `ImageId,PredictionString` whose first word is the wnid) or `source/val_labels.txt` (`<file> <wnid>`
  per line). Tar members are stored uncompressed and contiguously, so each JPEG - even inside an inner tar - is a
  plain byte range of the outer file: workers read it with one seek, nothing is extracted to disk.

Classes are the sorted wnids of the train split (index = position, as ImageFolder and ADM number them); val must
use the same wnids. Images are listed in sorted order (by wnid, then file name), so the list - and therefore every
shard - is the same on every machine.
"""

from __future__ import annotations

import csv
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..io import FlowBackFileError

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
VAL_LABEL_FILES = ("LOC_val_solution.csv", "val_labels.txt")


@dataclass(frozen=True)
class ImageRef:
    """One source image: `size` bytes at `offset` of `path` (offset 0 and the whole file for a plain file)."""

    name: str  # stable identifier: "<wnid>/<file>" for train, "<file>" for val
    path: str
    offset: int
    size: int
    label: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise FlowBackFileError(f"{self.where}: file ends after {len(data)} of {self.size} bytes (truncated)")
        return data

    @property
    def where(self) -> str:
        return self.path if self.offset == 0 and self.name in self.path else f"{self.path} (member {self.name})"


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def layout(source: str | Path) -> str:
    """'folders' or 'tars', or a FlowBackFileError saying what was expected."""
    source = Path(source)
    if (source / "train").is_dir():
        return "folders"
    if (source / TRAIN_TAR).is_file():
        return "tars"
    raise FlowBackFileError(f"{source}: not an ImageNet source; expected train/ and val/ folders of class folders, or "
                            f"{TRAIN_TAR} and {VAL_TAR} (with {' or '.join(VAL_LABEL_FILES)})")


# ----------------------------------------------------------------------------------------------------------- folders
def _folder_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FlowBackFileError(f"{split_dir}: split folder not found")
    return sorted(d.name for d in os.scandir(split_dir) if d.is_dir())


def _folder_split(split_dir: Path, wnids: list[str], max_per_class: int | None) -> list[ImageRef]:
    index = {w: i for i, w in enumerate(wnids)}
    present = _folder_classes(split_dir)
    unknown = sorted(set(present) - set(index))
    if unknown:
        raise FlowBackFileError(f"{split_dir}: class folders {unknown[:5]} are not train classes")
    refs = []
    for wnid in present:
        files = sorted(e.name for e in os.scandir(split_dir / wnid) if e.is_file() and _is_image(e.name))
        for name in files[:max_per_class]:
            path = split_dir / wnid / name
            refs.append(ImageRef(f"{wnid}/{name}", str(path), 0, path.stat().st_size, index[wnid]))
    return refs


# -------------------------------------------------------------------------------------------------------------- tars
def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # uncompressed only: members must be byte ranges of the file
    except (tarfile.TarError, OSError) as e:
        raise FlowBackFileError(f"{path}: not a readable uncompressed tar ({type(e).__name__}: {e})") from e


def _tar_train(path: Path, max_per_class: int | None) -> tuple[list[str], list[ImageRef]]:
    outer = _open_tar(path)
    try:
        inner = sorted((m for m in outer.getmembers() if m.isfile() and m.name.endswith(".tar")), key=lambda m: m.name)
        wnids = [Path(m.name).stem for m in inner]
        refs = []
        for label, m in enumerate(inner):
            try:
                with tarfile.open(fileobj=outer.extractfile(m), mode="r:") as t:
                    members = sorted((x for x in t.getmembers() if x.isfile() and _is_image(x.name)),
                                     key=lambda x: x.name)
            except (tarfile.TarError, OSError) as e:
                raise FlowBackFileError(f"{path}: inner tar {m.name} is damaged ({type(e).__name__}: {e})") from e
            for x in members[:max_per_class]:
                refs.append(ImageRef(f"{wnids[label]}/{Path(x.name).name}", str(path), m.offset_data + x.offset_data,
                                     x.size, label))
    finally:
        outer.close()
    return wnids, refs


def _val_labels(source: Path) -> dict[str, str]:
    """Val file stem -> wnid, from Kaggle's LOC_val_solution.csv or a plain `<file> <wnid>` list."""
    for name in VAL_LABEL_FILES:
        path = source / name
        if path.is_file():
            break
    else:
        raise FlowBackFileError(f"{source}: {VAL_TAR} needs a labels file beside it: {' or '.join(VAL_LABEL_FILES)}")
    labels = {}
    with open(path, newline="") as f:
        rows = csv.reader(f) if path.suffix == ".csv" else (line.split() for line in f)
        for lineno, row in enumerate(rows, 1):
            if not row or (lineno == 1 and path.suffix == ".csv" and row[0] == "ImageId"):
                continue
            try:
                stem, wnid = Path(row[0]).stem, row[1].split()[0]
            except IndexError:
                raise FlowBackFileError(f"{path}:{lineno}: expected '<file> <wnid>', got {row!r}") from None
            labels[stem] = wnid
    return labels


def _tar_val(source: Path, wnids: list[str], max_per_class: int | None) -> list[ImageRef]:
    path = source / VAL_TAR
    labels = _val_labels(source)
    index = {w: i for i, w in enumerate(wnids)}
    outer = _open_tar(path)
    try:
        members = sorted((m for m in outer.getmembers() if m.isfile() and _is_image(m.name)), key=lambda m: m.name)
    finally:
        outer.close()
    refs, taken = [], {}
    for m in members:
        stem = Path(m.name).stem
        if stem not in labels:
            raise FlowBackFileError(f"{path}: member {m.name} has no label in the labels file")
        if labels[stem] not in index:
            raise FlowBackFileError(f"{path}: member {m.name} is labelled {labels[stem]!r}, not a train class")
        label = index[labels[stem]]
        taken[label] = taken.get(label, 0) + 1
        if max_per_class is None or taken[label] <= max_per_class:
            refs.append(ImageRef(Path(m.name).name, str(path), m.offset_data, m.size, label))
    # class-major order, as the folder layout, so both layouts give the same shards for the same images
    refs.sort(key=lambda r: (r.label, r.name))
    return refs


# ----------------------------------------------------------------------------------------------------------- public
def list_imagenet(source: str | Path, num_classes: int, max_per_class: int | None = None
                  ) -> tuple[list[str], dict[str, list[ImageRef]]]:
    """(wnids, {"train": refs, "val": refs}); checks the class count against `num_classes` (data.classes)."""
    source = Path(source)
    if layout(source) == "folders":
        wnids = _folder_classes(source / "train")
        splits = {"train": _folder_split(source / "train", wnids, max_per_class),
                  "val": _folder_split(source / "val", wnids, max_per_class)}
    else:
        wnids, train = _tar_train(source / TRAIN_TAR, max_per_class)
        if not (source / VAL_TAR).is_file():
            raise FlowBackFileError(f"{source / VAL_TAR}: not found")
        splits = {"train": train, "val": _tar_val(source, wnids, max_per_class)}
    if len(wnids) != num_classes:
        raise FlowBackFileError(f"{source}: has {len(wnids)} train classes, params expect {num_classes} "
                                f"(set data.classes for a subset)")
    for split, refs in splits.items():
        if not refs:
            raise FlowBackFileError(f"{source}: split {split!r} has no images")
    return wnids, splits
