"""The CUDA C++ backend (llmkernels/csrc/, llmkernels/cuda_ext.py).

Without a GPU (CI, the development machines) this builds the extension just in time with nvcc, imports it, checks
that every op is registered in torch.ops.llmkernels_cuda with the expected schema, that the fake implementations
work, and that no kernel spills on sm_80 or sm_90 (ptxas's report, printed). The correctness tests compare the
kernels with the float64 einsum reference under the tolerance rule (output, lse, every gradient) and run only on
a GPU; without one they are skipped, visibly.
"""

import math
import os
import time

import pytest
import torch

import llmkernels
from llmkernels import cuda_build, cuda_ext, dispatch, reference
import attention_check
from attention_check import leaf
from tolerance import assert_by_rule

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (the CUDA kernels cannot run on CPU); "
                                                   "without one only the build, registration and spill checks run")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # shared memory a block may opt into (A100, H100/H200)


@pytest.fixture(scope="module")
def ext():
    """The extension, built just in time if no build is cached (a cold build takes about 2-3 minutes on 2 cores)."""
    if cuda_build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine: the extension cannot be built")
    start = time.time()
    module = cuda_ext.load()
    print(f"\nCUDA extension ready in {time.time() - start:.0f} s: {module.__file__}")
    return module


# ----------------------------------------------------------------------------------------------------------------
# build, registration, static checks (no GPU needed)

EXPECTED_SCHEMAS = {
    "attention_forward": "llmkernels_cuda::attention_forward(Tensor q, Tensor k, Tensor v, Tensor? mask, "
                         "float dropout_p, bool is_causal, float scale, Tensor? rng_state, int window_left, "
                         "int window_right, bool bottom_right, float softcap, Tensor? alibi_slopes, Tensor? sinks, "
                         "Tensor(a!) out, Tensor(b!) lse) -> ()",
    "attention_backward": "llmkernels_cuda::attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
                          "Tensor out, Tensor lse, Tensor? grad_lse, Tensor? mask, float dropout_p, bool is_causal, "
                          "float scale, Tensor? rng_state, int window_left, int window_right, bool bottom_right, "
                          "float softcap, Tensor? alibi_slopes, Tensor? sinks, Tensor(a!) dq, Tensor(b!) dk, "
                          "Tensor(c!) dv, Tensor(d!)? dmask) -> ()",
    "masked_softmax_forward": "llmkernels_cuda::masked_softmax_forward(Tensor x, Tensor? mask, float scale, "
                              "bool is_causal, Tensor(a!) y) -> ()",
    "masked_softmax_backward": "llmkernels_cuda::masked_softmax_backward(Tensor grad_y, Tensor y, float scale, "
                               "Tensor(a!) dx) -> ()",
    "dropout_keep_mask": "llmkernels_cuda::dropout_keep_mask(Tensor rng_state, float dropout_p, "
                         "Tensor(a!) keep) -> ()",
}


def test_every_op_registered_with_its_schema(ext):
    for name, schema in EXPECTED_SCHEMAS.items():
        op = getattr(torch.ops.llmkernels_cuda, name)
        assert str(op.default._schema) == schema
        # The kernels are registered for CUDA only: a CPU call is a dispatcher error, not a silent fallback.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CUDA")
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")


def test_module_reports_configs(ext):
    for dtype in (0, 1, 2):
        for E, Ev, bucket in ((1, 1, 64), (64, 40, 64), (65, 8, 128), (128, 128, 128), (130, 256, 256)):
            for backward in (False, True):
                cfg = ext.attention_config(dtype, E, Ev, backward)
                assert cfg["head_dim_bucket"] == bucket
                assert cfg["threads"] == cfg["block_m"] // 16 * 32 > 0
                assert 0 < cfg["smem_bytes"] <= SMEM_LIMIT[80]
    # Every row length gets a kernel; the register variants cover their limits exactly.
    assert [ext.softmax_variant(n) for n in (1, 256, 257, 512, 513, 4096, 4097, 10**9)] == [0, 0, 1, 1, 2, 2, 3, 3]


NO_RULE = (-1, -1, False, 0.0, None, None)  # the rule arguments of a plain attention


