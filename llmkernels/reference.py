"""The einsum reference: every kernel in llmkernels is checked against these functions.

They are written in the form of the classic self-attention module (see ``../shared/guide/seed/``):
``einsum("nqhd,nkhd->nhqk")`` for the scores, ``masked_fill`` for the mask, softmax, then
``einsum("nhqk,nkhd->nqhd")`` for the weighted sum of values. The seed document writes the last product as
``einsum("nhqk,nvhd->nqhd")``; that names V's position index ``v`` instead of ``k``, so einsum sums the weights
over ``k`` (giving 1) and V over ``v`` separately, and every query gets the sum of V. ``SEED_VALUE_EINSUM``
keeps the literal formula so a test can show it disagrees; do not "fix" the reference back to it.

Unlike the kernels, the reference materialises the L x S score matrix and repeats K/V for GQA. It follows the
full contract (KERNELS.md) and computes in ``compute_dtype`` (float64 for checks; ``None`` computes in the input
dtype, which is the "naive PyTorch in low precision" baseline of the tolerance rule). It also serves as the
``"reference"`` backend, in float32 for half-precision inputs.
"""

from __future__ import annotations

from typing import Optional

import torch

from .contract import REFERENCE_DTYPES, ScoreRule, check_attention, check_masked_softmax

VALUE_EINSUM = "nhqk,nkhd->nqhd"
SEED_VALUE_EINSUM = "nhqk,nvhd->nqhd"  # the seed document's bug, kept for the test that shows it is wrong


def _softmax_zero_for_masked_rows(energy: torch.Tensor):
    """Softmax over the last dim where a row with every entry -inf gives zeros (not NaN) and zero gradient.

    Returns (weights, lse). NaN in the scores still propagates: only rows that are entirely -inf are zeroed.
    """
    fully_masked = torch.isneginf(energy).all(dim=-1, keepdim=True)
    # Replace such rows by zeros before the softmax so that neither the values nor the gradients see NaN.
    safe = energy.masked_fill(fully_masked, 0.0)
    weights = torch.softmax(safe, dim=-1).masked_fill(fully_masked, 0.0)
    # lse = m + log(sum(exp(s - m))) with the row max m held constant, rather than torch.logsumexp: the value is
    # the same, but logsumexp's backward computes exp(s - lse), and where |m| is so large that log(sum) is lost
    # in lse's rounding (a row whose every key carries a float mask of finfo(float32).min, as transformers
    # builds it; float64 has the same absorption there) that is exp(0) = 1 for every key, an lse gradient L
    # times too large instead of the softmax weights. Here autograd differentiates the explicit sum: softmax.
    # A non-finite max (an inf or NaN score) is replaced by 0, so the value still comes out inf or NaN.
    m = safe.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = (m + torch.log(torch.exp(safe - m).sum(dim=-1, keepdim=True))).squeeze(-1)
    lse = lse.masked_fill(fully_masked.squeeze(-1), float("-inf"))
    return weights, lse


def apply_score_rule(energy: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool, rule: ScoreRule
                     ) -> torch.Tensor:
    """Steps 2 to 4 of the score rule (contract.ScoreRule) on the scaled scores ``energy`` (B, Hq, L, S), literally
    and in order: softcap, ALiBi, the mask (added or hiding), causal and window hiding (-inf)."""
    L, S = energy.shape[-2:]
    cdt, device = energy.dtype, energy.device
    if rule.softcap > 0.0:
        # Before any mask: capping after masking would turn -inf into -softcap and let hidden keys leak.
        energy = rule.softcap * torch.tanh(energy / rule.softcap)
    d = S - L if rule.bottom_right else 0
    i = torch.arange(L, device=device).unsqueeze(-1)
    j = torch.arange(S, device=device)
    if rule.alibi_slopes is not None:
        distance = (i + d - j).abs().to(cdt)
        energy = energy - rule.alibi_slopes.to(cdt)[:, :, None, None] * distance
    if mask is not None:
        energy = energy.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else energy + mask.to(cdt)
    hidden = torch.zeros(L, S, dtype=torch.bool, device=device)
    if is_causal:
        hidden |= j > i + d
    if rule.window_left >= 0:
        hidden |= j < i + d - rule.window_left
    if rule.window_right >= 0:
        hidden |= j > i + d + rule.window_right
    return energy.masked_fill(hidden, float("-inf"))


