"""llmkernels: fused attention and masked-softmax kernels for PyTorch (Triton, with a CUDA C++ fallback).

    import llmkernels
    out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    y = llmkernels.masked_softmax(scores, mask, scale=0.125)

Where things are: ``contract.py`` (argument checks and the canonical form), ``dispatch.py`` (backend choice),
``ops.py`` (torch.library ops, autograd, public functions), ``triton_kernels/`` (Triton kernels),
``cuda_ext.py`` + ``csrc/`` (in the package) (CUDA C++), ``reference.py`` (the einsum reference), ``torch_backend.py`` (the
PyTorch backend).
"""

from . import reference
from .dispatch import NotSupportedError, use_backend
from .ops import masked_softmax, scaled_dot_product_attention
from .kvcache import attention_with_kvcache

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "masked_softmax", "attention_with_kvcache", "use_backend", "NotSupportedError", "reference",
           "__version__"]

# Drop-in integration: the seed's SelfAttention module on the fused op, and routing of
# torch.nn.functional.scaled_dot_product_attention to llmkernels (Hugging Face: llmkernels.integrations.huggingface).
from . import nn  # noqa: E402
from .integrations.sdpa_routing import (disable_sdpa_routing, enable_sdpa_routing, reset_routing_stats,  # noqa: E402
                                        route_sdpa, routing_stats, sdpa_routing_enabled)
from .integrations import register_huggingface  # noqa: E402

__all__ += ["nn", "route_sdpa", "enable_sdpa_routing", "disable_sdpa_routing", "sdpa_routing_enabled", "routing_stats",
            "reset_routing_stats", "register_huggingface"]

# Packed variable-length attention (cu_seqlens), forward and backward.
from .varlen import varlen_attention  # noqa: E402

__all__ += ["varlen_attention"]
