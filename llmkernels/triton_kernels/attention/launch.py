"""Host launchers of the attention kernels: the "triton" backend's interface that ``dispatch.TritonBackend``
calls with the canonical form of ``contract.py`` (``attention_forward``, ``attention_backward``), the dense
PyTorch backward for the shapes no spill-free backward config covers, and ``dropout_keep_mask`` for tests.
"""

from __future__ import annotations

import torch
import triton

from ... import _alloc, reference
from ...contract import ScoreRule
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .backward_fused import _attn_bwd_dq_convert_kernel, _attn_bwd_fused_kernel
from .configs import (INTERPRETER_BLOCK, INTERPRETING, PREPROCESS_BLOCK_M, SEQ_BUCKET_CAP, _configs_for,
                      _device_arch, _has_rule_flags, _head_bucket, _precision_class, _split_dkdv, _tuned,
                      _tuned_fused, _tuned_fwd_tma, fused_configs_for)
from .forward import _attn_fwd_kernel
from .forward_tma import _attn_fwd_tma_kernel, ensure_allocator, tma_eligible
from .tiles import _dropout_keep_mask_kernel


_attn_fwd = _tuned(_attn_fwd_kernel, "fwd")
_attn_bwd_dkdv = _tuned(_attn_bwd_dkdv_kernel, "dkdv")
_attn_bwd_dq = _tuned(_attn_bwd_dq_kernel, "dq")
# sm_90: the descriptor forward, autotuned over today's pointer configs and its TMA candidates (None elsewhere).
_attn_fwd_tma = _tuned_fwd_tma(_attn_fwd_tma_kernel)

# In the interpreter nothing is tuned, so which loads an eligible (tma_eligible) forward call runs is chosen
# here: "pointer" (forward.py, the default), "tma" (forward_tma's descriptors) or "tma_ws" (its warp-specialized
# loop body). Tests set it to run every path against the reference; on a GPU the autotuner chooses.
INTERPRETER_FORWARD_LOADS = "pointer"
_attn_bwd_fused = _tuned_fused(_attn_bwd_fused_kernel)
DQ_CONVERT_BLOCK = 1024


def _launch(kernel, total_rows_fn, *args, **constexprs):
    """Launch an autotuned kernel (grid from the chosen config) or, in the interpreter, the fixed config."""
    if INTERPRETING or _device_arch() == 0:
        meta = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}
        kernel[(total_rows_fn(meta),)](*args, **constexprs, **meta)
    else:
        kernel[lambda meta: (total_rows_fn(meta),)](*args, **constexprs)


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


def _rule_args(rule, is_causal: bool, L: int, S: int, like):
    """The score rule (contract.ScoreRule, canonical) as kernel arguments: (Alibi pointer, runtime scalars,
    constexpr flags). The window's sides go in as the kernels test them (ranges.py): a bounded side by its
    value, causality as a right side of 0 (canonical form never has both), an unbounded side by a flag off."""
    rule = ScoreRule() if rule is None else rule
    if is_causal and rule.window_right >= 0:
        raise ValueError("window_right must be -1 with is_causal (contract.ScoreRule's causal folding)")
    slopes = rule.alibi_slopes
    if slopes is not None and (slopes.dtype != torch.float32 or slopes.shape[-1] != like.shape[1]):
        raise ValueError(f"alibi_slopes must be (B, Hq) float32, got {slopes.dtype} {tuple(slopes.shape)}")
    scalars = dict(diag=S - L if rule.bottom_right else 0, win_left=max(rule.window_left, 0),
                   win_right=max(rule.window_right, 0), softcap=float(rule.softcap),
                   stride_alibi_b=slopes.stride(0) if slopes is not None else 0,
                   stride_alibi_h=slopes.stride(1) if slopes is not None else 0)
    return (slopes if slopes is not None else like), scalars, _rule_flags(rule)


def _rule_flags(rule) -> dict:
    """The backward and forward kernels' score-rule constexprs (sinks are the forward's own HAS_SINKS); the host
    picks config tables by them exactly as the autotuner's prune does (configs._has_rule_flags)."""
    return dict(WINDOW_LEFT=rule.window_left >= 0, WINDOW_RIGHT=rule.window_right >= 0,
                HAS_SOFTCAP=rule.softcap > 0.0, HAS_ALIBI=rule.alibi_slopes is not None)