def softmax_with_sinks(energy: torch.Tensor, sinks: Optional[torch.Tensor]):
    """(weights, lse) of the final scores (B, Hq, L, S); sinks (Hq,) join each row's denominator, no value.

    The sink is one more column of the row: its weight is dropped, so the key weights are
    exp(s_j) / (exp(sink) + sum exp(s_k)) and lse is the log of that whole denominator; a row whose keys are all
    hidden gets weights 0 and lse = sink. Autograd through the column gives the sinks' gradient."""
    if sinks is None:
        return _softmax_zero_for_masked_rows(energy)
    B, Hq, L, _ = energy.shape
    column = sinks.to(energy.dtype).view(1, Hq, 1, 1).expand(B, Hq, L, 1)
    weights, lse = _softmax_zero_for_masked_rows(torch.cat([energy, column], dim=-1))
    return weights[..., :-1], lse


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, return_lse=False, window_size=(-1, -1), causal_alignment=None,
                                 softcap=0.0, alibi_slopes=None, sinks=None,
                                 dropout_mask: Optional[torch.Tensor] = None,
                                 compute_dtype: Optional[torch.dtype] = None):
    """Attention by the classic einsum formulation, with the full llmkernels contract.

    The variant arguments (``window_size``, ``causal_alignment``, ``softcap``, ``alibi_slopes``, ``sinks``, a
    ``CausalBias`` attn_mask) are those of ``llmkernels.scaled_dot_product_attention``, applied literally on the
    materialised L x S scores (``apply_score_rule``; float64 slopes and sinks are taken with float64 inputs).
    ``dropout_mask``: a bool tensor broadcastable to (..., Hq, L, S), True = keep. When given, it is used
    instead of drawing a random one (so a kernel's dropout can be checked exactly); kept weights are scaled by
    ``1 / (1 - dropout_p)``. ``compute_dtype``: dtype of the arithmetic (``None``: the input dtype). The output
    is returned in the input dtype; lse in float32 (float64 when computing in float64).
    """
    a = check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, REFERENCE_DTYPES,
                        window_size=window_size, causal_alignment=causal_alignment, softcap=softcap,
                        alibi_slopes=alibi_slopes, sinks=sinks)
    dtype = query.dtype
    cdt = compute_dtype or dtype
    B, Hq, L, E = a.q.shape
    Hkv, S = a.k.shape[1], a.k.shape[2]

    # The classic module's layout: (n, seq, heads, head_dim).
    Q = a.q.to(cdt).transpose(1, 2)
    K = a.k.to(cdt).transpose(1, 2)
    V = a.v.to(cdt).transpose(1, 2)
    if Hkv != Hq:  # GQA (or a single broadcast K/V head): query head h reads K/V head h // (Hq // Hkv)
        K = K.repeat_interleave(Hq // Hkv, dim=2)
        V = V.repeat_interleave(Hq // Hkv, dim=2)

    energy = torch.einsum("nqhd,nkhd->nhqk", Q, K) * a.scale
    energy = apply_score_rule(energy, a.mask, a.is_causal, a.rule)
    attention, lse = softmax_with_sinks(energy, a.rule.sinks)
    if a.dropout_p == 1.0:
        # Every weight dropped: PyTorch's dropout multiplies by 0 (no 1 / (1 - p)), which keeps NaN visible.
        attention = attention * 0.0
    elif a.dropout_p > 0.0:
        if dropout_mask is None:
            dropout_mask = torch.rand_like(attention) >= a.dropout_p
        else:
            dropout_mask = dropout_mask.expand(a.out_shape[:-1] + (S,)).reshape(B, Hq, L, S)
        attention = attention * dropout_mask.to(cdt) / (1.0 - a.dropout_p)

    out = torch.einsum(VALUE_EINSUM, attention, V).transpose(1, 2)  # (B, Hq, L, Ev)
    out = out.to(dtype).reshape(a.out_shape)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    return out, lse.to(lse_dtype).reshape(a.out_shape[:-1])


def masked_softmax(input, mask=None, *, scale=1.0, is_causal=False, dim=-1,
                   compute_dtype: Optional[torch.dtype] = None):
    """softmax(scale * input + mask) along ``dim`` with the llmkernels contract, in plain PyTorch.

    Bool mask: True = keep. Float mask: added. ``is_causal`` hides column j > i of the last two dims. Rows with
    nothing left give zeros and zero gradient. Arithmetic in ``compute_dtype`` (``None``: the input dtype);
    result in the input dtype.
    """
    a = check_masked_softmax(input, mask, scale, is_causal, dim, REFERENCE_DTYPES)
    cdt = compute_dtype or input.dtype
    logits = a.x.to(cdt) * a.scale
    if a.mask is not None:
        if a.mask.dtype == torch.bool:
            logits = logits.masked_fill(~a.mask, float("-inf"))
        else:
            logits = logits + a.mask.to(cdt)
    if a.is_causal:
        M, N = logits.shape[-2:]
        causal = torch.ones(M, N, dtype=torch.bool, device=input.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
    y, _ = _softmax_zero_for_masked_rows(logits)
    y = y.reshape(a.work_shape)
    if a.moved:
        y = y.movedim(-1, a.dim)
    return y.reshape(input.shape).to(input.dtype)


# ----------------------------------------------------------------------------------------------------------------
# KV-cache attention (llmkernels.attention_with_kvcache): gather each sequence's keys into a dense tensor and run
# the dense reference above on it, bottom-right aligned.


def gather_kvcache(cache: torch.Tensor, b: int, n: int, block_table: Optional[torch.Tensor]) -> torch.Tensor:
    """The first ``n`` positions of sequence ``b`` as a dense (n, H, D) tensor: a slice of a contiguous cache, or
    its pages ``block_table[b, :ceil(n / page_size)]`` in order (no other page is touched)."""
    if block_table is None:
        return cache[b, :n]
    page_size = cache.shape[1]
    pages = block_table[b, :(n + page_size - 1) // page_size].long()
    bad = (pages < 0) | (pages >= cache.shape[0])
    if bool(bad.any()):
        # Indexing would wrap a negative entry to the last page (wrong numbers) or fail on the device: refuse.
        p = int(bad.nonzero()[0, 0])
        raise ValueError(f"block_table[{b}, {p}] = {int(pages[p])} is not a page of the cache (0 .. "
                         f"{cache.shape[0] - 1}), and sequence {b} uses that entry")
    return cache[pages].reshape(-1, *cache.shape[2:])[:n]


def attend_sequence(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, is_causal: bool, scale: float,
                    window_size, softcap: float, alibi_slopes: Optional[torch.Tensor], compute_dtype):
    """Attention of one sequence's queries (Lq, Hq, E) over its dense keys (S, Hkv, E) / values (S, Hkv, Ev),
    bottom-right aligned: (out (Lq, Hq, Ev), lse (Hq, Lq)). S = 0 gives 0 and lse -inf."""
    Lq, Hq, _ = q.shape
    if keys.shape[0] == 0:
        cdt = compute_dtype or q.dtype
        lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
        return (q.new_zeros(Lq, Hq, values.shape[-1]),
                torch.full((Hq, Lq), float("-inf"), dtype=lse_dtype, device=q.device))
    slopes = None if alibi_slopes is None else alibi_slopes.reshape(1, Hq)
    out, lse = scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], is_causal=is_causal,
        scale=scale, enable_gqa=True, return_lse=True, window_size=window_size, causal_alignment="bottom_right",
        softcap=softcap, alibi_slopes=slopes, compute_dtype=compute_dtype)
    return out[0].transpose(0, 1), lse[0]


def attention_with_kvcache(query, k_cache, v_cache, cache_seqlens, *, k=None, v=None, block_table=None,
                           is_causal=False, scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           return_lse=False, compute_dtype: Optional[torch.dtype] = None):
    """``llmkernels.attention_with_kvcache`` by gathering and the dense einsum reference, sequence by sequence.

    The same arguments and meaning (kvcache_contract.py), except that it does not write the new tokens into the
    cache: it attends over each sequence's ``cache_seqlens[b]`` cached positions followed by ``k[b]``/``v[b]``,
    which is what the op sees after its in-place append. Reads the lengths on the host. Arithmetic in
    ``compute_dtype`` (None: the input dtype); output in the input dtype, lse (B, Hq, Lq) float32 (float64 when
    computing in float64)."""
    from .kvcache_contract import check_kvcache

    a = check_kvcache(query, k_cache, v_cache, cache_seqlens, k, v, block_table, is_causal, scale, window_size,
                      softcap, alibi_slopes, 0, True, REFERENCE_DTYPES)
    B, Lq, Hq, _ = query.shape
    outs, lses = [], []
    for b, n in enumerate(a.cache_seqlens.tolist()):
        keys = gather_kvcache(k_cache, b, n, block_table)
        values = gather_kvcache(v_cache, b, n, block_table)
        if k is not None:
            keys, values = torch.cat([keys, k[b]]), torch.cat([values, v[b]])
        o, l = attend_sequence(query[b], keys, values, is_causal, a.scale, window_size, softcap,
                               None if a.rule.alibi_slopes is None else a.rule.alibi_slopes[b], compute_dtype)
        outs.append(o)
        lses.append(l)
    out = torch.stack(outs) if B else query.new_zeros(0, Lq, Hq, v_cache.shape[-1])
    lse_dtype = torch.float64 if (compute_dtype or query.dtype) == torch.float64 else torch.float32
    lse = torch.stack(lses).to(lse_dtype) if B else torch.zeros(0, Hq, Lq, dtype=lse_dtype, device=query.device)
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out


def varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, is_causal=False,
                     scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                     enable_gqa=False, return_lse=False, dropout_masks=None,
                     compute_dtype: Optional[torch.dtype] = None):
    """Packed variable-length attention as the dense reference run on each sequence, bottom-right aligned.

    Sequence ``b`` is ``query[cu_seqlens_q[b]:cu_seqlens_q[b + 1]]`` against the same slice of key and value by
    ``cu_seqlens_k``; each runs through ``scaled_dot_product_attention`` above with
    ``causal_alignment="bottom_right"``, the sequence's ALiBi slopes and, when given, ``dropout_masks[b]`` (a bool
    ``(Hq, Lq_b, Lk_b)`` keep pattern). Returns out ``(Tq, Hq, Ev)`` in the input dtype and, with ``return_lse``,
    lse ``(Hq, Tq)`` (float64 when computing in float64, else float32). The cu_seqlens' values are always checked
    (this reads them on the host anyway)."""
    from .varlen_contract import check_cu_seqlens_values, check_varlen_attention

    a = check_varlen_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               is_causal=is_causal, scale=scale, window_size=window_size, softcap=softcap,
                               alibi_slopes=alibi_slopes, dropout_p=dropout_p, enable_gqa=enable_gqa,
                               dtypes=REFERENCE_DTYPES)
    Tq, Hq, _ = query.shape
    check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, Tq, key.shape[0], max_seqlen_q, max_seqlen_k)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(a.num_seqs):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        # (L, H, E) slices as (1, H, L, E) views: the dense reference's layout.
        q_b, k_b, v_b = (t[lo:hi].transpose(0, 1).unsqueeze(0) for t, lo, hi in
                         ((query, q0, q1), (key, k0, k1), (value, k0, k1)))
        if q1 == q0 or k1 == k0:
            # No queries, or no keys (every row sees nothing): output 0 and lse -inf, as the contract says.
            cdt = compute_dtype or query.dtype
            outs.append(query.new_zeros(q1 - q0, Hq, value.shape[2]))
            lses.append(query.new_full((Hq, q1 - q0), float("-inf"), dtype=cdt))
            continue
        slopes = None if a.rule.alibi_slopes is None else a.rule.alibi_slopes[b:b + 1]
        keep = None if dropout_masks is None else dropout_masks[b].unsqueeze(0)
        o, lse = scaled_dot_product_attention(
            q_b, k_b, v_b, None, dropout_p, a.is_causal, a.scale, enable_gqa=True, return_lse=True,
            window_size=(a.rule.window_left, a.rule.window_right), causal_alignment="bottom_right",
            softcap=a.rule.softcap, alibi_slopes=slopes, dropout_mask=keep, compute_dtype=compute_dtype)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    Ev = value.shape[2]
    cdt = compute_dtype or query.dtype
    lse_dtype = torch.float64 if cdt == torch.float64 else torch.float32
    out = torch.cat(outs, 0) if outs else query.new_zeros(0, Hq, Ev)
    lse = torch.cat(lses, 1).to(lse_dtype) if lses else query.new_zeros(Hq, 0, dtype=lse_dtype)
    if not return_lse:
        return out
    return out, lse
