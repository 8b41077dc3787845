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
from .backward_fused import _attn_bwd_dq_convert_kernel, _attn_bwd_fused_kernel
from .configs import (FUSED_CONFIGS, FUSED_RULE_CONFIGS, PREPROCESS_BLOCK_M, _TMA_FWD_SM90, _as_pointer_config,
                      _configs_for, _precision_class, _split_dkdv, _tma_configs_for, _varlen_configs_for)
from .forward import _attn_fwd_kernel
from .forward_tma import _attn_fwd_tma_kernel


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
    # (B, H, L, D) contiguous; VARLEN: (T, H, D) as a (1, H, T, D) view (batch stride 0)
    t_strides = (0, D, H * D, 1) if flags.get("VARLEN") else (H * L * D, L * D, D, 1)
    names = {}
    for prefix in ("q", "k", "v", "o", "do"):
        for suffix, value in zip(("b", "h", "m" if prefix in ("q", "o", "do") else "n", "d"), t_strides):
            names[f"stride_{prefix}{suffix}"] = value
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
                    # with the configs offered to varlen calls (configs._VARLEN_CONFIGS replaces some).
                    runs = [(c, False) for c in configs]
                    if dtype == torch.float16:
                        runs += [(c, True) for c in
                                 _varlen_configs_for(arch, kernel, precision, bucket, variant, rule) or []]
                    for cfg, (do_dk, do_dv), varlen in ((c, p, m) for c, m in runs for p in parts):
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
    specs += _tma_fwd_specs(arch)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for natural, tag in ((False, ""), (True, " float-mask")):  # the lse in base-2 / natural score units
            args = _common_args(dtype, 256, dict(HAS_GRAD_LSE=True, SCORES_NATURAL=natural))
            args.update(stride_glb=_SPEC_H * _SPEC_L, stride_glh=_SPEC_L, stride_glm=1, GradLse="*fp32",
                        BLOCK_M=PREPROCESS_BLOCK_M)
            specs.append(_spec(f"attn_bwd_preprocess {_TRITON_DTYPE[dtype]} d256{tag}", _attn_bwd_preprocess_kernel,
                               args, triton.Config({}, num_warps=4, num_stages=1), expect_mma=False))
    return specs + _fused_specs(arch)


