"""The static compile report: every Triton kernel module's specs, compiled for sm_80 / sm_90 without a GPU.

``python -m llmkernels.triton_kernels.compile_report [--arch 90 80] [--filter NAME] [--json FILE]`` prints one
row per config (registers, shared memory, spills, matrix instructions), the configs each module excludes on
purpose with the reason, and a count of the configs with problems (exit status 1 when there are any). The
kernel modules are listed in ``KERNEL_MODULES``; each gives ``compile_specs(arch)`` and
``excluded_configs(arch)``. ``compile_check.compile_spec`` does the compiling.
"""

from __future__ import annotations

import importlib
import os

from .compile_check import compile_spec
from .interpreter import interpreting

# The kernel modules (llmkernels.triton_kernels.<name>) whose configs the report covers.
KERNEL_MODULES = ("attention", "softmax", "decode")


def kernel_module(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def all_specs(arch: int) -> list:
    """Every config of every Triton kernel module, for ``sm_<arch>``."""
    return [spec for name in KERNEL_MODULES for spec in kernel_module(name).compile_specs(arch)]


def all_excluded(arch: int) -> list:
    """(config, reason) for every config a kernel module deliberately does not choose on ``sm_<arch>``."""
    return [row for name in KERNEL_MODULES for row in kernel_module(name).excluded_configs(arch)]


def _compile_one(job):
    spec_index, arch = job
    return compile_spec(all_specs(arch)[spec_index], arch)


def compile_all(archs=(80, 90), jobs: int = 0, name_filter: str = "") -> list:
    """Compile every config for each arch, in parallel worker processes; returns CompileReports in order.

    Must run in a process where Triton's interpreter is off (TRITON_INTERPRET unset): the interpreter replaces
    the kernels by Python functions that cannot be compiled. Tests therefore call this through ``python -m``.
    """
    if interpreting():
        raise RuntimeError("compile checks need TRITON_INTERPRET unset (the interpreter's kernels cannot be "
                           "compiled); run `python -m llmkernels.triton_kernels.compile_report` in a clean process")
    work = [(i, arch) for arch in archs for i, s in enumerate(all_specs(arch)) if name_filter in s.name]
    jobs = jobs or min(len(work), os.cpu_count() or 1) or 1
    if jobs == 1:
        return [_compile_one(w) for w in work]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_one, work, chunksize=1)


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Compile every Triton config for sm_80/sm_90 and report "
                                                 "registers, shared memory, spills and matrix instructions.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--filter", default="", help="only configs whose name contains this")
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--json", help="also write the reports to this JSON file")
    args = parser.parse_args(argv)
    reports = compile_all(tuple(args.arch), args.jobs, args.filter)
    for r in reports:
        print(r.row())
    for arch in args.arch:
        for desc, why in all_excluded(arch):
            print(f"sm_{arch}  excluded: {desc}: {why}")
    bad = [r for r in reports if not (r.ok and not r.spills and r.shared_fits and r.mma_ok)]
    print(f"{len(reports)} configs compiled, {len(bad)} with problems")
    if args.json:
        fields = ("name", "arch", "ok", "error", "registers", "local_bytes", "spill_instructions", "shared_bytes",
                  "hgmma", "hmma", "expect_mma")
        rows = [{f: getattr(r, f) for f in fields} | {"spills": r.spills, "shared_fits": r.shared_fits,
                                                       "mma_ok": r.mma_ok} for r in reports]
        excluded = [{"arch": a, "config": d, "reason": w} for a in args.arch for d, w in all_excluded(a)]
        with open(args.json, "w") as f:
            json.dump({"configs": rows, "excluded": excluded}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
