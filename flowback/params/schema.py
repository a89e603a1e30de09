"""The schema of `params.yaml`: one pydantic model per section, every key typed, unknown keys rejected.

Errors name the key by its path (`model.width`, `experiments.rrepa_78.position`). Cross-field rules (an alignment block
beyond the model's blocks, a layer beyond a block's depth, latent mode without a VAE) are checked here too, so a bad
grid stops in a second, not after an hour. Named choices come from the modules that implement them
(flowback/alignment/choices.py, flowback/models/choices.py, the family registry).

Numbering convention (the paper's): blocks are numbered 1..N in the forward (density) direction, x -> block 1 -> ...
-> block N -> z; generation runs N -> 1, so "7&8" of an 8-block model are the first blocks applied to z.
Layers are numbered 1..L inside a block; "layer l" is the residual stream after the l-th transformer layer.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..alignment.choices import ENCODER_OBJECTIVES, POSITION_REDUCE, REVERSE_GRADS, STRATEGIES, TARGET_GRIDS
from ..errors import ParamsError
from ..families import FAMILIES
from ..models.choices import (COND_BLOCKS, JACOBI_INITS, MLPS, NULL_CLASSES, POS_EMBEDS, ROPE_LAYOUTS, ROPE_ORDERS,
                              SCALES, SEQ_ORDERS, SOLVERS)

if TYPE_CHECKING:
    from .grid import Experiment

# Seeds go to torch.Generator.manual_seed and numpy, and are mixed with step numbers: non-negative and 31-bit.
Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="a non-negative 31-bit integer")]

def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin is Annotated:
        return _takes_bool(get_args(annotation)[0])
    if origin is Union or str(origin) == "<class 'types.UnionType'>":
        return any(_takes_bool(a) for a in get_args(annotation))
    return origin is dict  # free-form mappings (encoder.kwargs, overrides) take anything


def _has_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value))


class Strict(BaseModel):
    """Unknown keys are errors; YAML's true/false is never read as the number 1/0."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name)
        if field is not None and _has_bool(v) and not _takes_bool(field.annotation):
            raise ValueError(f"expected {_kind(field.annotation)}, got the boolean {str(v).lower()}")
        return v


def _kind(annotation: Any) -> str:
    text = str(annotation)
    if "int" in text or "float" in text:
        return "a number"
    return "a value of type " + text.replace("typing.", "")



class DataParams(Strict):
    """Where the training data comes from and how it is turned into shards (`python -m flowback stage prepare`).

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
    seed: Seed = 0


class EncoderTrainSpec(TrainSpec):
    """How the default profile's alignment encoder is trained: with the labels (supervised), or without (simclr:
    contrastive views of each image, flowback/alignment/pretrain.py), so its features are more than a class label."""

    objective: Literal[ENCODER_OBJECTIVES] = "supervised"
    temperature: float = Field(0.1, gt=0, description="simclr: the NT-Xent temperature")


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
    train: EncoderTrainSpec | None = None
    hub: str | None = Field(None, description="timm name to fetch into dir, e.g. vit_base_patch14_dinov2.lvd142m")


class ProbeParams(Strict):
    """Linear probes on the flow's frozen hidden states (flowback/metrics/probe.py): which layers decode the class,
    beside the training-free classifier (the paper's claim that they match). Fit on the train split, scored on val."""

    enabled: bool = True
    layers: str = Field("every", description="every = every layer of every block; or a position ('all', '7&8', "
                                             "'7&8 layer 3') in align's numbering")
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the logistic regression")
    max_iter: int = Field(1000, ge=1)
    max_train: int | None = Field(None, ge=10, description="fit on a fixed random subset of this many train images "
                                                           "(memory: images x width floats per layer)")
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    select_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of the (subset of the) train split held "
                                                                    "out to choose the best layer; val only reports")
    seed: Seed = 0


