"""Host launchers of packed variable-length attention (``llmkernels.varlen_attention``) on the Triton kernels:
``varlen_forward`` / ``varlen_backward`` (called by ``dispatch.TritonBackend`` with the canonical form of
``varlen_contract.py``) and ``varlen_dropout_keep_mask`` for tests.

The same forward, dQ and dK/dV kernels as the dense op run in their VARLEN mode (tiles._query_block,
seqlens.py): each (T, H, D) tensor is handed over as a (1, H, T, D) view (batch stride 0, its own strides
otherwise, so a slice of a packed QKV projection is read in place), and each program finds its sequence by a
search over cu_seqlens on the device. The grid has ``Tq // BLOCK_M + B`` query-block slots per query head (dQ,
forward) and ``Tk // BLOCK_N + B`` key-block slots per kv head (dK/dV): the work follows the sum over sequences of
Lq_b x Lk_b (causal, windowed: of the visible pairs), with at most one idle program per sequence and head, no
padding in memory and no host read of the cu_seqlens. lse, the backward's delta and its lse in score units are
(Hq, Tq); dq, dk, dv come out contiguous (T, H, D). The backward is deterministic like the dense one (every output
element owned by one program, no atomics).

Dropout offsets are those of the whole (Hq, Tq, Tk) score matrix as one dense batch (see
``llmkernels.varlen.varlen_attention``), so patterns of different sequences and heads never overlap.
"""

from __future__ import annotations

import torch
import triton

from ... import _alloc
from ...contract import ScoreRule
from .configs import PREPROCESS_BLOCK_M, _split_dkdv
from .launch import (_attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd, _attn_bwd_preprocess_kernel, _block, _check_rng,
                     _dense_backward, _dot_precision, _launch, _lse_loses_precision, _needs_dense_backward,
                     _rule_args, _seq_bucket)
from .tiles import _varlen_keep_mask_kernel


def _batch_view_strides(t: torch.Tensor) -> tuple:
    """The strides of t (T, H, D) seen as one batch (1, H, T, D), the dense kernels' layout; batch stride 0."""
    return (0, t.stride(1), t.stride(0), t.stride(2))


def _search_steps(num_seqs: int) -> int:
    """ceil(log2(num_seqs)): the halvings of seqlens._sequence_block's binary search."""
    return max(num_seqs - 1, 0).bit_length()


def _bucket(max_seqlen: int) -> int:
    return _seq_bucket(max(int(max_seqlen), 1))


