"""Every implementation the suite times, in one place.

A provider turns a workload's inputs into a zero-argument forward call (``Prepared``), or raises
``Unavailable`` with the reason it cannot run here (a module not built yet, a CUDA-only kernel on CPU, a
backend that rejects the inputs). The runner times the forward, the backward or both from that call, so the
providers need not know about modes.

Attention:
  llmk-triton, llmk-cuda   llmkernels.scaled_dot_product_attention(..., backend="triton" / "cuda")
  llmk-triton-det          the same with deterministic=True: the separate-pass backward (llmk-triton's default
                           backward is the fused one with atomic dQ adds)
  sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                           torch.nn.functional.scaled_dot_product_attention with that backend forced through
                           torch.nn.attention.sdpa_kernel; a sliding window or ALiBi as the materialised
                           (1, 1, L, S) bool mask / (1, H, L, S) bias a user of SDPA builds (transformers' form)
  flex                     torch.nn.attention.flex_attention under torch.compile; causal, sliding-window and
                           padding masks as a block mask, the float bias, softcap (tanh) and ALiBi as a score_mod
  reference                llmkernels.reference.scaled_dot_product_attention: the classic einsum module's math,
                           in the input dtype (materialises L x S)
Packed variable-length attention (the "varlen" rows: q, k, v (T, H, E) and cu_seqlens):
  llmk-triton              llmkernels.varlen_attention(..., backend="triton")
  torch-varlen             torch.nn.attention.varlen.varlen_attn (torch 2.9+, CUDA only)
  sdpa-flash-padded        SDPA's flash backend on the same documents padded to (B, H, max_len, E), causal (right
                           padding: every real query sees only real keys), the output gathered back to (T, H, E)
  flex-document            FlexAttention with a document block mask (same document, causal) over the packed batch
  reference                llmkernels.reference.varlen_attention in the input dtype (per-document einsum)
Masked softmax:
  llmk-triton, llmk-cuda   llmkernels.masked_softmax(..., backend="triton" / "cuda")
  eager                    torch.softmax(x * scale + mask, -1) (causal: masked_fill with a precomputed triangle)
  compiled                 the same function under torch.compile
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


class Unavailable(Exception):
    """This provider cannot run these inputs on this machine; the message says why."""


@dataclass
class Prepared:
    forward: Callable[[], torch.Tensor]
    # Entered around every use of ``forward`` (warm-up, timing, memory): e.g. forcing an SDPA backend, so the
    # context switch itself is not timed.
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass
class Provider:
    name: str
    op: str  # "attention" or "softmax"
    prepare: Callable  # inputs -> Prepared, or raises Unavailable
    # On a machine without a GPU the default run leaves some providers out (they are then listed as skipped,
    # with this reason); naming them with --providers runs them anyway.
    cpu_skip: Optional[str] = None
    # Takes the packed variable-length rows (workloads.VarlenWorkload) instead of the dense attention rows.
    varlen: bool = False


def _import_error(module: str, path: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # not written yet, or broken: either way the reason is worth printing
        text = str(exc).strip()
        return f"{path} cannot be imported ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"
    return None


_BACKEND_MODULES = {
    ("triton", "attention"): ("llmkernels.triton_kernels.attention", "llmkernels/triton_kernels/attention/"),
    ("triton", "softmax"): ("llmkernels.triton_kernels.softmax", "llmkernels/triton_kernels/softmax.py"),
    ("cuda", "attention"): ("llmkernels.cuda_ext", "llmkernels/cuda_ext.py"),
    ("cuda", "softmax"): ("llmkernels.cuda_ext", "llmkernels/cuda_ext.py"),
}


def llmkernels_reasons(backend: str, op: str, args) -> list:
    """Why llmkernels' ``backend`` cannot run these canonical ``args`` (empty: it can)."""
    from llmkernels import dispatch

    reasons = []
    err = _import_error(*_BACKEND_MODULES[(backend, op)])
    if err:
        reasons.append(err)
    b = dispatch.BACKENDS[backend]
    try:
        reasons += b.attention_reasons(args) if op == "attention" else b.softmax_reasons(args)
    except Exception as exc:  # a backend whose own check fails (e.g. its module is missing) cannot run
        reasons.append(f"{type(exc).__name__}: {exc}")
    return list(dict.fromkeys(r for r in reasons if r))  # de-duplicated, in order


