"""KV-cache attention for decoding: ``llmkernels.attention_with_kvcache`` (after FlashAttention-2's
``flash_attn_with_kvcache``), its torch.library ops and the choice of the key split.

Two ops in the ``llmkernels`` namespace, each taking the canonical form of ``kvcache_contract.py`` and a concrete
backend name (dispatch.choose_kvcache_backend), so torch.compile sees constants:

  llmkernels::kvcache_append     writes the new tokens into k_cache / v_cache in place (declared mutated)
  llmkernels::kvcache_attention  -> (out, lse) over each sequence's seqlens_k[b] keys; pure

The append is its own op so that a decode step without new tokens declares no mutation (torch.compile would
otherwise functionalise, i.e. copy, the whole cache). Forward only: nothing here has a gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .contract import ScoreRule
from .kvcache_contract import check_kvcache

# The split heuristic (num_splits=0). A split is worth its merge only while the launch has too few programs to
# fill the device; each split keeps at least MIN_KEYS_PER_SPLIT keys so its fixed cost (Q load, partial store)
# stays small against its K/V reads; at most MAX_SPLITS partial results per row.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 64
WAVES = 2  # aim for this many programs per SM
ROWS_PER_PROGRAM = 64  # query rows (heads of one group x Lq) one decode program takes at most
# Off CUDA (Triton's interpreter on CPU tensors) there is no SM count; this small one makes the heuristic split.
INTERPRETER_SM_COUNT = 4

_sm_counts: dict = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a property query, no synchronisation), cached."""
    if device.type != "cuda":
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def choose_num_splits(B: int, Hkv: int, rows: int, max_keys: int, sms: int) -> int:
    """Key splits for num_splits=0, from shapes and the largest possible key count only (never from the lengths'
    values, which would need a host read): enough (batch, kv head, row block, split) programs for WAVES per SM,
    each split at least MIN_KEYS_PER_SPLIT keys long."""
    programs = B * Hkv * -(-rows // ROWS_PER_PROGRAM)
    if programs == 0:
        return 1
    wanted = -(-WAVES * sms // programs)
    by_length = max(1, max_keys // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@torch.library.custom_op("llmkernels::kvcache_append", mutates_args=("k_cache", "v_cache"))
def kvcache_append(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                   block_table: Optional[Tensor], backend: str) -> None:
    """k[b, t] / v[b, t] to position cache_seqlens[b] + t of sequence b; nothing else is written."""
    dispatch.get_backend(backend).kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table)


@kvcache_append.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, block_table, backend):
    return None


@torch.library.custom_op("llmkernels::kvcache_attention", mutates_args=())
def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor],
                      is_causal: bool, scale: float, window_left: int, window_right: int, softcap: float,
                      alibi_slopes: Optional[Tensor], num_splits: int, backend: str) -> tuple[Tensor, Tensor]:
    """out (B, Lq, Hq, Ev) in q's dtype, lse (B, Hq, Lq) float32; num_splits >= 1 (already chosen)."""
    rule = ScoreRule(window_left, window_right, False, softcap, alibi_slopes, None)
    return dispatch.get_backend(backend).kvcache_forward(q, k_cache, v_cache, seqlens_k, block_table, is_causal,
                                                         scale, rule, num_splits)


@kvcache_attention.register_fake
def _(q, k_cache, v_cache, seqlens_k, block_table, is_causal, scale, window_left, window_right, softcap,
      alibi_slopes, num_splits, backend):
    B, Lq, Hq, _ = q.shape
    return q.new_empty(B, Lq, Hq, v_cache.shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


def attention_with_kvcache(query, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None,
                           is_causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           num_splits=0, return_lse=False, validate=False, backend=None):
    """Attention of a few new queries against a (paged) KV cache, with an optional in-place append; forward only.

    Layouts are FlashAttention's: ``query (B, Lq, Hq, E)``; a contiguous cache ``k_cache (B, S_max, Hkv, E)``,
    ``v_cache (B, S_max, Hkv, Ev)``, or a paged one ``(num_pages, page_size, Hkv, E / Ev)`` with ``block_table
    (B, max_pages)`` int32/int64 listing each sequence's pages in order (page_size a multiple of 16; entries past
    a sequence's last page are never read and may hold anything, -1 included). Any strides.

    cache_seqlens: an int or an int32/int64 ``(B,)`` tensor on the query's device: each sequence's cache length
        before this call. The call does not change it (the caller advances it).
    k, v: optional ``(B, Lq, Hkv, E / Ev)`` new tokens, written into the caches in place at positions
        ``cache_seqlens[b] ..`` (through the block table when paged) before attending; attention then runs over
        ``cache_seqlens[b] + Lq`` keys. Nothing else in the caches is written.
    is_causal: query ``t`` sees cache positions ``<= cache_seqlens[b] + t`` with new tokens, ``<=
        cache_seqlens[b] - Lq + t`` without (bottom-right). ``window_size``, ``softcap`` and ``alibi_slopes``
        (``(Hq,)`` or ``(B, Hq)`` float32) mean what they mean in ``scaled_dot_product_attention`` with
        ``causal_alignment="bottom_right"`` on each sequence's keys.
    num_splits: split of each sequence's key range (flash-decoding): 0 picks it from B, Hkv, the largest possible
        length and the device's SM count; 1 does not split, and then each sequence's result is bitwise the same
        whatever else is in the batch; n > 1 forces n.
    return_lse: also return the float32 natural-log lse ``(B, Hq, Lq)``. A row that sees no key gives 0 and -inf.
    validate: for a CUDA ``cache_seqlens`` tensor, also check that every length fits (``cache_seqlens + Lq <=
        capacity``) and that every page used is a page of the cache: one host synchronisation, so off by default
        (and impossible inside a CUDA graph). An int or a CPU tensor is always checked. Unchecked values never
        make a kernel read or write outside the cache (lengths are clamped, unknown pages skipped), but give
        meaningless results.
    backend: ``"triton"`` (split-K decode kernels), ``"reference"``, or ``"auto"``; the CUDA C++ backend has no
        KV-cache kernel and says so.
    Returns ``out (B, Lq, Hq, Ev)`` in the query's dtype (and lse).
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    a = check_kvcache(query, k_cache, v_cache, cache_seqlens, k, v, block_table, is_causal, scale, window_size,
                      softcap, alibi_slopes, num_splits, validate)
    name = dispatch.choose_kvcache_backend(a, backend)
    B, Lq, Hq, _ = a.q.shape
    Hkv, Ev = a.k_cache.shape[2], a.v_cache.shape[3]
    if B * Lq == 0:
        out = a.q.new_zeros(B, Lq, Hq, Ev)
        lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=a.q.device)
        return (out, lse) if return_lse else out
    if a.appends:
        kvcache_append(a.k_cache, a.v_cache, a.k, a.v, a.cache_seqlens, a.block_table, name)
    splits = a.num_splits
    if splits == 0:
        max_keys = a.capacity
        if not isinstance(cache_seqlens, torch.Tensor):
            max_keys = min(a.capacity, int(cache_seqlens) + (Lq if a.appends else 0))
        splits = choose_num_splits(B, Hkv, (Hq // Hkv) * Lq, max_keys, sm_count(a.q.device))
    rule = a.rule
    out, lse = kvcache_attention(a.q, a.k_cache, a.v_cache, a.seqlens_k, a.block_table, a.is_causal, a.scale,
                                 rule.window_left, rule.window_right, rule.softcap, rule.alibi_slopes, splits, name)
    return (out, lse) if return_lse else out
