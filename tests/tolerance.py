"""The tolerance rule (TESTING.md, after FlashAttention's tests).

Compare our result with a float64 reference, and allow at most twice the error that PyTorch itself makes when
it computes the same function naively in the input dtype, plus a small absolute floor (so that a case where the
naive computation happens to be exact does not demand bit-exactness).
"""

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


def assert_by_rule(name: str, ours: torch.Tensor, ref64: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype,
                   factor: float = 2.0) -> None:
    """Assert ``max|ours - ref64| <= factor * max|naive - ref64| + floor(dtype)``, with a useful message."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    scale = max(1.0, ref64.abs().nan_to_num(0.0, 0.0, 0.0).max().item()) if ref64.numel() else 1.0
    err = max_err(ours, ref64)
    base = max_err(naive, ref64)
    bound = factor * base + FLOOR[dtype] * scale
    assert err <= bound, (f"{name}: max error {err:.3g} exceeds {bound:.3g} "
                          f"(= {factor} x naive-{str(dtype).replace('torch.', '')} error {base:.3g} + floor)")
