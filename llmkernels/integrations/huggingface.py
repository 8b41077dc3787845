"""Hugging Face transformers: ``attn_implementation="llmkernels"``.

    import llmkernels.integrations.huggingface as lk_hf
    lk_hf.register()                                   # once; importing this module also does it
    model = AutoModelForCausalLM.from_config(config, attn_implementation="llmkernels")
    # or, for a model already built: model.set_attn_implementation("llmkernels")

transformers is an optional dependency (``pip install llmkernels[hf]``). ``register()`` puts ``attention_forward``
into transformers' attention-function registry (``AttentionInterface``, transformers >= 4.48) and, where
transformers builds masks per implementation (``AttentionMaskInterface``, transformers >= 4.53), registers
transformers' own SDPA mask builder for the name: our op takes exactly what PyTorch's SDPA takes, a bool mask
``(B, 1, L, S)`` with True = attend, or no mask plus ``is_causal``. A float (additive) mask, as older versions
or custom 4-D masks give, works too.

What the function does with a model's attention call, compared with transformers' "sdpa" path: grouped-query
attention runs natively (``enable_gqa``: the key/value heads are read in place, never repeated in memory); the
query/key/value tensors are read through their strides (the ``(B, L, H, D).transpose(1, 2)`` views the models
make); rows whose keys are all masked (left padding) give 0, as PyTorch's SDPA does. The output is
``(B, L, H, D)`` contiguous, as transformers expects. Attention weights are not returned (``output_attentions``
needs the eager implementation), and a ``softcap`` (Gemma 2) is refused with an error.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..ops import scaled_dot_product_attention

try:
    import transformers
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ImportError("llmkernels.integrations.huggingface needs transformers: pip install 'llmkernels[hf]' "
                      "(or pip install transformers)") from exc

__all__ = ["NAME", "attention_forward", "register"]

NAME = "llmkernels"
_log = logging.getLogger(__name__)
_warned_attentions = False


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function interface: query ``(B, Hq, L, D)``, key/value ``(B, Hkv, S, D)``;
    returns ``(output (B, L, Hq, Dv) contiguous, None)``.

    ``attention_mask``: None, a bool mask (True = attend) or an additive float mask, broadcastable to
    ``(B, Hq, L, S)``. ``is_causal``: the model's causality (default ``module.is_causal``, else True); it is used
    only when there is no mask and more than one query, as transformers' SDPA path does (the mask, when given,
    already holds the causal pattern; a single decoding query sees every cached key).
    """
    global _warned_attentions
    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='llmkernels' does not support softcap (logit soft-capping); use "
                         "'eager' for this model")
    if kwargs.get("output_attentions", False) and not _warned_attentions:
        _warned_attentions = True
        _log.warning("attn_implementation='llmkernels' does not return attention weights (output_attentions); "
                     "use 'eager' for them")
    position_bias = kwargs.get("position_bias")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    q_len = query.shape[2]
    is_causal = bool(is_causal) and attention_mask is None and q_len > 1
    if position_bias is not None:
        # An additive bias per head (T5-style models): fold it into the mask, as transformers' SDPA path does.
        bias = position_bias
        if attention_mask is not None:
            bias = (bias.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                    else bias + attention_mask)
        elif is_causal:
            S = key.shape[2]
            keep = torch.ones(q_len, S, dtype=torch.bool, device=query.device).tril()
            bias = bias.masked_fill(~keep, float("-inf"))
        attention_mask, is_causal = bias, False
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=is_causal, scale=scaling,
                                       enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Register ``attention_forward`` (and the SDPA mask builder) under ``name`` with transformers."""
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        from transformers.modeling_utils import AttentionInterface as interface  # noqa: N813
    interface.register(name, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds the 4-D mask in each model; it reaches us as a float mask
        return
    AttentionMaskInterface.register(name, sdpa_mask)


register()
