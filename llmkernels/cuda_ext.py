"""The CUDA C++ backend ("cuda"): loading the extension of ``llmkernels/csrc/`` and the backend functions of
dispatch.py.

The extension registers its ops in ``torch.ops.llmkernels_cuda`` (schemas in ``llmkernels/csrc/bindings.cpp``); they
write into outputs allocated here with ``_alloc.new_output``. The public, autograd-carrying ops stay the Python-defined
``llmkernels::*`` ops of ``ops.py``, which call these functions when the "cuda" backend is chosen.

Where the module comes from, in order:
  1. ``llmkernels._cuda``, built ahead of time by ``LLMKERNELS_BUILD_CUDA=1 pip install --no-build-isolation .``;
  2. a just-in-time build with ``torch.utils.cpp_extension.load`` + ninja on first use, cached in
     ``$LLMKERNELS_CACHE_DIR`` (default ``~/.cache/llmkernels``) under a hash of the sources, flags, torch and CUDA
     versions; the compiler output, with ptxas's register/spill report, is kept there as ``build.log``.
No GPU is needed to build or import it (only to run it).

    python -m llmkernels.cuda_ext --build            build (or find) the extension
    python -m llmkernels.cuda_ext --report [--json F] per-kernel registers, spills, shared memory, MMA use
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from . import cuda_build
from ._alloc import new_output

_module = None          # the loaded extension module
_load_error: Optional[str] = None  # why loading failed (kept: a failed build is not retried on every call)
_fakes_registered = False
# The op namespace the backend functions call. tests/cuda_emulation.py registers the same host code and kernels,
# compiled for the CPU, as "llmkernels_emu", and points this at it to run the backend without a GPU.
OPS_NAMESPACE = "llmkernels_cuda"

MAX_HEAD_DIM = 256
_MASK_DTYPES = (torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


# ----------------------------------------------------------------------------------------------------------------
# building and loading


def cache_root() -> Path:
    env = os.environ.get("LLMKERNELS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llmkernels"


def _jit_identity() -> tuple:
    """(build directory, module name) of the just-in-time build for the current sources, flags and versions."""
    home = cuda_build.find_cuda_home()
    cuda_version = cuda_build.nvcc_version(home) if home else "none"
    digest = cuda_build.build_hash(cuda_build.cuda_archs(), torch.__version__, cuda_version)
    return cache_root() / f"cuda-{digest}", f"llmkernels_cuda_{digest}"


def build_log_path() -> Path:
    return _jit_identity()[0] / "build.log"


def _jit_build(build_dir: Path, name: str) -> None:
    """Compile in a child process (its output goes to build.log), unless this exact build already exists."""
    log = build_dir / "build.log"
    built = list(build_dir.glob(f"{name}*.so"))
    if built and log.exists():
        return
    if cuda_build.find_cuda_home() is None:
        raise RuntimeError(f"no CUDA toolkit to build the llmkernels CUDA extension; {cuda_build.INSTALL_HINT}")
    for tool in ("ninja", os.environ.get("CXX", "c++")):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building the llmkernels CUDA extension needs {tool!r} on PATH; "
                               f"{cuda_build.INSTALL_HINT}")
    build_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(cuda_build.__file__).resolve()), str(build_dir), name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        (build_dir / "build-failed.log").write_text(text)
        raise RuntimeError(f"building the llmkernels CUDA extension failed (full log: {build_dir / 'build-failed.log'})"
                           f":\n{text[-4000:]}")
    log.write_text(text)


def load():
    """The extension module, built just in time if needed. Raises RuntimeError saying why it cannot be had."""
    global _module, _load_error
    if _module is not None:
        return _module
    if _load_error is not None:
        raise RuntimeError(_load_error)
    try:
        try:
            module = importlib.import_module(cuda_build.PREBUILT_MODULE)
        except ImportError:
            build_dir, name = _jit_identity()
            _jit_build(build_dir, name)
            module = cuda_build.jit_load(str(build_dir), name, verbose=False)
        for op in ("attention_forward", "attention_backward", "masked_softmax_forward", "masked_softmax_backward",
                   "dropout_keep_mask"):
            if not hasattr(torch.ops.llmkernels_cuda, op):
                raise RuntimeError(f"the extension loaded but did not register torch.ops.llmkernels_cuda.{op}")
    except Exception as exc:
        _load_error = f"{type(exc).__name__}: {exc}"
        raise RuntimeError(_load_error) from exc
    _module = module
    _register_fakes()
    return module


def module_path() -> Optional[str]:
    """The shared library of the loaded extension."""
    return getattr(load(), "__file__", None)


def unavailable_reason() -> Optional[str]:
    """None when the extension is (or can be) loaded; otherwise why not. Loading may build it (minutes)."""
    try:
        load()
    except RuntimeError as exc:
        return f"the CUDA C++ extension is unavailable: {exc}"
    return None


# ----------------------------------------------------------------------------------------------------------------
# shapes (shared by the allocation below and the fake implementations)


def attention_output_shapes(q: torch.Tensor, v: torch.Tensor) -> tuple:
    """(out, lse) shapes for q (B,Hq,L,E) and v (B,Hkv,S,Ev)."""
    B, Hq, L, _ = q.shape
    return (B, Hq, L, v.shape[-1]), (B, Hq, L)


def _expect(name: str, t: torch.Tensor, shape, dtype) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
        raise ValueError(f"llmkernels_cuda: {name} must be {dtype} of shape {tuple(shape)}, got {t.dtype} "
                         f"{tuple(t.shape)}")


def _register_fakes() -> None:
    """Fake (meta) implementations, so the llmkernels_cuda ops trace under torch.compile / FakeTensorMode: they
    write into their arguments and return nothing, so the fake only checks the outputs' shapes and dtypes."""
    global _fakes_registered
    if _fakes_registered:
        return
    lib = "llmkernels_cuda::"

    @torch.library.register_fake(lib + "attention_forward")
    def _(q, k, v, mask, dropout_p, is_causal, scale, rng_state, window_left, window_right, bottom_right, softcap,
          alibi_slopes, sinks, out, lse):
        out_shape, lse_shape = attention_output_shapes(q, v)
        _expect("out", out, out_shape, q.dtype)
        _expect("lse", lse, lse_shape, torch.float32)

    @torch.library.register_fake(lib + "attention_backward")
    def _(grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state, window_left,
          window_right, bottom_right, softcap, alibi_slopes, sinks, dq, dk, dv, dmask):
        for name, grad, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            _expect(name, grad, t.shape, t.dtype)
        if dmask is not None:
            _expect("dmask", dmask, (*q.shape[:3], k.shape[2]), torch.float32)

    @torch.library.register_fake(lib + "masked_softmax_forward")
    def _(x, mask, scale, is_causal, y):
        _expect("y", y, x.shape, x.dtype)

    @torch.library.register_fake(lib + "masked_softmax_backward")
    def _(grad_y, y, scale, dx):
        _expect("dx", dx, y.shape, y.dtype)

    @torch.library.register_fake(lib + "dropout_keep_mask")
    def _(rng_state, dropout_p, keep):
        if keep.dtype != torch.bool or keep.dim() != 4:
            raise ValueError("llmkernels_cuda: keep must be a 4-D bool tensor")

    _fakes_registered = True


