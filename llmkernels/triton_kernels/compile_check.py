"""Compile Triton kernel configs for real GPUs without a GPU, and read what the compiler made of them.

Each kernel module lists the launch configs its GPU path can choose as ``CompileSpec``s (``compile_specs(arch)``,
beside its config tables). This module compiles the spec it is given for an NVIDIA architecture with
``triton.compile`` and a ``GPUTarget``, and inspects the cubin with the ``cuobjdump`` and ``nvdisasm`` that ship
in Triton's wheel: registers, local memory (spills), shared memory, and whether the matrix instructions are used
(``HGMMA``, Hopper's wgmma, or ``HMMA``, the mma.sync path). It imports no kernel module (the kernel modules
import ``CompileSpec`` from here); ``compile_report.py`` collects every module's specs, compiles them all and
prints the report that the static tests assert on.
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

# SASS instructions the report counts beside the matrix ones, by column name (a regular expression over the
# nvdisasm text each). Data-driven: a kernel concern with its own instructions (the backward's atomic reductions,
# say) is one more row here, and a spec names the columns that must be non-zero in ``expect_sass``.
SASS_COLUMNS = {
    "UTMALDG": r"\bUTMALDG\b",  # TMA tile loads (tensor descriptors)
    "UTMASTG": r"\bUTMASTG\b",  # TMA tile stores
    "LDG.128": r"\bLDG\.E(?:\.[A-Z0-9_]+)*\.128\b",  # 16-byte vector global loads
    "STG.128": r"\bSTG\.E(?:\.[A-Z0-9_]+)*\.128\b",  # 16-byte vector global stores
    "SETMAXREG": r"\bUSETMAXREG\b",  # register reallocation between warp-specialized partitions
    "atomics": r"\b(?:RED|REDG|ATOM|ATOMG)\.",  # global atomic reductions: the fused backward's dQ adds
}


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
    # SASS_COLUMNS that must be non-zero (e.g. ("UTMALDG", "UTMASTG") for a descriptor kernel), and whether the
    # kernel must come out warp-specialized (partitions in its TTGIR).
    expect_sass: tuple = ()
    expect_warp_specialized: bool = False
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
    sass_counts: dict = field(default_factory=dict)  # SASS_COLUMNS name -> count
    ws_partitions: int = 0  # warp-specialized partitions beside the default one (0: not specialized)
    expect_sass: tuple = ()
    expect_warp_specialized: bool = False

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

    @property
    def missing(self) -> list:
        """The expected instructions (``expect_sass``) and warp specialization the SASS/TTGIR lack."""
        gone = [name for name in self.expect_sass if not self.sass_counts.get(name)]
        if self.expect_warp_specialized and not self.ws_partitions:
            gone.append("warp-specialized partitions")
        return gone

    @property
    def problem(self) -> bool:
        return not (self.ok and not self.spills and self.shared_fits and self.mma_ok and not self.missing)

    def row(self) -> str:
        if not self.ok:
            return f"sm_{self.arch}  {self.name}: COMPILE ERROR {self.error}"
        mma = f"HGMMA {self.hgmma}" if self.hgmma else (f"HMMA {self.hmma}" if self.hmma else "no MMA")
        extra = "".join(f", {name} {n}" for name, n in self.sass_counts.items() if n)
        if self.ws_partitions:
            extra += f", warp-specialized ({self.ws_partitions} partitions + default)"
        if self.missing:
            extra += f", MISSING {' / '.join(self.missing)}"
        return (f"sm_{self.arch}  {self.name}: {self.registers} regs, {self.shared_bytes / 1024:.1f} KiB smem, "
                f"spills {'YES (' + str(self.local_bytes) + ' B local)' if self.spills else 'none'}, {mma}{extra}")


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

    report = CompileReport(spec.name, arch, ok=False, expect_mma=spec.expect_mma, expect_sass=tuple(spec.expect_sass),
                           expect_warp_specialized=spec.expect_warp_specialized)
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
    report.sass_counts = {name: len(re.findall(pattern, sass)) for name, pattern in SASS_COLUMNS.items()}
    # Triton's warp specialization shows in the TTGIR as one ttg.warp_specialize op whose extra partitions are
    # regions named partition0, partition1, ...
    report.ws_partitions = len(set(re.findall(r"\bpartition(\d+)\s*\(", kernel.asm.get("ttgir", ""))))
    report.ok = True
    return report
