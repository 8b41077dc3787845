"""The tolerance rule (TESTING.md, after FlashAttention's tests).

Compare our result with a float64 reference, and allow at most twice the error that PyTorch itself makes when
it computes the same function naively in the input dtype, plus FlashAttention's eps of about one ulp (so that a
case where the naive computation happens to be exact does not demand more than the dtype resolves).
"""

import math

import torch

# Absolute floors, per dtype. fp32 kernels use IEEE fp32 dots, so the floor is near fp32 rounding.
FLOOR = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference; inf/NaN in matching places count as equal, elsewhere as an infinite error."""
    a, b = a.double().cpu(), b.double().cpu()
    same_special = (a == b) | (torch.isnan(a) & torch.isnan(b))
    diff = (a - b).abs().masked_fill(same_special, 0.0)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return diff.max().item() if diff.numel() else 0.0


def ulp(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype`` values at magnitude x."""
    info = torch.finfo(dtype)
    return info.eps * 2.0 ** math.floor(math.log2(max(abs(x), info.tiny)))


def assert_by_rule(name: str, ours: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype,
                   factor: float = 2.0, terms: torch.Tensor = None, term_dtype: torch.dtype = None) -> None:
    """Assert ``max|ours - ref64| <= factor * max|naive - ref64| + eps``, with a useful message.

    eps is FlashAttention's: one ulp of ``dtype`` at ``max|ref| + 0.3`` (their tests take
    ``2 * max|(x + 0.3) - 0.3 - x|``), and at least ``FLOOR[dtype] * max(1, max|ref|)``. Without the ulp term a
    tiny reduction (S = 1..3, head dim 1) where the naive low-precision result lands within a fraction of an
    ulp by luck would demand better than the dtype resolves (seen: fp16, L=1, S=3, E=1, dq = 0.40, naive error
    6.5e-5, kernel error 5.5e-4 = what every FA2 kernel's delta = rowsum(dO * O) gives with O stored in fp16).
    On realistic shapes the naive error dominates and eps is moot.

    ``terms``: for a gradient that is a sum over broadcast dims (a broadcast mask's), the summed magnitudes of
    the per-element terms (float64); such sums cancel (a mask broadcast along the softmax row has gradient
    exactly 0), so eps also covers ``2 * finfo(term_dtype).eps * terms``, the error of summing correctly
    rounded terms rather than of the tiny result.
    """
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    finite = ref64.nan_to_num(0.0, 0.0, 0.0)
    top = finite.abs().max().item() if finite.numel() else 0.0
    eps = max(FLOOR[dtype] * max(1.0, top), ulp(top + 0.3, dtype))
    if terms is not None:
        eps = max(eps, 2.0 * torch.finfo(term_dtype).eps * terms.max().item())
    err = max_err(ours, ref64)
    base = max_err(naive, ref64)
    bound = factor * base + eps
    assert err <= bound, (f"{name}: max error {err:.3g} exceeds {bound:.3g} "
                          f"(= {factor} x naive-{str(dtype).replace('torch.', '')} error {base:.3g} + eps {eps:.3g})")
