"""Tiny ``@triton.jit`` kernels that ``interpreter.py`` runs once to find out whether Triton's interpreter has the
bugs it knows how to fix. They exist only for that check and are imported only while interpreting.

They live in their own module because Triton's interpreter looks ``triton.language`` up in a kernel's module
globals, and ``interpreter.py`` must stay importable without Triton (``dispatch.py`` imports it), so it cannot
import Triton at the top. Each kernel exercises exactly one construct of our attention and softmax kernels:
a bf16 ``tl.dot`` (P @ V, Q @ K^T), an fp32 -> bf16 ``.to()`` (every bf16 output), and a ``range()`` whose
bounds come from a program id (the causal key loop).
"""

import triton
import triton.language as tl


@triton.jit
def bf16_dot_kernel(A, B, C, N: tl.constexpr):
    """C = A @ B with bf16 A, B (row-major N x N) and an fp32 accumulator, as the attention kernels do."""
    rows = tl.arange(0, N)[:, None]
    cols = tl.arange(0, N)[None, :]
    a = tl.load(A + rows * N + cols)
    b = tl.load(B + rows * N + cols)
    acc = tl.zeros((N, N), dtype=tl.float32)
    acc = tl.dot(a, b, acc)
    tl.store(C + rows * N + cols, acc)


@triton.jit
def to_bf16_kernel(X, Y, N: tl.constexpr):
    """Y = X.to(bfloat16) for fp32 X: the conversion every bf16 output of our kernels goes through."""
    offs = tl.arange(0, N)
    x = tl.load(X + offs)
    tl.store(Y + offs, x.to(tl.bfloat16))


@triton.jit
def program_id_range_kernel(Out, STEP: tl.constexpr):
    """Out[pid] = sum(range(pid, 2 * pid + 3, STEP)): a loop whose bounds are computed from the program id."""
    pid = tl.program_id(0)
    acc = tl.zeros((1,), dtype=tl.int32)
    for i in range(pid, 2 * pid + 3, STEP):
        acc += i
    tl.store(Out + pid + tl.arange(0, 1), acc)
