"""DigitNet: the default profile's metric feature network, standing in for Inception where it cannot be downloaded.

It plays the Inception roles of the ADM suite at small scale: "pool" (global-average-pooled last conv, FID and
precision/recall), "logits" (a bias-free linear head on "pool", like ADM's pool_3 @ W, for IS) and "spatial" (an
intermediate conv map, channels-last, first k channels, flattened in (h, w, c) order, for sFID).

Convention: DigitNet takes uint8 NCHW images, exactly what FlowBack stores and what torch-fidelity passes to feature
extractors, and maps them to [-1, 1] itself. A directory holds `config.json` and `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from ..data.augment import random_shift
from ..io import FlowBackFileError, save_json, save_network
from ..progress import progress as tqdm

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CONFIG_KEYS = ("channels", "image_size", "num_classes", "spatial_channels")
EXTRACTOR_NAME = "flowback-digitnet"


class DigitNet(nn.Module):
    """uint8 (B, C, S, S) -> class logits; `features` gives the pool / logits / spatial features of the metrics."""

    def __init__(self, channels: int = 1, image_size: int = 16, num_classes: int = 10, spatial_channels: int = 4):
        super().__init__()
        if not 1 <= spatial_channels <= 64:
            raise ValueError(f"spatial_channels must be in 1..64, got {spatial_channels}")
        self.config = dict(channels=channels, image_size=image_size, num_classes=num_classes,
                           spatial_channels=spatial_channels)
        self.conv1 = nn.Conv2d(channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)  # the "spatial" layer
        self.conv3 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.head = nn.Linear(128, num_classes, bias=False)  # bias-free: logits are "unbiased" as ADM's IS uses
        self.num_classes = num_classes  # its logits are the data set's classes: class fidelity (cond_acc) is defined

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"DigitNet takes uint8 images, got {x.dtype}")
        c, s = self.config["channels"], self.config["image_size"]
        if x.dim() != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"DigitNet expects uint8 (B, {c}, {s}, {s}) images, got {tuple(x.shape)}")
        return x.to(self.conv1.weight.dtype) / 127.5 - 1.0

    def _trunk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [-1, 1] -> (spatial map (B, 64, h, w), pooled features (B, 128))."""
        spatial = F.relu(self.conv2(F.relu(self.conv1(x))))
        pool = F.relu(self.conv3(spatial)).mean(dim=(2, 3))
        return spatial, pool

    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        return self.head(self._trunk(self.preprocess(x_u8))[1])

    def features(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"pool": (B, 128), "logits": (B, K), "spatial": (B, h*w*k)}, spatial in (h, w, c) order, first k channels."""
        spatial, pool = self._trunk(self.preprocess(x_u8))
        k = self.config["spatial_channels"]
        spatial = spatial.permute(0, 2, 3, 1)[..., :k].reshape(spatial.shape[0], -1)
        return {"pool": pool, "logits": self.head(pool), "spatial": spatial}


def train_digitnet(images_u8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, steps: int,
                   batch_size: int, lr: float, seed: int, show_progress: bool = True, num_classes: int | None = None,
                   spatial_channels: int = 4) -> DigitNet:
    """Train a DigitNet classifier with Adam on (images, labels); deterministic given `seed` (CPU)."""
    images = torch.as_tensor(np.asarray(images_u8) if not isinstance(images_u8, torch.Tensor) else images_u8)
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"expected uint8 (N, C, S, S) images, got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, images {tuple(images.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitNet(images.shape[1], images.shape[2], num_classes, spatial_channels)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    bar = tqdm(range(steps), desc="digitnet", disable=not show_progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, images.shape[0], (min(batch_size, images.shape[0]),), generator=gen)
        x = random_shift(net.preprocess(images[idx]), gen)
        loss = F.cross_entropy(net.head(net._trunk(x)[1]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


@torch.no_grad()
def accuracy(net: DigitNet, images_u8: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
             batch_size: int = 512) -> float:
    images, labels = torch.as_tensor(images_u8), torch.as_tensor(labels).long()
    net.eval()
    correct = sum(int((net(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                  for i in range(0, len(images), batch_size))
    return correct / max(len(images), 1)


def save_digitnet(net: DigitNet, directory: str | Path) -> None:
    """Write `model.safetensors` and `config.json` into `directory`, each atomically."""
    save_network(directory, net.state_dict(), {"arch": "digitnet", **net.config}, WEIGHTS_FILE)


def load_digitnet(directory: str | Path) -> DigitNet:
    """Load a DigitNet saved by `save_digitnet`; FlowBackFileError naming the directory if anything is off."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise FlowBackFileError(f"{directory}: DigitNet directory not found (train it with `python -m flowback stage metricnet`)")
    cfg_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights):
        if not path.exists():
            raise FlowBackFileError(f"{directory}: no {path.name} (train it with `python -m flowback stage metricnet`)")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = {k: int(raw[k]) for k in CONFIG_KEYS}
        net = DigitNet(**cfg)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise FlowBackFileError(f"{directory}: {CONFIG_FILE} is not a valid DigitNet config ({type(e).__name__}: {e})") from e
    try:
        net.load_state_dict(load_file(str(weights)))
    except Exception as e:  # safetensors raises its own errors on truncation; torch raises RuntimeError on mismatch
        raise FlowBackFileError(f"{directory}: cannot load {WEIGHTS_FILE} ({type(e).__name__}: {e})") from e
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ torch-fidelity
class DigitNetExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor over a saved DigitNet, so `calculate_metrics` can cross-check our numbers."""

    FEATURES = {"pool": "pool", "logits_unbiased": "logits", "spatial": "spatial"}
    DEFAULT_LAYERS = {"fid": "pool", "isc": "logits_unbiased", "prc": "pool", "kid": "pool"}

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{name}: pass feature_extractor_weights_path=<DigitNet directory>")
        self.net = load_digitnet(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return tuple(DigitNetExtractor.FEATURES)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return DigitNetExtractor.DEFAULT_LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError("DigitNetExtractor is not compiled")

    def forward(self, x):
        feats = self.net.features(x)
        return tuple(feats[self.FEATURES[name]] for name in self.features_list)


def register_extractor() -> None:
    """Register "flowback-digitnet" with torch-fidelity once (a re-import or module reload must not fail)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    current = FEATURE_EXTRACTORS_REGISTRY.get(EXTRACTOR_NAME)
    if current is None:
        torch_fidelity.register_feature_extractor(EXTRACTOR_NAME, DigitNetExtractor)
    elif current.__qualname__ == DigitNetExtractor.__qualname__ and current.__module__ == DigitNetExtractor.__module__:
        FEATURE_EXTRACTORS_REGISTRY[EXTRACTOR_NAME] = DigitNetExtractor  # reloaded module: use the fresh class
    else:
        raise RuntimeError(f"torch-fidelity feature extractor {EXTRACTOR_NAME!r} is already taken by {current!r}")


register_extractor()


def train_and_save(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], spec, num_classes: int,
                   directory: str | Path, show_progress: bool = True) -> dict:
    """Train a DigitNet on `train`, save it to `directory` with an accuracy report (metrics.json); returns the report.

    `spec`: steps, batch_size, lr, seed (params' metrics.train)."""
    net = train_digitnet(train[0], train[1], steps=spec.steps, batch_size=spec.batch_size, lr=spec.lr,
                         seed=spec.seed, show_progress=show_progress, num_classes=num_classes)
    save_digitnet(net, directory)
    report = {"train_acc": accuracy(net, *train), "val_acc": accuracy(net, *val), "steps": spec.steps}
    save_json(Path(directory) / "metrics.json", report)
    return report
