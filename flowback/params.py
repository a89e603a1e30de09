"""The one schema for `params.yaml`, validated before any stage does work.

Every key is typed; unknown keys are rejected; errors name the key by its path (`model.width`,
`experiments.rrepa_78.position`). Cross-field rules (an alignment block beyond the model's blocks, a layer beyond a
block's depth, latent mode without a VAE) are checked here too, so a bad grid stops in a second, not after an hour.

Numbering convention (the paper's): blocks are numbered 1..N in the forward (density) direction, x -> block 1 -> ...
-> block N -> z; generation runs N -> 1, so "7&8" of an 8-block model are the first blocks applied to z.
Layers are numbered 1..L inside a block; "layer l" is the residual stream after the l-th transformer layer.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import FlowBackError


class ParamsError(FlowBackError, ValueError):
    """params.yaml is invalid; the message names every offending key by its path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)


# ----------------------------------------------------------------------------------------------------------- data
class DataParams(Strict):
    """Where the training data comes from and how it is turned into shards (`python -m stages.prepare`).

    digits: scikit-learn's 8x8 digits, shipped in the package (the embedded default), split by `val_fraction`.
    imagenet: ImageNet-1k from `source` (a folder with train/ and val/ holding one folder of JPEGs per class, or the
    official ILSVRC2012 tar files; see flowback/data/sources.py), with its official train/val split.
    """

    dataset: Literal["digits", "imagenet"] = "digits"
    root: str = "results/data"
    source: str | None = Field(None, description="imagenet: the ImageNet folder or the directory of its tar files")
    image_size: int = Field(16, ge=8, le=1024)
    resize: Literal["tarflow", "adm"] = Field(
        "tarflow", description="imagenet: tarflow = shorter side to image_size (bilinear) + centre crop, as "
                               "TARFlow's loader; adm = ADM's box-then-bicubic centre crop")
    format: Literal["png", "latent"] = Field("png", description="latent: VAE latents (needs model.latent)")
    classes: int | None = Field(None, ge=2, description="imagenet: classes in the source (default 1000)")
    max_per_class: int | None = Field(None, ge=1, description="imagenet: keep the first N images of each class")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="digits only: share of each class held out")
    shard_size: int = Field(512, ge=1)
    workers: int = Field(0, ge=0, description="processes decoding images; 0 = every core this process may use "
                                              "(its CPU affinity, e.g. what SLURM gave the job), 1 = this process only")
    skip_undecodable: bool = Field(False, description="skip (and count) source images that do not decode")
    encode_batch_size: int = Field(64, ge=1, description="latent: images per VAE forward pass")
    keep_pixels: bool = Field(True, description="latent: also store the crop as PNG (the alignment encoder's input)")

    @model_validator(mode="after")
    def _dataset_keys(self) -> "DataParams":
        if self.dataset == "imagenet" and not self.source:
            raise ValueError("dataset 'imagenet' needs data.source (the ImageNet folder or its tar files)")
        if self.dataset == "digits":
            extra = [k for k in ("source", "classes", "max_per_class") if getattr(self, k) is not None]
            if extra or self.format != "png":
                raise ValueError(f"dataset 'digits' takes no {', '.join(extra) or 'format other than png'}")
        return self

    @property
    def channels(self) -> int:
        return {"digits": 1, "imagenet": 3}[self.dataset]

    @property
    def num_classes(self) -> int:
        return self.classes or {"digits": 10, "imagenet": 1000}[self.dataset]

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.dataset


