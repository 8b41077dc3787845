"""Launch configs of the attention kernels: the per-arch tables, the configs excluded from them (and why), and the
autotune wiring.

On a GPU each kernel is autotuned over a short list chosen by architecture and head-dim bucket (the padded
power-of-two head dim, max over E and Ev), keyed on the head dims, dtype, causal/mask/dropout flags and
power-of-two buckets of L and S. On sm_90 every fp16/bf16 tile has BLOCK_M (the M side of each dot) a multiple
of 64 and 4 or 8 warps, so tl.dot lowers to wgmma (HGMMA). Lists were pruned with the static compile check
(compile_check.py): configs that spill or overflow shared memory for a head dim are not offered for that head
dim and appear in ``excluded_configs()`` with the reason. In Triton's interpreter there is nothing to tune: one
small fixed config (16 x 16 tiles, the smallest tl.dot takes) keeps CPU runs fast.

Where no backward config is spill-free on a GPU (fp32 at head dims > 128; fp16/bf16 with dropout at head dims
> 128 on sm_90) that backward runs densely in PyTorch (``launch._dense_backward``, same lse and keep pattern).
The static compile specs of these tables are in ``specs.py``, beside this module.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..interpreter import interpreting

# Decided once at import, like Triton itself decides whether @triton.jit makes interpreter functions.
INTERPRETING = interpreting()

INTERPRETER_BLOCK = 16
SEQ_BUCKET_CAP = 16384  # longer sequences share the tuning of this length


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# (arch family, kernel) -> precision ("half": fp16/bf16, "fp32") -> head-dim bucket (64 covers 1-64) ->
# variant ("base": no dropout; "dropout": the Philox draw per score costs extra live registers, so those calls
# get smaller tiles) -> configs. Forward and dQ: BLOCK_M query rows held, BLOCK_N keys streamed. dK/dV: BLOCK_N
# keys held, BLOCK_M queries streamed. Every entry compiles without spills and within shared memory for the
# heaviest flags of its variant (causal + additive mask [+ dropout], with and without the score rule's window,
# softcap, ALiBi and sinks; static compile check). None: no config of the backward compiles without spills, and
# the backward of such calls runs densely (see _dense_backward).
def _table(d64, d128, d256):
    return {64: d64, 128: d128, 256: d256}


def _variants(base, dropout=None):
    return {"base": base, "dropout": base if dropout is None else dropout}


_HALF_SM90 = {
    "fwd": _table(_variants([_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)], [_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)]),
                  _variants([_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)], [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2)]),
                  _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 8, 2)], [_cfg(64, 32, 8, 2), _cfg(64, 16, 8, 2)])),
    "dkdv": _table(_variants([_cfg(32, 64, 4, 2), _cfg(32, 128, 8, 2)], [_cfg(16, 64, 4, 2)]),
                   _variants([_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 2)], [_cfg(16, 64, 8, 2), _cfg(16, 64, 8, 1)]),
                   {"base": [_cfg(16, 64, 8, 2)], "dropout": None}),
    "dq": _table(_variants([_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]),
                 _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 16, 4, 2), _cfg(64, 32, 8, 2)]),
                 _variants([_cfg(64, 16, 8, 2)])),
}
# sm_80 (mma.sync, 64K registers as on sm_90 but no wgmma): a few sm_90 tiles spill there and are replaced.
_HALF_SM80 = {
    "fwd": _table(_HALF_SM90["fwd"][64],
                  _variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 3)], [_cfg(64, 32, 8, 2), _cfg(64, 64, 8, 2)]),
                  _variants([_cfg(64, 32, 8, 2)], [_cfg(32, 32, 8, 2), _cfg(64, 16, 8, 2)])),
    "dkdv": _table(_variants([_cfg(16, 64, 4, 2), _cfg(32, 64, 8, 2)], [_cfg(16, 64, 4, 2)]),
                   _variants(_HALF_SM90["dkdv"][128]["base"], [_cfg(32, 32, 8, 2), _cfg(16, 64, 8, 1)]),
                   _variants([_cfg(16, 64, 8, 2)])),
    "dq": _table(_variants([_cfg(128, 32, 8, 2), _cfg(64, 32, 4, 2)], [_cfg(64, 32, 4, 2), _cfg(128, 32, 8, 2)]),
                 _variants(_HALF_SM90["dq"][128]["base"], [_cfg(64, 32, 8, 2)]),
                 _variants(_HALF_SM90["dq"][256]["base"], [_cfg(32, 32, 8, 2)])),
}
# IEEE fp32 products run on the FMA units with whole operand rows in registers: small tiles only, and at head
# dims above 128 every backward tile spills (the rows are 256 long), so that backward runs densely.
_FP32 = {
    "fwd": _table(_variants([_cfg(32, 16, 8, 1)]), _variants([_cfg(32, 16, 4, 1)]), _variants([_cfg(16, 16, 4, 1)])),
    "dkdv": _table(_variants([_cfg(16, 32, 8, 1)]), _variants([_cfg(16, 16, 8, 1)]), _variants(None)),
    "dq": _table(_variants([_cfg(32, 16, 8, 1)]), _variants([_cfg(16, 16, 8, 1)]), _variants(None)),
}
# sm_90: the fp32 dQ tile at head dims 65-128 spills there (see _RULE_EXCLUDED), so that backward runs densely.
_FP32_SM90 = {**_FP32, "dq": _table(_FP32["dq"][64], _variants(None), _variants(None))}
_CONFIGS = {90: {"half": _HALF_SM90, "fp32": _FP32_SM90}, 80: {"half": _HALF_SM80, "fp32": _FP32}}

# Calls with the score rule (window, softcap, ALiBi, sinks: one more tile live per score, a third key phase) where
# the plain variant's configs spill: (arch family, precision, kernel, head-dim bucket, variant) -> the configs
# offered instead (static compile check with _RULE_FLAGS of specs.py), or None: that backward runs densely.
# Entries not listed take the plain variant's configs.
_RULE_CONFIGS = {
    (90, "half", "fwd", 128, "base"): [_cfg(128, 64, 8, 3)],
    (90, "half", "fwd", 256, "base"): [_cfg(64, 32, 8, 2)],
    (90, "half", "fwd", 256, "dropout"): [_cfg(64, 16, 8, 2)],
    (90, "half", "dkdv", 64, "base"): [_cfg(32, 128, 8, 2)],
    (90, "half", "dkdv", 128, "base"): [_cfg(16, 64, 8, 2)],
    (90, "half", "dkdv", 128, "dropout"): [_cfg(16, 64, 8, 2)],
    (90, "half", "dq", 64, "base"): [_cfg(64, 32, 4, 2)],
    (90, "half", "dq", 64, "dropout"): [_cfg(64, 16, 4, 2)],
    (90, "half", "dq", 128, "base"): [_cfg(128, 32, 8, 2)],
    (90, "half", "dq", 128, "dropout"): [_cfg(64, 16, 4, 2)],
    (90, "half", "dq", 256, "base"): None,
    (90, "half", "dq", 256, "dropout"): None,
    (90, "fp32", "dq", 128, "dropout"): None,
    (90, "fp32", "dq", 128, "base"): None,
    (90, "fp32", "fwd", 128, "dropout"): [_cfg(16, 16, 4, 1)],
    (90, "fp32", "fwd", 128, "base"): [_cfg(16, 16, 4, 1)],
    (80, "fp32", "fwd", 128, "dropout"): [_cfg(16, 16, 4, 1)],
    (80, "fp32", "fwd", 128, "base"): [_cfg(16, 16, 4, 1)],
    (80, "half", "fwd", 128, "dropout"): [_cfg(64, 32, 8, 2)],
    (80, "half", "dkdv", 256, "dropout"): None,
    (80, "half", "dkdv", 64, "base"): [_cfg(16, 64, 4, 2)],
    (80, "half", "dkdv", 128, "dropout"): [_cfg(32, 32, 8, 2)],
    (80, "half", "dq", 64, "dropout"): [_cfg(64, 16, 4, 2), _cfg(32, 32, 4, 2)],
    (80, "half", "dq", 128, "base"): [_cfg(64, 16, 4, 2)],
    (80, "half", "dq", 128, "dropout"): None,
}
_RULE_EXCLUDED = [
    (80, "attn_dkdv fp16/bf16 head dim 64 with the score rule, M32 N64 w8 s2; head dim 128 with the score rule and "
         "dropout, M16 N64 w8 s1",
     "spill 24 B on sm_80 under triton 3.6; M16 N64 w4 s2 and M32 N32 w8 s2 offered instead"),
    (80, "attn_dq fp16/bf16 head dim 64 with the score rule and dropout, M64 N32 w4 s2 and M128 N32 w8 s2",
     "spill 8-16 B on sm_80 under triton 3.6; M64 N16 w4 s2 and M32 N32 w4 s2 offered instead"),
    (90, "attn_dq fp32 head dim 65-128, M16 N16 w8 s1 (w4: 328 B, w16: 184 B)",
     "spills 8 B (16 B with dropout) on sm_90 under triton 3.8 since the score-rule edit of the dQ kernel, and no "
     "smaller tile exists; on sm_90 that backward runs densely in PyTorch (_dense_backward) instead"),
    (90, "attn_fwd fp16/bf16 with the score rule: head dim 128 M64 N64 w4 s3, head dim 256 M128 N32 w8 s2 (and "
         "M64 N32 w8 s2 with dropout)", "spill 8-72 B on sm_90 under triton 3.8; the other config of the list kept "
         "(M64 N16 w8 s2 with dropout at head dim 256)"),
    (90, "attn_dkdv fp16/bf16 with the score rule: head dim 64 M32 N64 w4 s2, head dim 128 M32 N64 w8 s2 and "
         "M16 N64 w8 s1 (dropout)", "spill 16-72 B on sm_90 under triton 3.8; the other config of the list kept"),
    (90, "attn_dq fp16/bf16 with the score rule: head dim 64 M128 N64 w8 s2 and M64 N32 w4 s2 (dropout), head dim "
         "128 M64 N32 w4 s2 and M64 N32 w8 s2 (dropout)", "spill 8-64 B on sm_90 under triton 3.8; the other "
         "config of the list kept"),
    (90, "attn_dq fp16/bf16 head dim 129-256 and fp32 head dim 65-128 with the score rule, M64 N16 w8 s2 / "
         "M16 N16 w8 s1", "spill 8-96 B on sm_90 under triton 3.8 (the softcap's gradient factor is one more live "
         "tile); the backward of these calls runs densely in PyTorch (_dense_backward) instead"),
    (90, "attn_dq fp16/bf16 head dim 64 with the score rule and dropout, M128 N32 w8 s2",
     "spills 24 B on sm_90 under triton 3.6 (M64 N32 w4 s2 spills under 3.8); M64 N16 w4 s2 offered instead"),
] + [
    (arch, "attn_fwd fp32 head dim 65-128 with the score rule, M32 N16 w4 s1",
     "spills 24 B on sm_90 under triton 3.6; M16 N16 w4 s1 offered instead (one fp32 table serves sm_80 too)")
    for arch in (80, 90)
] + [
    (80, "attn_fwd fp16/bf16 head dim 128 with the score rule and dropout, M64 N64 w8 s2",
     "spills 48 B on sm_80 under triton 3.8; M64 N32 w8 s2 kept"),
    (80, "attn_dkdv fp16/bf16 head dim 129-256 with the score rule and dropout, M16 N64 w8 s2 (dK and dV)",
     "spill 16-32 B on sm_80 under triton 3.8; the backward of these calls runs densely in PyTorch instead"),
    (80, "attn_dq fp16/bf16 head dim 65-128 with the score rule, M128 N32 w8 s2 and M64 N32 w4 s2; with dropout "
         "M64 N16 w4 s2", "spill 16-48 B on sm_80 under triton 3.8; M64 N16 w4 s2 offered without dropout, the "
         "backward with dropout runs densely in PyTorch instead"),
]

# Configs the static check showed spilling where no alternative exists: (arch family, config, reason).
_EXCLUDED = [
    (arch, "attn_dkdv/attn_dq fp32 head dim 129-256, every tile down to 16x16 (w4-w16)",
     "spills 0.3-2.5 KB: IEEE fp32 dots hold 256-long operand rows per thread; the backward of these calls "
     "runs densely in PyTorch (_dense_backward) instead") for arch in (80, 90)
] + [
    (90, "attn_dkdv dK fp16/bf16 head dim 129-256 with dropout, M16 N64 w8 s1-s3 (and M32 N64 w8)",
     "spills 24-200 B on sm_90 (wgmma needs 64-row key blocks; 64 x 256 fp32 dK plus the Philox draw exceed the "
     "registers); the backward of these calls runs densely in PyTorch (_dense_backward) instead"),
    (90, "attn_fwd fp16/bf16 head dim 64, M128 N128 w8 s3", "241 KiB shared memory > 227 KiB"),
    (90, "attn_fwd fp32 head dim 1-64, M32 N32 w8 s1",
     "spills 8 B on sm_90 under triton 3.8 (ptxas keeps it at 128 registers) since float-mask scores stay in "
     "natural-log units; M32 N16 w8 s1 offered instead (68-80 registers under 3.6 and 3.8; one fp32 table serves "
     "sm_80 too)"),
    (80, "attn_fwd fp16/bf16 head dim 128, M128 N64 w8 s3 and M64 N64 w4 s3", "spill 40-48 B on sm_80"),
    (80, "attn_fwd fp16/bf16 head dim 256, M128 N32 w8 s2", "spills 208 B on sm_80"),
    (80, "attn_dkdv fp16/bf16 head dim 64, M32 N64 w4 s2 and M32 N128 w8 s2", "spill 8-24 B on sm_80"),
    (80, "attn_dq fp16/bf16 head dim 64, M128 N64 w8 s2", "spills 48 B on sm_80"),
] + [
    # Dropout variants (Philox draw live per score), measured with triton 3.6 (triton 3.8 compiles them without
    # spills, but the GPU machines run 3.6); each replaced by the spill-free tile named in the reason.
    (arch, "attn_fwd fp16/bf16 head dim 64 with dropout, M128 N64 w8 s2",
     f"spills {b} B under triton 3.6; M128 N32 w8 s2 offered instead") for arch, b in ((90, 72), (80, 192))
] + [
    (90, "attn_fwd fp16/bf16 head dim 128 with dropout, M64 N64 w8 s2",
     "spills 136 B under triton 3.6 (16 B at s1); M128 N32 w8 s2 offered instead"),
    (80, "attn_fwd fp16/bf16 head dim 256 with dropout, M64 N32 w8 s2",
     "spills 8 B under triton 3.6 (88 B at s1); M32 N32 w8 s2 offered instead"),
    (80, "attn_dkdv fp16/bf16 head dim 65-128 with dropout, M16 N64 w8 s2",
     "spills 8 B under triton 3.6; M32 N32 w8 s2 offered instead (M16 N64 w8 s1 kept)"),
    (80, "attn_dq fp16/bf16 head dim 129-256 with dropout, M64 N16 w8 s2",
     "spills 8 B under triton 3.6 (24 B at s1); M32 N32 w8 s2 offered instead"),
    (80, "attn_dq fp16/bf16 head dim 65-128 with dropout, M64 N16 w4 s2",
     "spills 24 B on sm_80 under triton 3.6 since the score-rule edit of the dQ kernel; M64 N32 w8 s2 kept"),
]

# Packed variable-length calls (VARLEN mode, varlen_launch.py) take the tables above, except where a config spills
# in that mode (the sequence search and per-sequence offsets are a few more live registers): (arch family,
# precision, kernel, head-dim bucket, variant, score-rule flags) -> the configs offered to varlen calls instead
# (static compile check with specs._VARLEN_FLAGS, triton 3.6 and 3.8). fp32 varlen does not run on a GPU at all
# (dispatch declines it): its dropout configs spill in every kernel.
_VARLEN_CONFIGS = {
    (80, "half", "fwd", 64, "dropout", False): [_cfg(128, 32, 8, 2)],
    (80, "half", "fwd", 64, "dropout", True): [_cfg(128, 32, 8, 2)],
    (80, "half", "fwd", 128, "base", False): [_cfg(64, 32, 4, 3)],
    (80, "half", "fwd", 256, "dropout", True): [_cfg(32, 32, 8, 2)],
    (80, "half", "dkdv", 64, "dropout", False): [_cfg(16, 64, 4, 1)],
    (80, "half", "dkdv", 64, "dropout", True): [_cfg(16, 64, 4, 1)],
    (90, "half", "fwd", 256, "base", False): [_cfg(64, 32, 8, 2)],
    (90, "half", "fwd", 256, "dropout", False): [_cfg(64, 16, 8, 2)],
}
_VARLEN_EXCLUDED = [
    (80, "attn_fwd varlen fp16/bf16 head dim 65-128, M128 N32 w8 s2", "spills 8 B in the VARLEN mode on sm_80 "
     "under triton 3.8; M64 N32 w4 s3 kept for varlen calls"),
    (90, "attn_fwd varlen fp16/bf16 head dim 129-256, M128 N32 w8 s2", "spills 40 B in the VARLEN mode on sm_90 "
     "under triton 3.8; M64 N32 w8 s2 kept for varlen calls"),
    (80, "attn_fwd varlen fp16/bf16 head dim 1-64 with dropout, M64 N32 w4 s2 (with and without the score rule)",
     "spills 8-16 B in the VARLEN mode on sm_80 under triton 3.6; M128 N32 w8 s2 kept for varlen calls"),
    (80, "attn_fwd varlen fp16/bf16 head dim 129-256 with dropout and the score rule, M64 N16 w8 s2",
     "spills 32 B in the VARLEN mode on sm_80 under triton 3.6; M32 N32 w8 s2 kept for varlen calls"),
    (80, "attn_dkdv varlen fp16/bf16 head dim 1-64 with dropout, M16 N64 w4 s2 (with and without the score rule)",
     "spills 8-16 B in the VARLEN mode on sm_80 under triton 3.6 (255 registers); M16 N64 w4 s1 (224-234 "
     "registers, no spills under 3.6 and 3.8) offered to varlen calls instead"),
    (90, "attn_fwd varlen fp16/bf16 head dim 129-256 with dropout, M64 N32 w8 s2",
     "spills 40 B in the VARLEN mode on sm_90 under triton 3.6; M64 N16 w8 s2 kept for varlen calls"),
] + [
    (arch, "attn_fwd/attn_dkdv/attn_dq varlen fp32 with dropout (M32 N16 w4, M16 N16 w4/w8, M32 N16 w8)",
     "spill 8-360 B in the VARLEN mode under triton 3.8; fp32 varlen runs on the reference backend on a GPU")
    for arch in (80, 90)
]

PREPROCESS_BLOCK_M = 64


def _head_bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else block_d


def _precision_class(dtype) -> str:
    return "fp32" if dtype in (torch.float32, tl.float32) else "half"


def _arch_family(arch: int) -> int:
    return 90 if arch >= 90 else 80


def _configs_for(arch: int, kernel: str, precision: str, bucket: int, variant: str, rule: bool = False):
    """The configs offered, or None where that backward runs densely (no spill-free config); ``rule``: the call
    has score-rule flags (_RULE_CONFIGS)."""
    key = (_arch_family(arch), precision, kernel, bucket, variant)
    if rule and key in _RULE_CONFIGS:
        return _RULE_CONFIGS[key]
    return _CONFIGS[_arch_family(arch)][precision][kernel][bucket][variant]


_RULE_FLAG_NAMES = ("WINDOW_LEFT", "WINDOW_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_SINKS")


def _has_rule_flags(args: dict) -> bool:
    return any(args.get(name, False) for name in _RULE_FLAG_NAMES)


def _varlen_configs_for(arch: int, kernel: str, precision: str, bucket: int, variant: str, rule: bool = False):
    """The configs offered to VARLEN calls: _VARLEN_CONFIGS where it has the entry, else _configs_for's."""
    key = (_arch_family(arch), precision, kernel, bucket, variant, bool(rule))
    if key in _VARLEN_CONFIGS:
        return _VARLEN_CONFIGS[key]
    return _configs_for(arch, kernel, precision, bucket, variant, rule)