def _varlen_args(cu_q, cu_k):
    # The kernels read cu_seqlens as contiguous int32: a strided view (cu[::2]) is copied (B + 1 ints).
    cu_q, cu_k = cu_q.contiguous(), cu_k.contiguous()
    num_seqs = cu_q.shape[0] - 1
    return num_seqs, dict(CuSeqQ=cu_q, CuSeqK=cu_k, num_seqs=num_seqs, search_steps=_search_steps(num_seqs),
                          VARLEN=True)


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, rng_state, rule):
    """out (Tq, Hq, Ev) in q.dtype, lse (Hq, Tq) fp32 (-inf on rows that see no key, whose output is 0)."""
    Tq, Hq, E = q.shape
    Tk, Hkv, _ = k.shape
    Ev = v.shape[2]
    out = _alloc.new_output((Tq, Hq, Ev), q.dtype, q.device)
    lse = _alloc.new_output((Hq, Tq), torch.float32, q.device)
    rng = _check_rng(rng_state, dropout_p, q.device)
    alibi_t, rule_scalars, rule_flags = _rule_args(rule, is_causal, Tq, Tk, lse.unsqueeze(0))
    num_seqs, varlen = _varlen_args(cu_q, cu_k)
    _launch(_attn_fwd, lambda meta: (Tq // meta["BLOCK_M"] + num_seqs) * Hq,
            q, k, v, out, rng if rng is not None else lse, alibi_t, lse, out, lse,
            *_batch_view_strides(q), *_batch_view_strides(k), *_batch_view_strides(v), 0, 0, 0, 0,
            *_batch_view_strides(out),
            Hq, Tq, Tk, Hq // Hkv, float(scale), float(dropout_p), _bucket(max_q), _bucket(max_k),
            **rule_scalars, stride_sinks=0, HAS_SINKS=False, **rule_flags,
            HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=False, MASK_IS_BOOL=False,
            HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block(E),
            BLOCK_DV=_block(Ev), **varlen)
    return out, lse


def varlen_backward(grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                    rng_state, rule):
    """(dq, dk, dv), contiguous in the inputs' shapes."""
    Tq, Hq, E = q.shape
    Tk, Hkv, _ = k.shape
    Ev = v.shape[2]
    dev = q.device
    if _needs_dense_backward(q, E, Ev, dropout_p, rule) or _lse_loses_precision(lse, None, rule):
        return _dense_backward_per_sequence(grad_out, q, k, v, lse, grad_lse, cu_q, cu_k, dropout_p, is_causal,
                                            scale, rng_state, rule)
    lse = lse.contiguous()  # our own forward output: already contiguous, so no copy
    delta = torch.empty((Hq, Tq), dtype=torch.float32, device=dev)
    score_lse = torch.empty((Hq, Tq), dtype=torch.float32, device=dev)
    gl = grad_lse
    _attn_bwd_preprocess_kernel[(triton.cdiv(Tq, PREPROCESS_BLOCK_M) * Hq,)](
        out, grad_out, gl if gl is not None else lse, lse, delta, score_lse,
        *_batch_view_strides(out), *_batch_view_strides(grad_out),
        *((0, gl.stride(0), gl.stride(1)) if gl is not None else (0, 0, 0)),
        Hq, Tq, HEAD_DIM_V=Ev, HAS_GRAD_LSE=gl is not None, SCORES_NATURAL=False, BLOCK_M=PREPROCESS_BLOCK_M,
        BLOCK_DV=_block(Ev))

    dq = _alloc.new_output((Tq, Hq, E), q.dtype, dev)
    dk = _alloc.new_output((Tk, Hkv, E), k.dtype, dev)
    dv = _alloc.new_output((Tk, Hkv, Ev), v.dtype, dev)
    rng = _check_rng(rng_state, dropout_p, dev)
    rng_t = rng if rng is not None else delta
    alibi_t, rule_scalars, rule_flags = _rule_args(rule, is_causal, Tq, Tk, delta.unsqueeze(0))
    num_seqs, varlen = _varlen_args(cu_q, cu_k)
    common = dict(**rule_scalars, **rule_flags, HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=False,
                  MASK_IS_BOOL=False, HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype),
                  BLOCK_D=_block(E), BLOCK_DV=_block(Ev), **varlen)
    strides = (*_batch_view_strides(q), *_batch_view_strides(k), *_batch_view_strides(v),
               *_batch_view_strides(grad_out), 0, 0, 0, 0)
    buckets = (_bucket(max_q), _bucket(max_k))
    split = _split_dkdv(max(_block(E), _block(Ev)), q.dtype)
    for do_dk, do_dv in (((False, True), (True, False)) if split else ((True, True),)):
        _launch(_attn_bwd_dkdv, lambda meta: (Tk // meta["BLOCK_N"] + num_seqs) * Hkv,
                q, k, v, grad_out, dq, rng_t, alibi_t, score_lse, delta, dk, dv, *strides,
                Hq, Hkv, Tq, Tk, Hq // Hkv, float(scale), float(dropout_p), *buckets,
                DO_DK=do_dk, DO_DV=do_dv, **common)
    _launch(_attn_bwd_dq, lambda meta: (Tq // meta["BLOCK_M"] + num_seqs) * Hq,
            q, k, v, grad_out, dq, rng_t, alibi_t, score_lse, delta, dq, dq, *strides,
            Hq, Tq, Tk, Hq // Hkv, float(scale), float(dropout_p), *buckets, WRITE_DMASK=False, **common)
    return dq, dk, dv


def _sequence_rows(cu_q, cu_k):
    """Per sequence (query rows, key rows) as slices: a host read of the cu_seqlens."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    return [(slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1]))
            for b in range(len(starts_q) - 1)]


def _dense_backward_per_sequence(grad_out, q, k, v, lse, grad_lse, cu_q, cu_k, dropout_p, is_causal, scale,
                                 rng_state, rule):
    """launch._dense_backward on each sequence, for the calls the dense op also sends there (no spill-free
    backward config on this GPU, or an lse too large for exp(s - lse): ALiBi rows far from every key). It reads
    the cu_seqlens on the host (a sync) and materialises Lq_b x Lk_b per head: a correctness fallback for rare
    calls, with the kernels' own keep pattern."""
    dq, dk, dv = (_alloc.new_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    dq.zero_()
    dk.zero_()
    dv.zero_()
    Hq = q.shape[1]
    keeps = None
    if dropout_p > 0.0:
        keeps = varlen_dropout_keep_mask(rng_state, cu_q, cu_k, Hq, dropout_p)
    for b, (rows_q, rows_k) in enumerate(_sequence_rows(cu_q, cu_k)):
        if rows_q.stop == rows_q.start or rows_k.stop == rows_k.start:
            continue  # no queries or no keys: zero gradients
        q_b, k_b, v_b, g_b = (t[rows].transpose(0, 1).unsqueeze(0)
                              for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k), (grad_out, rows_q)))
        gl_b = None if grad_lse is None else grad_lse[:, rows_q].unsqueeze(0)
        slopes = None if rule.alibi_slopes is None else rule.alibi_slopes[b:b + 1]
        seq_rule = ScoreRule(rule.window_left, rule.window_right, True, rule.softcap, slopes, None)
        keep = None if keeps is None else keeps[b].unsqueeze(0)
        dq_b, dk_b, dv_b, _ = _dense_backward(g_b, q_b, k_b, v_b, lse[:, rows_q].unsqueeze(0), gl_b, None,
                                              dropout_p, is_causal, scale, rng_state, False, seq_rule, keep=keep)
        dq[rows_q] = dq_b[0].transpose(0, 1)
        dk[rows_k] = dk_b[0].transpose(0, 1)
        dv[rows_k] = dv_b[0].transpose(0, 1)
    return dq, dk, dv


def varlen_dropout_keep_mask(rng_state, cu_seqlens_q, cu_seqlens_k, Hq: int, dropout_p: float) -> list:
    """The exact dropout keep pattern (True = keep) the VARLEN kernels draw for ``rng_state`` = [seed, offset]:
    one bool tensor (Hq, Lq_b, Lk_b) per sequence, from the same Philox helper and offsets. For tests (and the
    dense fallback); the kernels never store it. Reads the cu_seqlens on the host."""
    device = cu_seqlens_q.device
    rng = _check_rng(rng_state, dropout_p if dropout_p > 0 else 0.5, device)
    Tq, Tk = int(cu_seqlens_q[-1]), int(cu_seqlens_k[-1])
    block = 64
    keeps = []
    for rows_q, rows_k in _sequence_rows(cu_seqlens_q, cu_seqlens_k):
        L, S = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        keep = torch.empty((Hq, L, S), dtype=torch.int8, device=device)
        if L * S > 0 and Hq > 0:
            grid = (triton.cdiv(L, block), triton.cdiv(S, block), Hq)
            _varlen_keep_mask_kernel[grid](rng, keep, rows_q.start, rows_k.start, Tq, Tk, L, S, float(dropout_p),
                                           BLOCK_M=block, BLOCK_N=block)
        keeps.append(keep.bool())
    return keeps
