"""FlashAttention-2 forward and backward in Triton: the "triton" backend's attention.

Layout of this file: the shared ``@triton.jit`` helpers (tile loads, the Philox dropout pattern), the forward
kernel and its inner loop, the three backward kernels, the launch configs (autotune on a GPU, one fixed small
config in Triton's interpreter), the host launchers ``attention_forward`` / ``attention_backward`` that
``dispatch.TritonBackend`` calls with the canonical form of ``contract.py``, ``dropout_keep_mask`` for tests, and
``compile_specs`` / ``excluded_configs`` for the static compile checks.

Design (FlashAttention-2, Dao 2023):
- Forward: one program per (query block of BLOCK_M rows, batch*head). K/V stream through in BLOCK_N blocks; an
  online softmax keeps the running row max ``m`` and sum ``l`` in fp32, in base 2 (log2(e) is folded into the
  scale once, so every exponential is an ``exp2``); lse is stored in natural log for the backward. Nothing of
  size L x S is ever materialised. With ``is_causal`` the key blocks that are entirely above the diagonal are
  never visited (the loop stops at the diagonal) and only the blocks that straddle it pay for the causal test.
- The forward's (and dQ's) key loop runs in two phases: blocks that need no per-element test (fully visible,
  fully in bounds) and the few that do (the causal diagonal, the ragged last block). A constexpr flag picks the
  variant, so the common path carries no bound or causal test. (The register-bound dK/dV pass uses one loop.)
- Masks are read tile by tile through their own strides (stride 0 on broadcast dims: a (L, S) mask costs one
  L x S read per (batch, head), from L2), never expanded. Optional features are constexpr flags (HAS_MASK,
  MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, WRITE_DMASK), so a call without them compiles to none of their code.
- Backward: recompute-based, in three kernels: (1) preprocess delta = rowsum(dO * O) - grad_lse and the
  base-2 lse; (2) dK/dV, one program per key block of one kv head, looping over the query heads of its GQA group
  and over query blocks, accumulating dK and dV in registers; (3) dQ, one program per query block, looping over
  key blocks (it also writes the float mask's gradient dS when asked, each element exactly once).
  Separate passes rather than atomics for dQ: every output element is owned by one program and summed in a fixed
  order, so the backward is deterministic (bitwise identical run to run) with no extra switch, and repeated
  autotuning runs overwrite rather than accumulate. The price is recomputing Q K^T and dO V^T in the dQ pass.
  Above head dim 128 (64 for fp32) dK and dV take one launch each, so only one fp32 accumulator is live.
- Launch configs come from the static compile check (no spills, shared memory within limits, wgmma on sm_90).
  Where no backward config is spill-free on a GPU (fp32 at head dims > 128; fp16/bf16 with dropout at head dims
  > 128 on sm_90) that backward runs densely in PyTorch (``_dense_backward``, same lse and keep pattern).
- Dropout: the keep pattern is regenerated from Philox (``tl.rand(seed, offset)``, spelled out in
  ``_dropout_keep`` so the stream is the same on every Triton version) wherever it is needed, with the 64-bit
  offset ``base + ((b * Hq + h) * L + i) * S + j``; nothing is stored. Kept weights are scaled by 1 / (1 - p).
  ``dropout_keep_mask`` runs the same helper to hand the exact pattern to tests.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _alloc
from .interpreter import interpreting

# Decided once at import, like Triton itself decides whether @triton.jit makes interpreter functions.
INTERPRETING = interpreting()

# The kernels write log2(e) = 1.4426950408889634 (exp(x) = exp2(x * log2(e))) and ln(2) = 0.6931471805599453
# (ln(x) = log2(x) * ln(2)) as literals: plain Python globals are not constants inside @triton.jit code.

# --------------------------------------------------------------------------------------------------------------
# Shared helpers


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
def _masked_scores(s, mask_ptrs, row_ok, col_ok, offs_m, offs_n, HAS_MASK: tl.constexpr,
                   MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr, CHECK: tl.constexpr):
    """Apply the user mask, the causal rule and the key bound to base-2 scores ``s`` (a tile in any orientation).

    offs_m / offs_n, row_ok / col_ok are shaped so that they broadcast against ``s`` (query index along one axis,
    key index along the other). The mask tile is always loaded with both bounds, because it is a separate tensor
    whose rows and columns end where L and S end, whatever phase the caller is in.
    """
    if HAS_MASK:
        user_mask = tl.load(mask_ptrs, mask=row_ok & col_ok, other=0)
        if MASK_IS_BOOL:
            s = tl.where(user_mask != 0, s, float("-inf"))
        else:
            # An additive mask is in natural-log units; the scores are in base 2. -inf stays -inf.
            s = s + user_mask.to(tl.float32) * 1.4426950408889634
    if CHECK:
        visible = col_ok
        if IS_CAUSAL:
            visible = visible & (offs_n <= offs_m)
        s = tl.where(visible, s, float("-inf"))
    return s


# --------------------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, lo, hi, offs_m, row_ok, L, S,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed, philox_rows,
                    dropout_p, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one query block. CHECK: these blocks need the per-element
    causal / key-bound test (the diagonal and the ragged tail); otherwise every key in them is visible."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Tile pointers start at key lo (int64: lo * stride may pass 2^31) and advance by whole blocks.
    k_ptrs = K_base + tl.cast(lo, tl.int64) * stride_kn + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V_base + tl.cast(lo, tl.int64) * stride_vn + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = mask_base + tl.cast(lo, tl.int64) * stride_mask_n + offs_n0[None, :] * stride_mask_n
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n[None, :] < S
        k = _load_rows(k_ptrs, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, CHECK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, mask_ptrs, row_ok[:, None], col_ok, offs_m[:, None], offs_n[None, :], HAS_MASK,
                           MASK_IS_BOOL, IS_CAUSAL, CHECK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with every key so far masked keeps m = -inf; subtracting 0 instead makes its exp2 terms 0
        # rather than exp2(-inf + inf) = NaN. NaN scores still give NaN (they are never masked away).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # l sums the weights before dropout (dropout acts on normalised weights); only P V sees it.
            keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_rows(v_ptrs, offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mask_n
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Mask, RngState, Out, Lse,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                     stride_ob, stride_oh, stride_om, stride_od,
                     Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One flat grid axis (CUDA's second and third axes stop at 65535): query blocks of one head are
    # neighbours, so they share that head's K/V in L2. Causal: the longest rows (last query blocks) start first,
    # so the short ones fill the tail of the launch.
    num_m_blocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    m_block = pid % num_m_blocks
    if IS_CAUSAL:
        m_block = num_m_blocks - 1 - m_block
    off_b = bh // Hq
    off_h = bh % Hq
    off_kvh = off_h // GROUP
    start_m = m_block * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    # Batch/head offsets in int64: a tensor may pass 2^31 elements.
    q_ptrs = (Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
              + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = _load_rows(q_ptrs, offs_m, L, offs_d, HEAD_DIM, BLOCK_D, True)
    K_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    mask_base = Mask
    if HAS_MASK:
        mask_base = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                     + offs_m.to(tl.int64)[:, None] * stride_mask_m)
    seed = 0
    philox_rows = offs_m.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
        philox_rows = tl.load(RngState + 1) + (bh.to(tl.int64) * L + offs_m) * S

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    qk_scale = scale * 1.4426950408889634  # base 2: exp(x * scale) = exp2(x * scale * log2(e))

    # Keys [0, n_plain) need no per-element test: in bounds and, when causal, left of every row of this block.
    # Keys [n_plain, hi) are the causal diagonal and/or the ragged last block. Keys >= hi are never visited.
    n_in_bounds = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        n_plain = tl.minimum((start_m // BLOCK_N) * BLOCK_N, n_in_bounds)
    else:
        hi = S
        n_plain = n_in_bounds
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, 0, n_plain, offs_m, row_ok, L, S,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed,
                                    philox_rows, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D,
                                    BLOCK_DV, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, n_plain, hi, offs_m, row_ok, L, S,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed,
                                    philox_rows, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D,
                                    BLOCK_DV, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, True)

    # Fully masked rows have l = 0 and acc = 0: dividing by 1 instead gives output 0; their lse is -inf.
    # A NaN l (NaN inputs) is not 0, so it stays NaN.
    fully_masked = l_i == 0.0
    l_safe = tl.where(fully_masked, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(fully_masked, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
              + offs_m.to(tl.int64)[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _attn_bwd_preprocess_kernel(Out, dO, GradLse, Lse, Delta, Lse2,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                stride_glb, stride_glh, stride_glm,
                                Hq, L, HEAD_DIM_V: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) - grad_lse (the softmax backward's row term; it equals rowsum(P * dP) with or
    without dropout), and the base-2 lse the other passes subtract: -inf (fully masked row) becomes +inf, so
    recomputed weights exp2(s - lse2) are 0 there instead of NaN."""
    num_m_blocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    off_b = bh // Hq
    off_h = bh % Hq
    offs_m = (pid % num_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L
    o = _load_rows(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                   + offs_m.to(tl.int64)[:, None] * stride_om + offs_dv[None, :] * stride_od,
                   offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    do = _load_rows(dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                    + offs_m.to(tl.int64)[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                    offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GRAD_LSE:
        # grad_lse may be an expanded (stride 0) view, e.g. from lse.sum(): read it through its strides.
        delta -= tl.load(GradLse + off_b.to(tl.int64) * stride_glb + off_h.to(tl.int64) * stride_glh
                         + offs_m.to(tl.int64) * stride_glm, mask=row_ok, other=0.0)
    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=row_ok)
    tl.store(Lse2 + bh.to(tl.int64) * L + offs_m, lse2, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, Lse2_base, Delta_base, mask_base, lo, hi, offs_n,
                         col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, qk_scale,
                         seed, philox_cols, dropout_p, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                         IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr,
                         DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """Accumulate one query head's query blocks [lo, hi) into dK and/or dV of a key block, in the transposed
    orientation (keys along axis 0): s^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.
    CHECK: apply the causal rule and the row bound L (otherwise every query of [lo, hi) sees every key)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Loop-invariant 32-bit tile offsets plus a scalar 64-bit block start: half the registers of carrying
    # 64-bit pointer tensors through the loop, which matters in this register-bound kernel.
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    mask_offs = offs_m0[None, :] * stride_mask_m
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row_ok = offs_m < L
        start64 = tl.cast(start_m, tl.int64)
        if HAS_DROPOUT:
            # Drawn first: the Philox temporaries die before the dots, and only the keep bits stay live.
            keep = _dropout_keep(seed, philox_cols[:, None], (offs_m.to(tl.int64) * S)[None, :], dropout_p)
        q = _load_rows(Q_base + start64 * stride_qm + q_offs, offs_m, L, offs_d, HEAD_DIM, BLOCK_D, CHECK)
        mask_ptrs = mask_base + start64 * stride_mask_m + mask_offs
        if CHECK:
            # Rows past L: lse2 = +inf makes their weights 0 (and their q, dO are 0).
            lse2 = tl.load(Lse2_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta_base + offs_m, mask=row_ok, other=0.0)
        else:
            lse2 = tl.load(Lse2_base + offs_m)
            delta = tl.load(Delta_base + offs_m)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        # Queries run along axis 1 here; the causal test "key <= query" reads offs_n[:, None] <= offs_m[None, :].
        s_t = _masked_scores(s_t, mask_ptrs, row_ok[None, :], col_ok, offs_m[None, :], offs_n[:, None], HAS_MASK,
                             MASK_IS_BOOL, IS_CAUSAL, CHECK)
        p_t = tl.math.exp2(s_t - lse2[None, :])
        do = _load_rows(dO_base + start64 * stride_dom + do_offs, offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
        if DO_DV:
            if HAS_DROPOUT:
                p_dropped_t = tl.where(keep, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
            else:
                p_dropped_t = p_t
            dv += tl.dot(p_dropped_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if DO_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if HAS_DROPOUT:
                dp_t = tl.where(keep, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, dO, Mask, RngState, Lse2, Delta, dK, dV,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                          Hq, Hkv, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                          HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          EVEN_M: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one kv head. GQA: the GROUP query heads that read this kv head are summed here,
    in registers, in a fixed order; K/V are never repeated in memory.

    DO_DK / DO_DV: which of the two this launch computes. Both at once (one pass) up to head dim 128 (64 for
    fp32); above that the two fp32 accumulators of BLOCK_N x head-dim do not fit the register file next to
    everything else (they spill in every config, static compile check), so the host runs the kernel twice, once
    per gradient, recomputing the scores: the dV launch skips dP and dS, the dK launch skips P^T dO."""
    num_n_blocks = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    b_kvh = pid // num_n_blocks
    n_block = pid % num_n_blocks
    if IS_CAUSAL:
        n_block = num_n_blocks - 1 - n_block  # the first key blocks see the most queries: start them first
    off_b = b_kvh // Hkv
    off_kvh = b_kvh % Hkv
    start_n = n_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n[:, None] < S

    k = _load_rows(K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
                   + offs_n.to(tl.int64)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, S, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
                   + offs_n.to(tl.int64)[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                   offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = scale * 1.4426950408889634

    # Causal: query blocks before m_lo see none of these keys and are skipped.
    m_lo = (start_n // BLOCK_M) * BLOCK_M if IS_CAUSAL else 0

    seed = 0
    philox_cols = offs_n.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        bh = off_b * Hq + off_h
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        dO_base = dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        Lse2_base = Lse2 + bh.to(tl.int64) * L
        Delta_base = Delta + bh.to(tl.int64) * L
        mask_base = Mask
        if HAS_MASK:
            mask_base = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                         + offs_n.to(tl.int64)[:, None] * stride_mask_n)
        if HAS_DROPOUT:
            # Offset of (b, h, i, j) = base + ((b*Hq + h)*L + i)*S + j: the (b, h) and j parts here, i*S per block.
            philox_cols = tl.load(RngState + 1) + bh.to(tl.int64) * L * S + offs_n
        # One loop over all query blocks, unlike the forward's split into a plain and a checked phase: this
        # kernel is register-bound (dK, dV accumulators plus four dots per step), and three pipelined loops in
        # the group loop cost ~50 more registers and spills at head dim 128 (static compile check), whereas the
        # causal/bound tests cost a compare and a select per score. A non-causal call with L a multiple of
        # BLOCK_M (EVEN_M) compiles without any test.
        if IS_CAUSAL or not EVEN_M:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, Lse2_base, Delta_base, mask_base, m_lo,
                                          L, offs_n, col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod,
                                          stride_mask_m, qk_scale, seed, philox_cols, dropout_p, DOT_PRECISION,
                                          HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL,
                                          IS_CAUSAL, HAS_DROPOUT, True, DO_DK, DO_DV)
        else:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, Lse2_base, Delta_base, mask_base, 0, L,
                                          offs_n, col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod,
                                          stride_mask_m, qk_scale, seed, philox_cols, dropout_p, DOT_PRECISION,
                                          HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL,
                                          IS_CAUSAL, HAS_DROPOUT, False, DO_DK, DO_DV)

    # dK, dV are contiguous (B, Hkv, S, D) outputs of our own; only rows < S and columns < head dim are written.
    b_kvh64 = b_kvh.to(tl.int64)
    if DO_DK:
        dk_ptrs = dK + (b_kvh64 * S + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < HEAD_DIM))
    if DO_DV:
        dv_ptrs = dV + (b_kvh64 * S + offs_n[:, None]) * HEAD_DIM_V + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, mask_base, dmask_base, lo, hi, offs_m, row_ok, S,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed, philox_rows,
                       dropout_p, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                       HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, WRITE_DMASK: tl.constexpr, CHECK: tl.constexpr):
    """dQ += dS K over key blocks [lo, hi) of one query block (and dmask = dS when asked)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = K_base + tl.cast(lo, tl.int64) * stride_kn + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V_base + tl.cast(lo, tl.int64) * stride_vn + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = mask_base + tl.cast(lo, tl.int64) * stride_mask_n + offs_n0[None, :] * stride_mask_n
    dmask_ptrs = dmask_base + lo + offs_n0[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n[None, :] < S
        k = _load_rows(k_ptrs, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, CHECK)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = _masked_scores(s, mask_ptrs, row_ok[:, None], col_ok, offs_m[:, None], offs_n[None, :], HAS_MASK,
                           MASK_IS_BOOL, IS_CAUSAL, CHECK)
        p = tl.math.exp2(s - lse2[:, None])
        v = _load_rows(v_ptrs, offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if WRITE_DMASK:
            # The mask is added to the natural-log scores, so its gradient is dS itself (no scale factor).
            tl.store(dmask_ptrs, ds, mask=row_ok[:, None] & col_ok)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mask_n
        if WRITE_DMASK:
            dmask_ptrs += BLOCK_N
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, dO, Mask, RngState, Lse2, Delta, dQ, dMask,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                        Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        WRITE_DMASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block (and its rows of dmask), looping over key blocks like the forward."""
    num_m_blocks = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    m_block = pid % num_m_blocks
    if IS_CAUSAL:
        m_block = num_m_blocks - 1 - m_block
    off_b = bh // Hq
    off_h = bh % Hq
    off_kvh = off_h // GROUP
    start_m = m_block * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < L

    q = _load_rows(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                   + offs_m.to(tl.int64)[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                   offs_m, L, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                    + offs_m.to(tl.int64)[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                    offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    lse2 = tl.load(Lse2 + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=row_ok, other=0.0)
    K_base = K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
    V_base = V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
    mask_base = Mask
    if HAS_MASK:
        mask_base = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                     + offs_m.to(tl.int64)[:, None] * stride_mask_m)
    dmask_base = dMask
    if WRITE_DMASK:
        dmask_base = dMask + (bh.to(tl.int64) * L + offs_m.to(tl.int64)[:, None]) * S  # contiguous (B,Hq,L,S)
    seed = 0
    philox_rows = offs_m.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
        philox_rows = tl.load(RngState + 1) + (bh.to(tl.int64) * L + offs_m) * S

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    n_in_bounds = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M)
        n_plain = tl.minimum((start_m // BLOCK_N) * BLOCK_N, n_in_bounds)
    else:
        hi = S
        n_plain = n_in_bounds
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, mask_base, dmask_base, 0, n_plain, offs_m,
                            row_ok, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed,
                            philox_rows, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D,
                            BLOCK_DV, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, WRITE_DMASK, False)
    dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, K_base, V_base, mask_base, dmask_base, n_plain, hi, offs_m,
                            row_ok, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, seed,
                            philox_rows, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D,
                            BLOCK_DV, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, HAS_DROPOUT, WRITE_DMASK, True)
    if WRITE_DMASK and IS_CAUSAL:
        # The key blocks the causal loop skipped are hidden from every row here: their mask gradient is 0.
        offs_n0 = tl.arange(0, BLOCK_N)
        zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_n in range(hi, S, BLOCK_N):
            offs_n = start_n + offs_n0
            tl.store(dmask_base + offs_n[None, :], zeros, mask=row_ok[:, None] & (offs_n[None, :] < S))

    dq_ptrs = dQ + (bh.to(tl.int64) * L + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


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


# --------------------------------------------------------------------------------------------------------------
# Launch configs
#
# On a GPU each kernel is autotuned over a short list chosen by architecture and head-dim bucket (the padded
# power-of-two head dim, max over E and Ev), keyed on the head dims, dtype, causal/mask/dropout flags and
# power-of-two buckets of L and S. On sm_90 every fp16/bf16 tile has BLOCK_M (the M side of each dot) a multiple
# of 64 and 4 or 8 warps, so tl.dot lowers to wgmma (HGMMA). Lists were pruned with the static compile check
# (compile_check.py): configs that spill or overflow shared memory for a head dim are not offered for that head
# dim and appear in excluded_configs() with the reason. In Triton's interpreter there is nothing to tune: one
# small fixed config (16 x 16 tiles, the smallest tl.dot takes) keeps CPU runs fast.

INTERPRETER_BLOCK = 16
SEQ_BUCKET_CAP = 16384  # longer sequences share the tuning of this length


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (arch family, kernel) -> precision ("half": fp16/bf16, "fp32") -> head-dim bucket (64 covers 1-64) ->
# variant ("base": no dropout; "dropout": the Philox draw per score costs extra live registers, so those calls
# get smaller tiles) -> configs. Forward and dQ: BLOCK_M query rows held, BLOCK_N keys streamed. dK/dV: BLOCK_N
# keys held, BLOCK_M queries streamed. Every entry compiles without spills and within shared memory for the
# heaviest flags of its variant (causal + additive mask [+ dropout]; static compile check). None: no config of
# the backward compiles without spills, and the backward of such calls runs densely (see _dense_backward).
def _table(d64, d128, d256):
    return {64: d64, 128: d128, 256: d256}


def _variants(base, dropout=None):
    return {"base": base, "dropout": base if dropout is None else dropout}


_HALF_SM90 = {
    "fwd": _table(_variants([_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
                  _variants([_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)], [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2)]),
                  _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)], [_cfg(64, 32, 8, 2), _cfg(64, 16, 8, 2)])),
    "dkdv": _table(_variants([_cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2)], [_cfg(16, 64, 4, 2)]),
                   _variants([_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)], [_cfg(16, 64, 8, 2), _cfg(16, 64, 8, 1)]),
                   {"base": [_cfg(16, 64, 8, 2)], "dropout": None}),
    "dq": _table(_variants([_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]),
                 _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 16, 4, 2), _cfg(64, 32, 8, 2)]),
                 _variants([_cfg(64, 16, 8, 2)])),
}
# sm_80 (mma.sync, 64K registers as on sm_90 but no wgmma): a few sm_90 tiles spill there and are replaced.
_HALF_SM80 = {
    "fwd": _table(_HALF_SM90["fwd"][64],
                  _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)], [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2)]),
                  _variants([_cfg(64, 32, 8, 2)], [_cfg(32, 32, 8, 2), _cfg(64, 16, 8, 2)])),
    "dkdv": _table(_variants([_cfg(16, 64, 4, 2), _cfg(32, 64, 8, 2)], [_cfg(16, 64, 4, 2)]),
                   _variants(_HALF_SM90["dkdv"][128]["base"], [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 1)]),
                   _variants([_cfg(16, 64, 8, 2)])),
    "dq": _table(_variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]),
                 _HALF_SM90["dq"][128], _variants(_HALF_SM90["dq"][256]["base"], [_cfg(32, 32, 8, 2)])),
}
# IEEE fp32 products run on the FMA units with whole operand rows in registers: small tiles only, and at head
# dims above 128 every backward tile spills (the rows are 256 long), so that backward runs densely.
_FP32 = {
    "fwd": _table(_variants([_cfg(32, 32, 8, 1)]), _variants([_cfg(32, 16, 4, 1)]), _variants([_cfg(16, 16, 4, 1)])),
    "dkdv": _table(_variants([_cfg(16, 32, 8, 1)]), _variants([_cfg(16, 16, 8, 1)]), _variants(None)),
    "dq": _table(_variants([_cfg(32, 16, 8, 1)]), _variants([_cfg(16, 16, 8, 1)]), _variants(None)),
}
_CONFIGS = {90: {"half": _HALF_SM90, "fp32": _FP32}, 80: {"half": _HALF_SM80, "fp32": _FP32}}

