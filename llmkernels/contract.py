"""The op contracts: argument validation and the normalised form every backend receives.

Validation lives here, once, and runs before any backend is chosen or any kernel launched. Every error names
the argument and says what was wrong. After validation the public arguments are brought into one canonical
form so that each backend implements a single, small interface:

attention  q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask None or (B, Hq, L, S)
softmax    x (A, B, M, N) with the softmax over N, mask None or (A, B, M, N)

Tensors in canonical form are views of the user's tensors whenever that is possible: any strides, and every
broadcast dimension (a missing leading dim, a size-1 head dim against the other inputs' heads, a mask's
broadcast dims) has stride 0, since the kernels read everything through its strides. A copy happens only where
no such view exists: several leading batch dims that do not merge into one (not contiguous, or broadcast in
some of them only), and grouped-query attention whose key and value head counts differ and are both above 1
(both are repeated to a common count, as PyTorch does).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = SUPPORTED_DTYPES + (torch.float64,)
BACKEND_NAMES = ("auto", "triton", "cuda", "reference")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # The kernels read data through sizes and strides; nested (ragged) and sparse tensors have neither in that
    # sense, and would otherwise fail deep inside a backend.
    if t.is_nested:
        raise TypeError(f"{name} is a nested tensor; llmkernels takes dense tensors (pad the sequences and pass "
                        f"a mask)")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; llmkernels takes dense (torch.strided) tensors")


def _check_float_dtype(name: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are {names}")


def check_backend_name(backend) -> str:
    if backend is None:
        return "auto"
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {backend!r}")
    return backend


def _real_scalar(name: str, value) -> float:
    """A Python real number or a 0-d real tensor (as PyTorch's SDPA takes for ``scale``) as a float.

    bool is refused: ``scale=True`` is a slip, not a scale. A tensor that requires grad is refused: the value is
    taken as a constant, so its gradient would silently be missing (PyTorch refuses such a tensor too)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a real number or a 0-d tensor, got a tensor of shape "
                            f"{tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number or a 0-d real tensor, got a tensor of dtype {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"{name} is a tensor that requires grad; llmkernels takes {name} as a constant and "
                             f"computes no gradient for it (pass {name}.detach() or a float)")
        if value.device.type == "meta":
            raise ValueError(f"{name} is a meta tensor, which has no value")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a 0-d tensor, got {type(value).__name__}")
    return float(value)


def _check_scale(scale, default: float) -> float:
    if scale is None:
        return default
    scale = _real_scalar("scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def _check_mask(name: str, mask, ref: torch.Tensor, target_shape: tuple, target_desc: str) -> None:
    _check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{name} must be a bool tensor (True = keep) or a floating-point tensor (added), "
                        f"got dtype {mask.dtype}")
    if mask.device != ref.device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {ref.device}")
    try:
        shape = torch.broadcast_shapes(mask.shape, target_shape)
    except RuntimeError:
        shape = None
    if shape != tuple(target_shape):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {target_desc} "
                         f"{tuple(target_shape)}")


def _broadcast_or_raise(what: str, *shapes) -> tuple:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        q, k, v = (tuple(t) for t in shapes)
        raise ValueError(f"{what} of query {q}, key {k} and value {v} do not broadcast") from None


def _check_heads_broadcast(Hq: int, Hk: int, Hv: int) -> None:
    """Without grouped-query attention, head counts broadcast: each is the common count or 1."""
    if Hk != Hv and 1 not in (Hk, Hv):
        raise ValueError(f"key has {Hk} heads and value {Hv}; they must be equal or one of them 1 (broadcast)")
    Hkv = Hv if Hk == 1 else Hk
    if Hq != Hkv and 1 not in (Hq, Hkv):
        if Hkv != 0 and Hq % Hkv == 0:
            raise ValueError(f"query has {Hq} heads but key/value have {Hkv}; pass enable_gqa=True for grouped-query "
                             f"attention (query heads a multiple of key/value heads)")
        raise ValueError(f"query has {Hq} heads but key/value have {Hkv}; head counts must be equal or 1 "
                         f"(broadcast), or with enable_gqa=True the query heads a multiple of the key/value heads")


