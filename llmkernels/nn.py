"""Modules built on the fused ops.

``SelfAttention`` is a drop-in for the classic einsum self-attention module of the seed document
(``shared/guide/seed/self_attention.md``): same constructor, same parameter names and so the same ``state_dict``
keys (``queries``, ``keys``, ``values``, ``fc_out``), same ``forward(query, key, value, mask=None)`` and mask
convention. What differs is deliberate:

* The value product is the intended one, ``einsum("nhqk,nkhd->nqhd")``. The seed writes ``"nhqk,nvhd->nqhd"``,
  which sums the attention weights and V separately, so every query gets ``fc_out(sum of V)``; a module
  reproducing that would not be attention (``tests/test_nn.py`` shows the two differ).
* A query whose keys are all masked gives 0 (then ``fc_out``'s bias), not NaN.
* The scores never exist in memory: the projected ``(N, len, heads, head_dim)`` tensors reach the fused kernel
  as ``.transpose(1, 2)`` views, without a copy.

The seed applies ``masked_fill(mask == 0, -inf)`` to the raw scores and divides by ``sqrt(head_dim)`` afterwards;
since ``-inf / c = -inf`` that is exactly ``scale = 1 / sqrt(head_dim)`` with a bool mask (True = keep).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .contract import check_backend_name
from .ops import scaled_dot_product_attention

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention, ``fc_out(attention(queries(query), keys(key), values(value)))``.

    Args:
        embed_size: model width; must be a multiple of ``heads``.
        heads: number of attention heads (``head_dim = embed_size // heads``).
        backend: keyword-only; the llmkernels backend for this module's calls (``None``: the usual choice, see
            ``llmkernels.use_backend``). Not part of the ``state_dict``.

    ``forward(query, key, value, mask=None)``: ``query (N, q_len, embed_size)``, ``key (N, k_len, embed_size)``,
    ``value (N, k_len, embed_size)``; returns ``(N, q_len, embed_size)``. ``mask``: any tensor broadcastable to
    ``(N, heads, q_len, k_len)`` (PyTorch's broadcasting, as the seed's ``masked_fill`` applies it), where
    ``mask == 0`` hides a key from a query; a bool mask therefore means True = keep.
    """

    def __init__(self, embed_size: int, heads: int, *, backend: Optional[str] = None):
        super().__init__()
        for name, val in (("embed_size", embed_size), ("heads", heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_size % heads != 0:
            # The seed computes head_dim = embed_size // heads and then fails in reshape; say why up front.
            raise ValueError(f"embed_size ({embed_size}) must be a multiple of heads ({heads})")
        self.embed_size = embed_size
        self.heads = heads
        self.head_dim = embed_size // heads
        self.backend = None if backend is None else check_backend_name(backend)

        self.queries = nn.Linear(embed_size, embed_size)
        self.keys = nn.Linear(embed_size, embed_size)
        self.values = nn.Linear(embed_size, embed_size)
        self.fc_out = nn.Linear(embed_size, embed_size)

    def extra_repr(self) -> str:
        return f"embed_size={self.embed_size}, heads={self.heads}, head_dim={self.head_dim}"

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> None:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != self.embed_size:
                raise ValueError(f"{name} must have shape (N, len, embed_size={self.embed_size}), "
                                 f"got {tuple(t.shape)}")
        if not (query.shape[0] == key.shape[0] == value.shape[0]):
            raise ValueError(f"query, key and value must share the batch size N, got {query.shape[0]}, "
                             f"{key.shape[0]}, {value.shape[0]}")
        if key.shape[1] != value.shape[1]:
            raise ValueError(f"key and value must have the same length (each key has one value), got key "
                             f"{key.shape[1]} and value {value.shape[1]}")

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        self._check_inputs(query, key, value)
        N, q_len, k_len = query.shape[0], query.shape[1], key.shape[1]
        H, D = self.heads, self.head_dim

        # (N, len, H, D) as the seed lays it out, then (N, H, len, D) as a strided view: no copy.
        Q = self.queries(query).view(N, q_len, H, D).transpose(1, 2)
        K = self.keys(key).view(N, k_len, H, D).transpose(1, 2)
        V = self.values(value).view(N, k_len, H, D).transpose(1, 2)

        keep = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            # The seed hides where mask == 0. A bool mask already says that (True = keep) and is passed as it
            # is; any other dtype is turned into that bool at its own (un-broadcast) size. NaN != 0, so a NaN
            # entry keeps the key, as in the seed.
            keep = mask if mask.dtype == torch.bool else mask != 0
            target = (N, H, q_len, k_len)
            try:
                ok = torch.broadcast_shapes(keep.shape, target) == target
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to (N, heads, q_len, "
                                 f"k_len) = {target}")

        out = scaled_dot_product_attention(Q, K, V, attn_mask=keep, scale=1.0 / math.sqrt(D),
                                           backend=self.backend)
        # (N, H, q_len, D) -> (N, q_len, H * D): the one copy, into the layout fc_out reads.
        out = out.transpose(1, 2).reshape(N, q_len, self.embed_size)
        return self.fc_out(out)