class CalibrationParams(Strict):
    """Real images scored like samples, and the split-half FID floor (the calibrate stage)."""

    enabled: bool = False
    split: Literal["train", "val"] = Field("val", description="the real images scored as samples (val: held out)")
    halves: int = Field(4, ge=1, description="random halvings of the reference split for the FID floor")
    seed: Seed = 0


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
    isc_splits: int = Field(10, ge=1, description="IS over this many equal splits of the samples (torch-fidelity)")
    isc_split_size: int | None = Field(
        None, ge=1, description="IS over splits of this many samples instead (ADM's evaluator: 5000); the sample "
                                "count must be a multiple; replaces isc_splits for the runs' samples")
    prc_neighborhood: int = Field(3, ge=1)
    batch_size: int = Field(256, ge=1)
    classifier_split: Literal["train", "val"] = "val"
    exhaustive_classifier: bool = Field(
        False, description="also score argmax_k log p(x|k) (K forward passes per image: the digits' 10 classes, not "
                           "ImageNet's 1000), beside the one-step training-free classifier")
    classifier_batch_size: int | Literal["auto"] = Field(
        128, description="images per backward pass of the training-free classifier; auto = the memory plan's choice")
    probe: ProbeParams = ProbeParams()
    calibration: CalibrationParams = CalibrationParams()


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
    pos_embed: Literal[POS_EMBEDS] = Field(
        "learned", description="learned or sincos embeddings added to the tokens, or rope: STARFlow's 2-D rotary "
                               "positions in attention")
    cond_blocks: Literal[COND_BLOCKS] = Field("all", description="deep: only block N (nearest z) is conditioned")
    # STARFlow's architecture options (apple/ml-starflow); all off = TARFlow, bit-compatible with ml-tarflow
    start_token: bool = Field(False, description="a learned start token, so token 0 is transformed too")
    final_norm: bool = Field(False, description="RMSNorm before each block's output projection")
    scale: Literal[SCALES] = Field("exp", description="exp: x' = (x - b) exp(-a) (TARFlow); softplus: "
                                                                  "sigma = softplus(a + log(e - 1)) (STARFlow)")
    soft_clip: float = Field(0.0, ge=0.0, description="raw outputs become c * tanh(o / c) (STARFlow: 4); 0 = off")
    cond_token: bool = Field(False, description="condition by one prepended class token instead of adding the "
                                                "class embedding to every token")
    mlp: Literal[MLPS] = Field(
        "gelu", description="feed-forward: gelu (TARFlow), swiglu (SiLU-gated) or geglu (tanh-GELU-gated, what "
                            "ml-starflow's use_swiglu computes); hidden size width x mlp_ratio for all three")
    seq_order: Literal[SEQ_ORDERS] = Field(
        "R2L", description="which blocks reverse the token order: R2L = blocks 2, 4, ... (TARFlow, ml-starflow's "
                           "default); L2R = blocks 1, 3, ... (ml-starflow's published config)")
    rope_layout: Literal[ROPE_LAYOUTS] = Field(
        "2d", description="pos_embed rope: 2d = rows and columns share every rotary pair; 3d = ml-starflow's layout "
                          "with a class/text token: 8 pairs per head kept for that third axis (still for image tokens)")
    rope_order: Literal[ROPE_ORDERS] = Field(
        "spatial", description="pos_embed rope in flipped blocks: a token turns by its own spatial position's angles "
                               "(spatial) or by those of its processing position (sequence, ml-starflow)")
    null_class: Literal[NULL_CLASSES] = Field(
        "mean", description="the dropped-label / unconditional class embedding: the mean of the class embeddings "
                            "(ml-tarflow) or a learned null class, id K (ml-starflow)")
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
        """The YAML's own form; what the architecture allows is FlowConfig's to say (Params._model_builds)."""
        if isinstance(self.layers, list) and len(self.layers) != self.blocks:
            raise ValueError(f"layers lists {len(self.layers)} blocks but blocks = {self.blocks}")
        return self

    def layers_per_block(self) -> list[int]:
        return [self.layers] * self.blocks if isinstance(self.layers, int) else list(self.layers)


# -------------------------------------------------------------------------------------------------------- runtime
class RuntimeParams(Strict):
    """Where and how the numbers are computed: the same values give the same numbers under either engine.

    dvc and snakemake both start stages with these settings (snakemake's `threads:` is `threads`, nothing is taken
    from the environment), so one machine gives bit-identical results whichever engine runs a stage.
    """

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when present, else cpu")
    threads: int = Field(1, ge=0, description="torch CPU threads per process; 0 = torch's default (all cores)")
    tf32: bool = Field(True, description="TF32 tensor cores for float32 matmuls and convolutions on GPUs")
    launcher: str = Field("python", min_length=1, description="how dvc/snakemake start train and sample: python, "
                                                             "or torchrun --standalone --nproc_per_node 8 for DDP")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="the memory plan's budget per GPU (flowback plan); null = no plan (CPU runs)")