def _unique(configs, key=None) -> list:
    """configs without repeats (by ``key``, default _config_key), first occurrence kept; None entries skipped."""
    key = key or _config_key
    seen, out = set(), []
    for c in configs:
        if key(c) not in seen:
            seen.add(key(c))
            out.append(c)
    return out


def _all_configs(arch: int, kernel: str) -> list:
    """Every config of the kernel on this arch (the autotuner's list, before pruning by head dim and dtype)."""
    lists = [configs for per_kernel in _CONFIGS[_arch_family(arch)].values()  # precision -> kernel ->
             for per_variant in per_kernel[kernel].values()                     # bucket -> variant -> configs
             for configs in per_variant.values()]
    lists += [configs for (family, _, name, *_), configs in [*_RULE_CONFIGS.items(), *_VARLEN_CONFIGS.items()]
              if family == _arch_family(arch) and name == kernel]
    return _unique(c for configs in lists for c in configs or [])


@functools.lru_cache(maxsize=None)
def _device_arch() -> int:
    if INTERPRETING or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _config_key(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _make_prune(arch: int, kernel: str):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bucket = _head_bucket(max(args["BLOCK_D"], args["BLOCK_DV"]))
        variant = "dropout" if args["HAS_DROPOUT"] else "base"
        choose = _varlen_configs_for if args.get("VARLEN", False) else _configs_for
        wanted = {_config_key(c)
                  for c in choose(arch, kernel, _precision_class(args["Q"].dtype), bucket, variant,
                                  _has_rule_flags(args))}
        return [c for c in configs if _config_key(c) in wanted]
    return prune


# The score rule's flags are keys too (a window changes which config is fastest); HAS_SINKS exists in the forward
# only, and the autotuner skips key names a kernel does not have. VARLEN (packed sequences, varlen_launch.py) gets
# its own tuning: L_BUCKET / S_BUCKET are then those of max_seqlen.
_TUNE_KEY = ["HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "HAS_MASK", "HAS_DROPOUT", "L_BUCKET", "S_BUCKET", "WINDOW_LEFT",
             "WINDOW_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI", "HAS_SINKS", "VARLEN"]
_DKDV_TUNE_KEY = _TUNE_KEY + ["DO_DK", "DO_DV"]


def _tuned(kernel_fn, kernel: str):
    """The kernel as launched: autotuned on a GPU, the plain jit function in the interpreter."""
    arch = _device_arch()
    if kernel == "dkdv":
        # EVEN_M (L a multiple of BLOCK_M) depends on the config the autotuner picks, so it is derived per config.
        kernel_fn = triton.heuristics({"EVEN_M": lambda args: args["L"] % args["BLOCK_M"] == 0})(kernel_fn)
    if arch == 0:
        return kernel_fn
    # Every kernel writes (never accumulates into) its outputs, so the autotuner's repeated trial launches leave
    # them correct without reset_to_zero / restore_value.
    return triton.autotune(configs=_all_configs(arch, kernel), key=_DKDV_TUNE_KEY if kernel == "dkdv" else _TUNE_KEY,
                           prune_configs_by={"early_config_prune": _make_prune(arch, kernel)})(kernel_fn)


def _split_dkdv(block_d: int, dtype) -> bool:
    """Whether dK and dV take one launch each (see _attn_bwd_dkdv_kernel): above head dim 128 for fp16/bf16, above
    64 for fp32, whose IEEE products run on FMA units with operand tiles held in registers."""
    return block_d > (64 if dtype in (torch.float32, tl.float32) else 128)


def excluded_configs(arch: int) -> list:
    """(config, reason) for the configs deliberately not offered on sm_<arch> (they spill or do not fit)."""
    return [(desc, reason) for (a, desc, reason) in _EXCLUDED + _RULE_EXCLUDED + _TMA_EXCLUDED + FUSED_EXCLUDED
            + _VARLEN_EXCLUDED if _arch_family(arch) == a]


# The descriptor (TMA) forward of forward_tma.py on sm_90, fp16/bf16: candidates the autotuner tries *beside* the
# pointer configs above (which that kernel runs too, with TMA=False), for calls whose tensors meet TMA's rules.
# Head-dim bucket -> variant -> configs. Warp-specialized candidates (WARP_SPECIALIZE=True) need 4 warps (Triton's
# Hopper pass leaves an 8-warp loop unspecialized) and are offered only to calls without a mask, dropout or score
# rule, causal or not (_tma_configs_for), and have 64-row tiles (a 128-row one makes the pass split the Q tile
# and fail to compile). Every entry compiles spill-free for sm_90 under triton 3.6 and 3.8 (specs.py compiles
# each with the heaviest flags it is offered to); excluded_configs lists what was left out.
def _tma_cfg(block_m, block_n, warps, stages, warp_specialize=False):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "TMA": True, "WARP_SPECIALIZE": warp_specialize},
                         num_warps=warps, num_stages=stages)


