"""The op contracts: argument validation and the normalised form every backend receives.

Validation lives here, once, and runs before any backend is chosen or any kernel launched. Every error names
the argument and says what was wrong. After validation the public arguments are brought into one canonical
form so that each backend implements a single, small interface:

attention  q (B, Hq, L, E), k (B, Hkv, S, E), v (B, Hkv, S, Ev), mask None or (B, Hq, L, S), and a ScoreRule
           (window, alignment, softcap, ALiBi slopes (B, Hq), sinks (Hq,)) in the folded form described there
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
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

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


ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True, eq=False)
class ScoreRule:
    """The attention variants in canonical form: what every backend applies to the score of query i, key j.

    In this order, with d = S - L when ``bottom_right`` else 0: s = scale * q_i . k_j; softcap c > 0:
    s = c * tanh(s / c); ALiBi: s -= slope[b, h] * |i + d - j|; a float mask is added; a bool mask, causal
    (j <= i + d, from AttentionArgs.is_causal) and the window (i + d - window_left <= j <= i + d + window_right,
    -1 = unbounded side) hide keys; softmax over the visible keys with exp(sinks[h]) added to the denominator.

    Causal folding (check_attention): a window right side of 0 is causality, so it arrives as is_causal=True with
    window_right=-1 and kernels have one causal path; hence ``window_right`` is -1 or >= 1, and >= 1 only without
    is_causal. A window side that reaches past every key is -1, and ``bottom_right`` is False wherever d is 0 or
    nothing uses it (no causal, no window, no ALiBi), so equivalent calls share one canonical form.
    ``alibi_slopes``: (B, Hq) float32 view (float64 only on the reference with float64 inputs), stride 0 where
    the user's slopes broadcast, never requiring grad. ``sinks``: (Hq,), float32 or the inputs' dtype, may
    require grad (ops.py computes its gradient; backends use it in the forward only).
    eq=False: the fields hold tensors, which do not compare as booleans.
    """

    window_left: int = -1
    window_right: int = -1
    bottom_right: bool = False
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    sinks: Optional[torch.Tensor] = None

    @property
    def active(self) -> bool:
        """True when any variant is in use (a backend without variant support must decline the call)."""
        return (self.window_left != -1 or self.window_right != -1 or self.bottom_right or self.softcap != 0.0
                or self.alibi_slopes is not None or self.sinks is not None)


def _check_window_size(window_size) -> tuple:
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a tuple or list of two ints (left, right), got {window_size!r}")
    sides = []
    for side, w in zip(("left", "right"), window_size):
        # bool is an int subclass; window_size=(True, 0) is a slip, not a window of one key.
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size must be a tuple or list of two ints (left, right); its {side} side is "
                            f"{type(w).__name__} {w!r}")
        if w < -1:
            raise ValueError(f"window_size {side} side must be >= -1 (-1 = unbounded), got {int(w)}")
        sides.append(int(w))
    return tuple(sides)


def _check_softcap(softcap) -> float:
    softcap = _real_scalar("softcap", softcap)
    # Comparisons rather than math.isfinite, which torch.compile cannot trace on a symbolic float; NaN fails both.
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be a finite number >= 0 (0 = off), got {softcap}")
    return softcap


def _check_alibi_tensor(alibi_slopes, query: torch.Tensor, dtypes: tuple) -> None:
    """alibi_slopes' type, dtype (float32; float64 too for float64 inputs where the backend takes them), device and
    that it needs no gradient; the shape rule is the caller's (dense and varlen differ)."""
    f64 = (torch.float64,) if query.dtype == torch.float64 and torch.float64 in dtypes else ()
    _check_rule_tensor("alibi_slopes", alibi_slopes, query, (torch.float32,) + f64,
                       "float32" + (" or float64" if f64 else ""))
    if alibi_slopes.requires_grad:
        raise ValueError("alibi_slopes requires grad; llmkernels takes the ALiBi slopes as constants and computes no "
                         "gradient for them (pass alibi_slopes.detach())")


def _check_rule_tensor(name: str, t, query: torch.Tensor, dtypes: tuple, dtype_desc: str) -> None:
    _check_tensor(name, t)
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {dtype_desc}")
    if t.device != query.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {query.device}")


def _causal_bias_alignment(bias: CausalBias, L: int, S: int) -> str:
    """The alignment a CausalBias mask stands for, after checking its sizes against the inputs'."""
    if (bias.seq_len_q, bias.seq_len_kv) != (L, S):
        raise ValueError(f"attn_mask is a CausalBias for seq_len_q={bias.seq_len_q}, seq_len_kv={bias.seq_len_kv} "
                         f"but the inputs have L={L} queries and S={S} keys")
    if bias.variant == CausalVariant.UPPER_LEFT:
        return "top_left"
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return "bottom_right"
    raise ValueError(f"attn_mask is a CausalBias of unknown variant {bias.variant!r}")


