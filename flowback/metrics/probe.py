"""Linear probe: how linearly decodable the class is from each (block, layer) of a trained flow.

Features are the residual streams after every layer of every block, averaged over tokens, from the forward
(density) pass on clean inputs. The forward pass, because on the reverse path the block inputs are rebuilt
exactly (invertibility), so the hidden states it reads are the same numbers: one pass serves every strategy, which
differ only in how they trained. Unconditional (y = None: every conditioned block gets the mean class embedding),
so the label cannot leak into the features through the class embedding. Clean inputs, because the probe asks what
the flow encodes about data, not about its training noise.

Per (block, layer): standardise, then multinomial logistic regression (scikit-learn, L-BFGS, L2 penalty C) fitted
on the train split less a held-out selection part; the best position is chosen by accuracy on that selection part,
and every position's accuracy is reported on the val split, which plays no part in choosing (choosing and reporting
on the same images would flatter the best layer). Deterministic: fixed subsets, a deterministic solver.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ..models.tarflow import TARFlow
from .classifier import _model_inputs


@dataclass
class ProbeResult:
    accuracy: dict[tuple[int, int], float]  # (block, layer), both from 1 -> val accuracy in [0, 1]
    selection: dict[tuple[int, int], float]  # -> accuracy on the held-out part of train that chooses `best`
    best: tuple[int, int]  # the best position on the selection part (the first in (block, layer) order on a tie)
    unconverged: list[tuple[int, int]] = field(default_factory=list)  # positions where L-BFGS hit max_iter

    @property
    def best_accuracy(self) -> float:
        return self.accuracy[self.best]

    def to_dict(self) -> dict:
        key = lambda p: f"block{p[0]}_layer{p[1]}"  # noqa: E731
        return {"accuracy": {key(p): a for p, a in self.accuracy.items()},
                "selection": {key(p): a for p, a in self.selection.items()}, "best": key(self.best),
                "best_accuracy": self.best_accuracy, "unconverged": [key(p) for p in self.unconverged]}


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Indices of a fixed random subset of size `limit` (all n, in order, when limit is None or >= n)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def all_positions(model: TARFlow) -> list[tuple[int, int]]:
    return [(b, l) for b, n in enumerate(model.cfg.layers, start=1) for l in range(1, n + 1)]


@torch.no_grad()
def probe_features(model: TARFlow, inputs: np.ndarray, batch_size: int = 256,
                   positions: list[tuple[int, int]] | None = None) -> dict[tuple[int, int], np.ndarray]:
    """Token-averaged hidden states (N, width) after each (block, layer) in `positions` (default: every one),
    from the unconditional forward pass."""
    device = next(model.parameters()).device
    model.eval()
    keep: dict[int, set[int]] = {}
    for b, l in positions or all_positions(model):
        keep.setdefault(b, set()).add(l)
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for start in range(0, len(inputs), batch_size):
        x = _model_inputs(inputs[start : start + batch_size]).to(device)
        out = model(x, None, keep=keep)
        for p, h in out.hidden.items():
            parts.setdefault(p, []).append(h.float().mean(dim=1).cpu().numpy())
    return {p: np.concatenate(v) for p, v in sorted(parts.items())}


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, eval_x: tuple[np.ndarray, ...], eval_y: tuple[np.ndarray, ...],
              C: float = 1.0, max_iter: int = 1000) -> tuple[float, ...]:
    """(accuracy on each evaluation set, ..., converged) of a standardised multinomial logistic regression fitted
    on the train features.

    One BLAS thread: with numpy's default (every core), two `dvc repro --force` runs with bit-identical models gave
    one of 320 probe accuracies one image apart; multi-threaded BLAS reductions need not round alike."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(1):
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(train_x, train_y)
        accuracies = tuple(float((clf.predict(x) == y).mean()) for x, y in zip(eval_x, eval_y))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return (*accuracies, converged)


def linear_probe(model: TARFlow, train_inputs: np.ndarray, train_labels: np.ndarray, val_inputs: np.ndarray,
                 val_labels: np.ndarray, C: float = 1.0, max_iter: int = 1000, max_train: int | None = None,
                 batch_size: int = 256, seed: int = 0, positions: list[tuple[int, int]] | None = None,
                 select_fraction: float = 0.2) -> ProbeResult:
    """Probe each (block, layer) in `positions` (default: every one): fit on (a fixed subset of at most max_train
    of) train less a seeded `select_fraction` of it, choose the best position on that held-out part, score every
    position on val.

    Inputs are clean uint8 NCHW images, or float model-space latents for a latent flow (as the classifier takes).
    Memory is N x width floats per position; at ImageNet scale, limit max_train and the positions."""
    if len(np.unique(train_labels)) < 2:
        raise ValueError("the linear probe needs at least two classes in the train split")
    keep = subset(len(train_inputs), max_train, seed)
    held = np.zeros(len(keep), dtype=bool)
    held[np.random.default_rng([seed, 1]).permutation(len(keep))[: max(1, round(select_fraction * len(keep)))]] = True
    labels = np.asarray(train_labels)[keep]
    train = probe_features(model, train_inputs[keep], batch_size, positions)
    val = probe_features(model, val_inputs, batch_size, positions)
    accuracy, selection, unconverged = {}, {}, []
    for p in train:
        f = train[p]
        selection[p], accuracy[p], converged = fit_probe(f[~held], labels[~held], (f[held], val[p]),
                                                         (labels[held], np.asarray(val_labels)), C, max_iter)
        if not converged:
            unconverged.append(p)
    best = max(selection, key=lambda p: (selection[p], -p[0], -p[1]))
    return ProbeResult(accuracy, selection, best, unconverged)
