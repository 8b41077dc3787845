"""Routing torch.nn.functional.scaled_dot_product_attention to llmkernels: patching and restoring, which calls
take which path (and why), and that routed calls give PyTorch's results (values and gradients)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import llmkernels
from llmkernels import ops, reference
from llmkernels.integrations import sdpa_routing as routing
from tolerance import assert_by_rule

TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def clean_routing():
    """Every test starts and ends with routing off, PyTorch's function in place and empty counters."""
    assert F.scaled_dot_product_attention is TORCH_SDPA
    llmkernels.reset_routing_stats()
    yield
    llmkernels.disable_sdpa_routing()
    assert F.scaled_dot_product_attention is TORCH_SDPA, "routing was not undone"


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts llmkernels::sdpa_forward calls (that is, calls that really ran on llmkernels)."""
    calls = []
    original = ops.sdpa_forward

    def spy(*args):
        calls.append(args[14])  # the backend name (sdpa_forward(q, k, v, ..., sinks, backend, deterministic))
        return original(*args)

    monkeypatch.setattr(ops, "sdpa_forward", spy)
    return calls


def _qkv(B=2, Hq=4, Hkv=4, L=9, S=13, E=16, Ev=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=dtype).to(device)
                 for s in ((B, Hq, L, E), (B, Hkv, S, E), (B, Hkv, S, Ev)))


def user_code(q, k, v, **kw):
    """Stands for code we cannot edit: it looks the function up at call time, as models do."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)


def test_block_patches_and_restores_even_on_error():
    with llmkernels.route_sdpa() as stats:
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        assert llmkernels.sdpa_routing_enabled()
        assert stats is llmkernels.routing_stats()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with pytest.raises(KeyError):
        with llmkernels.route_sdpa():
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert not llmkernels.sdpa_routing_enabled()


def test_global_switch_and_nested_blocks():
    llmkernels.enable_sdpa_routing()
    assert llmkernels.sdpa_routing_enabled()
    with llmkernels.route_sdpa(enabled=False):
        assert not llmkernels.sdpa_routing_enabled()  # a block can turn it off locally
        with llmkernels.route_sdpa():
            assert llmkernels.sdpa_routing_enabled()
        assert not llmkernels.sdpa_routing_enabled()
    assert llmkernels.sdpa_routing_enabled()  # the global switch survives the blocks
    llmkernels.disable_sdpa_routing()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with llmkernels.route_sdpa():
        llmkernels.enable_sdpa_routing()
        llmkernels.disable_sdpa_routing()
        assert llmkernels.sdpa_routing_enabled()  # the open block keeps it on
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_a_later_wrapper_is_left_in_place_and_still_works(device, auto_dispatch, kernel_calls):
    # Someone wraps the routed function; when routing ends we must not drop their wrapper, and the router it
    # holds must then pass calls through to PyTorch.
    q, k, v = _qkv(device=device)
    try:
        with llmkernels.route_sdpa():
            routed = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = lambda *a, **kw: routed(*a, **kw)
            wrapper = F.scaled_dot_product_attention
            user_code(q, k, v)
        assert F.scaled_dot_product_attention is wrapper
        before = llmkernels.routing_stats().total
        out = user_code(q, k, v)
        torch.testing.assert_close(out, TORCH_SDPA(q, k, v))
        assert llmkernels.routing_stats().total == before  # idle router: not counted, not routed
        assert len(kernel_calls) == 1
    finally:
        F.scaled_dot_product_attention = TORCH_SDPA


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "bool_mask", "float_mask_grad", "blhe_views"])
def test_routed_calls_match_pytorch_values_and_gradients(case, device, auto_dispatch, kernel_calls):
    kw = {}
    q, k, v = _qkv(device=device)
    g = torch.Generator().manual_seed(3)
    if case == "causal_gqa":
        q, k, v = _qkv(Hq=6, Hkv=2, L=13, S=13, E=24, Ev=8, device=device)
        kw = dict(is_causal=True, enable_gqa=True)
    elif case == "bool_mask":
        m = torch.rand(2, 1, 9, 13, generator=g) > 0.3
        m[..., 0] = True
        kw = dict(attn_mask=m.to(device), scale=0.3)
    elif case == "float_mask_grad":
        kw = dict(attn_mask=torch.randn(1, 4, 9, 13, generator=g).to(device).requires_grad_())
    elif case == "blhe_views":
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.route_sdpa():
        out = user_code(*leaves, **kw)
    assert len(kernel_calls) == 1 and llmkernels.routing_stats().counts() == {"llmkernels": 1, "torch": 0}
    grad_out = torch.randn(out.shape, generator=g).to(device)
    out.backward(grad_out)

    def run_ref(dtype):
        xs = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        kw2 = dict(kw)
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kw2["attn_mask"] = mask.detach().to(dtype).requires_grad_()
        o = reference.scaled_dot_product_attention(*xs, **kw2)
        o.backward(grad_out.to(dtype))
        return [o] + [x.grad for x in xs] + ([kw2["attn_mask"].grad] if case == "float_mask_grad" else [])

    ref64, naive = run_ref(torch.float64), run_ref(torch.float32)
    ours = [out] + [x.grad for x in leaves] + ([kw["attn_mask"].grad] if case == "float_mask_grad" else [])
    for name, a, r, n in zip(["out", "dq", "dk", "dv", "dmask"], ours, ref64, naive):
        assert_by_rule(name, a, r, n, torch.float32)
    # and PyTorch's own function, for the output (so "drop-in" holds against the real thing too)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, **{n: (t.detach() if torch.is_tensor(t) else t)
                                                           for n, t in kw.items()}), rtol=2e-5, atol=2e-5)


