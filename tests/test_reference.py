"""The einsum reference agrees with PyTorch's own math and with the contract; the seed's formula does not."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmkernels import reference

f64 = torch.float64


def _qkv(B, Hq, Hkv, L, S, E, Ev, dtype=f64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("L,S", [(1, 1), (17, 29), (29, 17), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_matches_torch_math_sdpa(L, S, causal, mask_kind):
    q, k, v = _qkv(2, 4, 4, L, S, 16, 24)
    g = torch.Generator().manual_seed(1)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S, generator=g) > 0.3
        mask[:, 0] = True  # no fully masked rows: PyTorch's math path gives NaN for those in fp64 on some versions
    elif mask_kind == "float":
        mask = torch.randn(2, 1, L, S, generator=g, dtype=f64)
    ours = reference.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and mask is None)
    theirs = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal and mask is None)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_gqa_matches_repeated_heads():
    q, k, v = _qkv(1, 6, 2, 9, 11, 8, 8)
    ours = reference.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    rep = reference.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(ours, rep, rtol=0, atol=0)


def test_causal_is_top_left_when_L_differs_from_S():
    q, k, v = _qkv(1, 1, 1, 5, 9, 4, 4)
    ours = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    tril = torch.ones(5, 9, dtype=torch.bool).tril()
    explicit = reference.scaled_dot_product_attention(q, k, v, tril)
    torch.testing.assert_close(ours, explicit, rtol=0, atol=0)
    # row 0 attends to key 0 only
    torch.testing.assert_close(ours[0, 0, 0], v[0, 0, 0], rtol=1e-12, atol=1e-12)


def test_fully_masked_rows_give_zero_output_zero_grad_and_minus_inf_lse():
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 2, 4, 6, 8, 8))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, lse = reference.scaled_dot_product_attention(q, k, v, mask, return_lse=True)
    assert torch.all(out[:, :, 2] == 0) and torch.isneginf(lse[:, :, 2]).all()
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, 2] == 0) and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v = _qkv(1, 2, 2, 7, 5, 8, 8)
    _, lse = reference.scaled_dot_product_attention(q, k, v, scale=0.3, return_lse=True)
    expected = torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, dim=-1)
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)


def test_explicit_dropout_mask_is_applied_and_rescaled():
    q, k, v = _qkv(1, 1, 1, 6, 7, 4, 4)
    keep = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(3)) > 0.25
    ours = reference.scaled_dot_product_attention(q, k, v, dropout_p=0.25, dropout_mask=keep)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1) * keep / 0.75
    torch.testing.assert_close(ours, p @ v, rtol=1e-12, atol=1e-12)


def test_seed_value_einsum_is_wrong():
    """The seed document's ``einsum("nhqk,nvhd->nqhd")`` returns the sum of V for every query (it ignores the
    weights); the reference's ``nhqk,nkhd->nqhd`` does not. This test keeps anyone from "fixing" it back."""
    N, L, H, D = 2, 5, 3, 4
    g = torch.Generator().manual_seed(0)
    attention = torch.softmax(torch.randn(N, H, L, L, generator=g, dtype=f64), dim=-1)
    V = torch.randn(N, L, H, D, generator=g, dtype=f64)
    seed = torch.einsum(reference.SEED_VALUE_EINSUM, attention, V)
    fixed = torch.einsum(reference.VALUE_EINSUM, attention, V)
    torch.testing.assert_close(fixed, (attention @ V.transpose(1, 2)).transpose(1, 2))
    # the literal formula: every query gets sum over positions of V (the weights sum to 1 over k)
    torch.testing.assert_close(seed, V.sum(dim=1, keepdim=True).expand(N, L, H, D))
    assert (seed - fixed).abs().max() > 0.1


def test_masked_softmax_reference_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 7, generator=g, dtype=f64)
    m = torch.randn(1, 3, 1, 7, generator=g, dtype=f64)
    ours = reference.masked_softmax(x, m, scale=0.7)
    torch.testing.assert_close(ours, torch.softmax(x * 0.7 + m, -1), rtol=1e-12, atol=1e-12)
    causal = reference.masked_softmax(x, is_causal=True)
    tri = torch.ones(5, 7, dtype=torch.bool).tril()
    torch.testing.assert_close(causal, torch.softmax(x.masked_fill(~tri, -math.inf), -1), rtol=1e-12, atol=1e-12)
    along1 = reference.masked_softmax(x, dim=1)
    torch.testing.assert_close(along1, torch.softmax(x, 1), rtol=1e-12, atol=1e-12)


