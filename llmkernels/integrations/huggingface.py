"""Hugging Face transformers: ``attn_implementation="llmkernels"``.

    import llmkernels.integrations.huggingface as lk_hf
    lk_hf.register()                                   # once; importing this module also does it
    model = AutoModelForCausalLM.from_config(config, attn_implementation="llmkernels")
    # or, for a model already built: model.set_attn_implementation("llmkernels")

transformers is an optional dependency (``pip install llmkernels[hf]``). ``register()`` puts ``attention_forward``
into transformers' attention-function registry (``AttentionInterface``, transformers >= 4.48) and, where
transformers builds masks per implementation (``AttentionMaskInterface``, transformers >= 4.53), registers
``mask_builder`` for the name.

Masks: what reaches ``attention_forward``, and what it means
-----------------------------------------------------------
``mask_builder`` looks at the pattern transformers asks for. Where a compact form is EXACT it returns that form,
so the kernel computes the causal rule and the window itself (skipping the key blocks they hide) instead of
reading an ``L x S`` mask:

* causal or sliding-window causal (``causal_mask_function``, ``sliding_window_causal_mask_function(W)``) with the
  queries at the last ``L`` of the ``S`` keys (a dynamic or sliding-window cache, or no cache): ``None`` without
  padding, else the 2-D ``(B, S)`` bool key-padding mask (True = attend), as transformers' flash-attention path.
  ``attention_forward`` then applies ``is_causal`` with the bottom-right alignment (the last query sees the last
  key) and the model's ``sliding_window=W`` as ``window_size=(W - 1, 0)`` (transformers' window of W keys:
  ``kv > q - W``);
* bidirectional (``bidirectional_mask_function``) where the caller allows a skipped mask: a 4-D
  ``(B, 1, 1, S)`` key-padding mask (complete: the pattern is the padding alone);
* causal (or sliding-window causal) attention inside packed documents (transformers' packed-sequence mask, built
  from position ids that restart, without padding or cache offset): the documents' int32 ``cu_seqlens``, a 1-D
  marker that ``attention_forward`` runs on ``varlen_attention`` (``hf_varlen.py``);
* anything else (a static cache, whose ``S`` is its capacity; the overlays of vision models;
  any mask function not recognised here, or a caller that asks for a materialised mask): transformers' own
  full 4-D ``(B, 1, L, S)`` bool mask, which ``attention_forward`` applies as it is, with no causal rule or
  window of its own (the mask already holds them).

So the number of dims tells the forms apart, also at ``L = 1``: a 1-D int32 tensor is the packed marker (never a
valid SDPA mask: those are bool or float); a 4-D mask (or any other mask than 2-D) is complete; ``None`` or a 2-D
mask means "apply causality and the window bottom-right". A 2-D key-padding mask without a cache offset is
unpadded into ``varlen_attention`` where that is exact (see ``hf_varlen.py``; padded query rows give 0 there).

Keywords transformers 5.x passes to attention functions (from the models' ``attention_interface(...)`` calls and
``TransformersKwargs``) and what happens to each:

* honoured: ``dropout``, ``scaling``, ``is_causal``, ``sliding_window``, ``softcap`` (Gemma 2), ``s_aux`` /
  ``sinks`` (GPT-OSS attention sinks; differentiable), ``position_bias`` (an additive bias, T5-style);
* no effect on the result: ``output_attentions`` (warned once: weights are not returned, use ``eager``),
  ``output_hidden_states``, ``output_router_logits``, ``num_items_in_batch``, ``deterministic``, ``use_cache``,
  ``cache_position``;
* ``cu_seq_lens_q/k``, ``max_length_q/k`` (packed sequences): with no mask they give the documents to
  ``varlen_attention`` (as for FlashAttention); with the packed marker or a complete 4-D mask (both built from
  the same ``position_ids``) the mask rules; with a 2-D padding mask they are refused. ``seq_idx``: only with a
  complete mask or the marker;
* ``position_ids``: with no mask and no cache offset, ids that restart within a row are packed documents (what
  transformers' mask builder finds only without a cache object), run on ``varlen_attention``;
* refused with an error: ``indices`` / ``block_indices`` (sparse attention), a ``head_mask``, and any other
  keyword that is not None, since it might change what attention computes.

Decode steps (at most 16 queries against a longer cache, no gradient, bias, sinks or dropout) run on
``attention_with_kvcache``'s split-K kernels where that is exact: with no mask, and with a 2-D key-padding mask that
``mask_builder`` found to be left padding (a suffix of each row); hf_decode.py says how. Continuous batching
(``generate_batch``) does not take custom attention functions in transformers 5.24 (README: Hugging Face).

Other properties, compared with transformers' "sdpa" path: grouped-query attention runs natively (the key/value
heads are read in place, never repeated); query/key/value are read through their strides; rows whose keys are all
hidden (left padding) give 0, as PyTorch's SDPA does. The output is ``(B, L, H, D)`` contiguous.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..ops import scaled_dot_product_attention
from . import hf_decode, hf_varlen

try:
    import transformers
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ImportError("llmkernels.integrations.huggingface needs transformers: pip install 'llmkernels[hf]' "
                      "(or pip install transformers)") from exc

__all__ = ["NAME", "attention_forward", "mask_builder", "register"]

NAME = "llmkernels"
_log = logging.getLogger(__name__)
_warned_attentions = False

# Keywords that do not change the attention result (see the module docstring).
_NO_EFFECT = frozenset({"output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
                        "position_ids", "deterministic", "use_cache", "cache_position"})
# Packed-sequence descriptions: only the complete mask transformers builds from position_ids honours them.
_PACKING = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _window_keys(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"attn_implementation='llmkernels': {name} must be None or an int >= 1 (a window of that "
                         f"many keys), got {value!r}")
    return value


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, s_aux: Optional[torch.Tensor] = None,
                      position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function interface: query ``(B, Hq, L, D)``, key/value ``(B, Hkv, S, D)``;
    returns ``(output (B, L, Hq, Dv) contiguous, None)``.

    ``attention_mask``: a complete mask (4-D, or any shape other than 2-D: bool with True = attend, or additive
    float) applied as it is; or ``None`` / a 2-D ``(B, S)`` key-padding mask from ``mask_builder``, with which the
    causal rule (``is_causal``, default ``module.is_causal``, else True) and ``sliding_window`` apply
    bottom-right. ``softcap``: Gemma 2's logit soft-capping. ``s_aux`` (or ``sinks``): attention sinks ``(Hq,)``.
    """
    global _warned_attentions
    sinks = kwargs.pop("sinks", None)
    if sinks is not None and s_aux is not None:
        raise ValueError("attn_implementation='llmkernels': got both s_aux and sinks; pass one")
    sinks = s_aux if s_aux is not None else sinks
    for name in ("indices", "block_indices", "head_mask"):
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='llmkernels' does not support {name} (it changes what attention "
                             "computes); use 'eager' or 'sdpa' for this model")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _NO_EFFECT and k not in _PACKING)
    if unknown:
        raise ValueError(f"attn_implementation='llmkernels' got keyword(s) it does not know: {', '.join(unknown)}; "
                         "they might change what attention computes, so they are not dropped")
    if kwargs.get("output_attentions", False) and not _warned_attentions:
        _warned_attentions = True
        _log.warning("attn_implementation='llmkernels' does not return attention weights (output_attentions); "
                     "use 'eager' for them")
    window = _window_keys(sliding_window, "sliding_window")
    cap = 0.0 if softcap is None else float(softcap)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal)
    B, S = query.shape[0], key.shape[2]
    # Packed documents and unpadded batches run on varlen_attention (hf_varlen.py) where that is exact.
    attention_mask = _marker_from_position_ids(attention_mask, kwargs, is_causal, query.shape[2], S, B)
    packed_out = _packed_attention(query, key, value, attention_mask, kwargs, is_causal, dropout, scaling, window,
                                   cap, sinks, position_bias)
    if packed_out is not None:
        return packed_out, None
    if hf_varlen.is_packed_marker(attention_mask):
        # Packed documents with sinks or an additive bias, which varlen does not take: their complete mask.
        attention_mask = hf_varlen.dense_mask_of(attention_mask, B, S)
    complete = attention_mask is not None and attention_mask.dim() != 2
    packed = [k for k in _PACKING if kwargs.get(k) is not None]
    if packed and not complete:
        raise ValueError(f"attn_implementation='llmkernels' got {packed[0]} (packed sequences) without the complete "
                         "4-D mask that separates them; let transformers build the mask from position_ids")
    mask = attention_mask
    window_size = (-1, -1)
    if complete:
        is_causal = False  # the mask holds the causal rule and the window in absolute positions
    else:
        if mask is not None:
            if not is_causal:
                raise ValueError("attn_implementation='llmkernels': a 2-D key-padding attention_mask comes from the "
                                 "causal mask builder, but this attention call is not causal (is_causal=False)")
            if tuple(mask.shape) != (B, S) or mask.dtype != torch.bool:
                raise ValueError(f"attn_implementation='llmkernels': a 2-D attention_mask must be the bool key-padding "
                                 f"mask (B, S) = {(B, S)}, got {tuple(mask.shape)} {mask.dtype}")
            mask = mask[:, None, None, :]
        if window is not None:
            if not is_causal:
                raise ValueError("attn_implementation='llmkernels': sliding_window without a complete 4-D mask is "
                                 "defined here only for causal attention")
            window_size = (window - 1, 0)
    if position_bias is not None:
        # An additive bias per head (T5-style models): the mask, if any, is folded into it.
        bias = position_bias
        if mask is not None:
            bias = (bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask)
        mask = bias
    if position_bias is None and sinks is None and float(dropout) == 0.0 and not complete:
        # A decode step (few queries, a longer cache): the split-K kernels where they compute the same thing as
        # the dense call below (hf_decode.py says when). (B, L, Hq, Dv) is already our layout.
        backend = hf_decode.decode_backend(query, key, value, is_causal, scaling, window_size, cap)
        out = None
        if backend is not None and attention_mask is None:
            out = hf_decode.unpadded_decode(query, key, value, is_causal, scaling, window_size, cap, backend)
        elif backend is not None and hf_decode.is_recorded_left_padded(attention_mask):
            out = hf_decode.left_padded_decode(query, key, value, attention_mask, is_causal, scaling, window_size,
                                               cap, backend)
        if out is not None:
            return out.contiguous(), None
    out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=float(dropout),
                                       is_causal=is_causal, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                                       window_size=window_size,
                                       causal_alignment="bottom_right" if is_causal or window is not None else None,
                                       softcap=cap, sinks=sinks)
    return out.transpose(1, 2).contiguous(), None


