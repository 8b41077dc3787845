"""The attention forward with tensor-memory (TMA) loads: extra sm_90 autotune candidates beside forward.py's.

``_attn_fwd_tma_kernel`` takes the arguments of ``forward._attn_fwd_kernel`` plus the batch size ``B``, the K/V
head count ``Hkv`` and two config constexprs:

- ``TMA=False``: the program is exactly ``_attn_fwd_kernel`` (called as a function), i.e. today's pointer
  loads; so the autotuner of an eligible call chooses among today's configs and the TMA ones, and can never end
  up slower than today's best.
- ``TMA=True``: Q, K and V tiles are loaded and O is stored through in-kernel tensor descriptors
  (``tl.make_tensor_descriptor``) over the true rank-4 ``(B, H, L, E)`` shape and strides. Reads outside the
  shape are zero-filled (the ragged last key block, the padded lanes of a head dim such as 72 in a 128 block)
  and stores outside it are dropped, so the loads need no bound test; a rank-4 box never crosses into the next
  head's rows, which a flattened 2-D descriptor would. The ``(B, L, H, E)`` layout (a transposed view) is just
  other strides. The score rule (causal/window/key bound, mask, ALiBi, softcap), dropout and sinks are the
  helpers of tiles.py / ranges.py, and the key loop keeps forward.py's phases (window edge, plain, diagonal).
- ``WARP_SPECIALIZE``: the plain phase's loop is ``tl.range(..., warp_specialize=True)``: on sm_90 Triton
  (3.6 and 3.8) splits it into a TMA producer partition and consumer warps (``setmaxnreg``) when the program has
  4 warps; the loop body is the one the interpreter runs (where the flag changes nothing).

Which calls may use descriptors is the host's rule (``tma_eligible``): every tensor 16-byte aligned, last dim
contiguous, every other stride a positive multiple of 16 bytes. Other calls launch forward.py's kernel as before.
In-kernel descriptors need a global scratch allocator on a GPU (``triton.set_allocator``); ``ensure_allocator``
installs a torch one when the process has none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .forward import _attn_fwd_finish, _attn_fwd_kernel, _attn_fwd_start, _attn_fwd_step
from .tiles import _query_block


@triton.jit
def _attn_fwd_tma_inner(acc, m_i, l_i, q, k_desc, v_desc, off_b, off_kvh, mask_base, lo, hi, offs_m, row_ok, S,
                        stride_mask_n, qk_scale, cap_unit, slope, diag, win_left, win_right, seed, philox_rows,
                        dropout_p, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr,
                        HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, CHECK: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """forward._attn_fwd_inner's online softmax over key blocks [lo, hi), K/V tiles from descriptors (zero past
    S and past the head dim, so no load needs a bound test; CHECK still hides keys past S from the scores)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    mask_ptrs = mask_base + tl.cast(lo, tl.int64) * stride_mask_n + offs_n0[None, :] * stride_mask_n
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        offs_n = start_n + offs_n0
        k = k_desc.load([off_b, off_kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        p, alpha, m_i, l_i = _attn_fwd_step(m_i, l_i, q, k, mask_ptrs, offs_m, row_ok, offs_n, S, qk_scale, cap_unit,
                                            slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                            DOT_PRECISION, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, LEFT, RIGHT,
                                            HAS_DROPOUT, CHECK)
        v = v_desc.load([off_b, off_kvh, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if HAS_MASK:
            mask_ptrs += BLOCK_N * stride_mask_n
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_tma_kernel(Q, K, V, Mask, RngState, Alibi, Sinks, Out, Lse,
                         stride_qb, stride_qh, stride_qm, stride_qd,
                         stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                         stride_ob, stride_oh, stride_om, stride_od,
                         Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right, softcap,
                         stride_alibi_b, stride_alibi_h, stride_sinks, B, Hkv,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, IS_CAUSAL: tl.constexpr,
                         WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
                         HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
                         WARP_SPECIALIZE: tl.constexpr):
    if not TMA:
        _attn_fwd_kernel(Q, K, V, Mask, RngState, Alibi, Sinks, Out, Lse,
                         stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                         stride_vb, stride_vh, stride_vn, stride_vd,
                         stride_mask_b, stride_mask_h, stride_mask_m, stride_mask_n,
                         stride_ob, stride_oh, stride_om, stride_od,
                         Hq, L, S, GROUP, scale, dropout_p, L_BUCKET, S_BUCKET, diag, win_left, win_right, softcap,
                         stride_alibi_b, stride_alibi_h, stride_sinks, HEAD_DIM, HEAD_DIM_V, IS_CAUSAL,
                         WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_SINKS, HAS_MASK, MASK_IS_BOOL,
                         HAS_DROPOUT, DOT_PRECISION, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N)
    else:
        # The opening shared with forward.py (program -> query block, mask rows, Philox rows, key range). Its
        # pointer load of the Q tile has no use here (Q comes from the descriptor), and the compiler drops it.
        # Dense calls only (VARLEN off): L, S and diag come back unchanged.
        (bh, off_b, off_h, offs_m, row_ok, q_unused, K_base, V_base, mask_base, seed, philox_rows, lo, plain_lo,
         plain_hi, hi, L, S, diag, _q_row0, _lse_row0) = _query_block(
            Q, K, V, Mask, RngState, stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_vb,
            stride_vh, stride_mask_b, stride_mask_h, stride_mask_m, Hq, L, S, GROUP, diag, win_left, win_right,
            HEAD_DIM, IS_CAUSAL, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK, HAS_DROPOUT, BLOCK_D, BLOCK_M, BLOCK_N,
            stride_kn, stride_vn, None, None, 1, 0, False)
        off_kvh = off_h // GROUP
        # The block's first row, taken from the opening's rows so the two can never disagree (one reduction per
        # program, outside the key loop).
        start_m = tl.min(offs_m, 0)
        q_desc = tl.make_tensor_descriptor(Q, shape=[B, Hq, L, HEAD_DIM], strides=[stride_qb, stride_qh, stride_qm, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(K, shape=[B, Hkv, S, HEAD_DIM], strides=[stride_kb, stride_kh, stride_kn, 1],
                                           block_shape=[1, 1, BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V, shape=[B, Hkv, S, HEAD_DIM_V],
                                           strides=[stride_vb, stride_vh, stride_vn, 1],
                                           block_shape=[1, 1, BLOCK_N, BLOCK_DV])
        o_desc = tl.make_tensor_descriptor(Out, shape=[B, Hq, L, HEAD_DIM_V],
                                           strides=[stride_ob, stride_oh, stride_om, 1],
                                           block_shape=[1, 1, BLOCK_M, BLOCK_DV])
        q = q_desc.load([off_b, off_h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        qk_scale, cap_unit, slope, sink, sink_logit, m_i, l_i, acc = _attn_fwd_start(
            Alibi, Sinks, off_b, off_h, stride_alibi_b, stride_alibi_h, stride_sinks, scale, softcap, HAS_MASK,
            MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, HAS_SINKS, BLOCK_M, BLOCK_DV)
        RIGHT: tl.constexpr = IS_CAUSAL or WINDOW_RIGHT
        if WARP_SPECIALIZE:
            # One warp-specialized loop over every visible block, each with the per-element test: Triton's Hopper
            # pass (3.6 and 3.8) fails to compile a kernel with another key loop after the specialized one, so
            # the phases of the loop below are not split here.
            acc, m_i, l_i = _attn_fwd_tma_inner(acc, m_i, l_i, q, k_desc, v_desc, off_b, off_kvh, mask_base, lo, hi,
                                                offs_m, row_ok, S, stride_mask_n, qk_scale, cap_unit, slope, diag,
                                                win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                                                BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP,
                                                HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, True, True)
        else:
            # forward.py's phases: the window's left edge, the plain blocks (no test), the diagonal / ragged tail.
            if WINDOW_LEFT:
                acc, m_i, l_i = _attn_fwd_tma_inner(acc, m_i, l_i, q, k_desc, v_desc, off_b, off_kvh, mask_base, lo,
                                                    plain_lo, offs_m, row_ok, S, stride_mask_n, qk_scale, cap_unit,
                                                    slope, diag, win_left, win_right, seed, philox_rows, dropout_p,
                                                    DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK,
                                                    MASK_IS_BOOL, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, RIGHT,
                                                    HAS_DROPOUT, True, False)
            acc, m_i, l_i = _attn_fwd_tma_inner(acc, m_i, l_i, q, k_desc, v_desc, off_b, off_kvh, mask_base, plain_lo,
                                                plain_hi, offs_m, row_ok, S, stride_mask_n, qk_scale, cap_unit, slope,
                                                diag, win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                                                BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP,
                                                HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, False, False)
            acc, m_i, l_i = _attn_fwd_tma_inner(acc, m_i, l_i, q, k_desc, v_desc, off_b, off_kvh, mask_base, plain_hi,
                                                hi, offs_m, row_ok, S, stride_mask_n, qk_scale, cap_unit, slope, diag,
                                                win_left, win_right, seed, philox_rows, dropout_p, DOT_PRECISION,
                                                BLOCK_N, BLOCK_D, BLOCK_DV, HAS_MASK, MASK_IS_BOOL, HAS_SOFTCAP,
                                                HAS_ALIBI, WINDOW_LEFT, RIGHT, HAS_DROPOUT, True, False)
        out, lse = _attn_fwd_finish(acc, m_i, l_i, sink, sink_logit, dropout_p, HAS_MASK, MASK_IS_BOOL, HAS_DROPOUT,
                                    HAS_SINKS)
        # Rows past L and lanes past the head dim fall outside the descriptor's shape: the store drops them.
        o_desc.store([off_b, off_h, start_m, 0], out.to(Out.dtype.element_ty).reshape(1, 1, BLOCK_M, BLOCK_DV))
        tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# host side: which calls may take descriptors, and the scratch allocator they need

# TMA's rules for a global tensor (cuTensorMapEncodeTiled): the base address 16-byte aligned, the last dimension
# contiguous, every other stride a multiple of 16 bytes (and positive: a stride-0 broadcast dim is no tensor map).
TMA_ALIGN_BYTES = 16


def tma_refusals(**tensors) -> list:
    """Why descriptors cannot address these (B, H, L, E) tensors (empty when they can): one line per rule broken,
    naming the tensor."""
    reasons = []
    for name, t in tensors.items():
        size = t.element_size()
        if t.data_ptr() % TMA_ALIGN_BYTES:
            reasons.append(f"{name}: base address not {TMA_ALIGN_BYTES}-byte aligned")
        if t.stride(-1) != 1:
            reasons.append(f"{name}: last dim not contiguous (stride {t.stride(-1)})")
        bad = [st for st in t.stride()[:-1] if st <= 0 or (st * size) % TMA_ALIGN_BYTES]
        if bad:
            reasons.append(f"{name}: strides {tuple(t.stride())} ({size}-byte elements) not all positive multiples "
                           f"of {TMA_ALIGN_BYTES} bytes")
    return reasons


def tma_eligible(q, k, v, out) -> bool:
    """Whether a forward call may use the descriptor kernel: fp16/bf16 (fp32 keeps its small IEEE-dot tiles,
    where a TMA box buys nothing) and every tensor within TMA's rules."""
    return q.dtype in (torch.float16, torch.bfloat16) and not tma_refusals(q=q, k=k, v=v, out=out)


def _torch_scratch(size: int, alignment: int, stream):
    # The descriptors Triton builds in-kernel live in this per-launch global scratch (128 bytes each, per program).
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_allocator() -> None:
    """Install a torch scratch allocator for in-kernel descriptors unless the process set one (triton 3.6 and
    3.8 keep it in a ContextVar; without one the launch raises "no allocator was set"). A user's own allocator
    is left as it is."""
    from triton.runtime import _allocation
    current = getattr(_allocation, "_allocator", None)
    current = current.get() if current is not None else None
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_torch_scratch)