def test_fake_implementations_check_shapes(ext):
    """The fakes run under meta tensors (no GPU) and reject outputs of the wrong shape."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q, k, v = torch.empty(2, 4, 17, 40, **meta), torch.empty(2, 2, 9, 40, **meta), torch.empty(2, 2, 9, 24, **meta)
    out, lse = torch.empty(2, 4, 17, 24, **meta), torch.empty(2, 4, 17, device="meta")
    torch.ops.llmkernels_cuda.attention_forward(q, k, v, None, 0.0, True, 0.3, None, *NO_RULE, out, lse)
    with pytest.raises(ValueError, match="out must be"):
        torch.ops.llmkernels_cuda.attention_forward(q, k, v, None, 0.0, True, 0.3, None, *NO_RULE, out[..., :5],
                                                    lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask = torch.empty(2, 4, 17, 9, device="meta")
    dmask = torch.empty(2, 4, 17, 9, device="meta")
    torch.ops.llmkernels_cuda.attention_backward(out, q, k, v, out, lse, None, mask, 0.0, False, 0.3, None, *NO_RULE,
                                                 dq, dk, dv, dmask)
    with pytest.raises(ValueError, match="dk must be"):
        torch.ops.llmkernels_cuda.attention_backward(out, q, k, v, out, lse, None, None, 0.0, False, 0.3, None,
                                                     *NO_RULE, dq, dq, dv, None)
    x = torch.empty(3, 1, 5, 7, **meta)
    torch.ops.llmkernels_cuda.masked_softmax_forward(x, None, 1.0, False, torch.empty_like(x))
    with pytest.raises(ValueError, match="y must be"):
        torch.ops.llmkernels_cuda.masked_softmax_forward(x, None, 1.0, False, torch.empty(3, 1, 5, 7, device="meta"))
    torch.ops.llmkernels_cuda.masked_softmax_backward(x, x, 1.0, torch.empty_like(x))


def _expected_kernels() -> set:
    names = set()
    for t in ("__half", "__nv_bfloat16", "float"):
        for d in (64, 128, 256):
            names.add(f"void attn_fwd_kernel<{t}, {d}>(AttnFwdParams)")
            names.add(f"void attn_bwd_kernel<{t}, {d}>(AttnBwdParams)")
        names.add(f"void attn_bwd_delta_kernel<{t}>(AttnDeltaParams)")
        for direction, P in (("fwd", "SoftmaxFwdParams"), ("bwd", "SoftmaxBwdParams")):
            names |= {f"void softmax_{direction}_regs_kernel<{t}, {tpr}, {ept}>({P})"
                      for tpr, ept in ((32, 8), (32, 16), (256, 16))}
            names.add(f"void softmax_{direction}_stream_kernel<{t}>({P})")
    names.add("dropout_mask_kernel(DropoutMaskParams)")
    return names


def test_no_kernel_spills_on_sm80_and_sm90(ext):
    rows = cuda_ext.kernel_report((80, 90))
    print("\n" + cuda_ext.format_report(rows))
    for arch in (80, 90):
        found = {r["kernel"] for r in rows if r["arch"] == arch}
        missing = _expected_kernels() - found
        assert not missing, f"sm_{arch}: kernels missing from the report: {sorted(missing)}"
    problems = []
    for r in rows:
        where = f"sm_{r['arch']} {r['kernel']}"
        if r["spill_stores"] is None:
            problems.append(f"{where}: no ptxas report (build.log missing)")
        elif r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{where}: spills {r['spill_stores']} B stored, {r['spill_loads']} B loaded")
        if r["local_bytes"]:
            problems.append(f"{where}: {r['local_bytes']} B of local memory per thread")
        if r["smem"] > SMEM_LIMIT[r["arch"]]:
            problems.append(f"{where}: {r['smem']} B of shared memory > {SMEM_LIMIT[r['arch']]}")
        half = "attn_" in r["kernel"] and "_kernel<float" not in r["kernel"] and "delta" not in r["kernel"]
        if half and not r["uses_mma"]:
            problems.append(f"{where}: fp16/bf16 attention kernel without tensor-core MMA in its SASS")
        tiled = "attn_fwd_kernel" in r["kernel"] or "attn_bwd_kernel" in r["kernel"]
        if tiled and r["async_copies"] is not None and not r["async_copies"]:
            problems.append(f"{where}: no cp.async (LDGSTS) in its SASS: the streamed tiles load synchronously")
    assert not problems, "\n".join(problems)


def test_build_configuration_is_shared(monkeypatch):
    """setup.py's ahead-of-time build and the JIT build use the same sources and flags; the arch list comes from
    LLMKERNELS_CUDA_ARCHS (default sm_80 + sm_90, plus PTX of the newest)."""
    monkeypatch.delenv(cuda_build.ARCH_ENV, raising=False)
    assert cuda_build.cuda_archs() == (80, 90)
    flags = cuda_build.nvcc_flags()
    assert "-gencode=arch=compute_80,code=sm_80" in flags and "-gencode=arch=compute_90,code=sm_90" in flags
    assert "-gencode=arch=compute_90,code=compute_90" in flags and "-Xptxas=-v" in flags
    assert not any("fast_math" in f for f in flags)
    monkeypatch.setenv(cuda_build.ARCH_ENV, "8.6; sm_90,80")
    assert cuda_build.cuda_archs() == (80, 86, 90)
    monkeypatch.setenv(cuda_build.ARCH_ENV, "75")
    with pytest.raises(ValueError, match="too old"):
        cuda_build.cuda_archs()
    monkeypatch.setenv(cuda_build.ARCH_ENV, "90")
    assert cuda_ext._arch_runs_on((90,), (9, 0)) and not cuda_ext._arch_runs_on((90,), (8, 0))
    assert cuda_ext._arch_runs_on((80, 90), (8, 9)) and cuda_ext._arch_runs_on((80, 90), (12, 0))
    for s in cuda_build.source_paths():
        assert os.path.exists(s), s
    if cuda_build.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit: cannot construct the setup.py extension")
    kwargs = cuda_build.cuda_build_kwargs()
    (extension,) = kwargs["ext_modules"]
    assert extension.name == "llmkernels._cuda"
    assert [os.path.join(str(cuda_build.ROOT), s) for s in extension.sources] == cuda_build.source_paths()
    assert cuda_build.nvcc_flags()[-1] == "-gencode=arch=compute_90,code=compute_90"
    assert set(cuda_build.nvcc_flags()) <= set(extension.extra_compile_args["nvcc"])


def test_cpu_tensors_are_refused_with_a_reason():
    a = llmkernels.contract.check_attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    assert dispatch.get_backend("cuda").attention_reasons(a) == ["runs on CUDA tensors only, got a cpu tensor"]
    with pytest.raises(dispatch.NotSupportedError, match="CUDA tensors only"):
        llmkernels.scaled_dot_product_attention(a.q, a.k, a.v, backend="cuda")


# ----------------------------------------------------------------------------------------------------------------
# correctness: on a GPU ("gpu"), and everywhere through the CPU emulation of the same sources ("emulated")
#
# tests/cuda_emulation.py compiles llmkernels/csrc/ (kernels and host code) for the CPU with one OS thread per CUDA
# thread; the backend's ops are pointed at it and the public API runs unchanged on CPU tensors. It checks the kernels'
# logic (indexing, masking, online softmax, barriers, backward math, dropout regeneration) without a GPU; the
# "gpu" variants check the real thing (MMA hardware layout, races, the compiled code) and are skipped without one.


@pytest.fixture(scope="module")
def emulation(ext):
    import cuda_emulation

    start = time.time()
    module = cuda_emulation.load()
    print(f"\nCPU emulation of the CUDA sources ready in {time.time() - start:.0f} s")
    return module


@pytest.fixture(params=["gpu", "emulated"])
def target(request, ext, monkeypatch):
    """The device the backend runs on: "cuda" (real kernels) or "cpu" (the emulated kernels)."""
    if request.param == "gpu":
        if not HAS_GPU:
            pytest.skip("needs a CUDA GPU (the CUDA kernels cannot run on CPU); the emulated variant ran instead")
        return "cuda"
    if HAS_GPU:
        pytest.skip("a GPU is present: the real kernels are tested (the gpu variant) instead of the emulation")
    request.getfixturevalue("emulation")
    monkeypatch.setattr(cuda_ext, "OPS_NAMESPACE", "llmkernels_emu")
    monkeypatch.setattr(dispatch.CudaBackend, "attention_reasons", lambda self, a: [])
    monkeypatch.setattr(dispatch.CudaBackend, "softmax_reasons", lambda self, a: [])
    return "cpu"


def _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, L, E, generator=gen).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=gen).to(device, dtype)
    v = torch.randn(B, Hkv, S, Ev, generator=gen).to(device, dtype)
    return q, k, v


def _make_mask(kind, shape, device, seed=7):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(shape, generator=gen) < 0.8
    if kind == "bool":
        return keep.to(device)
    return torch.randn(shape, generator=gen).masked_fill(~keep, float("-inf")).to(device)


def check_attention(q, k, v, mask=None, **kwargs):
    """tests/attention_check.check_attention on the cuda backend (the real kernels or the emulated ones): output,
    lse, dq, dk, dv and the float mask's gradient against the float64 reference under the tolerance rule; the
    gradient also flows in through lse. Returns (out, lse, grads)."""
    return attention_check.check_attention("cuda", cuda_ext.dropout_keep_mask, q, k, v, mask, **kwargs)


# (B, Hq, L, S, E, Ev, dtype, mask kind, mask shape, causal, scale): every head-dim bucket, odd sizes, L != S.
CASES = [
    (1, 2, 1, 1, 16, 16, "fp32", None, None, False, None),
    (1, 1, 1, 1, 1, 1, "fp16", None, None, True, None),
    (2, 3, 17, 17, 32, 32, "fp16", None, None, True, None),
    (1, 2, 128, 129, 64, 64, "bf16", None, None, False, None),
    (1, 1, 129, 128, 72, 72, "fp16", "float", "LS", False, None),
    (1, 2, 300, 17, 80, 80, "fp32", "bool", "B1LS", True, None),
    (1, 2, 17, 300, 96, 96, "bf16", "float", "1H1S", True, None),
    (2, 1, 33, 47, 40, 24, "bf16", "float", "B1LS", True, 0.3),
    (1, 1, 20, 33, 160, 192, "fp16", "bool", "LS", False, 1.7),
    (1, 1, 77, 65, 256, 256, "fp32", "float", "LS", True, None),
    (1, 2, 95, 200, 256, 200, "bf16", "bool", "B1LS", False, None),
    (1, 2, 65, 31, 8, 48, "fp32", None, None, True, 0.05),
    (1, 1, 257, 511, 128, 128, "fp16", None, None, True, None),
    (1, 1, 200, 130, 64, 130, "fp32", "bool", "LS", False, None),
]


@pytest.mark.parametrize("B,H,L,S,E,Ev,dt,mask_kind,mask_shape,causal,scale", CASES,
                         ids=[f"B{c[0]}H{c[1]}L{c[2]}S{c[3]}E{c[4]}Ev{c[5]}-{c[6]}-{c[7]}{c[8] or ''}"
                              f"{'-causal' if c[9] else ''}{'-scale' if c[10] else ''}" for c in CASES])
def test_attention_matches_reference(target, B, H, L, S, E, Ev, dt, mask_kind, mask_shape, causal, scale):
    q, k, v = _inputs(B, H, H, L, S, E, Ev, DTYPES[dt], target)
    mask = None
    if mask_kind:
        shape = {"LS": (L, S), "B1LS": (B, 1, L, S), "1H1S": (1, H, 1, S)}[mask_shape]
        mask = _make_mask(mask_kind, shape, target)
    check_attention(q, k, v, mask, is_causal=causal, scale=scale)


@pytest.mark.parametrize("Hq,Hkv,dt,mask_kind,causal", [
    (4, 2, "fp16", None, True), (6, 1, "fp32", "float", False), (8, 2, "bf16", "bool", True)])
def test_attention_gqa(target, Hq, Hkv, dt, mask_kind, causal):
    B, L, S, E = 2, 37, 29, 24
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, E, DTYPES[dt], target, seed=3)
    mask = _make_mask(mask_kind, (B, Hq, L, S), target) if mask_kind else None
    check_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)


@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_attention_layouts(target, dt):
    """(B, L, H, E) transposed views, a last dim with stride 2 and a misaligned start all take the scalar or
    strided paths of the tile loads and must give the same answers."""
    dtype = DTYPES[dt]
    B, H, L, S, E = 2, 3, 45, 38, 40
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, L, H, E, generator=gen).to(target, dtype).transpose(1, 2)
    k = torch.randn(B, S, H, 2 * E, generator=gen).to(target, dtype).transpose(1, 2)[..., ::2]
    flat = torch.randn(B * H * S * E + 1, generator=gen).to(target, dtype)
    v = flat[1:].view(B, H, S, E)  # storage offset 1: not 16-byte aligned
    mask = _make_mask("float", (B, H, L, S), target).transpose(-1, -2).contiguous().transpose(-1, -2)
    check_attention(q, k, v, mask, is_causal=True)


def test_attention_fully_masked_rows(target):
    B, H, L, S, E = 1, 2, 23, 19, 16
    q, k, v = _inputs(B, H, H, L, S, E, E, torch.float16, target, seed=11)
    keep = torch.rand(B, H, L, S, generator=torch.Generator().manual_seed(2)) < 0.7
    dead = [0, 5, 22]
    keep[:, :, dead] = False
    out, lse, grads = check_attention(q, k, v, keep.to(target))
    assert (out[:, :, dead] == 0).all() and torch.isneginf(lse[:, :, dead]).all()
    assert (grads[0][:, :, dead] == 0).all() and all(torch.isfinite(g).all() for g in grads)
    additive = torch.zeros(L, S).masked_fill(~keep[0, 0], float("-inf")).to(target)
    out, lse, grads = check_attention(q.float(), k.float(), v.float(), additive)
    assert (out[:, :, dead] == 0).all() and all(torch.isfinite(g).all() for g in grads)
    # Causal with L > S: rows see keys j <= i; hiding key 0 leaves row 0 with nothing.
    hide_first = torch.ones(L, S, dtype=torch.bool)
    hide_first[:, 0] = False
    out, lse, _ = check_attention(q, k, v, hide_first.to(target), is_causal=True)
    assert (out[:, :, 0] == 0).all() and torch.isneginf(lse[:, :, 0]).all() and torch.isfinite(lse[:, :, 1:]).all()


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp16"])
def test_attention_float_mask_at_the_dtype_minimum(target, dt):
    """transformers' additive masks, (1 - mask) * finfo(dtype).min, are added as the contract says: a row whose every
    key carries the minimum averages V as PyTorch does (scaling the mask by log2(e) first overflowed to -inf there
    and gave 0), forward and backward; a row with some keys at the minimum ignores them.

    Gradients flow in through the output only: at lse ~ -3.4e38 the references' own lse gradient is off (their
    logsumexp backward, exp(s - lse), loses the row sum in the rounding of lse, the flaw the kernels' statistics pass
    avoids), so attention_check's random lse gradient would compare against a wrong value."""
    dtype = DTYPES[dt]
    q, k, v = _inputs(1, 2, 2, 8, 8, 16, 16, dtype, target, seed=9)
    lowest = torch.finfo(dtype).min
    mask = torch.zeros(1, 1, 8, 8, dtype=dtype)
    mask[..., 3, :] = lowest
    mask[..., 5, ::2] = lowest
    mask = mask.to(target)
    grad_out = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(2)).to(target, dtype)

    def run(cast, backend=None, compute_dtype=None):
        ins = [leaf(t.to(cast)) for t in (q, k, v, mask)]
        if backend:
            out, lse = llmkernels.scaled_dot_product_attention(*ins, return_lse=True, backend=backend)
        else:
            out, lse = reference.scaled_dot_product_attention(*ins, return_lse=True, compute_dtype=compute_dtype)
        return out, lse, torch.autograd.grad(out, ins, grad_out.to(cast))

    ours, ref64, naive = run(dtype, "cuda"), run(torch.float64, compute_dtype=torch.float64), run(dtype)
    for name, a, r, n in zip(("out", "lse", "dq", "dk", "dv", "dmask"), (ours[0], ours[1], *ours[2]),
                             (ref64[0], ref64[1], *ref64[2]), (naive[0], naive[1], *naive[2])):
        assert torch.isfinite(a).all(), name
        assert_by_rule(name, a.cpu(), r.cpu(), n.cpu(), dtype)
    # Row 3 against PyTorch's SDPA (in the input dtype) and the float64 mean of V, under the tolerance rule.
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu())
    assert_by_rule("row 3", ours[0][:, :, 3].cpu(), v.cpu().double().mean(dim=-2), sdpa[:, :, 3], dtype)
    assert ours[0][:, :, 3].abs().max() > 0.01


