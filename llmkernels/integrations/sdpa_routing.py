"""Route ``torch.nn.functional.scaled_dot_product_attention`` to llmkernels, without editing the calling code.

    import llmkernels
    with llmkernels.route_sdpa():            # a block ...
        model(x)                             # every F.scaled_dot_product_attention call inside is considered
    llmkernels.enable_sdpa_routing()         # ... or a process-wide switch
    llmkernels.disable_sdpa_routing()
    print(llmkernels.routing_stats())        # which calls took which path, and why

How it works: while routing is on, the attribute ``torch.nn.functional.scaled_dot_product_attention`` is a Python
router; the original is put back when the last block exits and the switch is off. Code that looks the function up
at call time is routed: ``F.scaled_dot_product_attention(...)``, ``torch.nn.functional.scaled_dot_product_attention``,
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` when they take the ``F`` path, and Hugging Face's "sdpa"
attention. Code that bound the function to a name before routing started (``from torch.nn.functional import
scaled_dot_product_attention`` at import time), and direct calls of ``torch._C._nn.scaled_dot_product_attention``
or ``torch.ops.aten.scaled_dot_product_attention``, are not: those are PyTorch internals, and patching the C
module would also change what our own fallback calls. Routing is process-wide (a module attribute), not per thread.

Which calls llmkernels takes. A call goes to PyTorch's original function (a "fallback", counted with its reason)
when:
  * it passes a keyword PyTorch has and llmkernels does not know (a newer PyTorch's extra argument);
  * PyTorch's context parallelism is at work: an input is a DTensor, or a
    ``torch.distributed.tensor.experimental.context_parallel()`` block is active (its DTensor handlers for the
    aten flash/efficient/cuDNN ops are installed). Inside such a block the call's tensors are this rank's
    sequence shard, and only PyTorch's ring attention sees the whole sequence: llmkernels' op would silently
    attend within the shard. (PyTorch offers no supported way to plug another attention op into its context
    parallel: the handlers and ``_templated_ring_attention`` are private. ``llmkernels.distributed`` is the
    llmkernels way.) The context check is skipped while torch.compile traces;
  * an input is a tensor subclass or has a ``__torch_function__`` override (strided nested tensors,
    ...). Jagged nested tensors (all three inputs ``torch.jagged``) are routed to llmkernels' nested path
    (``varlen_attention``) under the rules below; what that path refuses (an ``attn_mask``, as PyTorch's nested
    SDPA also does, or head counts that differ) falls back with the contract's reason, so PyTorch answers;
  * it passes both ``attn_mask`` and ``is_causal=True``: PyTorch raises for that, llmkernels would combine them,
    so the caller keeps PyTorch's behaviour (a ``CausalBias`` mask with ``is_causal=True`` too: PyTorch's error);
  * the llmkernels contract rejects it (float64, mismatched dtypes, shapes, ...): PyTorch then runs it or raises
    its own error, exactly as without routing;
  * with the default backend choice, only the "reference" backend could run it (for example CPU tensors without
    Triton's interpreter, or a head dim above every fast backend's limit): PyTorch's own kernels are better than
    a dense reference. An explicit ``route_sdpa(backend="reference")`` (or ``use_backend("reference")``) routes
    such calls to it anyway;
  * an explicitly requested backend cannot take the inputs (unless ``strict=True``, which raises instead).
Everything else runs ``llmkernels.scaled_dot_product_attention`` on the chosen backend. A
``torch.nn.attention.bias.CausalBias`` mask (``causal_upper_left`` / ``causal_lower_right``), a tensor subclass, is
not a reason to fall back: it becomes llmkernels' ``is_causal=True`` with the matching alignment, never
materialised.

Differences a routed call can show (all within the llmkernels contract, KERNELS.md): rows whose keys are all
masked give 0 (as PyTorch's math path since 2.5); a NaN in a *masked* score position is not read (as PyTorch's
fused kernels; its math path adds -inf to it and spreads the NaN over the row); dropout draws a different random
stream. Under torch.compile the router is traced like the code around it (``fullgraph=True`` works) and the
routed call becomes the llmkernels op in the graph; the counters are not updated for compiled calls (they would
count traces, not calls). Under autocast the router casts the inputs as PyTorch's autocast does for this op (to the
autocast dtype) and runs the kernel with autocast off, so the output dtype matches PyTorch's.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from .. import contract, dispatch
from .. import nested as _nested
from .. import ops as _ops

__all__ = ["route_sdpa", "enable_sdpa_routing", "disable_sdpa_routing", "sdpa_routing_enabled", "routing_stats",
           "reset_routing_stats", "RoutingStats", "RoutingEvent"]

# Fallback reasons (the keys of RoutingStats.fallback); each event's detail says more.
REASON_EXTRA_ARGS = "arguments llmkernels does not take"
REASON_CONTEXT_PARALLEL = "PyTorch context parallel (DTensor inputs or an active context_parallel())"
REASON_SUBCLASS = "tensor subclass or __torch_function__ override"
REASON_MASK_AND_CAUSAL = "attn_mask with is_causal=True (PyTorch rejects it)"
REASON_CONTRACT = "rejected by the llmkernels contract"
REASON_REFERENCE_ONLY = "only the reference backend supports these inputs"
REASON_BACKEND = "requested backend cannot take these inputs"
REASON_BAD_CALL = "call does not match the signature"


class RoutingEvent(NamedTuple):
    path: str  # "llmkernels" or "torch"
    backend: Optional[str]  # the llmkernels backend that ran it (path "llmkernels")
    reason: Optional[str]  # why PyTorch ran it (path "torch"): one of the REASON_* strings
    detail: str  # shapes and dtypes, or the contract's / dispatch's message


class RoutingStats:
    """What the router did: ``routed`` counts calls per llmkernels backend, ``fallback`` counts calls given to
    PyTorch per reason, ``recent`` keeps the last events (with details). Updated under a lock; ``reset()`` clears.
    Calls made while routing is off are not seen. ``str(stats)`` is a short table."""

    def __init__(self, log_size: int = 64):
        self._lock = threading.Lock()
        self.routed: collections.Counter = collections.Counter()
        self.fallback: collections.Counter = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=log_size)

    def _record(self, path: str, backend: Optional[str], reason: Optional[str], detail: Callable[[], str]) -> None:
        """Count one call. ``detail`` builds the event's text; it is called only here, outside tracing."""
        if torch.compiler.is_compiling():
            # Under torch.compile the router runs once per trace, not per call, so a count would mislead; the
            # lock would break a fullgraph=True graph; and formatting symbolic shapes (dynamic=True, or a second
            # sequence length) into a string is something dynamo cannot trace.
            return
        event = RoutingEvent(path, backend, reason, detail())
        with self._lock:
            if event.path == "llmkernels":
                self.routed[event.backend] += 1
            else:
                self.fallback[event.reason] += 1
            self.recent.append(event)

    def reset(self) -> None:
        with self._lock:
            self.routed.clear()
            self.fallback.clear()
            self.recent.clear()

    def counts(self) -> dict:
        """Calls per path: ``{"llmkernels": n, "torch": m}``."""
        with self._lock:
            return {"llmkernels": sum(self.routed.values()), "torch": sum(self.fallback.values())}

    @property
    def total(self) -> int:
        c = self.counts()
        return c["llmkernels"] + c["torch"]

    def __str__(self) -> str:
        with self._lock:
            lines = [f"sdpa routing: {sum(self.routed.values())} call(s) to llmkernels, "
                     f"{sum(self.fallback.values())} to torch"]
            lines += [f"  llmkernels/{name}: {n}" for name, n in self.routed.most_common()]
            lines += [f"  torch ({reason}): {n}" for reason, n in self.fallback.most_common()]
        return "\n".join(lines)

    __repr__ = __str__


