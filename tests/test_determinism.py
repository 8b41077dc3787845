"""Bitwise-identical results run to run, with torch.use_deterministic_algorithms(True).

The recipe (documented in ``llmkernels.scaled_dot_product_attention``): fixed inputs, ``torch.manual_seed`` before
each run when dropout is on (the Philox seed comes from PyTorch's generator), and
``torch.use_deterministic_algorithms(True)``. The Triton backward has no atomics (every output element is summed
by one program in a fixed order), so the flag costs nothing there. On a GPU the test runs the real kernels at a
size where an atomic-accumulating backward would differ between runs; on CPU it runs every available backend
(Triton in its interpreter) on small shapes.
"""

import pytest
import torch

import llmkernels
from conftest import HAS_GPU
from runnable import runnable_backends


@pytest.fixture(autouse=True)
def deterministic_mode():
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


def _inputs(B, Hq, Hkv, L, S, E, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    mask = torch.randn(1, Hq, L, S, generator=g).to(device, torch.float32)
    grad_out = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
    return q, k, v, mask, grad_out


def _run(inputs, backend, dropout_p, with_mask):
    q, k, v, mask, grad_out = (t.detach().clone() for t in inputs)
    for t in (q, k, v, mask):
        t.requires_grad_()
    torch.manual_seed(1234)  # the dropout seed
    out, lse = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask if with_mask else None,
                                                       dropout_p=dropout_p, is_causal=True, enable_gqa=True,
                                                       return_lse=True, backend=backend)
    torch.autograd.backward((out, lse), (grad_out, torch.ones_like(lse)))
    results = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if with_mask:
        results["dmask"] = mask.grad
    return {name: t.detach().clone() for name, t in results.items()}


def _assert_bitwise_equal(first, second):
    for name in first:
        a, b = first[name].contiguous(), second[name].contiguous()
        # Compare the bits (so -0.0 vs 0.0 or two different NaN payloads would count as a difference).
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{name} differs between runs"


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("dropout_p,with_mask", [(0.0, True), (0.3, False)])
def test_backward_is_bitwise_repeatable_cpu(backend, dropout_p, with_mask):
    # Several 16-row blocks (the interpreter's tile), GQA (dK/dV sum over a group), causal and odd sizes.
    inputs = _inputs(1, 4, 2, 37, 45, 24, torch.float32, "cpu")
    first = _run(inputs, backend, dropout_p, with_mask)
    second = _run(inputs, backend, dropout_p, with_mask)
    _assert_bitwise_equal(first, second)
    assert torch.isfinite(first["dq"]).all() and first["dq"].abs().max() > 0


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: bitwise determinism of the compiled kernels")
@pytest.mark.parametrize("backend", [b for b in runnable_backends() if b != "reference"] or ["triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p,with_mask", [(0.0, False), (0.0, True), (0.1, False)])
def test_backward_is_bitwise_repeatable_gpu(backend, dtype, dropout_p, with_mask):
    # Long enough for many key and query blocks per program and many programs per kv head (GQA 4:1), where an
    # atomic-add accumulation of dQ or dK/dV would change the summation order between runs.
    inputs = _inputs(2, 8, 2, 1031, 1031, 64, dtype, "cuda")
    runs = [_run(inputs, backend, dropout_p, with_mask) for _ in range(3)]
    _assert_bitwise_equal(runs[0], runs[1])
    _assert_bitwise_equal(runs[0], runs[2])
