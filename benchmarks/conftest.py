"""pytest set-up for the pytest-benchmark files (``bench_*.py``).

As in tests/conftest.py: without a GPU the Triton kernels run in Triton's interpreter on CPU tensors, and
TRITON_INTERPRET must be set before any kernel is decorated, so before llmkernels' kernels are imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
