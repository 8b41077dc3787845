"""Correctness of the Triton FlashAttention kernels (forward and backward), through the public API.

Every case compares the output, the lse and every input gradient (q, k, v, a float mask, and a gradient that
flows in through lse) with the float64 einsum reference, under the tolerance rule of tests/tolerance.py (at most
twice the error of the same reference computed naively in the input dtype). Outputs are NaN-poisoned by the
autouse fixture, so an element the kernels forget to write fails. On a machine without a GPU the kernels run in
Triton's interpreter (16 x 16 tiles), so shapes are small but odd; on a GPU the same tests run the autotuned
kernels.
"""

import math

import pytest
import torch

import llmkernels
from llmkernels import reference
from llmkernels.triton_kernels import attention as triton_attention
from attention_check import check_attention, leaf, triton_keep_mask
from tolerance import assert_by_rule

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _make_mask(kind, shape, device, generator):
    """A mask of the given broadcastable shape: bool (True = keep, about 80% kept) or float (N(0, 1) plus some
    -inf entries), or None."""
    if kind is None:
        return None
    keep = torch.rand(shape, generator=generator, device="cpu") < 0.8
    if kind == "bool":
        return keep.to(device)
    values = torch.randn(shape, generator=generator, device="cpu")
    return values.masked_fill(~keep, float("-inf")).to(device)


def check_against_reference(q, k, v, mask=None, **kwargs):
    """tests/attention_check.check_attention on the triton backend: output, lse and every gradient against the
    float64 reference under the tolerance rule; returns (out, lse, grads)."""
    return check_attention("triton", triton_keep_mask, q, k, v, mask, **kwargs)


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, S, E, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(device=device, dtype=dtype)
    return q, k, v


# (B, Hq, L, S, E, Ev, dtype, mask kind, mask shape, causal, scale)
CASES = [
    (1, 2, 1, 1, 16, 16, "fp32", None, None, False, None),
    (1, 1, 1, 1, 1, 1, "fp16", None, None, True, None),
    (1, 2, 17, 17, 32, 32, "fp16", None, None, True, None),
    (2, 2, 128, 129, 64, 64, "bf16", None, None, False, None),
    (1, 3, 129, 128, 72, 72, "fp16", "float", "LS", False, None),
    (1, 1, 300, 300, 64, 64, "bf16", "float", "LS", True, None),
    (1, 2, 1, 300, 112, 112, "fp16", "bool", "1H1S", False, None),
    (1, 2, 17, 1, 32, 16, "bf16", "float", "LS", False, None),
    (2, 2, 31, 64, 96, 96, "fp16", "bool", "1H1S", True, 0.5),
    (1, 2, 45, 77, 192, 160, "fp32", None, None, True, None),
    (1, 2, 300, 17, 80, 80, "fp32", "bool", "B1LS", True, None),
    (1, 2, 17, 300, 96, 96, "bf16", "float", "1H1S", True, None),
    (2, 1, 33, 47, 40, 24, "bf16", "float", "B1LS", True, 0.3),
    (1, 1, 20, 33, 160, 192, "fp16", "bool", "LS", False, 1.7),
    (1, 1, 17, 18, 256, 256, "fp32", "float", "LS", True, None),
    (1, 2, 65, 31, 8, 48, "fp32", None, None, True, 0.05),
]


def _mask_shape(code, B, H, L, S):
    return {"LS": (L, S), "B1LS": (B, 1, L, S), "1H1S": (1, H, 1, S)}[code]


@pytest.mark.parametrize("B,H,L,S,E,Ev,dt,mask_kind,mask_shape,causal,scale", CASES,
                         ids=[f"B{c[0]}H{c[1]}L{c[2]}S{c[3]}E{c[4]}Ev{c[5]}-{c[6]}-{c[7]}{c[8] or ''}"
                              f"{'-causal' if c[9] else ''}{'-scale' if c[10] else ''}" for c in CASES])
