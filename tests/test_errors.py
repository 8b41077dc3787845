"""Bad input gets a clear error before any kernel runs; edge values (NaN, inf, empty tensors) behave as PyTorch.

Every error case checks the exception type and its message (which must name the argument and say what was
wrong), with every backend's kernels replaced by a tripwire, so an error raised from inside a kernel (or a
kernel that runs at all) fails the case.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import llmkernels
from llmkernels import dispatch, reference
from llmkernels.nn import SelfAttention
from runnable import default_dispatch
from tolerance import assert_by_rule

B, H, L, S, E = 2, 4, 5, 7, 8


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _qkv(dtype=torch.float32):
    return _t(B, H, L, E, dtype=dtype), _t(B, H, S, E, dtype=dtype), _t(B, H, S, E, dtype=dtype)


def sdpa(*args, **kwargs):
    return llmkernels.scaled_dot_product_attention(*args, **kwargs)


@pytest.fixture
def no_kernel_runs(monkeypatch):
    """Replace every backend's entry points by a tripwire for the duration of a test."""
    def tripwire(backend, method):
        def run(*args, **kwargs):
            raise AssertionError(f"{backend}.{method} ran although the inputs are invalid")
        return run

    for name, backend in dispatch.BACKENDS.items():
        for method in ("attention_forward", "attention_backward", "softmax_forward", "softmax_backward"):
            monkeypatch.setattr(backend, method, tripwire(name, method))


q0, k0, v0 = _qkv()

