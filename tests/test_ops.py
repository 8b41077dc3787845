"""The PyTorch op layer: torch.library registration, opcheck, torch.compile, and backend selection."""

import os

import pytest
import torch

import llmkernels
from llmkernels import contract, dispatch, ops

from conftest import INTERPRETING

# Backends that can run in this test session: on CPU, triton runs in the interpreter; cuda needs a GPU.
RUNNABLE = ["reference"] + (["triton"] if INTERPRETING or torch.cuda.is_available() else [])


def _attention_samples(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        x = torch.randn(*shape, generator=g, dtype=dtype).to(device)
        return x.requires_grad_(grad)

    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 17, 23, 16, 8
    mask_bool = (torch.rand(B, 1, L, S, generator=g) > 0.2).to(device).expand(B, Hq, L, S)
    mask_float = t(1, Hq, 1, S, grad=True).expand(B, Hq, L, S)
    rng = torch.tensor([1234, 0], dtype=torch.int64, device=device)
    return [
        (t(B, Hq, L, E), t(B, Hkv, S, E), t(B, Hkv, S, Ev), None, 0.0, False, 0.25, None),
        (t(B, Hq, L, E), t(B, Hkv, S, E), t(B, Hkv, S, Ev), mask_bool, 0.0, True, 0.25, None),
        (t(B, Hq, L, E), t(B, Hkv, S, E), t(B, Hkv, S, Ev), mask_float, 0.0, False, 0.3, None),
        (t(B, Hq, L, E), t(B, Hkv, S, E), t(B, Hkv, S, Ev), None, 0.2, False, 0.25, rng),
        # the (B, L, H, E) layout as transposed views
        (t(B, L, Hq, E).transpose(1, 2), t(B, S, Hkv, E).transpose(1, 2), t(B, S, Hkv, Ev).transpose(1, 2),
         None, 0.0, True, 0.25, None),
    ]


# The score rule's op arguments (window_left, window_right, bottom_right, softcap, alibi_slopes, sinks) when off.
NO_RULE = (-1, -1, False, 0.0, None, None)


def _variant_samples(device):
    """Op arguments (without the backend) with each variant of the score rule, alone and together."""
    g = torch.Generator().manual_seed(1)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    B, Hq, Hkv, L, S, E, Ev = 2, 4, 2, 17, 23, 16, 8
    slopes = torch.rand(B, Hq, generator=g).to(device)
    mask_bool = (torch.rand(B, 1, L, S, generator=g) > 0.2).to(device).expand(B, Hq, L, S)
    mask_float = t(1, Hq, 1, S).expand(B, Hq, L, S)
    rng = torch.tensor([99, 0], dtype=torch.int64, device=device)

    def qkv(L=L, S=S):
        return t(B, Hq, L, E), t(B, Hkv, S, E), t(B, Hkv, S, Ev)

    return [
        (*qkv(), None, 0.0, False, 0.25, None, 3, 2, True, 0.0, None, None),  # a two-sided window, bottom-right
        (*qkv(), mask_bool, 0.0, True, 0.25, None, 4, -1, True, 0.0, None, None),  # causal window, a mask
        (*qkv(), mask_float, 0.0, False, 0.3, None, -1, -1, False, 1.0, None, None),  # softcap + float mask grad
        (*qkv(), None, 0.2, False, 0.25, rng, -1, -1, True, 0.0, slopes, None),  # ALiBi with dropout
        (*qkv(), None, 0.0, False, 0.25, None, -1, -1, False, 0.0, None, t(Hq)),  # sinks
        # L > S bottom-right causal: the first rows see no key, their denominator is the sink alone
        (*qkv(L=23, S=9), None, 0.0, True, 0.25, None, -1, -1, True, 0.0, None, t(Hq)),
        (*qkv(), mask_float, 0.0, True, 0.3, None, 5, -1, True, 2.0, slopes, t(Hq)),  # everything at once
    ]


@pytest.mark.parametrize("backend", RUNNABLE)
def test_opcheck_sdpa_forward(backend, device):
    for q, k, v, mask, p, causal, scale, rng in _attention_samples(device):
        torch.library.opcheck(ops.sdpa_forward, (q, k, v, mask, p, causal, scale, rng, *NO_RULE, backend))


@pytest.mark.parametrize("backend", [b for b in RUNNABLE if b in ("reference", "triton")])
def test_opcheck_sdpa_forward_variants(backend, device):
    # The CUDA backend's variants are checked through its emulation (tests/test_variants_cuda.py).
    for args in _variant_samples(device):
        torch.library.opcheck(ops.sdpa_forward, (*args, backend))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_opcheck_masked_softmax(backend, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 33, generator=g).to(device).requires_grad_()
    mask_bool = (torch.rand(5, 33, generator=g) > 0.3).to(device).expand(2, 3, 5, 33)
    mask_float = torch.randn(1, 3, 1, 33, generator=g).to(device).requires_grad_().expand(2, 3, 5, 33)
    for mask, causal in ((None, False), (mask_bool, True), (mask_float, False)):
        torch.library.opcheck(ops.masked_softmax_forward, (x, mask, 0.5, causal, backend))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_compile_fullgraph_forward_and_backward(backend, device):
    torch._dynamo.reset()
    q, k, v, *_ = _attention_samples(device)[0]
    mask = torch.randn(q.shape[-2], k.shape[-2], device=device)

    def f(q, k, v, mask):
        out, lse = llmkernels.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True, return_lse=True,
                                                           backend=backend)
        y = llmkernels.masked_softmax(out, scale=2.0, backend=backend)
        return (y * out).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = f(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ops_are_registered_in_the_llmkernels_namespace():
    for name in ("sdpa_forward", "sdpa_backward", "masked_softmax_forward", "masked_softmax_backward"):
        assert hasattr(torch.ops.llmkernels, name), name


# ------------------------------------------------------------------------------------------------------------
# backend selection


def _args(device="cpu"):
    q = torch.randn(1, 2, 5, 8, device=device)
    return contract.check_attention(q, q, q)


def test_precedence_argument_over_block_over_environment(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.requested_backend(None) == "reference"
    with llmkernels.use_backend("triton"):
        assert dispatch.requested_backend(None) == "triton"
        assert dispatch.requested_backend("cuda") == "cuda"
        with llmkernels.use_backend("auto"):
            assert dispatch.requested_backend(None) == "auto"
        assert dispatch.requested_backend(None) == "triton"
    assert dispatch.requested_backend(None) == "reference"


def test_bad_environment_variable_is_reported(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="LLMKERNELS_BACKEND='fastest'"):
        dispatch.requested_backend(None)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        llmkernels.scaled_dot_product_attention(*([torch.randn(1, 1, 2, 4)] * 3), backend="flash")


def test_cpu_tensor_on_cuda_backend_lists_the_reason():
    with pytest.raises(dispatch.NotSupportedError, match=r"backend 'cuda' does not support.*\n  cuda: runs on CUDA"):
        dispatch.choose_attention_backend(_args(), "cuda")


def test_auto_takes_the_first_backend_that_supports_the_inputs(monkeypatch):
    expected = "triton" if INTERPRETING else "reference"
    assert dispatch.choose_attention_backend(_args(), "auto") == expected
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert dispatch.choose_attention_backend(_args(), "auto") == "reference"
    reasons = dispatch.attention_not_supported_reasons(_args())
    assert "TRITON_INTERPRET=1" in " ".join(reasons["triton"]) and reasons["reference"] == []


def test_auto_error_lists_every_backend(monkeypatch):
    # Make every backend refuse, to see the shape of the error.
    for b in dispatch.BACKENDS.values():
        monkeypatch.setattr(b, "attention_reasons", lambda a, n=b.name: [f"{n} says no"])
    with pytest.raises(dispatch.NotSupportedError) as info:
        dispatch.choose_attention_backend(_args(), "auto")
    msg = str(info.value)
    assert "no backend supports" in msg
    for name in dispatch.AUTO_ORDER:
        assert f"{name}: {name} says no" in msg