# Configs the static check showed spilling where no alternative exists: (arch family, config, reason).
_EXCLUDED = [
    (arch, "attn_dkdv/attn_dq fp32 head dim 129-256, every tile down to 16x16 (w4-w16)",
     "spills 0.3-2.5 KB: IEEE fp32 dots hold 256-long operand rows per thread; the backward of these calls "
     "runs densely in PyTorch (_dense_backward) instead") for arch in (80, 90)
] + [
    (90, "attn_dkdv dK fp16/bf16 head dim 129-256 with dropout, M16 N64 w8 s1-s3 (and M32 N64 w8)",
     "spills 24-200 B on sm_90 (wgmma needs 64-row key blocks; 64 x 256 fp32 dK plus the Philox draw exceed the "
     "registers); the backward of these calls runs densely in PyTorch (_dense_backward) instead"),
    (90, "attn_fwd fp16/bf16 head dim 64, M128 N128 w8 s3", "241 KiB shared memory > 227 KiB"),
    (80, "attn_fwd fp16/bf16 head dim 128, M128 N64 w8 s3 and M64 N64 w4 s3", "spill 40-48 B on sm_80"),
    (80, "attn_fwd fp16/bf16 head dim 256, M128 N32 w8 s2", "spills 208 B on sm_80"),
    (80, "attn_dkdv fp16/bf16 head dim 64, M32 N64 w4 s2 and M32 N128 w8 s2", "spill 8-24 B on sm_80"),
    (80, "attn_dq fp16/bf16 head dim 64, M128 N64 w8 s2", "spills 48 B on sm_80"),
] + [
    # Dropout variants (Philox draw live per score), measured with triton 3.6 (triton 3.8 compiles them without
    # spills, but the GPU machines run 3.6); each replaced by the spill-free tile named in the reason.
    (arch, "attn_fwd fp16/bf16 head dim 64 with dropout, M128 N64 w8 s2",
     f"spills {b} B under triton 3.6; M128 N32 w8 s2 offered instead") for arch, b in ((90, 72), (80, 192))
] + [
    (90, "attn_fwd fp16/bf16 head dim 128 with dropout, M64 N64 w8 s2",
     "spills 136 B under triton 3.6 (16 B at s1); M128 N32 w8 s2 offered instead"),
    (80, "attn_fwd fp16/bf16 head dim 256 with dropout, M64 N32 w8 s2",
     "spills 8 B under triton 3.6 (88 B at s1); M32 N32 w8 s2 offered instead"),
    (80, "attn_dkdv fp16/bf16 head dim 65-128 with dropout, M16 N64 w8 s2",
     "spills 8 B under triton 3.6; M32 N32 w8 s2 offered instead (M16 N64 w8 s1 kept)"),
    (80, "attn_dq fp16/bf16 head dim 129-256 with dropout, M64 N16 w8 s2",
     "spills 8 B under triton 3.6 (24 B at s1); M32 N32 w8 s2 offered instead"),
]