_TMA_FWD_SM90 = {
    64: {"base": [_tma_cfg(128, 64, 8, 3), _tma_cfg(128, 128, 8, 2)],
         "dropout": [_tma_cfg(128, 32, 8, 2), _tma_cfg(64, 32, 4, 2)],
         "ws": [_tma_cfg(64, 128, 4, 3, True), _tma_cfg(64, 64, 4, 3, True)]},
    128: {"base": [_tma_cfg(128, 64, 8, 3), _tma_cfg(128, 128, 8, 2)],
          "dropout": [_tma_cfg(128, 32, 8, 2), _tma_cfg(64, 32, 4, 2)],
          "ws": [_tma_cfg(64, 128, 4, 2, True), _tma_cfg(64, 64, 4, 3, True)]},
    256: {"base": [_tma_cfg(128, 32, 8, 2), _tma_cfg(64, 64, 8, 2)],
          "dropout": [_tma_cfg(64, 32, 8, 2)],
          "ws": []},
}
# With the score rule's flags, where the plain list spills: (bucket, variant) -> configs.
_TMA_FWD_RULE_SM90 = {
    (128, "base"): [_tma_cfg(128, 64, 8, 3)],  # M128 N128 w8 s2 spills 80 B with the rule (triton 3.8)
}


_TMA_EXCLUDED = [
    (90, "attn_fwd_tma fp16/bf16 head dim 1-64 with dropout, M64 N64 w4 s2",
     "spills 72 B under triton 3.8 (136 B with the score rule under 3.6); M64 N32 w4 s2 offered instead"),
    (90, "attn_fwd_tma fp16/bf16 head dim 65-128 with dropout, M64 N64 w4 s2",
     "spills 24-248 B under triton 3.8; M64 N32 w4 s2 offered instead"),
    (90, "attn_fwd_tma fp16/bf16 head dim 65-128 with the score rule, M128 N128 w8 s2",
     "spills 80 B under triton 3.8; M128 N64 w8 s3 kept"),
    (90, "attn_fwd_tma warp-specialized with 128-row tiles (M128 N64 w4), or with a second key loop after the "
         "specialized one (forward.py's phases)", "Triton 3.6 and 3.8's Hopper warp-specialization pass fails "
     "to compile them (PassManager error in NVGPUWarpSpecialization); 64-row tiles and one key loop offered"),
    (90, "attn_fwd_tma warp-specialized with 8 warps", "Triton 3.6 / 3.8 leave an 8-warp loop unspecialized "
     "(no partitions in the TTGIR), so it would only duplicate the plain candidate; 4 warps offered"),
]