def _check_rng(rng_state, dropout_p, device):
    if dropout_p == 0.0:
        return None
    if rng_state is None or rng_state.dtype != torch.int64 or rng_state.numel() != 2:
        raise ValueError("rng_state must be an int64 tensor [seed, offset] when dropout_p > 0, got "
                         f"{None if rng_state is None else (rng_state.dtype, tuple(rng_state.shape))}")
    return rng_state.to(device).contiguous()


def _forward_launch(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, out_dtype=None):
    """(out, lse, grid_rows, args, constexprs) of a forward launch: the outputs allocated, the arguments of
    forward.py's kernel (forward_tma's takes them too, plus B and Hkv)."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    out = _alloc.new_output((B, Hq, L, Ev), out_dtype or q.dtype, q.device)
    lse = _alloc.new_output((B, Hq, L), torch.float32, q.device)
    mask_t, mask_strides, has_mask, mask_is_bool = _mask_args(mask, out)
    rng = _check_rng(rng_state, dropout_p, q.device)
    alibi_t, rule_scalars, rule_flags = _rule_args(rule, is_causal, L, S, lse)
    sinks = None if rule is None else rule.sinks
    if sinks is not None and tuple(sinks.shape) != (Hq,):
        raise ValueError(f"sinks must have shape ({Hq},), got {tuple(sinks.shape)}")
    grid_rows = lambda meta: triton.cdiv(L, meta["BLOCK_M"]) * B * Hq  # noqa: E731
    args = (q, k, v, mask_t, rng if rng is not None else lse, alibi_t, sinks if sinks is not None else lse, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
            Hq, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S))
    constexprs = dict(**rule_scalars, stride_sinks=sinks.stride(0) if sinks is not None else 0,
                      HAS_SINKS=sinks is not None, **rule_flags,
                      HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask,
                      MASK_IS_BOOL=mask_is_bool, HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype),
                      BLOCK_D=_block(E), BLOCK_DV=_block(Ev))
    return out, lse, grid_rows, args, constexprs


def attention_forward(q, k, v, mask, dropout_p: float, is_causal: bool, scale: float, rng_state, rule=None,
                      out_dtype=None, decode_path: bool = True):
    """FlashAttention forward on the canonical form: returns out (B, Hq, L, Ev) in q.dtype and lse (B, Hq, L)
    fp32 (natural log of the whole denominator, sink included; -inf on rows that see no key, whose output is 0,
    or the sink logit with sinks). ``out_dtype=torch.float32`` stores the fp32 accumulator unrounded (the kernel
    converts to the output buffer's dtype), for callers that merge partial attentions (llmkernels.distributed);
    such calls keep the pointer kernel (the descriptor kernel's rules are for fp16/bf16 outputs).
    ``decode_path=False`` keeps the FlashAttention kernel even for the decode shapes (the benchmarks time it
    against the split-K path); fp32-output calls keep it too."""
    from .. import decode  # few queries, many keys: the split-K decode kernels (decode.py says when)

    rule_or_none = ScoreRule() if rule is None else rule
    if (decode_path and out_dtype in (None, q.dtype)
            and decode.takes_dense_decode(q, k, mask, dropout_p, is_causal, rule_or_none)):
        return decode.dense_decode_forward(q, k, v, is_causal, scale, rule_or_none)
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    out, lse, grid_rows, args, constexprs = _forward_launch(q, k, v, mask, dropout_p, is_causal, scale, rng_state,
                                                            rule, out_dtype)
    loads = _forward_loads(q, k, v, out) if out.dtype == q.dtype else "pointer"
    if loads == "pointer":
        _launch(_attn_fwd, grid_rows, *args, **constexprs)
    elif INTERPRETING or _device_arch() == 0:
        meta = {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK}
        _attn_fwd_tma_kernel[(grid_rows(meta),)](*args, **constexprs, B=B, Hkv=Hkv, TMA=True,
                                                 WARP_SPECIALIZE=loads == "tma_ws", **meta)
    else:
        ensure_allocator()
        _attn_fwd_tma[lambda meta: (grid_rows(meta),)](*args, **constexprs, B=B, Hkv=Hkv)
    return out, lse


def forward_with_tma_config(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, config):
    """The descriptor forward launched with one given ``triton.Config`` of configs._TMA_FWD_SM90 (no autotuning),
    for the GPU tests that check every candidate the autotuner may pick. Raises for a call outside TMA's rules."""
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    out, lse, grid_rows, args, constexprs = _forward_launch(q, k, v, mask, dropout_p, is_causal, scale, rng_state,
                                                            rule)
    if not tma_eligible(q, k, v, out):
        raise ValueError("forward_with_tma_config: the call breaks TMA's rules (forward_tma.tma_refusals)")
    ensure_allocator()
    _attn_fwd_tma_kernel[(grid_rows(config.kwargs),)](*args, **constexprs, B=B, Hkv=Hkv, **config.kwargs,
                                                      num_warps=config.num_warps, num_stages=config.num_stages)
    return out, lse


def _forward_loads(q, k, v, out) -> str:
    """Which forward kernel a call runs: "pointer" (forward.py) unless its tensors meet TMA's rules
    (forward_tma.tma_eligible) and either the GPU is sm_90 (the autotuner then picks among today's pointer
    configs and the descriptor ones) or the interpreter was told to (INTERPRETER_FORWARD_LOADS)."""
    if INTERPRETING or _device_arch() == 0:
        wanted = INTERPRETER_FORWARD_LOADS
        if wanted not in ("pointer", "tma", "tma_ws"):
            raise ValueError(f"INTERPRETER_FORWARD_LOADS must be 'pointer', 'tma' or 'tma_ws', got {wanted!r}")
    else:
        wanted = "tma" if _attn_fwd_tma is not None else "pointer"
    if wanted != "pointer" and not tma_eligible(q, k, v, out):
        return "pointer"
    return wanted


# The kernels' backward recomputes the weights as exp(s - lse). Where every visible key of a row has a score far
# below 0, lse = m + log(l) is so large that fp32 cannot hold the log(l) part accurately (its spacing is 2^-12 at
# 2048, 2^-7 at 2^16, up to 2^104 at finfo.min), so the recomputed weights of that row would be off: by a relative
# 1e-4 at |lse| ~ 5600, by the factor l at finfo.min. Scores that far down come from a float mask (transformers'
# finfo(dtype).min on padded rows) or from ALiBi on rows far from every key (bottom-right with L > S, say). Such
# calls take the dense backward, which normalises the weights from the scores themselves. The limit is the CUDA
# backend's (kCoarseLse in csrc/llmk_device.cuh). Without a float mask or ALiBi, |lse| stays within the scores'
# own range, where the tolerance rule's naive baseline has the same rounding.
LSE_EXACT_LIMIT = 2048.0


def _lse_loses_precision(lse, mask, rule=None) -> bool:
    """Whether a row's lse is too large for exp(s - lse) to give its weights (see LSE_EXACT_LIMIT). On a GPU
    this reads one flag back (a sync), for float-mask and ALiBi calls only."""
    float_mask = mask is not None and mask.dtype != torch.bool
    alibi = rule is not None and rule.alibi_slopes is not None
    if not (float_mask or alibi):
        return False
    return bool((torch.isfinite(lse) & (lse.abs() >= LSE_EXACT_LIMIT)).any())


def _needs_dense_backward(q, E, Ev, dropout_p, rule=None) -> bool:
    """On a GPU, whether no spill-free Triton config exists for this backward (see _CONFIGS, _RULE_CONFIGS and
    _EXCLUDED)."""
    arch = 0 if q.device.type != "cuda" else _device_arch()
    if arch == 0:
        return False
    bucket = _head_bucket(max(_block(E), _block(Ev)))
    variant = "dropout" if dropout_p > 0.0 else "base"
    precision = _precision_class(q.dtype)
    # The backward kernels see the window, softcap and ALiBi (sinks only through lse).
    with_rule = rule is not None and _has_rule_flags(_rule_flags(rule))
    return any(_configs_for(arch, kernel, precision, bucket, variant, with_rule) is None
               for kernel in ("dkdv", "dq"))


def _dense_backward(grad_out, q, k, v, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                    mask_needs_grad, rule=None, grad_dtype=None, keep=None):
    """The same backward in dense PyTorch, in fp32, with our Philox keep pattern (or ``keep``, a bool tensor
    broadcastable to (B, Hq, L, S): varlen_launch passes each packed sequence's); lse enters through grad_lse.

    Used only where every Triton config of the backward spills (fp32 at head dims above 128; fp16/bf16 with
    dropout at head dims above 128 on sm_90), and for float-mask and ALiBi calls with a row whose lse fp32 cannot
    resolve (LSE_EXACT_LIMIT): it materialises L x S per (batch, head), so it is a correctness fallback for rare calls,
    not a fast path.
    """
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    group = Hq // Hkv
    f32 = torch.float32
    rule = ScoreRule() if rule is None else rule
    keys = k.to(f32).repeat_interleave(group, dim=1)
    values = v.to(f32).repeat_interleave(group, dim=1)
    raw = torch.einsum("bhld,bhsd->bhls", q.to(f32), keys) * scale
    # The score rule (softcap, ALiBi, mask, causal and window hiding) exactly as the reference applies it.
    scores = reference.apply_score_rule(raw, mask, is_causal, rule)
    # The weights from the row max and sum of the scores, not exp(scores - lse) (see LSE_EXACT_LIMIT). A fully
    # masked row (max -inf) subtracts 0 and divides by 1: weights 0, as in the kernels. NaN stays NaN. A sink
    # joins the max and the sum (no value).
    row_max = scores.amax(dim=-1, keepdim=True)
    sink = None
    if rule.sinks is not None:
        sink = rule.sinks.to(f32).view(1, Hq, 1, 1)
        row_max = torch.maximum(row_max, sink)
    e = torch.exp(scores - torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max))
    total = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - row_max)
    p = e / torch.where(total == 0, torch.ones_like(total), total)
    d_out = grad_out.to(f32)
    dp = torch.einsum("bhld,bhsd->bhls", d_out, values)
    p_dropped = p
    if dropout_p > 0.0:
        if keep is None:
            keep = dropout_keep_mask(rng_state, B, Hq, L, S, dropout_p, q.device)
        keep = keep.to(f32) / (1.0 - dropout_p)
        p_dropped, dp = p * keep, dp * keep
    delta = (p * dp).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(f32).unsqueeze(-1)
    ds = p * (dp - delta)
    ds_raw = ds
    if rule.softcap > 0.0:
        # The mask is added after the cap (its gradient is dS); the raw score's gradient is dS * (1 - tanh^2).
        ds_raw = ds * (1.0 - torch.tanh(raw / rule.softcap) ** 2)
    results = (
        torch.einsum("bhls,bhsd->bhld", ds_raw, keys) * scale,
        (torch.einsum("bhls,bhld->bhsd", ds_raw, q.to(f32)) * scale).view(B, Hkv, group, S, E).sum(2),
        torch.einsum("bhls,bhld->bhsd", p_dropped, d_out).view(B, Hkv, group, S, Ev).sum(2),
    )
    outputs = []
    for value, like in zip(results, (q, k, v)):
        outputs.append(_alloc.new_output(like.shape, grad_dtype or like.dtype, like.device).copy_(value))
    dmask = None
    if mask_needs_grad and mask is not None:
        dmask = _alloc.new_output((B, Hq, L, S), f32, q.device).copy_(ds)
    return (*outputs, dmask)