def _packed_attention(query, key, value, attention_mask, kwargs, is_causal: bool, dropout, scaling, window, cap,
                      sinks, position_bias) -> Optional[torch.Tensor]:
    """The (B, L, Hq, Dv) output from varlen_attention for packed documents (the builder's marker, or the
    cu_seq_lens_* kwargs with no mask) and for padded batches without a cache offset; None where the call needs
    the masked dense path (see hf_varlen's docstring for when each is exact)."""
    B, Hq, L, _ = query.shape
    S = key.shape[2]
    marker = hf_varlen.is_packed_marker(attention_mask)
    given = kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None
    if (marker or given or (attention_mask is not None and attention_mask.dim() == 2)) and not is_causal:
        raise ValueError("attn_implementation='llmkernels': packed sequences or a 2-D key-padding attention_mask "
                         "come from the causal mask builder, but this attention call is not causal (is_causal=False)")
    if sinks is not None or position_bias is not None:
        if given and attention_mask is None:
            raise ValueError("attn_implementation='llmkernels': cu_seq_lens_q/k (packed sequences) with attention "
                             "sinks or a position_bias need the packed mask transformers builds from position_ids "
                             "(pass position_ids that restart per document)")
        return None  # varlen has neither: the dense path with the complete mask
    kw = dict(dropout=float(dropout), scale=scaling, window=window, softcap=cap)
    if marker:
        if L != S:
            raise ValueError(f"attn_implementation='llmkernels': a packed-sequence marker needs queries and keys over "
                             f"the same {L} tokens, got L={L}, S={S}")
        max_len = hf_varlen.max_seqlen_of(attention_mask)
        out = hf_varlen.varlen_call(*(hf_varlen.packed_tokens(t) for t in (query, key, value)), attention_mask,
                                    attention_mask, max_len, max_len, **kw)
        return out.view(B, L, Hq, -1)
    if given and attention_mask is None:
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None or cu_k is None:
            raise ValueError("attn_implementation='llmkernels': pass both cu_seq_lens_q and cu_seq_lens_k")
        max_q, max_k = (_host_int(kwargs.get(n), c) for n, c in (("max_length_q", cu_q), ("max_length_k", cu_k)))
        out = hf_varlen.varlen_call(*(hf_varlen.packed_tokens(t) for t in (query, key, value)), cu_q.to(torch.int32),
                                    cu_k.to(torch.int32), max_q, max_k, **kw)
        return out.view(B, L, Hq, -1)
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.dtype == torch.bool \
            and tuple(attention_mask.shape) == (B, S) and L == S and not given:
        plan = hf_varlen.unpad_plan(attention_mask)
        if window is None or plan.contiguous:
            return hf_varlen.unpadded_attention(query, key, value, plan, **kw)
    return None