def test_masked_softmax_float_mask_at_the_dtype_minimum(target):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 5, 40, generator=torch.Generator().manual_seed(4)).to(target, dtype)
        mask = torch.zeros(5, 40, dtype=dtype)
        mask[1] = torch.finfo(dtype).min  # every key at the minimum: what torch.softmax gives, not 0
        mask[2, 7:] = torch.finfo(dtype).min
        y = check_softmax(x, mask.to(target), scale=0.5)
        torch_y = torch.softmax(0.5 * x.cpu().float() + mask.float(), dim=-1)
        assert_by_rule("row 1", y[:, :, 1].cpu(), torch_y[:, :, 1].double(), torch_y[:, :, 1].to(dtype), dtype)
        assert (y[:, :, 1].float() > 0).all()


@pytest.mark.parametrize("dt,Hq,Hkv,mask_kind,causal", [
    ("fp32", 2, 2, None, False), ("bf16", 4, 2, "float", True), ("fp16", 3, 1, "bool", False)])
def test_attention_dropout_exact(target, dt, Hq, Hkv, mask_kind, causal):
    """With the keep pattern the kernels draw (dropout_keep_mask regenerates it from the op's rng_state), the
    output, lse and every gradient match the reference: the backward regenerated the forward's pattern."""
    B, L, S, E, p = 2, 33, 41, 32, 0.3
    q, k, v = _inputs(B, Hq, Hkv, L, S, E, E, DTYPES[dt], target, seed=21)
    mask = _make_mask(mask_kind, (L, S), target) if mask_kind else None
    check_attention(q, k, v, mask, is_causal=causal, enable_gqa=Hq != Hkv, dropout_p=p)


