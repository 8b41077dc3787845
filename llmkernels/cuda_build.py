"""How the CUDA C++ extension is built: sources, flags, target architectures, the CUDA toolkit.

The sources live inside the package (``llmkernels/csrc/``, shipped as package data), so an installed wheel can
build the extension just in time as a checkout can.

One definition for both builds: ahead of time by ``setup.py`` (``LLMKERNELS_BUILD_CUDA=1``, through
``cuda_build_kwargs``) and just in time by ``llmkernels.cuda_ext`` (``torch.utils.cpp_extension.load``). This module
imports nothing heavy at import time, so ``setup.py`` can load it by file path before the package is installed.

Environment:
  LLMKERNELS_CUDA_ARCHS   target compute capabilities, e.g. "80;90" (the default) or "8.0 9.0" or "90".
  CUDA_HOME / CUDA_PATH   the CUDA toolkit (else found from ``nvcc`` on PATH, else /usr/local/cuda).
  MAX_JOBS                parallel compile jobs (read by torch's build).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

PACKAGE = Path(__file__).resolve().parent
CSRC = PACKAGE / "csrc"
# The directory above the package: setup.py's extension sources must be given relative to it (the checkout).
ROOT = PACKAGE.parent
# Four translation units so that the build parallelises; the .cu files include no torch headers (fast nvcc runs).
SOURCES = ("bindings.cpp", "attention_fwd.cu", "attention_bwd.cu", "softmax.cu")
HEADERS = ("llmk_params.h", "llmk_device.cuh")
ARCH_ENV = "LLMKERNELS_CUDA_ARCHS"
DEFAULT_ARCHS = (80, 90)
PREBUILT_MODULE = "llmkernels._cuda"

INSTALL_HINT = ("install the CUDA toolkit (nvcc 12 or newer; e.g. the 'cuda-toolkit' package or "
                "https://developer.nvidia.com/cuda-downloads) and set CUDA_HOME to it, plus ninja "
                "(pip install ninja) and a C++ compiler (g++)")


def cuda_archs() -> tuple:
    """The compute capabilities to build for, from LLMKERNELS_CUDA_ARCHS (default 80 and 90)."""
    text = os.environ.get(ARCH_ENV, "").strip()
    if not text:
        return DEFAULT_ARCHS
    archs = []
    for item in re.split(r"[;,\s]+", text):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_)?(\d)\.?(\d)", item)
        if not m:
            raise ValueError(f"{ARCH_ENV}={text!r}: each entry must look like 80, 8.0 or sm_80, got {item!r}")
        arch = int(m.group(1) + m.group(2))
        if arch < 80:
            raise ValueError(f"{ARCH_ENV}={text!r}: the kernels use sm_80 matrix instructions; {arch} is too old")
        archs.append(arch)
    return tuple(sorted(set(archs)))


def nvcc_flags(archs: Optional[tuple] = None) -> list:
    """nvcc flags: optimised, one -gencode per arch (SASS) plus PTX of the newest arch for later GPUs, and the
    ptxas register/spill report (-Xptxas -v, read by ``cuda_ext.kernel_report``). No --use_fast_math: the kernels
    call exp2f explicitly and rely on IEEE handling of -inf and NaN."""
    archs = archs or cuda_archs()
    flags = ["-O3", "-lineinfo", "-Xptxas=-v"]
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    flags.append(f"-gencode=arch=compute_{max(archs)},code=compute_{max(archs)}")
    return flags


def cxx_flags() -> list:
    return ["-O3"]


def source_paths(csrc: Optional[Path] = None) -> list:
    return [str((csrc or CSRC) / s) for s in SOURCES]


def stage_sources(build_dir: str) -> Path:
    """Copy the sources and headers into ``build_dir/src`` and return that folder.

    The just-in-time build compiles these copies, not the package's files: the build directory is named by a hash of
    the sources' contents (``build_hash``), and torch writes the source paths into its ninja file, so compiling the
    package's files in place would make the same build depend on where the package lies. A checkout and an
    installed wheel with the same sources would then rewrite each other's ninja file and recompile everything each
    time; with the copies they share one cached build. A copy is rewritten only when its bytes differ, so that ninja
    sees unchanged timestamps."""
    dest = Path(build_dir) / "src"
    dest.mkdir(parents=True, exist_ok=True)
    for name in SOURCES + HEADERS:
        data = (CSRC / name).read_bytes()
        target = dest / name
        if not target.exists() or target.read_bytes() != data:
            target.write_bytes(data)
    return dest


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, else the toolkit of ``nvcc`` on PATH, else /usr/local/cuda.
    Only a directory with bin/nvcc and include/cuda_runtime.h counts (``nvcc`` may be a wrapper script elsewhere).
    Decided from the toolkit, never from ``torch.cuda.is_available()``: a build machine needs no GPU."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return str(Path(c))
    return None


def prepare_environment() -> str:
    """Point torch's build at the CUDA toolkit; raise with what to install when there is none."""
    home = find_cuda_home()
    if home is None:
        raise RuntimeError(f"cannot build the llmkernels CUDA extension: no CUDA toolkit found (looked at CUDA_HOME, "
                           f"CUDA_PATH, nvcc on PATH, /usr/local/cuda); {INSTALL_HINT}")
    os.environ["CUDA_HOME"] = home
    # torch.utils.cpp_extension reads CUDA_HOME when first imported; fix it up if it was imported already.
    import sys
    mod = sys.modules.get("torch.utils.cpp_extension")
    if mod is not None:
        mod.CUDA_HOME = home
    return home


def nvcc_version(home: str) -> str:
    try:
        out = subprocess.run([str(Path(home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def build_hash(archs: tuple, torch_version: str, cuda_version: str) -> str:
    """Hash of everything the built module depends on: sources, headers, flags, torch and CUDA versions."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((CSRC / name).read_bytes())
    h.update(repr((nvcc_flags(archs), cxx_flags(), torch_version, cuda_version)).encode())
    return h.hexdigest()[:16]


def cuda_build_kwargs() -> dict:
    """setup() arguments that build the extension ``llmkernels._cuda`` ahead of time (LLMKERNELS_BUILD_CUDA=1)."""
    prepare_environment()
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension  # noqa: PLC0415

    sources = [os.path.relpath(p, ROOT) for p in source_paths()]
    ext = CUDAExtension(
        name=PREBUILT_MODULE,
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


def jit_load(build_dir: str, name: str, verbose: bool):
    """torch.utils.cpp_extension.load with this module's sources and flags (ninja; a no-op when up to date)."""
    prepare_environment()
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    src = stage_sources(build_dir)
    return load(name=name, sources=source_paths(src), extra_cflags=cxx_flags(), extra_cuda_cflags=nvcc_flags(),
                extra_include_paths=[str(src)], build_directory=build_dir, verbose=verbose, with_cuda=True)


if __name__ == "__main__":
    # The just-in-time build runs here, in a child process of llmkernels.cuda_ext, so that the compiler output
    # (errors, and the ptxas register/spill report) can be captured into the build directory's build.log.
    import sys

    jit_load(sys.argv[1], sys.argv[2], verbose=True)