def _score_rule(query, window_size, causal_alignment, softcap, alibi_slopes, sinks, is_causal: bool,
                bias_alignment: Optional[str], batch: tuple, lead: tuple, L: int, S: int,
                dtypes: tuple) -> tuple:
    """Validate the variant arguments; return (is_causal, ScoreRule) in the folded canonical form."""
    left, right = _check_window_size(window_size)
    if causal_alignment is not None and causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment must be None, 'top_left' or 'bottom_right', got {causal_alignment!r}")
    if bias_alignment is not None:
        if is_causal:
            raise ValueError("attn_mask is a CausalBias, which already makes the call causal: do not also pass "
                             "is_causal=True (PyTorch refuses this too)")
        if causal_alignment is not None and causal_alignment != bias_alignment:
            raise ValueError(f"causal_alignment={causal_alignment!r} conflicts with the attn_mask CausalBias, "
                             f"which is {bias_alignment!r}")
        is_causal, causal_alignment = True, bias_alignment
    if is_causal and right > 0:
        what = "a CausalBias attn_mask" if bias_alignment is not None else "is_causal=True"
        raise ValueError(f"window_size right side {right} > 0 contradicts {what}, which hides every key right of "
                         f"the diagonal (use a right side of 0 or -1)")
    softcap = _check_softcap(softcap)

    H = batch[-1] if batch else 1
    if alibi_slopes is not None:
        _check_alibi_tensor(alibi_slopes, query, dtypes)
        try:
            fits = alibi_slopes.dim() >= 1 and torch.broadcast_shapes(alibi_slopes.shape, batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"alibi_slopes of shape {tuple(alibi_slopes.shape)} must be (Hq,) = ({H},) or the "
                             f"query's batch dims and heads {batch} (size-1 dims broadcast)")
        alibi_slopes = _merge_leading(alibi_slopes.expand(batch), lead, 1)
    if sinks is not None:
        sink_dtypes = tuple(dict.fromkeys((torch.float32, query.dtype)))
        _check_rule_tensor("sinks", sinks, query, sink_dtypes,
                           " or ".join(str(d).replace("torch.", "") for d in sink_dtypes) + " (the inputs' dtype)")
        if tuple(sinks.shape) != (H,):
            raise ValueError(f"sinks of shape {tuple(sinks.shape)} must be (Hq,) = ({H},), one logit per head")

    if not is_causal and right == 0:
        is_causal, right = True, -1  # a window ending on the diagonal is causality: one causal path in kernels
    if is_causal:
        right = -1
    d = S - L if causal_alignment == "bottom_right" else 0
    # A side that reaches past every key for every query hides nothing: unbounded, the same canonical form.
    if left >= L - 1 + d:
        left = -1
    if right >= S - 1 - d:
        right = -1
    bottom_right = d != 0 and (is_causal or left != -1 or right != -1 or alibi_slopes is not None)
    return is_causal, ScoreRule(left, right, bottom_right, softcap, alibi_slopes, sinks)


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
    rule: ScoreRule = field(default_factory=ScoreRule)

    @property
    def shape_desc(self) -> str:
        B, Hq, L, E = self.q.shape
        return f"B={B} Hq={Hq} Hkv={self.k.shape[1]} L={L} S={self.k.shape[2]} E={E} Ev={self.v.shape[3]}"


def check_query_key_value(query, key, value, dtypes, rank_ok, rank_wanted: str) -> None:
    """The checks every attention entry point makes of query, key and value: tensors of an accepted float dtype,
    of a rank ``rank_ok`` accepts (``rank_wanted`` says which in the error), one dtype, one device, and the same
    head dim for query and key."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
        _check_float_dtype(name, t, dtypes)
        if not rank_ok(t.dim()):
            raise ValueError(f"{name} must {rank_wanted}, got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    E, Ek = query.shape[-1], key.shape[-1]
    if E != Ek:
        raise ValueError(f"query and key must have the same head dim, got query {E} and key {Ek}")


def check_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False, dtypes=SUPPORTED_DTYPES, *, window_size=(-1, -1), causal_alignment=None,
                    softcap=0.0, alibi_slopes=None, sinks=None) -> AttentionArgs:
    """Validate scaled_dot_product_attention's arguments and bring them into canonical form.

    ``dtypes``: the accepted input dtypes (the reference also takes float64). A ``CausalBias`` attn_mask
    becomes is_causal=True with its alignment and no mask (it is a tensor subclass whose storage is not a mask:
    it must never be read as one)."""
    check_query_key_value(query, key, value, dtypes, lambda rank: rank >= 2,
                          "have at least 2 dims (..., seq, head_dim)")
    E = query.shape[-1]
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

    bias_alignment = None
    if isinstance(attn_mask, CausalBias):
        bias_alignment = _causal_bias_alignment(attn_mask, L, S)
        attn_mask = None
    is_causal, rule = _score_rule(query, window_size, causal_alignment, softcap, alibi_slopes, sinks, is_causal,
                                  bias_alignment, batch, lead, L, S, dtypes)

    mask = None
    if attn_mask is not None:
        # The mask broadcasts to the attention weights of the broadcast batch (stride 0 where it is broadcast).
        _check_mask("attn_mask", attn_mask, query, (*batch, L, S), "(..., Hq, L, S) =")
        mask = _merge_leading(attn_mask.expand(*lead, H, L, S), lead, 3)
    return AttentionArgs(q, k, v, mask, float(dropout_p), is_causal, scale, out_shape, rule)


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
