"""The score-rule variants in the Triton kernels (issue 14): window, bottom-right alignment, softcap, ALiBi and
sinks, alone and combined with masks, GQA, dropout (the kernels' exact keep pattern), odd sizes, L != S both ways
and E != Ev; output, lse and every gradient (q, k, v, a float mask, sinks) against the float64 reference under
the tolerance rule (tests/attention_check.py). In the interpreter the tiles are 16 x 16, so these shapes cross
block edges in both directions. Also: blocks the causal/window rule hides are never read (NaN-filled).
Every tensor lives on the session's device (tests/conftest.py): CPU through the interpreter here, CUDA on a GPU,
where the triton backend declines CPU tensors."""

import pytest
import torch

import llmkernels
from llmkernels import dispatch, contract
from llmkernels.triton_kernels import attention as triton_attention
from attention_check import check_attention, random_mask, triton_keep_mask

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed, device):
    # drawn on CPU (one generator, the same numbers on every device), then moved
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=g).to(device, dtype)
    return q, k, v, g


# name: (dtype, B, Hq, Hkv, L, S, E, Ev, mask kind, dropout_p, variant kwargs); "alibi": (B, Hq) slopes,
# "alibi_h": (Hq,) slopes, "sinks": per-head sinks in the given dtype.
CASES = {
    "window_gqa_E!=Ev": ("fp32", 1, 4, 2, 37, 29, 16, 24, None, 0.0, dict(window_size=(5, 3))),
    "causal_window_br_L<S_bool": ("fp16", 1, 2, 1, 21, 45, 32, 32, "bool", 0.0,
                                  dict(window_size=(6, 0), causal_alignment="bottom_right")),
    "causal_br_L>S_sinks": ("fp32", 2, 2, 2, 45, 21, 16, 16, None, 0.0,
                            dict(is_causal=True, causal_alignment="bottom_right", sinks="fp32")),
    "softcap_float_mask": ("fp32", 1, 2, 2, 19, 33, 24, 16, "float", 0.0, dict(softcap=0.5)),
    "alibi_br_window_bf16": ("bf16", 2, 2, 1, 33, 19, 16, 16, None, 0.0,
                             dict(alibi="alibi", causal_alignment="bottom_right", window_size=(4, 7))),
    "sinks_dropout_bool_fp16": ("fp16", 1, 2, 2, 23, 31, 16, 16, "bool", 0.3, dict(sinks="fp16")),
    "alibi_causal_softcap": ("fp16", 1, 4, 1, 35, 35, 16, 16, None, 0.0,
                             dict(alibi="alibi_h", is_causal=True, softcap=2.0)),
    "everything_fp32": ("fp32", 2, 4, 2, 27, 40, 16, 24, "float", 0.2,
                        dict(sinks="fp32", softcap=1.5, alibi="alibi", window_size=(9, -1), is_causal=True,
                             causal_alignment="bottom_right")),
    "everything_two_sided_fp16": ("fp16", 1, 2, 1, 40, 26, 32, 16, "float", 0.0,
                                  dict(sinks="fp32", softcap=3.0, alibi="alibi", window_size=(3, 5))),
}


def _variant(kw, B, Hq, g, device):
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi is not None:
        kw["alibi_slopes"] = (torch.rand((B, Hq) if alibi == "alibi" else (Hq,), generator=g) * 0.5).to(device)
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(Hq, generator=g).to(device, DTYPES[kw["sinks"]])
    return kw


@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_float64_reference(name, device):
    dt, B, Hq, Hkv, L, S, E, Ev, mask_kind, dropout_p, kw = CASES[name]
    dtype = DTYPES[dt]
    q, k, v, g = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=L * S, device=device)
    kw = _variant(kw, B, Hq, g, device)
    mask = random_mask(mask_kind, B, L, S, g, device)
    calls = []
    original = triton_attention.attention_forward

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    triton_attention.attention_forward = spy
    try:
        out, lse, grads = check_attention("triton", triton_keep_mask, q, k, v, mask, enable_gqa=True,
                                          dropout_p=dropout_p, seed=L, **kw)
    finally:
        triton_attention.attention_forward = original
    assert calls and calls[0].active  # the rule reached the kernels (no fallback to another backend)
    if name == "causal_br_L>S_sinks":
        # bottom-right with L - S = 24: rows 0..23 see no key: output 0, lse = the sink
        assert (out[:, :, :24] == 0).all()
        assert torch.equal(lse[..., :24], kw["sinks"].float().view(1, Hq, 1).expand(B, Hq, 24))


def test_auto_runs_variants_on_triton(device):
    q, k, v, _ = _inputs(1, 2, 2, 5, 7, 16, 16, torch.float32, seed=1, device=device)
    a = contract.check_attention(q, k, v, softcap=2.0, window_size=(2, 1), sinks=torch.zeros(2, device=device))
    assert dispatch.attention_not_supported_reasons(a)["triton"] == []
    assert dispatch.choose_attention_backend(a, "auto") == "triton"


