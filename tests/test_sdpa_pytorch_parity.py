"""Where PyTorch's SDPA accepts an input, so do we, with its result: matmul broadcasting of leading dims and of
size-1 head dims (as stride-0 views, never copies), ``dropout_p=1.0`` and a 0-d tensor ``scale``.

Each case runs side by side with ``torch.nn.functional.scaled_dot_product_attention`` (same shapes out, same
values, gradients of the same shapes), and on every backend that runs here against the float64 reference under
the tolerance rule, forward and backward (tests/attention_check.py).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import contract, ops, reference
from attention_check import check_attention, leaf
from runnable import runnable_backends

BACKENDS = runnable_backends()

# (id, query shape, key shape, value shape, enable_gqa): every one of these PyTorch accepts.
BROADCAST_CASES = [
    ("query_fewer_leading_dims", (4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8), False),
    ("query_2d", (5, 8), (2, 7, 8), (2, 7, 8), False),
    ("query_one_head", (2, 1, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), False),
    ("key_one_head", (2, 2, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8), False),
    ("query_and_key_one_head", (2, 1, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8), False),
    ("value_one_head", (2, 2, 5, 8), (2, 2, 7, 8), (2, 1, 7, 8), False),
    ("batch_broadcast", (1, 2, 5, 8), (3, 2, 7, 8), (1, 2, 7, 8), False),
    ("gqa_key_one_head", (2, 4, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8), True),
    ("gqa_value_one_head", (2, 4, 5, 8), (2, 2, 7, 8), (2, 1, 7, 8), True),
    ("gqa_batch_broadcast", (2, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8), True),
    ("gqa_key_value_heads_differ", (1, 4, 5, 8), (1, 2, 7, 8), (1, 4, 7, 8), True),
]


def _inputs(qs, ks, vs, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(s, generator=g).to(dtype) for s in (qs, ks, vs))


@pytest.mark.parametrize("qs,ks,vs,gqa", [c[1:] for c in BROADCAST_CASES], ids=[c[0] for c in BROADCAST_CASES])
def test_broadcast_side_by_side_with_pytorch(qs, ks, vs, gqa):
    """Output shape and values, and each input's gradient (in its own shape), as PyTorch's."""
    q, k, v = _inputs(qs, ks, vs)
    ours_in, theirs_in = [leaf(t) for t in (q, k, v)], [leaf(t) for t in (q, k, v)]
    ours = llmkernels.scaled_dot_product_attention(*ours_in, is_causal=True, enable_gqa=gqa)
    theirs = F.scaled_dot_product_attention(*theirs_in, is_causal=True, enable_gqa=gqa)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    grad = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(3))
    ours_g = torch.autograd.grad(ours, ours_in, grad)
    theirs_g = torch.autograd.grad(theirs, theirs_in, grad)
    for name, a, b, t in zip("qkv", ours_g, theirs_g, (q, k, v)):
        assert a.shape == t.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("qs,ks,vs,gqa", [c[1:] for c in BROADCAST_CASES], ids=[c[0] for c in BROADCAST_CASES])
def test_broadcast_against_float64_reference(backend, qs, ks, vs, gqa):
    """Forward and backward (output, lse, every gradient) on each backend, with a broadcast float mask that
    takes a gradient too, under the tolerance rule."""
    dtype = torch.float16
    q, k, v = _inputs(qs, ks, vs, dtype, seed=1)
    L, S = qs[-2], ks[-2]
    mask = torch.randn(L, S, generator=torch.Generator().manual_seed(2))
    mask[0, 1:] = float("-inf")
    out, lse, grads = check_attention(backend, None, q, k, v, mask, is_causal=True, enable_gqa=gqa)
    assert out.shape == F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=gqa).shape
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape, mask.shape]


def test_broadcast_dims_are_stride_zero_views(kernel_inputs):
    """The canonical form (what every backend receives) shares the user's storage; broadcast dims have stride 0."""
    # query with fewer leading dims: its batch dim is broadcast.
    q, k, v = _inputs((4, 3, 8), (4, 4, 6, 8), (4, 4, 6, 8))
    a = contract.check_attention(q, k, v)
    assert a.q.shape == (4, 4, 3, 8) and a.q.stride(0) == 0
    # a size-1 head dim (query; then key against value's 2 heads), and a broadcast mask.
    q, k, v = _inputs((2, 1, 5, 8), (2, 1, 7, 8), (2, 2, 7, 8))
    mask = torch.zeros(5, 7)
    a = contract.check_attention(q, k, v, mask)
    assert a.q.shape == (2, 2, 5, 8) and a.q.stride(1) == 0
    assert a.k.shape == (2, 2, 7, 8) and a.k.stride(1) == 0
    assert a.mask.shape == (2, 2, 5, 7) and a.mask.stride()[:2] == (0, 0)
    for canon, user in ((a.q, q), (a.k, k), (a.v, v), (a.mask, mask)):
        assert canon.untyped_storage().data_ptr() == user.untyped_storage().data_ptr()
    # ... and the op hands exactly such views to the kernels.
    llmkernels.scaled_dot_product_attention(q, k, v, mask)
    (kq, kk, kv, kmask) = kernel_inputs[-1][:4]
    assert kq.stride(1) == 0 and kk.stride(1) == 0 and kmask.stride()[:2] == (0, 0)
    assert kq.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
    assert kk.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()


