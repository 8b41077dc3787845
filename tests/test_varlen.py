"""Packed variable-length attention (issue 10): ``llmkernels.varlen_attention`` on the Triton kernels' VARLEN mode
(the interpreter here, the GPU on a GPU machine) and on the reference backend, against the per-sequence float64
reference under the tolerance rule (tests/tolerance.py): output, lse and every gradient (q, k, v, the lse's
gradient flowing in too). Outputs are NaN-poisoned (conftest.py); the inputs sit inside NaN guard rows, and the
neighbours of a sequence are NaN-filled in one test, so a read outside a sequence's own rows shows. In the
interpreter the tiles are 16 x 16, so the lengths below cross block edges and sequence starts fall mid-block.
"""

import pytest
import torch

import llmkernels
from llmkernels import dispatch, reference, varlen as varlen_module
from llmkernels.triton_kernels.attention import varlen_launch
from tolerance import assert_by_rule

from conftest import INTERPRETING

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRITON_RUNS = INTERPRETING or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton's interpreter or a CUDA GPU")


def _cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _guarded(t: torch.Tensor) -> torch.Tensor:
    """t inside a buffer with a NaN row before and after it: a kernel reading row -1 or row T gets NaN."""
    buf = torch.full((t.shape[0] + 2, *t.shape[1:]), float("nan"), dtype=t.dtype, device=t.device)
    buf[1:-1] = t
    return buf[1:-1]


def _inputs(lens_q, lens_k, Hq, Hkv, E, Ev, dtype, device, seed, packed=False):
    """q (Tq, Hq, E), k, v (Tk, Hkv, E / Ev). ``packed``: slices of one (T, Hq*E + Hkv*E + Hkv*Ev) projection (the
    self-attention case, lens_q == lens_k), so q, k, v are non-contiguous views with a row stride of the whole
    projection."""
    g = torch.Generator().manual_seed(seed)
    Tq, Tk = sum(lens_q), sum(lens_k)
    if packed:
        assert lens_q == lens_k and E == Ev
        proj = torch.randn(Tq, (Hq + 2 * Hkv) * E, generator=g).to(device, dtype)
        proj = _guarded(proj)
        q = proj[:, :Hq * E].unflatten(1, (Hq, E))
        k = proj[:, Hq * E:(Hq + Hkv) * E].unflatten(1, (Hkv, E))
        v = proj[:, (Hq + Hkv) * E:].unflatten(1, (Hkv, E))
        return q, k, v, g
    q = _guarded(torch.randn(Tq, Hq, E, generator=g).to(device, dtype))
    k = _guarded(torch.randn(Tk, Hkv, E, generator=g).to(device, dtype))
    v = _guarded(torch.randn(Tk, Hkv, Ev, generator=g).to(device, dtype))
    return q, k, v, g


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grads(out, lse, ins, grad_out, grad_lse):
    return list(torch.autograd.grad([out, lse], ins, [grad_out.to(out.dtype), grad_lse.to(lse.dtype)]))