def test_dropout_keep_rate_and_streams(target):
    shape = (2, 4, 256, 257) if target == "cuda" else (1, 2, 64, 129)
    n = math.prod(shape)
    for p in (0.1, 0.5, 0.9):
        state = torch.tensor([1234, 99], dtype=torch.int64, device=target)
        keep = cuda_ext.dropout_keep_mask(state, shape, p, target)
        rate = keep.float().mean().item()
        assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), (p, rate)
        assert torch.equal(keep, cuda_ext.dropout_keep_mask(state, shape, p, target))  # deterministic
        other = cuda_ext.dropout_keep_mask(torch.tensor([1234, 100], device=target), shape, p, target)
        agree = (keep == other).float().mean().item()  # another offset: an independent pattern
        same = p * p + (1 - p) ** 2
        assert abs(agree - same) < 6 * math.sqrt(same * (1 - same) / n), (p, agree)
    # Through the op: with uniform weights, the output's mean is E[keep / (1 - p)] = 1.
    q = torch.randn(1, 1, 64, 16, device=target)
    v = torch.ones(1, 1, 4096, 16, device=target)
    out = llmkernels.scaled_dot_product_attention(q, torch.zeros_like(v), v, dropout_p=0.25, backend="cuda")
    assert abs(out.mean().item() - 1.0) < 0.02


