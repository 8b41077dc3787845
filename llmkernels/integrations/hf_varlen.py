"""Packed and unpadded batches of the Hugging Face attention function (``huggingface.py``) on ``varlen_attention``.

Two ways a transformers batch becomes packed sequences here:

* Padding-free packing (``DataCollatorWithFlattening``: position ids that restart per document, optionally the
  ``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs). transformers detects the documents from the position ids and
  asks the mask builder for ``causal AND same-document`` in position-id space (``packed_sequence_pattern``
  recognises it). Inside one document the position ids step by 1 (that is how the documents are found), so that
  pattern is exactly per-document causal attention (and a window in position ids is one in token indices): the
  builder returns a *packed marker* instead of the ``(B, 1, L, S)`` mask, the int32 ``cu_seqlens`` of the
  documents over the ``B * S`` flattened tokens (``packed_marker``), computed once per forward (one
  device-to-host copy of the document ids, as transformers' flash-attention path makes from the position ids).
  An int32 1-D tensor is never a valid SDPA mask (those are bool or float), so the marker cannot be mistaken for
  one. With only the ``cu_seq_lens_*`` kwargs (no packed mask from transformers) they describe the documents,
  as for FlashAttention.
* Padded batches: the 2-D key-padding mask the builder returns for a causal batch. Without a cache offset (the
  queries are all ``S`` positions: training, a first prefill) the valid tokens of each row are gathered into one
  packed sequence (``unpad_plan``). Causal attention inside the gathered tokens is exactly transformers' mask
  ``kv <= q and kv valid`` for every valid query, whatever the padding pattern; a sliding window (absolute
  distance ``q - kv < W``) is exact only when each row's valid tokens are contiguous (left or right padding), so
  rows with holes take the masked dense path. Padded query rows are not computed: their output is 0 (as in
  transformers' flash-attention path; PyTorch's SDPA gives right-padded rows an average of the row's valid
  values). With a cache (queries at the end of longer keys: decoding) the masked dense path reads the cache in
  place, which beats gathering every key again per layer and step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Attributes set on the marker / padding-mask tensors the builder hands to every layer: the host-side facts
# computed once per forward.
_MAX_ATTR = "_llmkernels_max_seqlen"
_PLAN_ATTR = "_llmkernels_unpad_plan"


def closure_values(fn: Callable) -> dict:
    """The values a function closes over, by name (how transformers' mask functions carry their parameters)."""
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None or len(code.co_freevars) != len(cells):
        return {}
    return dict(zip(code.co_freevars, (c.cell_contents for c in cells)))


def packed_sequence_pattern(mask_function: Callable):
    """``(inner, document_ids)`` for transformers' packed-sequence mask
    ``and_masks(remap_positions_for_packed_sequence(inner, position_ids), packed_sequence_mask_function(ids))``,
    else None. Recognised by the code objects of transformers' own factories, never by look-alikes."""
    from transformers import masking_utils as mu
    needed = ("and_masks", "remap_positions_for_packed_sequence", "packed_sequence_mask_function")
    if not all(hasattr(mu, n) for n in needed):
        return None
    if getattr(mask_function, "__code__", None) is not mu.and_masks(mu.causal_mask_function).__code__:
        return None
    parts = closure_values(mask_function).get("mask_functions")
    if not (isinstance(parts, tuple) and len(parts) == 2):
        return None
    remap, same_doc = parts
    ids = torch.zeros(1, 1, dtype=torch.long)
    if getattr(remap, "__code__", None) is not mu.remap_positions_for_packed_sequence(
            mu.causal_mask_function, ids).__code__:
        return None
    if getattr(same_doc, "__code__", None) is not mu.packed_sequence_mask_function(ids).__code__:
        return None
    inner = closure_values(remap).get("mask_function")
    doc_ids = closure_values(same_doc).get("packed_sequence_mask")
    if inner is None or not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2:
        return None
    return inner, doc_ids


def packed_marker(doc_ids: torch.Tensor, device=None) -> torch.Tensor:
    """int32 cu_seqlens ``(N + 1,)`` of the documents of ``doc_ids`` (B, S) over the B * S flattened tokens (a
    document never spans two rows), on ``device`` (default: doc_ids'), with the longest document's length
    attached for every layer."""
    ids = doc_ids.detach().to("cpu", torch.int64)
    B, S = ids.shape
    starts = torch.ones(B, S, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu = torch.cat([first, torch.tensor([B * S])]).to(torch.int32)
    marker = cu.to(doc_ids.device if device is None else device)
    setattr(marker, _MAX_ATTR, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0)
    return marker


def marker_from_position_ids(position_ids: torch.Tensor, batch_size: int) -> Optional[torch.Tensor]:
    """The packed marker of position ids that restart within a row (transformers' rule: a new document wherever
    the id does not grow by 1), or None when every row is one run. Read once per tensor (a device-to-host copy)
    and kept on it for the other layers."""
    cached = getattr(position_ids, _PLAN_ATTR, None)
    if cached is not None and cached[0] == (position_ids._version, batch_size):
        return cached[1]
    ids = position_ids.detach().to("cpu", torch.int64).expand(batch_size, -1)
    restarts = torch.ones(ids.shape, dtype=torch.bool)
    restarts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    marker = None
    if bool(restarts[:, 1:].any()):
        marker = packed_marker(restarts.cumsum(1), position_ids.device)
    setattr(position_ids, _PLAN_ATTR, ((position_ids._version, batch_size), marker))
    return marker


def is_packed_marker(mask) -> bool:
    return isinstance(mask, torch.Tensor) and mask.dim() == 1 and mask.dtype == torch.int32


def max_seqlen_of(cu: torch.Tensor) -> int:
    """The longest sequence of cu_seqlens: attached by ``packed_marker``, else read (a device-to-host copy)."""
    known = getattr(cu, _MAX_ATTR, None)
    if known is not None:
        return known
    lengths = cu[1:] - cu[:-1]
    return int(lengths.max()) if lengths.numel() else 0


def dense_mask_of(cu: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """The complete (B, 1, S, S) bool mask of packed causal documents (for calls varlen cannot run: sinks, an
    additive bias)."""
    T = B * S
    doc = torch.zeros(T, dtype=torch.int64, device=cu.device)
    inner = cu[1:-1].to(torch.int64)
    doc.index_add_(0, inner.clamp(max=T - 1), (inner < T).to(torch.int64))
    doc = doc.cumsum(0).view(B, S)
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(S, S, dtype=torch.bool, device=cu.device).tril()
    return (same & causal)[:, None]


@dataclass
class UnpadPlan:
    """The valid tokens of a (B, S) key-padding mask as one packed sequence per row."""

    rows: torch.Tensor  # (T,) row of each valid token, on the mask's device
    cols: torch.Tensor  # (T,) position of each valid token
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_seqlen: int
    contiguous: bool  # every row's valid tokens are one run (left or right padding)


def unpad_plan(pad: torch.Tensor) -> UnpadPlan:
    """The plan for a (B, S) bool key-padding mask (True = token), computed once per mask tensor (one
    device-to-host copy) and kept on it for the other layers."""
    cached = getattr(pad, _PLAN_ATTR, None)
    if cached is not None and cached[0] == pad._version:
        return cached[1]
    host = pad.detach().to("cpu")
    counts = host.sum(1)
    rows, cols = torch.nonzero(host, as_tuple=True)
    cu = torch.zeros(host.shape[0] + 1, dtype=torch.int32)
    cu[1:] = counts.cumsum(0)
    # A row is one run when its first and last valid positions are count - 1 apart (empty rows count as runs).
    positions = torch.arange(host.shape[1]).expand_as(host)
    first = torch.where(host, positions, host.shape[1]).min(1).values
    last = torch.where(host, positions, -1).max(1).values
    contiguous = bool(((counts == 0) | (last - first + 1 == counts)).all())
    device = pad.device
    plan = UnpadPlan(rows.to(device), cols.to(device), cu.to(device), int(counts.max()) if counts.numel() else 0,
                     contiguous)
    setattr(pad, _PLAN_ATTR, (pad._version, plan))
    return plan


def packed_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> the (B * S, H, D) tokens one after another (a view for B = 1: varlen reads strides)."""
    B, H, S, D = t.shape
    return t.transpose(1, 2).reshape(B * S, H, D)


def varlen_call(query, key, value, cu_q, cu_k, max_q: int, max_k: int, *, dropout: float, scale: Optional[float],
                window: Optional[int], softcap: float):
    """varlen_attention with transformers' causal rule: bottom-right per sequence, a window of ``window`` keys."""
    from ..varlen import varlen_attention
    return varlen_attention(query, key, value, cu_q, cu_k, max_q, max_k, is_causal=True, scale=scale,
                            window_size=(-1, 0) if window is None else (window - 1, 0), softcap=softcap,
                            dropout_p=dropout, enable_gqa=query.shape[1] != key.shape[1])


def unpadded_attention(query, key, value, plan: UnpadPlan, **kw) -> torch.Tensor:
    """Causal attention of a padded batch (queries = all S positions) on its valid tokens; (B, S, Hq, Dv) with
    0 in padded rows."""
    B, Hq, S, _ = query.shape
    idx = (plan.rows, plan.cols)
    q, k, v = (t.transpose(1, 2)[idx] for t in (query, key, value))
    out = varlen_call(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen, **kw)
    return out.new_zeros(B, S, Hq, out.shape[-1]).index_put(idx, out)