def _marker_from_position_ids(attention_mask, kwargs, is_causal: bool, L: int, S: int, B: int):
    """No mask, but position ids that restart: packed documents that transformers' mask builder did not see (it
    looks at position ids only when there is no cache object, i.e. with use_cache=False), as in transformers'
    FlashAttention path: their marker. Anything else is returned unchanged."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or not is_causal or L != S or not isinstance(position_ids, torch.Tensor):
        return attention_mask
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return attention_mask  # the kwargs say where the documents are
    if position_ids.dim() != 2 or position_ids.shape[-1] != L or position_ids.shape[0] not in (1, B):
        return attention_mask
    found = hf_varlen.marker_from_position_ids(position_ids, B)
    return attention_mask if found is None else found


def _host_int(value, cu: torch.Tensor) -> int:
    """max_length_q/k as a Python int (transformers passes ints; a tensor or a missing one is read here)."""
    if value is None:
        return hf_varlen.max_seqlen_of(cu)
    return int(value)


def _causal_window(mask_function: Callable):
    """``("causal", None)``, ``("causal", W)`` or ``("bidirectional", None)`` for the mask functions of
    transformers that have a compact form; None for any other. Recognised by identity and by the code object of
    transformers' own factories (their closures share it), so a look-alike function never matches."""
    from transformers import masking_utils as mu
    if mask_function is mu.causal_mask_function:
        return ("causal", None)
    if mask_function is mu.bidirectional_mask_function:
        return ("bidirectional", None)
    if getattr(mask_function, "__code__", None) is mu.and_masks(mu.causal_mask_function).__code__:
        parts = hf_varlen.closure_values(mask_function).get("mask_functions")
        if isinstance(parts, tuple) and len(parts) == 2 and parts[1] is mu.causal_mask_function:
            overlay = parts[0]
            if getattr(overlay, "__code__", None) is mu.sliding_window_overlay(1).__code__:
                w = hf_varlen.closure_values(overlay).get("sliding_window")
                if isinstance(w, int) and not isinstance(w, bool) and w >= 1:
                    return ("causal", w)
    return None