def test_matches_reference(device, B, H, L, S, E, Ev, dt, mask_kind, mask_shape, causal, scale):
    dtype = DTYPES[dt]
    q, k, v = _inputs(B, H, H, L, S, E, Ev, dtype, device)
    gen = torch.Generator().manual_seed(7)
    mask = _make_mask(mask_kind, _mask_shape(mask_shape, B, H, L, S), device, gen) if mask_kind else None
    check_against_reference(q, k, v, mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("Hq,Hkv,dt,mask_kind,causal", [
    (4, 2, "fp16", None, True),
    (6, 1, "fp32", "float", False),
    (8, 2, "bf16", "bool", True),
])
def test_grouped_query_attention(device, Hq, Hkv, dt, mask_kind, causal):
    dtype = DTYPES[dt]
    B, L, S, E = 2, 37, 29, 24
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, E, dtype, device, seed=3)
    mask = _make_mask(mask_kind, (B, Hq, L, S), device, torch.Generator().manual_seed(5))
    check_against_reference(q, k, v, mask, is_causal=causal, enable_gqa=True)


def test_fully_masked_rows(device):
    """Rows with every key masked give output 0, lse -inf and zero gradients (no NaN), for a bool mask, a float
    mask of -inf, and a causal mask combined with a mask that hides the diagonal."""
    B, H, L, S, E = 1, 2, 23, 19, 16
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float16, device, seed=11)
    keep = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(2)) < 0.7
    dead_rows = [0, 5, 22]
    keep[:, :, dead_rows] = False
    out, lse, grads = check_against_reference(q, k, v, keep.to(device))
    assert (out[:, :, dead_rows] == 0).all() and torch.isneginf(lse[:, :, dead_rows]).all()
    assert (grads[0][:, :, dead_rows] == 0).all()
    assert all(torch.isfinite(g).all() for g in grads)

    additive = torch.zeros(L, S).masked_fill(~keep[0, 0], float("-inf")).to(device)
    out, lse, grads = check_against_reference(q.float(), k.float(), v.float(), additive)
    assert (out[:, :, dead_rows] == 0).all() and torch.isneginf(lse[:, :, dead_rows]).all()
    assert all(torch.isfinite(g).all() for g in grads)

    # Causal row 0 sees only key 0; hide key 0 and it sees nothing.
    hide_first_key = torch.ones(L, S, dtype=torch.bool)
    hide_first_key[:, 0] = False
    out, lse, grads = check_against_reference(q, k, v, hide_first_key.to(device), is_causal=True)
    assert (out[:, :, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all()
    assert torch.isfinite(lse[:, :, 1:]).all()


@pytest.mark.parametrize("dt,Hq,Hkv,mask_kind,causal", [
    ("fp32", 2, 2, None, False),
    ("bf16", 4, 2, "float", True),
    ("fp16", 3, 1, "bool", False),
])
def test_dropout_exact(device, dt, Hq, Hkv, mask_kind, causal):
    """With the keep pattern the kernels draw (regenerated by dropout_keep_mask from the op's rng_state), the
    output, lse and every gradient match the reference given that pattern."""
    dtype = DTYPES[dt]
    B, L, S, E, p = 2, 33, 41, 32, 0.3
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, E, dtype, device, seed=21)
    mask = _make_mask(mask_kind, (L, S), device, torch.Generator().manual_seed(8))
    check_against_reference(q, k, v, mask, is_causal=causal, enable_gqa=Hq != Hkv, dropout_p=p)


def test_dropout_keep_rate_and_streams(device):
    """The keep rate is 1 - p within 5 standard deviations; different (batch, head) slices and different seeds
    draw different patterns; the same state draws the same pattern."""
    B, H, L, S, p = 2, 2, 67, 129, 0.2
    state = torch.tensor([12345, 678], dtype=torch.int64, device=device)
    keep = triton_attention.dropout_keep_mask(state, B, H, L, S, p, device)
    n = keep.numel()
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate} for p={p} over {n} draws"
    assert keep.shape == (B, H, L, S) and keep.dtype == torch.bool
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, triton_attention.dropout_keep_mask(state, B, H, L, S, p, device))
    other = torch.tensor([12346, 678], dtype=torch.int64, device=device)
    assert not torch.equal(keep, triton_attention.dropout_keep_mask(other, B, H, L, S, p, device))
    # The offset shifts the stream: offset + S reads row i + 1's draws in row i.
    shifted = torch.tensor([12345, 678 + S], dtype=torch.int64, device=device)
    assert torch.equal(triton_attention.dropout_keep_mask(shifted, B, H, L, S, p, device)[0, 0, :-1],
                       keep[0, 0, 1:])


