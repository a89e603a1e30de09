"""The data manifest (`manifest.json`): what a data directory holds and how it was made, checked on every read.

It records the data set, image size, channels, classes, the settings the shards were prepared with, and per split
the sample count, per-class counts and every shard's name, count and sha256 (and the sources skipped at prepare).
It is a pydantic model, so a malformed manifest is an error naming the file and the field. Readers check every shard
against it (present, sha256, keys, decoding), and refuse data prepared with settings other than the current params'
(`check_prepared`). `verify` reads one shard at a time (it never holds a split in memory) and can check any subset of
the shards, so every rank of a multi-GPU job verifies its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..io import FlowBackFileError, load_json, save_json, sha256_file
from .format import FORMAT, IMAGE_MEMBERS, read_shard, sample_key

if TYPE_CHECKING:
    from ..params import Params

MANIFEST = "manifest.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Skipped(_Model):
    index: int = Field(ge=0)
    name: str
    error: str


class ShardEntry(_Model):
    name: str
    count: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    skipped: list[Skipped] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v.startswith("."):
            raise ValueError(f"shard name {v!r} must be a plain file name in the data directory")
        return v

    def keys(self, split: str, first: int) -> list[str]:
        """The sample keys this shard promises: its source range minus the sources it skipped."""
        skipped = {x.index for x in self.skipped}
        return [sample_key(split, i) for i in range(first, first + self.count + len(skipped)) if i not in skipped]


class SplitEntry(_Model):
    count: int = Field(ge=0)
    per_class: list[int]
    shards: list[ShardEntry]
    skipped: int = Field(0, ge=0)

    def firsts(self) -> list[int]:
        """Index of each shard's first source (shards are consecutive source ranges)."""
        out, first = [], 0
        for shard in self.shards:
            out.append(first)
            first += shard.count + len(shard.skipped)
        return out


class Manifest(_Model):
    """What `prepare` (or `encode`) wrote. Prepared settings are recorded so readers can refuse stale data."""

    version: Literal["flowback-wds-1"] = FORMAT
    dataset: str
    image_size: int = Field(ge=1)
    channels: int = Field(ge=1)
    num_classes: int = Field(ge=1)
    splits: dict[str, SplitEntry]
    members: tuple[str, ...] = IMAGE_MEMBERS
    # prepared settings (which ones depend on the data set)
    split_seed: int | None = None
    val_fraction: float | None = None
    format: Literal["png", "latent"] = "png"
    resize: str | None = None
    max_per_class: int | None = None
    keep_pixels: bool | None = None
    shard_size: int | None = None
    # ImageNet sources and latents
    source: str | None = None
    wnids: list[str] | None = None
    latent_shape: list[int] | None = None
    vae: str | None = None
    vae_hub: str | None = None
    scale: float | None = None

    @property
    def pixels(self) -> bool:
        return "png" in self.members

    def split(self, split: str, directory: Path) -> SplitEntry:
        if split not in self.splits:
            raise FlowBackFileError(f"{directory / MANIFEST}: no split {split!r}; has {', '.join(self.splits)}")
        return self.splits[split]


def write_manifest(directory: str | Path, info: dict) -> Path:
    """Atomically write `manifest.json` from `info` (validated as a Manifest first)."""
    path = Path(directory) / MANIFEST
    try:
        manifest = Manifest.model_validate(info)
    except ValidationError as e:
        raise ValueError(f"manifest info is invalid: {_errors(e)}") from None
    save_json(path, manifest.model_dump(mode="json", exclude_none=True))
    return path


def _errors(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors()[:3])


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST
    raw = load_json(path)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise FlowBackFileError(f"{path}: not a valid FlowBack data manifest ({_errors(e)})") from None


