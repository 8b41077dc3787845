"""Ways to put llmkernels under code that was written for PyTorch or Hugging Face, without editing that code.

``sdpa_routing``  routes ``torch.nn.functional.scaled_dot_product_attention`` calls to llmkernels
                  (``route_sdpa()`` block, or ``enable_sdpa_routing()`` / ``disable_sdpa_routing()``), falling
                  back to PyTorch's own function for inputs llmkernels does not take, and counts which path each
                  call took (``routing_stats()``).
``huggingface``   registers ``attn_implementation="llmkernels"`` with transformers (an optional dependency:
                  ``pip install llmkernels[hf]``); importing it needs transformers, importing this package does not.
"""

from .sdpa_routing import (RoutingStats, disable_sdpa_routing, enable_sdpa_routing, reset_routing_stats,
                           route_sdpa, routing_stats, sdpa_routing_enabled)

__all__ = ["route_sdpa", "enable_sdpa_routing", "disable_sdpa_routing", "sdpa_routing_enabled", "routing_stats",
           "reset_routing_stats", "RoutingStats", "register_huggingface"]


def register_huggingface(name: str = "llmkernels") -> None:
    """Make ``attn_implementation=name`` available in transformers (imports transformers only now; raises
    ImportError with the install command when it is missing). Same as importing ``.huggingface``."""
    from . import huggingface
    huggingface.register(name)
