"""Build script. A plain ``pip install`` compiles nothing: the Triton kernels compile at run time and the CUDA
C++ backend builds just in time on first use. ``LLMKERNELS_BUILD_CUDA=1`` builds the CUDA extension ahead of
time (see README: use ``--no-build-isolation`` so the build sees your installed torch)."""

import os

from setuptools import setup


def cuda_extension_kwargs() -> dict:
    if os.environ.get("LLMKERNELS_BUILD_CUDA", "0") != "1":
        return {}
    # llmkernels/cuda_build.py holds the sources and flags shared with the just-in-time build; it is loaded by
    # path so that the package (which imports torch and triton) need not be importable while it is being built.
    import importlib.util  # noqa: PLC0415

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llmkernels", "cuda_build.py")
    spec = importlib.util.spec_from_file_location("llmkernels_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cuda_build_kwargs()


setup(**cuda_extension_kwargs())
