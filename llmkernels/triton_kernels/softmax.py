"""Fused masked softmax in Triton: ``y = softmax(scale * x + mask)`` over the last dim, and its backward.

The backend interface (see ``dispatch.py``): ``masked_softmax_forward(x, mask, scale, is_causal)`` and
``masked_softmax_backward(grad_y, y, scale)`` on the canonical ``(A, B, M, N)`` form of ``contract.py``: every
tensor is read through its own strides (a transposed view for a non-last softmax dim, stride-0 broadcast dims of
the mask), nothing is expanded or copied; outputs are contiguous and allocated with ``_alloc.new_output``.

Two kernel families, chosen by the row length ``N`` (``plan_rows``):

on chip (``N <= on_chip_max_n()``)
    The whole row lives in registers: one read of ``x`` (and of the mask), one write of ``y``. Short rows are
    processed several to a program (a ``[ROWS, BLOCK_N]`` tile) so that a program always has about 1-2k
    elements to move and tiny rows do not leave the GPU idle.

long rows (``N > on_chip_max_n()``)
    An online softmax (Milakov & Gimelshein 2018): one pass over column blocks keeps a running max and a
    running sum, a second pass recomputes ``exp2(z - max) / sum`` and writes. Two reads of ``x`` (and of the
    mask), one write. When there are many rows one program does both passes of a row in one launch (the second
    read then mostly hits L2). When there are few rows (a handful of 1M-column rows) each row is cut into column
    chunks so that the whole GPU works: launch 1 writes each chunk's (max, sum) to a small fp32 workspace,
    launch 2 merges the chunk statistics of its row and writes its chunk.

Numerics: fp32 arithmetic whatever the input dtype. Without a mask and with a bool mask in base 2 (``log2(e)``
is folded into the scale, so each element costs one ``exp2``); with a float (additive) mask in natural-log units,
``z = scale * x + mask`` and ``exp(z - max)`` (for fp32 Triton emits exactly ``exp2((z - max) * log2(e))``):
scaling the mask by ``log2(e)`` would overflow to -inf below about -2.36e38, so a row whose every entry carries
transformers' ``finfo(dtype).min`` would come out as fully masked (0) instead of uniform, and Triton's
interpreter would warn of the overflow (its ``exp`` is numpy's, which underflows to 0 silently). A row with
nothing left (every entry masked) keeps a max of ``-inf``; the max is then replaced by 0 before subtracting so
that ``exp(-inf - -inf)`` never makes a NaN,
and the row's ``1 / sum`` is taken as 0, so the row gives 0 (and, since ``y = 0``, gradient 0). NaN in ``x``
makes the row's sum NaN and so propagates to the whole row, as in PyTorch.

Causal masking (top-left, over ``(M, N)``) is computed from indices: row ``i`` only loads and exponentiates
columns ``0..i`` (its loads are masked, its online loops stop at column ``i``); the hidden columns are written
as 0 without being read.

Backward: ``dx = scale * y * (dy - sum(dy * y))`` in one fused kernel, with the same two families (one pass on
chip; two passes, optionally chunked, over long rows).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter import interpreting as triton_interpreting
from .compile_check import CompileSpec

LOG2E = 1.4426950408889634

# ---------------------------------------------------------------------------------------------------------------
# Launch configuration
#
# These module-level values are the whole tuning surface. Tests lower them (monkeypatch) so that Triton's
# interpreter, which is slow per operation but not per element, exercises every path on small tensors.

# Longest row done in one read on the GPU: 16384 values over 16 warps are 32 per thread; the forward then needs
# 54-64 registers (2 programs per SM), the backward 78-90, with no spills on sm_80/sm_90 (see compile_specs).
# Beyond that the online path runs.
ON_CHIP_MAX_N = 16384
# The same limit in the interpreter: N = 1000 stays on chip, N = 70000 takes the online path.
INTERPRET_ON_CHIP_MAX_N = 2048

# On-chip tiles: BLOCK_N (power of two >= N) -> (rows per program, num_warps, maxnreg). Short rows share a
# program so that each program moves at least 1-2k elements, 16 per thread (32 for the two largest tiles): several
# 16-byte loads in flight per thread, which is what keeps HBM busy, and tiny rows get 2 warps, long ones 8-16. The table suits sm_80 and sm_90 alike (both want
# about 32 KB in flight per SM, which these programs give at their occupancy); it is kept per arch so that one
# can differ. maxnreg (None: ptxas decides) caps registers where ptxas 13's own occupancy target made it spill
# a few bytes (fp32 tiles up to 1024 on sm_90): with the cap it uses 44-56 registers and no local memory.
_ON_CHIP_TABLE = {
    16: (64, 2, 64),
    32: (32, 2, 64),
    64: (16, 2, 64),
    128: (16, 4, 64),
    256: (8, 4, 64),
    512: (4, 4, 64),
    1024: (2, 4, 64),
    2048: (1, 4, None),
    4096: (1, 8, None),
    8192: (1, 8, None),
    16384: (1, 16, None),
}
ON_CHIP_TABLES = {80: _ON_CHIP_TABLE, 90: _ON_CHIP_TABLE}
MIN_BLOCK_N = 16  # smallest tile width: rows shorter than 16 still use 16 lanes (one 16-byte vector of fp16)

# Online (long-row) path: column block per loop iteration and warps. 4096 columns over 8 warps are 16 values
# per thread per iteration (four 16-byte fp32 loads or two fp16 ones), one tl.max per block; 76-85 registers,
# so 2-3 programs fit an SM. (8192 over 16 warps needs 95-105 registers: one program per SM.)
LONG_BLOCK_N = 4096
LONG_NUM_WARPS = 8
# Without a cap ptxas 13 picks 64 registers for the fp32 kernel on sm_80 and spills 8 bytes inside the loop; with
# 96 it uses 61-96 (no spills in any variant, strided ones included).
LONG_MAXNREG = 96
INTERPRET_LONG_BLOCK_N = 1024

# Column chunking of long rows when there are too few rows to fill the GPU: aim for CHUNK_PROGRAMS_PER_SM
# programs per SM, each chunk at least MIN_CHUNK_BLOCKS column blocks (so the extra launch and the workspace
# stay negligible), at most MAX_CHUNKS chunks per row (the merge loads all of a row's chunk statistics at once).
CHUNK_PROGRAMS_PER_SM = 4
MIN_CHUNK_BLOCKS = 2
MAX_CHUNKS = 128
# The interpreter has no SMs; pretend to have this many so that a few long rows are chunked there too.
INTERPRET_SM_COUNT = 2


def on_chip_max_n() -> int:
    return INTERPRET_ON_CHIP_MAX_N if triton_interpreting() else ON_CHIP_MAX_N


def _long_block_n() -> int:
    return INTERPRET_LONG_BLOCK_N if triton_interpreting() else LONG_BLOCK_N


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _arch(device: torch.device) -> int:
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


@dataclass(frozen=True)
class RowPlan:
    """How rows of length ``n`` are processed (see the module docstring)."""

    on_chip: bool
    block_n: int
    rows_per_program: int  # on chip only
    num_warps: int
    maxnreg: Optional[int] = None  # register cap passed to ptxas (None: its default)
    n_chunks: int = 1  # long rows only: column chunks per row (1: one launch does both passes)
    chunk_cols: int = 0  # long rows only: columns per chunk, a multiple of block_n

    def launch_options(self) -> dict:
        # num_stages 1: nothing here feeds a dot, and the specs are compiled with it (the launch default is 3).
        opts = {"num_warps": self.num_warps, "num_stages": 1}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


def plan_rows(n: int, n_rows: int, device: torch.device) -> RowPlan:
    """The kernel family and launch config for ``n_rows`` rows of ``n`` columns on ``device``."""
    if n <= on_chip_max_n():
        block_n = max(MIN_BLOCK_N, triton.next_power_of_2(n))
        if triton_interpreting():
            # The interpreter's cost is per program and per operation, hardly per element: several rows per
            # program (about 4k elements) keeps the tests fast and still leaves a partial last program.
            return RowPlan(True, block_n, max(1, min(64, 4096 // block_n)), 4)
        rows, warps, maxnreg = ON_CHIP_TABLES[_arch(device)][block_n]
        return RowPlan(True, block_n, rows, warps, maxnreg)
    block_n = _long_block_n()
    n_blocks = triton.cdiv(n, block_n)
    target = CHUNK_PROGRAMS_PER_SM * _sm_count(device)
    n_chunks = 1
    if n_rows < target:
        n_chunks = min(triton.cdiv(target, n_rows), n_blocks // MIN_CHUNK_BLOCKS, MAX_CHUNKS)
        n_chunks = max(1, n_chunks)
    chunk_cols = triton.cdiv(n_blocks, n_chunks) * block_n
    n_chunks = triton.cdiv(n, chunk_cols)  # rounding chunk_cols up may leave fewer chunks
    maxnreg = None if triton_interpreting() else LONG_MAXNREG
    return RowPlan(False, block_n, 1, LONG_NUM_WARPS, maxnreg, n_chunks, chunk_cols)


# ---------------------------------------------------------------------------------------------------------------
# Kernels
#
# Mask kinds (runtime mask_kind): 0 none, 1 bool (True = keep; read from MASK_B), 2 float (added; any float dtype,
# -inf allowed; read from MASK_F). The unused mask pointer gets a stand-in that is never read.
# Rows are numbered r = ((a * B) + b) * M + m over the canonical (A, B, M, N) view; row indices stay in int32
# (the host checks A*B*M < 2**31) and every memory offset is computed in int64.


@triton.jit
def _row_offsets(rows, M, B, s_a, s_b, s_m):
    """int64 offset of the start of each row ``rows`` for a tensor with (A, B, M) strides s_a, s_b, s_m."""
    m = rows % M
    ab = rows // M
    b = ab % B
    a = ab // B
    return a.to(tl.int64) * s_a + b.to(tl.int64) * s_b + m.to(tl.int64) * s_m


@triton.jit
def _logits(X, MASK_F, MASK_B, x_rows, m_rows, cols, load_ok, visible, sxn, smn, scale_log2e, scale, mask_kind):
    """Logits in fp32, ``-inf`` where ``visible`` is False: natural ``scale * x + mask`` with a float mask
    (mask_kind 2), else base-2 ``scale * x * log2(e)`` (see the module docstring); ``_exp_logits`` matches.

    ``x_rows``/``m_rows`` are the int64 row starts (broadcastable against ``cols``). Lanes outside ``load_ok``
    are not read at all; ``visible`` (a subset of ``load_ok``) also hides the few causally masked columns that
    share a 16-byte vector with the diagonal (see ``_load_end``). ``mask_kind`` is a runtime value (the
    branch is uniform over the program), so one compiled kernel serves all three mask kinds.
    """
    c64 = cols.to(tl.int64)
    x = tl.load(X + x_rows + c64 * sxn, mask=load_ok, other=0.0).to(tl.float32)
    if mask_kind == 2:
        add = tl.load(MASK_F + m_rows + c64 * smn, mask=load_ok, other=0.0).to(tl.float32)
        z = x * scale + add
    else:
        z = x * scale_log2e
        if mask_kind == 1:
            keep = tl.load(MASK_B + m_rows + c64 * smn, mask=load_ok, other=0)
            z = tl.where(keep != 0, z, float("-inf"))
    # Not `other=-inf` on the load: scale may be 0 or negative, and -inf * 0 is NaN.
    return tl.where(visible, z, float("-inf"))


@triton.jit
def _exp_logits(d, mask_kind):
    """exp of a difference ``d`` of logits in the units ``_logits`` chose for this mask kind (a uniform branch)."""
    if mask_kind == 2:
        e = tl.exp(d)
    else:
        e = tl.exp2(d)
    return e


@triton.jit
def _load_end(n_seen, N, VEC: tl.constexpr):
    """End of the columns to load for a row whose first ``n_seen`` columns are visible.

    Rounded up to a whole 16-byte vector (VEC elements): a load mask that is constant over each vector keeps the
    loads 16 bytes wide (with the exact causal bound they would be split into scalar loads). On the aligned rows
    where vectors are used at all, the up to VEC - 1 extra columns are in the 16-byte vector that holds column
    ``n_seen - 1``, so no extra memory sector is read; ``visible`` hides them from the sum.
    """
    return tl.minimum((n_seen + (VEC - 1)) // VEC * VEC, N)


@triton.jit
def _safe_max(mx):
    """A row max usable as a subtrahend: a fully masked row (max -inf) subtracts 0 instead (no -inf - -inf)."""
    return tl.where(mx == float("-inf"), 0.0, mx)


@triton.jit
def _inv_sum(l):
    """1 / row sum, 0 for a fully masked row (sum 0) so that it yields 0; a NaN sum stays NaN."""
    # The inner where keeps the division itself away from 0 (no divide-by-zero warnings in the interpreter).
    return tl.where(l == 0.0, 0.0, 1.0 / tl.where(l == 0.0, 1.0, l))


@triton.jit(do_not_specialize=["is_causal", "mask_kind"])
def _fwd_on_chip_kernel(Y, X, MASK_F, MASK_B, R, M, B, N,
                        sxa, sxb, sxm, sxn, sma, smb, smm, smn,
                        scale_log2e, scale, is_causal, mask_kind,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr):
    """ROWS whole rows per program, each held in registers: one read, one write."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < R
    # Causal: row m sees columns 0..m; the rest is not loaded (the tile's lanes compute exp2(-inf) = 0 there,
    # which costs no memory traffic) and is written as 0.
    n_seen = tl.where(is_causal != 0, tl.minimum(rows % M + 1, N), N)
    visible = row_ok[:, None] & (cols[None, :] < n_seen[:, None])
    load_ok = row_ok[:, None] & (cols[None, :] < _load_end(n_seen, N, VEC)[:, None])
    x_rows = _row_offsets(rows, M, B, sxa, sxb, sxm)[:, None]
    m_rows = _row_offsets(rows, M, B, sma, smb, smm)[:, None]  # all 0 without a mask (strides 0)
    z = _logits(X, MASK_F, MASK_B, x_rows, m_rows, cols[None, :], load_ok, visible, sxn, smn, scale_log2e, scale,
                mask_kind)
    mx = _safe_max(tl.max(z, axis=1))
    p = _exp_logits(z - mx[:, None], mask_kind)
    y = p * _inv_sum(tl.sum(p, axis=1))[:, None]
    y_ptrs = Y + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