def fresh_compile(fn):
    """torch.compile(fn) for one workload: the dynamo cache is reset first so each shape compiles once with
    static shapes (no recompile limit reached across a sweep, no dynamic-shape kernels)."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------------------------------------------
# attention


def _llmk_attention(backend: str, deterministic=None):
    """``deterministic`` as in llmkernels.scaled_dot_product_attention: None (the default, the fused atomic
    backward unless torch's deterministic mode is on), True (the separate-pass backward)."""
    def prepare(inp):
        import llmkernels
        from llmkernels import contract

        w = inp.workload
        variant = inp.variant_kwargs()
        args = contract.check_attention(inp.q, inp.k, inp.v, inp.mask, 0.0, w.causal, None, inp.enable_gqa,
                                        **variant)
        reasons = llmkernels_reasons(backend, "attention", args)
        if reasons:
            raise Unavailable("; ".join(reasons))
        return Prepared(lambda: llmkernels.scaled_dot_product_attention(
            inp.q, inp.k, inp.v, attn_mask=inp.mask, is_causal=w.causal, enable_gqa=inp.enable_gqa,
            backend=backend, deterministic=deterministic, **variant))
    return prepare


def _sdpa(backend_name: str, cuda_only: bool):
    def prepare(inp):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(f"torch {torch.__version__} has no SDPBackend.{backend_name}")
        if cuda_only and inp.q.device.type != "cuda":
            raise Unavailable(f"SDPBackend.{backend_name} runs on CUDA only")
        w = inp.workload
        if w.softcap > 0:
            raise Unavailable("SDPA has no softcap (no form of tanh capping before the softmax)")
        gqa = {"enable_gqa": True} if inp.enable_gqa else {}
        # Sliding window and ALiBi: what a user of SDPA has, the materialised mask / bias (built once, untimed)
        mask, causal = inp.materialised_mask(), w.causal
        if mask is not inp.mask:
            causal = False  # the materialised mask holds the causal rule too
        return Prepared(lambda: F.scaled_dot_product_attention(inp.q, inp.k, inp.v, attn_mask=mask,
                                                               is_causal=causal, **gqa),
                        context=lambda: sdpa_kernel([backend]))
    return prepare


def _flex(inp):
    try:
        from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({exc})") from None
    w = inp.workload
    mask_mods = []
    if w.causal:
        mask_mods.append(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)  # top-left, as the contract
    left, right = w.window
    if left >= 0:
        mask_mods.append(lambda b, h, q_idx, kv_idx: kv_idx >= q_idx - left)
    if right >= 0:
        mask_mods.append(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx + right)
    if inp.lengths is not None:
        lengths = inp.lengths
        mask_mods.append(lambda b, h, q_idx, kv_idx: kv_idx < lengths[b])
    block_mask = None
    if mask_mods:
        batch = w.B if inp.lengths is not None else None  # the padding mask differs per sequence
        block_mask = create_block_mask(and_masks(*mask_mods), batch, None, w.L, w.S, device=inp.q.device)
    score_mod = None
    if (w.mask == "bias") + (w.softcap > 0) + w.alibi > 1:
        raise Unavailable("the suite's FlexAttention form takes one score_mod (bias, softcap or ALiBi)")
    if w.mask == "bias":
        bias = inp.mask

        def score_mod(score, b, h, q_idx, kv_idx):  # flex applies it to the scaled score, as the float mask
            return score + bias[0, h, q_idx, kv_idx]
    elif w.softcap > 0:
        cap = w.softcap

        def score_mod(score, b, h, q_idx, kv_idx):  # Gemma 2's logit soft-capping of the scaled score
            return cap * torch.tanh(score / cap)
    elif w.alibi:
        slopes = inp.alibi_slopes

        def score_mod(score, b, h, q_idx, kv_idx):  # top-left distance, as the workload's alignment
            return score - slopes[h] * (q_idx - kv_idx).abs()
    elif inp.mask is not None and inp.lengths is None:
        raise Unavailable(f"no FlexAttention form for mask kind {w.mask!r}")
    compiled = fresh_compile(flex_attention)
    return Prepared(lambda: compiled(inp.q, inp.k, inp.v, score_mod=score_mod, block_mask=block_mask,
                                     enable_gqa=inp.enable_gqa))


def _einsum_reference(inp):
    import llmkernels

    w = inp.workload
    return Prepared(lambda: llmkernels.reference.scaled_dot_product_attention(
        inp.q, inp.k, inp.v, attn_mask=inp.mask, is_causal=w.causal, enable_gqa=inp.enable_gqa,
        **inp.variant_kwargs()))


# ----------------------------------------------------------------------------------------------------------------
# packed variable-length attention


def _llmk_varlen(backend: str):
    def prepare(inp):
        import llmkernels
        from llmkernels import dispatch
        from llmkernels.varlen_contract import check_varlen_attention

        w, cu, n = inp.workload, inp.cu_seqlens, inp.max_seqlen
        args = check_varlen_attention(inp.q, inp.k, inp.v, cu, cu, n, n, is_causal=w.causal)
        err = _import_error(*_BACKEND_MODULES[(backend, "attention")])
        reasons = ([err] if err else []) + dispatch.BACKENDS[backend].varlen_reasons(args)
        if reasons:
            raise Unavailable("; ".join(reasons))
        return Prepared(lambda: llmkernels.varlen_attention(inp.q, inp.k, inp.v, cu, cu, n, n, is_causal=w.causal,
                                                            backend=backend))
    return prepare


def _torch_varlen(inp):
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no torch.nn.attention.varlen ({exc})") from None
    if inp.q.device.type != "cuda":
        raise Unavailable("torch.nn.attention.varlen.varlen_attn runs on CUDA only")
    w, cu, n = inp.workload, inp.cu_seqlens, inp.max_seqlen
    return Prepared(lambda: varlen_attn(inp.q, inp.k, inp.v, cu, cu, n, n, is_causal=w.causal))


def _sdpa_padded(inp):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w = inp.workload
    if not w.causal:
        raise Unavailable("the padded SDPA form needs a key-padding mask without causality, which the flash "
                          "backend does not take")
    B, n, T = len(w.lengths), inp.max_seqlen, w.tokens
    # The (document, position) of each packed token, built once: the padding scatter and the gather back.
    doc = torch.repeat_interleave(torch.arange(B, device=inp.q.device), torch.tensor(w.lengths, device=inp.q.device))
    pos = torch.arange(T, device=inp.q.device) - inp.cu_seqlens[:-1].long()[doc]

    def forward():
        padded = []
        for t in (inp.q, inp.k, inp.v):
            buf = t.new_zeros(B, n, w.H, w.E)
            buf = buf.index_put((doc, pos), t)  # differentiable scatter into the padded batch
            padded.append(buf.transpose(1, 2))
        out = F.scaled_dot_product_attention(*padded, is_causal=True)
        return out.transpose(1, 2)[doc, pos]

    return Prepared(forward, context=lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION]))