PREPROCESS_BLOCK_M = 64


def _head_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _precision_class(dtype) -> str:
    return "fp32" if dtype in (torch.float32, tl.float32) else "half"


def _arch_family(arch: int) -> int:
    return 90 if arch >= 90 else 80


def _configs_for(arch: int, kernel: str, precision: str, bucket: int, variant: str):
    """The configs offered, or None where that backward runs densely (no spill-free config)."""
    return _CONFIGS[_arch_family(arch)][precision][kernel][bucket][variant]


def _all_configs(arch: int, kernel: str) -> list:
    """Every config of the kernel on this arch (the autotuner's list, before pruning by head dim and dtype)."""
    seen = []
    for per_kernel in _CONFIGS[_arch_family(arch)].values():
        for per_variant in per_kernel[kernel].values():
            for configs in per_variant.values():
                seen.extend(c for c in (configs or []) if _config_key(c) not in {_config_key(x) for x in seen})
    return seen


@functools.lru_cache(maxsize=None)
def _device_arch() -> int:
    if INTERPRETING or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _config_key(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _make_prune(arch: int, kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bucket = _head_bucket(max(args["BLOCK_D"], args["BLOCK_DV"]))
        variant = "dropout" if args["HAS_DROPOUT"] else "base"
        wanted = {_config_key(c)
                  for c in _configs_for(arch, kernel, _precision_class(args["Q"].dtype), bucket, variant)}
        return [c for c in configs if _config_key(c) in wanted]
    return prune


_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "L_BUCKET", "S_BUCKET"]
_DKDV_TUNE_KEY = _TUNE_KEY + ["DO_DK", "DO_DV"]


def _tuned(kernel_fn, kernel: str):
    """The kernel as launched: autotuned on a GPU, the plain jit function in the interpreter."""
    arch = _device_arch()
    if kernel == "dkdv":
        # EVEN_M (L a multiple of BLOCK_M) depends on the config the autotuner picks, so it is derived per config.
        kernel_fn = triton.heuristics({"EVEN_M": lambda args: args["L"] % args["BLOCK_M"] == 0})(kernel_fn)
    if arch == 0:
        return kernel_fn
    # Every kernel writes (never accumulates into) its outputs, so the autotuner's repeated trial launches leave
    # them correct without reset_to_zero / restore_value.
    return triton.autotune(configs=_all_configs(arch, kernel), key=_DKDV_TUNE_KEY if kernel == "dkdv" else _TUNE_KEY,
                           prune_configs_by={"early_config_prune": _make_prune(arch, kernel)})(kernel_fn)


_attn_fwd = _tuned(_attn_fwd_kernel, "fwd")
_attn_bwd_dkdv = _tuned(_attn_bwd_dkdv_kernel, "dkdv")
_attn_bwd_dq = _tuned(_attn_bwd_dq_kernel, "dq")


def _launch(kernel, total_rows_fn, *args, **constexprs):
    """Launch an autotuned kernel (grid from the chosen config) or, in the interpreter, the fixed config."""
    if INTERPRETING or _device_arch() == 0:
        meta = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}
        kernel[(total_rows_fn(meta),)](*args, **constexprs, **meta)
    else:
        kernel[lambda meta: (total_rows_fn(meta),)](*args, **constexprs)