def _tma_configs_for(arch: int, bucket: int, variant: str, rule: bool, plain: bool) -> list:
    """The descriptor candidates of a forward call on sm_<arch> (none before sm_90); ``plain``: no mask, dropout
    or score rule (the calls warp-specialized candidates are offered to). Hopper only: the static report
    compiles these for sm_90, and newer GPUs run a different warp-specialization pass."""
    if not 90 <= arch < 100:
        return []
    table = _TMA_FWD_SM90[bucket]
    configs = list(_TMA_FWD_RULE_SM90.get((bucket, variant), table[variant]) if rule else table[variant])
    if plain:
        configs += table["ws"]
    return configs


def _tma_kernel_key(c):
    return (*_config_key(c), c.kwargs.get("TMA", False), c.kwargs.get("WARP_SPECIALIZE", False))


def _as_pointer_config(c):
    """A pointer config of the forward table, for forward_tma's kernel (which runs it as forward.py's)."""
    return triton.Config({**c.kwargs, "TMA": False, "WARP_SPECIALIZE": False}, num_warps=c.num_warps,
                         num_stages=c.num_stages)


def _tuned_fwd_tma(kernel_fn):
    """forward_tma's kernel as launched on sm_90: autotuned over today's pointer configs of the call and its
    descriptor candidates; ``None`` off Hopper and in the interpreter (callers launch it untuned there)."""
    arch = _device_arch()
    if not 90 <= arch < 100:
        return None
    descriptor = [c for per_variant in _TMA_FWD_SM90.values() for configs in per_variant.values() for c in configs]
    descriptor += [c for configs in _TMA_FWD_RULE_SM90.values() for c in configs]
    every = _unique([_as_pointer_config(c) for c in _all_configs(arch, "fwd")] + descriptor, key=_tma_kernel_key)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        bucket = _head_bucket(max(args["BLOCK_D"], args["BLOCK_DV"]))
        variant = "dropout" if args["HAS_DROPOUT"] else "base"
        rule = _has_rule_flags(args)
        precision = _precision_class(args["Q"].dtype)
        wanted = {(*_config_key(c), False, False) for c in _configs_for(arch, "fwd", precision, bucket, variant, rule)}
        if precision == "half":
            plain = not (args["HAS_MASK"] or args["HAS_DROPOUT"] or rule)
            wanted |= {_tma_kernel_key(c) for c in _tma_configs_for(arch, bucket, variant, rule, plain)}
        return [c for c in configs if _tma_kernel_key(c) in wanted]

    return triton.autotune(configs=every, key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(kernel_fn)


# ----------------------------------------------------------------------------------------------------------------
# The fused backward (backward_fused.py): BLOCK_N keys held (K, V, dK, dV in registers), BLOCK_M queries streamed,
# dQ added atomically. (arch family, precision, head-dim bucket, variant) -> configs; None or absent: no fused
# config is offered, and such calls take the separate-pass backward (launch.fused_backward_reasons says so).
# Every entry compiles with 0 spills, the architecture's matrix instruction (HGMMA on sm_90, HMMA on sm_80) and
# atomic reductions in its SASS, under triton 3.6 and 3.8, for fp16 and bf16, with its variant's heaviest flags
# (causal + additive fp32 mask [+ dropout], and with the score rule: window + softcap + ALiBi; specs._fused_specs).
# The five products hold K, V, dK, dV (BLOCK_N x head dim each) for the whole program, so the key block is small
# and the query block smaller still: BLOCK_N = 64 (4 warps, one warpgroup) or 128 (8 warps) keeps the four
# products whose M side is the key block on wgmma on sm_90; the dQ product (M = BLOCK_M) runs on wgmma only with
# BLOCK_M = 64 (the M64 N32 tile, whose other products take mma.sync), otherwise on mma.sync. One pipeline stage
# (no prefetched Q / dO tile) is what frees the registers in most entries. Which entry is fastest is unmeasured:
# the autotuner picks per call on the GPU.
FUSED_CONFIGS = {
    (90, "half", 64, "base"): [_cfg(32, 128, 8, 2), _cfg(32, 64, 4, 1)],
    (90, "half", 64, "dropout"): [_cfg(16, 128, 8, 1), _cfg(16, 64, 4, 1)],
    (90, "half", 128, "base"): [_cfg(32, 64, 8, 1), _cfg(16, 64, 8, 2)],
    (90, "half", 128, "dropout"): [_cfg(64, 32, 8, 1)],
    (80, "half", 64, "base"): [_cfg(32, 64, 4, 1), _cfg(16, 128, 8, 1)],
    (80, "half", 64, "dropout"): [_cfg(32, 64, 8, 1), _cfg(16, 64, 8, 1)],
    (80, "half", 128, "base"): [_cfg(32, 64, 8, 2), _cfg(16, 64, 8, 1)],
    (80, "half", 128, "dropout"): [_cfg(16, 64, 8, 1), _cfg(64, 32, 8, 1)],
}
# Calls with the score rule: (arch family, precision, bucket, variant) -> configs where they differ from
# FUSED_CONFIGS[(family, precision, bucket, variant)] (one more live tile per score: the softcap's gradient).
FUSED_RULE_CONFIGS = {
    (90, "half", 64, "base"): [_cfg(32, 128, 8, 1), _cfg(32, 64, 4, 1)],
    (90, "half", 128, "base"): [_cfg(16, 64, 8, 2), _cfg(16, 64, 8, 1)],
    (80, "half", 64, "base"): [_cfg(32, 64, 4, 1), _cfg(16, 64, 4, 1)],
    (80, "half", 64, "dropout"): [_cfg(16, 64, 8, 1), _cfg(32, 32, 4, 1)],
    (80, "half", 128, "base"): [_cfg(32, 64, 8, 1), _cfg(16, 64, 8, 2)],
    (80, "half", 128, "dropout"): [_cfg(64, 32, 8, 1)],
}
# What the static check rejected (spill bytes per thread, triton 3.8 / 3.6, fp16 and bf16 alike within a few
# bytes); the tables above hold the spill-free tiles of the same sweep.
FUSED_EXCLUDED = [
    (90, "attn_bwd_fused fp16/bf16 head dim 64, M64 N128 w8 s2 and M64 N64 w4 s2",
     "spill 424 and 480 B on sm_90 under triton 3.8 (576 / 640 B with the score rule); 255 registers, HGMMA 24 / 20"),
    (90, "attn_bwd_fused fp16/bf16 head dim 65-128, M64 N128 w8 s2 and M64 N64 w8 s2",
     "spill 760 and 368 B on sm_90 under triton 3.8 (968 / 520 B with the score rule); 193.5 / 145.5 KiB smem"),
    (90, "attn_bwd_fused fp16/bf16 head dim 64: M32 N128 w8 s2 with the score rule; with dropout M32 N128 w8 s1/s2 "
         "and M32 N64 w4 s1; with dropout and the score rule M16 N64 w4 s2",
     "spill 40-48 B (rule), 48-136 B (dropout), 24-48 B (dropout + rule) on sm_90; M32 N128 w8 s1 / M16 N128 "
     "w8 s1 / M16 N64 w4 s1 offered instead"),
    (90, "attn_bwd_fused fp16/bf16 head dim 65-128: M16 N128 w8 s1; M32 N64 w8 s1 with the score rule or dropout; "
         "with dropout M16 N64 w8 s1/s2 and M64 N32 w8 s2",
     "spill 8 B (3.6) / 48 B (rule) / 128-168 B (dropout) for M16 N128; 72-144 B for M32 N64 w8 s1; 8-72 B for "
     "the dropout tiles; with dropout only M64 N32 w8 s1 is spill-free (its dQ product alone on wgmma)"),
    (80, "attn_bwd_fused fp16/bf16 head dim 64, M64 N128 w8 s2 and M64 N64 w4 s2",
     "spill 112 B each on sm_80 under triton 3.8 (712 / 808 B with the score rule); 16 / 32 RED per program"),
    (80, "attn_bwd_fused fp16/bf16 head dim 65-128, M64 N64 w8 s2", "spills 88 B on sm_80 under triton 3.8"),
    (80, "attn_bwd_fused fp16/bf16 head dim 64: M32 N64 w4 s2, M32 N128 w8 s1/s2, M64 N64 w8 s1; M16 N128 w8 s1 "
         "with the score rule or dropout; M16 N64 w4 s1 and M64 N32 w8 s1 with dropout (and the rule)",
     "spill 16-80 B without dropout, 40-528 B with it, on sm_80; M32 N64 w4 s1 / M16 N64 w4 s1 and with dropout "
     "M32 N64 w8 s1 / M16 N64 w8 s1 / M32 N32 w4 s1 offered instead"),
    (80, "attn_bwd_fused fp16/bf16 head dim 65-128: M32 N64 w8 s2 with the score rule or dropout; M32 N64 w8 s1, "
         "M16 N64 w8 s2 and M32 N32 w4 s1 with dropout; M16 N64 w8 s1 with dropout and the score rule",
     "spill 80 B (rule), 144-176 B, 48-112 B, 8-16 B, 24-32 B, 56 B (triton 3.6) on sm_80; with dropout and the "
     "rule only M64 N32 w8 s1 is offered"),
]


def fused_configs_for(arch: int, precision: str, bucket: int, variant: str, rule: bool = False):
    """The fused backward's configs for a call on sm_<arch>, or None where it takes the separate passes."""
    family = _arch_family(arch)
    if rule and (family, precision, bucket, variant) in FUSED_RULE_CONFIGS:
        return FUSED_RULE_CONFIGS[(family, precision, bucket, variant)]
    return FUSED_CONFIGS.get((family, precision, bucket, variant))


def _all_fused_configs(arch: int) -> list:
    tables = [c for (family, *_), c in [*FUSED_CONFIGS.items(), *FUSED_RULE_CONFIGS.items()]
              if family == _arch_family(arch)]
    return _unique(c for configs in tables for c in configs or [])


def _prune_fused(arch: int):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        wanted = {_config_key(c) for c in fused_configs_for(
            arch, _precision_class(args["Q"].dtype), _head_bucket(max(args["BLOCK_D"], args["BLOCK_DV"])),
            "dropout" if args["HAS_DROPOUT"] else "base", _has_rule_flags(args)) or []}
        return [c for c in configs if _config_key(c) in wanted]
    return prune


def _tuned_fused(kernel_fn):
    """The fused backward kernel as launched: autotuned on a GPU (the workspace DQ is zeroed before every trial
    launch, since the kernel accumulates into it), the plain jit function in the interpreter."""
    kernel_fn = triton.heuristics({"EVEN_M": lambda args: args["L"] % args["BLOCK_M"] == 0})(kernel_fn)
    arch = _device_arch()
    if arch == 0 or not _all_fused_configs(arch):
        # No config on this arch: launch.fused_backward_reasons refuses every GPU call, so this is never launched.
        return kernel_fn
    return triton.autotune(configs=_all_fused_configs(arch), key=_TUNE_KEY + ["HAS_GRAD_LSE"],
                           prune_configs_by={"early_config_prune": _prune_fused(arch)},
                           reset_to_zero=["DQ"])(kernel_fn)
