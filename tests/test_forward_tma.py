"""The descriptor (TMA) forward of forward_tma.py, plain and with its warp-specialized loop body, against the
float64 reference under the tolerance rule (tests/attention_check.py): both half dtypes, bool and float masks,
GQA, dropout (the kernels' exact keep pattern), the score rule's variants, odd sizes that end inside a 16-row
tile and head dims padded inside their block (24 in 32, 40 in 64), the (B, L, H, E) transposed view. The
backward is today's (it takes the descriptor forward's out and lse). Also: the per-call TMA rules send calls
that break them (a head dim whose rows are not 16-byte multiples, a misaligned base, fp32) to the pointer kernel.

In the interpreter nothing is autotuned, so ``launch.INTERPRETER_FORWARD_LOADS`` picks the kernel; a spy on
``launch._forward_loads`` proves which one ran. On a GPU (sm_90) the autotuner picks among the pointer and the
descriptor configs, so these tests then check whichever it chose.
"""

import pytest
import torch

from llmkernels.triton_kernels import attention as triton_attention
from llmkernels.triton_kernels.attention import forward_tma, launch
from llmkernels.triton_kernels.interpreter import interpreting
from attention_check import check_attention, random_mask, triton_keep_mask

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@pytest.fixture
def loads_spy(monkeypatch):
    """Records which forward kernel every call chose."""
    chosen = []
    original = launch._forward_loads

    def spy(*args):
        chosen.append(original(*args))
        return chosen[-1]

    monkeypatch.setattr(launch, "_forward_loads", spy)
    return chosen


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed, device, layout="bhld"):
    g = torch.Generator().manual_seed(seed)
    if layout == "blhd":  # the (B, L, H, E) storage seen through .transpose(1, 2)
        q = torch.randn(B, L, Hq, E, generator=g).to(device, dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, E, generator=g).to(device, dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Ev, generator=g).to(device, dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
        k = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
        v = torch.randn(B, Hkv, S, Ev, generator=g).to(device, dtype)
    return q, k, v, g


# name: (loads, dtype, B, Hq, Hkv, L, S, E, Ev, mask, dropout_p, layout, variant kwargs)
CASES = {
    "fp16_causal_gqa_ragged": ("tma", "fp16", 1, 4, 2, 37, 45, 32, 32, None, 0.0, "bhld", dict(is_causal=True)),
    "bf16_float_mask_E!=Ev": ("tma", "bf16", 1, 2, 2, 29, 33, 24, 40, "float", 0.0, "bhld", {}),
    "fp16_dropout_bool_transposed": ("tma", "fp16", 1, 2, 2, 21, 50, 16, 16, "bool", 0.25, "blhd", {}),
    "bf16_rule_window_softcap_alibi_sinks": ("tma", "bf16", 1, 2, 1, 40, 26, 16, 16, None, 0.0, "bhld",
                                             dict(window_size=(5, 7), softcap=2.0, alibi="alibi", sinks=True)),
    "fp16_causal_br_L<S_ws": ("tma_ws", "fp16", 1, 2, 1, 19, 43, 32, 32, None, 0.0, "bhld",
                              dict(is_causal=True, causal_alignment="bottom_right")),
    "bf16_noncausal_gqa_transposed_ws": ("tma_ws", "bf16", 2, 2, 1, 33, 17, 16, 16, None, 0.0, "blhd", {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_descriptor_forward_matches_float64_reference(name, device, monkeypatch, loads_spy):
    loads, dt, B, Hq, Hkv, L, S, E, Ev, mask_kind, dropout_p, layout, kw = CASES[name]
    monkeypatch.setattr(launch, "INTERPRETER_FORWARD_LOADS", loads)
    dtype = DTYPES[dt]
    q, k, v, g = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, seed=L * S + E, device=device, layout=layout)
    kw = dict(kw)
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = (torch.rand(B, Hq, generator=g) * 0.5).to(device)
    if kw.get("sinks"):
        kw["sinks"] = torch.randn(Hq, generator=g).to(device, dtype)
    mask = random_mask(mask_kind, B, L, S, g, device)
    check_attention("triton", triton_keep_mask, q, k, v, mask, enable_gqa=Hq != Hkv, dropout_p=dropout_p, seed=L, **kw)
    if interpreting():
        assert loads_spy and set(loads_spy) == {loads}, loads_spy


def test_calls_outside_the_tma_rules_take_pointer_loads(device, monkeypatch, loads_spy):
    """Head dim 59 in fp16 (118-byte rows), a base 2 bytes past an aligned one, and fp32 all break a rule (or the
    fp16/bf16 condition): the pointer kernel runs them, and they still match the reference."""
    monkeypatch.setattr(launch, "INTERPRETER_FORWARD_LOADS", "tma")
    q, k, v, _ = _inputs(1, 2, 2, 19, 23, 59, 59, torch.float16, seed=3, device=device)
    assert forward_tma.tma_refusals(q=q)  # 118-byte row stride
    check_attention("triton", triton_keep_mask, q, k, v, is_causal=True, seed=1)
    # A base 2 bytes off (a view into a larger buffer; check_attention's leaves would be fresh aligned copies, so
    # this one calls the launcher itself): pointer loads, with exactly the pointer kernel's result.
    storage = torch.randn(1 + 2 * 19 * 32, generator=torch.Generator().manual_seed(4)).to(device, torch.float16)
    shifted = storage[1:].view(1, 2, 19, 32)  # every stride fine, the base 2 bytes off
    assert any("aligned" in r for r in forward_tma.tma_refusals(q=shifted))
    out, lse = triton_attention.attention_forward(shifted, shifted, shifted, None, 0.0, True, 0.2, None)
    assert loads_spy[-1] == "pointer"
    monkeypatch.setattr(launch, "INTERPRETER_FORWARD_LOADS", "pointer")
    aligned = shifted.clone()
    want_out, want_lse = triton_attention.attention_forward(aligned, aligned, aligned, None, 0.0, True, 0.2, None)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    monkeypatch.setattr(launch, "INTERPRETER_FORWARD_LOADS", "tma")
    q3, k3, v3, _ = _inputs(1, 1, 1, 17, 17, 16, 16, torch.float32, seed=5, device=device)
    check_attention("triton", triton_keep_mask, q3, k3, v3, seed=3)
    if interpreting():
        assert loads_spy and set(loads_spy) == {"pointer"}, loads_spy


def test_tma_refusals_name_the_tensor_and_rule():
    ok = torch.empty(2, 3, 8, 16, dtype=torch.bfloat16)
    assert forward_tma.tma_refusals(q=ok, k=ok) == []
    not_last = ok.transpose(2, 3)
    broadcast = ok[:, :1].expand(2, 3, 8, 16)
    reasons = forward_tma.tma_refusals(k=not_last, v=broadcast)
    assert any(r.startswith("k: last dim not contiguous") for r in reasons)
    assert any(r.startswith("v: strides") for r in reasons)
    assert not forward_tma.tma_eligible(ok.float(), ok.float(), ok.float(), ok.float())


def _on_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


# On sm_90 every descriptor candidate of every head-dim bucket and dtype; in the interpreter one pair (the test
# itself, at its real tile sizes).
CANDIDATE_SETS = [("fp16", 64), ("bf16", 128), ("fp16", 256)] if _on_sm90() else [("fp16", 64)]


@pytest.mark.parametrize("dt,bucket", CANDIDATE_SETS)
def test_every_descriptor_candidate(dt, bucket, device):
    """Each config the sm_90 autotuner may pick for the descriptor kernel (configs._TMA_FWD_SM90: plain, the
    score rule's, dropout, warp-specialized; and the pointer configs it runs with TMA=False), launched directly
    (launch.forward_with_tma_config) on a shape with ragged ends and GQA, against the float64 reference under the
    tolerance rule: the autotuner keeps whichever is fastest, so every one must be right."""
    from llmkernels import reference
    from llmkernels.contract import ScoreRule
    from llmkernels.triton_kernels.attention import configs
    from tolerance import assert_by_rule

    dtype = DTYPES[dt]
    E = bucket - 8 if bucket > 64 else 40  # padded inside its block, rows still 16-byte multiples
    B, Hq, Hkv, L, S = (1, 4, 2, 150, 201) if _on_sm90() else (1, 2, 1, 70, 83)
    q, k, v, g = _inputs(B, Hq, Hkv, L, S, E, E, dtype, seed=bucket, device=device)
    scale = E ** -0.5
    rng = torch.tensor([1234, 77], dtype=torch.int64, device=device)
    slopes = (torch.rand(B, Hq, generator=g) * 0.3).to(device)
    rule = ScoreRule(window_left=40, softcap=5.0, alibi_slopes=slopes)
    cases = []  # (config, causal, dropout_p, rule)
    for variant, p in (("base", 0.0), ("dropout", 0.2)):
        # The kernel's pointer configs too (TMA=False: forward.py's kernel called inside it), which the
        # autotuner of an eligible call chooses from as well.
        pointer = [configs._as_pointer_config(c) for c in configs._configs_for(90, "fwd", "half", bucket, variant)]
        for c in configs._tma_configs_for(90, bucket, variant, False, plain=variant == "base") + pointer:
            cases += [(c, causal, p, None) for causal in (False, True)]
        cases += [(c, True, p, rule) for c in configs._tma_configs_for(90, bucket, variant, True, plain=False)]
    assert any(c.kwargs["WARP_SPECIALIZE"] for c, *_ in cases) or bucket == 256
    if not _on_sm90():
        # The interpreter is slow at these tile sizes: one case of each kind (pointer, descriptor,
        # warp-specialized, dropout, score rule) proves the test and the launcher; the GPU runs them all.
        kinds = {}
        for case in cases:
            kinds.setdefault((case[0].kwargs["TMA"], case[0].kwargs["WARP_SPECIALIZE"], case[2] > 0,
                              case[3] is not None), case)
        cases = list(kinds.values())
    for cfg, causal, p, r in cases:
        out, lse = launch.forward_with_tma_config(q, k, v, None, p, causal, scale, rng if p else None, r, cfg)
        keep = triton_keep_mask(rng, (B, Hq, L, S), p, device) if p else None
        variant = {}
        if r is not None:
            variant = dict(window_size=(40, -1), softcap=5.0)
        refs = []
        for cast, compute in ((torch.float64, torch.float64), (dtype, None)):
            kw = dict(variant, alibi_slopes=slopes.to(cast if cast == torch.float64 else torch.float32)
                      if r is not None else None)
            refs.append(reference.scaled_dot_product_attention(
                q.to(cast), k.to(cast), v.to(cast), None, dropout_p=p, is_causal=causal, scale=scale,
                enable_gqa=True, return_lse=True, dropout_mask=keep, compute_dtype=compute, **kw))
        tag = f"{cfg} causal={causal} p={p} rule={r is not None}"
        assert_by_rule(f"out {tag}", out, refs[0][0], refs[1][0], dtype)
        assert_by_rule(f"lse {tag}", lse, refs[0][1], refs[1][1], dtype)
