"""Split-K decode attention (flash-decoding) over a contiguous or paged KV cache: the "triton" backend of
``llmkernels.attention_with_kvcache`` (canonical form: kvcache_contract.py).

Kernels:
- ``_decode_split_kernel``: one program per (batch, kv head, row block, key split). Its rows are the query rows
  that share one kv head, ``GROUP = Hq / Hkv`` heads times ``Lq`` positions (row r: head kvh * GROUP + r // Lq,
  position r % Lq), so each K/V tile is read once per kv head, not once per query head (GQA packing; MQA is
  GROUP = Hq). The visible key range of the sequence (its length, less what a window's left side hides from
  every row) is cut into ``num_splits`` equal runs of whole BLOCK_N blocks; each program runs an online softmax
  (base 2, fp32) over its run. With one split it writes the output and lse directly; with more it writes an fp32
  partial output (normalised) and its lse (-inf where the split saw no key).
- ``_decode_merge_kernel``: one program per query row, merges the splits exactly through their lse.
- ``_append_kernel``: one program per new token, writes its K and V rows into the cache (masked stores).

Paged caches are read through the block table row by row: key j of sequence b is row j % page_size of page
block_table[b, j // page_size], so any page size works with any BLOCK_N, and only table entries of positions
below the length are loaded. Positions at or past a sequence's length are never loaded (masked), lengths are
clamped to [0, capacity] and pages outside [0, num_pages) are clamped (reads) or skipped (writes), so no value of
cache_seqlens or the block table makes a kernel touch memory outside the cache.

No host synchronisation and no allocation that depends on values: the grid and the partial buffers depend on
shapes and num_splits only (CUDA-graph capturable). Fixed launch configs (no autotuning, whose choice could
depend on the batch), so num_splits=1 is bitwise batch invariant: a sequence's block boundaries and reduction
order depend on its own length only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _alloc
from .attention.launch import _block, _dot_precision  # the dense kernels' tile sides and fp32 policy
from .attention.ranges import _visible
from .attention.tiles import _score_scale, _score_unit, _tanh
from .interpreter import interpreting

INTERPRETING = interpreting()


@triton.jit
def _decode_split_kernel(Q, K, V, SeqlensK, BlockTable, Alibi, Out, Lse, OutPart, LsePart,
                         stride_qb, stride_qt, stride_qh, stride_qd,
                         stride_kp, stride_kn, stride_kh, stride_kd,
                         stride_vp, stride_vn, stride_vh, stride_vd,
                         stride_btb, stride_btp,
                         stride_ob, stride_ot, stride_oh, stride_od,
                         stride_alibi_b, stride_alibi_h,
                         B, Hq, Hkv, Lq, capacity, num_pages, page_size, num_splits, scale, softcap, win_left,
                         win_right,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                         PAGED: tl.constexpr, IS_CAUSAL: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                         WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # Program order: the splits of one (batch, kv head, row block) are neighbours (they start together and
    # share the Q tile in L2).
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    num_row_blocks = tl.cdiv(GROUP * Lq, BLOCK_M)
    row_block = rest % num_row_blocks
    bh = rest // num_row_blocks
    off_b = bh // Hkv
    kvh = bh % Hkv

    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Lq
    t = rows % Lq  # query position
    h = kvh * GROUP + rows // Lq  # query head
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + off_b.to(tl.int64) * stride_qb + t.to(tl.int64)[:, None] * stride_qt
              + h.to(tl.int64)[:, None] * stride_qh + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # The sequence's keys, clamped into the cache whatever the value; bottom-right: row t sits at key t + diag.
    n_keys = tl.minimum(tl.maximum(tl.load(SeqlensK + off_b), 0), capacity)
    diag = n_keys - Lq
    lo = 0
    if WINDOW_LEFT:
        lo = tl.maximum(diag - win_left, 0)  # left edge of the first row's window: no row sees keys before it
    hi = n_keys  # the last row sits at the last key, so causality and a right side hide no whole block
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
    per_split = tl.cdiv(n_blocks, num_splits) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    # Scores in base 2 (no mask here): the dense kernels' scale and softcap units.
    qk_scale, cap_unit = _score_scale(scale, softcap, False, False, HAS_SOFTCAP)
    unit = _score_unit(False, False)
    slope = tl.zeros([BLOCK_M], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(Alibi + off_b.to(tl.int64) * stride_alibi_b + h * stride_alibi_h, mask=row_ok,
                        other=0.0) * unit

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    K_head = K + kvh.to(tl.int64) * stride_kh
    V_head = V + kvh.to(tl.int64) * stride_vh
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        key_ok = offs_n < end
        if PAGED:
            entry = tl.load(BlockTable + off_b.to(tl.int64) * stride_btb + (offs_n // page_size) * stride_btp,
                            mask=key_ok, other=0)
            page = tl.minimum(tl.maximum(entry.to(tl.int64), 0), num_pages - 1)
            slot = (offs_n % page_size).to(tl.int64)
        else:
            page = tl.zeros([BLOCK_N], tl.int64) + off_b
            slot = offs_n.to(tl.int64)
        k_ptrs = (K_head + page[:, None] * stride_kp + slot[:, None] * stride_kn + offs_d[None, :] * stride_kd)
        k = tl.load(k_ptrs, mask=key_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            s = cap_unit * _tanh(s * qk_scale)
        else:
            s = s * qk_scale
        if HAS_ALIBI:
            s = s - slope[:, None] * tl.abs(t[:, None] + diag - offs_n[None, :]).to(tl.float32)
        visible = key_ok[None, :]
        if IS_CAUSAL or WINDOW_LEFT or WINDOW_RIGHT:
            visible = visible & _visible(t[:, None], offs_n[None, :], diag, win_left, win_right, WINDOW_LEFT,
                                         IS_CAUSAL or WINDOW_RIGHT)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet subtracts 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = (V_head + page[:, None] * stride_vp + slot[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
        v = tl.load(v_ptrs, mask=key_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: 0
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if SPLIT:
        # Partial buffers (num_splits, B, Hq, Lq, Ev) / (num_splits, B, Hq, Lq), contiguous, fp32.
        part_row = ((split * B + off_b).to(tl.int64) * Hq + h) * Lq + t
        tl.store(OutPart + part_row[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
                 mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        tl.store(LsePart + part_row, lse, mask=row_ok)
    else:
        o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + t.to(tl.int64)[:, None] * stride_ot
                  + h.to(tl.int64)[:, None] * stride_oh + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
        tl.store(Lse + (off_b.to(tl.int64) * Hq + h) * Lq + t, lse, mask=row_ok)


@triton.jit
def _decode_merge_kernel(OutPart, LsePart, Out, Lse, stride_ob, stride_ot, stride_oh, stride_od, B, Hq, Lq,
                         num_splits, HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M), lse = M + log(sum_s exp(lse_s - M)), M = max lse_s;
    splits with lse -inf weigh 0, and a row no split saw gives 0 and -inf."""
    row = tl.program_id(0)  # (b * Hq + h) * Lq + t
    t = row % Lq
    bh = row // Lq
    h = bh % Hq
    off_b = bh // Hq
    splits = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    split_ok = splits < num_splits
    part_row = splits.to(tl.int64) * (B * Hq * Lq) + row
    lse_s = tl.load(LsePart + part_row, mask=split_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for the splits that saw no key
    o_s = tl.load(OutPart + part_row[:, None] * HEAD_DIM_V + offs_dv[None, :],
                  mask=split_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    o_s = tl.where(w[:, None] > 0.0, o_s, 0.0)
    total = tl.sum(w, 0)
    seen = total > 0.0
    out = tl.sum(o_s * w[:, None], 0) / tl.where(seen, total, 1.0)
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    o_ptrs = (Out + off_b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot + h.to(tl.int64) * stride_oh
              + offs_dv * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
    tl.store(Lse + row, lse)


@triton.jit
def _append_kernel(KCache, VCache, Knew, Vnew, CacheSeqlens, BlockTable,
                   stride_kp, stride_kn, stride_kh, stride_kd, stride_vp, stride_vn, stride_vh, stride_vd,
                   stride_knb, stride_knt, stride_knh, stride_knd, stride_vnb, stride_vnt, stride_vnh, stride_vnd,
                   stride_btb, stride_btp, Lq, Hkv, capacity, num_pages, page_size,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, PAGED: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Token t of sequence b to position cache_seqlens[b] + t; skipped when that is outside the capacity or its
    page outside the cache."""
    pid = tl.program_id(0)
    off_b = pid // Lq
    t = pid % Lq
    pos = tl.load(CacheSeqlens + off_b).to(tl.int64) + t
    ok = (pos >= 0) & (pos < capacity)
    if PAGED:
        col = tl.where(ok, pos // page_size, 0)
        entry = tl.load(BlockTable + off_b.to(tl.int64) * stride_btb + col * stride_btp, mask=ok, other=-1)
        page = entry.to(tl.int64)
        ok = ok & (page >= 0) & (page < num_pages)
        slot = pos % page_size
    else:
        page = off_b.to(tl.int64)
        slot = pos
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    head_ok = offs_h[:, None] < Hkv
    k = tl.load(Knew + off_b.to(tl.int64) * stride_knb + t * stride_knt + offs_h[:, None] * stride_knh
                + offs_d[None, :] * stride_knd, mask=head_ok & (offs_d[None, :] < HEAD_DIM))
    tl.store(KCache + page * stride_kp + slot * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
             k, mask=ok & head_ok & (offs_d[None, :] < HEAD_DIM))
    v = tl.load(Vnew + off_b.to(tl.int64) * stride_vnb + t * stride_vnt + offs_h[:, None] * stride_vnh
                + offs_dv[None, :] * stride_vnd, mask=head_ok & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(VCache + page * stride_vp + slot * stride_vn + offs_h[:, None] * stride_vh
             + offs_dv[None, :] * stride_vd, v, mask=ok & head_ok & (offs_dv[None, :] < HEAD_DIM_V))


# ----------------------------------------------------------------------------------------------------------------
# launch configs and host launchers


def block_m(group: int, Lq: int, head_dim_block: int, dtype: torch.dtype) -> int:
    """Query rows per program: the packed rows of one kv head, a power of two from 16 (tl.dot) up to the largest
    tile the static compile report shows spill-free on sm_80 and sm_90: 64 rows at head dim 64, 32 at 128, 16 at
    256 for fp16/bf16 (64 rows spill 24-64 B at 128 and 256 on sm_80), 16 for fp32 (64 rows spill 112 B and up).
    More rows than that take several row blocks, each reading the head's K/V once."""
    if dtype == torch.float32:
        cap = 16
    else:
        cap = {64: 64, 128: 32}.get(max(head_dim_block, 64), 16)
    return min(cap, _block(group * Lq))


def decode_config(head_dim_block: int, dtype: torch.dtype) -> dict:
    """(BLOCK_N, num_warps, num_stages) of the split kernel, fixed per head-dim bucket and dtype (no autotuning:
    the choice must not depend on the batch, or num_splits=1 would not be batch invariant). In the interpreter
    the key blocks are 16, so small test caches cross several blocks and pages."""
    if INTERPRETING:
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 32-key blocks spilled 8 B with Lq > 1 (paged: head dim 64 on sm_80, 128 on sm_90, triton 3.8)
        return dict(BLOCK_N=16, num_warps=4, num_stages=2)
    if head_dim_block <= 128:
        return dict(BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_N=32, num_warps=4, num_stages=2)


def kvcache_attention_forward(q, k_cache, v_cache, seqlens_k, block_table, is_causal, scale, rule, num_splits,
                              out=None):
    """(out (B, Lq, Hq, Ev) in q.dtype, lse (B, Hq, Lq) float32) by the split kernel and, for num_splits > 1, the
    merge kernel. ``out``: where to write the output (any strides; the dense op passes a transposed view)."""
    B, Lq, Hq, E = q.shape
    Hkv, Ev = k_cache.shape[2], v_cache.shape[3]
    group = Hq // Hkv
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    if out is None:
        out = _alloc.new_output((B, Lq, Hq, Ev), q.dtype, q.device)
    lse = _alloc.new_output((B, Hq, Lq), torch.float32, q.device)
    splits = max(1, int(num_splits))
    if splits > 1:
        out_part = _alloc.new_output((splits, B, Hq, Lq, Ev), torch.float32, q.device)
        lse_part = _alloc.new_output((splits, B, Hq, Lq), torch.float32, q.device)
    else:
        out_part, lse_part = out, lse
    seqlens = seqlens_k.contiguous()
    slopes = rule.alibi_slopes
    BD, BDV = _block(E), _block(Ev)
    BM = block_m(group, Lq, max(BD, BDV), q.dtype)
    cfg = decode_config(max(BD, BDV), q.dtype)
    grid = (B * Hkv * triton.cdiv(group * Lq, BM) * splits,)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, seqlens, block_table if paged else seqlens, slopes if slopes is not None else lse,
        out, lse, out_part, lse_part,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *(block_table.stride() if paged else (0, 0)), *out.stride(),
        *(slopes.stride() if slopes is not None else (0, 0)),
        B, Hq, Hkv, Lq, capacity, k_cache.shape[0], k_cache.shape[1], splits, float(scale),
        float(rule.softcap), max(rule.window_left, 0), max(rule.window_right, 0),
        GROUP=group, HEAD_DIM=E, HEAD_DIM_V=Ev, PAGED=paged, IS_CAUSAL=bool(is_causal),
        WINDOW_LEFT=rule.window_left >= 0, WINDOW_RIGHT=rule.window_right >= 0, HAS_SOFTCAP=rule.softcap > 0.0,
        HAS_ALIBI=slopes is not None, SPLIT=splits > 1, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_M=BM,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_D=BD, BLOCK_DV=BDV, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if splits > 1:
        _decode_merge_kernel[(B * Hq * Lq,)](
            out_part, lse_part, out, lse, *out.stride(), B, Hq, Lq, splits, HEAD_DIM_V=Ev,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=BDV, num_warps=4 if BDV >= 128 else 2)
    return out, lse


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table) -> None:
    """Write the new tokens into the caches in place (one program per token); nothing else is written."""
    B, Lq, Hkv, E = k.shape
    Ev = v.shape[3]
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    lengths = cache_seqlens.contiguous()
    _append_kernel[(B * Lq,)](
        k_cache, v_cache, k, v, lengths, block_table if paged else lengths,
        *k_cache.stride(), *v_cache.stride(), *k.stride(), *v.stride(),
        *(block_table.stride() if paged else (0, 0)), Lq, Hkv, capacity, k_cache.shape[0], k_cache.shape[1],
        HEAD_DIM=E, HEAD_DIM_V=Ev, PAGED=paged,
        BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(E), BLOCK_DV=triton.next_power_of_2(Ev))


# ----------------------------------------------------------------------------------------------------------------
# The dense op's decode path: scaled_dot_product_attention with few queries against many keys (transformers'
# generate() with a dynamic cache: L = 1 against the whole cache) runs its forward here; the backward, which needs
# only out and lse, stays on the regular kernels (attention/launch.py calls this from attention_forward).

DENSE_DECODE_MAX_QUERIES = 16  # L at most this
DENSE_DECODE_MIN_KEYS = 128  # S at least this


def takes_dense_decode(q, k, mask, dropout_p: float, is_causal: bool, rule) -> bool:
    """Whether the dense op's forward on canonical inputs q (B, Hq, L, E), k (B, Hkv, S, E) can take the decode
    kernel with the same meaning: no mask, dropout or sinks (the kernel has none), and a diagonal at S - L
    wherever one is used (the kernel aligns bottom-right; a top-left causal/window/ALiBi call keeps the regular
    path: here S >= 2L, so its diagonal is not S - L)."""
    L, S = q.shape[2], k.shape[2]
    if mask is not None or dropout_p > 0.0 or rule.sinks is not None:
        return False
    if not (L <= DENSE_DECODE_MAX_QUERIES and S >= max(DENSE_DECODE_MIN_KEYS, 2 * L)):
        return False
    uses_diagonal = is_causal or rule.window_left >= 0 or rule.window_right >= 0 or rule.alibi_slopes is not None
    return rule.bottom_right or not uses_diagonal


def dense_decode_forward(q, k, v, is_causal: bool, scale: float, rule):
    """(out (B, Hq, L, Ev), lse (B, Hq, L)) of the dense op through the split-K kernels: the canonical (B, H, S, D)
    tensors are read as (B, S, H, D) views of a contiguous cache whose every sequence holds S keys."""
    from ..kvcache import choose_num_splits, sm_count

    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = _alloc.new_output((B, Hq, L, v.shape[3]), q.dtype, q.device)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=q.device)
    splits = choose_num_splits(B, Hkv, (Hq // Hkv) * L, S, sm_count(q.device))
    _, lse = kvcache_attention_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), seqlens, None,
                                       is_causal, scale, rule, splits, out=out.transpose(1, 2))
    return out, lse


# ----------------------------------------------------------------------------------------------------------------
# Static compile specs (compile_report.py): every launch config above, typed as a launch types it, with the
# heaviest flags (causal with a window's left side, softcap, ALiBi; the split path's partial stores).

_SPEC_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_SPEC_B, _SPEC_HKV, _SPEC_GROUP, _SPEC_PAGES, _SPEC_PAGE = 8, 8, 4, 4096, 16


def _split_spec(dtype, head_dim: int, paged: bool, rows: int):
    """rows: the packed query rows (GROUP x Lq) of the call the spec stands for; its tile is block_m's."""
    from .attention.specs import _spec

    dt = "*" + _SPEC_DTYPES[dtype]
    H, D = _SPEC_HKV, head_dim
    Hq = H * _SPEC_GROUP
    cfg = decode_config(D, dtype)
    cache = (_SPEC_PAGE * H * D, H * D, D, 1)
    q_strides = (rows // _SPEC_GROUP * Hq * D, Hq * D, D, 1)
    args = dict(Q=dt, K=dt, V=dt, SeqlensK="*i32", BlockTable="*i32", Alibi="*fp32", Out=dt, Lse="*fp32",
                OutPart="*fp32", LsePart="*fp32", stride_btb=1024, stride_btp=1, stride_alibi_b=Hq,
                stride_alibi_h=1, B=_SPEC_B, Hq=Hq, Hkv=H, Lq=rows // _SPEC_GROUP, capacity=16384,
                num_pages=_SPEC_PAGES, page_size=_SPEC_PAGE, num_splits=4, scale=0.1, softcap=30.0, win_left=4095,
                win_right=0, GROUP=_SPEC_GROUP, HEAD_DIM=D, HEAD_DIM_V=D, PAGED=paged, IS_CAUSAL=True,
                WINDOW_LEFT=True, WINDOW_RIGHT=False, HAS_SOFTCAP=True, HAS_ALIBI=True, SPLIT=True,
                DOT_PRECISION=_dot_precision(dtype), BLOCK_M=block_m(_SPEC_GROUP, rows // _SPEC_GROUP, D, dtype),
                BLOCK_N=cfg["BLOCK_N"], BLOCK_D=D, BLOCK_DV=D)
    for prefix, strides in (("q", q_strides), ("k", cache), ("v", cache), ("o", q_strides)):
        for suffix, value in zip(("b", "t", "h", "d") if prefix in ("q", "o") else ("p", "n", "h", "d"), strides):
            args[f"stride_{prefix}{suffix}"] = value
    launch = triton.Config({}, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    name = (f"decode_split {_SPEC_DTYPES[dtype]} d{D} {'paged' if paged else 'contiguous'} Lq{args['Lq']} "
            f"M{args['BLOCK_M']} "
            f"N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}")
    # Not held to HGMMA on sm_90: a decode tile has 16-64 rows and the kernel is bound by its K/V reads; the
    # report shows which matrix instructions each config got.
    return _spec(name, _decode_split_kernel, args, launch, expect_mma=False)


def compile_specs(arch: int) -> list:
    """The split kernel for each dtype, head-dim bucket (64, 128, 256), cache layout and Lq 1 / 16 with a 4-head
    group (the 16-row tile and the largest tile block_m gives), the merge kernel and the append kernel. fp16 stands for itself and bf16 (the same configs; a full report under triton 3.8 showed them with the
    same registers, shared memory and spills in every config), which keeps the suite's compile time down."""
    from .attention.specs import _spec

    specs = []
    for dtype in (torch.float16, torch.float32):
        for D in (64, 128, 256):
            for paged in (False, True):
                for lq in (1, 16):  # Lq = 1 is a JIT constant (row index = head), 16 a runtime value
                    specs.append(_split_spec(dtype, D, paged, _SPEC_GROUP * lq))
    dt = "*fp16"
    for D in (64, 128, 256):
        merge = dict(OutPart="*fp32", LsePart="*fp32", Out=dt, Lse="*fp32", stride_ob=4096, stride_ot=4096,
                     stride_oh=D, stride_od=1, B=8, Hq=32, Lq=1, num_splits=16, HEAD_DIM_V=D, BLOCK_S=16,
                     BLOCK_DV=D)
        specs.append(_spec(f"decode_merge fp16 d{D} S16", _decode_merge_kernel, merge,
                           triton.Config({}, num_warps=4 if D >= 128 else 2, num_stages=1), expect_mma=False))
    H, D = _SPEC_HKV, 256
    cache = (_SPEC_PAGE * H * D, H * D, D, 1)
    append = dict(KCache=dt, VCache=dt, Knew=dt, Vnew=dt, CacheSeqlens="*i32", BlockTable="*i32",
                  stride_btb=1024, stride_btp=1, Lq=4, Hkv=H, capacity=16384, num_pages=_SPEC_PAGES,
                  page_size=_SPEC_PAGE, HEAD_DIM=D, HEAD_DIM_V=D, PAGED=True, BLOCK_H=H,
                  BLOCK_D=D, BLOCK_DV=D)
    for prefix, strides in (("k", cache), ("v", cache), ("kn", (4 * H * D, H * D, D, 1)),
                            ("vn", (4 * H * D, H * D, D, 1))):
        for suffix, value in zip(("p", "n", "h", "d") if prefix in ("k", "v") else ("b", "t", "h", "d"), strides):
            append[f"stride_{prefix}{suffix}"] = value
    specs.append(_spec("decode_append fp16 d256 paged", _append_kernel, append,
                       triton.Config({}, num_warps=4, num_stages=1), expect_mma=False))
    return specs


def excluded_configs(arch: int) -> list:
    """The decode kernels have one config per bucket and exclude none."""
    return []