def _merge_leading(t: torch.Tensor, lead_shape: tuple, keep: int) -> torch.Tensor:
    """Broadcast t's leading dims to lead_shape and merge them into one: a view when possible."""
    t = t.expand(*lead_shape, *t.shape[-keep:])
    if len(lead_shape) == 1:
        return t
    if len(lead_shape) == 0:
        return t.unsqueeze(0)
    return t.reshape(math.prod(lead_shape), *t.shape[-keep:])


@dataclass
class AttentionArgs:
    """Canonical attention arguments (see the module docstring)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]
    dropout_p: float
    is_causal: bool
    scale: float
    out_shape: tuple  # the user's output shape (..., Hq, L, Ev)

    @property
    def shape_desc(self) -> str:
        B, Hq, L, E = self.q.shape
        return f"B={B} Hq={Hq} Hkv={self.k.shape[1]} L={L} S={self.k.shape[2]} E={E} Ev={self.v.shape[3]}"


def check_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, dtypes=SUPPORTED_DTYPES) -> AttentionArgs:
    """Validate scaled_dot_product_attention's arguments and bring them into canonical form.

    ``dtypes``: the accepted input dtypes (the reference also takes float64)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
        _check_float_dtype(name, t, dtypes)
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims (..., seq, head_dim), got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    E, Ek = query.shape[-1], key.shape[-1]
    if E != Ek:
        raise ValueError(f"query and key must have the same head dim, got query {E} and key {Ek}")
    if E == 0:
        raise ValueError("query and key have head dim 0; the head dim must be at least 1")
    S, Sv = key.shape[-2], value.shape[-2]
    if S != Sv:
        raise ValueError(f"key and value must have the same sequence length, got key {S} and value {Sv}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not (0.0 <= dropout_p <= 1.0):
        raise ValueError(f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    scale = _check_scale(scale, 1.0 / math.sqrt(E))

    # Heads: the dim -3 when present (a 2-D input has a single implicit head).
    Hq, Hk, Hv = (t.shape[-3] if t.dim() >= 3 else 1 for t in (query, key, value))
    if enable_gqa and not Hq == Hk == Hv:
        # PyTorch's rule: key and value heads each divide the query heads; K and V are repeated to Hq heads
        # along dim -3, and the dims before it broadcast.
        for name, h in (("key", Hk), ("value", Hv)):
            if h == 0 or Hq % h != 0:
                raise ValueError(f"with enable_gqa=True the query heads ({Hq}) must be a multiple of the {name} "
                                 f"heads ({h})")
        lead = _broadcast_or_raise("the batch dims", query.shape[:-3], key.shape[:-3], value.shape[:-3])
        H = Hq
        batch = (*lead, H)
        if Hk == Hv:
            Hkv = Hk  # grouped-query attention proper: the kernels map query head h to K/V head h // (Hq // Hkv)
        elif 1 in (Hk, Hv):
            Hkv = Hk * Hv  # the single head is broadcast (stride 0) to the other's count; the grouping does the rest
        else:
            # Two different head counts, neither 1: no view of one tensor has the other's head count, so both are
            # repeated (a copy, as PyTorch's own repeat_interleave) to the least common multiple.
            Hkv = math.lcm(Hk, Hv)
            key = key.repeat_interleave(Hkv // Hk, dim=-3)
            value = value.repeat_interleave(Hkv // Hv, dim=-3)
    else:
        # As PyTorch's matmuls: every dim before (seq, head_dim), heads included, broadcasts.
        _check_heads_broadcast(Hq, Hk, Hv)
        _broadcast_or_raise("the batch dims", query.shape[:-3], key.shape[:-3], value.shape[:-3])
        batch = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
        lead, H = (batch[:-1], batch[-1]) if len(batch) else ((), 1)
        # A single K/V head stays single: the kernels' grouping serves every query head from it.
        Hkv = 1 if Hk == Hv == 1 else H
    lead = tuple(lead)
    L, Ev = query.shape[-2], value.shape[-1]
    out_shape = (*batch, L, Ev)

    def canon(t: torch.Tensor, heads: int) -> torch.Tensor:
        # expand() adds the missing leading dims and gives every broadcast dim stride 0: a view, never a copy.
        return _merge_leading(t.expand(*lead, heads, *t.shape[-2:]), lead, 3)

    q, k, v = canon(query, H), canon(key, Hkv), canon(value, Hkv)

    mask = None
    if attn_mask is not None:
        # The mask broadcasts to the attention weights of the broadcast batch (stride 0 where it is broadcast).
        _check_mask("attn_mask", attn_mask, query, (*batch, L, S), "(..., Hq, L, S) =")
        mask = _merge_leading(attn_mask.expand(*lead, H, L, S), lead, 3)
    return AttentionArgs(q, k, v, mask, float(dropout_p), is_causal, scale, out_shape)


@dataclass
class SoftmaxArgs:
    """Canonical masked-softmax arguments (see the module docstring)."""

    x: torch.Tensor
    mask: Optional[torch.Tensor]
    scale: float
    is_causal: bool
    dim: int  # the user's dim, normalised to be negative
    moved: bool  # the softmax dim was moved last (a transposed view; the kernels take any strides)
    work_shape: tuple  # shape of the input with the softmax dim moved last, before merging into 4 dims


def check_masked_softmax(input, mask=None, scale=1.0, is_causal=False, dim=-1,
                         dtypes=SUPPORTED_DTYPES) -> SoftmaxArgs:
    """Validate masked_softmax's arguments and bring them into canonical form (``dtypes`` as above)."""
    _check_tensor("input", input)
    _check_float_dtype("input", input, dtypes)
    if input.dim() < 1:
        raise ValueError("input must have at least 1 dim")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -input.dim() <= dim < input.dim():
        raise ValueError(f"dim {dim} is out of range for input with {input.dim()} dims")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if is_causal and input.dim() < 2:
        raise ValueError("is_causal=True needs input with at least 2 dims (..., Sq, Sk)")
    scale = _check_scale(scale, 1.0)
    if mask is not None:
        _check_mask("mask", mask, input, tuple(input.shape), "input's shape")
    dim = dim - input.dim() if dim >= 0 else dim

    # Causal masking is defined on the user's last two dims, so expand the causal pattern into the mask
    # before moving the softmax dim: only when dim is not last (rare; costs one bool L x S tensor).
    x, m, causal = input, mask, is_causal
    moved = dim != -1
    if moved:
        if causal:
            Sq, Sk = input.shape[-2], input.shape[-1]
            tri = torch.ones(Sq, Sk, dtype=torch.bool, device=input.device).tril()
            if m is None:
                m = tri
            elif m.dtype == torch.bool:
                m = m & tri
            else:
                m = m.masked_fill(~tri, float("-inf"))
            causal = False
        x = x.movedim(dim, -1)
        if m is not None:
            m = m.expand(input.shape).movedim(dim, -1)
    lead = tuple(x.shape[:-2]) if x.dim() >= 2 else ()
    if x.dim() == 1:
        x = x.unsqueeze(0)
        m = m.expand(input.shape).unsqueeze(0) if m is not None else None
    work_shape = tuple(x.shape)
    m = m.expand(work_shape) if m is not None else None
    # to (A, B, M, N)
    if len(lead) == 0:
        x4 = x.unsqueeze(0).unsqueeze(0)
        m4 = m.unsqueeze(0).unsqueeze(0) if m is not None else None
    elif len(lead) == 1:
        x4 = x.unsqueeze(0)
        m4 = m.unsqueeze(0) if m is not None else None
    else:
        x4 = x.reshape(-1, *x.shape[-3:])
        m4 = m.reshape(-1, *m.shape[-3:]) if m is not None else None
    return SoftmaxArgs(x4, m4, scale, causal, dim, moved, work_shape)
