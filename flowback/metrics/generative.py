"""FID, sFID, IS and precision/recall from features, computed the ADM-suite way.

Features come from one pass of a feature network (`extract_features`); any network with a
`features(x_u8) -> {"pool", "logits", "spatial"}` method works (DigitNet in the default profile,
InceptionFeatures from inception.py in the paper profiles).
- FID / sFID: Fréchet distance of float64 Gaussian statistics of "pool" / "spatial" (our `frechet_distance`).
- IS: torch-fidelity's `isc_features_to_metric` on "logits" with shuffle=False, i.e. ADM's in-order splits.
- Precision / recall: torch-fidelity's `prc_features_to_metric` on "pool" with k = `prc_neighborhood` (ADM: 3);
  convention: the first argument is the generated set, the second the reference (real) set.
The reference side can also come from stored statistics (`metrics_from_reference`; reference.py computes and saves
them once per reference, as the ADM suite's reference batches hold them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from ..progress import progress as tqdm

from .digitnet import load_digitnet
from .frechet import frechet_distance, gaussian_stats

FEATURE_KEYS = ("pool", "logits", "spatial")


def load_feature_network(network: str, directory: str | Path) -> nn.Module:
    """The metric network named by `params.metrics.network`, loaded from `directory`."""
    if network == "digitnet":
        return load_digitnet(directory)
    if network == "inception":
        # the paper profiles: torch-fidelity's "inception-v3-compat" from the local file `flowback weights fetch`
        # wrote; pool_3 -> "pool", logits_unbiased -> "logits", Mixed_6d.branch1x1 (TF mixed_6/conv, after BN+ReLU)
        # channels-last, first 7 channels, flattened -> "spatial" (17*17*7 = 2023 dims); see inception.py
        from .inception import load_inception

        return load_inception(directory)
    raise ValueError(f"unknown metric network {network!r}")


@torch.no_grad()
def extract_features(net: nn.Module, images_u8_nchw: np.ndarray | torch.Tensor, batch_size: int,
                     device: str | torch.device = "cpu", show_progress: bool = True) -> dict[str, torch.Tensor]:
    """One pass over uint8 NCHW images -> {"pool", "logits", "spatial"}: float32 CPU tensors, in input order."""
    images = torch.as_tensor(images_u8_nchw)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 NCHW images, got {images.dtype} {tuple(images.shape)}")
    net = net.eval().to(device)
    parts: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=len(images), desc="features", unit="img", disable=not show_progress, leave=False) as bar:
        for i in range(0, len(images), batch_size):
            feats = net.features(images[i:i + batch_size].to(device))
            for k, v in feats.items():
                parts.setdefault(k, []).append(v.float().cpu())
            bar.update(min(batch_size, len(images) - i))
    if not parts:
        raise ValueError("no images to extract features from")
    return {k: torch.cat(v) for k, v in parts.items()}


def _check(feats: dict, name: str, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in feats]
    if missing:
        raise KeyError(f"{name} features lack {missing}; have {sorted(feats)}")


def isc_split_count(n: int, splits: int, split_size: int | None = None) -> int:
    """How many IS splits `n` samples get: `splits` equal ones, or n / split_size (ADM's fixed 5,000-image splits;
    the two agree at 50K samples and 10 splits, not at other counts)."""
    if split_size is None:
        return splits
    if n % split_size:
        raise ValueError(f"metrics.isc_split_size {split_size} does not divide the {n} samples")
    return n // split_size


def generative_metrics(sample_feats: dict, ref_feats: dict, isc_splits: int = 10, prc_neighborhood: int = 3,
                       prc_batch_size: int = 10000) -> dict[str, float]:
    """{"fid", "sfid", "is", "is_std", "precision", "recall"} of samples against the reference set's features."""
    _check(ref_feats, "reference", ("pool", "spatial"))
    mu, sigma = gaussian_stats(ref_feats["pool"])
    mu_s, sigma_s = gaussian_stats(ref_feats["spatial"])
    return metrics_from_reference(sample_feats, mu, sigma, mu_s, sigma_s, ref_feats["pool"], isc_splits=isc_splits,
                                  prc_neighborhood=prc_neighborhood, prc_batch_size=prc_batch_size)


def metrics_from_reference(sample_feats: dict, mu: np.ndarray, sigma: np.ndarray, mu_s: np.ndarray,
                           sigma_s: np.ndarray, ref_pool: np.ndarray | torch.Tensor, isc_splits: int = 10,
                           prc_neighborhood: int = 3, prc_batch_size: int = 10000) -> dict[str, float]:
    """The same metrics against stored reference statistics (reference.py): pool (mu, sigma) for FID, spatial
    (mu_s, sigma_s) for sFID, pool features `ref_pool` for precision/recall - ADM's evaluator takes the first two
    from its reference batch file and computes the last from the batch's images."""
    _check(sample_feats, "sample", FEATURE_KEYS)
    logits = torch.as_tensor(sample_feats["logits"])
    if logits.shape[0] < isc_splits:
        raise ValueError(f"IS needs at least isc_splits={isc_splits} samples, got {logits.shape[0]}")
    fid = frechet_distance(*gaussian_stats(sample_feats["pool"]), mu, sigma)
    sfid = frechet_distance(*gaussian_stats(sample_feats["spatial"]), mu_s, sigma_s)
    isc = isc_features_to_metric(logits, splits=isc_splits, shuffle=False)
    prc = prc_features_to_metric(
        torch.as_tensor(sample_feats["pool"]).float(), torch.as_tensor(ref_pool).float(),
        prc_neighborhood=prc_neighborhood, prc_batch_size=prc_batch_size, save_cpu_ram=True, verbose=False,
    )
    return {
        "fid": float(fid),
        "sfid": float(sfid),
        "is": float(isc[KEY_METRIC_ISC_MEAN]),
        "is_std": float(isc[KEY_METRIC_ISC_STD]),
        "precision": float(prc[KEY_METRIC_PRECISION]),
        "recall": float(prc[KEY_METRIC_RECALL]),
    }


def load_samples(path: str | Path, channels: int, size: int) -> tuple[np.ndarray, np.ndarray | None]:
    """An ADM-format samples .npz -> (uint8 NCHW images, labels or None), checked against the expected shape."""
    from ..data.images import nhwc_to_nchw
    from ..io import FlowBackFileError, load_npz

    data = load_npz(path)
    if "arr_0" not in data:
        raise FlowBackFileError(f"{path}: no arr_0 (ADM format: uint8 NHWC images in arr_0)")
    x = data["arr_0"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, channels):
        raise FlowBackFileError(f"{path}: expected uint8 images of shape (N, {size}, {size}, {channels}), "
                                f"got {x.dtype} {x.shape}")
    labels = data.get("arr_1")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(x)):
        raise FlowBackFileError(f"{path}: arr_1 (labels) has shape {labels.shape}, expected ({len(x)},)")
    # NCHW contiguous, as the reference stage converts its images, so both take the same conv kernels
    return np.ascontiguousarray(nhwc_to_nchw(x)), labels


def conditional_accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    """Classification accuracy score: how often the metric network recognises the class a sample was drawn for."""
    return float((logits.argmax(dim=1).numpy() == np.asarray(labels)).mean())
