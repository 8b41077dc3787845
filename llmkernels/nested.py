"""PyTorch nested tensors (jagged layout) in ``llmkernels.scaled_dot_product_attention``: the packed values and the
offsets go through ``varlen_attention``, and the result comes back as a jagged nested tensor.

PyTorch's users pass jagged nested tensors to SDPA as ``(B, H, j, E)``: a ``(B, j, H, E)`` tensor built with
``torch.nested.nested_tensor(..., layout=torch.jagged)`` (or ``nested_tensor_from_jagged``) and then
``.transpose(1, 2)``. Transposed back, its ``values()`` is the packed ``(T, H, E)`` buffer and its ``offsets()``
the ``(B + 1,)`` sequence starts: exactly varlen_attention's ``query`` and ``cu_seqlens``, read in place.

What PyTorch's nested SDPA refuses is refused here too, with an error naming the argument: an ``attn_mask``;
inputs that are not all jagged nested tensors; a ragged dim other than dim 2; head counts that differ without
``enable_gqa``. ``is_causal`` means what it means there (self-attention: each sequence's query and key lengths
are equal, so top-left and bottom-right alignment agree); with lengths that differ it needs
``causal_alignment="bottom_right"`` (varlen's alignment), as do ``window_size`` and ``alibi_slopes``. Attention
sinks are refused (varlen_attention has none). Grouped-query attention runs with ``enable_gqa=True``, which
PyTorch's nested path does not take.

Costs worth knowing on a GPU: the offsets are cast to int32 (a tiny device op, no sync). Where two inputs carry
different offsets tensors (built separately, not from one projection) their equality is checked by value, a
device-to-host copy; inputs that share offsets (the usual case) need none. A nested tensor that does not know its
longest sequence yet computes it once (PyTorch's own nested SDPA does the same, and caches it on the tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .varlen_contract import VarlenArgs, check_varlen_attention


def is_jagged(t) -> bool:
    """A nested tensor with the jagged layout."""
    return isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged


def any_nested(*tensors) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors)


@dataclass
class NestedCall:
    """A checked nested call: the varlen canonical form plus what the output's nested tensor needs."""

    varlen: VarlenArgs
    query_offsets: torch.Tensor  # the query's own offsets tensor (the output shares its ragged dim)
    min_seqlen_q: Optional[int]
    max_seqlen_q: int


def _sequence_view(name: str, t) -> torch.Tensor:
    """The (B, j, H, E) nested view of a (B, H, j, E) jagged input, after the layout checks."""
    if not isinstance(t, torch.Tensor) or not t.is_nested:
        raise TypeError(f"{name} is not a nested tensor, but another input is: with nested inputs, query, key and "
                        f"value must all be nested tensors with the jagged layout (as in PyTorch's SDPA)")
    if t.layout != torch.jagged:
        raise TypeError(f"{name} is a nested tensor with layout {t.layout}; llmkernels takes nested tensors with "
                        f"layout=torch.jagged only")
    if t.dim() != 4:
        raise ValueError(f"nested {name} must be 4-D (B, H, j, E) with the ragged dim j at dim 2, got {t.dim()} dims")
    if t._ragged_idx != 2:
        raise ValueError(f"nested {name} is ragged in dim {t._ragged_idx}; it must be (B, H, j, E), ragged in dim 2 "
                         f"(build it as (B, j, H, E) and pass .transpose(1, 2), as for PyTorch's SDPA)")
    seq = t.transpose(1, 2)
    if seq.lengths() is not None:
        raise ValueError(f"nested {name} has holes between its sequences (lengths() is set, as after "
                         f"torch.nested.narrow); pass {name}.contiguous() so that the sequences are packed")
    return seq


def _max_seqlen(seq: torch.Tensor) -> int:
    cached = getattr(seq, "_maybe_max_seqlen", None)
    if cached is not None:
        return int(cached)
    return int(seq._get_max_seqlen())  # computes it from the offsets once and caches it on the tensor


def _same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return a.shape == b.shape and bool(torch.equal(a, b))  # a device-to-host read for CUDA tensors


