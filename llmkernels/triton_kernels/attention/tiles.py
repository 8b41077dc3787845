"""The ``@triton.jit`` helpers every attention kernel shares: tile loads, the score rule, the dropout pattern,
and the opening of the kernels that own one query block (forward and dQ).

- The score rule (contract.ScoreRule) under constexpr flags too: softcap (HAS_SOFTCAP; ``_tanh`` from exp2),
  ALiBi (HAS_ALIBI), the window's sides (WINDOW_LEFT, WINDOW_RIGHT) with the alignment's diagonal offset
  ``diag`` (a runtime int, 0 top-left), and sinks in the forward (HAS_SINKS). Which blocks are visited is
  ranges.py's.
- Masks are read tile by tile through their own strides (stride 0 on broadcast dims: a (L, S) mask costs one
  L x S read per (batch, head), from L2), never expanded. Optional features are constexpr flags (HAS_MASK,
  MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, WRITE_DMASK), so a call without them compiles to none of their code.
- Dropout: the keep pattern is regenerated from Philox (``tl.rand(seed, offset)``, spelled out in
  ``_dropout_keep`` so the stream is the same on every Triton version) wherever it is needed, with the 64-bit
  offset ``base + ((b * Hq + h) * L + i) * S + j``; nothing is stored. Kept weights are scaled by 1 / (1 - p).
  ``_dropout_keep_mask_kernel`` runs the same helper to hand the exact pattern to tests.

Score units. Without a mask and with a bool mask the scores are kept in base 2 (log2(e) folded into the scale
once, so each exponential is one ``exp2``). With a float (additive) mask they stay in natural-log units:
``s = scale * q.k + mask``, running max and lse natural, and each exponential is ``exp(s - m)``, which Triton
lowers for fp32 to exactly ``exp2((s - m) * log2(e))`` (one multiply, one ``ex2``). Scaling the mask by log2(e)
instead would overflow to -inf for mask values below about -2.36e38: transformers' ``(1 - mask) *
finfo(dtype).min`` masks would then turn a row whose every key carries that value into a "fully masked" row
(output 0), where the contract (and PyTorch) add the finite value and average V. In Triton's interpreter
``exp`` is numpy's, which underflows to 0 silently where ``(s - m) * log2(e)`` would overflow with a warning.
``_score_scale`` and ``_exp_scores`` make the choice, by constexpr, so the base-2 paths compile as before.

The kernels write log2(e) = 1.4426950408889634 (exp(x) = exp2(x * log2(e))) and ln(2) = 0.6931471805599453
(ln(x) = log2(x) * ln(2)) as literals: plain Python globals are not constants inside @triton.jit code.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ranges import _key_range, _visible
from .seqlens import _sequence_block, _sequence_span


@triton.jit
def _load_rows(ptrs, rows, n_rows, cols, N_COLS: tl.constexpr, BLOCK_COLS: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows x BLOCK_COLS) tile, zero outside [0, n_rows) x [0, N_COLS).

    The column test exists only for padded head dims (N_COLS < BLOCK_COLS, e.g. 72 in a 128 block) and the row
    test only where the caller asks for it, so a full tile of a power-of-two head dim is a plain load.
    """
    if CHECK_ROWS:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < N_COLS), other=0.0)
    else:
        if N_COLS == BLOCK_COLS:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=cols[None, :] < N_COLS, other=0.0)
    return tile