@triton.jit(do_not_specialize=["is_causal", "mask_kind", "phase"])
def _fwd_long_kernel(Y, X, MASK_F, MASK_B, STATS, R, M, B, N,
                     sxa, sxb, sxm, sxn, sma, smb, smm, smn,
                     scale_log2e, scale, is_causal, mask_kind, chunk_cols, n_chunks, phase,
                     BLOCK_N: tl.constexpr, MAX_CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """Online softmax over one column chunk of one row; program (row, chunk).

    phase 0: the chunk is the whole row: pass 1 (running max and sum), then pass 2 (write), in one launch.
    phase 1: pass 1 only; the chunk's max and sum (in the logits' units) go to STATS, laid out [2, R, n_chunks]
    fp32.
    phase 2: merge the row's chunk statistics from STATS, then pass 2 over this chunk.
    The phase is a runtime value (uniform branches), so one compiled kernel serves all three.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols0 = tl.arange(0, BLOCK_N)
    n_seen = N
    if is_causal != 0:
        n_seen = tl.minimum(row % M + 1, N)
    x_row = _row_offsets(row, M, B, sxa, sxb, sxm)
    m_row = _row_offsets(row, M, B, sma, smb, smm)
    c_begin = chunk * chunk_cols
    c_end = tl.minimum(c_begin + chunk_cols, N)
    seen_end = tl.minimum(c_end, n_seen)  # causal rows stop at their diagonal
    load_end = tl.minimum(c_end, _load_end(n_seen, N, VEC))
    stat = row.to(tl.int64) * n_chunks
    sums = R.to(tl.int64) * n_chunks  # offset of the sums in STATS

    m_run = tl.full([], float("-inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    if phase != 2:
        # Pass 1 over the visible columns only. The block max is reduced once per block (one exp2 per element);
        # the sum stays a per-lane vector, rescaled by a scalar when the max moves, and is reduced once.
        l_vec = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(c_begin, seen_end, BLOCK_N):
            cols = start + cols0
            z = _logits(X, MASK_F, MASK_B, x_row, m_row, cols, cols < load_end, cols < seen_end, sxn, smn,
                        scale_log2e, scale, mask_kind)
            m_new = tl.maximum(m_run, tl.max(z, axis=0))
            m_sub = _safe_max(m_new)
            l_vec = l_vec * _exp_logits(m_run - m_sub, mask_kind) + _exp_logits(z - m_sub, mask_kind)
            m_run = m_new
        l_run = tl.sum(l_vec, axis=0)
        if phase == 1:
            tl.store(STATS + stat + chunk, m_run)
            tl.store(STATS + sums + stat + chunk, l_run)
    if phase != 1:
        if phase == 2:
            # The row's max is the max of the chunk maxima; its sum is each chunk's sum rescaled to that max.
            ks = tl.arange(0, MAX_CHUNKS)
            k_ok = ks < n_chunks
            m_k = tl.load(STATS + stat + ks, mask=k_ok, other=float("-inf"))
            l_k = tl.load(STATS + sums + stat + ks, mask=k_ok, other=0.0)
            m_run = tl.max(m_k, axis=0)
            l_run = tl.sum(l_k * _exp_logits(m_k - _safe_max(m_run), mask_kind), axis=0)
        m_sub = _safe_max(m_run)
        inv = _inv_sum(l_run)
        y_row = Y + row.to(tl.int64) * N
        # Pass 2 writes every column of the chunk; the columns a causal row cannot see are written 0, unread.
        for start in range(c_begin, c_end, BLOCK_N):
            cols = start + cols0
            z = _logits(X, MASK_F, MASK_B, x_row, m_row, cols, cols < load_end, cols < seen_end, sxn, smn,
                        scale_log2e, scale, mask_kind)
            y = _exp_logits(z - m_sub, mask_kind) * inv
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < c_end)


@triton.jit
def _bwd_on_chip_kernel(DX, DY, Y, R, M, B, N,
                        sda, sdb, sdm, sdn, sya, syb, sym, syn, scale,
                        ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = scale * y * (dy - sum(dy * y)) for ROWS whole rows per program held in registers."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols[None, :] < N)
    dy_rows = _row_offsets(rows, M, B, sda, sdb, sdm)[:, None]
    y_rows = _row_offsets(rows, M, B, sya, syb, sym)[:, None]
    c64 = cols.to(tl.int64)[None, :]
    dy = tl.load(DY + dy_rows + c64 * sdn, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(Y + y_rows + c64 * syn, mask=ok, other=0.0).to(tl.float32)
    dot = tl.sum(dy * y, axis=1)
    dx = scale * y * (dy - dot[:, None])
    tl.store(DX + rows.to(tl.int64)[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["phase"])
def _bwd_long_kernel(DX, DY, Y, PARTIAL, R, M, B, N,
                     sda, sdb, sdm, sdn, sya, syb, sym, syn, scale, chunk_cols, n_chunks, phase,
                     BLOCK_N: tl.constexpr, MAX_CHUNKS: tl.constexpr):
    """The backward over one column chunk of one long row; program (row, chunk).

    phase 0: pass 1 (sum(dy * y) over the row) then pass 2 (write), one launch. phase 1: the chunk's partial
    sum goes to PARTIAL[row, chunk]. phase 2: add up the row's partial sums, then pass 2 over this chunk.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols0 = tl.arange(0, BLOCK_N)
    dy_row = _row_offsets(row, M, B, sda, sdb, sdm)
    y_row = _row_offsets(row, M, B, sya, syb, sym)
    c_begin = chunk * chunk_cols
    c_end = tl.minimum(c_begin + chunk_cols, N)
    part = row.to(tl.int64) * n_chunks

    dot = tl.full([], 0.0, tl.float32)
    if phase != 2:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(c_begin, c_end, BLOCK_N):
            cols = start + cols0
            c64 = cols.to(tl.int64)
            ok = cols < c_end
            dy = tl.load(DY + dy_row + c64 * sdn, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(Y + y_row + c64 * syn, mask=ok, other=0.0).to(tl.float32)
            acc += dy * y
        dot = tl.sum(acc, axis=0)
        if phase == 1:
            tl.store(PARTIAL + part + chunk, dot)
    if phase != 1:
        if phase == 2:
            ks = tl.arange(0, MAX_CHUNKS)
            dot = tl.sum(tl.load(PARTIAL + part + ks, mask=ks < n_chunks, other=0.0), axis=0)
        dx_row = DX + row.to(tl.int64) * N
        for start in range(c_begin, c_end, BLOCK_N):
            cols = start + cols0
            c64 = cols.to(tl.int64)
            ok = cols < c_end
            dy = tl.load(DY + dy_row + c64 * sdn, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(Y + y_row + c64 * syn, mask=ok, other=0.0).to(tl.float32)
            dx = scale * y * (dy - dot)
            tl.store(dx_row + cols, dx.to(DX.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------------------------
# Host launchers (the backend interface)

_MAX_INDEX = 2**31 - 2**20  # headroom: program and block starts run up to a block past the last row / column
_standins: dict = {}


def _standin(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor passed for a pointer argument the kernel will not read (cached per device)."""
    key = (dtype, device)
    t = _standins.get(key)
    if t is None:
        t = _standins[key] = torch.zeros(1, dtype=dtype, device=device)
    return t


def _check_sizes(n_rows: int, n: int) -> None:
    # Row and column indices are int32 in the kernels (every memory offset is int64).
    if n_rows > _MAX_INDEX or n > _MAX_INDEX:
        raise ValueError(f"masked_softmax: at most {_MAX_INDEX} rows of at most {_MAX_INDEX} columns, got "
                         f"{n_rows} rows of {n} columns")


def _device_ctx(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _mask_args(mask, x: torch.Tensor):
    """(MASK_F, MASK_B, strides, kind) for the kernels: the mask in its own pointer slot, a stand-in in the other.

    Without a mask the strides are (0, 0, 0, 1): the same value classes as a broadcast mask's, so the no-mask
    launch reuses the masked launches' compiled kernel (the JIT specialises a stride of 1 and multiples of 16).
    """
    if mask is None:
        return x, _standin(torch.bool, x.device), (0, 0, 0, 1), 0
    if mask.dtype == torch.bool:
        return x, mask, mask.stride(), 1
    return mask, _standin(torch.bool, x.device), mask.stride(), 2


def masked_softmax_forward(x: torch.Tensor, mask, scale: float, is_causal: bool) -> torch.Tensor:
    """y = softmax(scale * x + mask) over the last dim of the canonical (A, B, M, N) x; y contiguous, x.dtype."""
    A, B, M, N = x.shape
    R = A * B * M
    _check_sizes(R, N)
    y = _alloc.new_output((A, B, M, N), x.dtype, x.device)
    if R == 0 or N == 0:
        return y
    mask_f, mask_b, m_strides, kind = _mask_args(mask, x)
    plan = plan_rows(N, R, x.device)
    args = (y, x, mask_f, mask_b)
    sizes = (R, M, B, N, *x.stride(), *m_strides, float(scale) * LOG2E, float(scale), int(is_causal), kind)
    vec = 16 // x.element_size()  # elements per 16-byte vector
    with _device_ctx(x):
        if plan.on_chip:
            grid = (triton.cdiv(R, plan.rows_per_program),)
            _fwd_on_chip_kernel[grid](*args, *sizes, ROWS=plan.rows_per_program, BLOCK_N=plan.block_n, VEC=vec,
                                      **plan.launch_options())
        elif plan.n_chunks == 1:
            stats = _standin(torch.float32, x.device)  # not read in phase 0
            _fwd_long_kernel[(R, 1)](*args, stats, *sizes, plan.chunk_cols, 1, 0, BLOCK_N=plan.block_n,
                                     MAX_CHUNKS=MAX_CHUNKS, VEC=vec, **plan.launch_options())
        else:
            # Scratch, not an output: launch 1 writes every element before launch 2 reads it.
            stats = torch.empty((2, R, plan.n_chunks), dtype=torch.float32, device=x.device)
            for phase in (1, 2):
                _fwd_long_kernel[(R, plan.n_chunks)](*args, stats, *sizes, plan.chunk_cols, plan.n_chunks, phase,
                                                     BLOCK_N=plan.block_n, MAX_CHUNKS=MAX_CHUNKS, VEC=vec,
                                                     **plan.launch_options())
    return y


def masked_softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """dx = scale * y * (dy - sum(dy * y)) over the last dim; (A, B, M, N) contiguous in y.dtype."""
    A, B, M, N = y.shape
    if tuple(grad_y.shape) != (A, B, M, N):
        raise ValueError(f"grad_y has shape {tuple(grad_y.shape)}, expected y's shape {(A, B, M, N)}")
    R = A * B * M
    _check_sizes(R, N)
    dx = _alloc.new_output((A, B, M, N), y.dtype, y.device)
    if R == 0 or N == 0:
        return dx
    plan = plan_rows(N, R, y.device)
    sizes = (R, M, B, N, *grad_y.stride(), *y.stride(), float(scale))
    with _device_ctx(y):
        if plan.on_chip:
            grid = (triton.cdiv(R, plan.rows_per_program),)
            _bwd_on_chip_kernel[grid](dx, grad_y, y, *sizes, ROWS=plan.rows_per_program, BLOCK_N=plan.block_n,
                                      **plan.launch_options())
        elif plan.n_chunks == 1:
            partial = _standin(torch.float32, y.device)  # not read in phase 0
            _bwd_long_kernel[(R, 1)](dx, grad_y, y, partial, *sizes, plan.chunk_cols, 1, 0, BLOCK_N=plan.block_n,
                                     MAX_CHUNKS=MAX_CHUNKS, **plan.launch_options())
        else:
            partial = torch.empty((R, plan.n_chunks), dtype=torch.float32, device=y.device)
            for phase in (1, 2):
                _bwd_long_kernel[(R, plan.n_chunks)](dx, grad_y, y, partial, *sizes, plan.chunk_cols,
                                                     plan.n_chunks, phase, BLOCK_N=plan.block_n,
                                                     MAX_CHUNKS=MAX_CHUNKS, **plan.launch_options())
    return dx


# ---------------------------------------------------------------------------------------------------------------
# Static compile specs: every config the GPU path can choose, for sm_80 and sm_90.

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.bool: "*i1"}
_RUNTIME_FLAGS = ("is_causal", "mask_kind", "phase")  # do_not_specialize: plain i32 whatever the value


def _params(fn) -> list:
    """(name, is_constexpr) of a kernel's parameters, from the Python function (so that the specs can also be
    listed where Triton's interpreter has replaced the JITFunction, e.g. in the test session)."""
    import inspect

    python_fn = getattr(fn, "fn", fn)
    return [(p.name, p.annotation in (tl.constexpr, "tl.constexpr"))
            for p in inspect.signature(python_fn).parameters.values()]


def _spec(name: str, fn, args: dict, num_warps: int, maxnreg: Optional[int]) -> CompileSpec:
    """A CompileSpec typed as Triton's launcher types the launch with these argument values.

    A string is a pointer type (torch allocations are 16-byte aligned: divisibility 16); an int equal to 1 is
    specialised to the constant 1 (unit strides: what makes loads vectorise), other ints are i32 with the
    divisibility-16 hint when it holds, except the do_not_specialize flags; floats are fp32.
    """
    signature, constexprs, attrs = {}, {}, {}
    for index, (arg, is_constexpr) in enumerate(_params(fn)):
        value = args[arg]
        if is_constexpr:
            signature[arg], constexprs[arg] = "constexpr", value
        elif isinstance(value, str):
            signature[arg] = value
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        elif arg in _RUNTIME_FLAGS:
            signature[arg] = "i32"
        elif value == 1:
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return CompileSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=num_warps,
                       num_stages=1, attrs=attrs, options={} if maxnreg is None else {"maxnreg": maxnreg})


def _layout(n: int, aligned: bool) -> dict:
    """Representative sizes and strides: x (A=2, B=3, M=5, N) contiguous with a (M, N) broadcast mask when
    ``aligned`` (N a multiple of 16: 16-byte vector loads); otherwise odd N, x a transposed view (last-dim
    stride N_other = 7) and a (1, N) mask: scalar, strided loads, the other JIT variant of each kernel."""
    A, B, M = 2, 3, 5
    if aligned:
        N = n
        sx, sm = (B * M * N, M * N, N, 1), (0, 0, N, 1)
    else:
        N = n - 1
        sx, sm = (B * M * N * 7, M * N * 7, 1, M * 7), (0, 0, 0, 1)
    return {"R": A * B * M, "M": M, "B": B, "N": N,
            "sxa": sx[0], "sxb": sx[1], "sxm": sx[2], "sxn": sx[3], "sma": sm[0], "smb": sm[1], "smm": sm[2],
            "smn": sm[3], "sda": sx[0], "sdb": sx[1], "sdm": sx[2], "sdn": sx[3],
            "sya": B * M * N, "syb": M * N, "sym": N, "syn": 1,  # y: the forward's contiguous output
            "scale_log2e": 1.0, "scale": 1.0, "is_causal": 0, "mask_kind": 2, "phase": 0,
            "chunk_cols": 16 * LONG_BLOCK_N, "n_chunks": 4}


def compile_specs(arch: int) -> list:
    """Every kernel and tile ``plan_rows`` can launch on ``sm_<arch>``, forward and backward, all dtypes.

    Mask kind (none / bool / float), causality and the long-row phase are runtime arguments of one compiled
    kernel (uniform branches), so each spec below covers all of them. Listed per dtype: every on-chip tile of
    ``ON_CHIP_TABLES[arch]`` and the long-row kernel for aligned contiguous rows (16-byte loads); the largest
    tile and the long kernel again for odd, strided rows (the JIT's scalar-load variant, more registers for
    addresses); and the largest tiles of 16-bit inputs with an fp32 float mask (a common mixed case).
    """
    table = ON_CHIP_TABLES[arch]
    largest = max(table)
    specs = []

    def fwd(dt, mask_dt, block_n, aligned, tag=""):
        lay = "" if aligned else "_strided"
        args = {**_layout(block_n or LONG_BLOCK_N * 3, aligned), "Y": _PTR[dt], "X": _PTR[dt],
                "MASK_F": _PTR[mask_dt], "MASK_B": "*i1", "STATS": "*fp32", "BLOCK_N": block_n,
                "MAX_CHUNKS": MAX_CHUNKS, "VEC": 4 if dt == torch.float32 else 8}
        name = str(dt).replace("torch.", "") + tag + lay
        if block_n is None:
            args["BLOCK_N"] = LONG_BLOCK_N
            return _spec(f"softmax_fwd_long_{name}_n{LONG_BLOCK_N}_w{LONG_NUM_WARPS}", _fwd_long_kernel, args,
                         LONG_NUM_WARPS, LONG_MAXNREG)
        rows, warps, maxnreg = table[block_n]
        args["ROWS"] = rows
        return _spec(f"softmax_fwd_onchip_{name}_n{block_n}_r{rows}_w{warps}", _fwd_on_chip_kernel, args, warps,
                     maxnreg)

    def bwd(dt, block_n, aligned):
        lay = "" if aligned else "_strided"
        args = {"DX": _PTR[dt], "DY": _PTR[dt], "Y": _PTR[dt], "PARTIAL": "*fp32", "MAX_CHUNKS": MAX_CHUNKS}
        name = str(dt).replace("torch.", "") + lay
        if block_n is None:
            args.update(_layout(LONG_BLOCK_N * 3, aligned), BLOCK_N=LONG_BLOCK_N)
            return _spec(f"softmax_bwd_long_{name}_n{LONG_BLOCK_N}_w{LONG_NUM_WARPS}", _bwd_long_kernel, args,
                         LONG_NUM_WARPS, LONG_MAXNREG)
        rows, warps, maxnreg = table[block_n]
        args.update(_layout(block_n, aligned), ROWS=rows, BLOCK_N=block_n)
        return _spec(f"softmax_bwd_onchip_{name}_n{block_n}_r{rows}_w{warps}", _bwd_on_chip_kernel, args, warps,
                     maxnreg)

    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for block_n in list(table) + [None]:
            specs.append(fwd(dt, dt, block_n, True))
            specs.append(bwd(dt, block_n, True))
        for block_n in (largest, None):
            specs.append(fwd(dt, dt, block_n, False))
            specs.append(bwd(dt, block_n, False))
            if dt != torch.float32:
                specs.append(fwd(dt, torch.float32, block_n, True, tag="_fp32mask"))
    for spec in specs:
        # Contiguous rows of a multiple of 16 columns must move in 16-byte vectors (LDG.E.128 / STG.E.128 in the
        # SASS; the report flags a spec that lost them). Strided rows cannot.
        if "_strided" not in spec.name:
            spec.expect_sass = ("LDG.128", "STG.128")
    return specs


def excluded_configs(arch: int) -> list:
    """Configs deliberately not chosen on ``sm_<arch>``, with the reason."""
    return [
        (f"on-chip rows longer than {ON_CHIP_MAX_N} columns",
         "a whole row of 32768 fp32 values over 16 warps is 64 values per thread plus the mask: register "
         "pressure (spills or one program per SM); the online path moves the same HBM bytes, its second read "
         "mostly from L2"),
    ]