def fused_backward_reasons(q, k, v, mask, dropout_p, mask_needs_grad, rule=None) -> list:
    """Why a call cannot take the fused (atomic dQ) backward of backward_fused.py and takes the separate passes
    instead (an empty list: it can). Both compute the same function; only speed and determinism differ."""
    reasons = []
    if mask_needs_grad and mask is not None:
        # dS would have to be written for every (query, key), including the tiles the rule skips; the dQ pass of
        # the separate backward owns whole mask rows and writes them.
        reasons.append("the float mask's gradient is written by the separate-pass dQ kernel")
    arch = 0 if q.device.type != "cuda" else _device_arch()
    if arch != 0:
        rule = ScoreRule() if rule is None else rule
        bucket = _head_bucket(max(_block(q.shape[-1]), _block(v.shape[-1])))
        with_rule = _has_rule_flags(_rule_flags(rule))
        variant = "dropout" if dropout_p > 0.0 else "base"
        if fused_configs_for(arch, _precision_class(q.dtype), bucket, variant, with_rule) is None:
            reasons.append(f"no spill-free fused config on sm_{arch} for {q.dtype} head dim bucket {bucket}, "
                           f"{variant}{' with the score rule' if with_rule else ''} (configs.FUSED_CONFIGS)")
    return reasons


