"""Gaussian statistics of features and the Fréchet distance between them (FID, sFID).

FID = ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2).

Why not `scipy.linalg.sqrtm`, as the ADM suite calls it: SciPy 1.11.2-1.12 returned large spurious imaginary parts,
and the `disp` argument ADM passes is removed in SciPy 1.18, so the exact ADM call is not portable. We only need the
trace of the square root, and tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(S1 S2)): S1 S2 is similar to the PSD matrix
S1^1/2 S2 S1^1/2, so its eigenvalues are real and >= 0 up to rounding. This eigenvalue form is the one torch-fidelity
uses (metric_fid.fid_statistics_to_metric); we take the real part of the complex square roots as it does, so tiny
negative or complex eigenvalues from rounding contribute ~0 instead of NaN. A LARGE imaginary part is not rounding: the
statistics are not covariances of real features (corrupt files, mismatched feature spaces), and ADM raises on it
rather than report a number; so do we (FrechetError), after retrying with ADM's eps offset.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import FlowBackError

EPS = 1e-6  # ADM's offset added to both covariances when the square root is not finite
IMAG_ATOL = 1e-3  # ADM's tolerance on the imaginary part of the square root


class FrechetError(FlowBackError, ValueError):
    """The Fréchet distance is undefined for these statistics (the square root has a large imaginary part)."""


def gaussian_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> (mu (D,), sigma (D, D)), both float64; sigma is np.cov(rowvar=False) (N - 1 normalised)."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"expected (N >= 2, D) features, got shape {f.shape}")
    f = f.astype(np.float64, copy=False)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_eigenvalues(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """The (complex) square roots of the eigenvalues of sigma1 @ sigma2: their sum is tr sqrtm(sigma1 sigma2)."""
    return np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = EPS) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    try:
        roots = _sqrt_eigenvalues(sigma1, sigma2)
    except np.linalg.LinAlgError:
        roots = np.array([np.nan])
    if not np.all(np.isfinite(roots)) or np.abs(roots.imag).max() > IMAG_ATOL:  # regularise both, as ADM does
        offset = np.eye(d) * eps
        roots = _sqrt_eigenvalues(sigma1 + offset, sigma2 + offset)
    imag = float(np.abs(roots.imag).max())
    if imag > IMAG_ATOL:
        raise FrechetError(f"Fréchet distance undefined: the covariance product's square root has an imaginary part "
                           f"of {imag:.3g} (> {IMAG_ATOL}); the statistics are not covariances of one feature space")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * roots.real.sum())
