"""Packed variable-length attention: ``llmkernels.varlen_attention`` and its torch.library ops.

  llmkernels::varlen_forward   -> (out (Tq, Hq, Ev), lse (Hq, Tq) float32)
  llmkernels::varlen_backward  -> (dq, dk, dv), contiguous, in the inputs' shapes

The ops take the canonical form of ``varlen_contract.py`` (the score rule's fields as plain arguments, as the dense
ops of ``ops.py`` do) and the name of a backend chosen beforehand (``dispatch.choose_varlen_backend``), so
``torch.compile`` sees constants. Their fake implementations derive every shape from the inputs' shapes alone (no
read of cu_seqlens, no sync).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .contract import ScoreRule
from .ops import _new_rng_state, _tie_zero_grad
from .varlen_contract import check_cu_seqlens_values, check_varlen_attention


def _rule(window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor]) -> ScoreRule:
    return ScoreRule(window_left, window_right, True, softcap, alibi_slopes, None)


def _check_values(q, k, cu_q, cu_k, max_q, max_k, check_values: bool) -> None:
    if check_values:
        check_cu_seqlens_values(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k)


@torch.library.custom_op("llmkernels::varlen_forward", mutates_args=())
def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                   max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float, rng_state: Optional[Tensor],
                   window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                   check_values: bool, backend: str) -> tuple[Tensor, Tensor]:
    """``check_values``: run the cu_seqlens value checks here, at run time (set when the public function was
    traced by torch.compile, where it cannot read values itself)."""
    _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, check_values)
    rule = _rule(window_left, window_right, softcap, alibi_slopes)
    return dispatch.get_backend(backend).varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                        max_seqlen_k, dropout_p, is_causal, scale, rng_state, rule)


@varlen_forward.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, is_causal, scale, rng_state,
      window_left, window_right, softcap, alibi_slopes, check_values, backend):
    Tq, Hq, _ = q.shape
    return q.new_empty(Tq, Hq, v.shape[2]), q.new_empty(Hq, Tq, dtype=torch.float32)


@torch.library.custom_op("llmkernels::varlen_backward", mutates_args=())
def varlen_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                    grad_lse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                    max_seqlen_k: int, dropout_p: float, is_causal: bool, scale: float, rng_state: Optional[Tensor],
                    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
                    backend: str) -> tuple[Tensor, Tensor, Tensor]:
    rule = _rule(window_left, window_right, softcap, alibi_slopes)
    dq, dk, dv = dispatch.get_backend(backend).varlen_backward(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q,
                                                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                                               is_causal, scale, rng_state, rule)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@varlen_backward.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
      is_causal, scale, rng_state, window_left, window_right, softcap, alibi_slopes, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, rng_state, window_left, window_right, softcap,
     alibi_slopes, check_values, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, rng_state, alibi_slopes)
    ctx.args = (max_q, max_k, dropout_p, is_causal, scale, window_left, window_right, softcap, backend)


def _varlen_backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, rng_state, alibi_slopes = ctx.saved_tensors
    max_q, max_k, dropout_p, is_causal, scale, window_left, window_right, softcap, backend = ctx.args
    dq, dk, dv = varlen_backward(grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, max_q, max_k, dropout_p,
                                 is_causal, scale, rng_state, window_left, window_right, softcap, alibi_slopes,
                                 backend)
    return (dq, dk, dv) + (None,) * 14


varlen_forward.register_autograd(_varlen_backward_rule, setup_context=_varlen_setup_context)


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                     enable_gqa=False, return_lse=False, validate=False, backend=None):
    """Attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func``, PyTorch's
    ``torch.nn.attention.varlen.varlen_attn``: the same positional order), forward and backward.

    query ``(Tq, Hq, E)``, key ``(Tk, Hkv, E)``, value ``(Tk, Hkv, Ev)``: the sequences one after another, any
    strides (a slice of a packed QKV projection is read in place, never copied). ``cu_seqlens_q`` /
    ``cu_seqlens_k``: int32 ``(B + 1,)`` on the inputs' device, the same length, starting at 0, non-decreasing,
    ending at Tq / Tk; sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of query and attends only
    rows ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of key and value. Sequences of length 0 are allowed.
    ``max_seqlen_q`` / ``max_seqlen_k``: Python ints >= 0, at least the longest sequence (they only pick the
    GPU's tuning bucket; the kernels never size anything by them).

    Returns the output ``(Tq, Hq, Ev)`` in the inputs' dtype, and with ``return_lse=True`` also the lse ``(Hq, Tq)``
    float32 natural log (differentiable), FlashAttention's varlen layout.

    Alignment: ``is_causal``, ``window_size`` and ALiBi are aligned bottom-right within each sequence (as
    FlashAttention and PyTorch's varlen): with ``d = Lk_b - Lq_b`` query ``i`` of sequence ``b`` sees key ``j``
    iff ``j <= i + d`` (causal) and ``i + d - left <= j <= i + d + right`` (window, -1 = unbounded side). A
    sequence with more queries than keys therefore has leading query rows that see nothing: output 0, gradient
    0, lse -inf (also every row of a sequence with no keys).
    softcap, ALiBi (``alibi_slopes`` float32 ``(Hq,)`` or ``(B, Hq)``, the bias ``-slope * |i + d - j|``),
    dropout and scale mean what they mean in ``llmkernels.scaled_dot_product_attention``.
    GQA: ``Hq`` a multiple of ``Hkv`` (query head ``h`` reads key/value head ``h // (Hq // Hkv)``), always;
    ``enable_gqa`` is accepted for PyTorch's signature and changes nothing.

    validate: the checks of the cu_seqlens' values (first entry 0, last entry Tq / Tk, non-decreasing,
        max_seqlen at least the longest sequence) read them on the host. For CPU tensors they always run. For
        CUDA tensors they run only with ``validate=True``, because the read is a device-to-host copy that waits
        for the GPU (a sync per call, and it breaks CUDA-graph capture); the default ``False`` skips them. With
        them off, wrong values give wrong numbers but never an access outside the tensors: the kernels clamp every
        sequence's rows into ``[0, Tq)`` / ``[0, Tk)``. Every other check (dtypes, devices, ranks, lengths of
        cu_seqlens, head counts and dims, max_seqlen being an int >= 0) always runs, before any kernel.
    backend: ``"triton"``, ``"reference"`` or ``"auto"`` (the default, as for the dense op). The CUDA C++ backend
        does not run varlen; it says so in ``dispatch.varlen_not_supported_reasons`` and ``auto`` skips it.

    Dropout: the Triton kernels draw the keep pattern of query token ``t`` (global row in the packed query),
    key token ``u`` (global row in the packed key) and head ``h`` from Philox at offset
    ``offset + (h * Tq + t) * Tk + u`` with ``[seed, offset]`` drawn from PyTorch's generator per call: the
    dense op's scheme for one batch of the whole ``(Tq, Tk)`` score matrix, of which only the blocks of the
    diagonal are ever drawn. ``triton_kernels.attention.varlen_launch.varlen_dropout_keep_mask`` returns it.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    a = check_varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p, enable_gqa=enable_gqa,
                               validate=validate)
    wants_values = validate or query.device.type == "cpu"
    compiling = torch.compiler.is_compiling()
    if wants_values and not compiling:
        check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, query.shape[0], key.shape[0], a.max_seqlen_q,
                                a.max_seqlen_k)
    name = dispatch.choose_varlen_backend(a, backend)
    rule = a.rule
    Tq, Hq, _ = query.shape
    Tk = key.shape[0]
    if Tq * Hq == 0 or Tk == 0 or a.num_seqs == 0:
        # Nothing to attend over, or nobody asking: output 0, lse -inf, and each input that requires grad gets a
        # zero gradient of its own shape through an empty slice (as the dense op). No kernel runs.
        out = query.new_zeros(Tq, Hq, value.shape[2])
        for t in (query, key, value):
            out = _tie_zero_grad(out, t)
        lse = query.new_full((Hq, Tq), float("-inf"), dtype=torch.float32)
    else:
        # dropout_p = 1 drops every weight: run without dropout and scale by 0, as the dense op does.
        drop_all = a.dropout_p == 1.0
        p = 0.0 if drop_all else a.dropout_p
        rng_state = _new_rng_state(query.device) if p > 0.0 else None
        out, lse = varlen_forward(a.q, a.k, a.v, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k, p,
                                  a.is_causal, a.scale, rng_state, rule.window_left, rule.window_right, rule.softcap,
                                  rule.alibi_slopes, wants_values and compiling, name)
        if drop_all:
            out = out * 0
    if return_lse:
        return out, lse
    return out
