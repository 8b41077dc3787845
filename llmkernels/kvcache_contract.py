"""The contract of ``attention_with_kvcache``: argument validation and the canonical form its backends receive.

Layouts are FlashAttention's (``flash_attn_with_kvcache``), so a serving engine's tensors fit without a copy:

query         (B, Lq, Hq, E)
k/v_cache     contiguous (B, S_max, Hkv, E / Ev), or paged (num_pages, page_size, Hkv, E / Ev) with
block_table   (B, max_pages) int32/int64: sequence b's position p lives in page block_table[b, p // page_size],
              row p % page_size. Entries past a sequence's last page are never read (they may be -1).
cache_seqlens an int or an int32/int64 (B,) tensor: each sequence's cache length before the call
k, v          optional (B, Lq, Hkv, E / Ev): new tokens, appended at cache_seqlens[b] .. before attending

The canonical form (``KVCacheArgs``) has the total key count of each sequence after the append,
``seqlens_k = cache_seqlens + Lq`` (or ``cache_seqlens`` without new tokens), as an int32 (B,) tensor on the
query's device, and the score rule in ``contract.ScoreRule``'s folded form. The alignment is always
bottom-right per sequence: query t of sequence b sits at key position ``seqlens_k[b] - Lq + t``, so with new
tokens it sees cache positions ``<= cache_seqlens[b] + t`` under ``is_causal`` (FlashAttention's rule), and
window and ALiBi distances are measured from there, as ``scaled_dot_product_attention`` with
``causal_alignment="bottom_right"`` would on that sequence's keys. ``rule.bottom_right`` is therefore not used.

Value checks (lengths that fit the capacity, listed pages that exist) read ``cache_seqlens`` and the block
table: always for an int or a CPU tensor, for CUDA tensors only with ``validate=True`` (one host
synchronisation). Without them the kernels still never read or write outside the cache: they clamp lengths to
[0, capacity] and skip pages outside [0, num_pages).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from .contract import SUPPORTED_DTYPES, ScoreRule, _check_float_dtype, _check_scale, _check_tensor, _score_rule

PAGE_MULTIPLE = 16  # a page holds a multiple of this many positions (vLLM's pages are 16)
INDEX_DTYPES = (torch.int32, torch.int64)


@dataclass
class KVCacheArgs:
    """Canonical arguments of attention_with_kvcache (see the module docstring)."""

    q: torch.Tensor  # (B, Lq, Hq, E)
    k_cache: torch.Tensor  # (B, S_max, Hkv, E) or (num_pages, page_size, Hkv, E)
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor  # (B,) int32 or int64 on the query's device: lengths before the call
    seqlens_k: torch.Tensor  # (B,) int32: keys each sequence attends over (after the append)
    k: Optional[torch.Tensor]  # (B, Lq, Hkv, E) new keys, or None
    v: Optional[torch.Tensor]
    block_table: Optional[torch.Tensor]  # (B, max_pages) int32/int64, or None (contiguous cache)
    is_causal: bool
    scale: float
    rule: ScoreRule
    num_splits: int  # as the user asked: 0 = heuristic, 1 = no split, n > 1 forced
    capacity: int  # positions each sequence can hold: S_max, or max_pages * page_size

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def appends(self) -> bool:
        return self.k is not None


def _check_4d(name: str, t, dtypes) -> None:
    _check_tensor(name, t)
    _check_float_dtype(name, t, dtypes)
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims, got shape {tuple(t.shape)}")


def _is_tracing() -> bool:
    # Under torch.compile the tensors are fake: their values cannot be read (reading them would break the graph).
    return torch.compiler.is_compiling()


def check_kvcache(query, k_cache, v_cache, cache_seqlens, k=None, v=None, block_table=None, is_causal=False,
                  scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, num_splits=0, validate=False,
                  dtypes=SUPPORTED_DTYPES) -> KVCacheArgs:
    """Validate attention_with_kvcache's arguments (errors name the argument) and return the canonical form."""
    _check_4d("query", query, dtypes)
    _check_4d("k_cache", k_cache, dtypes)
    _check_4d("v_cache", v_cache, dtypes)
    dev = query.device
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must share one dtype")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but query is on {dev}")
    B, Lq, Hq, E = query.shape
    if E == 0:
        raise ValueError("query has head dim 0; the head dim must be at least 1")
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must agree in every "
                         f"dim but the last (head dim)")
    Hkv, Ek, Ev = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
    if Ek != E:
        raise ValueError(f"k_cache has head dim {Ek} but query has {E}; they must be equal")
    if Ev == 0:
        raise ValueError("v_cache has head dim 0; the head dim must be at least 1")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query has {Hq} heads and k_cache/v_cache {Hkv}; the query heads must be a multiple of "
                         f"the cache's heads (GQA / MQA)")

    # The cache layout: paged with a block table, else one row of S_max positions per sequence.
    if block_table is not None:
        _check_tensor("block_table", block_table)
        if block_table.dtype not in INDEX_DTYPES:
            raise TypeError(f"block_table has dtype {block_table.dtype}; it must be int32 or int64")
        if block_table.device != dev:
            raise ValueError(f"block_table is on {block_table.device} but query is on {dev}")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (B, max_pages) = ({B}, max_pages), got "
                             f"{tuple(block_table.shape)}")
        page_size = k_cache.shape[1]
        if page_size == 0 or page_size % PAGE_MULTIPLE != 0:
            raise ValueError(f"the paged k_cache (num_pages, page_size, Hkv, E) has page_size {page_size}; it must "
                             f"be a positive multiple of {PAGE_MULTIPLE}")
        if k_cache.shape[0] == 0:
            raise ValueError("the paged k_cache has 0 pages")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but query has {B} (without block_table the "
                             f"cache is contiguous, (B, S_max, Hkv, E))")
        capacity = k_cache.shape[1]

    # New tokens.
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens' keys and values) or both be None")
    if k is not None:
        for name, t, d in (("k", k, E), ("v", v, Ev)):
            _check_4d(name, t, dtypes)
            if t.dtype != query.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must share one dtype")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but query is on {dev}")
            if tuple(t.shape) != (B, Lq, Hkv, d):
                raise ValueError(f"{name} must have shape (B, Lq, Hkv, {'E' if name == 'k' else 'Ev'}) = "
                                 f"{(B, Lq, Hkv, d)}, got {tuple(t.shape)}")
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            # A stride-0 dim of size > 1 (an expand) is the usual case and traceable; the full test outside tracing.
            if (any(st == 0 and n > 1 for n, st in zip(cache.shape, cache.stride()))
                    or (not _is_tracing() and torch._debug_has_internal_overlap(cache) == 1)):
                raise ValueError(f"{name} has overlapping memory (e.g. an expanded, stride-0 dim); appending k and v "
                                 f"would write one slot for several positions: pass a cache with its own storage")
    new = Lq if k is not None else 0

    # Lengths.
    host_lengths = None
    if isinstance(cache_seqlens, torch.Tensor):
        _check_tensor("cache_seqlens", cache_seqlens)
        if cache_seqlens.dtype not in INDEX_DTYPES:
            raise TypeError(f"cache_seqlens has dtype {cache_seqlens.dtype}; it must be int32 or int64")
        if tuple(cache_seqlens.shape) != (B,):
            raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
        if cache_seqlens.device != dev:
            raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but query is on {dev}")
        lengths = cache_seqlens
        if not _is_tracing() and (dev.type == "cpu" or validate):
            host_lengths = cache_seqlens
    elif isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        n = int(cache_seqlens)
        if n < 0 or n + new > capacity:
            raise ValueError(f"cache_seqlens={n} with {new} new tokens does not fit the cache capacity {capacity} "
                             f"(need 0 <= cache_seqlens and cache_seqlens + Lq <= capacity when appending)")
        lengths = torch.full((B,), n, dtype=torch.int32, device=dev)
        if block_table is not None and not _is_tracing() and (dev.type == "cpu" or validate):
            host_lengths = lengths
    else:
        raise TypeError(f"cache_seqlens must be an int or an int32/int64 tensor of shape (B,), got "
                        f"{type(cache_seqlens).__name__}")
    if host_lengths is not None:
        _check_lengths(host_lengths, new, capacity, block_table, k_cache.shape[0], k_cache.shape[1])

    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    scale = _check_scale(scale, 1.0 / math.sqrt(E))
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = heuristic, 1 = no split), got {num_splits!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    # The score rule, folded against the largest key count any sequence can have (a window side that covers
    # every position of the capacity covers every position of each sequence); always bottom-right.
    is_causal, rule = _score_rule(query, window_size, "bottom_right", softcap, alibi_slopes, None, is_causal, None,
                                  (B, Hq), (B,), Lq, capacity, dtypes)
    seqlens_k = (lengths + new).to(torch.int32) if new else lengths.to(torch.int32)
    return KVCacheArgs(query, k_cache, v_cache, lengths, seqlens_k, k, v, block_table, is_causal, scale, rule,
                       int(num_splits), capacity)


def _check_lengths(lengths: torch.Tensor, new: int, capacity: int, block_table, num_pages: int,
                   page_size: int) -> None:
    """The value checks: every length fits, and every page a sequence uses is listed and exists (reads the
    values: a host synchronisation for CUDA tensors)."""
    n = lengths.to(torch.int64)
    if bool((n < 0).any()):
        raise ValueError(f"cache_seqlens has negative entries: {n.tolist()}")
    total = n + new
    if bool((total > capacity).any()):
        worst = int(total.max())
        raise ValueError(f"cache_seqlens + Lq = {worst} new and cached tokens exceed the cache capacity {capacity} "
                         f"(cache_seqlens {n.tolist()}, {new} new tokens)")
    if block_table is not None:
        used = (total + page_size - 1) // page_size  # pages each sequence touches
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        listed = cols[None, :] < used[:, None]
        bad = listed & ((block_table < 0) | (block_table >= num_pages))
        if bool(bad.any()):
            b, p = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page of the cache "
                             f"(0 .. {num_pages - 1}), and sequence {b} uses that entry")