def test_transposed_layout_runs_without_copy(device, monkeypatch):
    """The (B, L, H, E) layout passed as .transpose(1, 2) views reaches the kernels as those very views (same
    storage, same strides), and a strided grad_out reaches the backward as is; results still match."""
    B, L, S, H, E, Ev = 2, 19, 26, 3, 24, 40
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, L, H, E, generator=gen).to(device=device, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(B, S, H, E, generator=gen).to(device=device, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(B, S, H, Ev, generator=gen).to(device=device, dtype=torch.float16).transpose(1, 2)
    grad_out = torch.randn(B, L, H, Ev, generator=gen).to(device).transpose(1, 2)
    seen = {}
    forward, backward = triton_attention.attention_forward, triton_attention.attention_backward

    def spy_forward(q_, k_, v_, *rest):
        seen["forward"] = [(t.data_ptr(), t.stride()) for t in (q_, k_, v_)]
        return forward(q_, k_, v_, *rest)

    def spy_backward(grad_out_, q_, k_, v_, *rest):
        seen["backward"] = [(t.data_ptr(), t.stride()) for t in (q_, k_, v_)]
        seen["grad_out_strides"] = grad_out_.stride()
        return backward(grad_out_, q_, k_, v_, *rest)

    monkeypatch.setattr(triton_attention, "attention_forward", spy_forward)
    monkeypatch.setattr(triton_attention, "attention_backward", spy_backward)
    check_against_reference(q, k, v, is_causal=True, grad_out=grad_out)
    leaves = check_attention.last_inputs[:3]
    expected = [(t.data_ptr(), t.stride()) for t in leaves]
    assert [t.stride() for t in leaves] == [t.stride() for t in (q, k, v)] and not q.is_contiguous()
    assert seen["forward"] == expected and seen["backward"] == expected
    assert seen["grad_out_strides"] != (H * L * Ev, L * Ev, Ev, 1), "grad_out was made contiguous"


def test_strided_and_broadcast_inputs(device):
    """Last-dim stride 2, a batch-broadcast K/V (stride 0) and a sliced mask: read through their strides."""
    gen = torch.Generator().manual_seed(9)
    B, H, L, S, E = 2, 2, 21, 30, 16
    q = torch.randn(B, H, L, 2 * E, generator=gen).to(device)[..., ::2]
    k = torch.randn(1, H, S, E, generator=gen).to(device)
    v = torch.randn(1, H, S + 5, E, generator=gen).to(device)[:, :, 5:]
    mask = torch.randn(L, 2 * S, generator=gen).to(device)[:, 1::2]
    assert q.stride(-1) == 2 and mask.stride(-1) == 2
    check_against_reference(q, k, v, mask, is_causal=False)


def test_nan_propagates(device):
    """A NaN in q poisons its own output row only; a NaN in k poisons every row that can see that key."""
    B, H, L, S, E = 1, 1, 20, 20, 16
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float32, device, seed=13)
    q[0, 0, 3, 5] = float("nan")
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend="triton")
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, torch.arange(L) != 3]).all()
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float32, device, seed=13)
    k[0, 0, 7, 0] = float("nan")
    out, lse = llmkernels.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton", return_lse=True)
    assert torch.isfinite(out[0, 0, :7]).all() and torch.isnan(out[0, 0, 7:]).all()
    assert torch.isnan(lse[0, 0, 7:]).all()


