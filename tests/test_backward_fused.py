"""The fused backward (triton_kernels/attention/backward_fused.py, issue 13) and the ``deterministic`` flag.

Every case runs our op with ``deterministic=False`` through tests/attention_check.py's check against the float64
reference (tolerance rule, NaN-poisoned outputs) and asserts, with a spy on ``launch._fused_backward``, that the
fused kernel really ran (and not the separate passes). In the interpreter the tiles are 16 x 16, so these odd
shapes cross block edges in both directions, several key blocks add into the same dQ rows, and GQA groups sum
in one program. Then: which calls are refused to the separate passes (and still right), the issue's delta
precision case, and which backward ``deterministic`` selects (True, False, None under both settings of
``torch.use_deterministic_algorithms``), with bitwise repeatability where it is promised.
"""

import pytest
import torch

import llmkernels
from conftest import HAS_GPU
from llmkernels.triton_kernels import attention as triton_attention
from attention_check import check_attention, random_mask, triton_keep_mask
from tolerance import assert_by_rule

launch = triton_attention.launch


@pytest.fixture
def fused_calls(monkeypatch):
    """A list that gets one entry per run of the fused backward."""
    calls = []
    original = launch._fused_backward

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return original(*args, **kwargs)

    monkeypatch.setattr(launch, "_fused_backward", spy)
    return calls


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed, device, positive=False):
    g = torch.Generator().manual_seed(seed)
    draw = torch.rand if positive else torch.randn
    q = draw(B, Hq, L, E, generator=g).to(device, dtype)
    k = draw(B, Hkv, S, E, generator=g).to(device, dtype)
    v = draw(B, Hkv, S, Ev, generator=g).to(device, dtype)
    return q, k, v, g


# name: (dtype, B, Hq, Hkv, L, S, E, Ev, mask kind, dropout_p, keyword arguments)
CASES = {
    "fp16_causal_gqa_odd": (torch.float16, 1, 4, 2, 37, 45, 24, 24, None, 0.0, dict(is_causal=True)),
    "bf16_bool_mask_dropout": (torch.bfloat16, 2, 2, 1, 33, 19, 16, 16, "bool", 0.25, dict()),
    # a float mask without its gradient: the fused kernel adds it; head dims 59 / 40 pad to 64 columns
    "fp32_float_mask_E!=Ev": (torch.float32, 1, 2, 2, 21, 30, 59, 40, "float", 0.0, dict(mask_grad=False)),
    "fp16_window_softcap_alibi_sinks_br": (torch.float16, 1, 4, 1, 35, 50, 16, 16, None, 0.0,
                                           dict(window_size=(7, 2), causal_alignment="bottom_right", softcap=2.0,
                                                alibi="alibi", sinks=True)),
    "bf16_causal_br_L>S_dropout": (torch.bfloat16, 1, 2, 2, 45, 21, 32, 32, None, 0.2,
                                   dict(is_causal=True, causal_alignment="bottom_right")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fused_backward_matches_float64_reference(name, device, fused_calls):
    dtype, B, Hq, Hkv, L, S, E, Ev, mask_kind, dropout_p, kw = CASES[name]
    q, k, v, g = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=L * S, device=device)
    kw = dict(kw)
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = (torch.rand(B, Hq, generator=g) * 0.5).to(device)
    if kw.pop("sinks", None):
        kw["sinks"] = torch.randn(Hq, generator=g).to(device, torch.float32)
    mask = random_mask(mask_kind, B, L, S, g, device, keep_fraction=0.8)
    check_attention("triton", triton_keep_mask, q, k, v, mask, enable_gqa=True, dropout_p=dropout_p, seed=L,
                    deterministic=False, **kw)
    assert fused_calls == [dtype], "the fused backward did not run"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_fused_backward_never_reads_hidden_keys(device, fused_calls):
    """Bottom-right causal window, L < S: keys 0..31 are hidden from every row (NaN in our K and V only)."""
    q, k, v, _ = _inputs(1, 2, 2, 16, 80, 16, 16, torch.float16, seed=3, device=device)
    check_attention("triton", triton_keep_mask, q, k, v, None, window_size=(20, 0), causal_alignment="bottom_right",
                    hidden_keys=slice(0, 32), deterministic=False)
    assert fused_calls


def test_float_mask_gradient_takes_the_separate_passes(device, fused_calls):
    """dS for a float mask is written by the separate-pass dQ kernel: the fused one declines, with its reason,
    and the result is still right."""
    q, k, v, g = _inputs(1, 2, 2, 19, 23, 16, 16, torch.float16, seed=4, device=device)
    mask = random_mask("float", 1, 19, 23, g, device, keep_fraction=0.8)
    reasons = launch.fused_backward_reasons(q, k, v, mask, 0.0, True)
    assert reasons and "mask's gradient" in reasons[0]
    assert launch.fused_backward_reasons(q, k, v, mask, 0.0, False) == []
    check_attention("triton", triton_keep_mask, q, k, v, mask, is_causal=True, deterministic=False)
    assert fused_calls == []


def test_delta_precision_on_rows_with_few_keys(device, fused_calls):
    """Issue 13's case: fp16, causal top-left, L = 3, S = 799, head dim 59, all-positive inputs: rows see 1-3
    keys, where delta = rowsum(dO * O) from the fp16 output dominates the dq/dk error. The fused backward takes
    delta = rowsum(P * dP) in fp32 on chip there (every key of the block is in one key block): within the
    tolerance rule, and with a smaller mean (and no larger max) dq/dk error than the separate passes on the same
    inputs."""
    B, H, L, S, E = 1, 2, 3, 799, 59
    q, k, v, g = _inputs(B, H, H, L, S, E, E, torch.float16, seed=1, device=device, positive=True)
    grad_out = torch.randn(B, H, L, E, generator=g).to(device)
    _, _, fused = check_attention("triton", triton_keep_mask, q, k, v, is_causal=True, grad_out=grad_out,
                                  deterministic=False)
    assert fused_calls
    _, _, separate = check_attention("triton", triton_keep_mask, q, k, v, is_causal=True, grad_out=grad_out,
                                     deterministic=True)
    ref = [t.detach().clone().double().requires_grad_(True) for t in (q, k, v)]
    out, lse = llmkernels.reference.scaled_dot_product_attention(*ref, is_causal=True, return_lse=True)
    gen = torch.Generator().manual_seed(1)  # check_attention's grad_lse for seed=0 (grad_out given)
    grad_lse = torch.randn(lse.shape, generator=gen)
    ref_grads = torch.autograd.grad([out, lse], ref, [grad_out.double(), grad_lse.double()])
    for i, name in ((0, "dq"), (1, "dk")):
        err_fused = (fused[i].double() - ref_grads[i]).abs()
        err_separate = (separate[i].double() - ref_grads[i]).abs()
        # The max may sit on an element delta does not change; the mean error covers every row.
        assert err_fused.max() <= err_separate.max() and err_fused.mean() < err_separate.mean(), (
            f"{name}: fused max {err_fused.max():.3g} mean {err_fused.mean():.3g}, separate max "
            f"{err_separate.max():.3g} mean {err_separate.mean():.3g}")


def _backward(inputs, deterministic, dropout_p=0.0):
    q, k, v, grad_out = (t.detach().clone() for t in inputs)
    for t in (q, k, v):
        t.requires_grad_()
    torch.manual_seed(7)
    out = llmkernels.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=True,
                                                  backend="triton", deterministic=deterministic)
    out.backward(grad_out)
    return [t.grad.clone() for t in (q, k, v)]