def test_multihead_attention_module_is_routed(device, auto_dispatch, kernel_calls):
    # nn.MultiheadAttention reaches F.scaled_dot_product_attention (need_weights=False, training mode) through
    # torch.nn.functional's module globals, which the patch changes too.
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(24, 3, batch_first=True).to(device).train()
    x = torch.randn(2, 7, 24, device=device)
    with llmkernels.route_sdpa():
        out, _ = mha(x, x, x, need_weights=False)
    assert len(kernel_calls) == 1
    plain, _ = mha(x, x, x, need_weights=False)
    torch.testing.assert_close(out, plain, rtol=2e-5, atol=2e-5)


def _one_fallback(reason):
    stats = llmkernels.routing_stats()
    assert stats.counts() == {"llmkernels": 0, "torch": 1}, str(stats)
    assert stats.fallback == {reason: 1}
    event = stats.recent[-1]
    assert event.path == "torch" and event.reason == reason
    return event


def test_unsupported_dtype_falls_back_to_pytorch(kernel_calls):
    q, k, v = _qkv(dtype=torch.float64)
    with llmkernels.route_sdpa():
        out = user_code(q, k, v, is_causal=True)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), rtol=0, atol=0)
    event = _one_fallback(routing.REASON_CONTRACT)
    assert "float64" in event.detail and not kernel_calls


def test_mask_with_is_causal_keeps_pytorchs_error(kernel_calls):
    q, k, v = _qkv()
    with llmkernels.route_sdpa():
        with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal=True"):
            user_code(q, k, v, attn_mask=torch.ones(9, 13, dtype=torch.bool), is_causal=True)
    _one_fallback(routing.REASON_MASK_AND_CAUSAL)
    assert not kernel_calls


def test_unknown_keyword_goes_to_pytorch(kernel_calls):
    q, k, v = _qkv()
    with llmkernels.route_sdpa():
        with pytest.raises(TypeError):  # PyTorch's own complaint about the argument it does not know either
            user_code(q, k, v, window_size=4)
    assert _one_fallback(routing.REASON_EXTRA_ARGS).detail == "window_size"
    assert not kernel_calls


def test_head_dim_only_the_reference_takes_goes_to_pytorch(kernel_calls):
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, L=3, S=4, E=300, Ev=300)
    with llmkernels.route_sdpa():
        out = user_code(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v), rtol=0, atol=0)
    event = _one_fallback(routing.REASON_REFERENCE_ONLY)
    assert "head dims up to 256" in event.detail and not kernel_calls


