"""The "reference" backend: the contract in plain PyTorch, on any device.

It runs ``reference.py`` in float32 (or the input dtype when that is float32) on the canonical form of
``contract.py`` (the score rule included), and its backward is the FlashAttention backward written densely. It
is what runs CPU tensors when Triton's interpreter is off, and the last resort of ``"auto"``. It materialises the L x S scores, so it is
neither fast nor memory-lean.
"""

from __future__ import annotations

import torch

from . import reference
from .contract import ScoreRule


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dropout_keep_mask(rng_state: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep pattern this backend draws for ``rng_state`` = [seed, offset] (True = keep)."""
    seed, offset = (int(x) for x in rng_state.tolist())
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + offset) % (2**63))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _attention(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule):
    B, Hq, L, _ = q.shape
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng_state, (B, Hq, L, k.shape[2]), dropout_p, q.device)
    # The canonical form is already folded (is_causal carries a right side of 0, window_right is -1 or >= 1),
    # so passing it back through the reference's validation leaves it unchanged.
    return reference.scaled_dot_product_attention(
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa=True, return_lse=True,
        window_size=(rule.window_left, rule.window_right),
        causal_alignment="bottom_right" if rule.bottom_right else "top_left", softcap=rule.softcap,
        alibi_slopes=rule.alibi_slopes, sinks=rule.sinks, dropout_mask=keep, compute_dtype=_compute_dtype(q.dtype))


def attention_forward(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, out_dtype=None):
    """``out_dtype=torch.float32``: the output unrounded. Half inputs are computed in fp32 anyway, so the inputs
    go in upcast (exact) and the fp32 result comes back without the final rounding to their dtype."""
    if out_dtype is not None and out_dtype != q.dtype:
        if out_dtype != _compute_dtype(q.dtype):
            raise ValueError(f"out_dtype must be {q.dtype} or {_compute_dtype(q.dtype)}, got {out_dtype}")
        q, k, v = (t.to(out_dtype) for t in (q, k, v))
    out, lse = _attention(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule)
    return out.contiguous(), lse.contiguous()


def _weights(q, k, mask, is_causal, scale, rule, cdt):
    """The normalised attention weights P (B, Hq, L, S) in cdt, zero on fully hidden rows, K repeated for GQA,
    and the softcap's derivative 1 - tanh^2(s / c) of the scaled scores s (None without a softcap)."""
    group = q.shape[1] // k.shape[1]
    K = k.to(cdt).repeat_interleave(group, dim=1)
    raw = torch.einsum("bhld,bhsd->bhls", q.to(cdt), K) * scale
    energy = reference.apply_score_rule(raw, mask, is_causal, rule)
    softcap_grad = None
    if rule.softcap > 0.0:
        softcap_grad = 1.0 - torch.tanh(raw / rule.softcap) ** 2
    return reference.softmax_with_sinks(energy, rule.sinks)[0], K, group, softcap_grad


def attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                       mask_needs_grad, rule):
    # The FlashAttention backward written densely (this runs below autograd, so no autograd recompute):
    # dV = Pd^T dO, dP = (dO V^T) * keep / (1 - p), dS = P * (dP - rowsum(P * dP) - grad_lse), dQ = scale dS' K,
    # dK = scale dS'^T Q with dS' = dS * (1 - tanh^2(s / c)) under a softcap (the cap's chain rule; ALiBi is a
    # constant); the mask's gradient is dS (it is added to the capped scores). Sinks change only P (through the
    # denominator); their own gradient is computed in ops.py.
    cdt = _compute_dtype(q.dtype)
    B, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P, K, group, softcap_grad = _weights(q, k, mask, is_causal, scale, rule, cdt)
    V = v.to(cdt).repeat_interleave(group, dim=1)
    dO = grad_out.to(cdt)
    Pd, dP = P, torch.einsum("bhld,bhsd->bhls", dO, V)
    if dropout_p > 0.0:
        keep = dropout_keep_mask(rng_state, (B, Hq, L, S), dropout_p, q.device).to(cdt) / (1.0 - dropout_p)
        Pd, dP = P * keep, dP * keep
    delta = (P * dP).sum(dim=-1, keepdim=True)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdt).unsqueeze(-1)
    dS = P * (dP - delta)
    dmask = dS if mask_needs_grad else None
    if softcap_grad is not None:
        dS = dS * softcap_grad
    dq = torch.einsum("bhls,bhsd->bhld", dS, K) * scale
    dk = (torch.einsum("bhls,bhld->bhsd", dS, q.to(cdt)) * scale).view(B, Hkv, group, S, -1).sum(2)
    dv = torch.einsum("bhls,bhld->bhsd", Pd, dO).view(B, Hkv, group, S, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmask


def masked_softmax_forward(x, mask, scale, is_causal):
    y = reference.masked_softmax(x, mask, scale=scale, is_causal=is_causal, compute_dtype=_compute_dtype(x.dtype))
    return y.contiguous()


def masked_softmax_backward(grad_y, y, scale):
    yf = y.to(_compute_dtype(y.dtype))
    gf = grad_y.to(yf.dtype)
    dx = scale * yf * (gf - (gf * yf).sum(dim=-1, keepdim=True))
    return dx.to(y.dtype).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# KV-cache attention (the canonical form of kvcache_contract.py). Reads the lengths on the host, so unlike the
# Triton path it is neither CUDA-graph capturable nor fast; it is the contract in plain PyTorch.


def kvcache_attention_forward(q, k_cache, v_cache, seqlens_k, block_table, is_causal, scale, rule, num_splits):
    """(out (B, Lq, Hq, Ev), lse (B, Hq, Lq) float32) over each sequence's first seqlens_k[b] cache positions
    (clamped to the capacity, as the kernels do); num_splits does not change this computation."""
    B, Lq, Hq, _ = q.shape
    capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    cdt = _compute_dtype(q.dtype)
    out = q.new_empty(B, Lq, Hq, v_cache.shape[-1])
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    window = (rule.window_left, rule.window_right)
    for b, n in enumerate(seqlens_k.tolist()):
        n = min(max(n, 0), capacity)
        keys = reference.gather_kvcache(k_cache, b, n, block_table)
        values = reference.gather_kvcache(v_cache, b, n, block_table)
        slopes = None if rule.alibi_slopes is None else rule.alibi_slopes[b]
        o, l = reference.attend_sequence(q[b], keys, values, is_causal, scale, window, rule.softcap, slopes, cdt)
        out[b] = o.to(q.dtype)
        lse[b] = l.to(torch.float32)
    return out, lse


def kvcache_append(k_cache, v_cache, k, v, cache_seqlens, block_table) -> None:
    """Write k[b, t] / v[b, t] at position cache_seqlens[b] + t of sequence b (through the block table when
    paged). Positions outside the capacity and pages outside the cache are skipped: nothing else is written."""
    B, Lq = k.shape[:2]
    dev = k.device
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(Lq, device=dev)[None, :]  # (B, Lq)
    batch = torch.arange(B, device=dev)[:, None].expand(B, Lq)
    if block_table is None:
        ok = (pos >= 0) & (pos < k_cache.shape[1])
        index = (batch[ok], pos[ok])
    else:
        page_size = k_cache.shape[1]
        col = pos // page_size
        ok = (pos >= 0) & (col < block_table.shape[1])
        page = torch.full_like(pos, -1)
        page[ok] = block_table[batch[ok], col[ok]].to(torch.int64)
        ok = ok & (page >= 0) & (page < k_cache.shape[0])
        index = (page[ok], (pos % page_size)[ok])
    k_cache[index] = k[ok]
    v_cache[index] = v[ok]


# packed variable-length attention: the dense functions above, one sequence at a time (a host read of the
# cu_seqlens, which this backend needs anyway to slice the sequences)


def _sequences(q, k, v, cu_q, cu_k, rule):
    """Per sequence: (b, query rows, key rows, the (1, H, L, E) views of q, k, v, the sequence's ScoreRule)."""
    starts_q, starts_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(starts_q) - 1):
        rows_q, rows_k = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])
        views = tuple(t[rows].transpose(0, 1).unsqueeze(0) for t, rows in ((q, rows_q), (k, rows_k), (v, rows_k)))
        slopes = None if rule.alibi_slopes is None else rule.alibi_slopes[b:b + 1]
        seq_rule = ScoreRule(rule.window_left, rule.window_right, rule.bottom_right, rule.softcap, slopes,
                                       None)
        yield b, rows_q, rows_k, views, seq_rule


