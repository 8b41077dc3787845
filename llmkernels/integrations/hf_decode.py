"""The decode route of ``attn_implementation="llmkernels"`` (huggingface.py): a generate() step (a few queries
against a longer cache) runs through ``attention_with_kvcache``'s split-K kernels where that computes exactly
what the dense call would.

transformers hands the attention function the whole cache of each layer as dense ``(B, Hkv, S, D)`` tensors.
Two cases have an exact split-K form:

* no mask (no padding): every sequence's keys are all ``S`` keys, so the cache is a contiguous KV cache with
  ``cache_seqlens = S`` read through a transposed view (no copy);
* a left-padded batch, whose 2-D key-padding mask is True on a suffix ``[p_b, S)`` of each row (``mask_builder``
  checks that once per forward, in the host read it already makes, and records the mask here): the split-K
  kernels cannot start a sequence at ``p_b`` in a contiguous cache, so they read the cache as a *paged* one whose
  pages start at every token (page stride one key: ``as_strided``, no copy) and whose block table lists, for
  sequence b, the pages at ``p_b + m_b, p_b + m_b + 16, ...`` with ``m_b = (S - p_b) % 16``: whole pages that
  end exactly at ``S``, so no page reaches past the tensor. The first ``m_b < 16`` keys ``[p_b, p_b + m_b)``
  are gathered (at most 15 keys per sequence and kv head) and attended densely in float32; the two parts are
  merged exactly through their lse. Positions keep their distance to the queries in both parts, so the causal
  rule and the window (bottom-right, as the dense call) mean the same.

Padding keys are never read by either part. Anything else (a complete 4-D mask, a 2-D mask not known to be a
suffix, a bias, sinks, dropout, a gradient, under torch.compile tracing the left-padded case) keeps the dense path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from .. import dispatch
from ..distributed.merge import merge_partials
from ..kvcache import attention_with_kvcache
from ..kvcache_contract import check_kvcache

# At most this many queries, against more keys than queries (a step with a cache; a prefill without one has
# L == S and stays on the dense kernels, which tile many query rows).
DECODE_MAX_QUERIES = 16
# The page size of the left-padded route's paged view (the smallest the KV-cache kernels take).
PAGE = 16

# 2-D key-padding masks that mask_builder has checked to be True on a suffix of each row (left padding). Keyed
# by the tensor object itself (weakly), so a mask built elsewhere, or a copy, is never taken for one.
_left_padded_masks = WeakTensorKeyDictionary()


def record_left_padded(mask: torch.Tensor) -> None:
    """mask_builder: ``mask`` (B, S) bool is True exactly on ``[p_b, S)`` in each row b."""
    _left_padded_masks[mask] = True


def is_recorded_left_padded(mask: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling() and _left_padded_masks.get(mask, False)


def decode_backend(query, key, value, is_causal: bool, scaling, window_size, softcap: float) -> Optional[str]:
    """The backend that runs this call through attention_with_kvcache, or None for the dense path: a decode-shaped
    call (L <= DECODE_MAX_QUERIES, S > L) without a gradient (the kernels are forward only), where the backend in
    force (under auto, the triton one) takes KV-cache attention of these inputs."""
    L, S = query.shape[2], key.shape[2]
    if not 0 < L <= DECODE_MAX_QUERIES or S <= L or query.shape[1] % max(key.shape[1], 1) != 0:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return None
    requested = dispatch.requested_backend(None)
    name = "triton" if requested == "auto" else requested
    try:
        args = check_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), S, None, None,
                             None, is_causal, scaling, window_size, softcap, None, 0, False)
    except (ValueError, TypeError):
        return None  # the dense path gives its own error for these inputs
    return None if dispatch.get_backend(name).kvcache_reasons(args) else name


def unpadded_decode(query, key, value, is_causal: bool, scaling, window_size, softcap: float, backend: str):
    """(B, L, Hq, Dv): every sequence sees all S keys (a contiguous cache, read in place)."""
    return attention_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key.shape[2],
                                  is_causal=is_causal, scale=scaling, window_size=window_size, softcap=softcap,
                                  backend=backend)


def _token_pages(t: torch.Tensor) -> Optional[torch.Tensor]:
    """``t`` (B, H, S, D) as a paged cache (num_pages, PAGE, H, D) whose page q starts at flat key q =
    b * (stride_b / stride_s) + s: every page of PAGE keys that lies inside one sequence's row. None where the
    strides do not allow it (a batch stride that is not a whole number of keys)."""
    B, H, S, D = t.shape
    sb, sh, ss, sd = t.stride()
    if ss <= 0 or sb % ss != 0 or S < PAGE:
        return None
    row = sb // ss  # keys per batch row, in units of the key stride
    num_pages = (B - 1) * row + S - PAGE + 1  # the last one ends at key S - 1 of the last sequence
    return t.as_strided((num_pages, PAGE, H, D), (ss, ss, sh, sd), t.storage_offset())


def left_padded_decode(query, key, value, pad: torch.Tensor, is_causal: bool, scaling: Optional[float],
                       window_size, softcap: float, backend: str) -> Optional[torch.Tensor]:
    """(B, L, Hq, Dv) for a key-padding mask ``pad`` (B, S) known to be True on ``[p_b, S)``; None where the cache's
    strides do not allow the paged view (the caller then takes the dense path)."""
    B, Hq, L, E = query.shape
    Hkv, S, Ev = key.shape[1], key.shape[2], value.shape[3]
    k_pages, v_pages = _token_pages(key), _token_pages(value)
    if k_pages is None or v_pages is None or key.stride(0) // key.stride(2) != value.stride(0) // value.stride(2):
        return None
    scale = E ** -0.5 if scaling is None else float(scaling)
    device = query.device
    n = pad.sum(-1, dtype=torch.int32)  # valid keys of each sequence, [p_b, S)
    start = S - n  # p_b
    whole = n - n % PAGE  # keys in whole pages: [S - whole, S)
    head = n - whole  # the m_b keys before them: [p_b, p_b + m_b)

    # Part 1: the whole pages, through the split-K kernels (virtual key j = real key S - whole + j).
    max_pages = S // PAGE
    row = key.stride(0) // key.stride(2)
    first = torch.arange(B, device=device, dtype=torch.int32) * row + (S - whole)
    table = first[:, None] + PAGE * torch.arange(max_pages, device=device, dtype=torch.int32)[None, :]
    # entries past a sequence's pages are never read; keep them inside the view anyway
    table = table.clamp_(max=k_pages.shape[0] - 1)
    out1, lse1 = attention_with_kvcache(query.transpose(1, 2), k_pages, v_pages, whole, block_table=table,
                                        is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap,
                                        return_lse=True, backend=backend)

    # Part 2: the first m_b < PAGE keys, gathered and attended in float32 (real key p_b + t, t < m_b).
    t = torch.arange(PAGE - 1, device=device)
    pos = (start[:, None] + t[None, :]).clamp_(max=S - 1)  # (B, PAGE - 1); t >= m_b is hidden below
    idx = pos[:, None, :, None]
    k2 = key.gather(2, idx.expand(B, Hkv, PAGE - 1, E)).float()
    valid = t[None, :] < head[:, None]  # (B, PAGE - 1)
    v2 = value.gather(2, idx.expand(B, Hkv, PAGE - 1, Ev)).float()
    G = Hq // Hkv
    q = query.float().reshape(B, Hkv, G * L, E)  # rows: head g of the group at query position i, row g * L + i
    s = torch.einsum("bhre,bhte->bhrt", q, k2) * scale
    if softcap > 0.0:
        s = softcap * torch.tanh(s / softcap)
    qpos = (S - L + torch.arange(L, device=device)).repeat(G)  # each row's real position
    keep = valid[:, None, None, :]  # (B, 1, 1, T)
    kpos = pos[:, None, None, :]
    if is_causal:
        keep = keep & (kpos <= qpos[None, None, :, None])
    left, right = window_size
    if left >= 0:
        keep = keep & (kpos >= qpos[None, None, :, None] - left)
    if right >= 0:
        keep = keep & (kpos <= qpos[None, None, :, None] + right)
    s = s.masked_fill(~keep, float("-inf"))
    # A slot no row sees (a padding key, a row with fewer than PAGE - 1 keys, a key left of every window) has
    # weight 0, but 0 * NaN or 0 * inf is not 0, so its value must not reach the product.
    v2 = v2.masked_fill(~keep.any(2)[..., None], 0.0)
    lse2 = torch.logsumexp(s, -1)  # (B, Hkv, G * L); -inf where no key
    p2 = torch.exp(s - lse2.nan_to_num(neginf=0.0)[..., None])  # 0 where hidden (and for rows with no key)
    out2 = torch.einsum("bhrt,bhtd->bhrd", p2, v2)

    # Merged exactly through the lse (rows that saw no key in either part give 0).
    out, _ = merge_partials(out1.transpose(1, 2), lse1, out2.reshape(B, Hq, L, Ev), lse2.reshape(B, Hq, L))
    return out.transpose(1, 2).to(query.dtype)  # (B, L, Hq, Ev)
