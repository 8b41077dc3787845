"""Work and traffic counts for the reports: FLOPs of attention, bytes of masked softmax, and the rates.

Everything the tables and plots divide by lives here, so the conventions can be read (and tested, see
``tests/test_bench_metrics.py``) in one place.

Attention FLOPs follow FlashAttention's benchmark convention: the two matrix products QK^T (L x S x E
multiply-adds) and PV (L x S x Ev multiply-adds), 2 FLOPs per multiply-add, per batch and query head, i.e.
``4 * B * H * L * S * E`` when ``Ev == E``. Causal attention counts half of that when ``L == S`` (the convention;
the exact share would be (L + 1) / 2L); when ``L != S`` it counts the visible (query, key) pairs exactly under
top-left alignment. With a sliding window (``window_size=(left, right)``, inclusive, -1 unbounded) the forward counts
exactly the visible (query, key) pairs (``visible_pairs``), the work a kernel that skips hidden blocks must do
at least. The backward counts 2.5 times the forward (five matrix products instead of two), forward +
backward 3.5 times. The softmax, masking and scaling are not counted: they are not matrix work.

Masked softmax bytes are the least any implementation must move (KERNELS.md): forward reads the input once,
writes the output once and reads the mask once at its own (broadcast) size; backward reads y and dy and writes
dx. GB/s are decimal (1e9 bytes per second), TFLOP/s are 1e12 FLOPs per second.
"""

from __future__ import annotations

MODES = ("fwd", "bwd", "fwd+bwd")

# Multiples of the forward FLOPs, FlashAttention's convention.
ATTENTION_MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def causal_visible_pairs(L: int, S: int) -> int:
    """Number of (query i, key j) pairs with j <= i, for i < L and j < S (top-left causal alignment)."""
    if L <= S:
        return L * (L + 1) // 2
    # rows 0..S-1 see i + 1 keys; the remaining L - S rows see all S keys
    return S * (S + 1) // 2 + (L - S) * S


def visible_pairs(L: int, S: int, causal: bool = False, window_left: int = -1, window_right: int = -1,
                  bottom_right: bool = False) -> int:
    """Exact number of (query i, key j) pairs, i < L and j < S, that the score rule leaves visible: with the
    diagonal offset d (``S - L`` bottom-right, else 0), causal keeps ``j <= i + d`` and the window keeps
    ``i + d - left <= j <= i + d + right`` (-1: that side unbounded). One term per query row."""
    d = S - L if bottom_right else 0
    total = 0
    for i in range(L):
        lo, hi = 0, S - 1
        if window_left >= 0:
            lo = max(lo, i + d - window_left)
        if causal:
            hi = min(hi, i + d)
        if window_right >= 0:
            hi = min(hi, i + d + window_right)
        total += max(0, hi - lo + 1)
    return total


def causal_fraction(L: int, S: int) -> float:
    """Share of the L x S score matrix a causal attention computes: 1/2 when L == S (FlashAttention's
    convention), the exact visible share otherwise."""
    if L == S:
        return 0.5
    return causal_visible_pairs(L, S) / (L * S)


def attention_flops(B: int, H: int, L: int, S: int, E: int, Ev: int | None = None, causal: bool = False,
                    mode: str = "fwd", window: tuple = (-1, -1), bottom_right: bool = False) -> float:
    """FLOPs of one attention call: B batches, H query heads, L queries, S keys, head dims E (QK) and Ev (V);
    ``window``: ``(left, right)`` as ``window_size``, counted over the visible pairs."""
    _check_mode(mode)
    Ev = E if Ev is None else Ev
    fwd = 2.0 * B * H * L * S * (E + Ev)  # QK^T and PV, 2 FLOPs per multiply-add
    if tuple(window) != (-1, -1):
        fwd *= visible_pairs(L, S, causal, window[0], window[1], bottom_right) / (L * S)
    elif causal:
        fwd *= causal_fraction(L, S)
    return fwd * ATTENTION_MODE_FACTOR[mode]


def attention_forward_bytes(B: int, Hq: int, Hkv: int, L: int, S: int, E: int, Ev: int, elem_bytes: int,
                            mask_bytes: int = 0) -> int:
    """Least bytes an attention forward moves: q, k, v (and the mask at its own size) read, out written.

    It matters for decode (L = 1), which is bound by reading K and V, not by FLOPs."""
    q = B * Hq * L * E
    kv = B * Hkv * S * (E + Ev)
    out = B * Hq * L * Ev
    return (q + kv + out) * elem_bytes + mask_bytes


def softmax_bytes(numel: int, elem_bytes: int, mask_bytes: int = 0, mode: str = "fwd") -> int:
    """Least bytes a masked softmax moves over ``numel`` elements of ``elem_bytes`` each.

    ``mask_bytes``: the mask's size as stored (its broadcast shape, not the expanded one); 0 without a mask
    (a causal mask is computed, not read)."""
    _check_mode(mode)
    fwd = 2 * numel * elem_bytes + mask_bytes  # x read, y written, mask read
    bwd = 3 * numel * elem_bytes  # y and dy read, dx written
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def tensor_bytes(t) -> int:
    """Bytes a tensor occupies as stored (a broadcast view counts once: pass the unexpanded tensor)."""
    return t.numel() * t.element_size()


def copy_bytes(nbytes: int) -> int:
    """Traffic of a device-to-device copy of ``nbytes``: read once and written once."""
    return 2 * nbytes


def matmul_flops(M: int, N: int, K: int) -> float:
    return 2.0 * M * N * K


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9
