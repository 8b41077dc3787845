"""Packed variable-length sequences (VARLEN mode of the attention kernels): which sequence a program works on.

The grid of a varlen launch covers the real blocks of all sequences without a table and without a host read of
cu_seqlens. Sequence ``b`` (rows ``[c_b, c_{b+1})`` of the packed tensor, ``c = cu_seqlens``) owns the program
slots ``[c_b // BLOCK + b, c_{b+1} // BLOCK + b + 1)``. That is at least ``cdiv(c_{b+1} - c_b, BLOCK)`` slots
(``floor((c + n) / BLOCK) - floor(c / BLOCK) >= floor(n / BLOCK)``, plus the one extra slot covers a ragged
block), at most one more than needed, and one for an empty sequence. So ``total // BLOCK + B`` slots cover every
block of every sequence, the surplus is at most one program per sequence (it finds no rows and exits), and a
program finds its sequence by a binary search over the B + 1 entries of cu_seqlens (``ceil(log2 B)`` loads):
the work follows the sum over sequences of the blocks, not B times the longest.

Every offset read from cu_seqlens is clamped into ``[0, total]`` and every length to ``>= 0``, so wrong values
(the value checks are optional on a GPU) cannot make a kernel read or write outside the tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sequence_span(CuSeq, b, total):
    """(first row, length) of sequence b, clamped into [0, total]."""
    start = tl.minimum(tl.maximum(tl.load(CuSeq + b), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CuSeq + b + 1), start), total)
    return start, end - start


@triton.jit
def _sequence_block(CuSeq, slot, num_seqs, search_steps, total, BLOCK: tl.constexpr):
    """The program slot ``slot``'s (sequence b, its first row, its length, block index within the sequence).

    A surplus slot gets a block index at or past the sequence's blocks (no row of it is real); with values that
    are not non-decreasing the search may land on a slot before its sequence's first: that slot gets length 0.
    ``search_steps`` = ceil(log2(num_seqs)) halvings of [lo, hi) keep first_slot(lo) <= slot < first_slot(hi)."""
    lo = tl.full([], 0, tl.int32)
    hi = lo + num_seqs
    for _ in range(0, search_steps):
        mid = (lo + hi) // 2
        start = tl.minimum(tl.maximum(tl.load(CuSeq + mid), 0), total)
        right = start // BLOCK + mid <= slot
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    start, length = _sequence_span(CuSeq, lo, total)
    block = slot - (start // BLOCK + lo)
    length = tl.where(block < 0, 0, length)
    block = tl.maximum(block, 0)
    return lo, start, length, block