def test_masked_softmax_reference_fully_masked_row_is_zero_with_zero_grad():
    x = torch.randn(3, 6, dtype=f64, requires_grad=True)
    m = torch.ones(3, 6, dtype=torch.bool)
    m[1] = False
    y = reference.masked_softmax(x, m)
    assert torch.all(y[1] == 0) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.all(x.grad[1] == 0) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("qs,ks,vs,gqa", [((4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), False),
                                          ((2, 1, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), False),
                                          ((2, 2, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8), False),
                                          ((2, 4, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8), True),
                                          ((1, 6, 5, 8), (1, 2, 7, 8), (1, 3, 7, 8), True)],
                         ids=["query_fewer_dims", "query_one_head", "key_one_head", "gqa_key_one_head",
                              "gqa_heads_differ"])
def test_reference_broadcasts_as_torch(qs, ks, vs, gqa):
    """The tests call the reference with the user's shapes, so it broadcasts as PyTorch does (float64: exact)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, dtype=f64) for s in (qs, ks, vs))
    mask = torch.randn(qs[-2], ks[-2], generator=g, dtype=f64)
    ours = reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)
    theirs = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# A float mask at finfo(dtype).min, as transformers builds it: ``(1 - mask) * torch.finfo(dtype).min``. The mask
# is added, so a row whose every key carries that value is uniform (the mean of V), not "fully masked".


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_reference_backend_adds_a_finfo_min_mask(dtype):
    import llmkernels
    from attention_check import check_attention, leaf

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=g).to(dtype) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8, dtype=dtype)
    mask[..., 3, :] = torch.finfo(dtype).min
    mask[..., 5, 2:] = torch.finfo(dtype).min  # a row with some visible keys too

    # Forward and backward (q, k, v and the mask's gradient) against the float64 reference, tolerance rule.
    out, lse, _ = check_attention("reference", None, q, k, v, mask)
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    if dtype != torch.float16:
        # At -3.4e38 the scores vanish in the sum: every key of row 3 gets the same weight (fp16's min, -65504,
        # only shifts the row's scores, which the softmax ignores; the tolerance rule above covers it).
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out[:, :, 3].float(), v.float().mean(dim=2), rtol=tol, atol=tol)

    # Side by side with PyTorch (float32, where both compute in the same precision), values and gradients.
    q32, k32, v32, m32 = (t.float() for t in (q, k, v, mask))
    m32 = m32.masked_fill(m32 != 0, torch.finfo(torch.float32).min)
    ours_in, theirs_in = [leaf(t) for t in (q32, k32, v32, m32)], [leaf(t) for t in (q32, k32, v32, m32)]
    ours = llmkernels.scaled_dot_product_attention(*ours_in, backend="reference")
    theirs = F.scaled_dot_product_attention(*theirs_in)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn(ours.shape, generator=g)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), torch.autograd.grad(ours, ours_in, grad),
                          torch.autograd.grad(theirs, theirs_in, grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        assert torch.isfinite(a).all(), name


def test_reference_masked_softmax_adds_a_finfo_min_mask():
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.zeros(8, 8)
    mask[3] = torch.finfo(torch.float32).min
    y = reference.masked_softmax(x, mask)
    torch.testing.assert_close(y, torch.softmax(x + mask, -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(y[:, 3], torch.full((2, 8), 1 / 8), rtol=1e-6, atol=1e-7)


def test_reference_lse_gradient_at_finfo_min_is_the_softmax():
    """d lse / d scores is the softmax weights, also where the mask's magnitude swallows log(sum) in lse's
    rounding (torch.logsumexp's backward gives weight 1 per key there: an lse gradient L times too large)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g, dtype=f64) for _ in range(3))
    q.requires_grad_(True)
    mask = torch.zeros(4, 6, dtype=f64)
    mask[1] = torch.finfo(torch.float32).min
    k6, v6 = (torch.randn(1, 1, 6, 8, generator=g, dtype=f64) for _ in range(2))
    _, lse = reference.scaled_dot_product_attention(q, k6, v6, mask, return_lse=True)
    (dq,) = torch.autograd.grad(lse[0, 0, 1], q)
    # Every key of row 1 has the same weight 1/6: d lse / d q_1 = scale * mean of the keys.
    torch.testing.assert_close(dq[0, 0, 1], k6[0, 0].mean(0) / math.sqrt(8), rtol=1e-12, atol=1e-12)


def test_reference_dropout_one_is_zeros_as_torch():
    q, k, v = _qkv(1, 2, 2, 4, 6, 8, 8)
    q[0, 1, 2, 0] = math.nan
    ours, lse = reference.scaled_dot_product_attention(q, k, v, dropout_p=1.0, return_lse=True)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)) and torch.isnan(ours).any()
    assert torch.equal(ours.nan_to_num(0.0), theirs.nan_to_num(0.0)) and torch.equal(ours[0, 0], torch.zeros(4, 8))
    # lse is that of the scores: dropout acts after the softmax.
    _, lse0 = reference.scaled_dot_product_attention(q, k, v, return_lse=True)
    torch.testing.assert_close(lse, lse0, rtol=0, atol=0, equal_nan=True)
