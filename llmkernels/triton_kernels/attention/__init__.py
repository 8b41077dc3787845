"""FlashAttention-2 forward and backward in Triton: the "triton" backend's attention.

One module per part, so that a new variant (a score rule, a key range, a config table) is added in one place:

==============  =============================================================================================
``ranges``      which blocks the causal/window rule lets a kernel visit (key range of a query block, query
                range of a key block) and the per-element causal/window test
``tiles``       shared ``@triton.jit`` helpers: tile loads, the score rule (softcap, ALiBi, user mask, causal,
                window, key bound), the Philox dropout pattern, and the opening that maps a program to its
                query block (forward, dQ)
``forward``     the forward kernel and its two-phase key loop
``forward_tma`` the forward with tensor-descriptor (TMA) loads and warp-specialized candidates (extra sm_90
                autotune candidates beside forward's configs), and the per-call TMA rule
``backward``    the three backward kernels of the deterministic backward: preprocess, dK/dV, dQ
``backward_fused`` the fused backward (dK, dV in registers, dQ by fp32 atomic adds) and its dQ conversion
``configs``     launch-config tables per arch, the configs excluded from them with the reason, autotuning
``specs``       the static compile specs of every config (``compile_check`` compiles them; nothing else)
``launch``      host launchers: ``attention_forward`` / ``attention_backward`` (called by
                ``dispatch.TritonBackend``), the dense PyTorch backward fallback, ``dropout_keep_mask``
``seqlens``     packed variable-length sequences: which sequence and block a VARLEN program owns
``varlen_launch`` host launchers of the VARLEN mode (``varlen_forward`` / ``varlen_backward``,
                ``varlen_dropout_keep_mask``)
==============  =============================================================================================

Imports go one way: ranges, seqlens <- tiles <- forward <- forward_tma, backward, backward_fused <- launch, specs,
varlen_launch; configs <- launch, specs. This package re-exports the names other modules use, so ``from
llmkernels.triton_kernels import attention`` followed by ``attention.attention_forward(...)`` works (dispatch looks
the launchers up here at call time, which is what lets tests spy on them).

Design (FlashAttention-2, Dao 2023), detailed in each module's docstring: one program per query block streams
K/V with an online softmax in fp32 (forward.py); a recompute-based, atomic-free and so deterministic backward
(backward.py), with a fused atomic-dQ alternative (backward_fused.py); constexpr flags for every optional feature, so a call without a mask, causality or dropout
compiles to none of their code (tiles.py); launch configs that the static compile check showed spill-free, with
wgmma on sm_90 (configs.py, specs.py).
"""

from .configs import excluded_configs
from .launch import attention_backward, attention_forward, dropout_keep_mask
from .specs import compile_specs
from .varlen_launch import varlen_backward, varlen_dropout_keep_mask, varlen_forward

__all__ = ["attention_forward", "attention_backward", "dropout_keep_mask", "compile_specs", "excluded_configs",
           "varlen_forward", "varlen_backward", "varlen_dropout_keep_mask"]
