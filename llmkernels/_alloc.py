"""Output allocation for the kernels, with an optional poison fill for tests.

Every backend allocates its outputs through ``new_output``. When poisoning is on (tests turn it on with
``set_poison(True)`` or ``LLMKERNELS_POISON_OUTPUTS=1``), outputs start as NaN, so an element that a kernel
forgets to write shows up as NaN in the comparison with the reference instead of passing by luck.
"""

from __future__ import annotations

import os

import torch

_poison = os.environ.get("LLMKERNELS_POISON_OUTPUTS", "0") == "1"


def set_poison(on: bool) -> None:
    global _poison
    _poison = bool(on)


def poison_enabled() -> bool:
    return _poison


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor when poisoning is on (floating dtypes)."""
    if _poison and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