@pytest.fixture
def kernel_inputs(monkeypatch):
    calls = []
    original = ops.sdpa_forward

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(ops, "sdpa_forward", spy)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# dropout_p = 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_gives_zeros_and_true_lse(backend):
    q, k, v = _inputs((2, 2, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), seed=4)
    mask = torch.randn(5, 7)
    ins = [leaf(t) for t in (q, k, v)] + [leaf(mask)]
    out, lse = llmkernels.scaled_dot_product_attention(*ins, dropout_p=1.0, is_causal=True, return_lse=True,
                                                       backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, mask.bool(), dropout_p=1.0)
    assert out.shape == theirs.shape and torch.equal(out, torch.zeros_like(out)) and torch.equal(theirs, out)
    # The output carries no gradient: zeros of every input's own shape.
    grads = torch.autograd.grad(out, ins, torch.randn(out.shape), retain_graph=True)
    for g, t in zip(grads, ins):
        assert g.shape == t.shape and torch.equal(g, torch.zeros_like(g))
    # Dropout acts after the softmax, so lse is the scores' own, and its gradient is the dropout-free one.
    ref_ins = [leaf(t) for t in ins]
    _, ref_lse = llmkernels.scaled_dot_product_attention(*ref_ins, is_causal=True, return_lse=True, backend=backend)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    grad_lse = torch.randn(lse.shape)
    got = torch.autograd.grad(lse, ins, grad_lse)
    want = torch.autograd.grad(ref_lse, ref_ins, grad_lse)
    for name, g, w in zip(("q", "k", "v", "mask"), got, want):
        assert (g.abs().max() > 0) == (name != "v"), name  # lse does not depend on v
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_keeps_nan_and_inf_visible_as_pytorch(backend):
    """PyTorch's dropout multiplies the weights by 0, so a NaN query row, or an inf in V, still gives NaN."""
    q, k, v = _inputs((1, 1, 3, 8), (1, 1, 6, 8), (1, 1, 6, 8), seed=5)
    q[0, 0, 1, 0] = math.nan
    v[0, 0, 2, 3] = math.inf
    ours = llmkernels.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend=backend)
    theirs = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert torch.equal(torch.isnan(ours), torch.isnan(theirs)) and torch.isnan(theirs).any()
    assert torch.equal(ours.nan_to_num(0.0), theirs.nan_to_num(0.0))


# ---------------------------------------------------------------------------------------------------------------
# scale as PyTorch takes it


@pytest.mark.parametrize("scale", [torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64), torch.tensor(2),
                                   np.float32(0.3), 2, -0.5],
                         ids=["tensor_fp32", "tensor_fp64", "tensor_int", "numpy_fp32", "int", "negative"])
def test_scale_forms_pytorch_takes(scale):
    q, k, v = _inputs((2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), seed=6)
    ours = llmkernels.scaled_dot_product_attention(q, k, v, scale=scale)
    theirs = F.scaled_dot_product_attention(q, k, v, scale=scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    as_float = llmkernels.scaled_dot_product_attention(q, k, v, scale=float(scale))
    assert torch.equal(ours, as_float)
