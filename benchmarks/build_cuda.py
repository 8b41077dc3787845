"""Build (or load from its cache) the CUDA C++ extension and say whether the CUDA backend can run.

    python -m benchmarks.build_cuda

The gpu_suite runs this before the tests and the sweep, so that neither spends its time budget on the
just-in-time build. Exit status 0 when the backend is usable, 1 when it is not (with the reason).
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    start = time.time()
    try:
        from llmkernels import cuda_ext
    except Exception as exc:  # the module is not there yet, or broken
        print(f"CUDA backend unavailable: llmkernels/cuda_ext.py cannot be imported ({type(exc).__name__}: {exc})")
        return 1
    # unavailable_reason() loads the extension, building it just in time when no build is cached
    reason = cuda_ext.unavailable_reason()
    took = time.time() - start
    if reason:
        print(f"CUDA backend unavailable after {took:.0f} s: {reason}")
        return 1
    print(f"CUDA backend ready ({took:.0f} s, including any build)")
    # the kernels as built here: registers, shared memory, spills (from the build's ptxas log and cuobjdump)
    from benchmarks.static_report import cuda_report, _cuda_row

    report = cuda_report(archs=())
    for k in report["kernels"]:
        print("  " + _cuda_row(k))
    if report["unavailable"]:
        print(f"  kernel report unavailable: {report['unavailable']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