def test_explicit_reference_backend_is_routed(kernel_calls):
    q, k, v = _qkv(B=1, Hq=2, Hkv=2, L=3, S=4, E=300, Ev=300)
    with llmkernels.route_sdpa(backend="reference"):
        out = user_code(q, k, v)
    assert kernel_calls == ["reference"]
    assert llmkernels.routing_stats().routed == {"reference": 1}
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v), rtol=2e-5, atol=2e-5)


def test_requested_backend_that_cannot_run_falls_back_or_raises_when_strict(kernel_calls):
    q, k, v = _qkv()  # CPU tensors: the cuda backend refuses them on every machine
    with llmkernels.route_sdpa(backend="cuda"):
        out = user_code(q, k, v)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v), rtol=0, atol=0)
    assert "runs on CUDA tensors only" in _one_fallback(routing.REASON_BACKEND).detail
    with llmkernels.route_sdpa(backend="cuda", strict=True):
        with pytest.raises(llmkernels.NotSupportedError, match="backend 'cuda' does not support"):
            user_code(q, k, v)
    assert not kernel_calls


def test_autocast_gives_pytorchs_dtype(device, auto_dispatch, kernel_calls):
    q, k, v = _qkv(device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        expected = TORCH_SDPA(q, k, v, is_causal=True)
        with llmkernels.route_sdpa():
            out = user_code(q, k, v, is_causal=True)
    assert len(kernel_calls) == 1
    assert out.dtype == expected.dtype == torch.bfloat16
    ref = reference.scaled_dot_product_attention(*(t.bfloat16().double() for t in (q, k, v)), is_causal=True)
    naive = reference.scaled_dot_product_attention(*(t.bfloat16() for t in (q, k, v)), is_causal=True)
    assert_by_rule("out", out, ref, naive, torch.bfloat16)


def test_stats_summary_and_reset(device, auto_dispatch):
    q, k, v = _qkv(device=device)
    with llmkernels.route_sdpa():
        user_code(q, k, v)
        user_code(q, k, v)
        user_code(q.double(), k.double(), v.double())
    stats = llmkernels.routing_stats()
    assert stats.total == 3 and stats.counts() == {"llmkernels": 2, "torch": 1}
    text = str(stats)
    assert "2 call(s) to llmkernels, 1 to torch" in text and routing.REASON_CONTRACT in text
    assert [e.path for e in stats.recent] == ["llmkernels", "llmkernels", "torch"]
    llmkernels.reset_routing_stats()
    assert stats.total == 0 and not stats.recent
    user_code(q, k, v)  # routing off: not seen
    assert stats.total == 0


def test_torch_compile_fullgraph_traces_the_routed_op(device, auto_dispatch):
    """Under torch.compile the router is traced like user code: the graph holds the llmkernels op (and no Python
    bookkeeping that would break fullgraph=True)."""
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    q, k, v = _qkv(device=device)
    torch._dynamo.reset()
    try:
        with llmkernels.route_sdpa():
            out = torch.compile(user_code, backend=record_graph, fullgraph=True)(q, k, v, is_causal=True)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1 and "llmkernels.sdpa_forward" in graphs[0], graphs
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, is_causal=True), rtol=2e-5, atol=2e-5)