def test_attention_errors_name_the_argument(target):
    op = getattr(torch.ops, cuda_ext.OPS_NAMESPACE).attention_forward
    q, k, v = _inputs(1, 2, 2, 5, 6, 8, 8, torch.float16, target)
    out, lse = torch.empty(1, 2, 5, 8, device=target, dtype=torch.float16), torch.empty(1, 2, 5, device=target)
    with pytest.raises(RuntimeError, match="lse must be"):
        op(q, k, v, None, 0.0, False, 1.0, None, *NO_RULE, out, lse.half())
    with pytest.raises(RuntimeError, match="mask must have shape"):
        op(q, k, v, torch.ones(1, 2, 5, 5, dtype=torch.bool, device=target), 0.0, False, 1.0, None, *NO_RULE, out,
           lse)
    with pytest.raises(RuntimeError, match="rng_state"):
        op(q, k, v, None, 0.1, False, 1.0, None, *NO_RULE, out, lse)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        op(q, k.float(), v, None, 0.0, False, 1.0, None, *NO_RULE, out, lse)
    big = torch.zeros(1, 2, 5, 300, device=target, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dims"):
        op(big, big, v[:, :, :5], None, 0.0, False, 1.0, None, *NO_RULE, out, lse)
    if target == "cuda":
        a = llmkernels.contract.check_attention(*_inputs(1, 1, 1, 3, 3, 300, 8, torch.float16, target))
        assert any("head dims up to 256" in r for r in cuda_ext.attention_reasons(a))


@needs_gpu
def test_opcheck(ext):
    q, k, v = _inputs(1, 2, 1, 19, 23, 40, 24, torch.bfloat16, "cuda")
    out, lse = torch.empty(1, 2, 19, 24, device="cuda", dtype=torch.bfloat16), torch.empty(1, 2, 19, device="cuda")
    torch.library.opcheck(torch.ops.llmkernels_cuda.attention_forward.default,
                          (q, k, v, None, 0.0, True, 0.2, None, *NO_RULE, out, lse))
    x = torch.randn(2, 3, 5, 300, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.llmkernels_cuda.masked_softmax_forward.default,
                          (x, None, 0.5, True, torch.empty_like(x)))


# ---- masked softmax ----

def check_softmax(x, mask=None, *, scale=1.0, is_causal=False, dim=-1):
    dtype = x.dtype
    mask_leaf = mask is not None and mask.dtype != torch.bool
    xs, ms = leaf(x), (leaf(mask) if mask_leaf else mask)
    y = llmkernels.masked_softmax(xs, ms, scale=scale, is_causal=is_causal, dim=dim, backend="cuda")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(x.device)
    wanted = [t for t in (xs, ms) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy.to(dtype))

    def run_reference(cast, compute_dtype):
        xr = leaf(x.to(cast))
        mr = leaf(mask.to(torch.float64 if cast == torch.float64 else mask.dtype)) if mask_leaf else mask
        yr = reference.masked_softmax(xr, mr, scale=scale, is_causal=is_causal, dim=dim, compute_dtype=compute_dtype)
        w = [t for t in (xr, mr) if t is not None and t.requires_grad]
        return yr, torch.autograd.grad(yr, w, dy.to(yr.dtype))

    ref_y, ref_g = run_reference(torch.float64, torch.float64)
    naive_y, naive_g = run_reference(dtype, None)
    assert y.dtype == dtype
    assert_by_rule("y", y, ref_y, naive_y, dtype)
    for name, g, rg, ng in zip(("dx", "dmask"), grads, ref_g, naive_g):
        assert_by_rule(name, g, rg, ng, dtype)
    return y


# Row lengths around every variant's limit (warp 8/16 per lane, block in registers, online two-pass).
@pytest.mark.parametrize("N", [1, 7, 256, 257, 512, 513, 4096, 4097, 10007])
@pytest.mark.parametrize("dt", ["fp32", "fp16", "bf16"])
def test_softmax_row_lengths(target, N, dt):
    gen = torch.Generator().manual_seed(N)
    x = (3 * torch.randn(2, 3, 5, N, generator=gen)).to(target, DTYPES[dt])
    check_softmax(x, scale=0.7)


@pytest.mark.parametrize("N", [33, 300, 1000, 5000])
@pytest.mark.parametrize("mask_kind,mask_shape,causal", [
    ("bool", (2, 1, 1, -1), False), ("float", (1, 3, -2, -1), True), (None, None, True), ("bool", (-2, -1), True)])
def test_softmax_masks(target, N, mask_kind, mask_shape, causal):
    M = 37 if target == "cuda" else 7  # the emulation runs every CUDA thread as an OS thread: fewer rows
    x = torch.randn(2, 3, M, N, generator=torch.Generator().manual_seed(1)).to(target, torch.float16)
    mask = None
    if mask_kind:
        shape = tuple(N if s == -1 else M if s == -2 else s for s in mask_shape)
        mask = _make_mask(mask_kind, shape, target, seed=N)
    y = check_softmax(x, mask, is_causal=causal)
    if causal:
        assert (y.float().triu(1) == 0).all()


def test_softmax_layouts_and_dead_rows(target):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 300, 6, generator=gen).to(target)
    check_softmax(base.transpose(1, 2))                       # strided rows
    check_softmax(base[..., 1:], dim=1)                       # softmax over a non-last dim (a transposed view)
    x = torch.randn(3, 700, generator=gen).to(target).half()
    keep = torch.rand(3, 700, generator=gen).to(target) < 0.5
    keep[1] = False                                            # a fully masked row: 0 and zero gradient
    y = check_softmax(x, keep)
    assert (y[1] == 0).all()
    flat = torch.randn(5 * 129 + 1, generator=gen).to(target).bfloat16()
    check_softmax(flat[1:].view(5, 129), scale=2.0)           # misaligned start: scalar loads
