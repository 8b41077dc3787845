"""The attention backward kernels (FlashAttention-2, Dao 2023): recompute-based, in three kernels.

(1) preprocess: delta = rowsum(dO * O) - grad_lse and the lse in the units of the scores (base 2, or natural
with a float mask: tiles.py); (2) dK/dV, one program per key block of
one kv head, looping over the query heads of its GQA group and over query blocks, accumulating dK and dV in
registers; (3) dQ, one program per query block, looping over key blocks like the forward (it shares the
forward's opening, ``tiles._query_block``, and writes the float mask's gradient dS when asked, each element
exactly once).

Separate passes rather than atomics for dQ: every output element is owned by one program and summed in a fixed
order, so the backward is deterministic (bitwise identical run to run) with no extra switch, and repeated
autotuning runs overwrite rather than accumulate. The price is recomputing Q K^T and dO V^T in the dQ pass.
Above head dim 128 (64 for fp32) dK and dV take one launch each, so only one fp32 accumulator is live.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ranges import _query_range
from .seqlens import _sequence_block, _sequence_span
from .tiles import (_dropout_keep, _exp_scores, _load_rows, _masked_scores, _query_block, _score_scale, _score_unit,
                    _tanh, _tanh_grad)


@triton.jit
def _attn_bwd_preprocess_kernel(Out, dO, GradLse, Lse, Delta, ScoreLse,
                                stride_ob, stride_oh, stride_om, stride_od,
                                stride_dob, stride_doh, stride_dom, stride_dod,
                                stride_glb, stride_glh, stride_glm,
                                Hq, L, HEAD_DIM_V: tl.constexpr, HAS_GRAD_LSE: tl.constexpr,
                                SCORES_NATURAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) - grad_lse (the softmax backward's row term; it equals rowsum(P * dP) with or
    without dropout), and the lse the other passes subtract, in the units of their scores (natural when
    SCORES_NATURAL, i.e. with a float mask; else base 2): -inf (fully masked row) becomes +inf, so recomputed
    weights exp(s - score_lse) are 0 there instead of NaN."""
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
    if SCORES_NATURAL:
        score_lse = tl.where(lse == float("-inf"), float("inf"), lse)
    else:
        score_lse = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=row_ok)
    tl.store(ScoreLse + bh.to(tl.int64) * L + offs_m, score_lse, mask=row_ok)


@triton.jit
def _load_key_block(K, V, off_b, off_kvh, offs_n, k_row0, S, offs_d, offs_dv, stride_kb, stride_kh, stride_kn,
                    stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The K and V tiles a key-block program holds (the dK/dV pass, the fused backward): keys offs_n of the
    sequence starting at row k_row0, rows at or past S and lanes past the head dims read as 0."""
    k = _load_rows(K + off_b.to(tl.int64) * stride_kb + off_kvh.to(tl.int64) * stride_kh
                   + (offs_n.to(tl.int64) + k_row0)[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                   offs_n, S, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V + off_b.to(tl.int64) * stride_vb + off_kvh.to(tl.int64) * stride_vh
                   + (offs_n.to(tl.int64) + k_row0)[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                   offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    return k, v


@triton.jit
def _key_block_head(Mask, Alibi, off_b, off_h, offs_n, stride_mask_b, stride_mask_h, stride_mask_n, stride_alibi_b,
                    stride_alibi_h, unit, HAS_MASK: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Per query head of a key-block program: the base of the mask's columns offs_n (rows added per query block)
    and the head's ALiBi slope in score units (0.0 without ALiBi)."""
    mask_base = Mask
    if HAS_MASK:
        mask_base = (Mask + off_b.to(tl.int64) * stride_mask_b + off_h.to(tl.int64) * stride_mask_h
                     + offs_n.to(tl.int64)[:, None] * stride_mask_n)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_alibi_b + off_h * stride_alibi_h).to(tl.float32) * unit
    return mask_base, slope