# ----------------------------------------------------------------------------------------------------------------
# the backend interface (see dispatch.py and contract.py)


def attention_config(dtype: torch.dtype, E: int, Ev: int, backward: bool) -> dict:
    """Tile sizes and shared memory of the kernel instance that runs these head dims."""
    return dict(load().attention_config(_DTYPE_CODE[dtype], E, Ev, backward))


def _arch_runs_on(archs: tuple, cc: tuple) -> bool:
    """Whether a build for `archs` (SASS for each, PTX for the newest) runs on compute capability cc."""
    major, minor = cc
    if any(a // 10 == major and a % 10 <= minor for a in archs):
        return True  # SASS of the same major version and no newer minor
    return max(archs) <= major * 10 + minor  # the PTX is compiled by the driver for newer GPUs


def attention_reasons(args) -> list:
    """Why the CUDA kernels cannot run these canonical attention arguments (empty: they can)."""
    q, k, v, mask = args.q, args.k, args.v, args.mask
    reasons = []
    E, Ev = q.shape[-1], v.shape[-1]
    if E > MAX_HEAD_DIM or Ev > MAX_HEAD_DIM:
        reasons.append(f"head dims up to {MAX_HEAD_DIM}, got E={E}, Ev={Ev}")
    if mask is not None and mask.dtype not in _MASK_DTYPES:
        reasons.append(f"mask dtype {mask.dtype} is not supported (bool, float16, bfloat16, float32, float64)")
    slopes = args.rule.alibi_slopes
    if slopes is not None and slopes.dtype != torch.float32:
        reasons.append(f"alibi_slopes must be float32, got {slopes.dtype}")
    cc = torch.cuda.get_device_capability(q.device)
    if cc < (8, 0):
        reasons.append(f"needs compute capability 8.0 or newer (mma.sync), {q.device} has {cc[0]}.{cc[1]}")
    elif not _arch_runs_on(cuda_build.cuda_archs(), cc):
        reasons.append(f"the extension is built for sm_{cuda_build.cuda_archs()} (set "
                       f"{cuda_build.ARCH_ENV}), which cannot run on compute capability {cc[0]}.{cc[1]}")
    B, Hq, L, _ = q.shape
    S = k.shape[2]
    for name, value in (("B", B), ("Hq", Hq), ("L", L), ("S", S), ("B*Hq*L", B * Hq * L), ("L+S", L + S)):
        if value > 2**31 - 1:
            reasons.append(f"{name} = {value} exceeds 2^31 - 1")
    if not reasons:
        limit = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        for backward in (False, True):
            need = attention_config(q.dtype, E, Ev, backward)["smem_bytes"]
            if need > limit:
                reasons.append(f"the {'backward' if backward else 'forward'} kernel for head dims E={E}, Ev={Ev} "
                               f"needs {need} bytes of shared memory per block, the GPU allows {limit}")
    return reasons


def _ops():
    load()
    return getattr(torch.ops, OPS_NAMESPACE)


def _rule_args(rule) -> tuple:
    """The op arguments of a canonical contract.ScoreRule: window_left, window_right, bottom_right, softcap,
    alibi_slopes (B, Hq) float32, sinks (Hq,) (detached: the kernels only read it; ops.py owns its gradient)."""
    sinks = rule.sinks.detach().contiguous() if rule.sinks is not None else None
    return (int(rule.window_left), int(rule.window_right), bool(rule.bottom_right), float(rule.softcap),
            rule.alibi_slopes, sinks)


def attention_forward(q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule):
    out_shape, lse_shape = attention_output_shapes(q, v)
    out = new_output(out_shape, q.dtype, q.device)
    lse = new_output(lse_shape, torch.float32, q.device)
    _ops().attention_forward(q, k, v, mask, float(dropout_p), bool(is_causal), float(scale), rng_state,
                             *_rule_args(rule), out, lse)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                       mask_needs_grad, rule):
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dmask = None
    if mask_needs_grad:
        dmask = new_output((*q.shape[:3], k.shape[2]), torch.float32, q.device)
    _ops().attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask, float(dropout_p), bool(is_causal),
                              float(scale), rng_state, *_rule_args(rule), dq, dk, dv, dmask)
    return dq, dk, dv, dmask


