"""Reference-side statistics of the generative metrics, computed once (`python -m flowback stage reference`), read by evaluate.

The ADM evaluation suite compares every sample batch with one fixed *reference batch*: FID and sFID use the
reference's Gaussian statistics (pool and spatial features), precision/recall its pool features. Those do not depend
on the experiment, so FlowBack computes them once per (reference images, metric network, settings) and every
`evaluate` reads them, instead of recomputing the same features once per experiment.

One file, `{metrics.dir}/reference/<name>.npz` (`reference_path`), read with allow_pickle=False:
- `mu`, `sigma` (float64): Gaussian statistics of the "pool" features (FID); `mu_s`, `sigma_s`: of "spatial" (sFID).
- `ref_pool` (float32, N x D): the reference's pool features, for precision/recall (ADM uses the reference batch's
  activations there too).
- `is`, `is_std` (float64 scalars, NaN when N < isc_splits): the reference images' own Inception Score, from the
  network's logits; informational (a ceiling to read sample IS against), not used by the sample metrics.
- `count`, `source` (str), `stats_from` ("features" or "file"), `fingerprint` (JSON str, below).
Beside it `{metrics.dir}/reference.json` (`report_path`) summarises it for `dvc metrics show`.

Two sources of reference images:
- default: the `metrics.reference_split` split of the prepared shards (`<name>` = `<dataset>-<split>`); every
  statistic comes from our network's features of those images, exactly as evaluate computed them before.
- `metrics.reference_batch`: an ADM reference batch (`<name>` = the file's stem), e.g. `VIRTUAL_imagenet64_labeled.npz`
  or `VIRTUAL_imagenet256_labeled.npz` from openai/guided-diffusion's evaluations. Layout, as its
  `evaluations/evaluator.py` reads it: `arr_0` uint8 NHWC images (ADM's `read_activations` opens `arr_0`), and
  precomputed `mu`, `sigma`, `mu_s`, `sigma_s` (`read_statistics`: when the file has `mu` it takes all four from the
  file instead of computing them from the activations). As ADM's evaluator does, FID/sFID use the file's statistics
  (computed by the TF Inception graph), and precision/recall use pool features of `arr_0`, here from our network.

The fingerprint ties the file to what it was computed from: the metric network's weights (sha256 over its state dict
and config), the feature batch size, the source and the sha256 of its content (the split's manifest entry and data
settings, or the batch file). `evaluate` recomputes it and refuses a reference made from anything else.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from ..data.images import nhwc_to_nchw
from ..io import FlowBackFileError, load_npz, save_json, save_npz, sha256_file
from ..params import ParamsError
from .frechet import gaussian_stats
from .reference_files import reference_name, reference_path, report_path  # noqa: F401  (their home is light)
from .generative import extract_features, metrics_from_reference

if TYPE_CHECKING:
    from ..params import Params

FORMAT_VERSION = 1
ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
NPZ_KEYS = ADM_STAT_KEYS + ("ref_pool", "is", "is_std", "count", "source", "stats_from", "fingerprint")
_RERUN = "run `python -m flowback stage reference`"


def reference_source(params: "Params") -> str:
    """What the reference images are: `<dataset>/<split>` (as metrics.json has always said) or the batch's path."""
    mp = params.metrics
    return str(mp.reference_batch) if mp.reference_batch else f"{params.data.dataset}/{mp.reference_split}"


