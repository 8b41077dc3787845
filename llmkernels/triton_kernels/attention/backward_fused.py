"""The fused attention backward: one kernel for dK, dV and dQ, five matrix products per tile pair.

FlashAttention-2's backward as its paper describes it (Dao 2023, algorithm 2): one program per key block of one
kv head holds K, V and the fp32 accumulators dK, dV, streams the query blocks of every query head of its GQA
group, and per (query block, key block) tile computes

    S^T = K Q^T,  P^T = exp(S^T - lse),  dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),
    dK += dS^T Q,  dQ_part = dS K   (added to an fp32 workspace with atomic adds)

so Q K^T and dO V^T are computed once per tile instead of twice (the separate-pass backward in backward.py
recomputes both in its dQ kernel: seven products). The host then converts the workspace to dQ in the output
dtype (``launch_fused``). Every key block adds its part of a dQ row in whatever order the programs run, so fp32
rounding makes dQ differ in its last bits from run to run: this is the nondeterministic path, taken only when
the caller allows it (``deterministic``, ops.py); backward.py stays the deterministic one.

Precision of delta (the softmax backward's row term, delta_i = rowsum_j P_ij dP_ij = dO_i . O_i): the
preprocess (backward.py) computes it from the output rounded to fp16/bf16, which on rows that see few keys puts
dq/dk above the tolerance rule's bound (issue 13: fp16, causal, L=3, S=799, head dim 59). When the whole key
range of a query block lies in the program's key block, every P and dP of its rows is on chip in that one
tile, so the kernel takes delta = rowsum(P * dP) - grad_lse there in fp32 (one multiply-add per score and a
reduction over the key axis, only for such tiles); other rows keep the preprocess's delta.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .backward import _attn_bwd_transposed_tile, _key_block_head, _load_key_block
from .ranges import _key_range, _query_range
from .tiles import _score_scale, _score_unit


@triton.jit
def _attn_bwd_fused_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, GradLse_base, DQ_base, mask_base,
                          lo, hi, start_n, offs_n, col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod,
                          stride_glm, stride_mask_m, qk_scale, cap_unit, slope, diag, win_left, win_right, seed,
                          philox_cols, dropout_p, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                          HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr,
                          MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                          LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          HAS_GRAD_LSE: tl.constexpr, CHECK: tl.constexpr):
    """Query blocks [lo, hi) of one query head against one key block, in the transposed orientation of
    backward.py's dK/dV pass (keys along axis 0). CHECK: apply the causal/window rule and the row bound L."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    mask_offs = offs_m0[None, :] * stride_mask_m
    # The workspace is our own contiguous (B, Hq, L, HEAD_DIM) fp32 tensor: rows of HEAD_DIM, not BLOCK_D.
    dq_offs = offs_m0[:, None] * HEAD_DIM + offs_d[None, :]
    dq_cols_ok = offs_d[None, :] < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m, row_ok, keep, q, do, p_t, cap_grad_t, delta = _attn_bwd_transposed_tile(
            k, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, q_offs, do_offs, mask_offs, start_m, offs_m0,
            offs_d, offs_dv, offs_n, col_ok, L, S, stride_qm, stride_dom, stride_mask_m, qk_scale, cap_unit, slope,
            diag, win_left, win_right, seed, philox_cols, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
            BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, LEFT, RIGHT, HAS_DROPOUT, CHECK)
        if HAS_DROPOUT:
            p_dropped_t = tl.where(keep, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            p_dropped_t = p_t
        dv += tl.dot(p_dropped_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
        # Every key these rows see lies in this block: delta from the fp32 P and dP on chip (module docstring).
        # Keys past S and hidden keys have P = 0, rows past L have P = 0 (score_lse = +inf).
        row_lo, _, _, row_hi = _key_range(start_m, L, S, diag, win_left, win_right, LEFT, RIGHT, BLOCK_M, BLOCK_N)
        if (row_lo >= start_n) & (row_hi <= start_n + BLOCK_N):
            delta = tl.sum(p_t * dp_t, 0)
            if HAS_GRAD_LSE:
                delta -= tl.load(GradLse_base + offs_m.to(tl.int64) * stride_glm, mask=row_ok, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * cap_grad_t
        ds_t = ds_t.to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        dq_part = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)
        # Relaxed ordering: the adds of different programs commute up to fp32 rounding, and nothing reads the
        # workspace until the kernel has finished.
        tl.atomic_add(DQ_base + tl.cast(start_m, tl.int64) * HEAD_DIM + dq_offs, dq_part,
                      mask=row_ok[:, None] & dq_cols_ok, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_fused_kernel(Q, K, V, dO, Mask, RngState, Alibi, ScoreLse, Delta, GradLse, dK, dV, DQ,
                           stride_qb, stride_qh, stride_qm, stride_qd,
                           stride_kb, stride_kh, stride_kn, stride_kd,
                           stride_vb, stride_vh, stride_vn, stride_vd,
                           stride_dob, stride_doh, stride_dom, stride_dod,
                           stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                           stride_glb, stride_glh, stride_glm,
                           Hq, Hkv, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right,
                           softcap, stride_alibi_b, stride_alibi_h,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                           WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                           HAS_ALIBI: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr, HAS_GRAD_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_M: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one kv head (summed over its GQA group in registers, as backward.py's dK/dV
    pass), and this block's part of dQ for every query row it sees, added into the fp32 workspace DQ
    (contiguous (B, Hq, L, HEAD_DIM), zeroed by the host; unscaled: the host multiplies by ``scale``)."""
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

    k, v = _load_key_block(K, V, off_b, off_kvh, offs_n, 0, S, offs_d, offs_dv, stride_kb, stride_kh, stride_kn,
                           stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
                           BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale, cap_unit = _score_scale(scale, softcap, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP)
    unit = _score_unit(HAS_MASK, MASK_IS_BOOL)
    RIGHT: tl.constexpr = IS_CAUSAL or WINDOW_RIGHT
    BANDED: tl.constexpr = WINDOW_LEFT or RIGHT
    m_lo, m_hi = _query_range(start_n, L, S, diag, win_left, win_right, WINDOW_LEFT, RIGHT, BLOCK_M, BLOCK_N)

    seed = 0
    philox_cols = offs_n.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        bh = off_b * Hq + off_h
        Q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
        dO_base = dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
        ScoreLse_base = ScoreLse + bh.to(tl.int64) * L
        Delta_base = Delta + bh.to(tl.int64) * L
        GradLse_base = GradLse + off_b.to(tl.int64) * stride_glb + off_h.to(tl.int64) * stride_glh
        DQ_base = DQ + bh.to(tl.int64) * L * HEAD_DIM
        mask_base, slope = _key_block_head(Mask, Alibi, off_b, off_h, offs_n, stride_mask_b, stride_mask_h,
                                           stride_mask_n, stride_alibi_b, stride_alibi_h, unit, HAS_MASK, HAS_ALIBI)
        if HAS_DROPOUT:
            philox_cols = tl.load(RngState + 1) + bh.to(tl.int64) * L * S + offs_n
        # One loop with the per-element tests where a band or a ragged L needs them, none otherwise (the
        # register budget argument of backward.py's dK/dV pass holds here with one more dot live).
        if BANDED or not EVEN_M:
            dk, dv = _attn_bwd_fused_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, GradLse_base,
                                           DQ_base, mask_base, m_lo, m_hi, start_n, offs_n, col_ok, L, S, stride_qm,
                                           stride_qd, stride_dom, stride_dod, stride_glm, stride_mask_m, qk_scale,
                                           cap_unit, slope, diag, win_left, win_right, seed, philox_cols, dropout_p,
                                           DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                                           HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT,
                                           HAS_DROPOUT, HAS_GRAD_LSE, True)
        else:
            dk, dv = _attn_bwd_fused_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, GradLse_base,
                                           DQ_base, mask_base, 0, L, start_n, offs_n, col_ok, L, S, stride_qm,
                                           stride_qd, stride_dom, stride_dod, stride_glm, stride_mask_m, qk_scale,
                                           cap_unit, slope, diag, win_left, win_right, seed, philox_cols, dropout_p,
                                           DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV,
                                           HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT,
                                           HAS_DROPOUT, HAS_GRAD_LSE, False)

    b_kvh64 = b_kvh.to(tl.int64)
    dk_ptrs = dK + (b_kvh64 * S + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = dV + (b_kvh64 * S + offs_n[:, None]) * HEAD_DIM_V + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attn_bwd_dq_convert_kernel(DQ, dQ, scale, n, BLOCK: tl.constexpr):
    """dQ = scale * workspace, rounded once to the output dtype (both contiguous, n elements)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(dQ + offs, (tl.load(DQ + offs, mask=ok, other=0.0) * scale).to(dQ.dtype.element_ty), mask=ok)
