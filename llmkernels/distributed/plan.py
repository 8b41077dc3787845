"""Which local attention calls cover one (query chunks, key chunks) pair of a context-parallel step.

Chunks are the equal pieces of ``layout.py``, named by their global index; a rank's query chunks and a block of
key chunks are each in increasing order. Without causality every query sees every key: one call. With it, query
chunk a sees key chunk b fully when b < a, causally when b == a, not at all when b > a. So a query chunk sees a
prefix of the (sorted) key chunks; when that prefix ends with its own chunk, the call is causal with the
bottom-right alignment (the last query sees the last key; the earlier chunks are fully visible).

Two shortcuts keep the number of calls low: when the query and key chunks are the same set (the ring's first
step: a rank's own K/V), top-left causal attention over the concatenation is exact (each chunk sees the earlier
ones fully and itself causally), one call; and adjacent query chunks with the same fully visible prefix share a
call (the zigzag ring's other steps are each one non-causal call over half the queries or half the keys, and the
all-hidden halves cost nothing).
"""

from __future__ import annotations

from typing import NamedTuple


class LocalCall(NamedTuple):
    q_chunks: tuple  # (first, stop) positions among the query chunks
    kv_chunks: tuple  # (first, stop) positions among the key chunks (always from 0: a prefix)
    causal: bool
    bottom_right: bool  # the causal diagonal sits at the bottom-right of this (q, kv) rectangle


def plan_calls(q_chunks: tuple, kv_chunks: tuple, is_causal: bool) -> list:
    nq, nk = len(q_chunks), len(kv_chunks)
    if not is_causal:
        return [LocalCall((0, nq), (0, nk), False, False)]
    if tuple(q_chunks) == tuple(kv_chunks):
        return [LocalCall((0, nq), (0, nk), True, False)]
    calls = []
    for pos, a in enumerate(q_chunks):
        prefix = sum(1 for b in kv_chunks if b <= a)
        if prefix == 0:
            continue  # every key of the block is in this chunk's future
        diagonal = a in kv_chunks
        last = calls[-1] if calls else None
        if (not diagonal and last is not None and not last.causal and last.q_chunks[1] == pos
                and last.kv_chunks == (0, prefix)):
            calls[-1] = last._replace(q_chunks=(last.q_chunks[0], pos + 1))
        else:
            calls.append(LocalCall((pos, pos + 1), (0, prefix), diagonal, diagonal and prefix > 1))
    return calls