def check_varlen(backend, q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p=0.0, seed=0, **variant):
    """Run ours and the references on the same values; assert the tolerance rule on out, lse, dq, dk, dv.
    Ours gets the views themselves (leaves made of the packed views keep their strides); with dropout the
    rng_state ours drew is captured and the kernels' keep pattern handed to the references."""
    dtype = q.dtype
    drawn = {}
    original = varlen_module._new_rng_state

    def capture(device):
        drawn["state"] = original(device)
        return drawn["state"]

    # detach() keeps each view on its storage (the NaN guard rows, the packed projection): leaves, not copies
    ours_in = [t.detach().requires_grad_(True) for t in (q, k, v)]
    varlen_module._new_rng_state = capture
    try:
        out, lse = llmkernels.varlen_attention(*ours_in, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p,
                                               return_lse=True, backend=backend, **variant)
    finally:
        varlen_module._new_rng_state = original
    keeps = None
    if dropout_p > 0.0:
        keeps = varlen_launch.varlen_dropout_keep_mask(drawn["state"], cu_q, cu_k, q.shape[1], dropout_p)
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=gen).to(q.device)
    grad_lse = torch.randn(lse.shape, generator=gen).to(q.device)
    ours_grads = _grads(out, lse, ours_in, grad_out, grad_lse)

    def run_reference(cast, compute_dtype):
        ins = [_leaf(t.to(cast)) for t in (q, k, v)]
        ref_variant = dict(variant)
        if variant.get("alibi_slopes") is not None and cast == torch.float64:
            ref_variant["alibi_slopes"] = variant["alibi_slopes"].to(torch.float64)
        o, l = reference.varlen_attention(*ins, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, return_lse=True,
                                          dropout_masks=keeps, compute_dtype=compute_dtype, **ref_variant)
        return o, l, _grads(o, l, ins, grad_out, grad_lse)

    ref = run_reference(torch.float64, torch.float64)
    naive = run_reference(dtype, None)
    assert out.dtype == dtype and out.shape == (q.shape[0], q.shape[1], v.shape[2]) and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[1], q.shape[0])
    assert_by_rule("out", out, ref[0], naive[0], dtype)
    assert_by_rule("lse", lse, ref[1], naive[1], dtype)
    for name, ours_g, ref_g, naive_g, like in zip(("dq", "dk", "dv"), ours_grads, ref[2], naive[2], (q, k, v)):
        assert ours_g.dtype == dtype and ours_g.shape == like.shape, name
        assert_by_rule(name, ours_g, ref_g, naive_g, dtype)
    return out, lse, ours_grads, ours_in


# name: (dtype, lens_q, lens_k (None: = lens_q), Hq, Hkv, E, Ev, dropout_p, packed, variant kwargs);
# "alibi": (B, Hq) slopes, "alibi_h": (Hq,) slopes. Each case shows something the others do not.
CASES = {
    # lengths 0, 1, odd, one across several blocks; GQA; head dim 24 (padded to 32 on chip)
    "mixed_lengths_gqa_fp16": ("fp16", [0, 1, 17, 5, 40], None, 4, 2, 24, 24, 0.0, False, {}),
    # one long sequence with many short ones, causal (bf16: the interpreter's bf16 dot fix)
    "causal_one_long_many_short_bf16": ("bf16", [50, 1, 3, 2, 7, 1, 4, 1], None, 2, 1, 16, 16, 0.0, False,
                                        dict(is_causal=True)),
    # Lq != Lk per sequence both ways (more queries than keys: leading rows output 0, lse -inf), a sequence
    # with queries but no keys and one with keys but no queries, E != Ev
    "causal_Lq!=Lk_fp32": ("fp32", [7, 20, 1, 0, 9, 3], [19, 5, 3, 4, 0, 3], 2, 2, 16, 24, 0.0, False,
                           dict(is_causal=True)),
    # two-sided window + softcap (small cap, a leak would show) + ALiBi (B, Hq), Lq != Lk, not causal
    "window_softcap_alibi_BH_fp16": ("fp16", [23, 9, 30], [30, 9, 18], 2, 1, 16, 16, 0.0, False,
                                     dict(window_size=(5, 2), softcap=1.0, alibi="alibi")),
    # causal sliding window + ALiBi (Hq,), fp32
    "causal_window_alibi_H_fp32": ("fp32", [33, 2, 18], [40, 2, 18], 4, 2, 16, 16, 0.0, False,
                                   dict(is_causal=True, window_size=(4, -1), alibi="alibi_h")),
    # dropout, exact against the kernels' keep pattern, GQA, causal with Lq != Lk
    "dropout_causal_gqa_fp16": ("fp16", [13, 0, 21], [17, 4, 21], 4, 2, 16, 16, 0.3, False, dict(is_causal=True)),
    # q, k, v as non-contiguous slices of one packed QKV projection
    "packed_qkv_slices_causal_fp16": ("fp16", [9, 26, 1], None, 2, 1, 32, 32, 0.0, True, dict(is_causal=True)),
}


def _variant(kw, B, Hq, g, device):
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = (torch.rand((B, Hq) if alibi == "alibi" else (Hq,), generator=g) * 0.5).to(device)
    return kw


