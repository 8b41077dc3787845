"""llmkernels: fused attention and masked-softmax kernels for PyTorch (Triton, with a CUDA C++ fallback).

    import llmkernels
    out = llmkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    y = llmkernels.masked_softmax(scores, mask, scale=0.125)

Where things are: ``contract.py`` (argument checks and the canonical form), ``dispatch.py`` (backend choice),
``ops.py`` (torch.library ops, autograd, public functions), ``triton_kernels/`` (Triton kernels),
``cuda_ext.py`` + ``csrc/`` (CUDA C++), ``reference.py`` (the einsum reference), ``torch_backend.py`` (the
PyTorch backend).
"""

from . import reference
from .dispatch import NotSupportedError, use_backend
from .ops import masked_softmax, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = ["scaled_dot_product_attention", "masked_softmax", "use_backend", "NotSupportedError", "reference",
           "__version__"]