def check_shard(directory: Path, manifest: Manifest, split: str, shard: ShardEntry, first: int) -> list[dict[str, Any]]:
    """Read one shard listed in the manifest: present, sha256, decodable, exactly the promised keys (sorted)."""
    path = directory / shard.name
    if not path.is_file():
        raise FlowBackFileError(f"{path}: shard listed in the manifest is missing")
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise FlowBackFileError(f"{path}: sha256 {digest[:12]}... does not match the manifest's "
                                f"{shard.sha256[:12]}... (changed or damaged; re-run `python -m flowback stage prepare`)")
    pixels = manifest.pixels
    samples = read_shard(path, num_classes=manifest.num_classes, image_size=manifest.image_size if pixels else None,
                         channels=manifest.channels if pixels else None, members=manifest.members)
    samples.sort(key=lambda s: s["key"])
    expected = shard.keys(split, first)
    got = [s["key"] for s in samples]
    if got != expected:
        extra = sorted(set(got) - set(expected))[:3]
        missing = sorted(set(expected) - set(got))[:3]
        raise FlowBackFileError(f"{path}: has {len(got)} samples, the manifest says {len(expected)}"
                                f"{f'; unexpected keys {extra}' if extra else ''}"
                                f"{f'; missing keys {missing}' if missing else ''}")
    shape = manifest.latent_shape
    for s in samples:
        for ext in manifest.members:
            if ext.endswith("npy") and (s[ext].dtype != np.float16 or list(s[ext].shape) != shape):
                raise FlowBackFileError(f"{path}: sample {s['key']!r}: .{ext} is {s[ext].dtype} {list(s[ext].shape)}, "
                                        f"expected float16 {shape}")
    return samples


def iter_shards(directory: Path, manifest: Manifest, split: str,
                which: range | slice | None = None) -> Iterator[list[dict[str, Any]]]:
    """The checked samples of each shard of `split` (or of the shards `which` selects), one shard at a time."""
    entry = manifest.split(split, directory)
    pairs = list(zip(entry.shards, entry.firsts()))
    for shard, first in pairs[which] if which is not None else pairs:
        yield check_shard(directory, manifest, split, shard, first)


def _read_samples(directory: Path, manifest: Manifest, split: str) -> list[dict[str, Any]]:
    """Every checked sample of `split`, and their per-class counts checked against the manifest (as `data verify`
    does): a label changed to another valid class, its shard's sha256 re-pointed, would otherwise train silently."""
    samples = [s for shard in iter_shards(directory, manifest, split) for s in shard]
    labels = np.asarray([s["label"] for s in samples], np.int64)
    check_counts(directory, manifest, split, np.bincount(labels, minlength=manifest.num_classes))
    return samples


def _read_checked(directory: Path, manifest: Manifest, split: str) -> tuple[np.ndarray, np.ndarray]:
    if not manifest.pixels:
        raise FlowBackFileError(f"{directory / MANIFEST}: holds {list(manifest.members)} samples, not images; "
                                f"read it with read_latents")
    samples = _read_samples(directory, manifest, split)
    size, channels = manifest.image_size, manifest.channels
    out = np.stack([s["image"] for s in samples]) if samples else np.zeros((0, channels, size, size), np.uint8)
    return out, np.asarray([s["label"] for s in samples], dtype=np.int64)