def _case_inputs(name, device):
    dt, lens_q, lens_k, Hq, Hkv, E, Ev, dropout_p, packed, kw = CASES[name]
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v, g = _inputs(lens_q, lens_k, Hq, Hkv, E, Ev, DTYPES[dt], device, seed=sum(lens_q) * 7 + E, packed=packed)
    kw = _variant(kw, len(lens_q), Hq, g, device)
    return q, k, v, _cu(lens_q, device), _cu(lens_k, device), max(lens_q), max(lens_k), dropout_p, kw


@needs_triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_varlen_matches_float64_reference(name, device):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, kw = _case_inputs(name, device)
    out, lse, _, ours_in = check_varlen("triton", q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, **kw)
    if CASES[name][8]:
        # the packed slices reached the kernels as they were: no copy
        assert all(a.data_ptr() == b.data_ptr() and a.stride() == b.stride() for a, b in zip(ours_in, (q, k, v)))
    if name == "causal_Lq!=Lk_fp32":
        # sequence 1 (20 queries, 5 keys): bottom-right, its first 15 rows see nothing: output 0, lse -inf
        rows = slice(7, 7 + 15)
        assert torch.equal(out[rows], torch.zeros_like(out[rows]))
        assert torch.isneginf(lse[:, rows]).all() and torch.isfinite(lse[:, 22:27]).all()