class _Route:
    """One active routing request (a block, or the global switch). Compared by identity."""

    def __init__(self, backend: Optional[str], strict: bool, enabled: bool):
        self.backend = None if backend is None else contract.check_backend_name(backend)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.strict = strict
        self.enabled = enabled


_lock = threading.RLock()
_blocks: list = []  # active route_sdpa() blocks, innermost last
_global_route: Optional[_Route] = None
_original: Optional[Callable] = None  # what F.scaled_dot_product_attention was when the router went in
_stats = RoutingStats()


def routing_stats() -> RoutingStats:
    """The live counters of the router (shared by every block and the global switch)."""
    return _stats


def reset_routing_stats() -> None:
    _stats.reset()


def _active_route() -> Optional[_Route]:
    route = _blocks[-1] if _blocks else _global_route
    return route if route is not None and route.enabled else None


def sdpa_routing_enabled() -> bool:
    """Whether a call of F.scaled_dot_product_attention made now would be considered for llmkernels."""
    return _active_route() is not None and F.scaled_dot_product_attention is _router


def _install() -> None:
    global _original
    with _lock:
        current = F.scaled_dot_product_attention
        if current is not _router:
            _original = current
            F.scaled_dot_product_attention = _router


def _uninstall_if_idle() -> None:
    with _lock:
        if _blocks or _global_route is not None:
            return
        # Only undo our own patch: if someone wrapped the router since, their wrapper stays, and the router it
        # calls passes everything to the original while idle.
        if F.scaled_dot_product_attention is _router:
            F.scaled_dot_product_attention = _original