# (id, call, exception type, message regex). Each message names the argument at fault.
ATTENTION_CASES = [
    ("query_not_tensor", lambda: sdpa([1.0], k0, v0), TypeError, r"query must be a torch.Tensor, got list"),
    ("int_dtype", lambda: sdpa(q0.long(), k0, v0), TypeError, r"query has dtype torch.int64; supported dtypes"),
    ("float64", lambda: sdpa(q0, k0.double(), v0.double()), TypeError, r"key has dtype torch.float64"),
    ("mixed_dtypes", lambda: sdpa(q0, k0.half(), v0), TypeError,
     r"query, key and value must share one dtype, got torch.float32, torch.float16"),
    ("mixed_devices", lambda: sdpa(q0, k0.to("meta"), v0), ValueError,
     r"query, key and value must be on one device, got cpu, meta, cpu"),
    ("rank_1", lambda: sdpa(q0[0, 0, 0], k0, v0), ValueError, r"query must have at least 2 dims"),
    ("head_dims_differ", lambda: sdpa(q0, k0[..., :5], v0), ValueError,
     r"query and key must have the same head dim, got query 8 and key 5"),
    ("head_dim_zero", lambda: sdpa(q0[..., :0], k0[..., :0], v0), ValueError, r"head dim 0"),
    ("seq_lens_differ", lambda: sdpa(q0, k0, v0[:, :, :3]), ValueError,
     r"key and value must have the same sequence length, got key 7 and value 3"),
    ("kv_heads_differ", lambda: sdpa(q0, k0[:, :2], v0), ValueError,
     r"key has 2 heads and value 4; they must be equal or one of them 1 \(broadcast\)"),
    ("gqa_not_multiple", lambda: sdpa(q0, k0[:, :3], v0[:, :3], enable_gqa=True), ValueError,
     r"with enable_gqa=True the query heads \(4\) must be a multiple of the key heads \(3\)"),
    ("gqa_value_not_multiple", lambda: sdpa(q0, k0[:, :2], v0[:, :3], enable_gqa=True), ValueError,
     r"with enable_gqa=True the query heads \(4\) must be a multiple of the value heads \(3\)"),
    ("gqa_query_single_head", lambda: sdpa(q0[:, :1], k0[:, :2], v0[:, :2], enable_gqa=True), ValueError,
     r"with enable_gqa=True the query heads \(1\) must be a multiple of the key heads \(2\)"),
    ("gqa_not_enabled", lambda: sdpa(q0, k0[:, :2], v0[:, :2]), ValueError,
     r"query has 4 heads but key/value have 2; pass enable_gqa=True"),
    ("heads_not_broadcast", lambda: sdpa(q0[:, :2], k0[:, :3], v0[:, :3]), ValueError,
     r"query has 2 heads but key/value have 3; head counts must be equal or 1 \(broadcast\)"),
    ("batch_ranks_not_broadcast", lambda: sdpa(q0.expand(3, B, H, L, E), k0[:1].expand(4, 1, H, S, E), v0), ValueError,
     r"the batch dims of query \(3, 2\), key \(4, 1\) and value \(2,\) do not broadcast"),
    ("batch_not_broadcast", lambda: sdpa(q0, k0[:1].expand(3, H, S, E), v0[:1].expand(3, H, S, E)), ValueError,
     r"the batch dims of query \(2,\), key \(3,\) and value \(3,\) do not broadcast"),
    ("mask_shape", lambda: sdpa(q0, k0, v0, attn_mask=torch.ones(L, S + 1, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(5, 8\) does not broadcast to \(\.\.\., Hq, L, S\) = \(2, 4, 5, 7\)"),
    ("mask_too_big", lambda: sdpa(q0, k0, v0, attn_mask=torch.ones(3, B, H, L, S, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(3, 2, 4, 5, 7\) does not broadcast"),
    ("mask_int_dtype", lambda: sdpa(q0, k0, v0, attn_mask=torch.ones(L, S, dtype=torch.int32)), TypeError,
     r"attn_mask must be a bool tensor \(True = keep\) or a floating-point tensor \(added\), got dtype torch.int32"),
    ("mask_device", lambda: sdpa(q0, k0, v0, attn_mask=torch.ones(L, S, device="meta")), ValueError,
     r"attn_mask is on meta but the inputs are on cpu"),
    ("mask_not_tensor", lambda: sdpa(q0, k0, v0, attn_mask=[[True]]), TypeError,
     r"attn_mask must be a torch.Tensor, got list"),
    ("dropout_negative", lambda: sdpa(q0, k0, v0, dropout_p=-0.1), ValueError,
     r"dropout_p must be a float in \[0, 1\], got -0.1"),
    ("dropout_above_one", lambda: sdpa(q0, k0, v0, dropout_p=1.5), ValueError,
     r"dropout_p must be a float in \[0, 1\], got 1.5"),
    ("dropout_nan", lambda: sdpa(q0, k0, v0, dropout_p=math.nan), ValueError, r"dropout_p .* got nan"),
    ("dropout_bool", lambda: sdpa(q0, k0, v0, dropout_p=True), ValueError, r"dropout_p .* got True"),
    ("scale_nan", lambda: sdpa(q0, k0, v0, scale=math.nan), ValueError, r"scale must be finite, got nan"),
    ("scale_inf", lambda: sdpa(q0, k0, v0, scale=-math.inf), ValueError, r"scale must be finite, got -inf"),
    ("scale_str", lambda: sdpa(q0, k0, v0, scale="0.1"), TypeError,
     r"scale must be a real number or a 0-d tensor, got str"),
    ("scale_bool", lambda: sdpa(q0, k0, v0, scale=True), TypeError,
     r"scale must be a real number or a 0-d tensor, got bool"),
    ("scale_1d_tensor", lambda: sdpa(q0, k0, v0, scale=torch.tensor([0.5])), TypeError,
     r"scale must be a real number or a 0-d tensor, got a tensor of shape \(1,\)"),
    ("scale_bool_tensor", lambda: sdpa(q0, k0, v0, scale=torch.tensor(True)), TypeError,
     r"scale must be a real number or a 0-d real tensor, got a tensor of dtype torch.bool"),
    ("scale_complex_tensor", lambda: sdpa(q0, k0, v0, scale=torch.tensor(0.5 + 1j)), TypeError,
     r"scale must be a real number or a 0-d real tensor, got a tensor of dtype torch.complex64"),
    ("scale_tensor_requires_grad", lambda: sdpa(q0, k0, v0, scale=torch.tensor(0.5, requires_grad=True)), ValueError,
     r"scale is a tensor that requires grad; llmkernels takes scale as a constant"),
    ("scale_tensor_nan", lambda: sdpa(q0, k0, v0, scale=torch.tensor(math.nan)), ValueError,
     r"scale must be finite, got nan"),
    ("scale_meta_tensor", lambda: sdpa(q0, k0, v0, scale=torch.tensor(0.5, device="meta")), ValueError,
     r"scale is a meta tensor, which has no value"),
    ("is_causal_int", lambda: sdpa(q0, k0, v0, is_causal=1), TypeError, r"is_causal must be a bool, got int"),
    ("enable_gqa_str", lambda: sdpa(q0, k0, v0, enable_gqa="yes"), TypeError, r"enable_gqa must be a bool, got str"),
    ("return_lse_none", lambda: sdpa(q0, k0, v0, return_lse=None), TypeError,
     r"return_lse must be a bool, got NoneType"),
    # jagged nested tensors (B, H, j, E) run on varlen_attention (tests/test_nested.py); the strided layout not
    ("nested_strided", lambda: sdpa(*[torch.nested.nested_tensor([_t(H, 3, E), _t(H, 4, E)])] * 3),
     TypeError, r"query is a nested tensor with layout torch.strided; llmkernels takes nested tensors with "
                r"layout=torch.jagged only"),
    ("sparse", lambda: sdpa(q0[0, 0].to_sparse(), k0[0, 0], v0[0, 0]), TypeError,
     r"query has layout torch.sparse_coo; llmkernels takes dense \(torch.strided\) tensors"),
    ("unknown_backend", lambda: sdpa(q0, k0, v0, backend="tpu"), ValueError,
     r"backend must be one of \('auto', 'triton', 'cuda', 'reference'\) or None, got 'tpu'"),
    ("cuda_backend_cpu_tensors", lambda: sdpa(q0, k0, v0, backend="cuda"), llmkernels.NotSupportedError,
     r"backend 'cuda' does not support these attention inputs:\n  cuda: runs on CUDA tensors only, got a cpu tensor"),
    ("triton_head_dim_too_large", lambda: sdpa(*(_t(1, 1, 3, 300) for _ in range(3)), backend="triton"),
     llmkernels.NotSupportedError, r"(?s)backend 'triton' does not support .*head dims up to 256, got E=300, Ev=300"),
]

_bias = torch.nn.attention.bias
# The variant arguments of issue 14 (q0: (2, 4, 5, 8), k0/v0: (2, 4, 7, 8)).
VARIANT_CASES = [
    ("window_not_pair", lambda: sdpa(q0, k0, v0, window_size=3), TypeError,
     r"window_size must be a tuple or list of two ints \(left, right\), got 3"),
    ("window_three", lambda: sdpa(q0, k0, v0, window_size=(1, 2, 3)), TypeError,
     r"window_size must be a tuple or list of two ints"),
    ("window_bool", lambda: sdpa(q0, k0, v0, window_size=(True, 0)), TypeError,
     r"window_size .* its left side is bool True"),
    ("window_float", lambda: sdpa(q0, k0, v0, window_size=(2, 1.0)), TypeError,
     r"window_size .* its right side is float 1.0"),
    ("window_below_minus_one", lambda: sdpa(q0, k0, v0, window_size=(-2, 0)), ValueError,
     r"window_size left side must be >= -1 \(-1 = unbounded\), got -2"),
    ("window_right_with_causal", lambda: sdpa(q0, k0, v0, is_causal=True, window_size=(2, 1)), ValueError,
     r"window_size right side 1 > 0 contradicts is_causal=True"),
    ("window_right_with_causal_bias", lambda: sdpa(q0, k0, v0, _bias.causal_lower_right(L, S), window_size=(-1, 2)),
     ValueError, r"window_size right side 2 > 0 contradicts a CausalBias attn_mask"),
    ("alignment_name", lambda: sdpa(q0, k0, v0, causal_alignment="lower_right"), ValueError,
     r"causal_alignment must be None, 'top_left' or 'bottom_right', got 'lower_right'"),
    ("alignment_bool", lambda: sdpa(q0, k0, v0, causal_alignment=True), ValueError,
     r"causal_alignment must be None, 'top_left' or 'bottom_right', got True"),
    ("softcap_negative", lambda: sdpa(q0, k0, v0, softcap=-1.0), ValueError,
     r"softcap must be a finite number >= 0 \(0 = off\), got -1.0"),
    ("softcap_nan", lambda: sdpa(q0, k0, v0, softcap=math.nan), ValueError, r"softcap must be .* got nan"),
    ("softcap_inf", lambda: sdpa(q0, k0, v0, softcap=math.inf), ValueError, r"softcap must be .* got inf"),
    ("softcap_str", lambda: sdpa(q0, k0, v0, softcap="30"), TypeError,
     r"softcap must be a real number or a 0-d tensor, got str"),
    ("softcap_bool", lambda: sdpa(q0, k0, v0, softcap=True), TypeError,
     r"softcap must be a real number or a 0-d tensor, got bool"),
    ("alibi_not_tensor", lambda: sdpa(q0, k0, v0, alibi_slopes=[0.5] * H), TypeError,
     r"alibi_slopes must be a torch.Tensor, got list"),
    ("alibi_shape", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.rand(H + 1)), ValueError,
     r"alibi_slopes of shape \(5,\) must be \(Hq,\) = \(4,\) or the query's batch dims and heads \(2, 4\)"),
    ("alibi_too_many_dims", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.rand(3, B, H)), ValueError,
     r"alibi_slopes of shape \(3, 2, 4\) must be"),
    ("alibi_scalar", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.tensor(0.5)), ValueError,
     r"alibi_slopes of shape \(\) must be"),
    ("alibi_dtype_half", lambda: sdpa(q0.half(), k0.half(), v0.half(), alibi_slopes=torch.rand(H).half()), TypeError,
     r"alibi_slopes has dtype torch.float16; it must be float32"),
    ("alibi_dtype_float64", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.rand(H).double()), TypeError,
     r"alibi_slopes has dtype torch.float64; it must be float32"),
    ("alibi_device", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.rand(H, device="meta")), ValueError,
     r"alibi_slopes is on meta but the inputs are on cpu"),
    ("alibi_requires_grad", lambda: sdpa(q0, k0, v0, alibi_slopes=torch.rand(H, requires_grad=True)), ValueError,
     r"alibi_slopes requires grad; llmkernels takes the ALiBi slopes as constants"),
    ("sinks_shape", lambda: sdpa(q0, k0, v0, sinks=torch.zeros(B, H)), ValueError,
     r"sinks of shape \(2, 4\) must be \(Hq,\) = \(4,\), one logit per head"),
    ("sinks_broadcast_shape", lambda: sdpa(q0, k0, v0, sinks=torch.zeros(1)), ValueError,
     r"sinks of shape \(1,\) must be \(Hq,\) = \(4,\)"),
    ("sinks_dtype", lambda: sdpa(q0, k0, v0, sinks=torch.zeros(H, dtype=torch.bfloat16)), TypeError,
     r"sinks has dtype torch.bfloat16; it must be float32 \(the inputs' dtype\)"),
    ("sinks_dtype_half_inputs", lambda: sdpa(q0.half(), k0.half(), v0.half(), sinks=torch.zeros(H).double()),
     TypeError, r"sinks has dtype torch.float64; it must be float32 or float16 \(the inputs' dtype\)"),
    ("sinks_int", lambda: sdpa(q0, k0, v0, sinks=torch.zeros(H, dtype=torch.int64)), TypeError,
     r"sinks has dtype torch.int64"),
    ("sinks_device", lambda: sdpa(q0, k0, v0, sinks=torch.zeros(H, device="meta")), ValueError,
     r"sinks is on meta but the inputs are on cpu"),
    ("causal_bias_with_is_causal", lambda: sdpa(q0, k0, v0, _bias.causal_upper_left(L, S), is_causal=True),
     ValueError, r"attn_mask is a CausalBias, which already makes the call causal: do not also pass is_causal=True"),
    ("causal_bias_alignment_conflict",
     lambda: sdpa(q0, k0, v0, _bias.causal_upper_left(L, S), causal_alignment="bottom_right"), ValueError,
     r"causal_alignment='bottom_right' conflicts with the attn_mask CausalBias, which is 'top_left'"),
    ("causal_bias_wrong_L", lambda: sdpa(q0, k0, v0, _bias.causal_lower_right(L + 1, S)), ValueError,
     r"attn_mask is a CausalBias for seq_len_q=6, seq_len_kv=7 but the inputs have L=5 queries and S=7 keys"),
    ("causal_bias_wrong_S", lambda: sdpa(q0, k0, v0, _bias.causal_upper_left(L, S - 1)), ValueError,
     r"attn_mask is a CausalBias for seq_len_q=5, seq_len_kv=6 but the inputs have L=5 queries and S=7 keys"),
    ("reference_alibi_float64_needs_float64_inputs",
     lambda: reference.scaled_dot_product_attention(q0, k0, v0, alibi_slopes=torch.rand(H).double()), TypeError,
     r"alibi_slopes has dtype torch.float64; it must be float32$"),
]

SOFTMAX_CASES = [
    ("input_int", lambda: llmkernels.masked_softmax(torch.ones(3, 4, dtype=torch.int64)), TypeError,
     r"input has dtype torch.int64"),
    ("dim_out_of_range", lambda: llmkernels.masked_softmax(_t(3, 4), dim=2), ValueError,
     r"dim 2 is out of range for input with 2 dims"),
    ("dim_float", lambda: llmkernels.masked_softmax(_t(3, 4), dim=1.0), TypeError, r"dim must be an int, got float"),
    ("mask_shape", lambda: llmkernels.masked_softmax(_t(3, 4), torch.ones(4, 3, dtype=torch.bool)), ValueError,
     r"mask of shape \(4, 3\) does not broadcast to input's shape \(3, 4\)"),
    ("mask_dtype", lambda: llmkernels.masked_softmax(_t(3, 4), torch.ones(3, 4, dtype=torch.uint8)), TypeError,
     r"mask must be a bool tensor .* got dtype torch.uint8"),
    ("causal_1d", lambda: llmkernels.masked_softmax(_t(4), is_causal=True), ValueError,
     r"is_causal=True needs input with at least 2 dims"),
    ("scale_nan", lambda: llmkernels.masked_softmax(_t(3, 4), scale=math.nan), ValueError, r"scale must be finite"),
    ("backend_cuda_cpu", lambda: llmkernels.masked_softmax(_t(3, 4), backend="cuda"), llmkernels.NotSupportedError,
     r"backend 'cuda' does not support these masked_softmax inputs:\n  cuda: runs on CUDA tensors only"),
]

MODULE_CASES = [
    ("embed_not_multiple", lambda: SelfAttention(10, 3), ValueError,
     r"embed_size \(10\) must be a multiple of heads \(3\)"),
    ("heads_zero", lambda: SelfAttention(8, 0), ValueError, r"heads must be a positive int, got 0"),
    ("module_backend_name", lambda: SelfAttention(8, 2, backend="gpu"), ValueError, r"backend must be one of"),
    ("module_query_rank", lambda: SelfAttention(8, 2)(_t(3, 8), _t(1, 3, 8), _t(1, 3, 8)), ValueError,
     r"query must have shape \(N, len, embed_size=8\), got \(3, 8\)"),
    ("module_embed", lambda: SelfAttention(8, 2)(_t(1, 3, 8), _t(1, 3, 6), _t(1, 3, 8)), ValueError,
     r"key must have shape \(N, len, embed_size=8\), got \(1, 3, 6\)"),
    ("module_batch", lambda: SelfAttention(8, 2)(_t(2, 3, 8), _t(1, 3, 8), _t(1, 3, 8)), ValueError,
     r"query, key and value must share the batch size N, got 2, 1, 1"),
    ("module_kv_len", lambda: SelfAttention(8, 2)(_t(1, 3, 8), _t(1, 4, 8), _t(1, 5, 8)), ValueError,
     r"key and value must have the same length .* got key 4 and value 5"),
    ("module_mask_shape", lambda: SelfAttention(8, 2)(_t(1, 3, 8), _t(1, 4, 8), _t(1, 4, 8), torch.ones(3, 3)),
     ValueError, r"mask of shape \(3, 3\) does not broadcast to \(N, heads, q_len, k_len\) = \(1, 2, 3, 4\)"),
    ("module_mask_type", lambda: SelfAttention(8, 2)(_t(1, 3, 8), _t(1, 4, 8), _t(1, 4, 8), [[1]]), TypeError,
     r"mask must be a torch.Tensor or None, got list"),
]


ALL_CASES = ATTENTION_CASES + VARIANT_CASES + SOFTMAX_CASES + MODULE_CASES


@pytest.mark.parametrize("call,exc,match", [c[1:] for c in ALL_CASES], ids=[c[0] for c in ALL_CASES])
def test_bad_input_is_reported_before_any_kernel(call, exc, match, no_kernel_runs):
    with pytest.raises(exc, match=match):
        call()


def test_bad_environment_variable(monkeypatch, no_kernel_runs):
    monkeypatch.setenv("LLMKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"environment variable LLMKERNELS_BACKEND='fast' is not one of"):
        sdpa(q0, k0, v0)
    with pytest.raises(ValueError, match=r"environment variable LLMKERNELS_BACKEND='fast'"):
        llmkernels.masked_softmax(_t(3, 4))


def test_use_backend_unknown_name(no_kernel_runs):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'Triton'"):
        with llmkernels.use_backend("Triton"):
            pass


def test_routing_bad_arguments(no_kernel_runs):
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'flash'"):
        with llmkernels.route_sdpa(backend="flash"):
            pass
    with pytest.raises(TypeError, match=r"strict must be a bool, got str"):
        llmkernels.enable_sdpa_routing(strict="yes")
    assert not llmkernels.sdpa_routing_enabled()


def test_huggingface_refuses_a_keyword_it_cannot_honour(no_kernel_runs):
    # softcap, sliding_window and s_aux are honoured (tests/test_huggingface_variants.py); a head_mask is not, and
    # it changes what attention computes, so it is refused rather than dropped.
    pytest.importorskip("transformers")
    from llmkernels.integrations import huggingface
    with pytest.raises(ValueError, match=r"does not support head_mask"):
        huggingface.attention_forward(torch.nn.Module(), q0, k0, v0, None, head_mask=torch.ones(2))


def test_auto_falls_back_where_the_backend_cannot_take_the_head_dim():
    # backend="triton" refuses E=300 (above); "auto" runs it on the next backend that can, correctly.
    q, k, v = (_t(1, 2, 3, 300) for _ in range(3))
    a = llmkernels.contract.check_attention(q, k, v)
    assert dispatch.choose_attention_backend(a) in ("cuda", "reference")
    out = sdpa(q, k, v, is_causal=True)
    ref = reference.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    naive = reference.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_by_rule("out", out, ref, naive, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# NaN and inf in the inputs: as PyTorch's math path (CPU, float64), where the position is not masked.


def _torch_math(q, k, v, **kw):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


def _assert_same_specials_and_close(ours, ref):
    """NaN where ref has NaN, the same infinities, the finite values close (fp32 vs fp64)."""
    ours, ref = ours.double().cpu(), ref.cpu()
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)), "NaN pattern differs from PyTorch's math path"
    assert torch.equal(torch.isposinf(ours), torch.isposinf(ref)) and torch.equal(torch.isneginf(ours),
                                                                                   torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(ours[fin], ref[fin], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("where", ["q_nan", "k_nan", "v_nan", "q_inf", "k_inf", "v_inf", "v_neg_inf", "v_both_inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_and_inf_propagate_as_torch_math(where, causal, device, auto_dispatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=g) for _ in range(3))
    tensor, special = where.split("_", 1)
    t = {"q": q, "k": k, "v": v}[tensor]
    if special == "nan":
        t[0, 1, 3, 2] = math.nan
    elif special == "inf":
        t[0, 0, 2, 5] = math.inf
    elif special == "neg_inf":
        t[0, 0, 2, 5] = -math.inf
    else:
        t[0, 0, 2, 5] = math.inf
        t[0, 0, 4, 5] = -math.inf
    # With is_causal, key j is masked for queries i < j, so a special value in k/v row j (2, 3 or 4 here) reaches
    # only later queries: PyTorch's math path, which adds -inf for masked positions, agrees there because the
    # special value sits at the same key for every head row we compare below.
    ref = _torch_math(q, k, v, is_causal=causal)
    ours = llmkernels.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device), is_causal=causal)
    if causal and tensor in ("k", "v"):
        # A special value in key/value row j is masked for queries i < j. PyTorch's math path still touches it
        # there (it adds the -inf causal bias to a NaN/inf score, and multiplies a weight of exactly 0 by an
        # infinite value), turning those rows NaN; llmkernels, like PyTorch's fused kernels, does not read masked
        # positions (test_nan_at_a_masked_position_is_not_read). Compare the rows that see the special key, where
        # both must propagate it.
        key_row = 3 if special == "nan" else 2
        ours, ref = ours[..., key_row:, :], ref[..., key_row:, :]
    _assert_same_specials_and_close(ours, ref)
    assert not torch.isfinite(ours).all(), "the special value must reach the output"


def test_nan_at_a_masked_position_is_not_read(device, auto_dispatch):
    """The documented difference: a NaN score at a masked position. PyTorch's math path adds -inf to it (still
    NaN) and the whole row turns NaN; PyTorch's default CPU kernel and llmkernels never read it."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k[0, 0, 3, 0] = math.nan  # key 3 is visible to query 3 only
    ours = llmkernels.scaled_dot_product_attention(*(t.float().to(device) for t in (q, k, v)), is_causal=True)
    math_path = _torch_math(q, k, v, is_causal=True)
    assert torch.isnan(math_path).all()
    assert torch.isfinite(ours[..., :3, :]).all() and torch.isnan(ours[..., 3, :]).all()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # PyTorch's fused CPU kernel
        fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    _assert_same_specials_and_close(ours, fused)


# ---------------------------------------------------------------------------------------------------------------
# Empty tensors: the shapes PyTorch gives; S = 0 gives zeros (an empty softmax times an empty V is 0 in PyTorch's
# math path too); gradients of every input have the input's shape, zeros.


@pytest.mark.parametrize("Bn,Lq,Sk", [(0, 5, 7), (2, 0, 7), (2, 5, 0), (2, 0, 0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_empty_inputs_match_torch_math(Bn, Lq, Sk, with_mask, device, auto_dispatch):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(Bn, 3, Lq, 4, generator=g)
    k = torch.randn(Bn, 3, Sk, 4, generator=g)
    v = torch.randn(Bn, 3, Sk, 6, generator=g)
    mask = torch.randn(Bn, 1, Lq, Sk, generator=g) if with_mask else None
    leaves = [t.to(device, copy=True).requires_grad_() for t in (q, k, v)]
    mask_leaf = mask.to(device, copy=True).requires_grad_() if with_mask else None
    out, lse = llmkernels.scaled_dot_product_attention(*leaves, attn_mask=mask_leaf, return_lse=True)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_mask = mask.double().requires_grad_() if with_mask else None
    ref = _torch_math(*ref_leaves, attn_mask=ref_mask)
    assert out.shape == ref.shape == (Bn, 3, Lq, 6)
    assert lse.shape == (Bn, 3, Lq) and (lse.numel() == 0 or torch.isneginf(lse).all())
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=0, atol=0)
    out.sum().backward()
    ref.sum().backward()
    for name, ours_leaf, ref_leaf in zip(("q", "k", "v", "mask"), leaves + [mask_leaf], ref_leaves + [ref_mask]):
        if ours_leaf is None:
            continue
        assert ours_leaf.grad is not None, f"d{name} is None; PyTorch gives zeros of the input's shape"
        assert ours_leaf.grad.shape == ours_leaf.shape
        # PyTorch leaves an empty call's mask gradient None; ours is zeros of the mask's shape (same meaning).
        expect = ref_leaf.grad if ref_leaf.grad is not None else torch.zeros_like(ref_leaf)
        torch.testing.assert_close(ours_leaf.grad.double().cpu(), expect, rtol=0, atol=0)


@pytest.mark.parametrize("shape,dim", [((0, 5), -1), ((3, 0), -1), ((3, 0), 0), ((2, 0, 4), 1)])
def test_empty_masked_softmax_matches_torch(shape, dim, device):
    with default_dispatch("softmax"):
        x = torch.randn(*shape, device=device, requires_grad=True)
        mask = torch.zeros(*shape, device=device, requires_grad=True)
        y = llmkernels.masked_softmax(x, mask, dim=dim)
        ref = torch.softmax(x.detach() + mask.detach(), dim=dim)
        assert y.shape == ref.shape
        y.sum().backward()
        assert x.grad.shape == x.shape and mask.grad.shape == mask.shape


def test_no_keys_gives_zeros_even_with_nan_in_query(device, auto_dispatch):
    """The documented difference for S = 0: every row is fully masked, so the output is 0 (our contract). PyTorch
    returns NaN in *every* row as soon as any element of q is NaN or inf there (an artifact of its math path:
    rows whose q is finite turn NaN too); with finite q it gives the same zeros as we do."""
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    k, v = torch.randn(1, 2, 0, 4, dtype=torch.float64), torch.randn(1, 2, 0, 5, dtype=torch.float64)
    torch.testing.assert_close(_torch_math(q, k, v), torch.zeros(1, 2, 3, 5, dtype=torch.float64), rtol=0, atol=0)
    q[0, 1, 2, 0] = math.nan
    assert torch.isnan(_torch_math(q, k, v)).all()
    qf = q.float().to(device).requires_grad_()
    out = llmkernels.scaled_dot_product_attention(qf, k.float().to(device), v.float().to(device))
    torch.testing.assert_close(out, torch.zeros(1, 2, 3, 5, device=device), rtol=0, atol=0)
    out.sum().backward()
    torch.testing.assert_close(qf.grad, torch.zeros_like(qf), rtol=0, atol=0)