def test_reference_backend_matches_float64_reference(device):
    q, k, v, cu_q, cu_k, max_q, max_k, _, kw = _case_inputs("window_softcap_alibi_BH_fp16", device)
    check_varlen("reference", q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    q, k, v, cu_q, cu_k, max_q, max_k, _, kw = _case_inputs("causal_Lq!=Lk_fp32", device)
    check_varlen("reference", q, k, v, cu_q, cu_k, max_q, max_k, **kw)


@needs_triton
def test_alibi_rows_far_from_every_key_take_the_per_sequence_dense_backward(device, monkeypatch):
    """ALiBi rows far from every key (more queries than keys, steep slopes) have |lse| > 2048, where fp32
    exp(s - lse) loses the weights: the backward runs densely per sequence, with the kernels' keep pattern."""
    calls = []
    original = varlen_launch._dense_backward_per_sequence

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(varlen_launch, "_dense_backward_per_sequence", spy)
    lens_q, lens_k = [40, 7], [3, 9]
    q, k, v, g = _inputs(lens_q, lens_k, 2, 1, 16, 16, torch.float32, device, seed=9)
    slopes = torch.tensor([[100.0, 60.0], [0.3, 0.5]], device=device)
    check_varlen("triton", q, k, v, _cu(lens_q, device), _cu(lens_k, device), 40, 9, alibi_slopes=slopes,
                 dropout_p=0.25)
    assert calls == [1]


@needs_triton
def test_varlen_equals_dense_op_per_sequence(device):
    """Each sequence of a varlen call equals the dense op on that sequence alone (bottom-right), gradients too."""
    lens_q, lens_k = [21, 4, 0, 35], [18, 9, 3, 35]
    Hq, Hkv, E = 2, 1, 16
    q, k, v, g = _inputs(lens_q, lens_k, Hq, Hkv, E, E, torch.float32, device, seed=3)
    slopes = (torch.rand(len(lens_q), Hq, generator=g) * 0.3).to(device)
    kw = dict(is_causal=True, window_size=(7, -1), softcap=2.0)
    ins = [_leaf(t) for t in (q, k, v)]
    out, lse = llmkernels.varlen_attention(*ins, _cu(lens_q, device), _cu(lens_k, device), 35, 35,
                                           alibi_slopes=slopes, return_lse=True, backend="triton", **kw)
    grad_out = torch.randn(out.shape, generator=g).to(device)
    grads = torch.autograd.grad(out, ins, grad_out)
    cq, ck = _cu(lens_q, device).tolist(), _cu(lens_k, device).tolist()
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        dense_in = [_leaf(t[rows].transpose(0, 1).unsqueeze(0)) for t, rows in ((q, rq), (k, rk), (v, rk))]
        o, l = llmkernels.scaled_dot_product_attention(*dense_in, enable_gqa=True, causal_alignment="bottom_right",
                                                       alibi_slopes=slopes[b], return_lse=True, backend="triton",
                                                       **kw)
        dense_grads = torch.autograd.grad(o, dense_in, grad_out[rq].transpose(0, 1).unsqueeze(0))
        torch.testing.assert_close(out[rq], o[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(lse[:, rq], l[0], rtol=1e-5, atol=1e-6)
        for ours, dense, rows in zip(grads, dense_grads, (rq, rk, rk)):
            torch.testing.assert_close(ours[rows], dense[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


@needs_triton
def test_neighbouring_sequences_are_never_read(device):
    """NaN in every other sequence's q, k and v rows (and the guard rows around the tensors) leaves the other
    sequences' outputs and gradients exactly as with clean neighbours."""
    lens = [12, 19, 1, 16, 30, 5]
    q, k, v, g = _inputs(lens, lens, 2, 2, 16, 16, torch.float16, device, seed=11)
    cu = _cu(lens, device)
    poisoned = [t.clone() for t in (q, k, v)]
    cuts = cu.tolist()
    for b in range(0, len(lens), 2):
        for t in poisoned:
            t[cuts[b]:cuts[b + 1]] = float("nan")
    grad_out = torch.randn(q.shape, generator=g).to(device, torch.float16)
    results = []
    for inputs in ((q, k, v), poisoned):
        ins = [_guarded(t).detach().requires_grad_(True) for t in inputs]
        out = llmkernels.varlen_attention(*ins, cu, cu, 30, 30, is_causal=True, backend="triton")
        results.append((out, *torch.autograd.grad(out, ins, grad_out)))
    for b in range(1, len(lens), 2):
        rows = slice(cuts[b], cuts[b + 1])
        for clean, dirty in zip(*results):
            assert torch.equal(clean[rows], dirty[rows]), b
    for b in range(0, len(lens), 2):
        assert torch.isnan(results[1][0][cuts[b]:cuts[b + 1]]).all()  # NaN propagates inside its own sequence


@needs_triton
def test_dropout_keep_pattern_is_the_kernels_and_dropout_one_gives_zeros(device):
    lens_q, lens_k = [5, 18], [9, 18]
    q, k, v, _ = _inputs(lens_q, lens_k, 2, 1, 16, 16, torch.float32, device, seed=5)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    rng = torch.tensor([77, 12345], dtype=torch.int64, device=device)
    keeps = varlen_launch.varlen_dropout_keep_mask(rng, cu_q, cu_k, 2, 0.4)
    assert [tuple(t.shape) for t in keeps] == [(2, 5, 9), (2, 18, 18)]
    frac = torch.cat([t.flatten() for t in keeps]).float().mean().item()
    assert 0.45 < frac < 0.75
    # The pattern is the dense op's for the whole (Hq, Tq, Tk) matrix as one batch, cut to the diagonal blocks.
    from llmkernels.triton_kernels.attention import dropout_keep_mask
    full = dropout_keep_mask(rng, 1, 2, 23, 27, 0.4, device)[0]
    assert torch.equal(keeps[0], full[:, :5, :9]) and torch.equal(keeps[1], full[:, 5:, 9:])
    out = llmkernels.varlen_attention(_leaf(q), k, v, cu_q, cu_k, 18, 18, dropout_p=1.0, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


@needs_triton
def test_strided_cu_seqlens_are_read_by_their_strides(device):
    q, k, v, _ = _inputs([4, 5], [4, 5], 2, 2, 16, 16, torch.float32, device, seed=4)
    cu = _cu([4, 5], device)
    strided = torch.stack([cu, torch.full_like(cu, 1000)], 1).flatten()[::2]  # [0, 4, 9] with stride 2
    assert strided.stride() == (2,) and torch.equal(strided, cu)
    expected = llmkernels.varlen_attention(q, k, v, cu, cu, 5, 5, is_causal=True, backend="triton")
    got = llmkernels.varlen_attention(q, k, v, strided, strided, 5, 5, is_causal=True, backend="triton")
    assert torch.equal(got, expected)


def test_empty_inputs_and_zero_length_sequences(device):
    for backend in ["reference"] + (["triton"] if TRITON_RUNS else []):
        q, k, v, _ = _inputs([0, 0], [3, 0], 2, 1, 8, 8, torch.float32, device, seed=0)
        ins = [_leaf(t) for t in (q, k, v)]
        out, lse = llmkernels.varlen_attention(*ins, _cu([0, 0], device), _cu([3, 0], device), 0, 3,
                                               return_lse=True, backend=backend)
        assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
        grads = torch.autograd.grad(out.sum(), ins)
        assert [tuple(t.shape) for t in grads] == [(0, 2, 8), (3, 1, 8), (3, 1, 8)]
        assert all(torch.equal(t, torch.zeros_like(t)) for t in grads)
        # queries but no keys anywhere: output 0, lse -inf
        q, k, v, _ = _inputs([4], [0], 2, 1, 8, 8, torch.float32, device, seed=0)
        out, lse = llmkernels.varlen_attention(q, k, v, _cu([4], device), _cu([0], device), 4, 0, return_lse=True,
                                               backend=backend)
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


# ------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, dispatch


def _op_sample(device, dropout=False, rule=False):
    lens_q, lens_k = [6, 0, 11], [9, 2, 11]
    q, k, v, g = _inputs(lens_q, lens_k, 2, 1, 16, 8, torch.float32, device, seed=2)
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    rng = torch.tensor([5, 0], dtype=torch.int64, device=device) if dropout else None
    slopes = (torch.rand(3, 2, generator=g) * 0.2).to(device) if rule else None
    window = (3, -1) if rule else (-1, -1)
    return (q, k, v, _cu(lens_q, device), _cu(lens_k, device), 11, 11, 0.2 if dropout else 0.0, True, 0.3, rng,
            *window, 1.5 if rule else 0.0, slopes, False)


RUNNABLE = ["reference"] + (["triton"] if TRITON_RUNS else [])


@pytest.mark.parametrize("backend", RUNNABLE)
def test_opcheck_varlen_ops(backend, device):
    for sample in (_op_sample(device), _op_sample(device, dropout=True, rule=True)):
        torch.library.opcheck(varlen_module.varlen_forward, (*sample, backend))
    q, k, v, cu_q, cu_k, mq, mk, p, causal, scale, rng, wl, wr, cap, slopes, _ = _op_sample(device, rule=True)
    out, lse = varlen_module.varlen_forward(q, k, v, cu_q, cu_k, mq, mk, p, causal, scale, rng, wl, wr, cap, slopes,
                                            False, backend)
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(out.shape, generator=g).to(device)
    grad_lse = torch.randn(lse.shape, generator=g).to(device)
    torch.library.opcheck(varlen_module.varlen_backward,
                          (grad_out, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), grad_lse, cu_q,
                           cu_k, mq, mk, p, causal, scale, rng, wl, wr, cap, slopes, backend))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_compile_fullgraph_forward_and_backward(backend, device):
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, mq, mk, *_ = _op_sample(device)

    def f(q, k, v, cu_q, cu_k):
        out, lse = llmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, is_causal=True, return_lse=True,
                                               backend=backend)
        return (out * out).sum() + lse.masked_fill(lse.isinf(), 0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss = compiled(q, k, v, cu_q, cu_k)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_loss = f(q, k, v, cu_q, cu_k)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # bad values still raise under compile (the op checks them at run time for CPU tensors)
    if device == "cpu":
        with pytest.raises(ValueError, match="cu_seqlens_k must end with"):
            compiled(q, k, v, cu_q, cu_k - torch.tensor([0, 0, 0, 1], dtype=torch.int32))


def test_dispatch_cuda_declines_and_auto_picks_a_runnable_backend(device):
    q, k, v, cu_q, cu_k, mq, mk, *_ = _op_sample(device)
    a = varlen_module.check_varlen_attention(q, k, v, cu_q, cu_k, mq, mk)
    reasons = dispatch.varlen_not_supported_reasons(a)
    assert any("varlen" in r for r in reasons["cuda"])
    assert reasons["reference"] == []
    chosen = dispatch.choose_varlen_backend(a)
    assert chosen == ("triton" if TRITON_RUNS else "reference")
    with pytest.raises(dispatch.NotSupportedError, match="not implemented in the CUDA C"):
        llmkernels.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend="cuda")


# ------------------------------------------------------------------------------------------------------------
# bad input: each error names the argument, before any kernel


def _bad_cases(device):
    q = torch.randn(9, 4, 8, device=device)
    k = torch.randn(7, 2, 8, device=device)
    v = torch.randn(7, 2, 6, device=device)
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    base = dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=4)
    i32 = dict(dtype=torch.int32, device=device)
    return base, [
        (dict(cu_seqlens_q=cu_q.long()), TypeError, "cu_seqlens_q must have dtype int32"),
        (dict(cu_seqlens_k=cu_k.float()), TypeError, "cu_seqlens_k must have dtype int32"),
        (dict(cu_seqlens_q=[0, 4, 9]), TypeError, "cu_seqlens_q must be an int32 torch.Tensor"),
        (dict(cu_seqlens_q=cu_q.view(1, 3)), ValueError, "cu_seqlens_q must be 1-D"),
        (dict(cu_seqlens_k=torch.tensor([0, 7], **i32)), ValueError, "cu_seqlens_q has 3 entries and cu_seqlens_k 2"),
        (dict(cu_seqlens_q=torch.tensor([1, 4, 9], **i32)), ValueError, "cu_seqlens_q must start with 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 4, 8], **i32)), ValueError, r"cu_seqlens_q must end with .* \(9\)"),
        (dict(cu_seqlens_k=torch.tensor([0, 3, 8], **i32)), ValueError, r"cu_seqlens_k must end with .* \(7\)"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 5, 9], **i32), cu_seqlens_k=torch.tensor([0, 3, 5, 7], **i32)),
         ValueError, "cu_seqlens_q must be non-decreasing"),
        (dict(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is below the longest query sequence"),
        (dict(max_seqlen_k=3.0), TypeError, "max_seqlen_k must be a Python int"),
        (dict(max_seqlen_q=True), TypeError, "max_seqlen_q must be a Python int"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
        (dict(key=torch.randn(7, 3, 8, device=device), value=torch.randn(7, 3, 6, device=device)), ValueError,
         "query heads must be a positive multiple"),
        (dict(value=torch.randn(7, 1, 6, device=device)), ValueError,
         "key and value must have the same number of heads"),
        (dict(key=torch.randn(7, 2, 5, device=device)), ValueError, "same head dim"),
        (dict(value=torch.randn(6, 2, 6, device=device)), ValueError, "same number of tokens"),
        (dict(query=q.unsqueeze(0)), ValueError, "query must be 3-D"),
        (dict(key=k.half()), TypeError, "share one dtype"),
        (dict(query=q.long()), TypeError, "query has dtype"),
        (dict(alibi_slopes=torch.rand(3, 4, device=device)), ValueError, r"alibi_slopes of shape \(3, 4\)"),
        (dict(alibi_slopes=torch.rand(4, device=device).double()), TypeError, "alibi_slopes has dtype"),
        (dict(window_size=(2, 1), is_causal=True), ValueError, "contradicts is_causal"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
        (dict(validate=1), TypeError, "validate must be a bool"),
        (dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    ]


def test_each_bad_input_raises_naming_the_argument(device, monkeypatch):
    # No kernel and no backend may run for any of these.
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before validation")

    for backend in dispatch.BACKENDS.values():
        monkeypatch.setattr(backend, "varlen_forward", no_kernel)
    base, cases = _bad_cases(device)
    for change, error, message in cases:
        kwargs = {**base, **change}
        with pytest.raises(error, match=message):
            llmkernels.varlen_attention(**kwargs)
    cpu_ints = torch.tensor([0, 4, 9], dtype=torch.int32)
    if device != "cpu":
        with pytest.raises(ValueError, match="cu_seqlens_q is on cpu"):
            llmkernels.varlen_attention(**{**base, "cu_seqlens_q": cpu_ints})


def test_cpu_values_are_checked_without_validate_and_the_positional_order_is_varlen_attn():
    q = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_seqlen_q=2 is below"):
        llmkernels.varlen_attention(q, q, q, cu, cu, 2, 3, validate=False, backend="reference")
    # torch.nn.attention.varlen.varlen_attn's order: query, key, value, cu_seq_q, cu_seq_k, max_q, max_k
    out = llmkernels.varlen_attention(q, q, q, cu, cu, 3, 3, is_causal=True, backend="reference")
    expected = reference.varlen_attention(q, q, q, cu, cu, 3, 3, is_causal=True)
    torch.testing.assert_close(out, expected)