def _reference_backward(inputs, dtype):
    """_backward's gradients from the einsum reference in ``dtype`` (float64: the reference; the input dtype: the
    naive computation of the tolerance rule)."""
    q, k, v, grad_out = (t.detach().clone().cpu().to(dtype) for t in inputs)
    for t in (q, k, v):
        t.requires_grad_()
    out = llmkernels.reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                            compute_dtype=dtype if dtype == torch.float64 else None)
    out.backward(grad_out)
    return [t.grad for t in (q, k, v)]


@pytest.fixture
def restore_deterministic_mode():
    was_on = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(was_on, warn_only=warn_only)


@pytest.mark.parametrize("deterministic,flag_on", [(None, False), (None, True), (True, False), (False, True)])
def test_deterministic_selects_the_backward(device, fused_calls, restore_deterministic_mode, flag_on,
                                            deterministic):
    """None follows torch.are_deterministic_algorithms_enabled() (read when the backward runs) on a GPU and keeps
    the separate passes in the interpreter; True and False override it. Both backwards meet the tolerance rule
    against the float64 reference on the same inputs; the deterministic one is bitwise repeatable."""
    g = torch.Generator().manual_seed(11)
    inputs = [torch.randn(1, 2, 21, 24, generator=g), torch.randn(1, 1, 21, 24, generator=g),
              torch.randn(1, 1, 21, 24, generator=g), torch.randn(1, 2, 21, 24, generator=g)]
    inputs = [t.to(device, torch.float16) for t in inputs]
    torch.use_deterministic_algorithms(flag_on)
    first = _backward(inputs, deterministic)
    # In the interpreter None keeps the separate passes (the path GPU calls take while no fused config exists).
    on_gpu = torch.device(device).type == "cuda"
    expect_fused = deterministic is False or (deterministic is None and not flag_on and on_gpu)
    assert len(fused_calls) == (1 if expect_fused else 0)
    second = _backward(inputs, deterministic)
    if not expect_fused:
        for a, b in zip(first, second):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    torch.use_deterministic_algorithms(False)
    other = _backward(inputs, not expect_fused)
    ref, naive = _reference_backward(inputs, torch.float64), _reference_backward(inputs, torch.float16)
    for grads, which in ((first, "selected"), (other, "other")):
        for name, ours, ref_g, naive_g in zip(("dq", "dk", "dv"), grads, ref, naive):
            assert_by_rule(f"{which} {name}", ours, ref_g, naive_g, torch.float16)


def test_deterministic_must_be_a_bool_or_none(device):
    q = torch.randn(1, 1, 4, 16, device=device)
    with pytest.raises(TypeError, match="deterministic"):
        llmkernels.scaled_dot_product_attention(q, q, q, deterministic=1)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU: the compiled kernel's atomic dQ adds")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backward_on_gpu_dk_dv_repeatable(dtype, fused_calls):
    """dK and dV are summed in registers in a fixed order (bitwise repeatable); dQ's atomic adds only change
    its fp32 rounding order, so two runs agree to fp32 accumulation error."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 8, 1031, 64, generator=g), torch.randn(2, 2, 1031, 64, generator=g),
              torch.randn(2, 2, 1031, 64, generator=g), torch.randn(2, 8, 1031, 64, generator=g)]
    inputs = [t.to("cuda", dtype) for t in inputs]
    first, second = _backward(inputs, False), _backward(inputs, False)
    assert len(fused_calls) == 2
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert torch.allclose(first[0].float(), second[0].float(), rtol=1e-2, atol=1e-2)