def test_backward_is_deterministic(device):
    """Separate dK/dV and dQ passes, no atomics: two backward runs agree bit for bit (GQA, mask, causal)."""
    B, Hq, Hkv, L, S, E = 1, 4, 2, 45, 38, 32
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, E, torch.float16, device, seed=17)
    mask = _make_mask("float", (L, S), device, torch.Generator().manual_seed(1))
    grad_out = torch.randn(B, Hq, L, E, generator=torch.Generator().manual_seed(2)).to(device, torch.float16)
    results = []
    for _ in range(2):
        leaves = [leaf(q), leaf(k), leaf(v), leaf(mask)]
        out = llmkernels.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True, backend="triton")
        results.append(torch.autograd.grad(out, leaves, grad_out))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lse_only_gradient(device):
    """A loss through lse alone: the output's gradient is zero and delta is -grad_lse."""
    B, H, L, S, E = 1, 2, 18, 25, 16
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float32, device, seed=19)
    leaves = [leaf(t) for t in (q, k, v)]
    _, lse = llmkernels.scaled_dot_product_attention(*leaves, backend="triton", return_lse=True)
    grads = torch.autograd.grad(lse.sum(), leaves)
    ref = [leaf(t.double()) for t in (q, k, v)]
    _, ref_lse = reference.scaled_dot_product_attention(*ref, return_lse=True, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref_lse.sum(), ref[:2])  # lse does not depend on v
    naive = [leaf(t) for t in (q, k, v)]
    _, naive_lse = reference.scaled_dot_product_attention(*naive, return_lse=True)
    naive_grads = torch.autograd.grad(naive_lse.sum(), naive[:2])
    for name, a, r, n in zip(("dq", "dk"), grads, ref_grads, naive_grads):
        assert_by_rule(name, a, r, n, torch.float32)
    assert (grads[2] == 0).all()


def test_dropout_needs_rng_state(device):
    q, k, v = _inputs(1, 1, 1, 4, 4, 16, 16, torch.float32, device)
    with pytest.raises(ValueError, match="rng_state"):
        triton_attention.attention_forward(q, k, v, None, 0.5, False, 0.25, None)


@pytest.mark.parametrize("dt,dropout_p", [("fp32", 0.0), ("bf16", 0.25)])
def test_dense_backward_fallback_matches_kernels(device, dt, dropout_p):
    """Where every Triton backward config spills on a GPU (fp32 at head dims > 128; fp16/bf16 with dropout at head
    dims > 128 on sm_90) the backward runs densely (_dense_backward). It must give the kernels' gradients: same
    lse, same Philox keep pattern. Compared here with the Triton backward on a shape that runs it everywhere."""
    dtype = DTYPES[dt]
    B, Hq, Hkv, L, S, E, Ev = 1, 4, 2, 21, 26, 40, 24
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed=23)
    mask = _make_mask("float", (L, S), device, torch.Generator().manual_seed(6)).expand(B, Hq, L, S)
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(B, Hq, L, Ev, generator=gen).to(device, dtype)
    grad_lse = torch.randn(B, Hq, L, generator=gen).to(device)
    rng = torch.tensor([987, 654], dtype=torch.int64, device=device) if dropout_p > 0 else None
    scale = E ** -0.5
    out, lse = triton_attention.attention_forward(q, k, v, mask, dropout_p, True, scale, rng)
    args = (grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, True, scale, rng, True)
    kernels = triton_attention.attention_backward(*args)
    dense = triton_attention.launch._dense_backward(grad_out, q, k, v, lse, grad_lse, mask, dropout_p, True, scale,
                                                    rng, True)
    # Both compute in fp32; the kernels also round P and dS to bf16 for their matrix products (relative 2^-8 on
    # O(1) values), the dense path does not: hence the bf16 bound.
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), kernels, dense):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = (a.float() - b.float()).abs().max().item()
        assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol), f"{name}: max difference {err}"


