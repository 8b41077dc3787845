"""Exact merging of partial attentions by their log-sum-exp.

Attention of a row over the union of two disjoint key sets A and B is
    lse = log(exp(lse_A) + exp(lse_B)),   out = out_A * exp(lse_A - lse) + out_B * exp(lse_B - lse),
computed here in fp32 around the larger lse. A partial whose row saw no key has lse -inf and contributes nothing,
whatever its output; a row that no partial reached stays output 0, lse -inf (never NaN from -inf - -inf).
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_partials(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple:
    """(out, lse) of the two partials merged, both float32. out_*: (..., L, Ev), lse_*: (..., L)."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    # Rows where both are -inf: subtract 0 instead, so the weights are exp(-inf) = 0 rather than NaN.
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    lse = top + torch.log(total)  # log(0) = -inf where no partial saw a key
    norm = torch.where(total > 0, total, torch.ones_like(total))
    # A zero weight is applied with where, not a product: the output of a row that saw no key is not part of the
    # result (0 * NaN would be NaN).
    part_a = torch.where((w_a > 0).unsqueeze(-1), out_a.float() * (w_a / norm).unsqueeze(-1), 0.0)
    part_b = torch.where((w_b > 0).unsqueeze(-1), out_b.float() * (w_b / norm).unsqueeze(-1), 0.0)
    return part_a + part_b, lse
