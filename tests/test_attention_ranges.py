"""The block ranges of the Triton attention kernels (attention/ranges.py) against a brute-force count of the
visible (query, key) pairs: every visible pair lies in a visited block, every visited block holds a visible pair
(so hidden blocks are never read), and the no-test ("plain") blocks are in bounds and visible to every row."""

import itertools

import pytest
import torch

from llmkernels.triton_kernels.attention.ranges import _ranges_test_kernel


def _visible(L, S, d, left, right):
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool)
    if left >= 0:
        ok &= j >= i + d - left
    if right >= 0:
        ok &= j <= i + d + right
    return ok


def _kernel_ranges(L, S, d, left, right, bm, bn):
    n = max(triton_cdiv(L, bm), triton_cdiv(S, bn))
    out = torch.full((n, 6), -99, dtype=torch.int32)
    _ranges_test_kernel[(n,)](out, L, S, d, max(left, 0), max(right, 0), LEFT=left >= 0, RIGHT=right >= 0,
                              BLOCK_M=bm, BLOCK_N=bn)
    return out.tolist()


def triton_cdiv(a, b):
    return -(-a // b)


def _cases():
    cases = []
    for L, S in ((1, 1), (5, 37), (37, 5), (33, 33), (48, 17), (16, 64)):
        for bottom_right in (False, True):
            d = S - L if bottom_right else 0
            for left, right in ((-1, -1), (-1, 0), (3, 0), (0, 0), (20, -1), (2, 5), (-1, 7), (0, 1), (40, 0)):
                for bm, bn in ((16, 16), (32, 16), (16, 32)):
                    cases.append((L, S, d, left, right, bm, bn))
    return cases


CASES = _cases()


def test_block_ranges_match_brute_force():
    for L, S, d, left, right, bm, bn in CASES:
        vis = _visible(L, S, d, left, right)
        ranges = _kernel_ranges(L, S, d, left, right, bm, bn)
        where = (L, S, d, left, right, bm, bn)
        for mb in range(triton_cdiv(L, bm)):
            lo, plain_lo, plain_hi, hi = ranges[mb][:4]
            rows = vis[mb * bm:(mb + 1) * bm]
            visited = set(range(lo, plain_lo, bn)) | set(range(plain_lo, plain_hi, bn)) | set(range(plain_hi, hi, bn))
            assert lo <= plain_lo <= plain_hi and lo % bn == plain_lo % bn == plain_hi % bn == 0, where
            # disjoint phases: the checked phases end where the plain one starts
            assert len(visited) == len(range(lo, plain_lo, bn)) + len(range(plain_lo, plain_hi, bn)) + len(
                range(plain_hi, hi, bn)), where
            for nb in range(0, S, bn):
                sees = bool(rows[:, nb:nb + bn].any())
                assert (nb in visited) == sees, (where, mb, nb, ranges[mb])
            for nb in range(plain_lo, plain_hi, bn):
                assert nb + bn <= S and bool(rows[:, nb:nb + bn].all()), (where, mb, nb)
        for nb in range(triton_cdiv(S, bn)):
            q_lo, q_hi = ranges[nb][4:]
            cols = vis[:, nb * bn:(nb + 1) * bn]
            assert q_lo % bm == 0, where
            visited = set(range(q_lo, q_hi, bm))
            for mb in range(0, L, bm):
                assert (mb in visited) == bool(cols[mb:mb + bm].any()), (where, nb, mb, ranges[nb])