def masked_softmax_forward(x, mask, scale, is_causal):
    y = new_output(x.shape, x.dtype, x.device)
    _ops().masked_softmax_forward(x, mask, float(scale), bool(is_causal), y)
    return y


def masked_softmax_backward(grad_y, y, scale):
    dx = new_output(y.shape, y.dtype, y.device)
    _ops().masked_softmax_backward(grad_y, y, float(scale), dx)
    return dx


def dropout_keep_mask(rng_state: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep pattern (True = keep) that the CUDA attention kernels draw for rng_state = [seed, offset] on a
    (B, H, L, S) score tensor."""
    keep = torch.empty(tuple(shape), dtype=torch.bool, device=device)
    _ops().dropout_keep_mask(rng_state, float(dropout_p), keep)
    return keep


# ----------------------------------------------------------------------------------------------------------------
# the static report: registers, spills, shared memory and matrix instructions of every kernel, per architecture


def _demangle(names: list) -> dict:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas_log(text: str) -> list:
    """Entries of ``nvcc -Xptxas -v`` output: one dict per (mangled kernel, arch) with registers, stack, spill
    bytes and static shared memory."""
    entries, current = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": int(m.group(2)), "registers": None, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0, "static_smem": 0}
            entries.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = (int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["static_smem"] = int(s.group(1)) if s else 0
    return entries


def _cuobjdump() -> Optional[str]:
    home = cuda_build.find_cuda_home()
    candidates = [str(Path(home) / "bin" / "cuobjdump")] if home else []
    try:
        import triton  # noqa: PLC0415  (its wheel carries cuobjdump)
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    candidates.append(shutil.which("cuobjdump") or "")
    return next((c for c in candidates if c and Path(c).exists()), None)


def _sass_facts(so_path: str) -> dict:
    """{(mangled kernel, arch): {"mma": n, "local_ops": n, "async_copies": n}} from the SASS in the library: HMMA
    (Ampere-style tensor-core MMA, also what mma.sync becomes on Hopper) / HGMMA counts, LDL/STL (local memory)
    counts, and LDGSTS counts (cp.async: global -> shared copies that do not pass through registers)."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    text = subprocess.run([tool, "-sass", so_path], capture_output=True, text=True).stdout
    facts, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = (m.group(1), arch)
            facts[fn] = {"mma": 0, "local_ops": 0, "async_copies": 0}
            continue
        if fn is not None:
            if re.search(r"\b(HMMA|HGMMA)\b", line):
                facts[fn]["mma"] += 1
            if re.search(r"\b(LDL|STL)\b", line):
                facts[fn]["local_ops"] += 1
            if re.search(r"\bLDGSTS\b", line):
                facts[fn]["async_copies"] += 1
    return facts


def _res_usage(so_path: str) -> dict:
    """{(mangled kernel, arch): {"registers", "stack", "local", "shared"}} from ``cuobjdump -res-usage``."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    text = subprocess.run([tool, "-res-usage", so_path], capture_output=True, text=True).stdout
    usage, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = sm_(\d+)", line)
        if m:
            arch = int(m.group(1))
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and fn is not None:
            reg, stack, shared, local = (int(x) for x in m.groups())
            usage[(fn, arch)] = {"registers": reg, "stack": stack, "shared": shared, "local": local}
    return usage


# Shared memory a block may opt into, per arch the report covers (A100, H100/H200): the attention kernels take two
# buffers of their streamed tiles where these fit (llmk::attn_stages), which the report's smem column follows.
SMEM_OPTIN = {80: 163 * 1024, 90: 227 * 1024}


def _dynamic_smem(kernel: str, arch: int) -> Optional[int]:
    """Dynamic shared memory of an attention kernel instance on `arch`, from its template arguments."""
    m = re.search(r"attn_(fwd|bwd)_kernel<(__half|__nv_bfloat16|float), (\d+)>", kernel)
    if not m:
        return None
    dtype = {"__half": torch.float16, "__nv_bfloat16": torch.bfloat16, "float": torch.float32}[m.group(2)]
    D = int(m.group(3))
    cfg = attention_config(dtype, D, D, m.group(1) == "bwd")
    pipelined = cfg["smem_bytes_pipelined"] <= SMEM_OPTIN.get(arch, 0)
    return cfg["smem_bytes_pipelined"] if pipelined else cfg["smem_bytes"]


def kernel_report(archs=(80, 90)) -> list:
    """One dict per (kernel, arch) of the built extension: kernel (demangled), arch, registers, spill_stores and
    spill_loads (bytes, from ptxas; None when no build log exists, e.g. a setup.py build), local_bytes (local
    memory per thread, where spills live), smem (static + dynamic shared memory per block, with the tile buffers the
    arch gets), uses_mma (tensor-core instructions in the SASS), async_copies (cp.async instructions, LDGSTS, in the
    SASS). Builds the extension if needed; needs no GPU."""
    so = module_path()
    log = build_log_path()
    ptxas = parse_ptxas_log(log.read_text()) if log.exists() and so and str(log.parent) in so else []
    usage = _res_usage(so) if so else {}
    sass = _sass_facts(so) if so else {}
    keys = sorted(set(usage) | {(e["mangled"], e["arch"]) for e in ptxas} | set(sass), key=lambda k: (k[1], k[0]))
    names = _demangle(sorted({k[0] for k in keys}))
    by_key = {(e["mangled"], e["arch"]): e for e in ptxas}
    rows = []
    for mangled, arch in keys:
        if archs and arch not in archs:
            continue
        e, u, s = by_key.get((mangled, arch)), usage.get((mangled, arch), {}), sass.get((mangled, arch), {})
        kernel = names.get(mangled, mangled)
        kernel = re.sub(r"\(llmk::\w+\)$", "", kernel.replace("llmk::", ""))
        static = e["static_smem"] if e else u.get("shared", 0)
        rows.append({
            "kernel": kernel,
            "arch": arch,
            "registers": e["registers"] if e else u.get("registers"),
            "spill_stores": e["spill_stores"] if e else None,
            "spill_loads": e["spill_loads"] if e else None,
            "stack": e["stack"] if e else u.get("stack"),
            "local_bytes": u.get("local"),
            "local_ops": s.get("local_ops"),
            "smem": static + (_dynamic_smem(kernel, arch) or 0),
            "uses_mma": bool(s.get("mma")) if s else None,
            "async_copies": s.get("async_copies"),
        })
    return rows


def format_report(rows: list) -> str:
    lines = [f"{'arch':<6} {'regs':>4} {'spill st/ld':>11} {'local':>5} {'smem':>7} {'mma':>3} {'ldgsts':>6}  kernel"]
    for r in rows:
        spill = f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_stores"] is not None else "?"
        mma = {True: "yes", False: "no", None: "?"}[r["uses_mma"]]
        lines.append(f"sm_{r['arch']:<3} {r['registers']!s:>4} {spill:>11} {r['local_bytes']!s:>5} "
                     f"{r['smem']:>7} {mma:>3} {r.get('async_copies')!s:>6}  {r['kernel']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Build the llmkernels CUDA extension and report on its kernels.")
    parser.add_argument("--build", action="store_true", help="build (or find) the extension")
    parser.add_argument("--report", action="store_true", help="print registers/spills/smem/MMA per kernel")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    if not (args.build or args.report):
        args.report = True
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    print(f"extension: {module_path()}")
    if args.report:
        rows = kernel_report(tuple(args.arch))
        print(format_report(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