def enable_sdpa_routing(backend: Optional[str] = None, *, strict: bool = False) -> None:
    """Route F.scaled_dot_product_attention calls to llmkernels from now on, until ``disable_sdpa_routing()``.

    backend: the llmkernels backend to use (``None``: the usual choice, see ``llmkernels.use_backend``).
    strict: raise instead of falling back when an explicitly requested backend cannot take a call."""
    global _global_route
    route = _Route(backend, strict, True)
    with _lock:
        _global_route = route
        _install()


def disable_sdpa_routing() -> None:
    """Turn the global switch off; PyTorch's function is back unless a ``route_sdpa()`` block is still open."""
    global _global_route
    with _lock:
        _global_route = None
        _uninstall_if_idle()


@contextlib.contextmanager
def route_sdpa(backend: Optional[str] = None, *, strict: bool = False, enabled: bool = True):
    """Inside the block, F.scaled_dot_product_attention calls run on llmkernels where it supports them.

    backend, strict: as ``enable_sdpa_routing``. ``enabled=False`` turns routing off inside the block (for
    example to run one part of a model on PyTorch's kernels under the global switch). Blocks nest; the innermost
    wins. Yields the ``RoutingStats`` object."""
    route = _Route(backend, strict, bool(enabled))
    with _lock:
        _blocks.append(route)
        _install()
    try:
        yield _stats
    finally:
        with _lock:
            for i in range(len(_blocks) - 1, -1, -1):
                if _blocks[i] is route:
                    del _blocks[i]
                    break
            _uninstall_if_idle()


def _describe(query, key, value, attn_mask) -> str:
    def d(t):
        if isinstance(t, CausalBias):  # its tensor shape (variant, L, S) is not a mask's
            return f"CausalBias({t.variant.name.lower()}, {t.seq_len_q}, {t.seq_len_kv})"
        if not isinstance(t, torch.Tensor):
            return type(t).__name__
        if t.is_nested and t.layout != torch.jagged:  # a strided nested tensor has no .shape
            return f"nested ({t.dim()}-D, strided layout) {str(t.dtype).replace('torch.', '')} {t.device}"
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device}"
    text = f"q {d(query)}, k {d(key)}, v {d(value)}"
    return text + (f", mask {d(attn_mask)}" if attn_mask is not None else "")


