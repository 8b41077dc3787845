"""Which backends the integration tests can run in this session (used by test_nn, test_sdpa_routing,
test_huggingface, test_errors, test_properties, test_determinism).

The Triton kernels run in Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU), so on
every machine "auto" picks "triton" first. While a backend's kernel module is not in the tree yet, a test that
goes through the default dispatch would die on the missing import rather than test the integration; the
``default_dispatch`` block then routes "auto" to the reference backend instead, and the same tests pick the
kernels up, unchanged, as soon as the module exists.
"""

import contextlib
import importlib.util

import torch

from conftest import HAS_GPU, INTERPRETING
from llmkernels import use_backend

_KERNEL_MODULES = {"attention": "llmkernels.triton_kernels.attention", "softmax": "llmkernels.triton_kernels.softmax"}
_ENTRY_POINTS = {"attention": ("attention_forward", "attention_backward"),
                 "softmax": ("masked_softmax_forward", "masked_softmax_backward")}


def triton_present(kind: str = "attention") -> bool:
    """Triton can run here (GPU, or the interpreter) and its kernel module for ``kind`` exists with the entry
    points the backend calls (a module still being written may lack them)."""
    if not (HAS_GPU or INTERPRETING) or importlib.util.find_spec(_KERNEL_MODULES[kind]) is None:
        return False
    try:
        module = importlib.import_module(_KERNEL_MODULES[kind])
    except Exception:  # a half-written module: not usable yet
        return False
    return all(hasattr(module, fn) for fn in _ENTRY_POINTS[kind])


def cuda_present(kind: str = "attention") -> bool:
    if not HAS_GPU:
        return False
    from llmkernels import dispatch
    try:
        return not dispatch.BACKENDS["cuda"]._device_reasons(torch.empty(0, device="cuda"))
    except ImportError:  # the CUDA extension's module has not landed
        return False


def runnable_backends(kind: str = "attention") -> list:
    """Backends to parametrize over: every one that can run ``kind`` here, fastest first."""
    names = []
    if triton_present(kind):
        names.append("triton")
    if cuda_present(kind):
        names.append("cuda")
    return names + ["reference"]


@contextlib.contextmanager
def default_dispatch(kind: str = "attention"):
    """The default "auto" choice, with the reference backend standing in for Triton while its kernels for
    ``kind`` are missing (see the module docstring). Yields the backend "auto" resolves to for typical inputs."""
    if (HAS_GPU or INTERPRETING) and not triton_present(kind):
        with use_backend("reference"):
            yield "reference"
    else:
        yield runnable_backends(kind)[0]
