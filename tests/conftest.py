"""Test set-up shared by every test module.

On a machine without a GPU the Triton kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET must
be set before any kernel is decorated, so it is set here, before llmkernels' kernels are imported. On a GPU
machine the same tests run the compiled kernels on the GPU.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llmkernels  # noqa: E402  (after TRITON_INTERPRET is set)
from llmkernels import _alloc  # noqa: E402
from llmkernels.triton_kernels import interpreter  # noqa: E402

INTERPRETING = interpreter.interpreting()

if INTERPRETING:
    # The package probes Triton's interpreter for its known bugs and fixes them on the first use of the triton
    # backend; some tests launch kernels directly (not through dispatch), so do it now, before any of them.
    interpreter.prepare()


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def auto_dispatch():
    """The default "auto" choice for the test (runnable.default_dispatch: the reference backend stands in for a
    kernel family that is missing); yields the backend "auto" resolves to for typical inputs. Modules that need
    it for every test mark themselves with ``pytestmark = pytest.mark.usefixtures("auto_dispatch")``."""
    from runnable import default_dispatch  # runnable imports this module: import it when the fixture runs

    with default_dispatch() as name:
        yield name


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every kernel output starts as NaN during tests, so an unwritten element cannot pass."""
    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)


def pytest_report_header(config):
    where = "GPU " + torch.cuda.get_device_name() if HAS_GPU else "CPU"
    line = f"llmkernels {llmkernels.__version__}: {where}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
    if INTERPRETING:
        line += f" (interpreter bugs: {interpreter.describe()})"
    return line