# ---------------------------------------------------------------------------------------------------------- train
class TrainParams(Strict):
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch, split over the torchrun ranks")
    micro_batch: int | Literal["auto"] | None = Field(
        None, description="images per forward/backward on one rank; the rest of its share of the batch is gradient "
                          "accumulation. null = the whole share at once; auto = the largest the memory plan fits in "
                          "runtime.gpu_memory_gib")
    checkpointing: Literal["none", "layers", "auto"] = Field(
        "none", description="activation checkpointing of every transformer layer (non-reentrant); auto = only when the "
                            "memory plan needs it")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="0 disables EMA")
    latent_norm_weight: float = Field(0.0, ge=0.0, description="STARFlow's latent-norm regulariser on the "
                                                               "intermediate block outputs (1e-4 there); 0 = off")
    latent_norm_form: Literal["mean", "starflow"] = Field(
        "mean", description="mean: weight x the mean over blocks 1..N-1 of mean(z^2); starflow: weight x the sum of "
                            "mean(z^2) over the flow's input and blocks 1..N-1 (ml-starflow train.py)")
    checkpoint_every: int = Field(100, ge=1)
    milestones: list[int] = Field(default_factory=list, description="steps (< steps) at which the model is also "
                                  "saved, to milestones/step_<N>.pt: what `milestone:` experiments sample and score")
    log_every: int = Field(10, ge=1)
    val_every: int = Field(0, ge=0, description="validation NLL (bits/dim, the log's val_bpd) every N steps and at the "
                                               "last, on val_images fixed images of the held-out val split; a "
                                               "multiple of log_every (it is a column of the log). 0 = off")
    val_images: int = Field(256, ge=1, description="the validation subset: the first N of a seeded permutation of the "
                                                   "val split (all of it when smaller), with fixed noise")
    seed: Seed = 0
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="bfloat16: autocast (GPU training)")
    compile: bool = Field(False, description="wrap the training objective in torch.compile")
    workers: int = Field(4, ge=0, description="streamed data (ImageNet): loader worker processes per rank")
    shuffle_buffer: int = Field(1000, ge=0, description="streamed data: samples in each worker's shuffle buffer")
    flip: bool = Field(True, description="streamed data: random horizontal flips (TARFlow's augmentation)")

    @model_validator(mode="after")
    def _micro_batch_divides(self) -> "TrainParams":
        if isinstance(self.micro_batch, int) and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, 'auto' or null (got {self.micro_batch})")
        bad = [m for m in self.milestones if not 1 <= m < self.steps]
        if bad:
            raise ValueError(f"milestones {bad} are not between 1 and steps - 1 ({self.steps - 1}); the last step's "
                             f"model is model.pt")
        if len(set(self.milestones)) != len(self.milestones):
            raise ValueError(f"milestones {self.milestones} repeat a step")
        if self.val_every % self.log_every:
            raise ValueError(f"val_every {self.val_every} is not a multiple of log_every {self.log_every} (validation "
                             f"is a column of the log)")
        return self


class AlignParams(Strict):
    """The alignment term and every choice the paper leaves open (docs/reverse-gradient.md, docs/alignment.md)."""

    weight: float = Field(0.5, ge=0, description="lambda in NLL + lambda * alignment")
    projector_dim: int = Field(256, ge=8)
    reverse_grad: Literal[REVERSE_GRADS] = Field(
        "paper", description="which dependences the reverse strategy's gradient keeps: paper = the pseudo-reverse "
                             "(forward context, one parallel pass); exact = the true inverse's gradient (implicit "
                             "adjoint); newest = through each token's own inverse step only")
    reverse_tol: float = Field(1e-5, ge=0.0, description="exact/newest: adjoint sweeps stop at this relative change "
                                                        "(0: when it stops changing)")
    layer_base: Literal[0, 1] = Field(1, description="'layer N' in a position counts layers from 1 (after the Nth "
                                                     "layer) or from 0")
    default_layer: Literal["last"] | int = Field(
        "last", description="the layer a position without one means: the block's last, or a number in layer_base")
    target_grid: Literal[TARGET_GRIDS] = Field(
        "upsample", description="how encoder patches meet flow tokens: upsample the encoder grid, pool the flow "
                                "tokens onto it, or run the encoder at flow grid x its patch (DINOv2 at 448 px)")
    position_reduce: Literal[POSITION_REDUCE] = Field("mean", description="the alignment term over several positions")

    @field_validator("default_layer", mode="before")
    @classmethod
    def _layer_number(cls, v):
        if v != "last" and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError("must be 'last' or a layer number >= 0")
        return v