def _sequence_rng(rng_state, b: int):
    """This backend's dropout stream of sequence b: [seed, offset + b] (its own pattern, not the Triton one)."""
    return None if rng_state is None else rng_state + torch.tensor([0, b], dtype=rng_state.dtype,
                                                                     device=rng_state.device)


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale, rng_state, rule):
    Tq, Hq, _ = q.shape
    out = q.new_zeros(Tq, Hq, v.shape[2])
    lse = q.new_full((Hq, Tq), float("-inf"), dtype=torch.float32)
    for b, rows_q, _, (q_b, k_b, v_b), seq_rule in _sequences(q, k, v, cu_q, cu_k, rule):
        if q_b.shape[2] == 0 or k_b.shape[2] == 0:
            continue  # no queries, or no keys: output 0, lse -inf (already there)
        o, l = attention_forward(q_b, k_b, v_b, None, dropout_p, is_causal, scale, _sequence_rng(rng_state, b),
                                 seq_rule)
        out[rows_q] = o[0].transpose(0, 1)
        lse[:, rows_q] = l[0]
    return out, lse


def varlen_backward(grad_out, q, k, v, out, lse, grad_lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, scale,
                    rng_state, rule):
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for b, rows_q, rows_k, (q_b, k_b, v_b), seq_rule in _sequences(q, k, v, cu_q, cu_k, rule):
        if q_b.shape[2] == 0 or k_b.shape[2] == 0:
            continue  # nothing attends: zero gradients
        g_out = grad_out[rows_q].transpose(0, 1).unsqueeze(0)
        o_b = out[rows_q].transpose(0, 1).unsqueeze(0)
        l_b = lse[:, rows_q].unsqueeze(0)
        g_lse = None if grad_lse is None else grad_lse[:, rows_q].unsqueeze(0)
        dq_b, dk_b, dv_b, _ = attention_backward(g_out, q_b, k_b, v_b, o_b, l_b, g_lse, None, dropout_p, is_causal,
                                                 scale, _sequence_rng(rng_state, b), False, seq_rule)
        dq[rows_q] = dq_b[0].transpose(0, 1)
        dk[rows_k] = dk_b[0].transpose(0, 1)
        dv[rows_k] = dv_b[0].transpose(0, 1)
    return dq, dk, dv