def test_dense_backward_applies_the_rule(device):
    """The dense backward (configs that spill on a GPU; float-mask rows whose |lse| >= 2^16) applies the same rule
    as the kernels: compared with the Triton backward on a shape that runs it everywhere."""
    B, Hq, Hkv, L, S, E = 1, 2, 1, 21, 26, 16
    q, k, v, g = _inputs(B, Hq, Hkv, L, S, E, E, torch.float32, seed=5, device=device)
    mask = random_mask("float", B, L, S, g, device).expand(B, Hq, L, S)
    rule = contract.ScoreRule(window_left=4, bottom_right=True, softcap=1.5,
                              alibi_slopes=(torch.rand(B, Hq, generator=g) * 0.5).to(device),
                              sinks=torch.randn(Hq, generator=g).to(device))
    grad_out = torch.randn(B, Hq, L, E, generator=g).to(device)
    grad_lse = torch.randn(B, Hq, L, generator=g).to(device)
    out, lse = triton_attention.attention_forward(q, k, v, mask, 0.0, True, 0.3, None, rule)
    kernels = triton_attention.attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, 0.0, True, 0.3, None,
                                                  True, rule)
    dense = triton_attention.launch._dense_backward(grad_out, q, k, v, lse, grad_lse, mask, 0.0, True, 0.3, None,
                                                    True, rule)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), kernels, dense):
        err = (a - b).abs().max().item()
        assert torch.allclose(a, b, rtol=2e-5, atol=2e-5), f"{name}: max difference {err}"


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_finfo_min_rows_with_window_take_dense_backward_and_match(device):
    """Float-mask rows at finfo.min on every visible key (|lse| >= 2^16) take _dense_backward: with a window,
    softcap and ALiBi the result still matches the float64 reference. (With sinks such a row's lse is about the
    sink, so the kernels' exp(s - lse) = 0 is exact and the kernels keep it.)"""
    B, H, L, S, E = 1, 2, 19, 23, 16
    q, k, v, g = _inputs(B, H, H, L, S, E, E, torch.float32, seed=9, device=device)
    mask = torch.zeros(1, H, L, S, device=device)
    mask[..., 3, :] = torch.finfo(torch.float32).min
    called = []
    original = triton_attention.launch._dense_backward

    def spy(*args):
        called.append(True)
        return original(*args)

    triton_attention.launch._dense_backward = spy
    try:
        check_attention("triton", triton_keep_mask, q, k, v, mask, lse_grad=False, window_size=(5, 2), softcap=2.0,
                        alibi_slopes=torch.rand(H, generator=g).to(device))
    finally:
        triton_attention.launch._dense_backward = original
    assert called


# ------------------------------------------------------------------------------------------------------------
# Block skipping: what the rule hides is never read. Ours on NaN-filled inputs must equal ours on clean inputs
# bit for bit (the kernels visit the same blocks in the same order), and the clean run matches the reference.


SKIP_CASES = {
    # bottom-right causal window, L < S: query i sees keys [i + 44, i + 64]; key blocks 0 and 1 (keys 0..31) are
    # hidden from every row.
    "window_hides_first_key_blocks": (16, 80, dict(window_size=(20, 0), causal_alignment="bottom_right"),
                                      dict(keys=slice(0, 32))),
    # top-left causal, L < S: keys 32.. are right of every row's diagonal.
    "causal_hides_last_key_blocks": (30, 70, dict(is_causal=True), dict(keys=slice(32, 70))),
    # top-left window with a right side: query i sees [i - 2, i + 3]; keys 48.. are never seen by rows < 40.
    "two_sided_window": (40, 75, dict(window_size=(2, 3)), dict(keys=slice(48, 75))),
    # bottom-right causal, L > S: rows 0..47 see no key, so the dK/dV pass must skip query blocks 0..2 of every
    # key block (their q and dO are NaN) and the forward and dQ pass visit nothing for them.
    "rows_that_see_nothing": (64, 16, dict(is_causal=True, causal_alignment="bottom_right"),
                              dict(rows=slice(0, 48))),
}


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_alibi_far_from_every_key_keeps_the_row_sum(dt, device):
    """Bottom-right with L > S and no causal rule: row i's nearest key is L - S - i away, so a steep slope gives
    lse ~ -100 * 56 = -5600, where fp32 exp(s - lse) loses ~1e-4 of each weight (fp32 dq failed the tolerance
    rule by 16x that way). Such calls take the dense backward (launch.LSE_EXACT_LIMIT)."""
    q, k, v, _ = _inputs(1, 2, 1, 60, 4, 16, 16, DTYPES[dt], 13, device)
    slopes = torch.tensor([100.0, 0.5], device=device)
    out, lse, _ = check_attention("triton", triton_keep_mask, q, k, v, None, enable_gqa=True, alibi_slopes=slopes,
                                  causal_alignment="bottom_right", seed=2)
    assert lse[0, 0, 0] < -5000 and torch.isfinite(lse).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(SKIP_CASES))
def test_hidden_blocks_are_never_read(name, device):
    L, S, kw, poison = SKIP_CASES[name]
    B, H, E = 1, 2, 16
    q, k, v, g = _inputs(B, H, H, L, S, E, E, torch.float32, seed=L + S, device=device)
    grad_out = torch.randn(B, H, L, E, generator=g).to(device)
    grad_lse = torch.randn(B, H, L, generator=g).to(device)
    check_attention("triton", triton_keep_mask, q, k, v, None, grad_out=grad_out, seed=3, **kw)

    def run(q, k, v, grad_out):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = llmkernels.scaled_dot_product_attention(*leaves, return_lse=True, backend="triton", **kw)
        grads = torch.autograd.grad([out, lse], leaves, [grad_out, grad_lse])
        return [out, lse, *grads]

    clean = run(q, k, v, grad_out)
    nan = float("nan")
    qp, kp, vp, gp = q.clone(), k.clone(), v.clone(), grad_out.clone()
    if "keys" in poison:
        kp[:, :, poison["keys"]] = nan
        vp[:, :, poison["keys"]] = nan
    if "rows" in poison:
        qp[:, :, poison["rows"]] = nan
        gp[:, :, poison["rows"]] = nan
    poisoned = run(qp, kp, vp, gp)
    for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), poisoned, clean):
        if label == "dk" and "keys" in poison:
            # the hidden keys' own gradients are 0 either way (no visible pair)
            assert (a[:, :, poison["keys"]] == 0).all()
        assert torch.equal(a, b), f"{label} differs: a hidden block was read"