def check_nested_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                           enable_gqa=False, *, window_size=(-1, -1), causal_alignment=None, softcap=0.0,
                           alibi_slopes=None, sinks=None, validate=False) -> NestedCall:
    """Validate a nested-tensor SDPA call (see the module docstring) and bring it into varlen's canonical form."""
    if attn_mask is not None:
        raise ValueError("attn_mask is not supported with nested (jagged) inputs, as in PyTorch's SDPA: the sequences "
                         "already separate themselves; use is_causal, window_size or alibi_slopes for a pattern")
    if sinks is not None:
        raise ValueError("sinks are not supported with nested (jagged) inputs: they run on varlen_attention, which "
                         "has no attention sinks; pass padded dense tensors for sinks")
    if causal_alignment not in (None, "top_left", "bottom_right"):
        raise ValueError(f"causal_alignment must be None, 'top_left' or 'bottom_right', got {causal_alignment!r}")
    q_seq, k_seq, v_seq = (_sequence_view(n, t) for n, t in (("query", query), ("key", key), ("value", value)))
    B = query.shape[0]
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"nested query, key and value must have the same batch size, got {B}, {key.shape[0]}, "
                         f"{value.shape[0]}")
    Hq, Hk, Hv = query.shape[1], key.shape[1], value.shape[1]
    if Hk != Hv:
        raise ValueError(f"nested key and value must have the same number of heads, got key {Hk} and value {Hv}")
    if Hq != Hk and not enable_gqa:
        raise ValueError(f"nested query has {Hq} heads and key/value {Hk}; different head counts need "
                         f"enable_gqa=True (grouped-query attention)")
    off_q, off_k, off_v = q_seq.offsets(), k_seq.offsets(), v_seq.offsets()
    if not _same_offsets(off_k, off_v):
        raise ValueError("nested key and value must have the same sequence lengths (offsets)")
    bottom_right = causal_alignment == "bottom_right"
    aligned = is_causal or tuple(window_size) != (-1, -1) or alibi_slopes is not None
    if aligned and not bottom_right and not _same_offsets(off_q, off_k):
        what = "is_causal" if is_causal else ("window_size" if tuple(window_size) != (-1, -1) else "alibi_slopes")
        raise ValueError(f"{what} with nested inputs whose query and key lengths differ: as in PyTorch's nested SDPA "
                         f"it is defined here for self-attention (equal lengths per sequence); pass "
                         f"causal_alignment='bottom_right' for the rule aligned at each sequence's last key")
    if off_q.device != query.device:
        raise ValueError(f"nested query's offsets are on {off_q.device}, its values on {query.device}")
    cu_q, cu_k = off_q.to(torch.int32), off_k.to(torch.int32)
    max_q, max_k = _max_seqlen(q_seq), _max_seqlen(k_seq)
    a = check_varlen_attention(q_seq.values(), k_seq.values(), v_seq.values(), cu_q, cu_k, max_q, max_k,
                               is_causal=is_causal, scale=scale,
                               window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                               dropout_p=dropout_p, enable_gqa=enable_gqa, validate=validate)
    return NestedCall(a, off_q, getattr(q_seq, "_maybe_min_seqlen", None), max_q)


def _as_nested(values: torch.Tensor, call: NestedCall) -> torch.Tensor:
    """(T, ...) values on the query's offsets -> a (B, j, ...) jagged view sharing the query's ragged dim."""
    return torch.nested.nested_tensor_from_jagged(values, call.query_offsets, min_seqlen=call.min_seqlen_q,
                                                  max_seqlen=call.max_seqlen_q)


def nested_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False, *, return_lse=False, window_size=(-1, -1), causal_alignment=None, softcap=0.0,
                     alibi_slopes=None, sinks=None, backend=None):
    """``scaled_dot_product_attention`` for jagged nested inputs ``(B, H, j, E)``: returns the jagged output
    ``(B, H, j, Ev)`` (sharing the query's ragged dim) and, with ``return_lse``, the jagged float32 lse
    ``(B, H, j)``. Differentiable through the nested tensors' values."""
    from .varlen import varlen_attention  # varlen imports ops, whose public function calls this one

    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    call = check_nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                  window_size=window_size, causal_alignment=causal_alignment, softcap=softcap,
                                  alibi_slopes=alibi_slopes, sinks=sinks)
    a = call.varlen
    out, lse = varlen_attention(a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k,
                                is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap,
                                alibi_slopes=alibi_slopes, dropout_p=dropout_p, enable_gqa=enable_gqa,
                                return_lse=True, backend=backend)
    out_nt = _as_nested(out, call).transpose(1, 2)
    if not return_lse:
        return out_nt
    return out_nt, _as_nested(lse.transpose(0, 1), call).transpose(1, 2)