# ------------------------------------------------------------------------------------------------------- networks
class TrainSpec(Strict):
    """How a small helper network (the default profile's frozen encoder or metric network) is trained locally."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    seed: int = 0


class EncoderParams(Strict):
    """The frozen vision encoder whose patch features flow features are aligned to (DINOv2 in the paper).

    `dir` holds `config.json` (timm arch + kwargs + preprocessing) and `model.safetensors`. In the default profile
    the `encoder` stage trains it on the embedded data (`train` is set); in the paper profiles `flowback weights
    fetch` fills it from the hub and `train` is null.
    """

    dir: str = "results/encoders/align"
    arch: str = "vit_tiny_patch16_224"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: int = Field(16, ge=8)
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    train: TrainSpec | None = None
    hub: str | None = Field(None, description="timm name to fetch into dir, e.g. vit_base_patch14_dinov2.lvd142m")


class MetricParams(Strict):
    """Feature network for FID / sFID / IS / precision-recall, and the reference images (a split or an ADM batch)."""

    network: Literal["digitnet", "inception"] = "digitnet"
    dir: str = "results/encoders/metric"
    train: TrainSpec | None = None
    reference_split: Literal["train", "val"] = "train"
    reference_batch: str | None = Field(
        None, min_length=1, description="an ADM reference batch .npz (e.g. VIRTUAL_imagenet64_labeled.npz): FID/sFID "
                                        "use its mu/sigma/mu_s/sigma_s, precision/recall its arr_0 images; "
                                        "replaces reference_split")
    isc_splits: int = Field(10, ge=1)
    prc_neighborhood: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    classifier_split: Literal["train", "val"] = "val"
    classifier_batch_size: int = Field(128, ge=1)


# ---------------------------------------------------------------------------------------------------------- model
class LatentParams(Strict):
    vae_dir: str
    scale: float = 0.18215
    hub: str = Field("stabilityai/sd-vae-ft-ema", description="diffusers repo `flowback weights fetch` saves to vae_dir")


class ModelParams(Strict):
    patch_size: int = Field(2, ge=1)
    width: int = Field(64, ge=8)
    blocks: int = Field(8, ge=1)
    layers: int | list[int] = Field(6, description="layers per block: one int, or one per block in forward order")
    head_dim: int = Field(16, ge=4)
    mlp_ratio: int = Field(4, ge=1)
    pos_embed: Literal["learned", "sincos"] = "learned"
    cond_blocks: Literal["all", "deep"] = Field("all", description="deep: only block N (nearest z) is conditioned")
    noise_std: float = Field(0.05, ge=0.0)
    label_drop: float = Field(0.1, ge=0.0, le=1.0)
    latent: LatentParams | None = None

    @field_validator("layers")
    @classmethod
    def _positive_layers(cls, v: int | list[int]) -> int | list[int]:
        values = [v] if isinstance(v, int) else v
        if not values or any(n < 1 for n in values):
            raise ValueError("every block needs at least one layer")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> "ModelParams":
        if isinstance(self.layers, list) and len(self.layers) != self.blocks:
            raise ValueError(f"layers lists {len(self.layers)} blocks but blocks = {self.blocks}")
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
        return self

    def layers_per_block(self) -> list[int]:
        return [self.layers] * self.blocks if isinstance(self.layers, int) else list(self.layers)


# ---------------------------------------------------------------------------------------------------------- train
class TrainParams(Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="0 disables EMA")
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16: autocast (GPU training)")
    compile: bool = Field(False, description="wrap the training objective in torch.compile")
    workers: int = Field(4, ge=0, description="streamed data (ImageNet): loader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="streamed data: samples in each worker's shuffle buffer")
    flip: bool = Field(True, description="streamed data: random horizontal flips (TARFlow's augmentation)")


class AlignParams(Strict):
    weight: float = Field(0.5, ge=0, description="lambda in NLL + lambda * alignment")
    projector_dim: int = Field(256, ge=8)


# --------------------------------------------------------------------------------------------------------- sample
class GuidanceParams(Strict):
    method: Literal["none", "tarflow", "starflow"] = "none"
    weight: float = Field(0.0, ge=0.0)
    anneal: bool = Field(False, description="TARFlow's linear ramp of the weight over tokens")

    @model_validator(mode="after")
    def _weight_needs_method(self) -> "GuidanceParams":
        if self.method == "none" and self.weight != 0:
            raise ValueError("weight > 0 needs method tarflow or starflow")
        return self


class SampleParams(Strict):
    per_class: int = Field(100, ge=1)
    batch_size: int = Field(500, ge=1)
    guidance: GuidanceParams = GuidanceParams()
    denoise: bool = True
    seed: int = 1
    kv_cache: bool = True
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"


# ---------------------------------------------------------------------------------------------------- experiments
STRATEGIES = ("none", "forward", "detach", "reverse")
_POSITION = re.compile(r"^\s*(?P<blocks>all|\d+(?:\s*&\s*\d+)*)\s*(?:layer\s*(?P<layer>\d+))?\s*$", re.IGNORECASE)


def parse_position(position: str, layers_per_block: list[int]) -> list[tuple[int, int]]:
    """Paper position string -> [(block, layer)], both 1-indexed; no layer given means each block's last layer.

    "all" | "1&2" | "7&8" | "7&8 layer 6". Raises ValueError naming what is out of range.
    """
    m = _POSITION.match(position)
    if not m:
        raise ValueError(f"cannot parse position {position!r}; expected 'all', '7&8' or '7&8 layer 6'")
    n_blocks = len(layers_per_block)
    if m["blocks"].lower() == "all":
        blocks = list(range(1, n_blocks + 1))
    else:
        blocks = [int(b) for b in m["blocks"].split("&")]
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"position {position!r} repeats a block")
    for b in blocks:
        if not 1 <= b <= n_blocks:
            raise ValueError(f"position {position!r}: block {b} is out of range, the model has blocks 1..{n_blocks}")
    out = []
    for b in blocks:
        depth = layers_per_block[b - 1]
        layer = int(m["layer"]) if m["layer"] else depth
        if not 1 <= layer <= depth:
            raise ValueError(f"position {position!r}: layer {layer} is out of range, block {b} has layers 1..{depth}")
        out.append((b, layer))
    return out


class ExperimentParams(Strict):
    strategy: Literal["none", "forward", "detach", "reverse"] = "none"
    position: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="deep-merged over the top-level params")
    paper: str | None = Field(None, description="the paper's row this reproduces, e.g. ablation/reverse_78")

    @field_validator("paper")
    @classmethod
    def _known_row(cls, v: str | None) -> str | None:
        if v is not None:
            from .paper import row

            try:
                row(v)
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        return v

    @model_validator(mode="after")
    def _position_needs_strategy(self) -> "ExperimentParams":
        if self.strategy == "none" and self.position is not None:
            raise ValueError("strategy 'none' (the baseline) takes no position")
        if self.strategy != "none" and self.position is None:
            raise ValueError(f"strategy {self.strategy!r} needs a position ('all', '7&8', '7&8 layer 6', ...)")
        return self


class Params(Strict):
    seed: int = 0
    data: DataParams = DataParams()
    encoder: EncoderParams = EncoderParams()
    metrics: MetricParams = MetricParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    align: AlignParams = AlignParams()
    sample: SampleParams = SampleParams()
    results: str = "results"
    launcher: str = Field("python", min_length=1, description="how dvc/snakemake start train and sample: python, "
                                                             "or torchrun --standalone --nproc_per_node 8 for DDP")
    experiments: dict[str, ExperimentParams] = Field(default_factory=lambda: {"baseline": ExperimentParams()})

    @field_validator("experiments")
    @classmethod
    def _names(cls, v: dict[str, ExperimentParams]) -> dict[str, ExperimentParams]:
        if not v:
            raise ValueError("define at least one experiment")
        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
                raise ValueError(f"experiment name {name!r}: use lower-case letters, digits, '_' and '-'")
        return v

    @model_validator(mode="after")
    def _image_fits_patches(self) -> "Params":
        if self.data.format == "latent" and self.model.latent is None:
            raise ValueError("data.format 'latent' needs model.latent (the VAE that encodes the images)")
        size = self.data.image_size
        if self.model.latent is None and size % self.model.patch_size:
            raise ValueError(f"data.image_size {size} is not a multiple of model.patch_size {self.model.patch_size}")
        return self

    @property
    def results_dir(self) -> Path:
        return Path(self.results)

    def run_dir(self, experiment: str) -> Path:
        return Path(self.results) / "runs" / experiment

    def experiment(self, name: str) -> "Experiment":
        """The fully merged, validated configuration of one experiment of the registry."""
        if name not in self.experiments:
            raise ParamsError(f"experiments: no experiment named {name!r}; known: {', '.join(self.experiments)}")
        return _experiment(self, name)


class Experiment(BaseModel):
    """One row of the grid: the top-level params with the experiment's overrides applied, and its positions."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    params: Params
    strategy: str
    position: str | None
    positions: list[tuple[int, int]]


