"""The metrics of one set of samples against the profile's reference (what `evaluate` and the CFG sweep report):
FID, sFID, IS, precision/recall and class fidelity, computed with the feature network and reference statistics the
`metricnet` and `reference` stages wrote."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..params import Params


@dataclass
class Scorer:
    """The feature network and the reference statistics, loaded once for any number of sample sets."""

    params: "Params"
    net: Any
    ref: Any
    device: Any

    @classmethod
    def load(cls, p: "Params", device) -> "Scorer":
        """A missing reference, or one made with another network, data or settings, is an error naming it."""
        from .generative import load_feature_network
        from .reference import load_reference, reference_fingerprint, reference_path

        net = load_feature_network(p.metrics.network, p.metrics.dir).to(device)
        return cls(p, net, load_reference(reference_path(p), expected=lambda: reference_fingerprint(p, net)), device)

    def __call__(self, samples: np.ndarray, labels: np.ndarray | None, progress: bool = True) -> dict:
        """{fid, sfid, is, is_std, precision, recall, cond_acc, num_samples, isc_splits, reference, network} of uint8
        NCHW `samples` (and the classes they were drawn for)."""
        from .generative import conditional_accuracy, extract_features, isc_split_count

        mp = self.params.metrics
        feats = extract_features(self.net, samples, mp.batch_size, device=self.device, show_progress=progress)
        splits = isc_split_count(len(samples), mp.isc_splits, mp.isc_split_size)
        metrics = self.ref.metrics(feats, isc_splits=splits, prc_neighborhood=mp.prc_neighborhood)
        same_classes = getattr(self.net, "num_classes", None) == self.params.data.num_classes
        metrics["cond_acc"] = (100.0 * conditional_accuracy(feats["logits"], labels)
                               if labels is not None and same_classes else None)
        metrics.update(num_samples=int(len(samples)), isc_splits=splits, reference=self.ref.source,
                       network=mp.network)
        return metrics
