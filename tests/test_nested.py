"""Jagged nested tensors in llmkernels.scaled_dot_product_attention (llmkernels/nested.py, on varlen_attention) and
through the SDPA router: against PyTorch's own nested SDPA (its CPU math path) and the float64 per-sequence
reference, by the tolerance rule; the refusals PyTorch's nested path also makes; routing counts.
"""

import pytest
import torch
import torch.nn.functional as F

import llmkernels
from llmkernels import reference, varlen
from runnable import triton_present
from tolerance import assert_by_rule

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

BACKENDS = (["triton"] if triton_present("attention") else []) + ["reference"]


def _jagged(lengths, heads, dim, seed, device, dtype=torch.float32):
    """A (B, H, j, E) jagged leaf: sequences (L_b, H, E) packed, transposed as PyTorch's SDPA users pass them."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randn(n, heads, dim, generator=g, dtype=torch.float64).to(device, dtype) for n in lengths]
    return torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True)


def _values(nt):
    """The packed (T, H, E) values of a (B, j, H, E) nested leaf, as a float64-able dense tensor."""
    return nt.values().detach()


def _grads_of(out_nt, leaves, grad_values):
    return [g.values() for g in torch.autograd.grad(out_nt.values(), leaves, grad_values.to(out_nt.dtype))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_nested_sdpa(backend, device):
    """Self-attention over sequences of lengths 5, 0, 1, 7 (odd head dim, Ev != E), output and every gradient
    against PyTorch's nested SDPA in float64 (reference) and float32 (the naive baseline)."""
    lengths, H = (5, 0, 1, 7), 2
    leaves = {name: _jagged(lengths, H, dim, seed, device) for name, dim, seed in (("q", 12, 0), ("k", 12, 1),
                                                                                    ("v", 6, 2))}
    q, k, v = (leaves[n].transpose(1, 2) for n in "qkv")
    out = llmkernels.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.is_nested and out.layout == torch.jagged and out._ragged_idx == 2
    assert out.shape[:2] == (4, H) and out.shape[3] == 6 and out.size(2) == q.size(2)  # the query's ragged dim
    assert out.dtype == torch.float32
    grad = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours = [out.values().detach()] + _grads_of(out, [leaves[n] for n in "qkv"], grad)

    def pytorch(dtype):
        ins = {n: torch.nested.nested_tensor([s.detach().to(dtype) for s in t.unbind()], layout=torch.jagged,
                                             requires_grad=True) for n, t in leaves.items()}
        o = F.scaled_dot_product_attention(*(ins[n].transpose(1, 2) for n in "qkv"))
        return [o.values().detach()] + _grads_of(o, [ins[n] for n in "qkv"], grad)

    ref, naive = pytorch(torch.float64), pytorch(torch.float32)
    for name, a, r, n in zip(("out", "dq", "dk", "dv"), ours, ref, naive):
        assert_by_rule(name, a, r, n, torch.float32)


def _packed_reference(leaves, dtype, grad_out, grad_lse, **kw):
    """reference.varlen_attention on the packed values of (B, j, H, E) leaves, with gradients."""
    ins = [_values(leaves[n]).to(dtype).requires_grad_(True) for n in "qkv"]
    cu_q, cu_k = (leaves[n].offsets().to(torch.int32) for n in "qk")
    o, lse = reference.varlen_attention(*ins, cu_q, cu_k, 64, 64, return_lse=True,
                                        compute_dtype=torch.float64 if dtype == torch.float64 else None, **kw)
    grads = torch.autograd.grad([o, lse], ins, [grad_out.to(o.dtype), grad_lse.to(lse.dtype)])
    return [o.detach(), lse.detach()] + list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["causal_self", "cross_gqa_variants"])
