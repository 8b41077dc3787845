"""The local attention kernel of a context-parallel step, handing back fp32 partials.

Partial outputs are merged by their lse and rounded to the input dtype once, at the end; partial gradients are
summed in fp32. Rounding each step's partial to bf16 is the error that grows with the world size in other ring
implementations. The forward's fp32 output comes from the backends' ``out_dtype=`` keyword (the Triton kernels
store into the buffer's dtype; the reference backend computes half inputs in fp32 anyway), the Triton backward's
fp32 gradients from the launcher's ``grad_dtype=``. The CUDA
backend writes only the input dtype, so these methods decline it (its reason below) and ``auto`` takes the next.

The backward of a partial block must weight each key by exp(s - lse) with the lse of the *whole* row, which the
Triton kernels do. The dense backwards (the reference backend's, and the Triton launcher's fallback for the
shapes with no spill-free kernel config) normalise the weights over the block's own keys instead, which is right
for a whole attention and wrong for a block; those cases run ``dense_partial_backward`` here instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, reference
from ..contract import AttentionArgs, ScoreRule

FP32_PARTIAL_BACKENDS = ("triton", "reference")
CUDA_REASON = ("the cuda backend writes outputs only in the input dtype; context parallelism needs fp32 partial "
               "outputs and gradients (use triton or reference)")


def partial_reasons(name: str, args: AttentionArgs) -> list:
    """Why backend ``name`` cannot run the local calls of a ring / all-gather step (empty: it can)."""
    if name not in FP32_PARTIAL_BACKENDS:
        return [CUDA_REASON]  # decided before asking the backend, which may build its extension to answer
    return list(dispatch.get_backend(name).attention_reasons(args))


def choose_backend(args: AttentionArgs, backend: Optional[str]) -> str:
    """As dispatch's choice (argument, use_backend block, environment, auto order), with fp32 partials."""
    requested = dispatch.requested_backend(backend)
    candidates = dispatch.AUTO_ORDER if requested == "auto" else (requested,)
    why_not = {}
    for name in candidates:
        reasons = partial_reasons(name, args)
        if not reasons:
            return name
        why_not[name] = reasons
    lines = "\n".join(f"  {name}: " + "; ".join(r) for name, r in why_not.items())
    what = "no backend supports" if requested == "auto" else f"backend {requested!r} does not support"
    raise dispatch.NotSupportedError(f"{what} these context-parallel attention inputs:\n{lines}")


def _rule(causal: bool, bottom_right: bool, softcap: float) -> ScoreRule:
    return ScoreRule(bottom_right=causal and bottom_right, softcap=softcap)


def forward(name: str, q, k, v, causal: bool, bottom_right: bool, scale: float, softcap: float) -> tuple:
    """(out fp32 (B, Hq, L, Ev), lse fp32 (B, Hq, L)) of q against this block of keys."""
    return dispatch.get_backend(name).attention_forward(q, k, v, None, 0.0, causal, scale, None,
                                                        _rule(causal, bottom_right, softcap),
                                                        out_dtype=torch.float32)


def backward(name: str, grad_out, q, k, v, out, lse, grad_lse, causal: bool, bottom_right: bool, scale: float,
             softcap: float) -> tuple:
    """(dq, dk, dv) in fp32 for this block, with ``out`` / ``lse`` / ``grad_lse`` those of the whole attention
    (so the weights exp(s - lse) are the final ones and the partial gradients add up to the whole)."""
    rule = _rule(causal, bottom_right, softcap)
    if name == "triton":
        from ..triton_kernels.attention import launch
        if not launch._needs_dense_backward(q, q.shape[3], v.shape[3], 0.0, rule):
            dq, dk, dv, _ = launch.attention_backward(grad_out, q, k, v, out, lse, grad_lse, None, 0.0, causal,
                                                      scale, None, False, rule, grad_dtype=torch.float32)
            return dq, dk, dv
    return dense_partial_backward(grad_out, q, k, v, out, lse, grad_lse, causal, scale, rule)


def dense_partial_backward(grad_out, q, k, v, out, lse, grad_lse, causal: bool, scale: float, rule: ScoreRule):
    """The FlashAttention backward of one key block in dense fp32 PyTorch, with P = exp(s - lse_whole):
    dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O) + grad_lse), dQ = scale dS' K, dK = scale dS'^T Q, dS' = dS
    times the softcap's derivative. Any device; materialises the block's L x S scores."""
    f32 = torch.float32
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    keys = k.to(f32).repeat_interleave(group, dim=1)
    values = v.to(f32).repeat_interleave(group, dim=1)
    raw = torch.einsum("bhld,bhsd->bhls", q.to(f32), keys) * scale
    scores = reference.apply_score_rule(raw, None, causal, rule)
    lse = lse.to(f32).unsqueeze(-1)
    # A row with lse -inf saw no key anywhere: weights 0 (not exp(-inf + inf) = NaN).
    p = torch.where(torch.isneginf(lse), torch.zeros_like(scores), torch.exp(scores - lse))
    d_out = grad_out.to(f32)
    dp = torch.einsum("bhld,bhsd->bhls", d_out, values)
    delta = (d_out * out.to(f32)).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(f32).unsqueeze(-1)
    ds = p * (dp - delta)
    if rule.softcap > 0.0:
        ds = ds * (1.0 - torch.tanh(raw / rule.softcap) ** 2)
    dq = torch.einsum("bhls,bhsd->bhld", ds, keys) * scale
    dk = (torch.einsum("bhls,bhld->bhsd", ds, q.to(f32)) * scale).view(B, Hkv, group, S, -1).sum(2)
    dv = torch.einsum("bhls,bhld->bhsd", p, d_out).view(B, Hkv, group, S, -1).sum(2)
    return dq, dk, dv
