"""The static kernel report: what the compilers made of every kernel, for sm_90 and sm_80, without a GPU.

Triton: each config of ``compile_specs(arch)`` of the kernel modules that
``llmkernels.triton_kernels.compile_report.KERNEL_MODULES`` lists (the ``attention`` package's ``specs.py``,
``softmax.py``) is compiled with ``llmkernels.triton_kernels.compile_check`` (``triton.compile`` for a
``GPUTarget``), which reads registers, shared memory, spills (local memory, LDL/STL) and the matrix instructions
(HGMMA on sm_90, HMMA on sm_80) from the cubin. By default one representative config per kernel function is
compiled (the first bf16 one), which keeps a default CPU run to a minute or so; ``--full`` compiles every config.
CUDA C++: the per-kernel report of the CUDA backend (``llmkernels/cuda_ext.py``).

Run it in a process where Triton's interpreter is off:  python -m benchmarks.static_report [--full] [--json F]
(``python -m benchmarks.run`` starts it that way.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from llmkernels.triton_kernels.compile_report import KERNEL_MODULES as TRITON_MODULES

REPORT_FIELDS = ("name", "arch", "ok", "error", "registers", "local_bytes", "spill_instructions", "shared_bytes",
                 "hgmma", "hmma", "expect_mma", "sass_counts", "ws_partitions")


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _module(name: str):
    return importlib.import_module(f"llmkernels.triton_kernels.{name}")


def _representative(specs: list) -> list:
    """Indices of one config per kernel function: its first bf16 config (the dtype the sweep measures), or its
    first config when it has no bf16 one."""
    chosen = {}
    for i, spec in enumerate(specs):
        key = getattr(spec.fn, "__name__", repr(spec.fn))
        is_bf16 = any(str(t) == "*bf16" for t in spec.signature.values())
        if key not in chosen or (is_bf16 and not chosen[key][1]):
            chosen[key] = (i, is_bf16)
    return sorted(i for i, _ in chosen.values())


def _compile_job(job):
    module_name, index, arch = job
    from llmkernels.triton_kernels import compile_check

    report = compile_check.compile_spec(_module(module_name).compile_specs(arch)[index], arch)
    row = {f: getattr(report, f) for f in REPORT_FIELDS}
    row.update(module=module_name, spills=report.spills, shared_fits=report.shared_fits, mma_ok=report.mma_ok,
               missing=report.missing,
               text=report.row())
    return row


def triton_report(archs, full: bool, jobs: int, name_filter: str = "") -> dict:
    work, unavailable, excluded, counts = [], [], [], {}
    for name in TRITON_MODULES:
        for arch in archs:
            try:
                specs = _module(name).compile_specs(arch)
            except Exception as exc:  # kernel module not written yet, or broken
                unavailable.append({"module": name, "arch": arch,
                                    "reason": f"llmkernels.triton_kernels.{name}: {_short(exc)}"})
                continue
            if name_filter:  # every config whose name contains the filter
                picked = [i for i, spec in enumerate(specs) if name_filter in spec.name]
            else:
                picked = range(len(specs)) if full else _representative(specs)
            counts[(name, arch)] = (len(picked), len(specs))
            work += [(name, i, arch) for i in picked]
            try:
                excluded += [{"module": name, "arch": arch, "config": d, "reason": r}
                             for d, r in _module(name).excluded_configs(arch)]
            except Exception as exc:
                unavailable.append({"module": name, "arch": arch, "reason": f"excluded_configs: {_short(exc)}"})
    rows = []
    if work:
        jobs = jobs or min(len(work), os.cpu_count() or 1)
        if jobs <= 1:
            results = map(_compile_job, work)
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(jobs)
            results = pool.imap(_compile_job, work)  # in order, each printed as it completes
        for row in results:
            print("  " + row["text"], flush=True)
            rows.append(row)
        if jobs > 1:
            pool.close()
            pool.join()
    counts_text = {f"{n} sm_{a}": f"{k} of {m} configs" for (n, a), (k, m) in counts.items()}
    return {"configs": rows, "excluded": excluded, "unavailable": unavailable, "counts": counts_text,
            "selection": (f"configs named *{name_filter}*" if name_filter else "all configs" if full
                          else "one representative config per kernel function (--full: all)")}


# The CUDA backend's report function: list of dicts, one per (kernel, arch), with registers and spills
# (llmkernels/cuda_ext.py: kernel, arch, registers, spill_stores, spill_loads, local_bytes, smem, uses_mma).
CUDA_REPORT_FUNCTION = "kernel_report"


def cuda_report(archs) -> dict:
    """The CUDA backend's per-kernel register/spill report, or why there is none."""
    try:
        from llmkernels import cuda_ext
    except Exception as exc:
        return {"kernels": [], "unavailable": f"llmkernels/cuda_ext.py: {_short(exc)}"}
    fn = getattr(cuda_ext, CUDA_REPORT_FUNCTION, None)
    if fn is None:
        return {"kernels": [], "unavailable": f"llmkernels.cuda_ext has no {CUDA_REPORT_FUNCTION}() yet"}
    try:
        kernels = [dict(k) for k in fn(archs=tuple(archs))]
    except Exception as exc:  # e.g. no nvcc on this machine
        return {"kernels": [], "unavailable": f"cuda_ext.{CUDA_REPORT_FUNCTION}: {_short(exc)}"}
    return {"kernels": kernels, "unavailable": None}


