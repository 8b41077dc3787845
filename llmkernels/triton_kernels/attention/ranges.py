"""Which blocks of the score matrix a kernel visits: the causal and window rule at block granularity.

Query i sees key j iff ``i + diag - win_left <= j <= i + diag + win_right`` (diag = S - L bottom-right, 0
top-left). A side is tested only when its constexpr says it is bounded: LEFT (a window's left side), RIGHT
(causal, with win_right = 0, or a window's right side); the host passes the effective sides. Rows past L and
keys past S never count: a block is visited only if a real (query, key) pair in it is visible, so a block the
rule hides entirely is never read (the tests fill such blocks with NaN). All divisions take non-negative
operands (integer division rounds toward zero in compiled Triton but not in every interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _key_range(start_m, L, S, diag, win_left, win_right, LEFT: tl.constexpr, RIGHT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of the query block starting at ``start_m``: (lo, plain_lo, plain_hi, hi).

    Keys [lo, plain_lo) and [plain_hi, hi) are partly visible (per-element test), keys [plain_lo, plain_hi) are
    in bounds and visible to every row of the block (no test); lo, plain_lo, plain_hi are multiples of BLOCK_N
    with lo <= plain_lo <= plain_hi, and blocks starting at or past hi see nothing. A block whose rows see no key
    gives four zeros.
    """
    m_last = tl.minimum(start_m + BLOCK_M, L) - 1
    n_in_bounds = (S // BLOCK_N) * BLOCK_N
    lo = 0
    plain_lo = 0
    if LEFT:
        lo = tl.maximum(start_m + diag - win_left, 0)
        # The first key every row sees is the last row's left edge.
        plain_lo = tl.cdiv(tl.maximum(m_last + diag - win_left, 0), BLOCK_N) * BLOCK_N
    hi = S
    plain_hi = n_in_bounds
    if RIGHT:
        hi = tl.minimum(tl.maximum(m_last + diag + win_right + 1, 0), S)
        # The last key every row sees is the first row's right edge.
        plain_hi = tl.minimum((tl.maximum(start_m + diag + win_right + 1, 0) // BLOCK_N) * BLOCK_N, n_in_bounds)
    empty = lo >= hi
    lo = (lo // BLOCK_N) * BLOCK_N
    plain_lo = tl.minimum(tl.maximum(plain_lo, lo), tl.cdiv(hi, BLOCK_N) * BLOCK_N)
    plain_hi = tl.maximum(plain_hi, plain_lo)
    lo = tl.where(empty, 0, lo)
    plain_lo = tl.where(empty, 0, plain_lo)
    plain_hi = tl.where(empty, 0, plain_hi)
    hi = tl.where(empty, 0, hi)
    return lo, plain_lo, plain_hi, hi


@triton.jit
def _query_range(start_n, L, S, diag, win_left, win_right, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows that see some key of the key block starting at ``start_n``: (lo, hi), lo a multiple of
    BLOCK_M; query blocks starting at or past hi see none of these keys (lo >= hi when no row does)."""
    n_last = tl.minimum(start_n + BLOCK_N, S) - 1
    lo = 0
    hi = L
    if RIGHT:
        # Row i sees key j only if j <= i + diag + win_right.
        lo = tl.minimum(tl.maximum(start_n - diag - win_right, 0), L)
    if LEFT:
        hi = tl.minimum(tl.maximum(n_last - diag + win_left + 1, 0), L)
    empty = lo >= hi
    lo = tl.where(empty, 0, (lo // BLOCK_M) * BLOCK_M)
    hi = tl.where(empty, 0, hi)
    return lo, hi


@triton.jit
def _visible(offs_m, offs_n, diag, win_left, win_right, LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """Per-element causal/window test (shapes of offs_m and offs_n broadcast against the score tile)."""
    visible = offs_n >= 0
    if RIGHT:
        visible = visible & (offs_n <= offs_m + (diag + win_right))
    if LEFT:
        visible = visible & (offs_n >= offs_m + (diag - win_left))
    return visible


@triton.jit
def _ranges_test_kernel(Out, L, S, diag, win_left, win_right, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For tests: row b of Out gets the key range of query block b (4 ints) and the query range of key block b."""
    b = tl.program_id(0)
    lo, plain_lo, plain_hi, hi = _key_range(b * BLOCK_M, L, S, diag, win_left, win_right, LEFT, RIGHT, BLOCK_M,
                                            BLOCK_N)
    q_lo, q_hi = _query_range(b * BLOCK_N, L, S, diag, win_left, win_right, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    tl.store(Out + b * 6 + 0, lo)
    tl.store(Out + b * 6 + 1, plain_lo)
    tl.store(Out + b * 6 + 2, plain_hi)
    tl.store(Out + b * 6 + 3, hi)
    tl.store(Out + b * 6 + 4, q_lo)
    tl.store(Out + b * 6 + 5, q_hi)
