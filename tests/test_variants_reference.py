"""Attention variants (issue 14) on the reference side: the einsum reference against an independent construction,
the "reference" backend against the float64 reference (tolerance rule), CausalBias against PyTorch, the canonical
folding of contract.py, and the sinks' gradient of ops.py.

The independent construction (``loop_attention``) walks every (batch, head, query, key) in plain Python floats from
the user's arguments as given (is_causal and the window apart, the alignment's offset d, the sink as one more term
of the denominator), so it shares nothing with the reference's tensor form or with contract.py's folding.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import llmkernels
from llmkernels import contract, dispatch, ops, reference, torch_backend
from attention_check import check_attention, leaf

B, HQ, HKV, E, EV = 2, 4, 2, 5, 3


def loop_attention(q, k, v, *, scale, mask=None, is_causal=False, window_size=(-1, -1), bottom_right=False,
                   softcap=0.0, slopes=None, sinks=None, keep=None, dropout_p=0.0):
    """(out, lse) in float64 by explicit loops: q (B, Hq, L, E), k/v (B, Hkv, S, *), mask (B, Hq, L, S) bool or
    float, slopes (B, Hq), sinks (Hq,), keep (B, Hq, L, S) bool (dropout's kept weights)."""
    Bn, Hq, L, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = Hq // Hkv
    left, right = window_size
    d = S - L if bottom_right else 0
    Q, K, V = q.tolist(), k.tolist(), v.tolist()
    M = mask.tolist() if mask is not None else None
    out = torch.zeros(Bn, Hq, L, v.shape[-1], dtype=torch.float64)
    lse = torch.empty(Bn, Hq, L, dtype=torch.float64)
    for b in range(Bn):
        for h in range(Hq):
            kh = h // group
            for i in range(L):
                terms = []  # (logit, j) of the visible keys
                for j in range(S):
                    if is_causal and j > i + d:
                        continue
                    if left >= 0 and j < i + d - left:
                        continue
                    if right >= 0 and j > i + d + right:
                        continue
                    if M is not None and M[b][h][i][j] is False:
                        continue
                    s = scale * sum(x * y for x, y in zip(Q[b][h][i], K[b][kh][j]))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slopes is not None:
                        s -= float(slopes[b, h]) * abs(i + d - j)
                    if M is not None and not isinstance(M[b][h][i][j], bool):
                        s += M[b][h][i][j]
                    if s == -math.inf:
                        continue
                    terms.append((s, j))
                logits = [s for s, _ in terms] + ([float(sinks[h])] if sinks is not None else [])
                if not logits:
                    lse[b, h, i] = -math.inf
                    continue
                m = max(logits)
                denom = sum(math.exp(x - m) for x in logits)
                lse[b, h, i] = m + math.log(denom)
                for s, j in terms:
                    w = math.exp(s - lse[b, h, i].item())
                    if dropout_p > 0:
                        w = w * keep[b, h, i, j].item() / (1 - dropout_p)
                    out[b, h, i] += w * torch.tensor(V[b][kh][j], dtype=torch.float64)
    return out, lse


def _inputs(L, S, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, L, E, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, HKV, S, E, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, HKV, S, EV, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, g


def _variant(cfg, L, S, g, dtype):
    """The keyword arguments of a config, with its tensors drawn from g."""
    kw = {key: val for key, val in cfg.items() if key in ("window_size", "causal_alignment", "softcap", "is_causal",
                                                           "dropout_p")}
    if cfg.get("alibi") == "per_head":
        kw["alibi_slopes"] = torch.rand(HQ, generator=g, dtype=torch.float64).to(dtype)
    elif cfg.get("alibi") == "batch":
        kw["alibi_slopes"] = torch.rand(B, 1, generator=g, dtype=torch.float64).to(dtype) * torch.tensor(
            [0.5, 0.25, 0.125, 1.0], dtype=dtype)
    if cfg.get("sinks"):
        kw["sinks"] = torch.randn(HQ, generator=g, dtype=torch.float64).to(dtype)
    if cfg.get("mask") == "bool":
        kw["attn_mask"] = torch.rand(B, 1, L, S, generator=g) > 0.3
    elif cfg.get("mask") == "float":
        kw["attn_mask"] = torch.randn(1, HQ, L, S, generator=g, dtype=torch.float64).to(dtype)
    return kw


CONFIGS = {
    "window_two_sided": dict(window_size=(2, 1)),
    "window_mistral": dict(window_size=(3, 0)),
    "window_right_only_bottom_right": dict(window_size=(-1, 2), causal_alignment="bottom_right"),
    "window_misses_keys": dict(window_size=(0, 0), causal_alignment="bottom_right"),
    "causal_bottom_right": dict(is_causal=True, causal_alignment="bottom_right"),
    "causal_window_bottom_right": dict(is_causal=True, window_size=(2, -1), causal_alignment="bottom_right"),
    "softcap": dict(softcap=0.5),
    "softcap_float_mask_causal": dict(softcap=0.5, mask="float", is_causal=True),
    "alibi_per_head": dict(alibi="per_head"),
    "alibi_batch_bottom_right": dict(alibi="batch", causal_alignment="bottom_right"),
    "sinks": dict(sinks=True),
    "sinks_causal_bottom_right": dict(sinks=True, is_causal=True, causal_alignment="bottom_right"),
    "everything_dropout": dict(window_size=(2, 1), softcap=1.0, alibi="batch", sinks=True, mask="bool",
                               causal_alignment="bottom_right", dropout_p=0.3),
}


@pytest.mark.parametrize("L,S", [(6, 9), (9, 6)], ids=["L<S", "L>S"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_explicit_loops(name, L, S):
    q, k, v, g = _inputs(L, S, seed=len(name) + L)
    kw = _variant(CONFIGS[name], L, S, g, torch.float64)
    keep = None
    if kw.get("dropout_p", 0.0) > 0:
        keep = torch.rand(B, HQ, L, S, generator=g) >= kw["dropout_p"]
    out, lse = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, return_lse=True, dropout_mask=keep,
                                                      **kw)
    mask = kw.get("attn_mask")
    slopes = kw.get("alibi_slopes")
    exp_out, exp_lse = loop_attention(
        q, k, v, scale=1 / math.sqrt(E), mask=None if mask is None else mask.expand(B, HQ, L, S),
        is_causal=kw.get("is_causal", False), window_size=kw.get("window_size", (-1, -1)),
        bottom_right=kw.get("causal_alignment") == "bottom_right", softcap=kw.get("softcap", 0.0),
        slopes=None if slopes is None else slopes.expand(B, HQ), sinks=kw.get("sinks"), keep=keep,
        dropout_p=kw.get("dropout_p", 0.0))
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lse, exp_lse, rtol=1e-10, atol=1e-12)
    if name in ("window_misses_keys", "causal_bottom_right") and L > S:
        assert torch.isneginf(lse[..., : L - S]).all() and (out[:, :, : L - S] == 0).all()
    if name == "sinks_causal_bottom_right" and L > S:
        # rows that see no key: the denominator is the sink alone
        assert (out[:, :, : L - S] == 0).all()
        torch.testing.assert_close(lse[..., : L - S], kw["sinks"].view(1, HQ, 1).expand(B, HQ, L - S))


def test_softcap_applies_before_the_mask_and_keeps_hidden_keys_hidden():
    # A small cap makes a leak visible: capping after masking would turn -inf into -softcap.
    q, k, v, g = _inputs(5, 5, seed=3)
    capped = reference.scaled_dot_product_attention(q * 10, k, v, enable_gqa=True, is_causal=True, softcap=1.0)
    energy = 1.0 * torch.tanh(torch.einsum("bhld,bhsd->bhls", q * 10, k.repeat_interleave(2, 1)) / math.sqrt(E))
    energy = energy.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    expected = torch.softmax(energy, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(capped, expected)


# ------------------------------------------------------------------------------------------------------------
# the reference backend against the float64 reference, forward and backward


BACKEND_CASES = {
    "window": (dict(window_size=(2, 1)), 7, 11),
    "mistral_window_causal": (dict(window_size=(3, 0), is_causal=True), 9, 9),
    "causal_bottom_right_L>S": (dict(is_causal=True, causal_alignment="bottom_right"), 11, 7),
    "softcap_float_mask": (dict(softcap=0.7, mask="float"), 7, 11),
    "alibi_bottom_right": (dict(alibi="batch", causal_alignment="bottom_right", window_size=(4, 3)), 11, 7),
    "sinks_window_L>S": (dict(sinks=True, window_size=(1, 1), causal_alignment="bottom_right"), 11, 5),
    "sinks_dropout": (dict(sinks=True, dropout_p=0.25, mask="bool"), 7, 11),
    "everything": (dict(sinks=True, softcap=1.5, alibi="per_head", window_size=(3, -1), is_causal=True,
                        causal_alignment="bottom_right", mask="float", dropout_p=0.2), 7, 11),
}


# Every case in fp32; a few in fp16 (the backend computes in fp32 either way; this checks the casts and dtypes).
_BACKEND_RUNS = [(n, torch.float32) for n in BACKEND_CASES] + [
    (n, torch.float16) for n in ("everything", "sinks_window_L>S", "softcap_float_mask")]


@pytest.mark.parametrize("name,dtype", _BACKEND_RUNS, ids=[f"{n}-{str(d)[6:]}" for n, d in _BACKEND_RUNS])
def test_reference_backend_matches_float64_reference(name, dtype):
    cfg, L, S = BACKEND_CASES[name]
    q, k, v, g = _inputs(L, S, seed=L * S, dtype=dtype)
    kw = _variant(cfg, L, S, g, dtype)
    if "alibi_slopes" in kw:
        kw["alibi_slopes"] = kw["alibi_slopes"].float()
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    # the shared check (tests/attention_check.py): out, lse and every gradient by the tolerance rule
    out, lse, _ = check_attention("reference", torch_backend.dropout_keep_mask, q, k, v, mask, enable_gqa=True,
                                  seed=L, **kw)
    if name == "sinks_window_L>S":
        # bottom-right, L - S = 6: query i sees keys i - 7 .. i - 5, so rows 0..4 see none: out 0, lse = sink
        assert (out[:, :, :5] == 0).all()
        assert torch.equal(lse[..., :5], kw["sinks"].float().view(1, HQ, 1).expand(B, HQ, 5))


def test_auto_runs_variants_on_a_backend_that_has_them():
    q, k, v, _ = _inputs(5, 7, seed=1, dtype=torch.float32)
    a = contract.check_attention(q, k, v, enable_gqa=True, softcap=2.0)
    assert dispatch.choose_attention_backend(a, "auto") in ("triton", "reference")
    reasons = dispatch.attention_not_supported_reasons(a)
    # Both kernel backends apply the rule (tests/test_variants_triton.py, tests/test_variants_cuda.py): none of
    # their reasons is about a variant.
    for name in ("triton", "cuda"):
        assert not any("softcap" in r or "window" in r for r in reasons[name]), reasons[name]


# ------------------------------------------------------------------------------------------------------------
# CausalBias masks


@pytest.mark.parametrize("make", [causal_upper_left, causal_lower_right], ids=["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(5, 8), (6, 6), (8, 5)])
def test_causal_bias_equals_pytorch(make, L, S):
    q, k, v, _ = _inputs(L, S, seed=L + 2 * S, dtype=torch.float32)
    ins = [leaf(t) for t in (q, k, v)]
    ref_ins = [leaf(t) for t in (q, k, v)]
    # (PyTorch warns that lower-right with L > S gives NaN; its math path gives 0 there, as ours.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        bias = make(L, S)
    ours = llmkernels.scaled_dot_product_attention(*ins, attn_mask=bias, enable_gqa=True, backend="reference")
    theirs = F.scaled_dot_product_attention(*ref_ins, attn_mask=bias, enable_gqa=True)
    assert type(ours) is torch.Tensor
    grad = torch.randn(ours.shape)
    torch.testing.assert_close(ours, theirs.nan_to_num(0.0), rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, ins, grad), torch.autograd.grad(theirs, ref_ins, grad)):
        torch.testing.assert_close(a, b.nan_to_num(0.0), rtol=1e-5, atol=1e-6)


def test_causal_bias_is_canonical_causal_with_its_alignment():
    q, k, v, _ = _inputs(4, 7, seed=0, dtype=torch.float32)
    a = contract.check_attention(q, k, v, causal_lower_right(4, 7), enable_gqa=True, window_size=(2, 0))
    assert a.mask is None and a.is_causal and a.rule.bottom_right and a.rule.window_left == 2
    a = contract.check_attention(q, k, v, causal_upper_left(4, 7), enable_gqa=True, causal_alignment="top_left")
    assert a.mask is None and a.is_causal and not a.rule.active
    # The same numbers as the explicit arguments (the mask's storage is never read)
    explicit = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, causal_alignment="bottom_right",
                                                       window_size=(2, -1), enable_gqa=True)
    biased = llmkernels.scaled_dot_product_attention(q, k, v, causal_lower_right(4, 7), window_size=(2, -1),
                                                     enable_gqa=True)
    assert torch.equal(explicit, biased)


# ------------------------------------------------------------------------------------------------------------
# the canonical form


def _rule(L=5, S=8, **kw):
    q, k, v, _ = _inputs(L, S, seed=0, dtype=torch.float32)
    return contract.check_attention(q, k, v, enable_gqa=True, **kw)


def test_causal_folding():
    a = _rule(window_size=(-1, 0))
    assert a.is_causal and not a.rule.active  # a window ending on the diagonal is plain causal
    a = _rule(window_size=(3, 0))
    assert a.is_causal and (a.rule.window_left, a.rule.window_right) == (3, -1)
    a = _rule(window_size=(3, -1), is_causal=True)
    assert a.is_causal and (a.rule.window_left, a.rule.window_right) == (3, -1)
    a = _rule(window_size=(3, 0), is_causal=True)
    assert a.is_causal and (a.rule.window_left, a.rule.window_right) == (3, -1)
    a = _rule(window_size=(1, 2))
    assert not a.is_causal and (a.rule.window_left, a.rule.window_right) == (1, 2)


def test_sides_past_every_key_and_unused_alignment_are_canonical():
    # L=5, S=8, top-left: every query sees key 0 when left >= 4, and key 7 when right >= 7
    a = _rule(window_size=(4, 7))
    assert (a.rule.window_left, a.rule.window_right) == (-1, -1) and not a.rule.active
    a = _rule(window_size=(3, 6))
    assert (a.rule.window_left, a.rule.window_right) == (3, 6)
    a = _rule(window_size=(2 ** 70, -1))  # a huge side never reaches the kernels as an int64 overflow
    assert a.rule.window_left == -1
    # bottom-right d = 3: left needed up to L - 1 + d = 7, right up to S - 1 - d = 4
    a = _rule(window_size=(7, 4), causal_alignment="bottom_right")
    assert not a.rule.active
    a = _rule(window_size=(6, 3), causal_alignment="bottom_right")
    assert (a.rule.window_left, a.rule.window_right, a.rule.bottom_right) == (6, 3, True)
    # the alignment matters only to causal, windows and ALiBi, and only when L != S
    assert not _rule(causal_alignment="bottom_right").rule.active
    assert not _rule(L=8, S=8, is_causal=True, causal_alignment="bottom_right").rule.active
    assert _rule(is_causal=True, causal_alignment="bottom_right").rule.bottom_right


def test_alibi_slopes_canonical_view():
    slopes = torch.rand(HQ)
    a = _rule(alibi_slopes=slopes)
    assert a.rule.alibi_slopes.shape == (B, HQ) and a.rule.alibi_slopes.stride() == (0, 1)
    assert a.rule.alibi_slopes.data_ptr() == slopes.data_ptr()
    a = _rule(alibi_slopes=torch.rand(B, 1))
    assert a.rule.alibi_slopes.shape == (B, HQ) and a.rule.alibi_slopes.stride() == (1, 0)
    assert a.rule.active and _rule(sinks=torch.zeros(HQ)).rule.active and _rule(softcap=3).rule.softcap == 3.0


# ------------------------------------------------------------------------------------------------------------
# the sinks' gradient


def test_sinks_gradient_formula_matches_autograd_of_the_float64_reference():
    # ops._sinks_grad directly, from a float64 forward, against autograd through the reference's sink column.
    q, k, v, g = _inputs(6, 9, seed=5)
    sinks = torch.randn(HQ, generator=g, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(B, HQ, 6, 9, generator=g) >= 0.3
    out, lse = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True, return_lse=True, sinks=sinks,
                                                      window_size=(1, 1), causal_alignment="bottom_right",
                                                      dropout_p=0.3, dropout_mask=keep)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad([out, lse], [sinks], [grad_out, grad_lse], retain_graph=True)
    got = ops._sinks_grad(sinks.detach(), out.detach(), lse.detach(), grad_out, grad_lse)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    got_out_only = ops._sinks_grad(sinks.detach(), out.detach(), lse.detach(), grad_out, None)
    (expected_out_only,) = torch.autograd.grad(out, [sinks], grad_out)
    torch.testing.assert_close(got_out_only, expected_out_only, rtol=1e-10, atol=1e-12)


def test_no_keys_with_sinks_gives_lse_sink_and_its_gradient():
    q = torch.randn(B, HQ, 3, E)
    k = torch.randn(B, HQ, 0, E)
    v = torch.randn(B, HQ, 0, EV)
    sinks = torch.randn(HQ, requires_grad=True)
    out, lse = llmkernels.scaled_dot_product_attention(q, k, v, sinks=sinks, return_lse=True)
    assert (out == 0).all()
    torch.testing.assert_close(lse, sinks.detach().view(1, HQ, 1).expand(B, HQ, 3))
    grad_lse = torch.randn(lse.shape)
    (dsinks,) = torch.autograd.grad(lse, sinks, grad_lse)
    torch.testing.assert_close(dsinks, grad_lse.sum((0, 2)))
    sinks2 = torch.randn(HQ, requires_grad=True)
    out = llmkernels.scaled_dot_product_attention(q, k, v, sinks=sinks2)
    (dsinks,) = torch.autograd.grad(out.sum(), sinks2)
    assert torch.equal(dsinks, torch.zeros(HQ))  # a zero gradient of its own shape, not None
