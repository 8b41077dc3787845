"""Attention variants (issue 14) in the CUDA C++ backend: window (both alignments), softcap, ALiBi, sinks and their
combinations with masks, GQA, dropout and odd sizes, against the float64 reference under the tolerance rule (output,
lse, dq, dk, dv, a float mask's and the sinks' gradients), on a GPU or through the CPU emulation of the same sources
(tests/cuda_emulation.py; see tests/test_cuda_backend.py). Key blocks the rule hides entirely are filled with NaN:
the kernels must never read them. The block-range functions the kernels use are checked against brute force.

The emulation runs every CUDA thread as an OS thread and the blocks one after another: the shapes are small and
the matrix is chosen so that each feature meets each other feature, each alignment, L < S and L > S at least once.
"""

import pytest
import torch

from llmkernels import cuda_ext
from attention_check import check_attention
from test_cuda_backend import DTYPES, emulation, ext, target  # noqa: F401  (fixtures)


def check_rule_cuda(q, k, v, mask=None, *, seed=0, **kw):
    """The shared check (tests/attention_check.py) on the cuda backend, GQA on: out, lse, dq, dk, dv, a float mask's
    and the sinks' gradients against the float64 reference by the tolerance rule, the kernels' own dropout keep
    pattern; ``hidden_keys`` NaN-fills keys the kernels must skip. Every gradient must also be finite. Returns
    (out, lse, {name: gradient})."""
    float_mask = mask is not None and mask.dtype != torch.bool
    out, lse, grads = check_attention("cuda", cuda_ext.dropout_keep_mask, q, k, v, mask, enable_gqa=True, seed=seed,
                                      **kw)
    names = ["dq", "dk", "dv"] + (["dmask"] if float_mask else []) + (["dsinks"] if kw.get("sinks") is not None
                                                                      else [])
    assert len(grads) == len(names)
    for name, grad in zip(names, grads):
        assert torch.isfinite(grad).all(), name
    return out, lse, dict(zip(names, grads))


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (spread * torch.randn(B, Hq, L, E, generator=gen)).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(device, dtype)
    return q, k, v, gen


def _rule_kwargs(cfg, B, Hq, L, S, gen, device, dtype):
    kw = {key: val for key, val in cfg.items() if key in ("window_size", "causal_alignment", "softcap", "is_causal",
                                                           "dropout_p", "scale")}
    if cfg.get("alibi") == "per_head":
        kw["alibi_slopes"] = torch.rand(Hq, generator=gen).to(device)
    elif cfg.get("alibi") == "batch":  # (B, 1) broadcast over heads: a stride-0 view in the kernels
        kw["alibi_slopes"] = (torch.rand(B, 1, generator=gen) * 0.5).to(device)
    if cfg.get("sinks") == "float32":
        kw["sinks"] = torch.randn(Hq, generator=gen).to(device)
    elif cfg.get("sinks") == "input":
        kw["sinks"] = torch.randn(Hq, generator=gen).to(device, dtype)
    mask = None
    if cfg.get("mask") == "bool":
        mask = (torch.rand(B, 1, L, S, generator=gen) > 0.25).to(device)
    elif cfg.get("mask") == "float":
        mask = torch.randn(1, Hq, L, S, generator=gen).to(device)
    return kw, mask


# name: (rule, dtype, B, Hq, Hkv, L, S, E, Ev). Tiles (fp16/bf16, head dim <= 64): forward 64 x 64, backward
# 64 x 64; fp32: forward 64 x 64, backward 32 x 32. L and S cross tile edges so that partial tiles, skipped tiles and
# tiles cut by the window's edges all occur.
CASES = {
    "window_two_sided": (dict(window_size=(5, 3)), "fp16", 1, 4, 2, 40, 97, 32, 32),
    "window_causal_bottom_right_L>S": (dict(window_size=(7, 0), causal_alignment="bottom_right", mask="bool"),
                                       "bf16", 2, 2, 1, 80, 45, 24, 24),
    "window_right_only_bottom_right": (dict(window_size=(-1, 4), causal_alignment="bottom_right"), "fp32",
                                       1, 2, 2, 37, 70, 16, 16),
    "causal_bottom_right_L<S": (dict(is_causal=True, causal_alignment="bottom_right"), "fp16", 1, 3, 3, 33, 90,
                                40, 24),
    "softcap_float_mask_causal": (dict(softcap=2.0, scale=1.0, mask="float", is_causal=True), "fp32",
                                  1, 2, 1, 33, 47, 16, 16),
    "alibi_window_bottom_right_L>S": (dict(alibi="batch", window_size=(9, 4), causal_alignment="bottom_right"),
                                      "fp16", 2, 4, 2, 47, 33, 32, 32),
    "sinks_window_bottom_right_L>S": (dict(sinks="float32", window_size=(2, 1), causal_alignment="bottom_right",
                                           mask="bool"), "bf16", 1, 2, 2, 50, 20, 16, 16),
    "sinks_softcap_dropout": (dict(sinks="input", softcap=1.5, dropout_p=0.3, mask="bool"), "fp16",
                              2, 2, 1, 21, 35, 16, 16),
    "everything_dropout": (dict(sinks="float32", softcap=3.0, alibi="per_head", window_size=(6, -1), is_causal=True,
                                causal_alignment="bottom_right", mask="float", dropout_p=0.2), "fp32",
                           1, 2, 1, 29, 41, 40, 24),
    "softcap_alibi_head_dim_128": (dict(softcap=5.0, alibi="per_head", is_causal=True), "bf16",
                                   1, 1, 1, 19, 30, 96, 80),
}