@triton.jit
def _attn_bwd_transposed_tile(k, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, q_offs, do_offs, mask_offs,
                              start_m, offs_m0, offs_d, offs_dv, offs_n, col_ok, L, S, stride_qm, stride_dom,
                              stride_mask_m, qk_scale, cap_unit, slope, diag, win_left, win_right, seed, philox_cols,
                              dropout_p, DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr,
                              HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                              HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                              HAS_ALIBI: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                              HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr):
    """One query block (rows start_m + offs_m0) against a program's key block k, keys along axis 0: the opening
    of every step of the dK/dV pass here and of the fused backward (backward_fused.py). Returns the rows, their
    bound, the dropout keep bits (0 without dropout), the Q and dO tiles, P^T = exp(S^T - lse), the softcap's
    gradient factor (0.0 without softcap) and the rows' delta."""
    offs_m = start_m + offs_m0
    row_ok = offs_m < L
    start64 = tl.cast(start_m, tl.int64)
    keep = 0
    if HAS_DROPOUT:
        # Drawn first: the Philox temporaries die before the dots, and only the keep bits stay live.
        keep = _dropout_keep(seed, philox_cols[:, None], (offs_m.to(tl.int64) * S)[None, :], dropout_p)
    q = _load_rows(Q_base + start64 * stride_qm + q_offs, offs_m, L, offs_d, HEAD_DIM, BLOCK_D, CHECK)
    mask_ptrs = mask_base + start64 * stride_mask_m + mask_offs
    if CHECK:
        # Rows past L: score_lse = +inf makes their weights 0 (and their q, dO are 0).
        score_lse = tl.load(ScoreLse_base + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        score_lse = tl.load(ScoreLse_base + offs_m)
        delta = tl.load(Delta_base + offs_m)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    cap_grad_t = 0.0
    if HAS_SOFTCAP:
        cap_grad_t = _tanh_grad(s_t)
        s_t = _tanh(s_t) * cap_unit
    # Queries run along axis 1 here; the causal test "key <= query" reads offs_n[:, None] <= offs_m[None, :].
    s_t = _masked_scores(s_t, mask_ptrs, row_ok[None, :], col_ok, offs_m[None, :], offs_n[:, None], diag,
                         win_left, win_right, slope, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, LEFT, RIGHT, CHECK)
    p_t = _exp_scores(s_t - score_lse[None, :], HAS_MASK, MASK_IS_BOOL)
    do = _load_rows(dO_base + start64 * stride_dom + do_offs, offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
    return offs_m, row_ok, keep, q, do, p_t, cap_grad_t, delta


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, lo, hi, offs_n,
                         col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod, stride_mask_m, qk_scale,
                         cap_unit, slope, diag, win_left, win_right, seed, philox_cols, dropout_p,
                         DOT_PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                         HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr):
    """Accumulate one query head's query blocks [lo, hi) into dK and/or dV of a key block, in the transposed
    orientation (keys along axis 0): s^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q.
    CHECK: apply the causal/window rule and the row bound L (otherwise every query of [lo, hi) sees every key).
    Softcap: dS is the gradient of the capped score; the raw score's is dS * (1 - tanh^2)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Loop-invariant 32-bit tile offsets plus a scalar 64-bit block start: half the registers of carrying
    # 64-bit pointer tensors through the loop, which matters in this register-bound kernel.
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod
    mask_offs = offs_m0[None, :] * stride_mask_m
    for start_m in range(lo, hi, BLOCK_M):
        offs_m, row_ok, keep, q, do, p_t, cap_grad_t, delta = _attn_bwd_transposed_tile(
            k, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, q_offs, do_offs, mask_offs, start_m, offs_m0,
            offs_d, offs_dv, offs_n, col_ok, L, S, stride_qm, stride_dom, stride_mask_m, qk_scale, cap_unit, slope,
            diag, win_left, win_right, seed, philox_cols, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_D,
            BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, LEFT, RIGHT, HAS_DROPOUT, CHECK)
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
            if HAS_SOFTCAP:
                ds_t = ds_t * cap_grad_t
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, dO, Mask, RngState, Alibi, ScoreLse, Delta, dK, dV,
                          stride_qb, stride_qh, stride_qm, stride_qd,
                          stride_kb, stride_kh, stride_kn, stride_kd,
                          stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_dob, stride_doh, stride_dom, stride_dod,
                          stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                          Hq, Hkv, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right,
                          softcap, stride_alibi_b, stride_alibi_h,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                          WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          HAS_ALIBI: tl.constexpr,
                          HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                          EVEN_M: tl.constexpr, DO_DK: tl.constexpr, DO_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CuSeqQ=None, CuSeqK=None, num_seqs=1, search_steps=0,
                          VARLEN: tl.constexpr = False):
    """dK, dV of one key block of one kv head. GQA: the GROUP query heads that read this kv head are summed here,
    in registers, in a fixed order; K/V are never repeated in memory.

    DO_DK / DO_DV: which of the two this launch computes. Both at once (one pass) up to head dim 128 (64 for
    fp32); above that the two fp32 accumulators of BLOCK_N x head-dim do not fit the register file next to
    everything else (they spill in every config, static compile check), so the host runs the kernel twice, once
    per gradient, recomputing the scores: the dV launch skips dP and dS, the dK launch skips P^T dO.

    VARLEN: packed sequences (seqlens.py), one program per (key block slot, kv head): the slot's sequence gives
    the rows of its keys (k_row0, length S_seq) and queries (q_row0, length L_seq), bottom-right (diag =
    S_seq - L_seq); Q, dO are (1, H, Tq, D) views, ScoreLse, Delta (Hq, Tq), dK, dV contiguous (Tk, Hkv, D).
    S stays Tk: the dropout offsets' row length."""
    pid = tl.program_id(0)
    if VARLEN:
        num_slots = S // BLOCK_N + num_seqs
        off_kvh = pid // num_slots
        slot = pid % num_slots
        if IS_CAUSAL:
            slot = num_slots - 1 - slot
        off_b, k_row0, S_seq, n_block = _sequence_block(CuSeqK, slot, num_seqs, search_steps, S, BLOCK_N)
        q_row0, L_seq = _sequence_span(CuSeqQ, off_b, L)
        diag = S_seq - L_seq
        b_kvh = off_kvh
    else:
        num_n_blocks = tl.cdiv(S, BLOCK_N)
        b_kvh = pid // num_n_blocks
        n_block = pid % num_n_blocks
        if IS_CAUSAL:
            n_block = num_n_blocks - 1 - n_block  # the first key blocks see the most queries: start them first
        off_b = b_kvh // Hkv
        off_kvh = b_kvh % Hkv
        k_row0 = 0
        q_row0 = 0
        S_seq = S
        L_seq = L
    start_n = n_block * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n[:, None] < S_seq

    k, v = _load_key_block(K, V, off_b, off_kvh, offs_n, k_row0, S_seq, offs_d, offs_dv, stride_kb, stride_kh,
                           stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd, HEAD_DIM, HEAD_DIM_V,
                           BLOCK_D, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale, cap_unit = _score_scale(scale, softcap, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP)
    unit = _score_unit(HAS_MASK, MASK_IS_BOOL)
    RIGHT: tl.constexpr = IS_CAUSAL or WINDOW_RIGHT
    BANDED: tl.constexpr = WINDOW_LEFT or RIGHT

    # Causal/window: query blocks outside [m_lo, m_hi) see none of these keys and are skipped.
    m_lo, m_hi = _query_range(start_n, L_seq, S_seq, diag, win_left, win_right, WINDOW_LEFT, RIGHT, BLOCK_M,
                              BLOCK_N)
    if VARLEN:
        # A surplus slot (no real key): visit no query block.
        m_hi = tl.where(start_n >= S_seq, 0, m_hi)

    seed = 0
    philox_cols = offs_n.to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(RngState)
    for g in range(0, GROUP):
        off_h = off_kvh * GROUP + g
        if VARLEN:
            row0 = off_h.to(tl.int64) * L + q_row0  # this head's row 0 of the sequence in the (Hq, Tq) arrays
        else:
            row0 = (off_b * Hq + off_h).to(tl.int64) * L
        Q_base = (Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
                  + tl.cast(q_row0, tl.int64) * stride_qm)
        dO_base = (dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                   + tl.cast(q_row0, tl.int64) * stride_dom)
        ScoreLse_base = ScoreLse + row0
        Delta_base = Delta + row0
        mask_base, slope = _key_block_head(Mask, Alibi, off_b, off_h, offs_n, stride_mask_b, stride_mask_h,
                                           stride_mask_n, stride_alibi_b, stride_alibi_h, unit, HAS_MASK, HAS_ALIBI)
        if HAS_DROPOUT:
            # Offset of (b, h, i, j) = base + ((b*Hq + h)*L + i)*S + j: the (b, h) and j parts here, i*S per block.
            philox_cols = tl.load(RngState + 1) + row0 * S + k_row0 + offs_n
        # One loop over all query blocks, unlike the forward's split into a plain and a checked phase: this
        # kernel is register-bound (dK, dV accumulators plus four dots per step), and three pipelined loops in
        # the group loop cost ~50 more registers and spills at head dim 128 (static compile check), whereas the
        # causal/window/bound tests cost a compare and a select per score. A call without causality or a
        # window and with L a multiple of BLOCK_M (EVEN_M) compiles without any test.
        if BANDED or not EVEN_M or VARLEN:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, m_lo,
                                          m_hi, offs_n, col_ok, L_seq, S, stride_qm, stride_qd, stride_dom, stride_dod,
                                          stride_mask_m, qk_scale, cap_unit, slope, diag, win_left, win_right, seed,
                                          philox_cols, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
                                          BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI,
                                          WINDOW_LEFT, RIGHT, HAS_DROPOUT, True, DO_DK, DO_DV)
        else:
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, dO_base, ScoreLse_base, Delta_base, mask_base, 0, L,
                                          offs_n, col_ok, L, S, stride_qm, stride_qd, stride_dom, stride_dod,
                                          stride_mask_m, qk_scale, cap_unit, slope, diag, win_left, win_right, seed,
                                          philox_cols, dropout_p, DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_M,
                                          BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI,
                                          WINDOW_LEFT, RIGHT, HAS_DROPOUT, False, DO_DK, DO_DV)

    # dK, dV are contiguous (B, Hkv, S, D) outputs of our own; only rows < S and columns < head dim are written.
    if VARLEN:
        # (Tk, Hkv, D) contiguous: row (k_row0 + n) * Hkv + kv head.
        out_rows = (k_row0 + offs_n.to(tl.int64)[:, None]) * Hkv + off_kvh
    else:
        out_rows = b_kvh.to(tl.int64) * S + offs_n[:, None]
    if DO_DK:
        dk_ptrs = dK + out_rows * HEAD_DIM + offs_d[None, :]
        tl.store(dk_ptrs, (dk * scale).to(dK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < HEAD_DIM))
    if DO_DV:
        dv_ptrs = dV + out_rows * HEAD_DIM_V + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, score_lse, delta, K_base, V_base, mask_base, dmask_base, lo, hi, offs_m, row_ok, S,
                       stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, cap_unit, slope, diag,
                       win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, WRITE_DMASK: tl.constexpr, CHECK: tl.constexpr):
    """dQ += dS K over key blocks [lo, hi) of one query block (and dmask = dS when asked; with a softcap dQ takes
    dS * (1 - tanh^2), the mask, added after the cap, dS itself)."""
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
        if HAS_SOFTCAP:
            cap_grad = _tanh_grad(s)
            s = _tanh(s) * cap_unit
        s = _masked_scores(s, mask_ptrs, row_ok[:, None], col_ok, offs_m[:, None], offs_n[None, :], diag, win_left,
                           win_right, slope, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, LEFT, RIGHT, CHECK)
        p = _exp_scores(s - score_lse[:, None], HAS_MASK, MASK_IS_BOOL)
        v = _load_rows(v_ptrs, offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if WRITE_DMASK:
            # The mask is added to the natural-log scores, so its gradient is dS itself (no scale factor).
            tl.store(dmask_ptrs, ds, mask=row_ok[:, None] & col_ok)
        if HAS_SOFTCAP:
            ds = ds * cap_grad
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mask_n
        if WRITE_DMASK:
            dmask_ptrs += BLOCK_N
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, dO, Mask, RngState, Alibi, ScoreLse, Delta, dQ, dMask,
                        stride_qb, stride_qh, stride_qm, stride_qd,
                        stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_dob, stride_doh, stride_dom, stride_dod,
                        stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                        Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right, softcap,
                        stride_alibi_b, stride_alibi_h,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                        HAS_ALIBI: tl.constexpr,
                        HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        WRITE_DMASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CuSeqQ=None,
                        CuSeqK=None, num_seqs=1, search_steps=0, VARLEN: tl.constexpr = False):
    """dQ of one query block (and its rows of dmask), looping over key blocks like the forward. VARLEN: packed
    sequences (tiles._query_block); ScoreLse and Delta are (Hq, Tq), dQ a contiguous (Tq, Hq, E)."""
    (bh, off_b, off_h, offs_m, row_ok, q, K_base, V_base, mask_base, seed, philox_rows, lo, plain_lo, plain_hi,
     hi, L, S, diag, q_row0, lse_row0) = _query_block(
        Q, K, V, Mask, RngState, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_mask_b, stride_mask_h, stride_mask_m, Hq, L, S, GROUP, diag, win_left, win_right, HEAD_DIM,
        IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, HAS_DROPOUT, BLOCK_D, BLOCK_M, BLOCK_N, stride_kn, stride_vn,
        CuSeqQ, CuSeqK, num_seqs, search_steps, VARLEN)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    do = _load_rows(dO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                    + (offs_m.to(tl.int64) + q_row0)[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                    offs_m, L, offs_dv, HEAD_DIM_V, BLOCK_DV, True)
    score_lse = tl.load(ScoreLse + lse_row0 + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + lse_row0 + offs_m, mask=row_ok, other=0.0)
    dmask_base = dMask
    if WRITE_DMASK:
        dmask_base = dMask + (bh.to(tl.int64) * L + offs_m.to(tl.int64)[:, None]) * S  # contiguous (B,Hq,L,S)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale, cap_unit = _score_scale(scale, softcap, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP)
    unit = _score_unit(HAS_MASK, MASK_IS_BOOL)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_alibi_b + off_h * stride_alibi_h).to(tl.float32) * unit
    RIGHT: tl.constexpr = IS_CAUSAL or WINDOW_RIGHT
    if WINDOW_LEFT:
        dq = _attn_bwd_dq_inner(dq, q, do, score_lse, delta, K_base, V_base, mask_base, dmask_base, lo, plain_lo,
                                offs_m, row_ok, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale,
                                cap_unit, slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK,
                                MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, WRITE_DMASK,
                                True)
    dq = _attn_bwd_dq_inner(dq, q, do, score_lse, delta, K_base, V_base, mask_base, dmask_base, plain_lo, plain_hi,
                            offs_m, row_ok, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale,
                            cap_unit, slope, diag, win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP,
                            HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, WRITE_DMASK, False)
    dq = _attn_bwd_dq_inner(dq, q, do, score_lse, delta, K_base, V_base, mask_base, dmask_base, plain_hi, hi,
                            offs_m, row_ok, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale,
                            cap_unit, slope, diag, win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                            HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP,
                            HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, WRITE_DMASK, True)
    if WRITE_DMASK and (WINDOW_LEFT or RIGHT):
        # The key blocks the causal/window rule skipped are hidden from every row here: their mask gradient is 0.
        # The checked phase ends with the block holding key hi - 1; the first skipped block starts after it.
        offs_n0 = tl.arange(0, BLOCK_N)
        zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        visited_hi = tl.where(hi > plain_hi, plain_hi + tl.cdiv(hi - plain_hi, BLOCK_N) * BLOCK_N, plain_hi)
        for start_n in range(visited_hi, S, BLOCK_N):
            offs_n = start_n + offs_n0
            tl.store(dmask_base + offs_n[None, :], zeros, mask=row_ok[:, None] & (offs_n[None, :] < S))
        if WINDOW_LEFT:
            for start_n in range(0, lo, BLOCK_N):
                offs_n = start_n + offs_n0
                tl.store(dmask_base + offs_n[None, :], zeros, mask=row_ok[:, None] & (offs_n[None, :] < S))

    if VARLEN:
        dq_ptrs = dQ + ((q_row0 + offs_m.to(tl.int64)[:, None]) * Hq + off_h) * HEAD_DIM + offs_d[None, :]
    else:
        dq_ptrs = dQ + (bh.to(tl.int64) * L + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