# --------------------------------------------------------------------------------------------------------- sample
class GuidanceParams(Strict):
    method: Literal["none", "tarflow", "starflow"] = "none"
    weight: float = Field(0.0, ge=0.0)
    anneal: bool = Field(False, description="TARFlow's linear ramp of the weight over tokens")
    guide_what: Literal["a", "b", "ab"] = Field("ab", description="which affine parameters guidance extrapolates "
                                                                  "(ml-tarflow's guide_what)")
    attn_temp: float = Field(1.0, gt=0.0, description="attention temperature of the unconditional pass")
    blocks: Literal["auto", "all", "deep"] = Field(
        "auto", description="which conditioned blocks are guided: auto = every one for tarflow, the deep block for "
                            "starflow; all = every conditioned block (ml-starflow)")
    attn_temp_on: Literal["uncond", "all"] = Field(
        "uncond", description="where attn_temp divides the attention logits: the unconditional pass (ml-tarflow) or "
                              "every sampling pass, both guided halves and unguided blocks (ml-starflow)")

    @model_validator(mode="after")
    def _weight_needs_method(self) -> "GuidanceParams":
        if self.method == "none" and self.weight != 0:
            raise ValueError("weight > 0 needs method tarflow or starflow")
        return self


class JacobiParams(Strict):
    """Parallel (Jacobi / GS-Jacobi) inversion of each block; a block that does not converge within max_iters passes
    finishes token by token (and is counted in sample.json)."""

    tol: float = Field(1e-4, gt=0.0, description="a segment has converged when no token moves more than this")
    max_iters: int | list[int] = Field(64, description="passes per segment (one value, or one per block in forward "
                                                       "order) before the sequential fallback")
    segments: int | list[int] = Field(1, description="gs_jacobi: Gauss-Seidel segments per block")
    window: int | list[int] = Field(0, description="gs_jacobi: > 0 = a sliding window of this many tokens")
    init: Literal[JACOBI_INITS] | list[Literal[JACOBI_INITS]] = Field(
        "noise", description="first iterate: noise (u = v) or zeros")


class SampleParams(Strict):
    per_class: int = Field(100, ge=1, description="samples per run = per_class x classes (unless count is set)")
    count: int | None = Field(None, ge=1, description="samples per run, when not per_class x classes (the paper's "
                                                      "FID-4096: 4096, with labels random); null = per_class x "
                                                      "classes")
    labels: Literal["balanced", "random"] = Field(
        "balanced", description="balanced: exactly per_class of each class; random: classes drawn uniformly (seeded "
                                "by sample.seed), as ADM's and ml-tarflow's samplers do")
    batch_size: int = Field(500, ge=1, description="images per chunk file (the unit of resume and of torchrun sharding)")
    micro_batch: int | Literal["auto"] | None = Field(
        None, description="images per reverse pass and per denoising gradient inside a chunk; null = the whole chunk; "
                          "auto = the largest the memory plan fits")
    guidance: GuidanceParams = GuidanceParams()
    denoise: bool = True
    denoise_scale: float = Field(1.0, gt=0.0, description="x + m * sigma^2 * score: m (ml-tarflow's multiplier)")
    seed: Seed = 1
    kv_cache: bool = True
    solver: Literal[SOLVERS] = Field(
        "sequential", description="sequential: token by token (KV-cached); jacobi / gs_jacobi: parallel fixed-point "
                                  "iterations (sample.jacobi)")
    jacobi: JacobiParams = JacobiParams()
    max_redraws: int = Field(0, ge=0, description="redraw a sample that comes out NaN/inf up to this many times, then "
                                                  "stop with an error naming the chunk; 0 = never redraw")
    dtype: Literal["float32", "bfloat16"] = "float32"