@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_reference(target, name):
    cfg, dt, B, Hq, Hkv, L, S, E, Ev = CASES[name]
    dtype = DTYPES[dt]
    # A softcap only bites on large scores: spread q so that capped and uncapped differ.
    q, k, v, gen = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, target, seed=len(name), spread=3.0 if "softcap" in cfg
                           else 1.0)
    kw, mask = _rule_kwargs(cfg, B, Hq, L, S, gen, target, dtype)
    sinks = kw.get("sinks")
    out, lse, grads = check_rule_cuda(q, k, v, mask, seed=L, **kw)
    if name == "sinks_window_bottom_right_L>S":
        # d = S - L = -30: query i sees keys i - 32 .. i - 29, so rows 0..28 see none: output 0, lse = the sink
        assert (out[:, :, :29] == 0).all()
        assert torch.equal(lse[..., :29].cpu(), sinks.cpu().view(1, Hq, 1).expand(B, Hq, 29))
        assert (grads["dq"][:, :, :29] == 0).all()
    if name == "window_causal_bottom_right_L>S":
        # d = -35: rows 0..34 see no key; their lse is -inf and every gradient stays finite (checked above)
        assert torch.isneginf(lse[..., :35]).all() and (out[:, :, :35] == 0).all()


# Blocks the rule hides entirely are NaN in K and V: reading them would put NaN in the output (P V with P = 0) and
# in the gradients (dS = P (dP - delta) with dP = dO V^T). Forward key tiles and backward key blocks are 64 wide
# for fp16 with head dim <= 64; the poisoned keys form whole blocks.
POISON = {
    # decode-like, bottom-right (d = 284): the 16 queries see keys 264 .. 299 (left window 20, causal)
    "bottom_right_causal_window": (dict(window_size=(20, 0), causal_alignment="bottom_right", sinks="float32"),
                                   (0, 256)),
    # top-left two-sided: the 16 queries see keys 0 .. 25
    "top_left_two_sided": (dict(window_size=(10, 10), softcap=4.0, alibi="per_head"), (64, 300)),
}


@pytest.mark.parametrize("name", list(POISON))
def test_hidden_key_blocks_are_never_read(target, name):
    cfg, poison = POISON[name]
    L, S, dtype = 16, 300, torch.float16
    q, k, v, gen = _inputs(1, 2, 1, L, S, 32, 32, dtype, target, seed=5, spread=2.0)
    kw, mask = _rule_kwargs(cfg, 1, 2, L, S, gen, target, dtype)
    out, lse, grads = check_rule_cuda(q, k, v, mask, hidden_keys=slice(*poison), seed=3, **kw)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    hidden = slice(*poison)
    assert (grads["dk"][:, :, hidden] == 0).all() and (grads["dv"][:, :, hidden] == 0).all()


def _brute_visible(causal, d, left, right, i, j):
    c = i + d
    return (not causal or j <= c) and (left < 0 or j >= c - left) and (right < 0 or j <= c + right)