@triton.jit
def _dropout_keep(seed, row_offsets, col_offsets, dropout_p):
    """The dropout keep pattern (True = keep) of a tile: Philox at 64-bit offset row_offsets + col_offsets.

    row_offsets already holds base + ((b * Hq + h) * L + i) * S in int64; the caller arranges the two vectors as
    a column and a row (either orientation), so the forward, both backward passes and ``dropout_keep_mask``
    draw bit-identical patterns. ``tl.rand`` is uniform in [0, 1); keeping ``u >= p`` keeps with probability
    1 - p, the convention of the reference (``rand >= p``).
    """
    offsets = row_offsets + col_offsets
    # tl.rand(seed, offsets) spelled out: Philox on 32-bit counter words (low, high half of the 64-bit offset).
    # Triton 3.8's tl.rand does exactly this for int64 offsets; older versions ran a 64-bit Philox instead, which
    # costs twice the registers. Spelling it out pins one stream (and one cost) across Triton versions.
    zero = tl.zeros(offsets.shape, tl.uint32)
    bits, _, _, _ = tl.philox(seed, offsets.to(tl.uint32), (offsets >> 32).to(tl.uint32), zero, zero)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _dropout_keep_mask_kernel(RngState, Keep, L, S, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the keep pattern of one (b, h) tile, with the very helper and offsets the attention kernels use."""
    bh = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(RngState)
    philox_rows = tl.load(RngState + 1) + (bh.to(tl.int64) * L + offs_m) * S
    keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
    ptrs = Keep + (bh.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


@triton.jit
def _varlen_keep_mask_kernel(RngState, Keep, q_row0, k_row0, Tq, Tk, L, S, dropout_p, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    """Write the keep pattern (Hq, L, S) of one packed sequence (rows q_row0.., keys k_row0..) with the offsets of
    the VARLEN kernels: row h * Tq + q_row0 + i, column k_row0 + j of the whole (Hq, Tq, Tk) score matrix."""
    h = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seed = tl.load(RngState)
    philox_rows = tl.load(RngState + 1) + (h.to(tl.int64) * Tq + q_row0 + offs_m) * Tk + k_row0
    keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
    ptrs = Keep + (h.to(tl.int64) * L + offs_m[:, None]) * S + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


@triton.jit
def _score_unit(HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """The factor from natural-log units to the kernel's score units: 1 with a float mask, else log2(e)."""
    if HAS_MASK and not MASK_IS_BOOL:
        unit = 1.0
    else:
        unit = 1.4426950408889634  # base 2: exp(x) = exp2(x * log2(e))
    return unit


@triton.jit
def _score_scale(scale, softcap, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(qk_scale, cap_unit): the factor of q.k in the scores, and with a softcap c the factor of the tanh.

    Without softcap the score is q.k * scale in the kernel's units (``_score_unit``). With it, q.k * scale / c is
    the tanh argument and the capped score is c * tanh(.) in the kernel's units: ``cap_unit`` = c * unit."""
    unit = _score_unit(HAS_MASK, MASK_IS_BOOL)
    if HAS_SOFTCAP:
        qk_scale = scale / softcap
        cap_unit = softcap * unit
    else:
        qk_scale = scale * unit
        cap_unit = unit
    return qk_scale, cap_unit


@triton.jit
def _tanh(x):
    """tanh in fp32 from exp2 (tl has no tanh on every Triton version), accurate to a few ulp everywhere.

    |x| >= 0.25: (1 - e) / (1 + e) with e = exp(-2|x|) in (0, 1], which cannot overflow (inf gives +-1). Below
    0.25, 1 - e would cancel, so the odd Taylor series to x^9 is used (its x^11 term is under 2e-8 relative
    there). NaN stays NaN."""
    ax = tl.abs(x)
    e = tl.math.exp2(ax * -2.8853900817779268)  # exp(-2|x|) = exp2(-2|x| log2(e))
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    x2 = x * x
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(ax < 0.25, small, big)


@triton.jit
def _tanh_grad(x):
    """1 - tanh(x)^2 without cancellation near |tanh| = 1: 4e / (1 + e)^2 with e = exp(-2|x|) (exact
    identity), and 1 - t^2 from the series where |x| < 0.25 (t^2 < 0.06, nothing cancels)."""
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)
    t = _tanh(x)
    return tl.where(tl.abs(x) < 0.25, 1.0 - t * t, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _exp_scores(x, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr):
    """exp of a difference ``x`` of scores (or of a score and an lse) in the units ``_score_scale`` chose."""
    if HAS_MASK and not MASK_IS_BOOL:
        e = tl.exp(x)
    else:
        e = tl.math.exp2(x)
    return e


@triton.jit
def _masked_scores(s, mask_ptrs, row_ok, col_ok, offs_m, offs_n, diag, win_left, win_right, slope,
                   HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   LEFT: tl.constexpr, RIGHT: tl.constexpr, CHECK: tl.constexpr):
    """Steps 3-4 of the score rule on the (capped) scores ``s`` (a tile in any orientation), in the units
    ``_score_scale`` chose: ALiBi, the user mask, then (CHECK) the causal/window rule and the key bound.

    offs_m / offs_n, row_ok / col_ok are shaped so that they broadcast against ``s`` (query index along one axis,
    key index along the other). ``slope`` is the ALiBi slope of this head in the kernel's units. The mask tile
    is always loaded with both bounds, because it is a separate tensor whose rows and columns end where L and S
    end, whatever phase the caller is in.
    """
    if HAS_ALIBI:
        s = s - slope * tl.abs(offs_m + diag - offs_n).to(tl.float32)
    if HAS_MASK:
        user_mask = tl.load(mask_ptrs, mask=row_ok & col_ok, other=0)
        if MASK_IS_BOOL:
            s = tl.where(user_mask != 0, s, float("-inf"))
        else:
            # Added as it is: the scores are in natural-log units on this path (see the module docstring).
            s = s + user_mask.to(tl.float32)
    if CHECK:
        visible = col_ok
        if LEFT or RIGHT:
            visible = visible & _visible(offs_m, offs_n, diag, win_left, win_right, LEFT, RIGHT)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _query_block(Q, K, V, Mask, RngState, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh,
                 stride_vb, stride_vh, stride_mask_b, stride_mask_h, stride_mask_m, Hq, L, S, GROUP, diag,
                 win_left, win_right, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, stride_kn, stride_vn,
                 CuSeqQ, CuSeqK, num_seqs, search_steps, VARLEN: tl.constexpr):
    """The opening of a kernel with one program per (query block, batch*head), the forward and dQ: which block
    this program owns, its Q tile, the bases of its K/V head and mask rows, its Philox state, and the key range.

    Returns (bh, off_b, off_h, offs_m, row_ok, q, K_base, V_base, mask_base, seed, philox_rows, lo, plain_lo,
    plain_hi, hi, L, S, diag, q_row0, lse_row0): keys [plain_lo, plain_hi) need no per-element test (in bounds
    and visible to every row of this block under the causal/window rule), keys [lo, plain_lo) (a window's left
    edge) and [plain_hi, hi) (the causal diagonal, a window's right edge, the ragged last block) do; keys outside
    [lo, hi) are never visited (ranges._key_range). L, S, diag: the lengths and diagonal offset of this
    program's score matrix; q_row0: the row of Q/Out/dO its local row 0 is; lse_row0: the index of its local row
    0 in the (rows of) lse, delta and dQ.

    VARLEN (packed sequences, seqlens.py): the tensors arrive as one batch, (1, H, T, D) views of (T, H, D), with
    L = Tq and S = Tk; the program slot gives the sequence (off_b is its index, for the ALiBi slopes; the batch
    strides are 0), whose rows start at q_row0 / k_row0 and whose lengths become L and S; the alignment is
    always bottom-right (diag = S - L per sequence, the passed diag is unused). The dropout offsets stay those of
    the whole (Hq, Tq, Tk) score matrix: row h * Tq + q_row0 + i, column k_row0 + j.
    """
    # One flat grid axis (CUDA's second and third axes stop at 65535): query blocks of one head are
    # neighbours, so they share that head's K/V in L2. Causal: the longest rows (last query blocks) start first,
    # so the short ones fill the tail of the launch.
    pid = tl.program_id(0)
    if VARLEN:
        num_slots = L // BLOCK_M + num_seqs
        off_h = pid // num_slots
        slot = pid % num_slots
        if IS_CAUSAL:
            slot = num_slots - 1 - slot
        off_b, q_row0, L_seq, m_block = _sequence_block(CuSeqQ, slot, num_seqs, search_steps, L, BLOCK_M)
        k_row0, S_seq = _sequence_span(CuSeqK, off_b, S)
        lse_row0 = off_h.to(tl.int64) * L + q_row0
        philox_stride = S  # the whole score matrix's row length (Tk)
        L = L_seq
        S = S_seq
        diag = S - L
        bh = off_h
    else:
        num_m_blocks = tl.cdiv(L, BLOCK_M)
        bh = pid // num_m_blocks
        m_block = pid % num_m_blocks
        if IS_CAUSAL:
            m_block = num_m_blocks - 1 - m_block
        off_b = bh // Hq
        off_h = bh % Hq
        q_row0 = 0
        k_row0 = 0
        lse_row0 = bh.to(tl.int64) * L
        philox_stride = S
    off_kvh = off_h // GROUP
    start_m = m_block * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < L
    # Batch/head offsets in int64: a tensor may pass 2^31 elements.
    q_ptrs = (Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
              + (offs_m.to(tl.int64) + q_row0)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, offs_m, L, offs_d, HEAD_DIM, BLOCK_D, True)
    K_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    if VARLEN:
        K_base += tl.cast(k_row0, tl.int64) * stride_kn
        V_base += tl.cast(k_row0, tl.int64) * stride_vn
    mask_base = Mask
    if HAS_MASK:
        mask_base = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                     + offs_m.to(tl.int64)[:, None] * stride_mask_m)
    seed = 0
    philox_rows = offs_m.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
        philox_rows = tl.load(RngState + 1) + (lse_row0 + offs_m) * philox_stride + k_row0

    lo, plain_lo, plain_hi, hi = _key_range(start_m, L, S, diag, win_left, win_right, WINDOW_LEFT,
                                            IS_CAUSAL or WINDOW_RIGHT, BLOCK_M, BLOCK_N)
    if VARLEN:
        # A surplus slot (no real row): visit no key block.
        no_rows = start_m >= L
        lo = tl.where(no_rows, 0, lo)
        plain_lo = tl.where(no_rows, 0, plain_lo)
        plain_hi = tl.where(no_rows, 0, plain_hi)
        hi = tl.where(no_rows, 0, hi)
    return (bh, off_b, off_h, offs_m, row_ok, q, K_base, V_base, mask_base, seed, philox_rows, lo, plain_lo,
            plain_hi, hi, L, S, diag, q_row0, lse_row0)
