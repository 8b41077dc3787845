"""The attention forward kernel (FlashAttention-2, Dao 2023).

One program per (query block of BLOCK_M rows, batch*head). K/V stream through in BLOCK_N blocks; an online
softmax keeps the running row max ``m`` and sum ``l`` in fp32, in base 2 (log2(e) is folded into the scale once,
so every exponential is an ``exp2``), or in natural-log units with a float mask (tiles.py says why); lse is
stored in natural log for the backward. Nothing of size L x S is
ever materialised. With ``is_causal`` the key blocks that are entirely above the diagonal are never visited (the
loop stops at the diagonal) and only the blocks that straddle it pay for the causal test.

The key loop runs in two phases: blocks that need no per-element test (fully visible, fully in bounds) and the
few that do (the causal diagonal, the ragged last block). A constexpr flag picks the variant, so the common path
carries no bound or causal test. The dQ kernel (backward.py) shares this opening and loop structure.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (_dropout_keep, _exp_scores, _load_rows, _masked_scores, _query_block, _score_scale, _score_unit,
                    _tanh)


@triton.jit
def _attn_fwd_step(m_i, l_i, q, k, mask_ptrs, offs_m, row_ok, offs_n, S, qk_scale, cap_unit, slope, diag, win_left,
                   win_right, seed, philox_rows, dropout_p, DOT_PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
                   MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   LEFT: tl.constexpr, RIGHT: tl.constexpr, HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr):
    """One key block of the online softmax (this kernel's and forward_tma's loops, which differ only in how K and
    V are loaded): the scores of q against k under the score rule, the new running max and sum. Returns the
    block's weights (dropout applied), the factor that rescales the accumulator, the new max and sum."""
    col_ok = offs_n[None, :] < S
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        s = _tanh(s) * cap_unit  # before ALiBi and any mask (score rule step 2)
    s = _masked_scores(s, mask_ptrs, row_ok[:, None], col_ok, offs_m[:, None], offs_n[None, :], diag, win_left,
                       win_right, slope, HAS_MASK, MASK_IS_BOOL, HAS_ALIBI, LEFT, RIGHT, CHECK)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with every key so far masked keeps m = -inf; subtracting 0 instead makes its exp terms 0
    # rather than exp(-inf + inf) = NaN. NaN scores still give NaN (they are never masked away).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = _exp_scores(m_i - m_safe, HAS_MASK, MASK_IS_BOOL)
    p = _exp_scores(s - m_safe[:, None], HAS_MASK, MASK_IS_BOOL)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        # l sums the weights before dropout (dropout acts on normalised weights); only P V sees it.
        keep = _dropout_keep(seed, philox_rows[:, None], offs_n[None, :].to(tl.int64), dropout_p)
        p = tl.where(keep, p, 0.0)
    return p, alpha, m_new, l_i


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, lo, hi, offs_m, row_ok, L, S,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, cap_unit, slope, diag,
                    win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION: tl.constexpr,
                    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one query block. CHECK: these blocks need the per-element
    causal / window / key-bound test (a diagonal, a window edge, the ragged tail); otherwise every key in them is
    visible."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Tile pointers start at key lo (int64: lo * stride may pass 2^31) and advance by whole blocks.
    k_ptrs = K_base + tl.cast(lo, tl.int64) * stride_kn + offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V_base + tl.cast(lo, tl.int64) * stride_vn + offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = mask_base + tl.cast(lo, tl.int64) * stride_mask_n + offs_n0[None, :] * stride_mask_n
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_rows(k_ptrs, offs_n, S, offs_d, HEAD_DIM, BLOCK_D, CHECK)
        p, alpha, m_i, l_i = _attn_fwd_step(m_i, l_i, q, k, mask_ptrs, offs_m, row_ok, offs_n, S, qk_scale, cap_unit,
                                            slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                            DOT_PRECISION, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, LEFT, RIGHT,
                                            HAS_DROPOUT, CHECK)
        v = _load_rows(v_ptrs, offs_n, S, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mask_n
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_start(Alibi, Sinks, off_b, off_h, stride_alibi_b, stride_alibi_h, stride_sinks, scale, softcap,
                    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The per-program constants and the online softmax's starting state (this kernel's and forward_tma's):
    the score scale and softcap unit, the head's ALiBi slope, the sink (its logit and in score units; 0 without
    sinks), the running max m, sum l and the fp32 accumulator."""
    qk_scale, cap_unit = _score_scale(scale, softcap, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP)
    unit = _score_unit(HAS_MASK, MASK_IS_BOOL)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_alibi_b + off_h * stride_alibi_h).to(tl.float32) * unit
    sink = 0.0
    sink_logit = 0.0
    if HAS_SINKS:
        # The sink is one more term of every row's denominator with no value: the running max starts at its
        # logit and the running sum at exp(sink - sink) = 1; lse then includes it.
        sink_logit = tl.load(Sinks + off_h * stride_sinks).to(tl.float32)
        sink = sink_logit * unit
        m_i = tl.zeros([BLOCK_M], tl.float32) + sink
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    return qk_scale, cap_unit, slope, sink, sink_logit, m_i, l_i, acc


@triton.jit
def _attn_fwd_finish(acc, m_i, l_i, sink, sink_logit, dropout_p, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, HAS_SINKS: tl.constexpr):
    """The normalised output tile (fp32) and the rows' lse in natural log, from the final softmax state."""
    # Fully masked rows have l = 0 and acc = 0: dividing by 1 instead gives output 0; their lse is -inf (with a
    # sink, l >= its term, so such a row gives output 0 and lse = sink). A NaN l (NaN inputs) stays NaN.
    fully_masked = l_i == 0.0
    l_safe = tl.where(fully_masked, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    if HAS_MASK and not MASK_IS_BOOL:
        lse = tl.where(fully_masked, float("-inf"), m_i + tl.math.log2(l_safe) * 0.6931471805599453)
    else:
        lse = tl.where(fully_masked, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if HAS_SINKS:
        # A row that saw no key (its max and sum still the sink's own) has lse = the sink exactly, not the sink
        # through log2(e) and ln(2) roundings.
        lse = tl.where((m_i == sink) & (l_i == 1.0), sink_logit, lse)
    return out, lse


@triton.jit
def _attn_fwd_kernel(Q, K, V, Mask, RngState, Alibi, Sinks, Out, Lse,
                     stride_qb, stride_qh, stride_qm, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                     stride_ob, stride_oh, stride_om, stride_od,
                     Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right, softcap,
                     stride_alibi_b, stride_alibi_h, stride_sinks,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
                     HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CuSeqQ=None, CuSeqK=None, num_seqs=1,
                     search_steps=0, VARLEN: tl.constexpr = False):
    """VARLEN: packed sequences (tiles._query_block, seqlens.py); Out is a (1, Hq, Tq, Ev) view, Lse (Hq, Tq)."""
    (bh, off_b, off_h, offs_m, row_ok, q, K_base, V_base, mask_base, seed, philox_rows, lo, plain_lo, plain_hi,
     hi, L, S, diag, q_row0, lse_row0) = _query_block(
        Q, K, V, Mask, RngState, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb,
        stride_vh, stride_mask_b, stride_mask_h, stride_mask_m, Hq, L, S, GROUP, diag, win_left, win_right, HEAD_DIM,
        IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, HAS_DROPOUT, BLOCK_D, BLOCK_M, BLOCK_N, stride_kn, stride_vn,
        CuSeqQ, CuSeqK, num_seqs, search_steps, VARLEN)
    offs_dv = tl.arange(0, BLOCK_DV)
    qk_scale, cap_unit, slope, sink, sink_logit, m_i, l_i, acc = _attn_fwd_start(
        Alibi, Sinks, off_b, off_h, stride_alibi_b, stride_alibi_h, stride_sinks, scale, softcap, HAS_MASK,
        MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, HAS_SINKS, BLOCK_M, BLOCK_DV)
    RIGHT: tl.constexpr = IS_CAUSAL or WINDOW_RIGHT

    if WINDOW_LEFT:
        # The window's left edge: partly visible blocks before the plain ones.
        acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, lo, plain_lo, offs_m, row_ok, L,
                                        S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale,
                                        cap_unit, slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                        DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK,
                                        MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, True)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, plain_lo, plain_hi, offs_m, row_ok,
                                    L, S, stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale,
                                    cap_unit, slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                    DOT_PRECISION, HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK,
                                    MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, False)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K_base, V_base, mask_base, plain_hi, hi, offs_m, row_ok, L, S,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mask_n, qk_scale, cap_unit,
                                    slope, diag, win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                                    HEAD_DIM, HEAD_DIM_V, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL,
                                    HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, True)

    out, lse = _attn_fwd_finish(acc, m_i, l_i, sink, sink_logit, dropout_p, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                                HAS_SINKS)
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
              + (offs_m.to(tl.int64) + q_row0)[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(Lse + lse_row0 + offs_m, lse, mask=row_ok)