class SweepParams(Strict):
    """The paper's evaluation protocol (R-REPA sec. 5, Figure 5 left): each model is sampled at a grid of classifier-free
    guidance scales, scored by FID at each, and its reported row is drawn at the best one. The sweep's own samples use
    their own seed, so the scale is chosen on other noise than the row is scored on."""

    scales: list[float] = Field(default_factory=list, description="guidance weights to try (0 = unguided; each needs "
                                                                  "sample.guidance.method); empty = no sweep: samples "
                                                                  "use sample.guidance.weight")
    count: int | None = Field(None, ge=1, description="samples per scale; null = the sample stage's count")
    seed: Seed = Field(2, description="the sweep's noise (not sample.seed: the reported samples are fresh)")

    @field_validator("scales")
    @classmethod
    def _distinct_non_negative(cls, v: list[float]) -> list[float]:
        if any(w < 0 for w in v) or len(set(v)) != len(v):
            raise ValueError(f"scales {v} must be distinct and >= 0")
        return v


class CurveParams(Strict):
    """FID over training (R-REPA Figure 5 right, its "3.3x faster" claim): each run's models saved at train.milestones
    and its final one, sampled at one guidance scale and scored. One stage per run: sampling and metrics only."""

    enabled: bool = False
    count: int | None = Field(None, ge=1, description="samples per milestone; null = the sample stage's count")
    seed: Seed = Field(3, description="the curve's noise")
    scale: float | Literal["best"] = Field(
        "best", description="the guidance weight of every point: a number, or best = the run's sweep choice (its "
                            "final model's best scale, or sample.guidance.weight without a sweep)")