# --------------------------------------------------------------------------------------------------------------
# Host launchers (the backend interface of contract.py / dispatch.py)


def _split_dkdv(block_d: int, dtype) -> bool:
    """Whether dK and dV take one launch each (see _attn_bwd_dkdv_kernel): above head dim 128 for fp16/bf16, above
    64 for fp32, whose IEEE products run on FMA units with operand tiles held in registers."""
    return block_d > (64 if dtype in (torch.float32, tl.float32) else 128)


def _block(dim: int) -> int:
    # tl.dot needs every tile side >= 16; padded lanes are masked on load and store.
    return max(16, triton.next_power_of_2(dim))


def _seq_bucket(n: int) -> int:
    return min(triton.next_power_of_2(n), SEQ_BUCKET_CAP)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE fp32 products by default, so fp32 results match an fp32 reference to ~1e-6 (the contract
    # promises fp32 arithmetic). Only when the user opted in to TF32 for matmuls (torch.backends.cuda.matmul.
    # allow_tf32) do we take the ~8x faster TF32 tensor-core path, as torch.matmul would. fp16/bf16 operands
    # always use the tensor cores with fp32 accumulation; the flag does not apply to them.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _mask_args(mask, like):
    """(pointer, 4 strides, HAS_MASK, MASK_IS_BOOL) for an optional (B, Hq, L, S) mask view."""
    if mask is None:
        return like, (0, 0, 0, 0), False, False
    return mask, tuple(mask.stride()), True, mask.dtype == torch.bool


def _check_rng(rng_state, dropout_p, device):
    if dropout_p == 0.0:
        return None
    if rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("rng_state must be an int64 tensor [seed, offset] when dropout_p > 0, got "
                         f"{None if rng_state is None else (rng_state.dtype, tuple(rng_state.shape))}")
    return rng_state.to(device).contiguous()


def attention_forward(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, rng_state):
    """FlashAttention forward on the canonical form: returns out (B, Hq, L, Ev) in q.dtype and lse (B, Hq, L)
    fp32 (natural log, -inf on fully masked rows, whose output is 0)."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = _alloc.new_output((B, Hq, L, Ev), q.dtype, q.device)
    lse = _alloc.new_output((B, Hq, L), torch.float32, q.device)
    mask_t, mask_strides, has_mask, mask_is_bool = _mask_args(mask, out)
    rng = _check_rng(rng_state, dropout_p, q.device)
    _launch(_attn_fwd, lambda meta: triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,
            q, k, v, mask_t, rng if rng is not None else lse, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            Hq, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S),
            HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask, MASK_IS_BOOL=mask_is_bool,
            HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block(E),
            BLOCK_DV=_block(Ev))
    return out, lse


def _needs_dense_backward(q, E, Ev, dropout_p) -> bool:
    """On a GPU, whether no spill-free Triton config exists for this backward (see _CONFIGS and _EXCLUDED)."""
    arch = 0 if q.device.type != "cuda" else _device_arch()
    if arch == 0:
        return False
    bucket = _head_bucket(max(_block(E), _block(Ev)))
    variant = "dropout" if dropout_p > 0.0 else "base"
    precision = _precision_class(q.dtype)
    return any(_configs_for(arch, kernel, precision, bucket, variant) is None for kernel in ("dkdv", "dq"))


def _dense_backward(grad_out, q, k, v, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                    mask_needs_grad):
    """The same backward in dense PyTorch, in fp32, from our forward's lse and our Philox keep pattern.

    Used only where every Triton config of the backward spills (fp32 at head dims above 128; fp16/bf16 with
    dropout at head dims above 128 on sm_90): it materialises L x S per (batch, head), so it is a correctness
    fallback for rare shapes, not a fast path.
    """
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    f32 = torch.float32
    keys = k.to(f32).repeat_interleave(group, dim=1)
    values = v.to(f32).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhld,bhsd->bhls", q.to(f32), keys) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(f32)
    if is_causal:
        visible = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    # Fully masked rows have lse = -inf: subtracting +inf makes their weights 0 (as in the kernels).
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(scores - lse_safe.unsqueeze(-1))
    d_out = grad_out.to(f32)
    dp = torch.einsum("bhld,bhsd->bhls", d_out, values)
    p_dropped = p
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng_state, B, Hq, L, S, dropout_p, q.device).to(f32) / (1.0 - dropout_p)
        p_dropped, dp = p * keep, dp * keep
    delta = (p * dp).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(f32).unsqueeze(-1)
    ds = p * (dp - delta)
    results = (
        torch.einsum("bhls,bhsd->bhld", ds, keys) * scale,
        (torch.einsum("bhls,bhld->bhsd", ds, q.to(f32)) * scale).view(B, Hkv, group, S, E).sum(2),
        torch.einsum("bhls,bhld->bhsd", p_dropped, d_out).view(B, Hkv, group, S, Ev).sum(2),
    )
    outputs = []
    for value, like in zip(results, (q, k, v)):
        outputs.append(_alloc.new_output(like.shape, like.dtype, like.device).copy_(value))
    dmask = None
    if mask_needs_grad and mask is not None:
        dmask = _alloc.new_output((B, Hq, L, S), f32, q.device).copy_(ds)
    return (*outputs, dmask)


def attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                       mask_needs_grad):
    """FlashAttention-2 backward: (dq, dk, dv, dmask); dmask (B, Hq, L, S) fp32 = dS when mask_needs_grad."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    if _needs_dense_backward(q, E, Ev, dropout_p):
        return _dense_backward(grad_out, q, k, v, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                               mask_needs_grad)
    dev = q.device
    lse = lse.contiguous()  # our own forward output: already contiguous, so no copy
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    lse2 = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    gl = grad_lse
    _attn_bwd_preprocess_kernel[(triton.cdiv(L, PREPROCESS_BLOCK_M) * B * Hq,)](
        out, grad_out, gl if gl is not None else lse, lse, delta, lse2,
        *out.stride(), *grad_out.stride(), *(gl.stride() if gl is not None else (0, 0, 0)),
        Hq, L, HEAD_DIM_V=Ev, HAS_GRAD_LSE=gl is not None, BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=_block(Ev))

    dq = _alloc.new_output((B, Hq, L, E), q.dtype, dev)
    dk = _alloc.new_output((B, Hkv, S, E), k.dtype, dev)
    dv = _alloc.new_output((B, Hkv, S, Ev), v.dtype, dev)
    write_dmask = bool(mask_needs_grad) and mask is not None
    if write_dmask and mask.dtype == torch.bool:
        raise ValueError("mask_needs_grad is set but attn_mask is a bool mask, which has no gradient")
    dmask = _alloc.new_output((B, Hq, L, S), torch.float32, dev) if write_dmask else None
    mask_t, mask_strides, has_mask, mask_is_bool = _mask_args(mask, dq)
    rng = _check_rng(rng_state, dropout_p, dev)
    rng_t = rng if rng is not None else delta
    common = dict(HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask,
                  MASK_IS_BOOL=mask_is_bool, HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype),
                  BLOCK_D=_block(E), BLOCK_DV=_block(Ev))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides)
    split = _split_dkdv(max(_block(E), _block(Ev)), q.dtype)
    for do_dk, do_dv in (((False, True), (True, False)) if split else ((True, True),)):
        _launch(_attn_bwd_dkdv, lambda meta: triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,
                q, k, v, grad_out, mask_t, rng_t, lse2, delta, dk, dv, *strides,
                Hq, Hkv, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S),
                DO_DK=do_dk, DO_DV=do_dv, **common)
    _launch(_attn_bwd_dq, lambda meta: triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,
            q, k, v, grad_out, mask_t, rng_t, lse2, delta, dq, dmask if write_dmask else dq, *strides,
            Hq, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S),
            WRITE_DMASK=write_dmask, **common)
    return dq, dk, dv, dmask