def _flex_document(inp):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Unavailable(f"torch {torch.__version__} has no FlexAttention ({exc})") from None
    w = inp.workload
    doc = torch.repeat_interleave(torch.arange(len(w.lengths), device=inp.q.device),
                                  torch.tensor(w.lengths, device=inp.q.device))
    causal = w.causal

    def document(b, h, q_idx, kv_idx):  # same document (and causal): the packed batch's block-diagonal mask
        same = doc[q_idx] == doc[kv_idx]
        return (same & (q_idx >= kv_idx)) if causal else same

    T = w.tokens
    block_mask = create_block_mask(document, None, None, T, T, device=inp.q.device)
    compiled = fresh_compile(flex_attention)
    as_batch = (lambda t: t.transpose(0, 1).unsqueeze(0))  # (T, H, E) -> (1, H, T, E)
    return Prepared(lambda: compiled(as_batch(inp.q), as_batch(inp.k), as_batch(inp.v),
                                     block_mask=block_mask)[0].transpose(0, 1))


def _varlen_reference(inp):
    import llmkernels

    w, cu, n = inp.workload, inp.cu_seqlens, inp.max_seqlen
    return Prepared(lambda: llmkernels.reference.varlen_attention(inp.q, inp.k, inp.v, cu, cu, n, n,
                                                                  is_causal=w.causal))


