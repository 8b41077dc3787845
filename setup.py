"""Build script. A plain ``pip install`` compiles nothing: the Triton kernels compile at run time and the CUDA
C++ backend builds just in time on first use. ``LLMKERNELS_BUILD_CUDA=1`` builds the CUDA extension ahead of
time (see README: use ``--no-build-isolation`` so the build sees your installed torch)."""

import os

from setuptools import setup


def cuda_extension_kwargs() -> dict:
    if os.environ.get("LLMKERNELS_BUILD_CUDA", "0") != "1":
        return {}
    # Imported only when asked: torch is needed to build the extension, not to install the package.
    from llmkernels_build import cuda_build_kwargs  # noqa: PLC0415

    return cuda_build_kwargs()


setup(**cuda_extension_kwargs())
