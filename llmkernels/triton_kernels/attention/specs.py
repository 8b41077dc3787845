"""Static compile specs of the attention kernels: every (kernel, dtype, head-dim bucket, variant, config) that the
GPU autotuner can choose from ``configs.py``, typed as a launch would type it, for ``compile_check`` to compile
for sm_80 / sm_90 without a GPU (registers, spills, shared memory, HGMMA). The launch configs were pruned with
this check; ``configs.excluded_configs`` lists what was left out and why.
"""

from __future__ import annotations

import torch
import triton

from ..compile_check import CompileSpec
from .backward import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel
from .configs import PREPROCESS_BLOCK_M, _configs_for, _precision_class, _split_dkdv, _varlen_configs_for
from .forward import _attn_fwd_kernel


_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _spec(name, fn, args: dict, cfg, expect_mma: bool):
    """A CompileSpec from the values a launch would pass, typed as the JIT would type them: a string value is a
    pointer type, an int equal to 1 becomes the constant 1 (the JIT specialises it, which is what makes the
    unit-stride loads vectorisable), other ints are i32 with the 16-divisibility hint when it holds, floats fp32,
    and the keyword constexprs stay constexpr."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        arg, value = param.name, args[param.name]
        if param.is_constexpr or value is None:  # None (an absent optional pointer) is a constant, as in the JIT
            signature[arg], constexprs[arg] = "constexpr", value
        elif isinstance(value, str):
            signature[arg] = value
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif isinstance(value, int):
            if value == 1:
                signature[arg], constexprs[arg] = "constexpr", 1
            else:
                signature[arg] = "i32"
                if value % 16 == 0:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32"
    return CompileSpec(name=name, fn=fn, signature=signature, constexprs=constexprs, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, expect_mma=expect_mma, attrs=attrs)


# Shape the specs are compiled for: contiguous (B, H, L, D) tensors, L and S multiples of 16 (the JIT makes a
# variant without the divisibility hints for other lengths; it has the same tiles and register budget).
_SPEC_H, _SPEC_L = 16, 4096

# Flags each variant's configs are compiled with: the heaviest code of that variant (the causal diagonal, an
# additive fp32 mask and, in dQ, the mask gradient), which bounds the register pressure of its lighter calls.
_FLAG_SETS = {
    "base": dict(IS_CAUSAL=True, HAS_MASK=True, MASK_IS_BOOL=False, HAS_DROPOUT=False),
    "dropout": dict(IS_CAUSAL=True, HAS_MASK=True, MASK_IS_BOOL=False, HAS_DROPOUT=True),
}
# The score rule's heaviest code, compiled on top of each variant's flags (same configs): a window's left side
# with causality (three key phases: the window's left edge, plain, the diagonal), softcap (tanh per score, and
# its gradient factor live in the backward), ALiBi and sinks.
_RULE_FLAGS = dict(WINDOW_LEFT=True, WINDOW_RIGHT=False, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_SINKS=True)
_NO_RULE = dict(WINDOW_LEFT=False, WINDOW_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False)
# Packed variable-length calls (VARLEN, varlen_launch.py): no mask and no sinks exist there, the cu_seqlens search
# and per-sequence offsets are the extra code; (T, H, D) tensors as (1, H, T, D) views (batch stride 0).
_VARLEN_FLAGS = dict(HAS_MASK=False, MASK_IS_BOOL=False, HAS_SINKS=False, VARLEN=True)


def _common_args(dtype, head_dim, flags):
    dt = "*" + _TRITON_DTYPE[dtype]
    H, L, D = _SPEC_H, _SPEC_L, head_dim
    t_strides = (H * L * D, L * D, D, 1)
    names = {}
    for prefix in ("q", "k", "v", "o", "do"):
        for suffix, value in zip(("b", "h", "m" if prefix in ("q", "o", "do") else "n", "d"), t_strides):
            names[f"stride_{prefix}{suffix}"] = value
    if flags.get("VARLEN"):
        t_strides = (0, D, H * D, 1)
    mask_strides = (0, 0, L, 1) if flags.get("HAS_MASK") else (0, 0, 0, 0)
    for suffix, value in zip(("b", "h", "m", "n"), mask_strides):
        names[f"stride_mask_{suffix}"] = value
    names.update(Q=dt, K=dt, V=dt, Out=dt, dO=dt, dQ=dt, dK=dt, dV=dt,
                 Mask="*fp32" if flags.get("HAS_MASK") else dt,
                 RngState="*i64" if flags.get("HAS_DROPOUT") else "*fp32",
                 Lse="*fp32", ScoreLse="*fp32", Delta="*fp32", dMask="*fp32" if flags.get("WRITE_DMASK") else dt,
                 Alibi="*fp32", Sinks="*fp32", diag=7, win_left=4095, win_right=0, softcap=30.0, stride_alibi_b=H,
                 stride_alibi_h=1, stride_sinks=1,
                 Hq=H, Hkv=H // 2, L=L, S=L, GROUP=2, scale=0.1, dropout_p=0.1, L_BUCKET=L, S_BUCKET=L,
                 HEAD_DIM=D, HEAD_DIM_V=D, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                 BLOCK_D=D, BLOCK_DV=D, EVEN_M=L % 128 == 0, DO_DK=True, DO_DV=True, CuSeqQ=None, CuSeqK=None,
                 num_seqs=1, search_steps=0, VARLEN=False)
    if flags.get("VARLEN"):
        names.update(CuSeqQ="*i32", CuSeqK="*i32", num_seqs=64, search_steps=6)
    names.update(flags)
    return names


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def compile_specs(arch: int) -> list:
    """Every (kernel, dtype, head-dim bucket, variant, config) the autotuner can pick on sm_<arch>, compiled with
    the heaviest flags of its variant, without and with the score rule's heaviest flags (``_RULE_FLAGS``), plus
    the preprocess kernel. Head dims below 64 share the 64 bucket and are
    compiled at 64 (its largest tiles); E != Ev takes the bucket of the larger. Where dK and dV are split
    (_split_dkdv), each of the two launches is a spec. Where fp32 offers one config list for both variants, it is
    compiled with dropout only (the heavier flags). Each of these is compiled a second time in the VARLEN mode
    (packed sequences, ``_VARLEN_FLAGS``; names with " varlen") for fp16, with the configs varlen calls are
    offered (``configs._varlen_configs_for``)."""
    specs = []
    for kernel, fn in _KERNELS.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            precision = _precision_class(dtype)
            for bucket in (64, 128, 256):
                parts = [(True, True)]
                if kernel == "dkdv" and _split_dkdv(bucket, dtype):
                    parts = [(True, False), (False, True)]
                for variant, rule in ((v, r) for v in ("base", "dropout") for r in (False, True)):
                    configs = _configs_for(arch, kernel, precision, bucket, variant, rule) or []
                    if (precision == "fp32" and variant == "base"
                            and configs == _configs_for(arch, kernel, precision, bucket, "dropout", rule)):
                        continue  # fp32 offers one list for both variants: its dropout specs bound the base calls
                    # VARLEN: fp16 only (bf16 compiles to the same tiles, only the mma operand type differs, and
                    # its dense specs cover it; fp32 varlen does not run on a GPU, see configs._VARLEN_EXCLUDED),
                    # with the configs offered to varlen calls.
                    varlen_keys = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in
                                   _varlen_configs_for(arch, kernel, precision, bucket, variant, rule) or []]
                    modes = (False, True) if dtype == torch.float16 else (False,)
                    for cfg, (do_dk, do_dv), varlen in ((c, p, m) for c in configs for p in parts for m in modes
                                                        if not m or (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                                     c.num_warps, c.num_stages) in varlen_keys):
                        flags = dict(_FLAG_SETS[variant], **(_RULE_FLAGS if rule else _NO_RULE))
                        if kernel == "dq":
                            flags["WRITE_DMASK"] = not varlen
                        if varlen:
                            flags.update(_VARLEN_FLAGS)
                        args = _common_args(dtype, bucket, flags)
                        args.update(BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], DO_DK=do_dk,
                                    DO_DV=do_dv)
                        part = "" if (do_dk and do_dv) else (" dK" if do_dk else " dV")
                        name = (f"attn_{kernel}{part}{' varlen' if varlen else ''} {_TRITON_DTYPE[dtype]} "
                                f"d{bucket} {variant}"
                                f"{' rule' if rule else ''} "
                                f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} "
                                f"s{cfg.num_stages}")
                        specs.append(_spec(name, fn, args, cfg, expect_mma=dtype != torch.float32))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for natural, tag in ((False, ""), (True, " float-mask")):  # the lse in base-2 / natural score units
            args = _common_args(dtype, 256, dict(HAS_GRAD_LSE=True, SCORES_NATURAL=natural))
            args.update(stride_glb=_SPEC_H * _SPEC_L, stride_glh=_SPEC_L, stride_glm=1, GradLse="*fp32",
                        BLOCK_M=PREPROCESS_BLOCK_M)
            specs.append(_spec(f"attn_bwd_preprocess {_TRITON_DTYPE[dtype]} d256{tag}", _attn_bwd_preprocess_kernel,
                               args, triton.Config({}, num_warps=4, num_stages=1), expect_mma=False))
    return specs