def dropout_keep_mask(rng_state, B: int, Hq: int, L: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """The exact dropout keep pattern (True = keep), shape (B, Hq, L, S), that the attention kernels draw for
    ``rng_state`` = [seed, offset]: the same Philox helper and offsets. For tests; the kernels never store it."""
    rng = _check_rng(rng_state, dropout_p if dropout_p > 0 else 0.5, device)
    keep = torch.empty((B, Hq, L, S), dtype=torch.int8, device=device)
    block = 64
    grid = (triton.cdiv(L, block), triton.cdiv(S, block), B * Hq)
    _dropout_keep_mask_kernel[grid](rng, keep, L, S, float(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()


# --------------------------------------------------------------------------------------------------------------
# Static compile checks (compile_check.py): every config the GPU autotuner can choose, per arch


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(name, fn, args: dict, cfg, expect_mma: bool):
    """A CompileSpec from the values a launch would pass, typed as the JIT would type them: a string value is a
    pointer type, an int equal to 1 becomes the constant 1 (the JIT specialises it, which is what makes the
    unit-stride loads vectorisable), other ints are i32 with the 16-divisibility hint when it holds, floats fp32,
    and the keyword constexprs stay constexpr."""
    from .compile_check import CompileSpec

    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        arg, value = param.name, args[param.name]
        if param.is_constexpr:
            signature[arg], constexprs[arg] = "constexpr", value
        elif isinstance(value, str):
            signature[arg] = value
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, int):
            if value == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
            else:
                signature[arg] = "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32"
    return CompileSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, expect_mma=expect_mma, attrs=attrs)


# Shape the specs are compiled for: contiguous (B, H, L, D) tensors, L and S multiples of 16 (the JIT makes a
# variant without the divisibility hints for other lengths; it has the same tiles and register budget).
_SPEC_H, _SPEC_L = 16, 4096

# Flags each variant's configs are compiled with: the heaviest code of that variant (the causal diagonal, an
# additive fp32 mask and, in dQ, the mask gradient), which bounds the register pressure of its lighter calls.
_FLAG_SETS = {
    "base": dict(IS_CAUSAL=True, HAS_MASK=True, MASK_IS_BOOL=False, HAS_DROPOUT=False),
    "dropout": dict(IS_CAUSAL=True, HAS_MASK=True, MASK_IS_BOOL=False, HAS_DROPOUT=True),
}


def _common_args(dtype, head_dim, flags):
    dt = "*" + _TRITON_DTYPE[dtype]
    H, L, D = _SPEC_H, _SPEC_L, head_dim
    t_strides = (H * L * D, L * D, D, 1)
    names = {}
    for prefix in ("q", "k", "v", "o", "do"):
        for suffix, value in zip(("b", "h", "m" if prefix in ("q", "o", "do") else "n", "d"), t_strides):
            names[f"stride_{prefix}{suffix}"] = value
    mask_strides = (0, 0, L, 1) if flags.get("HAS_MASK") else (0, 0, 0, 0)
    for suffix, value in zip(("b", "h", "m", "n"), mask_strides):
        names[f"stride_mask_{suffix}"] = value
    names.update(Q=dt, K=dt, V=dt, Out=dt, dO=dt, dQ=dt, dK=dt, dV=dt,
                 Mask="*fp32" if flags.get("HAS_MASK") else dt,
                 RngState="*i64" if flags.get("HAS_DROPOUT") else "*fp32",
                 Lse="*fp32", Lse2="*fp32", Delta="*fp32", dMask="*fp32" if flags.get("WRITE_DMASK") else dt,
                 Hq=H, Hkv=H // 2, L=L, S=L, GROUP=2, scale=0.1, dropout_p=0.1, L_BUCKET=L, S_BUCKET=L,
                 HEAD_DIM=D, HEAD_DIM_V=D, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                 BLOCK_D=D, BLOCK_DV=D, EVEN_M=L % 128 == 0, DO_DK=True, DO_DV=True, **flags)
    return names


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def compile_specs(arch: int) -> list:
    """Every (kernel, dtype, head-dim bucket, variant, config) the autotuner can pick on sm_<arch>, compiled with
    the heaviest flags of its variant, plus the preprocess kernel. Head dims below 64 share the 64 bucket and are
    compiled at 64 (its largest tiles); E != Ev takes the bucket of the larger. Where dK and dV are split
    (_split_dkdv), each of the two launches is a spec. fp32 has one config list for both variants, compiled with
    dropout."""
    specs = []
    for kernel, fn in _KERNELS.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            precision = _precision_class(dtype)
            variants = ("dropout",) if precision == "fp32" else ("base", "dropout")
            for bucket in (64, 128, 256):
                parts = [(True, True)]
                if kernel == "dkdv" and _split_dkdv(bucket, dtype):
                    parts = [(True, False), (False, True)]
                for variant in variants:
                    for cfg in _configs_for(arch, kernel, precision, bucket, variant) or []:
                        for do_dk, do_dv in parts:
                            flags = dict(_FLAG_SETS[variant])
                            if kernel == "dq":
                                flags["WRITE_DMASK"] = True
                            args = _common_args(dtype, bucket, flags)
                            args.update(BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], DO_DK=do_dk,
                                        DO_DV=do_dv)
                            part = "" if (do_dk and do_dv) else (" dK" if do_dk else " dV")
                            name = (f"attn_{kernel}{part} {_TRITON_DTYPE[dtype]} d{bucket} {variant} "
                                    f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
                                    f"s{cfg.num_stages}")
                            specs.append(_spec(name, fn, args, cfg, expect_mma=dtype != torch.float32))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        args = _common_args(dtype, 256, dict(HAS_GRAD_LSE=True))
        args.update(stride_glb=_SPEC_H * _SPEC_L, stride_glh=_SPEC_L, stride_glm=1, GradLse="*fp32",
                    BLOCK_M=PREPROCESS_BLOCK_M)
        specs.append(_spec(f"attn_bwd_preprocess {_TRITON_DTYPE[dtype]} d256", _attn_bwd_preprocess_kernel,
                           args, triton.Config({}, num_warps=4, num_stages=1), expect_mma=False))
    return specs


def excluded_configs(arch: int) -> list:
    """(config, reason) for the configs deliberately not offered on sm_<arch> (they spill or do not fit)."""
    return [(desc, reason) for (a, desc, reason) in _EXCLUDED if _arch_family(arch) == a]