def test_block_ranges_match_brute_force(target, emulation):
    """attn_key_range / attn_query_range (llmk_params.h), the ranges both kernels loop over: every visible (query,
    key) pair lies inside, the range is the tightest a block grid allows (start on a block edge, end at the last
    visible index + 1), and rows or keys with nothing visible get an empty range."""
    module = emulation
    cases = []
    for L, S in ((5, 9), (9, 5), (17, 17), (40, 3)):
        for causal, right in ((False, -1), (False, 2), (True, -1), (False, 1)):
            for left in (-1, 0, 3, 11):
                for bottom_right in (False, True):
                    cases.append((L, S, causal, S - L if bottom_right else 0, left, right))
    for L, S, causal, d, left, right in cases:
        def visible(i, j):
            return _brute_visible(causal, d, left, right, i, j)

        for tile in (1, 4, 8):
            where = (L, S, causal, d, left, right, tile)
            # key ranges per query block, then query ranges per key block (the pair (i, j) seen from the key side)
            _check_block_ranges(lambda m0, m1: module.attention_key_range(causal, d, left, right, S, m0, m1, tile),
                                L, S, tile, visible, where)
            _check_block_ranges(lambda n0, n1: module.attention_query_range(causal, d, left, right, L, n0, n1, tile),
                                S, L, tile, lambda j, i: visible(i, j), where)


def _check_block_ranges(block_range, n_blocked, n_ranged, tile, visible, where):
    """For every block [b0, b1) of ``tile`` rows of the blocked axis, ``block_range(b0, b1)`` over the other axis is
    the tightest a block grid allows around the indices x with some visible(y, x), y in the block (start on a block
    edge, end at the last such x + 1), and empty when there is none."""
    for b0 in range(0, n_blocked, tile):
        b1 = min(n_blocked, b0 + tile)
        seen = [x for x in range(n_ranged) if any(visible(y, x) for y in range(b0, b1))]
        begin, end = block_range(b0, b1)
        if seen:
            assert (begin, end) == (seen[0] // tile * tile, seen[-1] + 1), (*where, b0)
        else:
            assert begin >= end, (*where, b0)


def test_rule_arguments_are_checked_by_the_op(target):
    """Direct op calls (bypassing contract.py) get a clear error naming the argument."""
    op = getattr(torch.ops, cuda_ext.OPS_NAMESPACE).attention_forward
    q, k, v, _ = _inputs(1, 2, 2, 5, 6, 8, 8, torch.float16, target, seed=1)
    out, lse = torch.empty(1, 2, 5, 8, device=target, dtype=torch.float16), torch.empty(1, 2, 5, device=target)
    plain = [q, k, v, None, 0.0, False, 1.0, None]
    with pytest.raises(RuntimeError, match="window_left"):
        op(*plain, -2, -1, False, 0.0, None, None, out, lse)
    with pytest.raises(RuntimeError, match="window_right must be -1 with is_causal"):
        op(q, k, v, None, 0.0, True, 1.0, None, -1, 3, False, 0.0, None, None, out, lse)
    with pytest.raises(RuntimeError, match="softcap"):
        op(*plain, -1, -1, False, float("nan"), None, None, out, lse)
    with pytest.raises(RuntimeError, match="alibi_slopes must have shape"):
        op(*plain, -1, -1, False, 0.0, torch.ones(2, device=target), None, out, lse)
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32"):
        op(*plain, -1, -1, False, 0.0, torch.ones(1, 2, device=target, dtype=torch.float16), None, out, lse)
    with pytest.raises(RuntimeError, match="sinks must be float32 or q's dtype"):
        op(*plain, -1, -1, False, 0.0, None, torch.ones(2, device=target, dtype=torch.bfloat16), out, lse)
    with pytest.raises(RuntimeError, match="sinks must have shape"):
        op(*plain, -1, -1, False, 0.0, None, torch.ones(3, device=target), out, lse)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_alibi_far_from_every_key_keeps_the_row_sum(target, dt):
    """Bottom-right with L > S and no causal mask: row i's nearest key is L - S - i away, so steep ALiBi slopes give
    lse ~ -slope * 56 ~ -5600, where a float32 lse no longer holds the row sum (kCoarseLse). The backward then takes
    those rows' max and sum from the forward's statistics pass instead of exp(s - lse)."""
    L, S = 60, 4
    q, k, v, gen = _inputs(1, 2, 1, L, S, 16, 16, DTYPES[dt], target, seed=13)
    slopes = torch.tensor([100.0, 0.5], device=target)
    out, lse, _ = check_rule_cuda(q, k, v, alibi_slopes=slopes, causal_alignment="bottom_right", seed=2)
    assert lse[0, 0, 0] < -5000 and torch.isfinite(lse).all()