def test_causal_variants_gqa_and_lse(case, backend, device):
    """causal_self: is_causal as in PyTorch's nested SDPA (equal lengths, top-left by default), with return_lse.
    cross_gqa_variants: query and key lengths that differ per sequence (3 vs 6, 4 vs 1, 0 vs 2, 5 vs 5), GQA,
    bottom-right is_causal with a window, softcap and (B, Hq) ALiBi slopes. Output, jagged lse and every
    gradient (also through the lse) against the float64 per-sequence reference."""
    if case == "causal_self":
        lens_q = lens_k = (6, 1, 9)
        Hq, Hkv, kw, extra = 2, 2, dict(is_causal=True), {}
    else:
        lens_q, lens_k = (3, 4, 0, 5), (6, 1, 2, 5)
        Hq, Hkv = 4, 2
        slopes = torch.tensor([[0.5, 0.25, 0.125, 0.0625]], device=device).repeat(4, 1) * torch.arange(
            1, 5, device=device).view(4, 1)
        kw = dict(is_causal=True, window_size=(3, 0), softcap=2.0, alibi_slopes=slopes)
        extra = dict(enable_gqa=True, causal_alignment="bottom_right")
    leaves = {"q": _jagged(lens_q, Hq, 8, 0, device), "k": _jagged(lens_k, Hkv, 8, 1, device),
              "v": _jagged(lens_k, Hkv, 8, 2, device)}
    q, k, v = (leaves[n].transpose(1, 2) for n in "qkv")
    out, lse = llmkernels.scaled_dot_product_attention(q, k, v, return_lse=True, backend=backend, **kw, **extra)
    assert lse.is_nested and lse.shape[:2] == (len(lens_q), Hq) and lse.size(2) == q.size(2) and lse.dim() == 3
    assert lse.dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    # Back in (B, j, ...) form the values are the packed (Tq, Hq, Ev) output and (Tq, Hq) lse.
    out_packed, lse_packed = out.transpose(1, 2).values(), lse.transpose(1, 2).values()
    grad_out = torch.randn(out_packed.shape, generator=g, dtype=torch.float64)
    grad_lse = torch.randn(lse_packed.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad([out_packed, lse_packed], [leaves[n] for n in "qkv"],
                                [grad_out.float(), grad_lse.float()])
    ours = [out_packed.detach(), lse_packed.detach()] + [gr.values() for gr in grads]
    ref_kw = dict(kw)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        if "alibi_slopes" in ref_kw:
            ref_kw["alibi_slopes"] = kw["alibi_slopes"].to(dtype)
        o, l, *gr = _packed_reference(leaves, dtype, grad_out, grad_lse.t(), **ref_kw)
        refs[dtype] = [o, l.t()] + gr  # lse (Hq, Tq) -> (Tq, Hq)
    for name, a, r, n in zip(("out", "lse", "dq", "dk", "dv"), ours, refs[torch.float64], refs[torch.float32]):
        assert_by_rule(name, a, r, n, torch.float32)
    if case == "cross_gqa_variants":  # the query rows that see no key: output 0, lse -inf
        # sequence 1 (packed rows 3-6): 4 queries, 1 key, so its first 3 query rows see nothing
        assert torch.isneginf(lse_packed[3:6]).all() and (out_packed[3:6] == 0).all()


def _three(lengths=(2, 3), heads=2, device="cpu"):
    return [_jagged(lengths, heads, 4, s, device).transpose(1, 2) for s in range(3)]


@pytest.fixture
def no_kernel(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel ran for input that must be refused first")
    monkeypatch.setattr(varlen, "varlen_forward", fail)


@pytest.mark.parametrize("what, error, words", [
    ("attn_mask", ValueError, "attn_mask"),
    ("dense_key", TypeError, "key is not a nested tensor"),
    ("strided_layout", TypeError, "layout=torch.jagged"),
    ("ragged_dim_1", ValueError, "ragged in dim 1"),
    ("holes", ValueError, "contiguous()"),
    ("heads_without_gqa", ValueError, "enable_gqa"),
    ("causal_lengths_differ", ValueError, "causal_alignment='bottom_right'"),
    ("sinks", ValueError, "sinks"),
])
def test_refusals_name_the_argument_before_any_kernel(what, error, words, no_kernel):
    q, k, v = _three()
    kw = {}
    if what == "attn_mask":
        kw["attn_mask"] = torch.ones(2, 2, dtype=torch.bool)
    elif what == "dense_key":
        k = torch.randn(2, 2, 3, 4)
    elif what == "strided_layout":
        v = torch.nested.nested_tensor([torch.randn(2, 2, 4), torch.randn(3, 2, 4)]).transpose(1, 2)
    elif what == "ragged_dim_1":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    elif what == "holes":
        q = torch.nested.narrow(torch.randn(2, 5, 8), 1, torch.tensor([0, 1]), torch.tensor([2, 3]),
                                layout=torch.jagged).unflatten(-1, (2, 4)).transpose(1, 2)
    elif what == "heads_without_gqa":
        q = _jagged((2, 3), 4, 4, 7, "cpu").transpose(1, 2)
        k, v = (torch.nested.nested_tensor_from_jagged(t.transpose(1, 2).values(), q.transpose(1, 2).offsets())
                .transpose(1, 2) for t in (k, v))
    elif what == "causal_lengths_differ":
        k, v = (_jagged((4, 1), 2, 4, s, "cpu").transpose(1, 2) for s in (8, 9))
        kw["is_causal"] = True
    elif what == "sinks":
        kw["sinks"] = torch.zeros(2)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        llmkernels.scaled_dot_product_attention(q, k, v, backend="reference", **kw)


def test_router_runs_jagged_calls_and_counts_the_fallbacks():
    """Routed: a jagged call becomes llmkernels' nested path (counted under its backend) with PyTorch's result.
    Fallbacks: an attn_mask (PyTorch raises its own error) and a strided nested tensor (a subclass)."""
    q, k, v = _three((3, 4, 1))
    with torch.no_grad():
        expected = F.scaled_dot_product_attention(q, k, v)
    llmkernels.reset_routing_stats()
    with llmkernels.route_sdpa(backend="reference") as stats:
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v)
        with pytest.raises(ValueError, match="Masks are not yet supported"):
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool))
        strided = [torch.nested.nested_tensor([torch.randn(2, 3, 4), torch.randn(2, 5, 4)]) for _ in range(3)]
        F.scaled_dot_product_attention(*strided)
    assert stats.routed == {"reference": 1}
    from llmkernels.integrations import sdpa_routing as sr
    assert stats.fallback == {sr.REASON_CONTRACT: 1, sr.REASON_SUBCLASS: 1}
    assert out.is_nested and out.size(2) == q.size(2)
    torch.testing.assert_close(out.values(), expected.values(), rtol=1e-5, atol=1e-6)
