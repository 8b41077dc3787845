"""How a call is timed, how its memory is measured, and the machine's two ceilings.

GPU: ``triton.testing.do_bench`` with ``return_mode="median"``. It runs the call once, estimates its time,
warms up for ``warmup_ms``, then times ``rep_ms`` worth of calls one by one with CUDA events, and clears the L2
cache (by writing a 256 MB buffer) before every timed call. So every call starts with a cold L2, which is what
rotating inputs larger than the 50-60 MB L2 would achieve, without holding several copies of the inputs.
CPU: wall clock (``time.perf_counter``) around each call after one warm-up call, median of the repeats.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from . import metrics


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, grad_to_none: Optional[list] = None, warmup_ms: float = 25.0,
              rep_ms: float = 100.0, max_cpu_reps: int = 20) -> float:
    """Median time of one call of ``fn`` in milliseconds.

    ``grad_to_none``: tensors whose ``.grad`` is reset before each call (so backward timings do not include
    gradient accumulation)."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []
    deadline = None
    for i in range(max_cpu_reps + 1):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if i == 0:  # warm-up call: first-call costs (allocator, lazy init) are not what we measure
            deadline = time.perf_counter() + rep_ms * 1e-3
            continue
        times.append(elapsed * 1e3)
        if len(times) >= 3 and time.perf_counter() > deadline:
            break
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: str, grad_to_none: Optional[list] = None) -> Optional[int]:
    """Most memory allocated during one call beyond what was allocated before it (inputs, saved activations,
    earlier outputs); ``torch.cuda.max_memory_allocated`` based. None on CPU (no allocator statistics)."""
    if device != "cuda":
        return None
    for t in grad_to_none or ():
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_ceilings(device: str) -> dict:
    """The machine's bandwidth and matmul ceilings, measured now (fractions are quoted against these).

    GPU: a 2 GiB device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul on random data.
    CPU: smaller sizes (a 256 MiB copy, a 2048^3 fp32 matmul); these only anchor the CPU numbers."""
    if device == "cuda":
        copy_elems, mm, mm_dtype = 2**30, 8192, torch.bfloat16  # 2**30 bf16 = 2 GiB
        copy_dtype = torch.bfloat16
    else:
        copy_elems, mm, mm_dtype = 2**26, 2048, torch.float32  # 2**26 fp32 = 256 MiB
        copy_dtype = torch.float32
    src = torch.randn(copy_elems, device=device, dtype=torch.float32).to(copy_dtype)
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), device)
    nbytes = src.numel() * src.element_size()
    del src, dst
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    mm_ms = median_ms(lambda: torch.matmul(a, b), device)
    del a, b
    _sync(device)
    return {
        "copy_gbps": metrics.gbps(metrics.copy_bytes(nbytes), copy_ms),
        "copy_desc": f"device-to-device copy of {nbytes / 2**30:.2f} GiB {str(copy_dtype).replace('torch.', '')}"
                     f" (read + write counted), {copy_ms:.3f} ms",
        "matmul_tflops": metrics.tflops(metrics.matmul_flops(mm, mm, mm), mm_ms),
        "matmul_desc": f"{mm}^3 {str(mm_dtype).replace('torch.', '')} matmul on random data, {mm_ms:.3f} ms",
    }