def test_fp32_dot_precision_follows_allow_tf32():
    """fp32 inputs use IEEE fp32 products unless the user allowed TF32 for matmuls; half types are unaffected."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert triton_attention.launch._dot_precision(torch.float32) == "ieee"
        matmul.allow_tf32 = True
        assert triton_attention.launch._dot_precision(torch.float32) == "tf32"
        assert triton_attention.launch._dot_precision(torch.bfloat16) == "tf32"
    finally:
        matmul.allow_tf32 = previous


# ----------------------------------------------------------------------------------------------------------------
# Float masks at finfo(dtype).min (transformers' additive masks: (1 - mask) * finfo(dtype).min). The kernels keep
# such scores in natural-log units, so the mask is added as it is: a row whose every key carries finfo.min is the
# mean of V (as in PyTorch), not a "fully masked" row; and the interpreter raises no overflow warning (numpy's
# RuntimeWarning is an error in these tests).


def _finfo_mask(shape, dtype, rows_all=(), rows_some=(), device="cpu"):
    """A zero float mask of ``shape`` (..., L, S) in ``dtype``: finfo(dtype).min on every key of ``rows_all`` and
    on the even keys of ``rows_some``."""
    mask = torch.zeros(shape, dtype=dtype)
    low = torch.finfo(dtype).min
    for r in rows_all:
        mask[..., r, :] = low
    for r in rows_some:
        mask[..., r, ::2] = low
    return mask.to(device)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float_mask_at_finfo_min_matches_pytorch(device):
    """The issue's reproduction: row 3 of the mask is finfo(float32).min on every key. Output, lse and every
    gradient (dq, dk, dv, mask) agree with torch's SDPA and with the float64 reference."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 16, generator=gen).to(device) for _ in range(3))
    mask = _finfo_mask((1, 1, 8, 8), torch.float32, rows_all=(3,), device=device)
    out, lse, grads = check_against_reference(q, k, v, mask, lse_grad=False)
    assert torch.isfinite(lse).all() and torch.isfinite(out).all()
    # lse's own gradient is the softmax: 1/8 on every key of row 3 (the references' logsumexp backward gives 1
    # there, see attention_check), 0 elsewhere.
    mask_leaf = leaf(mask)
    _, lse = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask_leaf, return_lse=True, backend="triton")
    (dmask,) = torch.autograd.grad(lse[0, :, 3].sum(), [mask_leaf])
    torch.testing.assert_close(dmask[0, 0, 3], torch.full((8,), 2 / 8, device=device))
    assert (dmask[0, 0, torch.arange(8) != 3] == 0).all()

    leaves = [leaf(t) for t in (q, k, v, mask)]
    expected = torch.nn.functional.scaled_dot_product_attention(*leaves)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(device)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    ours_leaves = [leaf(t) for t in (q, k, v, mask)]
    ours = llmkernels.scaled_dot_product_attention(*ours_leaves, backend="triton")
    ours_grads = torch.autograd.grad(ours, ours_leaves, grad_out)
    # Row 3 sees every key with the same (rounded) score: the mean of V, as PyTorch gives.
    torch.testing.assert_close(ours[0, :, 3], v[0].mean(dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), ours_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dt,B,H,L,S,E,causal", [
    ("fp32", 1, 2, 19, 23, 24, False),
    ("fp16", 2, 1, 17, 33, 40, False),
    ("bf16", 1, 3, 21, 18, 16, True),
    ("fp16", 1, 2, 33, 31, 16, True),
])
def test_float_mask_at_finfo_min_of_its_dtype(device, dt, B, H, L, S, E, causal):
    """Masks at the input dtype's own finfo.min, odd sizes: some rows with every key at finfo.min, some with only
    some keys; with causal masking too. Output, lse and gradients by the tolerance rule."""
    dtype = DTYPES[dt]
    q, k, v = _inputs(B, H, H, L, S, E, E, dtype, device, seed=31)
    mask = _finfo_mask((1, H, L, S), dtype, rows_all=(0, L // 2, L - 1), rows_some=(1, 4), device=device)
    out, lse, _ = check_against_reference(q, k, v, mask, is_causal=causal, lse_grad=False)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_float_mask_with_large_lse_takes_exact_backward(device):
    """Where every visible key of a row carries a huge negative value, lse = m + log(l) cannot hold log(l) in
    fp32 and the kernels' exp(s - lse) would be off by the factor l: such calls take the dense backward, which
    normalises the weights from the scores (checked by the rule above); rows of moderate lse keep the kernels."""
    lse = torch.tensor([[[1.0, -3.0e38, 2.0]]], device=device)
    float_mask = torch.zeros(3, 3, device=device)
    assert triton_attention.launch._lse_loses_precision(lse, float_mask)
    assert not triton_attention.launch._lse_loses_precision(lse, float_mask.bool())
    assert not triton_attention.launch._lse_loses_precision(lse, None)
    moderate = torch.tensor([[[1.0, -1.0e3, float("-inf")]]], device=device)
    assert not triton_attention.launch._lse_loses_precision(moderate, float_mask)
    # ALiBi rows far from every key (lse ~ -slope * distance) take it too; plain calls never do.
    alibi = llmkernels.contract.ScoreRule(alibi_slopes=torch.ones(1, 3, device=device))
    far = torch.tensor([[[1.0, -5.6e3, 2.0]]], device=device)
    assert triton_attention.launch._lse_loses_precision(far, None, alibi)
    assert not triton_attention.launch._lse_loses_precision(far, None, llmkernels.contract.ScoreRule())
