"""Triton's interpreter (``TRITON_INTERPRET=1``): whether it is on.

This module is the one place that answers "are the Triton kernels interpreted?". It imports nothing from Triton
at import time, so ``dispatch.py`` can ask it even where Triton is missing or broken.

Triton decides per ``@triton.jit`` decoration whether a kernel is compiled or interpreted, from the environment
at that moment; our kernel modules are imported on first use, so the environment read here is what they see.
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to anything but "" or "0"."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