# Where PyTorch's context parallel lives (torch 2.11 to 2.14 keep it in the first; older ones in the second).
_CP_MODULES = ("torch.distributed.tensor.experimental._context_parallel._attention",
               "torch.distributed.tensor.experimental._attention")


def _context_parallel_reason(tensors) -> Optional[str]:
    """Why PyTorch's context parallel must run this call (None: it is not involved). Reads only modules that
    are already imported: a process that never imported torch.distributed.tensor pays nothing."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(dtensor_module, "DTensor", None)
    if dtensor is not None and any(isinstance(t, dtensor) for t in tensors):
        return "DTensor inputs"
    if torch.compiler.is_compiling():
        return None
    for name in _CP_MODULES:
        cp = sys.modules.get(name)
        ops = getattr(cp, "custom_ops", None)
        handlers = getattr(getattr(getattr(cp, "DTensor", None), "_op_dispatcher", None), "_custom_op_handlers", None)
        if ops and handlers and any(handlers.get(op) is ops[op] for op in ops):
            return "inside torch.distributed.tensor.experimental.context_parallel()"
    return None


def _bind(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False,
          **extra):
    """PyTorch's signature (``scale`` and ``enable_gqa`` are keyword-only there too), plus anything newer."""
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra


def _call_torch(args, kwargs):
    """PyTorch's function on the call as made. A CausalBias mask is PyTorch's own tensor subclass whose
    __torch_function__ serves the call only when the function is ``torch.nn.functional.scaled_dot_product_attention``
    itself, which is the router while routing is installed: PyTorch's function would then read the bias as a plain
    (variant, L, S) tensor mask. So such a call goes to the bias's own dispatch, as it would without routing."""
    try:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra = _bind(*args, **kwargs)
    except TypeError:
        return _original(*args, **kwargs)
    if isinstance(attn_mask, CausalBias) and not extra:
        return type(attn_mask)._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    return _original(*args, **kwargs)


def _fallback(reason: str, detail: Callable[[], str], args, kwargs):
    _stats._record("torch", None, reason, detail)
    return _call_torch(args, kwargs)


def _router(*args, **kwargs):
    route = _active_route()
    if route is None:  # idle (an outer wrapper still holds us): PyTorch's function, unseen
        return _call_torch(args, kwargs)
    try:
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, extra = _bind(*args, **kwargs)
    except TypeError as exc:  # PyTorch raises its own error for a call that does not fit its signature
        return _fallback(REASON_BAD_CALL, lambda: str(exc), args, kwargs)

    # The description is built only when an event is recorded (never while dynamo traces the success path), from
    # the caller's tensors (before any autocast cast below).
    described = (query, key, value, attn_mask)

    def detail(why: str = "") -> str:
        text = _describe(*described)
        return f"{text}: {why}" if why else text

    if extra:
        return _fallback(REASON_EXTRA_ARGS, lambda: ", ".join(sorted(extra)), args, kwargs)
    if all(_nested.is_jagged(t) for t in (query, key, value)):
        return _route_nested(route, args, kwargs, query, key, value, attn_mask, dropout_p, is_causal, scale,
                             enable_gqa, detail)
    # A CausalBias is a tensor subclass with a __torch_function__ override, but one the contract understands (it
    # becomes is_causal with its alignment), so it is not counted as a subclass here.
    causal_bias = isinstance(attn_mask, CausalBias)
    checked = (query, key, value) if causal_bias else (query, key, value, attn_mask)
    tensors = tuple(t for t in checked if isinstance(t, torch.Tensor))
    cp_reason = _context_parallel_reason(tensors)
    if cp_reason is not None:
        return _fallback(REASON_CONTEXT_PARALLEL, lambda: detail(cp_reason), args, kwargs)
    if any(type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) for t in tensors) or \
            torch.overrides.has_torch_function(tensors) or any(t.is_nested for t in tensors):
        return _fallback(REASON_SUBCLASS, detail, args, kwargs)
    if attn_mask is not None and is_causal is True:
        return _fallback(REASON_MASK_AND_CAUSAL, detail, args, kwargs)

    autocast_dtype = None
    if isinstance(query, torch.Tensor):
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            # PyTorch's autocast runs this op in the lower-precision dtype: every floating input is cast to it.
            autocast_dtype = torch.get_autocast_dtype(device_type)
            query, key, value = (t.to(autocast_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                                 else t for t in (query, key, value))
            if isinstance(attn_mask, torch.Tensor) and not causal_bias and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(autocast_dtype)
    try:
        a = contract.check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    except (TypeError, ValueError) as exc:
        return _fallback(REASON_CONTRACT, lambda: detail(str(exc)), args, kwargs)
    name, fallback = _backend_or_fallback(route, a, dispatch.choose_attention_backend,
                                          dispatch.attention_not_supported_reasons, detail, args, kwargs)
    if name is None:
        return fallback
    with _autocast_off(query, autocast_dtype):
        return _ops.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                 enable_gqa, backend=name)