def _cuda_spills(k: dict):
    """Spill bytes of a CUDA kernel: ptxas's spill stores + loads, else the local memory per thread; None when
    neither is known (e.g. an ahead-of-time build kept no ptxas log and cuobjdump is missing)."""
    stores, loads = k.get("spill_stores"), k.get("spill_loads")
    if stores is not None or loads is not None:
        return (stores or 0) + (loads or 0)
    return k.get("local_bytes")


def _cuda_row(k: dict) -> str:
    spills = _cuda_spills(k)
    spill_text = "unknown" if spills is None else ("none" if spills == 0 else f"YES ({spills} B)")
    smem = k.get("smem")
    mma = {True: "MMA yes", False: "no MMA", None: "MMA ?"}[k.get("uses_mma")]
    return (f"sm_{k.get('arch', '?')}  {k.get('kernel', '?')}: {k.get('registers', '?')} regs, "
            f"{'?' if smem is None else f'{smem / 1024:.1f}'} KiB smem, spills {spill_text}, {mma}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="compile every Triton config (default: one per kernel)")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--filter", default="", help="compile every config whose name contains this (e.g. d128)")
    parser.add_argument("--jobs", type=int, default=0, help="parallel compiles (default: one per CPU core)")
    parser.add_argument("--json", help="write the report to this file")
    parser.add_argument("--no-cuda", action="store_true", help="leave out the CUDA C++ kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("static_report: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)",
              file=sys.stderr)
        return 2
    start = time.time()
    print(f"STATIC KERNEL REPORT (sm_{', sm_'.join(map(str, args.arch))}; no GPU needed)", flush=True)
    print("Triton kernels, compiled with triton.compile for each GPU target:", flush=True)
    triton = triton_report(args.arch, args.full, args.jobs, args.filter)
    for u in triton["unavailable"]:
        print(f"  sm_{u['arch']}  {u['module']}: unavailable: {u['reason']}")
    for what, count in triton["counts"].items():
        print(f"  {what}: {count} compiled ({triton['selection']})")
    for e in triton["excluded"]:
        print(f"  sm_{e['arch']}  excluded on purpose: {e['config']}: {e['reason']}")
    bad = [r for r in triton["configs"]
           if not (r["ok"] and not r["spills"] and r["shared_fits"] and r["mma_ok"] and not r.get("missing"))]
    for r in bad:
        print(f"  PROBLEM: {r['text']}" + ("" if r["mma_ok"] else " (expected tensor-core instructions)")
              + ("" if r["shared_fits"] else " (shared memory over the limit)"))
    if args.no_cuda:
        cuda = {"kernels": [], "unavailable": "left out (--no-cuda)"}
    else:
        print("CUDA C++ kernels (llmkernels/cuda_ext.py; builds the extension on first use, minutes, then cached; "
              "--no-cuda leaves them out):", flush=True)
        cuda = cuda_report(args.arch)
        for k in cuda["kernels"]:
            print("  " + _cuda_row(k))
        if cuda["unavailable"]:
            print(f"  unavailable: {cuda['unavailable']}")
    cuda_bad = [k for k in cuda["kernels"] if _cuda_spills(k)]
    for k in cuda_bad:
        print(f"  PROBLEM: {_cuda_row(k)}")
    print(f"{len(triton['configs'])} Triton configs compiled, {len(bad)} with problems; "
          f"{len(cuda['kernels'])} CUDA kernel entries, {len(cuda_bad)} spilling; {time.time() - start:.0f} s",
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"archs": args.arch, "triton": triton, "cuda": cuda}, f, indent=1)
    return 1 if bad or cuda_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
