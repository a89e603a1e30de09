"""Every seeded random stream in FlowBack comes from `derive_seed(*parts)`.

A stream is named by its parts, e.g. ("noise", train_seed, step) or ("chunk", sample_seed, chunk): different tags
give independent streams, the same parts give the same numbers on every run, machine and Python version (sha256,
not Python's salted hash()). That is what makes a resumed run take exactly the steps an uninterrupted one would,
and N processes draw what one process draws.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from parts (strings and integers)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded by derive_seed(*parts)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
