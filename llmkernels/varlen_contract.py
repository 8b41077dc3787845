"""The contract of packed variable-length attention (``llmkernels.varlen_attention``): validation and the
canonical form every backend receives.

Canonical form (``VarlenArgs``): q ``(Tq, Hq, E)``, k ``(Tk, Hkv, E)``, v ``(Tk, Hkv, Ev)`` as the user passed
them (any strides, never copied), ``cu_seqlens_q/k`` int32 ``(B + 1,)``, the two max lengths as ints, and a
``contract.ScoreRule`` that is always bottom-right (``bottom_right=True``: per sequence ``d = Lk_b - Lq_b``, the
last query of a sequence sees its last key, as FlashAttention and PyTorch's ``varlen_attn``). Unlike the dense
form the window sides are not folded against the lengths (they differ per sequence; the kernels clamp the key
range anyway), only ``right == 0`` becomes causality, so the kernels keep one causal path. ALiBi slopes are a
``(B, Hq)`` view (stride 0 where the user's ``(Hq,)`` broadcasts).

Two kinds of checks. Shapes, dtypes, devices and ints are metadata: always checked, before any kernel.
``check_cu_seqlens_values`` reads the cu_seqlens' values (first entry 0, last entry Tq / Tk, non-decreasing,
max_seqlen at least the longest sequence), which on a GPU is a device-to-host copy (a sync): it runs for CPU
tensors always and for CUDA tensors only with ``validate=True``. Without it the Triton kernels clamp every
offset into the tensors, so wrong values give wrong numbers but never an access outside the tensors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .contract import (SUPPORTED_DTYPES, ScoreRule, _check_alibi_tensor, _check_scale, _check_softcap,
                       _check_window_size, check_query_key_value)


@dataclass
class VarlenArgs:
    """Canonical varlen attention arguments (see the module docstring)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    is_causal: bool
    scale: float
    rule: ScoreRule

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def shape_desc(self) -> str:
        Tq, Hq, E = self.q.shape
        return (f"B={self.num_seqs} Tq={Tq} Tk={self.k.shape[0]} Hq={Hq} Hkv={self.k.shape[1]} E={E} "
                f"Ev={self.v.shape[2]}")


def _is_int(x) -> bool:
    # torch.SymInt: max_seqlen traced by torch.compile (dynamic shapes) is still an int to us.
    return not isinstance(x, bool) and isinstance(x, (numbers.Integral, torch.SymInt))


def _check_cu_seqlens(name: str, cu, query: torch.Tensor) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor of shape (B + 1,), got {type(cu).__name__}")
    if cu.is_nested or cu.layout != torch.strided:
        raise TypeError(f"{name} must be a dense int32 tensor of shape (B + 1,)")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32 (as FlashAttention and PyTorch's varlen_attn), got {cu.dtype}")
    if cu.device != query.device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {query.device}; it must be on the inputs' "
                         f"device")
    if cu.dim() != 1:
        raise ValueError(f"{name} must be 1-D (B + 1,), got shape {tuple(cu.shape)}")
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have B + 1 >= 1 entries (it starts with 0), got an empty tensor")


def _check_max_seqlen(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be a Python int >= 0, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_cu_seqlens_values(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, Tq: int, Tk: int,
                            max_seqlen_q: int, max_seqlen_k: int) -> None:
    """The value checks of cu_seqlens and max_seqlen (a device-to-host copy for CUDA tensors)."""
    for name, cu, total, max_name, max_len in (("cu_seqlens_q", cu_seqlens_q, Tq, "max_seqlen_q", max_seqlen_q),
                                               ("cu_seqlens_k", cu_seqlens_k, Tk, "max_seqlen_k", max_seqlen_k)):
        values = cu.detach().to("cpu", torch.int64)
        first, last = int(values[0]), int(values[-1])
        what = "query" if name.endswith("q") else "key"
        if first != 0:
            raise ValueError(f"{name} must start with 0, got {first}")
        if last != total:
            raise ValueError(f"{name} must end with the total number of {what} tokens ({total}), got {last}")
        lengths = values[1:] - values[:-1]
        if lengths.numel() and int(lengths.min()) < 0:
            b = int(torch.nonzero(lengths < 0)[0])
            raise ValueError(f"{name} must be non-decreasing, but entry {b + 1} ({int(values[b + 1])}) is below "
                             f"entry {b} ({int(values[b])})")
        longest = int(lengths.max()) if lengths.numel() else 0
        if longest > max_len:
            raise ValueError(f"{max_name}={max_len} is below the longest {what} sequence ({longest} tokens, from "
                             f"{name})")


def check_varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           is_causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           dropout_p=0.0, enable_gqa=False, validate=False,
                           dtypes=SUPPORTED_DTYPES) -> VarlenArgs:
    """Validate varlen_attention's arguments (metadata always; values as the module docstring says) and bring
    them into canonical form. ``dtypes``: the accepted input dtypes (the reference also takes float64)."""
    check_query_key_value(query, key, value, dtypes, lambda rank: rank == 3,
                          "be 3-D (total_tokens, heads, head_dim)")
    Tq, Hq, E = query.shape
    Tk, Hkv, _ = key.shape
    if E == 0:
        raise ValueError("query and key have head dim 0; the head dim must be at least 1")
    if value.shape[0] != Tk:
        raise ValueError(f"key and value must have the same number of tokens, got key {Tk} and value "
                         f"{value.shape[0]}")
    if value.shape[1] != Hkv:
        raise ValueError(f"key and value must have the same number of heads, got key {Hkv} and value "
                         f"{value.shape[1]}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query has {Hq} heads and key/value {Hkv}; the query heads must be a positive multiple of "
                         f"the key/value heads (grouped-query attention)")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, query)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, query)
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries and cu_seqlens_k "
                         f"{cu_seqlens_k.shape[0]}; both must be (B + 1,) for the same B sequences")
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa), ("validate", validate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    scale = _check_scale(scale, 1.0 / math.sqrt(E))
    left, right = _check_window_size(window_size)
    if is_causal and right > 0:
        raise ValueError(f"window_size right side {right} > 0 contradicts is_causal=True, which hides every key right "
                         f"of the diagonal (use a right side of 0 or -1)")
    softcap = _check_softcap(softcap)
    B = cu_seqlens_q.shape[0] - 1
    slopes = _check_varlen_alibi(alibi_slopes, query, B, Hq, dtypes)
    if right == 0:
        is_causal = True  # a window ending on the diagonal is causality: one causal path in the kernels
    if is_causal:
        right = -1
    rule = ScoreRule(left, right, True, softcap, slopes, None)
    return VarlenArgs(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(dropout_p),
                      is_causal, scale, rule)


def _check_varlen_alibi(alibi_slopes, query, B: int, Hq: int, dtypes) -> Optional[torch.Tensor]:
    if alibi_slopes is None:
        return None
    _check_alibi_tensor(alibi_slopes, query, dtypes)
    shape = tuple(alibi_slopes.shape)
    if shape == (Hq,):
        return alibi_slopes.expand(B, Hq)
    if shape == (B, Hq):
        return alibi_slopes
    raise ValueError(f"alibi_slopes of shape {shape} must be (Hq,) = ({Hq},) or (B, Hq) = ({B}, {Hq}), B the number "
                     f"of sequences (len(cu_seqlens_q) - 1)")