def _deep_merge(base: dict, over: dict, path: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in out:
            raise ParamsError(f"{path}.{k}: unknown key (overrides may only change keys that exist)")
        if isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _deep_merge(out[k], v, f"{path}.{k}")
        else:
            out[k] = v
    return out


def _experiment(params: Params, name: str) -> Experiment:
    exp = params.experiments[name]
    base = params.model_dump(mode="python")
    if exp.overrides:
        if "experiments" in exp.overrides:
            raise ParamsError(f"experiments.{name}.overrides.experiments: an experiment cannot override the registry")
        merged = _deep_merge(base, exp.overrides, f"experiments.{name}.overrides")
        merged_params = validate(merged, where=f"experiments.{name}.overrides")
    else:
        merged_params = params
    positions: list[tuple[int, int]] = []
    if exp.position is not None:
        try:
            positions = parse_position(exp.position, merged_params.model.layers_per_block())
        except ValueError as e:
            raise ParamsError(f"experiments.{name}.position: {e}") from None
    return Experiment(name=name, params=merged_params, strategy=exp.strategy, position=exp.position,
                      positions=positions)


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
    """Resolve every experiment (overrides and positions) so a bad row fails now, not when its turn comes."""
    for name in params.experiments:
        params.experiment(name)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    try:
        return validate_all(validate(raw or {}))
    except ParamsError as e:
        raise ParamsError(f"{path}: {e}") from None
