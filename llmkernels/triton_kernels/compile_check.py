"""Compile Triton kernel configs for real GPUs without a GPU, and read what the compiler made of them.

Each kernel module lists the launch configs its GPU path can choose (``compile_specs(arch)``). Here a config is
compiled for an NVIDIA architecture with ``triton.compile`` and a ``GPUTarget``, and the cubin is inspected with
the ``cuobjdump`` and ``nvdisasm`` that ship in Triton's wheel: registers, local memory (spills), shared memory,
and whether the matrix instructions are used (``HGMMA``, Hopper's wgmma, or ``HMMA``, the mma.sync path).
This is what the static tests assert on and what the benchmark suite's static report prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

# Largest dynamic shared memory one block may use (opt-in maximum), by architecture, in bytes.
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class CompileSpec:
    """One launch config of one kernel, as the GPU path would compile it.

    ``signature`` maps every kernel parameter to its Triton type ("*fp16", "i32", "fp32", ... or "constexpr");
    ``constexprs`` gives the constexpr values. ``expect_mma`` says the kernel does matrix products on fp16/bf16
    tiles, so its SASS must use the tensor cores (HGMMA on sm_90).
    """

    name: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    expect_mma: bool = False
    options: dict = field(default_factory=dict)
    # Argument attributes the JIT would derive at launch, e.g. {(0,): [["tt.divisibility", 16]]} for a 16-byte
    # aligned pointer or a stride that is a multiple of 16 (they enable vectorised loads, so they change codegen).
    attrs: dict = field(default_factory=dict)


@dataclass
class CompileReport:
    name: str
    arch: int
    ok: bool
    error: Optional[str] = None
    registers: int = 0
    local_bytes: int = 0  # per-thread local memory: spills (and local arrays)
    spill_instructions: int = 0  # LDL/STL in the SASS
    shared_bytes: int = 0  # dynamic + static shared memory per block
    hgmma: int = 0
    hmma: int = 0
    expect_mma: bool = False

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.spill_instructions > 0

    @property
    def shared_fits(self) -> bool:
        return self.shared_bytes <= MAX_SHARED_BYTES.get(self.arch, 0)

    @property
    def mma_ok(self) -> bool:
        """fp16/bf16 dots use the architecture's best matrix instruction: HGMMA on sm_90, HMMA on sm_80."""
        if not self.expect_mma:
            return True
        return self.hgmma > 0 if self.arch >= 90 else self.hmma > 0

    def row(self) -> str:
        if not self.ok:
            return f"sm_{self.arch}  {self.name}: COMPILE ERROR {self.error}"
        mma = f"HGMMA {self.hgmma}" if self.hgmma else (f"HMMA {self.hmma}" if self.hmma else "no MMA")
        return (f"sm_{self.arch}  {self.name}: {self.registers} regs, {self.shared_bytes / 1024:.1f} KiB smem, "
                f"spills {'YES (' + str(self.local_bytes) + ' B local)' if self.spills else 'none'}, {mma}")


def _triton_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _run(tool: str, path: str) -> str:
    return subprocess.run([_triton_bin(tool), path], capture_output=True, text=True, check=True).stdout


def compile_spec(spec: CompileSpec, arch: int) -> CompileReport:
    """Compile ``spec`` for ``sm_<arch>`` and inspect the cubin (a failed compile is reported, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = CompileReport(spec.name, arch, ok=False, expect_mma=spec.expect_mma)
    try:
        src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs),
                        attrs=dict(spec.attrs) or None)
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, **spec.options}
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # a config that does not compile is a finding, reported per config
        report.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        return report
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        usage = subprocess.run([_triton_bin("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = _run("nvdisasm", cubin)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if m:
        report.registers = int(m.group(1))
        report.local_bytes = int(m.group(2)) + int(m.group(4))
        report.shared_bytes = int(m.group(3)) + int(kernel.metadata.shared)
    else:
        report.shared_bytes = int(kernel.metadata.shared)
    report.spill_instructions = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    report.hgmma = len(re.findall(r"\bHGMMA\b", sass))
    report.hmma = len(re.findall(r"\bHMMA\b", sass))
    report.ok = True
    return report


def all_specs(arch: int) -> list:
    """Every config of every Triton kernel module, for ``sm_<arch>``."""
    from . import attention, softmax

    return list(attention.compile_specs(arch)) + list(softmax.compile_specs(arch))


def all_excluded(arch: int) -> list:
    """(config, reason) for every config a kernel module deliberately does not choose on ``sm_<arch>``."""
    from . import attention, softmax

    return list(attention.excluded_configs(arch)) + list(softmax.excluded_configs(arch))


def _compile_one(job):
    spec_index, arch = job
    return compile_spec(all_specs(arch)[spec_index], arch)


def compile_all(archs=(80, 90), jobs: int = 0, name_filter: str = "") -> list:
    """Compile every config for each arch, in parallel worker processes; returns CompileReports in order.

    Must run in a process where Triton's interpreter is off (TRITON_INTERPRET unset): the interpreter replaces
    the kernels by Python functions that cannot be compiled. Tests therefore call this through ``python -m``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile checks need TRITON_INTERPRET unset (the interpreter's kernels cannot be "
                           "compiled); run `python -m llmkernels.triton_kernels.compile_check` in a clean process")
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