# -------------------------------------------------------------------------------------------------------- decoder
class DecoderParams(Strict):
    """STARFlow's alternative to score denoising (latent profiles): fine-tune the VAE decoder to decode noisy latents
    (flowback/models/decoder_finetune.py, values and sources in docs/decoder-finetune.md). When enabled, the `decoder`
    stage runs after prepare, and sampling decodes with the fine-tuned VAE instead of taking the denoising step."""

    enabled: bool = False
    dir: str = Field("results/decoder", description="where the fine-tuned VAE is saved (diffusers format)")
    steps: int = Field(10_000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    warmup_steps: int = Field(1000, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    noise_std: float | None = Field(None, ge=0, description="null = model.noise_std (the flow's training noise)")
    mse_weight: float = Field(1.0, ge=0)
    lpips_weight: float = Field(1.0, ge=0)
    convnext_weight: float = Field(0.1, ge=0)
    gan_weight: float = Field(0.1, ge=0, description="0 = no discriminator")
    lecam_weight: float = Field(0.001, ge=0)
    disc_width: int = Field(128, ge=8)
    checkpoint_every: int = Field(500, ge=1)
    seed: Seed = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    weights_dir: str | None = Field(None, description="VGG16 / ConvNeXt-S ImageNet weights for the perceptual loss; "
                                                      "null = torch.hub's checkpoint folder")


# ------------------------------------------------------------------------------------------- adversarial flows
class AFNetParams(Strict):
    patch_size: int = Field(4, ge=1)
    width: int = Field(64, ge=8)
    depth: int = Field(4, ge=1)
    head_dim: int = Field(16, ge=4)
    mlp_ratio: int = Field(2, ge=1)


class AFDiscriminatorParams(Strict):
    width: int | None = Field(None, ge=8, description="null = the generator's")
    depth: int | None = Field(None, ge=1, description="null = the generator's")


class AFOTParams(Strict):
    start: float = Field(0.2, ge=0, description="weight of the optimal-transport term at step 0")
    end: float = Field(0.005, ge=0, description="... after the cosine decay")
    decay_steps: int | None = Field(None, ge=1, description="null = af.train.steps")


class AFTrainParams(Strict):
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch, split over the torchrun ranks")
    lr_g: float = Field(1e-4, gt=0)
    lr_d: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.0, 0.9)
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    grad_clip: float = Field(50.0, ge=0, description="0 = none")
    ot: AFOTParams = AFOTParams()
    gp_weight: float = Field(0.25, ge=0, description="finite-difference R1/R2 weight")
    gp_fraction: float = Field(0.25, gt=0, le=1)
    gp_eps: float = Field(0.01, gt=0)
    cp_weight: float = Field(0.01, ge=0, description="logit centering")
    grad_norm: bool = Field(True, description="normalise D's gradient into G (the paper's gradient normalisation)")
    grad_norm_decay: float = Field(0.9, ge=0, lt=1)
    min_gap: float = Field(0.001, ge=0)
    update: Literal["joint", "alternate"] = Field(
        "joint", description="joint: a step's D and G updates share its batch; alternate: each takes its own (the "
                             "reference code's order; two batches per step)")
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(50, ge=1)


class AFParams(Strict):
    """Adversarial Flow Models (arXiv 2511.22475): a one-step generator trained adversarially with an optimal-transport
    term (flowback/models/af.py, docs/af-recipe.md); read by experiments with `family: af`."""

    generator: AFNetParams = AFNetParams()
    discriminator: AFDiscriminatorParams = AFDiscriminatorParams()
    nfe: int = Field(1, ge=1, description="network evaluations per sample the generator is trained for")
    any_step: bool = False
    pred: Literal["x", "v"] = "x"
    repeat: int = Field(1, ge=1, description="depth repetition: the blocks run this many times in one evaluation")
    train: AFTrainParams = AFTrainParams()


# ---------------------------------------------------------------------------------------------------- experiments
class MilestoneRef(Strict):
    of: str = Field(description="the experiment whose training this reads: `step` is in its train.milestones, or is "
                                "its last step (its model.pt: the same model sampled another way, e.g. guided)")
    step: int = Field(ge=1)


MILESTONE_OVERRIDABLE = ("sample", "sweep", "curve", "metrics", "runtime")  # what a milestone run may change: not the training


class ExperimentParams(Strict):
    family: Literal[FAMILIES] = Field("tarflow", description="the model family (flowback/families/): tarflow = "
                                                             "TARFlow / STARFlow, af = an adversarial flow")
    strategy: Literal[("none", *STRATEGIES)] = "none"
    position: str | None = None
    seeds: list[Seed] | None = Field(None, min_length=1,
                                     description="training seeds, one run each (default: [train.seed])")
    overrides: dict[str, Any] = Field(default_factory=dict, description="deep-merged over the top-level params")
    paper: str | list[str] | None = Field(
        None, description="the paper's row this reproduces, e.g. ablation/reverse_78, or several (the paper reports "
                          "some runs in two tables)")
    milestone: MilestoneRef | None = Field(
        None, description="no training of its own: sample and score experiment `of`'s model saved at `step` (e.g. "
                          "the 400K rows read from the 1M runs); strategy, position, family and seeds are of's")

    @field_validator("paper")
    @classmethod
    def _known_row(cls, v: str | list[str] | None) -> str | list[str] | None:
        from ..paper import row  # pipeline: validation only

        for key in [v] if isinstance(v, str) else v or []:
            try:
                row(key)
            except KeyError as e:
                raise ValueError(e.args[0]) from None
        return v

    @property
    def paper_rows(self) -> list[str]:
        return [self.paper] if isinstance(self.paper, str) else list(self.paper or [])

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds {v} repeat a seed")
        return v

    @model_validator(mode="after")
    def _family_rules(self) -> "ExperimentParams":
        """What the family itself forbids (an adversarial flow takes no alignment strategy, ...)."""
        from ..families import family

        family(self.family).check_experiment(self)
        return self

    @model_validator(mode="after")
    def _milestone_inherits(self) -> "ExperimentParams":
        if self.milestone is not None:
            own = [k for k in ("family", "strategy", "position", "seeds")
                   if getattr(self, k) != type(self).model_fields[k].default]
            if own:
                raise ValueError(f"{own[0]}: a milestone experiment takes its {', '.join(own)} from experiments."
                                 f"{self.milestone.of}")
            bad = [k for k in self.overrides if k not in MILESTONE_OVERRIDABLE]
            if bad:
                raise ValueError(f"overrides.{bad[0]}: a milestone experiment reads a trained model; it may override "
                                 f"only {', '.join(MILESTONE_OVERRIDABLE)}")
        return self

    @model_validator(mode="after")
    def _position_needs_strategy(self) -> "ExperimentParams":
        if self.strategy == "none" and self.position is not None:
            raise ValueError("strategy 'none' (the baseline) takes no position")
        if self.strategy != "none" and self.position is None:
            raise ValueError(f"strategy {self.strategy!r} needs a position ('all', '7&8', '7&8 layer 6', ...)")
        return self


class Params(Strict):
    seed: Seed = 0
    data: DataParams = DataParams()
    encoder: EncoderParams = EncoderParams()
    metrics: MetricParams = MetricParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    align: AlignParams = AlignParams()
    sample: SampleParams = SampleParams()
    sweep: SweepParams = SweepParams()
    curve: CurveParams = CurveParams()
    decoder: DecoderParams = DecoderParams()
    af: AFParams = AFParams()
    runtime: RuntimeParams = RuntimeParams()
    results: str = "results"
    experiments: dict[str, ExperimentParams] = Field(default_factory=lambda: {"baseline": ExperimentParams()})

    @field_validator("experiments")
    @classmethod
    def _names(cls, v: dict[str, ExperimentParams]) -> dict[str, ExperimentParams]:
        if not v:
            raise ValueError("define at least one experiment")
        for name in v:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
                raise ValueError(f"experiment name {name!r}: use lower-case letters, digits, '_' and '-'")
        for name, e in v.items():
            if e.milestone is not None:
                source = v.get(e.milestone.of)
                if source is None or source.milestone is not None:
                    raise ValueError(f"{name}.milestone.of: {e.milestone.of!r} is not an experiment that trains")
        return v

    @model_validator(mode="after")
    def _image_fits_patches(self) -> "Params":
        if self.data.format == "latent" and self.model.latent is None:
            raise ValueError("data.format 'latent' needs model.latent (the VAE that encodes the images)")
        if self.decoder.enabled and (self.data.format != "latent" or not self.data.keep_pixels):
            raise ValueError("decoder.enabled fine-tunes a VAE decoder on latent shards with their pixels: it needs "
                             "data.format latent and data.keep_pixels true")
        from ..builders import flow_config  # pipeline: validation only

        try:  # the architecture's rules live once, in FlowConfig: a bad combination is an error here, not at build
            flow_config(self)
        except ValueError as e:
            raise ValueError(f"model: {e}") from None
        split = self.metrics.isc_split_size
        for key, n in (("sample", self.samples_per_run), ("sweep.count", self.sweep.count or self.samples_per_run),
                       ("curve.count", self.curve.count or self.samples_per_run)):
            if split is not None and n % split:
                raise ValueError(f"metrics.isc_split_size {split} does not divide the {n} samples of {key}")
        if self.sweep.scales and self.sample.guidance.method == "none":
            raise ValueError("sweep.scales needs sample.guidance.method (tarflow or starflow): it sets its weight")
        return self

    @property
    def samples_per_run(self) -> int:
        """What the sample stage draws: sample.count, or per_class of each class."""
        return self.sample.count or self.sample.per_class * self.data.num_classes

    @property
    def results_dir(self) -> Path:
        return Path(self.results)

    def trained_as(self, name: str) -> ExperimentParams:
        """The registry entry that says how `name`'s model was trained: its own, or its milestone source's."""
        e = self.experiments[name]
        return self.experiments[e.milestone.of] if e.milestone is not None else e

    def seeds(self, name: str) -> list[int]:
        e = self.experiments[name]
        if e.milestone is not None:
            return self.seeds(e.milestone.of)
        return list(e.seeds or [self.train.seed])

    def runs(self) -> list[str]:
        """Every run of the grid: one per experiment and training seed, named `<experiment>-s<seed>`."""
        from .grid import run_id

        return [run_id(name, seed) for name in self.experiments for seed in self.seeds(name)]

    def run_dir(self, run: str) -> Path:
        return Path(self.results) / "runs" / run

    def resolve_run(self, text: str) -> str:
        """A run id from `<experiment>-s<seed>`, or from an experiment's name when it has a single seed."""
        from .grid import run_id

        if text in self.experiments:
            seeds = self.seeds(text)
            if len(seeds) == 1:
                return run_id(text, seeds[0])
            raise ParamsError(f"experiments.{text}: has seeds {seeds}; name one run: "
                              f"{', '.join(run_id(text, s) for s in seeds)}")
        return text

    def run(self, run: str) -> "Experiment":
        """The fully merged, validated configuration of one run (`<experiment>-s<seed>`) of the grid."""
        from .grid import experiment, split_run_id

        name, seed = split_run_id(run)
        if name not in self.experiments or seed not in self.seeds(name):
            raise ParamsError(f"experiments: no run named {run!r}; runs are <experiment>-s<seed>: "
                              f"{', '.join(self.runs())}")
        return experiment(self, name, seed)