def _fused_specs(arch: int) -> list:
    """The fused backward's configs (configs.FUSED_CONFIGS, FUSED_RULE_CONFIGS) on sm_<arch>, each with the
    heaviest flags of its variant, without and with the score rule (a rule entry replaces the plain list for rule
    calls), plus the workspace conversion kernel. The report counts their atomic reductions (RED/ATOM)."""
    family = 90 if arch >= 90 else 80
    specs = []
    for (fam, precision, bucket, variant), plain in FUSED_CONFIGS.items():
        if fam != family:
            continue
        for rule in (False, True):
            configs = FUSED_RULE_CONFIGS.get((fam, precision, bucket, variant), plain) if rule else plain
            dtypes = (torch.float16, torch.bfloat16) if precision == "half" else (torch.float32,)
            for dtype in dtypes:
                for cfg in configs or []:
                    flags = dict(_FLAG_SETS[variant], **(_RULE_FLAGS if rule else _NO_RULE), HAS_GRAD_LSE=True)
                    args = _common_args(dtype, bucket, flags)
                    args.update(GradLse="*fp32", DQ="*fp32", stride_glb=_SPEC_H * _SPEC_L, stride_glh=_SPEC_L,
                                stride_glm=1, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"])
                    name = (f"attn_bwd_fused {_TRITON_DTYPE[dtype]} d{bucket} {variant}{' rule' if rule else ''} "
                            f"M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}")
                    spec = _spec(name, _attn_bwd_fused_kernel, args, cfg, expect_mma=dtype != torch.float32)
                    spec.expect_sass = ("atomics",)  # its dQ goes out by atomic adds: the report flags their absence
                    specs.append(spec)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        args = {"DQ": "*fp32", "dQ": "*" + _TRITON_DTYPE[dtype], "scale": 0.1, "n": _SPEC_H * _SPEC_L * 128,
                "BLOCK": 1024}
        specs.append(_spec(f"attn_bwd_fused_dq_convert {_TRITON_DTYPE[dtype]}", _attn_bwd_dq_convert_kernel, args,
                           triton.Config({}, num_warps=4, num_stages=1), expect_mma=False))
    return specs


# The warp-specialized candidates are offered only to calls without a mask, dropout or score rule: compiled for
# those, causal (two key phases) and not, since Triton's Hopper pass sees a different loop nest in each.
_WS_FLAG_SETS = {"causal": dict(IS_CAUSAL=True, HAS_MASK=False, MASK_IS_BOOL=False, HAS_DROPOUT=False),
                 "noncausal": dict(IS_CAUSAL=False, HAS_MASK=False, MASK_IS_BOOL=False, HAS_DROPOUT=False)}


def _tma_fwd_specs(arch: int) -> list:
    """forward_tma's descriptor candidates (configs._TMA_FWD_SM90) on sm_90, fp16/bf16, typed like a launch of
    the descriptor kernel (B and Hkv added; the pointer configs it also runs are the attn_fwd specs): the plain
    candidates with each variant's heaviest flags, without and with the score rule; the warp-specialized ones
    with the flags they are offered to."""
    specs = []
    if arch < 90:
        return specs
    for dtype in (torch.float16, torch.bfloat16):
        for bucket in _TMA_FWD_SM90:
            jobs = []
            for variant, rule in ((v, r) for v in ("base", "dropout") for r in (False, True)):
                flags = dict(_FLAG_SETS[variant], **(_RULE_FLAGS if rule else _NO_RULE))
                tag = f"{variant}{' rule' if rule else ''}"
                jobs += [(cfg, flags, tag) for cfg in _tma_configs_for(arch, bucket, variant, rule, plain=False)]
            for tag, flags in _WS_FLAG_SETS.items():
                ws = [c for c in _tma_configs_for(arch, bucket, "base", False, plain=True)
                      if c.kwargs["WARP_SPECIALIZE"]]
                jobs += [(cfg, dict(flags, **_NO_RULE), tag) for cfg in ws]
            if dtype == torch.bfloat16 and bucket == 128:
                # The same kernel with TMA=False is forward.py's kernel called as a function (today's pointer
                # configs of an eligible call): one per variant, at one bucket, shows it compiles as the attn_fwd
                # spec does (same registers) without doubling the report's compile time.
                for variant, rule in ((v, r) for v in ("base", "dropout") for r in (False, True)):
                    pointer = _configs_for(arch, "fwd", "half", bucket, variant, rule)[0]
                    flags = dict(_FLAG_SETS[variant], **(_RULE_FLAGS if rule else _NO_RULE))
                    jobs.append((_as_pointer_config(pointer), flags, f"{variant}{' rule' if rule else ''} pointer"))
            for cfg, flags, tag in jobs:
                args = _common_args(dtype, bucket, flags)
                args.update(B=2, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"], TMA=cfg.kwargs["TMA"],
                            WARP_SPECIALIZE=cfg.kwargs["WARP_SPECIALIZE"])
                name = (f"attn_fwd_tma {_TRITON_DTYPE[dtype]} d{bucket} {tag} M{cfg.kwargs['BLOCK_M']} "
                        f"N{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}"
                        f"{' ws' if cfg.kwargs['WARP_SPECIALIZE'] else ''}")
                spec = _spec(name, _attn_fwd_tma_kernel, args, cfg, expect_mma=True)
                # The report flags a descriptor candidate whose SASS lost its TMA loads/stores, or a
                # warp-specialized one that Triton left unspecialized.
                spec.expect_sass = ("UTMALDG", "UTMASTG") if cfg.kwargs["TMA"] else ()
                spec.expect_warp_specialized = cfg.kwargs["WARP_SPECIALIZE"]
                specs.append(spec)
    return specs
