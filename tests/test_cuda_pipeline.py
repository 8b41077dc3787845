"""The CUDA backend's double-buffered tile loads (issue 13): the forward's K/V tiles and the backward's Q/dO tiles
stream through two shared-memory buffers with cp.async, the next tile loading while the warps compute on this one
(llmk_device.cuh: load_tile_async, pipeline_next). Two buffers are used where they fit the device's shared memory,
one otherwise; LLMKERNELS_CUDA_STAGES=1 forces one.

The math is unchanged, so both modes must give bitwise the same output, lse and gradients, and each must meet the
float64 reference under the tolerance rule. On a GPU this runs the real kernels; without one it runs the CPU
emulation (tests/cuda_emulation.py), whose cp.async poisons a destination when the copy is issued and writes it
only at the wait: a tile read before its wait, or refilled while a warp still reads it, turns into NaN there, and a
thread that ends with copies in flight fails the launch. The cases are small but cross every loop edge: several
tiles, GQA (the backward's tiles run over the heads of a group), an odd head dim (chunks that cross the last column
load element by element, synchronously), a query tile that sees no key and key blocks that no query sees (loops
of zero tiles, where only the copies issued before the loop are waited for).
"""

import pytest
import torch

from llmkernels import cuda_ext
from attention_check import check_attention
from test_cuda_backend import DTYPES, SMEM_LIMIT, emulation, ext, target  # noqa: F401  (fixtures)

STAGES_ENV = "LLMKERNELS_CUDA_STAGES"

# name: (dtype, B, Hq, Hkv, L, S, E, Ev, rule kwargs, float mask). fp16/bf16 tiles at head dim <= 64: forward
# 64 x 64, backward 64 keys x 64 queries.
CASES = {
    # 3 key tiles per query tile, 2 x 2 (head, query tile) pairs per key block; a float mask also runs the
    # forward kernel's statistics mode inside the backward; E = 59 ends in a partial 16-byte chunk.
    "gqa_odd_head_dim_float_mask": ("fp16", 1, 2, 1, 70, 150, 59, 40, dict(is_causal=True,
                                                                          causal_alignment="bottom_right"), True),
    # d = S - L = -80: rows 0..79 see no key, so the first forward query tile has no key tile at all.
    "query_tile_without_keys": ("bf16", 1, 1, 1, 100, 20, 24, 24, dict(is_causal=True,
                                                                       causal_alignment="bottom_right"), False),
    # keys 20.. are seen by no query (window 4 to the left, none to the right): backward blocks 1 and 2 loop over
    # no query tile.
    "key_blocks_without_queries": ("bf16", 2, 1, 1, 20, 150, 40, 40, dict(window_size=(4, 0)), False),
}


def _run(case, target):
    dt, B, Hq, Hkv, L, S, E, Ev, rule, float_mask = case
    gen = torch.Generator().manual_seed(L * S + E)
    q = torch.randn(B, Hq, L, E, generator=gen).to(target, DTYPES[dt])
    k = torch.randn(B, Hkv, S, E, generator=gen).to(target, DTYPES[dt])
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(target, DTYPES[dt])
    mask = torch.randn(1, Hq, L, S, generator=gen).to(target) if float_mask else None
    out, lse, grads = check_attention("cuda", cuda_ext.dropout_keep_mask, q, k, v, mask, enable_gqa=Hq != Hkv,
                                      **rule)
    return [out, lse, *grads]


@pytest.mark.parametrize("name", list(CASES))
def test_double_buffered_tiles_match_single_buffer_bitwise(target, name, monkeypatch):
    monkeypatch.setenv(STAGES_ENV, "1")
    single = _run(CASES[name], target)
    monkeypatch.delenv(STAGES_ENV)
    double = _run(CASES[name], target)
    assert len(single) == len(double)
    for what, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], single, double):
        assert torch.isfinite(b).all() or what == "lse", what  # lse is -inf on rows that see no key
        assert torch.equal(a, b), f"{name}: {what} differs between one and two tile buffers"


def test_stages_setting_is_checked(target, monkeypatch):
    q = torch.randn(1, 1, 5, 16).to(target, torch.float16)
    monkeypatch.setenv(STAGES_ENV, "3")
    with pytest.raises(RuntimeError, match=f"{STAGES_ENV} must be 1 or 2, got '3'"):
        check_attention("cuda", cuda_ext.dropout_keep_mask, q, q, q)


def test_second_buffer_fits_where_the_kernels_say(ext):
    """attention_config's two sizes: the second buffer adds exactly one K and V tile (forward) or one Q and dO tile
    (backward); every config fits sm_90 with it, and on sm_80 only the forward's fp32 and the backward's fp16/bf16
    at head dim 256 fall back to one buffer (the comments in attention_fwd.cu / attention_bwd.cu)."""
    too_big_for_sm80 = set()
    for dtype, size in ((torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)):
        for D in (64, 128, 256):
            for backward in (False, True):
                cfg = cuda_ext.attention_config(dtype, D, D, backward)
                rows = cfg["block_m"] if backward else cfg["block_n"]
                pad = 16 // size
                assert cfg["smem_bytes_pipelined"] - cfg["smem_bytes"] == 2 * rows * (D + pad) * size
                assert cfg["smem_bytes"] <= SMEM_LIMIT[80]
                assert cfg["smem_bytes_pipelined"] <= SMEM_LIMIT[90]
                if cfg["smem_bytes_pipelined"] > SMEM_LIMIT[80]:
                    too_big_for_sm80.add(("bwd" if backward else "fwd", str(dtype).split(".")[1], D))
    assert too_big_for_sm80 == {("fwd", "float32", 256), ("bwd", "float16", 256), ("bwd", "bfloat16", 256)}