def _autocast_off(query, autocast_dtype):
    """Autocast off while llmkernels runs a call whose inputs autocast has cast already (to ``autocast_dtype``):
    the kernels, and the reference backend's fp32 math, must not be re-cast."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(query.device.type, enabled=False)


def _backend_or_fallback(route, call, choose, not_supported_reasons, detail, args, kwargs):
    """(the backend llmkernels runs ``call`` on, None), counted; or (None, PyTorch's result) when the call goes
    back to PyTorch: no backend takes it (and the route is not strict), or ``auto`` would find only the
    reference backend. ``choose(call, backend)`` and ``not_supported_reasons(call)`` are dispatch's functions
    for the call's kind (dense or varlen)."""
    requested = dispatch.requested_backend(route.backend)  # a bad LLMKERNELS_BACKEND raises here, as it should
    try:
        name = choose(call, route.backend)
    except dispatch.NotSupportedError as exc:
        if route.strict:
            raise
        return None, _fallback(REASON_BACKEND, lambda: detail(str(exc)), args, kwargs)
    if name == "reference" and requested == "auto":
        def why() -> str:
            reasons = not_supported_reasons(call)
            return detail("; ".join(f"{b}: {', '.join(r)}" for b, r in reasons.items() if r))
        return None, _fallback(REASON_REFERENCE_ONLY, why, args, kwargs)
    _stats._record("llmkernels", name, None, detail)
    return name, None


def _route_nested(route, args, kwargs, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                  detail):
    """Jagged nested query, key and value: llmkernels' nested path (varlen_attention) where it takes the call,
    else PyTorch's nested SDPA, counted like dense calls."""
    autocast_dtype = None
    if torch.is_autocast_enabled(query.device.type):
        autocast_dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(autocast_dtype) if t.is_floating_point() else t for t in (query, key, value))
    try:
        call = _nested.check_nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    except (TypeError, ValueError) as exc:  # an attn_mask, mismatched heads, ...: PyTorch's own answer
        return _fallback(REASON_CONTRACT, lambda: detail(str(exc)), args, kwargs)
    name, fallback = _backend_or_fallback(route, call.varlen, dispatch.choose_varlen_backend,
                                          dispatch.varlen_not_supported_reasons, detail, args, kwargs)
    if name is None:
        return fallback
    with _autocast_off(query, autocast_dtype):
        return _ops.scaled_dot_product_attention(query, key, value, None, dropout_p, is_causal, scale, enable_gqa,
                                                 backend=name)


# Shows as torch's function in help() and tracebacks, with a note that it is the router.
_router.__name__ = "scaled_dot_product_attention"
_router.__qualname__ = "scaled_dot_product_attention"
_router.__doc__ = ("llmkernels' router for torch.nn.functional.scaled_dot_product_attention (see "
                   "llmkernels.integrations.sdpa_routing); PyTorch's documentation follows.\n\n"
                   + (F.scaled_dot_product_attention.__doc__ or ""))
