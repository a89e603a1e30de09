"""The paper profiles' metric network: ADM-suite Inception-v3 features from torch-fidelity's port, loaded offline.

Why torch-fidelity's network: it is the TensorFlow 2015-12-05 Inception graph that ADM's evaluator (and with it every
reported ImageNet FID/sFID/IS) uses, ported layer for layer (TF1-style bilinear resize to 299, TF pooling patches),
so numbers are comparable to the papers'. Why a local file: evaluation must never download; `flowback weights fetch`
puts torch-fidelity's own weights file (`INCEPTION_FILE`, sha256-checked) into `metrics.dir`, and a missing file is an
error naming that directory.

Why this module loads the file itself: torch-fidelity calls `torch.load(path, weights_only=False)`, which unpickles
arbitrary objects. We load the file with `weights_only=True` (tensors only), re-serialise that plain state dict in
memory and hand torch-fidelity the bytes, so only data we just produced from tensors is ever unpickled.

Features, the same keys as DigitNet's (see generative.py):
- "pool" (2048): pool_3, torch-fidelity's "2048"; FID and precision/recall.
- "logits" (1008): pool_3 @ W without the bias, torch-fidelity's "logits_unbiased"; IS, as ADM's evaluator computes
  softmax(pool_3 @ W).
- "spatial" (2023): ADM's sFID feature, the TF graph's `mixed_6/conv:0` (the 1x1 branch of the mixed_6 block after
  batch norm and ReLU; 17 x 17 x 192) sliced to its first 7 channels and flattened channels-last, (h, w, c) order:
  17 * 17 * 7 = 2023. torch-fidelity does not expose it, so a forward hook reads it from `Mixed_6d.branch1x1`, the
  module its weight converter maps `mixed_6/conv` to (TF mixed, mixed_1, ..., mixed_10 = torch Mixed_5b ... Mixed_7c).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch import nn

from ..frozen import Frozen
from ..io import FlowBackFileError, load_torch

# the file torch-fidelity downloads for "inception-v3-compat"; its name carries the sha256 prefix (torch.hub style)
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"
EXTRACTOR_NAME = "inception-v3-compat"
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # = TF `mixed_6/conv`
SPATIAL_CHANNELS = 7
FEATURE_DIMS = {"pool": 2048, "logits": 1008, "spatial": 17 * 17 * SPATIAL_CHANNELS}
_FETCH_HINT = "run `flowback weights fetch` (on a machine with internet, then copy the directory here)"


def inception_url() -> str:
    """torch-fidelity's own download URL for the weights (the release asset of its GitHub repository)."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def _torch_fidelity_inception(state_dict: dict) -> nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 with `state_dict`, never unpickling anything but our own bytes."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buf = io.BytesIO()
    torch.save(dict(state_dict), buf)  # plain tensors only: the weights_only load guaranteed that
    buf.seek(0)
    return FeatureExtractorInceptionV3(EXTRACTOR_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=buf)


class InceptionFeatures(Frozen):
    """uint8 (B, 3 or 1, H, W) images -> {"pool", "logits", "spatial"}, the ADM suite's Inception features; frozen."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._spatial: torch.Tensor | None = None
        self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)
        self.freeze()  # no batch-norm statistics updates

    def _keep_spatial(self, _module, _inputs, output: torch.Tensor) -> None:
        # first 7 channels, channels-last, flattened (h, w, c): ADM's `spatial[..., :7]` reshaped to (N, -1)
        out = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = out.reshape(out.shape[0], -1).float()

    @torch.no_grad()
    def features(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        if x_u8.dtype != torch.uint8 or x_u8.dim() != 4 or x_u8.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes uint8 (B, 3, H, W) images, got {x_u8.dtype} {tuple(x_u8.shape)}")
        if x_u8.shape[1] == 1:  # grayscale data: replicate to RGB, as converting the image to RGB would
            x_u8 = x_u8.expand(-1, 3, -1, -1)
        self._spatial = None
        try:
            pool, logits = self.net(x_u8)
            spatial = self._spatial
        finally:
            self._spatial = None
        return {"pool": pool, "logits": logits, "spatial": spatial}

    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.features(x_u8)["logits"]


PIPELINE_FILE = "model.safetensors"  # what the metricnet stage writes: the same tensors, no pickle format at all


def save_for_pipeline(directory: str | Path) -> Path:
    """Convert the fetched torch-fidelity file into `directory`/model.safetensors (what every stage then loads).

    The pipeline's metric network is always `{metrics.dir}/model.safetensors`, trained (DigitNet) or converted
    (Inception), so DVC tracks one file either way and evaluation never reads a pickle-format file."""
    from ..io import save_network, sha256_file

    directory = Path(directory)
    return save_network(directory, _load_state(directory / INCEPTION_FILE),
                        {"network": "inception", "converted_from": INCEPTION_FILE,
                         "sha256": sha256_file(directory / INCEPTION_FILE)}, PIPELINE_FILE)


def load_inception(directory: str | Path) -> InceptionFeatures:
    """Inception from `directory`: model.safetensors (written by the metricnet stage) if present, else the fetched
    INCEPTION_FILE loaded with weights_only=True; errors name the directory."""
    directory = Path(directory)
    if (directory / PIPELINE_FILE).exists():
        from safetensors.torch import load_file

        try:
            state = load_file(str(directory / PIPELINE_FILE))
        except Exception as e:
            raise FlowBackFileError(f"{directory / PIPELINE_FILE}: not a safetensors file ({type(e).__name__}: "
                                    f"{e}); re-run `python -m flowback stage metricnet`") from e
        return _build(directory / PIPELINE_FILE, state)
    return _build(directory / INCEPTION_FILE, _load_state(directory / INCEPTION_FILE))


def _load_state(path: Path) -> dict:
    directory = path.parent
    if not path.exists():
        raise FlowBackFileError(f"{directory}: no Inception weights ({INCEPTION_FILE}); {_FETCH_HINT}")
    try:
        state = load_torch(path)  # weights_only=True: tensors only, never arbitrary objects
    except FlowBackFileError as e:
        raise FlowBackFileError(f"{e}; {_FETCH_HINT}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FlowBackFileError(f"{path}: not a state dict of tensors; {_FETCH_HINT}")
    return state


def _build(path: Path, state: dict) -> InceptionFeatures:
    try:
        net = _torch_fidelity_inception(state)
    except Exception as e:  # torch raises RuntimeError on missing / mismatched keys
        raise FlowBackFileError(f"{path}: not torch-fidelity's Inception-v3 weights ({type(e).__name__}: "
                                f"{str(e).splitlines()[0]}); {_FETCH_HINT}") from e
    return InceptionFeatures(net)


def random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict of torch-fidelity's Inception. For tests: the real weights cannot be fetched.

    Convolutions get He-normal weights so activations neither vanish nor explode through the 40-odd layers, which
    keeps the features of a random network informative enough for tests to compare.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random initialisation
            return None

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _Unloaded(EXTRACTOR_NAME, ["2048"], feature_extractor_weights_path=empty)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