def use_fused_backward(deterministic, q, k, v, mask, dropout_p, mask_needs_grad, rule=None) -> bool:
    """deterministic: True forces the separate passes, False allows the fused one, None follows
    torch.are_deterministic_algorithms_enabled() at the time the backward runs (on a GPU)."""
    if deterministic is None:
        # Off a GPU (the interpreter) the default stays on the separate passes, so the suite's default-path
        # tests stay bitwise repeatable; deterministic=False asks for the fused kernel there
        # (tests/test_backward_fused.py). On a GPU the default takes the fused kernel where configs.FUSED_CONFIGS
        # has a spill-free tile (fp16/bf16, head dims up to 128) and PyTorch's deterministic flag is off.
        deterministic = torch.are_deterministic_algorithms_enabled() or q.device.type != "cuda"
    return not deterministic and not fused_backward_reasons(q, k, v, mask, dropout_p, mask_needs_grad, rule)


def attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                       mask_needs_grad, rule=None, deterministic=True, grad_dtype=None):
    """FlashAttention-2 backward: (dq, dk, dv, dmask); dmask (B, Hq, L, S) fp32 = dS when mask_needs_grad.
    The sinks' gradient is ops.py's; sinks enter here only through lse (the weights exp(s - lse) are right).
    ``grad_dtype=torch.float32`` writes dq, dk, dv unrounded (for callers that sum partial gradients); ``out``
    may be fp32 then too (the preprocess reads it in its own dtype). ``deterministic`` (see use_fused_backward):
    the default True keeps this function's old behaviour; the op passes the user's choice."""
    B, Hq, L, E = q.shape
    Hkv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    rule = ScoreRule() if rule is None else rule
    if _needs_dense_backward(q, E, Ev, dropout_p, rule) or _lse_loses_precision(lse, mask, rule):
        return _dense_backward(grad_out, q, k, v, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                               mask_needs_grad, rule, grad_dtype)
    dev = q.device
    lse = lse.contiguous()  # our own forward output: already contiguous, so no copy
    delta = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    score_lse = torch.empty((B, Hq, L), dtype=torch.float32, device=dev)
    gl = grad_lse
    # A float mask keeps the scores in natural-log units (tiles.py): the lse the passes subtract must match.
    scores_natural = mask is not None and mask.dtype != torch.bool
    _attn_bwd_preprocess_kernel[(triton.cdiv(L, PREPROCESS_BLOCK_M) * B * Hq,)](
        out, grad_out, gl if gl is not None else lse, lse, delta, score_lse,
        *out.stride(), *grad_out.stride(), *(gl.stride() if gl is not None else (0, 0, 0)),
        Hq, L, HEAD_DIM_V=Ev, HAS_GRAD_LSE=gl is not None, SCORES_NATURAL=scores_natural,
        BLOCK_M=PREPROCESS_BLOCK_M, BLOCK_DV=_block(Ev))

    dq = _alloc.new_output((B, Hq, L, E), grad_dtype or q.dtype, dev)
    dk = _alloc.new_output((B, Hkv, S, E), grad_dtype or k.dtype, dev)
    dv = _alloc.new_output((B, Hkv, S, Ev), grad_dtype or v.dtype, dev)
    write_dmask = bool(mask_needs_grad) and mask is not None
    if write_dmask and mask.dtype == torch.bool:
        raise ValueError("mask_needs_grad is set but attn_mask is a bool mask, which has no gradient")
    dmask = _alloc.new_output((B, Hq, L, S), torch.float32, dev) if write_dmask else None
    mask_t, mask_strides, has_mask, mask_is_bool = _mask_args(mask, dq)
    rng = _check_rng(rng_state, dropout_p, dev)
    rng_t = rng if rng is not None else delta
    alibi_t, rule_scalars, rule_flags = _rule_args(rule, is_causal, L, S, delta)
    common = dict(**rule_scalars, **rule_flags, HEAD_DIM=E, HEAD_DIM_V=Ev, IS_CAUSAL=bool(is_causal), HAS_MASK=has_mask,
                  MASK_IS_BOOL=mask_is_bool, HAS_DROPOUT=rng is not None, DOT_PRECISION=_dot_precision(q.dtype),
                  BLOCK_D=_block(E), BLOCK_DV=_block(Ev))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *mask_strides)
    if use_fused_backward(deterministic, q, k, v, mask, dropout_p, mask_needs_grad, rule):
        _fused_backward(q, k, v, grad_out, mask_t, rng_t, alibi_t, score_lse, delta, gl, dq, dk, dv, strides,
                        float(scale), float(dropout_p), common)
        return dq, dk, dv, dmask
    split = _split_dkdv(max(_block(E), _block(Ev)), q.dtype)
    for do_dk, do_dv in (((False, True), (True, False)) if split else ((True, True),)):
        _launch(_attn_bwd_dkdv, lambda meta: triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,
                q, k, v, grad_out, mask_t, rng_t, alibi_t, score_lse, delta, dk, dv, *strides,
                Hq, Hkv, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S),
                DO_DK=do_dk, DO_DV=do_dv, **common)
    _launch(_attn_bwd_dq, lambda meta: triton.cdiv(L, meta["BLOCK_M"]) * B * Hq,
            q, k, v, grad_out, mask_t, rng_t, alibi_t, score_lse, delta, dq, dmask if write_dmask else dq, *strides,
            Hq, L, S, Hq // Hkv, float(scale), float(dropout_p), _seq_bucket(L), _seq_bucket(S),
            WRITE_DMASK=write_dmask, **common)
    return dq, dk, dv, dmask


