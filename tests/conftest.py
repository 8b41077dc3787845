"""Test set-up shared by every test module.

On a machine without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before any kernel is decorated, so it is set here, before llmkernels' kernels are imported. On a GPU
machine the same tests run the compiled kernels on the GPU.
"""

import os

import numpy as np
import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkernels  # noqa: E402  (after TRITON_INTERPRET is set)
from llmkernels import _alloc  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_bf16_dot() -> None:
    """Work around Triton's interpreter bug with bf16 ``tl.dot`` (triton 3.6 to 3.9).

    The interpreter stores bf16 values as uint16 and its ``create_dot`` multiplies that raw storage, so every
    bf16 dot returns garbage. A GPU's bf16 MMA multiplies exactly and accumulates in fp32, so we widen bf16
    operands to the fp32 values they encode (exact: a bf16 is the top half of an fp32) before the matmul. This
    fixes the simulator, not our kernels; fp16 and fp32 dots are untouched.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_llmkernels_bf16_fix", False):
        return
    original = builder_cls.create_dot

    def widen(handle):
        if handle.dtype == tl.bfloat16:
            as_f32 = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(as_f32, tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot

    # Same versions: the interpreter's fp32 -> bf16 conversion (``cast_impl``, used by ``x.to(tl.bfloat16)``)
    # truncates the mantissa instead of rounding to nearest even as the GPU's cvt.rn.bf16 does. Truncation errs
    # in one direction, so a sum of rounded terms (P^T dO in an attention backward) drifts linearly and a correct
    # kernel fails the tolerance rule. Round as the hardware does (torch's conversion is round-to-nearest-even).
    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original_cast(self, src, dst_type)

    builder_cls.cast_impl = cast_impl
    builder_cls._llmkernels_bf16_fix = True


def _patch_interpreter_scalar_index() -> None:
    """Work around Triton's interpreter bug with ``range()`` bounds derived from program ids (triton 3.6).

    The interpreter holds a scalar such as ``tl.program_id(0)`` as a one-element 1-D numpy array, and its
    ``tensor.__index__`` is ``int(handle.data)``. NumPy 2.4 no longer converts an array of ndim > 0 to a Python
    int (deprecated since 1.25; now "only 0-dimensional arrays can be converted to Python scalars"), so
    ``range(lo, hi, BLOCK)`` with ``lo``/``hi`` computed from a program id fails in the simulator; the compiled
    kernel has no such problem. Newer Triton (3.8) squeezes the array first; do the same where the interpreter
    does not. This fixes the simulator, not our kernels.
    """
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_llmkernels_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    _patch_lang_tensor._llmkernels_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


if INTERPRETING:
    _patch_interpreter_bf16_dot()
    _patch_interpreter_scalar_index()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_GPU else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN during tests, so an unwritten element cannot pass."""
    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)


def pytest_report_header(config):
    where = "GPU " + torch.cuda.get_device_name() if HAS_GPU else "CPU"
    return f"llmkernels {llmkernels.__version__}: {where}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