# ---------------------------------------------------------------------------------------------------- fingerprints
def network_fingerprint(net: nn.Module) -> str:
    """sha256 of a feature network: class, `config` (e.g. DigitNet's spatial channels) and every state-dict tensor."""
    h = hashlib.sha256()
    h.update(type(net).__qualname__.encode())
    h.update(json.dumps(getattr(net, "config", None), sort_keys=True, default=str).encode())
    for name, t in sorted(net.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _split_sha256(params: "Params", split: str) -> str:
    """The split's content as the manifest records it (per-shard sha256, counts, skips) and the data settings."""
    from ..data.manifest import load_manifest, prepared_settings

    entry = load_manifest(params.data.dir).split(split, Path(params.data.dir))
    blob = json.dumps({"settings": prepared_settings(params), "split": entry.model_dump(mode="json")}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_fingerprint(params: "Params", net: nn.Module) -> dict:
    """What a reference file must have been computed from to be used with these params and this network."""
    mp = params.metrics
    if mp.reference_batch:
        path = Path(mp.reference_batch)
        if not path.exists():
            raise FlowBackFileError(f"{path}: ADM reference batch not found (metrics.reference_batch)")
        source_sha = sha256_file(path)
    else:
        source_sha = _split_sha256(params, mp.reference_split)
    return {"version": FORMAT_VERSION, "network": mp.network, "network_sha256": network_fingerprint(net),
            "batch_size": mp.batch_size, "source": reference_source(params), "source_sha256": source_sha}


# ---------------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class ReferenceStats:
    """The reference side of FID / sFID / precision-recall (see the module docstring for each field)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    ref_pool: np.ndarray
    inception_score: float
    inception_score_std: float
    count: int
    source: str
    stats_from: str
    fingerprint: dict = field(default_factory=dict)

    def metrics(self, sample_feats: dict, isc_splits: int = 10, prc_neighborhood: int = 3) -> dict[str, float]:
        """{"fid", "sfid", "is", "is_std", "precision", "recall"} of the samples' features against this reference."""
        return metrics_from_reference(sample_feats, self.mu, self.sigma, self.mu_s, self.sigma_s, self.ref_pool,
                                      isc_splits=isc_splits, prc_neighborhood=prc_neighborhood)

    def dims(self) -> dict[str, int]:
        return {"pool": int(self.mu.shape[0]), "spatial": int(self.mu_s.shape[0])}


def _inception_score(logits: torch.Tensor, splits: int) -> tuple[float, float]:
    if logits.shape[0] < max(splits, 2):
        return math.nan, math.nan
    isc = isc_features_to_metric(torch.as_tensor(logits), splits=splits, shuffle=False)
    return float(isc[KEY_METRIC_ISC_MEAN]), float(isc[KEY_METRIC_ISC_STD])


def reference_from_features(feats: dict, isc_splits: int = 10, source: str = "", fingerprint: dict | None = None,
                            file_stats: dict | None = None) -> ReferenceStats:
    """ReferenceStats of extracted features; with `file_stats` (an ADM batch) FID/sFID statistics come from those."""
    missing = [k for k in ("pool", "spatial", "logits") if k not in feats]
    if missing:
        raise KeyError(f"reference features lack {missing}; have {sorted(feats)}")
    pool = torch.as_tensor(feats["pool"]).float().numpy()
    if file_stats is None:
        mu, sigma = gaussian_stats(feats["pool"])
        mu_s, sigma_s = gaussian_stats(feats["spatial"])
        stats_from = "features"
    else:
        mu, sigma, mu_s, sigma_s = (np.asarray(file_stats[k], np.float64) for k in ADM_STAT_KEYS)
        stats_from = "file"
    is_mean, is_std = _inception_score(torch.as_tensor(feats["logits"]), isc_splits)
    return ReferenceStats(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, ref_pool=pool, inception_score=is_mean,
                          inception_score_std=is_std, count=int(pool.shape[0]), source=source, stats_from=stats_from,
                          fingerprint=dict(fingerprint or {}))


def _check_gaussian(path: Path, data: dict, mu_key: str, sigma_key: str) -> None:
    mu, sigma = data[mu_key], data[sigma_key]
    for key, a in ((mu_key, mu), (sigma_key, sigma)):
        if not np.issubdtype(a.dtype, np.floating):
            raise FlowBackFileError(f"{path}: {key} is {a.dtype}, expected a float array")
        if not np.all(np.isfinite(a)):
            raise FlowBackFileError(f"{path}: {key} has non-finite entries")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FlowBackFileError(f"{path}: {mu_key} {mu.shape} and {sigma_key} {sigma.shape} are not a mean (D,) "
                                f"and its covariance (D, D)")


def read_adm_batch(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """An ADM reference batch -> (uint8 NCHW images of `arr_0`, {"mu", "sigma", "mu_s", "sigma_s"}).

    Read with allow_pickle=False; a missing key, wrong dtype or shape is a FlowBackFileError naming the file.
    """
    path = Path(path)
    what = ("expected arr_0: uint8 NHWC images, and mu, sigma, mu_s, sigma_s: their pool and spatial statistics, as "
            "in guided-diffusion's VIRTUAL_*.npz")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise FlowBackFileError(f"{path}: not an ADM reference batch ({path.stat().st_size} bytes that are not an "
                                f".npz; {what})")
    data = load_npz(path)
    missing = [k for k in ("arr_0",) + ADM_STAT_KEYS if k not in data]
    if missing:
        raise FlowBackFileError(f"{path}: not an ADM reference batch, missing {', '.join(missing)} ({what}); has "
                                f"{sorted(data)}")
    images = data["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise FlowBackFileError(f"{path}: arr_0 must hold at least 2 uint8 NHWC images with 1 or 3 channels, got "
                                f"{images.dtype} {images.shape}")
    _check_gaussian(path, data, "mu", "sigma")
    _check_gaussian(path, data, "mu_s", "sigma_s")
    # NCHW exactly as evaluate's load_samples converts samples.npz, so that both go through the same conv kernels
    # (a strided NHWC view would take the channels-last ones, whose features differ in the last bits)
    return np.ascontiguousarray(nhwc_to_nchw(images)), {k: data[k] for k in ADM_STAT_KEYS}


def compute_reference(params: "Params", net: nn.Module, device: str | torch.device = "cpu",
                      show_progress: bool = True) -> ReferenceStats:
    """The reference statistics `params` ask for, with `net` (the loaded metric network) on `device`."""
    mp = params.metrics
    source = reference_source(params)
    if mp.reference_batch:
        path = Path(mp.reference_batch)
        images, file_stats = read_adm_batch(path)
        fingerprint = reference_fingerprint(params, net)
        try:
            feats = extract_features(net, images, mp.batch_size, device=device, show_progress=show_progress)
        except (TypeError, ValueError) as e:
            raise FlowBackFileError(f"{path}: arr_0 images {tuple(images.shape)} (NCHW) do not fit the metric "
                                    f"network {mp.network!r} ({e})") from e
        ref = reference_from_features(feats, mp.isc_splits, source, fingerprint, file_stats)
        ours = {"pool": int(feats["pool"].shape[1]), "spatial": int(feats["spatial"].shape[1])}
        if ref.dims() != ours:
            raise FlowBackFileError(f"{path}: statistics of dims {ref.dims()} but the metric network {mp.network!r} "
                                    f"gives features of dims {ours}: the file was made for another network "
                                    f"(ADM's batches are for network: inception)")
        return ref
    from ..data.manifest import load_manifest, load_split

    if not load_manifest(params.data.dir).pixels:
        raise ParamsError(f"metrics.reference_batch: the shards in {params.data.dir} hold VAE latents without "
                          f"pixels, so no reference images can be read from split {mp.reference_split!r}; set "
                          f"metrics.reference_batch to an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz) "
                          f"or prepare the data with data.keep_pixels: true")
    images, _ = load_split(params, mp.reference_split)  # refuses data prepared with other settings
    fingerprint = reference_fingerprint(params, net)
    feats = extract_features(net, images, mp.batch_size, device=device, show_progress=show_progress)
    return reference_from_features(feats, mp.isc_splits, source, fingerprint)


# ------------------------------------------------------------------------------------------------------------- I/O
def save_reference(path: str | Path, ref: ReferenceStats) -> None:
    """Write the .npz atomically (numeric arrays and plain strings only: readable with allow_pickle=False)."""
    save_npz(path, mu=np.asarray(ref.mu, np.float64), sigma=np.asarray(ref.sigma, np.float64),
             mu_s=np.asarray(ref.mu_s, np.float64), sigma_s=np.asarray(ref.sigma_s, np.float64),
             ref_pool=np.asarray(ref.ref_pool, np.float32), **{"is": np.float64(ref.inception_score)},
             is_std=np.float64(ref.inception_score_std), count=np.int64(ref.count), source=np.str_(ref.source),
             stats_from=np.str_(ref.stats_from), fingerprint=np.str_(json.dumps(ref.fingerprint, sort_keys=True)))


def reference_report(ref: ReferenceStats, path: str | Path, network: str, isc_splits: int) -> dict:
    """The JSON summary DVC tracks as metrics: count, source, network, feature dims, reference IS."""
    finite = lambda x: None if not math.isfinite(x) else x  # noqa: E731  (JSON has no NaN)
    return {"count": ref.count, "source": ref.source, "stats_from": ref.stats_from, "network": network,
            "dims": ref.dims(), "is": finite(ref.inception_score), "is_std": finite(ref.inception_score_std),
            "isc_splits": isc_splits, "file": str(path),
            "fingerprint": ref.fingerprint}


def write_reference(params: "Params", ref: ReferenceStats) -> dict:
    """Save the .npz at `reference_path(params)` and the JSON report at `report_path(params)`; returns the report."""
    path = reference_path(params)
    save_reference(path, ref)
    report = reference_report(ref, path, params.metrics.network, params.metrics.isc_splits)
    save_json(report_path(params), report)
    return report


def load_reference(path: str | Path, expected: dict | Callable[[], dict] | None = None) -> ReferenceStats:
    """Read a reference .npz (allow_pickle=False); with `expected` (a fingerprint, or a function computing it once the
    file is known to exist), refuse one computed from anything else."""
    path = Path(path)
    if not path.exists():
        raise FlowBackFileError(f"{path}: no reference statistics; {_RERUN} first")
    if callable(expected):
        expected = expected()
    data = load_npz(path)
    missing = [k for k in NPZ_KEYS if k not in data]
    if missing:
        raise FlowBackFileError(f"{path}: not a FlowBack reference file (missing {', '.join(missing)}); {_RERUN}")
    try:
        fingerprint = json.loads(str(data["fingerprint"]))
    except json.JSONDecodeError as e:
        raise FlowBackFileError(f"{path}: unreadable fingerprint ({e}); {_RERUN}") from e
    if expected is not None and fingerprint != expected:
        diff = [f"{k}: {_short(fingerprint.get(k))} in the file, {_short(expected.get(k))} now"
                for k in sorted(set(fingerprint) | set(expected)) if fingerprint.get(k) != expected.get(k)]
        raise FlowBackFileError(f"{path}: computed with another metric network or settings ({'; '.join(diff)}); "
                                f"{_RERUN} (it uses the top-level params: an experiment may not override "
                                f"metrics.* or data.* settings that change the reference)")
    _check_gaussian(path, data, "mu", "sigma")
    _check_gaussian(path, data, "mu_s", "sigma_s")
    ref_pool = data["ref_pool"]
    if (ref_pool.ndim != 2 or ref_pool.shape[1] != data["mu"].shape[0]
            or not np.issubdtype(ref_pool.dtype, np.floating)):
        raise FlowBackFileError(f"{path}: ref_pool {ref_pool.dtype} {ref_pool.shape} does not match mu "
                                f"{data['mu'].shape}; {_RERUN}")
    f64 = {k: data[k].astype(np.float64, copy=False) for k in ADM_STAT_KEYS}
    return ReferenceStats(**f64, ref_pool=ref_pool, inception_score=float(data["is"]),
                          inception_score_std=float(data["is_std"]), count=int(data["count"]),
                          source=str(data["source"]), stats_from=str(data["stats_from"]), fingerprint=fingerprint)


def _short(value) -> str:
    s = repr(value)
    return s[:14] + "...'" if isinstance(value, str) and len(value) > 16 else s