def _fused_backward(q, k, v, grad_out, mask_t, rng_t, alibi_t, score_lse, delta, grad_lse, dq, dk, dv, strides,
                    scale, dropout_p, common):
    """The fused backward (backward_fused.py) into dq, dk, dv: one launch over key blocks that adds dQ into an
    fp32 workspace of B*Hq*L*E floats with atomic adds, then one elementwise launch that writes dq = scale *
    workspace in q's dtype."""
    B, Hq, L, E = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    workspace = torch.zeros((B, Hq, L, E), dtype=torch.float32, device=q.device)
    gl_t = grad_lse if grad_lse is not None else delta
    gl_strides = grad_lse.stride() if grad_lse is not None else (0, 0, 0)
    _launch(_attn_bwd_fused, lambda meta: triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv,
            q, k, v, grad_out, mask_t, rng_t, alibi_t, score_lse, delta, gl_t, dk, dv, workspace, *strides,
            *gl_strides, Hq, Hkv, L, S, Hq // Hkv, scale, dropout_p, _seq_bucket(L), _seq_bucket(S),
            HAS_GRAD_LSE=grad_lse is not None, **common)
    n = workspace.numel()
    _attn_bwd_dq_convert_kernel[(triton.cdiv(n, DQ_CONVERT_BLOCK),)](workspace, dq, scale, n,
                                                                      BLOCK=DQ_CONVERT_BLOCK)


def dropout_keep_mask(rng_state, B: int, Hq: int, L: int, S: int, dropout_p: float, device) -> torch.Tensor:
    """The exact dropout keep pattern (True = keep), shape (B, Hq, L, S), that the attention kernels draw for
    ``rng_state`` = [seed, offset]: the same Philox helper and offsets. For tests; the kernels never store it."""
    rng = _check_rng(rng_state, dropout_p if dropout_p > 0 else 0.5, device)
    keep = torch.empty((B, Hq, L, S), dtype=torch.int8, device=device)
    block = 64
    grid = (triton.cdiv(L, block), triton.cdiv(S, block), B * Hq)
    _dropout_keep_mask_kernel[grid](rng, keep, L, S, float(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