def mask_builder(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                 mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                 allow_is_causal_skip: bool = True, **kwargs):
    """transformers' mask-builder interface (``AttentionMaskInterface``): see the module docstring for what it
    returns. ``attention_mask`` is the 2-D padding mask over the ``kv_offset + kv_length`` positions seen."""
    from transformers import masking_utils as mu
    if mask_function is None:
        mask_function = mu.causal_mask_function
    packed = hf_varlen.packed_sequence_pattern(mask_function)
    if packed is not None and not kwargs.get("use_vmap", False):
        inner, doc_ids = packed
        no_padding = attention_mask is None or bool(attention_mask.all())
        kind = _causal_window(inner)
        if kind is not None and kind[0] == "causal" and no_padding and q_offset == 0 and kv_offset == 0 and \
                q_length == kv_length == doc_ids.shape[1] and doc_ids.shape[0] in (1, batch_size):
            # Causal (or windowed) attention inside each document: the documents' cu_seqlens, not a mask.
            return hf_varlen.packed_marker(doc_ids.expand(batch_size, -1))
    pattern = _causal_window(mask_function)
    offsets_known = all(isinstance(o, int) and not isinstance(o, bool) for o in (q_offset, kv_offset))
    if pattern is not None and offsets_known and not kwargs.get("use_vmap", False):
        kind, _ = pattern
        pad = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if pad is not None:
            pad = pad[:, kv_offset:kv_offset + kv_length].to(torch.bool)
            if pad.shape != (batch_size, kv_length):
                pad = pad.expand(batch_size, kv_length)
        if kind == "bidirectional" and kwargs.get("allow_is_bidirectional_skip", False):
            # The pattern is the padding alone: a (B, 1, 1, S) mask is the complete mask, at any L. Only where
            # the caller allows a skipped mask: one that asks for it materialised may concatenate it.
            if pad is None:
                return torch.ones(batch_size, 1, 1, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
            return pad[:, None, None, :]
        # The causal rule and the window are ours to apply bottom-right: exact when the queries are the last
        # q_length of the kv_length keys (absolute key j = kv_offset + j, query i = q_offset + i).
        if kind == "causal" and allow_is_causal_skip and q_offset + q_length == kv_offset + kv_length:
            if pad is None:
                return None
            # One host read for both facts: no padding at all, or padding on the left only (each row False
            # then True: the decode steps can take the split-K kernels, hf_decode.py)
            no_padding, left_only = torch.stack([pad.all(), (pad[:, 1:] >= pad[:, :-1]).all()]).tolist()
            if no_padding:
                return None
            if left_only:
                hf_decode.record_left_padded(pad)
            return pad
    # transformers' own complete mask, never skipped (None would mean "apply the causal rule" to us).
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def register(name: str = NAME) -> None:
    """Register ``attention_forward`` (and ``mask_builder``) under ``name`` with transformers."""
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        from transformers.modeling_utils import AttentionInterface as interface  # noqa: N813
    interface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # transformers < 4.53 builds the 4-D mask in each model; it reaches us as a complete mask
        return
    AttentionMaskInterface.register(name, mask_builder)


register()