# ----------------------------------------------------------------------------------------------------------------
# masked softmax


def _llmk_softmax(backend: str):
    def prepare(inp):
        import llmkernels
        from llmkernels import contract

        w = inp.workload
        args = contract.check_masked_softmax(inp.x, inp.mask, w.scale, w.causal)
        reasons = llmkernels_reasons(backend, "softmax", args)
        if reasons:
            raise Unavailable("; ".join(reasons))
        return Prepared(lambda: llmkernels.masked_softmax(inp.x, inp.mask, scale=w.scale, is_causal=w.causal,
                                                          backend=backend))
    return prepare


def eager_masked_softmax(x, mask, scale: float, hidden: Optional[torch.Tensor]):
    """What a model without a fused kernel writes: scale, add the mask, hide the causal triangle, softmax."""
    logits = x * scale
    if mask is not None:
        logits = logits + mask
    if hidden is not None:
        logits = logits.masked_fill(hidden, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _causal_hidden(inp):
    w = inp.workload
    if not w.causal:
        return None
    return torch.ones(w.M, w.N, dtype=torch.bool, device=inp.x.device).triu(1)  # column j > row i hidden


def _eager_softmax(inp):
    hidden = _causal_hidden(inp)
    return Prepared(lambda: eager_masked_softmax(inp.x, inp.mask, inp.workload.scale, hidden))


def _compiled_softmax(inp):
    hidden = _causal_hidden(inp)
    compiled = fresh_compile(eager_masked_softmax)
    return Prepared(lambda: compiled(inp.x, inp.mask, inp.workload.scale, hidden))


# ----------------------------------------------------------------------------------------------------------------

_FLEX_CPU_SKIP = ("torch.compile of flex_attention takes ~10 s per shape on a CPU and FlexAttention is measured "
                  "on GPUs; name it with --providers to run it anyway")

PROVIDERS = [
    Provider("llmk-triton", "attention", _llmk_attention("triton")),
    Provider("llmk-triton-det", "attention", _llmk_attention("triton", deterministic=True)),
    Provider("llmk-cuda", "attention", _llmk_attention("cuda")),
    Provider("sdpa-flash", "attention", _sdpa("FLASH_ATTENTION", cuda_only=False)),  # PyTorch has a CPU flash
    Provider("sdpa-efficient", "attention", _sdpa("EFFICIENT_ATTENTION", cuda_only=True)),
    Provider("sdpa-cudnn", "attention", _sdpa("CUDNN_ATTENTION", cuda_only=True)),
    Provider("sdpa-math", "attention", _sdpa("MATH", cuda_only=False)),
    Provider("flex", "attention", _flex, cpu_skip=_FLEX_CPU_SKIP),
    Provider("reference", "attention", _einsum_reference),
    Provider("llmk-triton", "attention", _llmk_varlen("triton"), varlen=True),
    Provider("torch-varlen", "attention", _torch_varlen, varlen=True),
    Provider("sdpa-flash-padded", "attention", _sdpa_padded, varlen=True),
    Provider("flex-document", "attention", _flex_document, cpu_skip=_FLEX_CPU_SKIP, varlen=True),
    Provider("reference", "attention", _varlen_reference, varlen=True),
    Provider("llmk-triton", "softmax", _llmk_softmax("triton")),
    Provider("llmk-cuda", "softmax", _llmk_softmax("cuda")),
    Provider("eager", "softmax", _eager_softmax),
    Provider("compiled", "softmax", _compiled_softmax),
]


def providers_for(op: str, varlen: bool = False) -> list:
    """The providers of one op: the dense rows' (default) or the packed variable-length rows' (varlen=True)."""
    return [p for p in PROVIDERS if p.op == op and p.varlen == varlen]


def provider_names(op: Optional[str] = None) -> list:
    return list(dict.fromkeys(p.name for p in PROVIDERS if op is None or p.op == op))