def read_split(directory: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All samples of a split in key order: (uint8 images (N, C, S, S), int64 labels (N,)).

    Every shard is checked against manifest.json (sha256, count, keys) and decoded without unpickling.
    """
    directory = Path(directory)
    return _read_checked(directory, load_manifest(directory), split)


def read_latents(directory: str | Path, split: str) -> dict[str, np.ndarray]:
    """A latent split (data.format latent) in key order, checked like read_split.

    Returns {"mean", "std": float16 (N, 2, C, h, w) - [:, 0] the image, [:, 1] its horizontal flip; "label": (N,)}.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    samples = _read_samples(directory, manifest, split)
    shape = manifest.latent_shape or []
    return {k: (np.stack([s[f"{k}.npy"] for s in samples]) if samples else np.zeros([0, *shape], np.float16))
            for k in ("mean", "std")} | {"label": np.asarray([s["label"] for s in samples], dtype=np.int64)}


def count_shards(directory: str | Path, split: str, which: range | slice | None = None,
                 manifest: Manifest | None = None) -> np.ndarray:
    """Per-class sample counts of the selected shards of `split`, every shard checked (one in memory at a time)."""
    directory = Path(directory)
    manifest = manifest or load_manifest(directory)
    counts = np.zeros(manifest.num_classes, np.int64)
    for samples in iter_shards(directory, manifest, split, which):
        counts += np.bincount(np.asarray([s["label"] for s in samples], np.int64), minlength=manifest.num_classes)
    return counts


def check_counts(directory: str | Path, manifest: Manifest, split: str, per_class: np.ndarray) -> dict:
    """Compare a split's per-class counts (from count_shards over all its shards) with the manifest's."""
    entry = manifest.split(split, Path(directory))
    where = Path(directory) / MANIFEST
    if int(per_class.sum()) != entry.count:
        raise FlowBackFileError(f"{where}: split {split!r} says {entry.count} samples but its shards hold "
                                f"{int(per_class.sum())}")
    if per_class.tolist() != list(entry.per_class):
        raise FlowBackFileError(f"{where}: split {split!r} per-class counts {per_class.tolist()} do not match the "
                                f"manifest's {entry.per_class} (labels changed after prepare); re-run `python -m "
                                f"flowback stage prepare`")
    skipped = sum(len(s.skipped) for s in entry.shards)
    if skipped != entry.skipped:
        raise FlowBackFileError(f"{where}: split {split!r} lists {skipped} skipped sources in its shards but says "
                                f"{entry.skipped}")
    return {"count": int(per_class.sum()), "skipped": skipped, "shards": len(entry.shards),
            "per_class": per_class.tolist()}


def verify(directory: str | Path) -> dict:
    """Check every shard of every split: present, sha256, keys, decoding, per-class counts (one shard at a time).

    Raises FlowBackFileError naming the first bad shard; returns {split: {count, skipped, shards, per_class}}.
    """
    directory = Path(directory)
    manifest = load_manifest(directory)
    return {split: check_counts(directory, manifest, split, count_shards(directory, split, manifest=manifest))
            for split in manifest.splits}


def _settings(params: "Params") -> list[tuple[str, str, Any]]:
    """(manifest field, the params key it comes from, value) of every setting a data directory is made from: the one
    table both the manifest's record and the declared reads of every stage that loads the data come from."""
    d = params.data
    rows = [("dataset", "data.dataset", d.dataset), ("image_size", "data.image_size", d.image_size),
            ("channels", "data.dataset", d.channels), ("num_classes", "data.classes", d.num_classes),
            ("format", "data.format", d.format)]
    if d.dataset == "digits":
        rows += [("split_seed", "seed", params.seed), ("val_fraction", "data.val_fraction", d.val_fraction)]
    else:
        rows += [("resize", "data.resize", d.resize), ("max_per_class", "data.max_per_class", d.max_per_class)]
    if d.format == "latent":
        rows += [("keep_pixels", "data.keep_pixels", d.keep_pixels)]
    return rows


def prepared_settings(params: "Params") -> dict:
    """The params a data directory is made from; the manifest records them and readers insist on them."""
    return {field: value for field, _, value in _settings(params)}


def data_reads(params: "Params") -> list[str]:
    """The params keys `check_prepared` / `load_split` read (where the data is, and `prepared_settings`): a stage
    that loads the data declares them."""
    return ["data.root", *dict.fromkeys(key for _, key, _ in _settings(params))]


def stale_settings(params: "Params", manifest: Manifest) -> list[str]:
    """How the manifest's recorded settings differ from `params` ("key: manifest != params"), empty if they agree."""
    return [f"{k}: {getattr(manifest, k)!r} != params {v!r}" for k, v in prepared_settings(params).items()
            if getattr(manifest, k) != v]


def check_prepared(params: "Params") -> Manifest:
    """The manifest of `params.data.dir`, or an error if the data was prepared with other settings."""
    d = params.data
    manifest = load_manifest(d.dir)
    stale = stale_settings(params, manifest)
    if stale:
        raise FlowBackFileError(f"{Path(d.dir) / MANIFEST}: prepared with other settings ({'; '.join(stale)}); "
                                f"re-run `python -m flowback stage prepare`")
    return manifest


def load_split(params: "Params", split: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images and int64 labels of `split` of the data set `params` describe (written by the prepare stage).

    Refuses data prepared with different settings (data set, image size, split seed or fraction, crop): re-run prepare.
    """
    return _read_checked(Path(params.data.dir), check_prepared(params), split)