class _CausalAttention(nn.Module):
    """Client code as models write it: PyTorch's function, looked up at call time."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic_dynamic", "dynamic_true"])
def test_torch_compile_fullgraph_with_dynamic_shapes(device, auto_dispatch, dynamic):
    """With symbolic shapes (dynamic=True, or automatically on the second sequence length) the router must not
    format shapes on the success path (dynamo: "missing sq_concat"). Each graph holds the llmkernels op."""
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    try:
        with llmkernels.route_sdpa():
            model = torch.compile(_CausalAttention(), backend=record_graph, fullgraph=True, dynamic=dynamic)
            for L in (10, 17):
                q, k, v = _qkv(B=1, Hq=2, Hkv=2, L=L, S=L, E=8, Ev=8, device=device, seed=L)
                out = model(q, k, v)
                ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
                naive = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
                assert_by_rule(f"out L={L}", out, ref, naive, torch.float32)
    finally:
        torch._dynamo.reset()
    # dynamic=True: one symbolic graph for both lengths; automatic: a static graph, then a symbolic one.
    assert len(graphs) == (1 if dynamic else 2), graphs
    assert all("llmkernels.sdpa_forward" in g for g in graphs), graphs


# ------------------------------------------------------------------------------------------------------------
# CausalBias masks (torch.nn.attention.bias): recognised as causal with their alignment, never materialised


@pytest.mark.parametrize("make", ["causal_upper_left", "causal_lower_right"])
def test_causal_bias_is_routed_as_causal_with_its_alignment(make, kernel_calls):
    q, k, v = _qkv(L=5, S=8)
    bias = getattr(torch.nn.attention.bias, make)(5, 8)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    with llmkernels.route_sdpa(backend="reference"):
        out = user_code(*ins, attn_mask=bias)
    expected = TORCH_SDPA(*ref_ins, attn_mask=bias)
    assert kernel_calls == ["reference"] and type(out) is torch.Tensor
    event = llmkernels.routing_stats().recent[-1]
    assert event.path == "llmkernels" and f"CausalBias({make[7:]}, 5, 8)" in event.detail
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    grad = torch.randn(out.shape)
    for a, b in zip(torch.autograd.grad(out, ins, grad), torch.autograd.grad(expected, ref_ins, grad)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


def test_causal_bias_is_not_a_subclass_fallback(kernel_calls):
    # With the default choice a bottom-right call (L != S) runs on our kernels (the Triton kernels apply the
    # alignment; on CPU without the interpreter, the reference backend): CausalBias is recognised, not refused as a
    # tensor subclass. (Inputs that require grad: PyTorch's CPU fused path fails on this CausalBias call without
    # them, torch 2.14.)
    q, k, v = (t.requires_grad_() for t in _qkv(L=5, S=8))
    bias = torch.nn.attention.bias.causal_lower_right(5, 8)
    with llmkernels.route_sdpa():
        out = user_code(q, k, v, attn_mask=bias)
    torch.testing.assert_close(out, TORCH_SDPA(q, k, v, attn_mask=bias), rtol=1e-5, atol=1e-6)
    stats = llmkernels.routing_stats()
    assert stats.fallback == {}
    assert len(kernel_calls) == 1
    event = stats.recent[-1]
    assert event.path == "llmkernels" and "CausalBias(lower_right, 5, 8)" in event.detail


def test_causal_bias_with_is_causal_keeps_pytorchs_error(kernel_calls):
    q, k, v = _qkv(L=5, S=8)
    with llmkernels.route_sdpa(backend="reference"):
        with pytest.raises((ValueError, RuntimeError), match="should not be (used|set) (with|when) (is_)?causal=True"):
            user_code(q, k, v, attn_mask=torch.nn.attention.bias.causal_upper_left(5, 8), is_causal=True)
    _one_fallback(routing.REASON_MASK_AND_CAUSAL)
    assert not kernel_calls


def test_causal_bias_calls_given_to_pytorch_still_get_its_causal_dispatch(kernel_calls):
    # While the router is installed, F.scaled_dot_product_attention is the router, so CausalBias's own
    # __torch_function__ (which checks for that function) would not recognise the call and PyTorch would read the
    # bias as a (variant, L, S) tensor mask. Fallbacks and idle routing must give PyTorch's causal result.
    q, k, v = (t.requires_grad_() for t in _qkv(L=5, S=8))
    bias = torch.nn.attention.bias.causal_upper_left(5, 8)
    expected = TORCH_SDPA(q, k, v, attn_mask=bias)
    causal = TORCH_SDPA(q, k, v, is_causal=True)
    torch.testing.assert_close(expected, causal, rtol=1e-5, atol=1e-6)
    with llmkernels.route_sdpa(enabled=False):  # installed, idle
        torch.testing.assert_close(user_code(q, k, v, attn_mask=bias), causal, rtol=1e-5, atol=1e-6)
    with llmkernels.route_sdpa(backend="cuda"):  # a fallback: cuda refuses CPU tensors
        torch.testing.assert_close(user_code(q, k, v, attn_mask=bias), causal, rtol=1e-5, atol=1e-6)
    assert not kernel_calls
