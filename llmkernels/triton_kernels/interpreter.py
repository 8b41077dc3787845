"""Triton's interpreter (``TRITON_INTERPRET=1``): whether it is on, and making our kernels right in it.

This module is the one place that answers "are the Triton kernels interpreted?". It imports nothing from Triton
at import time, so ``dispatch.py`` can ask it even where Triton is missing or broken.

Triton decides per ``@triton.jit`` decoration whether a kernel is compiled or interpreted, from the environment
at that moment; our kernel modules are imported on first use, so the environment read here is what they see.

The interpreter (``triton/runtime/interpreter.py``, which simulates a kernel with numpy) has bugs that the
compiled GPU path does not have, and they make our kernels return wrong numbers there, e.g. bf16 attention off
by about 1e9. A user may set ``TRITON_INTERPRET=1`` as our tests do, so the package itself works around them:
``prepare()`` runs, once per process and on the first use of the triton backend while interpreting, a tiny probe
kernel per known bug (``interpreter_probes.py``) and compares it with torch; where the probe shows the bug it
applies the fix and probes again. Where a fix cannot be applied or the probe still fails afterwards (a Triton
whose interpreter differs from the ones we know, 3.6 to 3.9), ``unsupported_reasons`` names it, and the triton
backend declines that dtype (or, for a bug outside any dtype, the interpreter altogether), so ``auto`` falls back
to the reference backend instead of returning wrong numbers. The fixes change the simulator, never our kernels,
and only in the running process.
"""

from __future__ import annotations

import inspect
import os
import threading
from typing import Callable, NamedTuple, Optional

import torch


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set to anything but "" or "0"."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class CannotFix(RuntimeError):
    """The installed Triton's interpreter is not the one a fix was written for (a function missing or changed)."""


class Fix(NamedTuple):
    name: str
    dtypes: Optional[tuple]  # the dtypes the bug affects; None: every call in the interpreter
    bug: str  # what the unfixed interpreter does, for reasons ("computes ... wrongly")
    probe: Callable[[], Optional[str]]  # None when the interpreter computes the probe right, else what went wrong
    apply: Callable[[], None]  # patches the interpreter; raises CannotFix (or anything) when it cannot


class Outcome(NamedTuple):
    needed: bool  # the first probe showed the bug
    applied: bool  # the fix was applied (only when needed)
    reason: Optional[str]  # None: the interpreter now computes this right; else why the dtype(s) are declined
    found: Optional[str] = None  # what the first probe saw, when it showed the bug


# ---------------------------------------------------------------------------------------------------------------
# the fixes


def _builder_method(name: str, params: tuple):
    """``InterpreterBuilder.<name>`` if its leading parameters are ``params``; else CannotFix."""
    from triton.runtime import interpreter
    builder = getattr(interpreter, "InterpreterBuilder", None)
    method = getattr(builder, name, None)
    if method is None:
        raise CannotFix(f"triton.runtime.interpreter.InterpreterBuilder.{name} does not exist")
    got = tuple(inspect.signature(method).parameters)
    if got[:len(params)] != params:
        raise CannotFix(f"InterpreterBuilder.{name}{got} does not start with the parameters {params} llmkernels "
                        "knows")
    return builder, method


def _fix_bf16_dot() -> None:
    """bf16 ``tl.dot``: the interpreter multiplies the raw uint16 storage.

    The interpreter stores bf16 values as numpy uint16 (numpy has no bf16) and its ``create_dot`` hands that
    storage to ``np.matmul``, so it multiplies integers like 16256 (the bits of 1.0) and every bf16 dot is
    garbage (triton 3.6 to 3.9). A GPU's bf16 MMA multiplies the values exactly and accumulates in fp32, so the
    operands are widened to the fp32 values they encode (exact: a bf16 is the top half of an fp32) before the
    matmul. fp16 and fp32 dots are untouched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, original = _builder_method("create_dot", ("self", "a", "b"))
    handle_cls = getattr(interpreter, "TensorHandle", None)
    if handle_cls is None:
        raise CannotFix("triton.runtime.interpreter.TensorHandle does not exist")

    def widen(handle):
        if handle.dtype == tl.bfloat16 and handle.data.dtype == np.uint16:
            return handle_cls((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return handle

    def create_dot(self, a, b, *args, **kwargs):
        return original(self, widen(a), widen(b), *args, **kwargs)

    builder.create_dot = create_dot


def _fix_bf16_cast() -> None:
    """fp32 -> bf16 ``.to()``: the interpreter truncates the mantissa.

    The interpreter's ``cast_impl`` (behind ``x.to(tl.bfloat16)`` and a store of fp32 values to a bf16 pointer)
    cuts off the low 16 bits instead of rounding to nearest even as the GPU's ``cvt.rn.bf16.f32`` does (triton 3.6
    to 3.9). Truncation errs in one direction, so a sum of converted terms (P^T dO in the attention backward)
    drifts linearly and a correct kernel fails the tolerance rule. Convert as the hardware does (torch's
    conversion rounds to nearest even, and keeps inf and NaN).
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder, original = _builder_method("cast_impl", ("self", "src", "dst_type"))
    handle_cls = interpreter.TensorHandle

    def cast_impl(self, src, dst_type, *args, **kwargs):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return handle_cls(rounded.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return original(self, src, dst_type, *args, **kwargs)

    builder.cast_impl = cast_impl


def _fix_scalar_index() -> None:
    """``range()`` bounds computed from a program id: ``int()`` of a one-element array fails with NumPy >= 2.4.

    The interpreter holds a scalar such as ``tl.program_id(0)`` as a one-element 1-D numpy array, and triton
    3.6's ``tensor.__index__`` is ``int(handle.data)``. NumPy 2.4 no longer converts an array of ndim > 0 to a
    Python int, so ``range(lo, hi, BLOCK)`` with ``lo`` or ``hi`` computed from a program id (our causal key
    loops) raises in the simulator; the compiled kernel has no such problem. Newer Triton (3.8) squeezes the array
    first; do the same where the interpreter does not.
    """
    import numpy as np
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:
        raise CannotFix("triton.runtime.interpreter._patch_lang_tensor does not exist")
    got = tuple(inspect.signature(original).parameters)
    if got != ("tensor", "scope"):
        raise CannotFix(f"triton.runtime.interpreter._patch_lang_tensor{got} is not (tensor, scope)")

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    # _patch_lang looks the function up in the module's globals on every kernel call, so this takes effect for
    # kernels decorated before it too.
    interpreter._patch_lang_tensor = _patch_lang_tensor


# ---------------------------------------------------------------------------------------------------------------
# the probes (each returns None when the interpreter computes right, else a short description of what it got)


def _probe_bf16_dot() -> Optional[str]:
    from . import interpreter_probes
    n = 16
    # Multiples of 1/8 below 2: every product and every sum of 16 of them is exact in fp32 (and in float64), so
    # the right answer is known exactly, whatever the order of summation.
    gen = torch.Generator().manual_seed(0)
    a = (torch.randint(-15, 16, (n, n), generator=gen) / 8).to(torch.bfloat16)
    b = (torch.randint(-15, 16, (n, n), generator=gen) / 8).to(torch.bfloat16)
    c = torch.full((n, n), float("nan"), dtype=torch.float32)
    interpreter_probes.bf16_dot_kernel[(1,)](a, b, c, N=n)
    want = (a.double() @ b.double()).float()
    if torch.equal(c, want):
        return None
    return f"max |error| {(c.double() - want.double()).abs().max().item():.3g} on a 16x16 bf16 dot of exact values"


def _probe_bf16_cast() -> Optional[str]:
    from . import interpreter_probes
    one = 1.0
    # Cases a truncation gets wrong (just above a halfway point, and a carry into the exponent), ties that round
    # to even both ways, and the specials; then random values.
    special = torch.tensor([one + 2.0 ** -8 + 2.0 ** -20, one + 2.0 ** -8, one + 3 * 2.0 ** -8, 1.9999999, -2.7182817,
                            65504.7, 3.3e38, 1e-40, 0.0, -0.0, float("inf"), float("-inf"), float("nan")],
                           dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([special, torch.randn(64 - special.numel(), generator=gen, dtype=torch.float32) * 100])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    y.view(torch.int16).fill_(-1)  # a NaN pattern, so an unwritten element cannot pass
    interpreter_probes.to_bf16_kernel[(1,)](x, y, N=x.numel())
    want = x.to(torch.bfloat16)
    same = (y.view(torch.int16) == want.view(torch.int16)) | (torch.isnan(y) & torch.isnan(want))
    if bool(same.all()):
        return None
    i = int((~same).nonzero()[0])
    return (f"{int((~same).sum())} of {x.numel()} values converted wrongly, e.g. {x[i].item()!r} -> "
            f"{y[i].item()!r} instead of {want[i].item()!r}")


def _probe_scalar_index() -> Optional[str]:
    from . import interpreter_probes
    programs, step = 4, 2
    out = torch.full((programs,), -1, dtype=torch.int32)
    try:
        interpreter_probes.program_id_range_kernel[(programs,)](out, STEP=step)
    except Exception as exc:  # what the bug does: the simulator raises on range(pid-derived bounds)
        return f"a range() over program-id bounds raised {type(exc).__name__}: {exc}"
    want = torch.tensor([sum(range(p, 2 * p + 3, step)) for p in range(programs)], dtype=torch.int32)
    if torch.equal(out, want):
        return None
    return f"a range() over program-id bounds gave {out.tolist()} instead of {want.tolist()}"


# Order: the index fix first, since without it no kernel with a program-id loop runs at all.
FIXES = (
    Fix("scalar_index", None, "fails on range() bounds computed from a program id",
        _probe_scalar_index, _fix_scalar_index),
    Fix("bf16_dot", (torch.bfloat16,), "computes bf16 tl.dot wrongly", _probe_bf16_dot, _fix_bf16_dot),
    Fix("bf16_cast", (torch.bfloat16,), "converts fp32 to bf16 wrongly", _probe_bf16_cast, _fix_bf16_cast),
)


# ---------------------------------------------------------------------------------------------------------------
# once per process


def _run_probe(fix: Fix) -> Optional[str]:
    try:
        return fix.probe()
    except Exception as exc:  # an interpreter we do not know may fail anywhere; that, too, is a wrong answer
        return f"the probe kernel raised {type(exc).__name__}: {exc}"


def _settle(fix: Fix, triton_version: str) -> Outcome:
    """Probe; if wrong, fix and probe again; the outcome, with the reason to decline where still wrong."""
    found = _run_probe(fix)
    if found is None:
        return Outcome(needed=False, applied=False, reason=None)
    what = f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) {fix.bug} ({found})"
    try:
        fix.apply()
    except Exception as exc:
        why = f"{what}, and llmkernels cannot fix this interpreter: {type(exc).__name__}: {exc}"
        return Outcome(True, False, why, found)
    still = _run_probe(fix)
    if still is not None:
        return Outcome(True, True, f"{what}, and llmkernels' fix did not cure it ({still})", found)
    return Outcome(True, True, None, found)


_lock = threading.Lock()
_outcomes: Optional[dict] = None  # fix name -> Outcome, filled by the first prepare()


def prepare() -> dict:
    """Probe the interpreter for each known bug and fix what it has, once per process; {fix name: Outcome}.

    Call only while interpreting (the probe kernels must be decorated as interpreted kernels) and with Triton
    importable. Thread-safe: concurrent first calls probe once.
    """
    global _outcomes
    done = _outcomes
    if done is not None:  # the common case, without the lock (torch.compile cannot trace a lock)
        return done
    if not interpreting():
        # Compiled probe kernels would fail on their CPU tensors, and that failure would be cached as "bug".
        raise RuntimeError("interpreter.prepare() checks Triton's interpreter: set TRITON_INTERPRET=1 first")
    with _lock:
        if _outcomes is None:
            import triton
            _outcomes = {fix.name: _settle(fix, triton.__version__) for fix in FIXES}
        return _outcomes


def describe() -> str:
    """One line on what ``prepare()`` found and did, for logs and test headers."""
    parts = []
    for name, o in prepare().items():
        parts.append(f"{name}: " + ("declined" if o.reason else "fixed" if o.needed else "not needed"))
    return ", ".join(parts)


def _constant_under_torch_compile(fn):
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing dynamo.

    torch.compile traces dispatch like user code, and the first probe takes a lock and launches kernels, which
    dynamo cannot trace (fullgraph=True would fail). The answer is fixed per process, so dynamo may call the
    function at trace time and put its result in the graph as a constant. ``assume_constant_result`` only sets
    this attribute (torch 2.1 to 2.14; tests/test_interpreter.py checks it), but importing it loads dynamo
    (about 2 s) whenever llmkernels is imported.
    """
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_torch_compile
def unsupported_reasons(dtypes) -> list:
    """Why the interpreted kernels cannot take tensors of these dtypes (empty: they can); probes on first use."""
    outcomes = prepare()
    reasons = []
    for fix in FIXES:
        reason = outcomes[fix.name].reason
        if reason is None:
            continue
        if fix.dtypes is None:
            reasons.append(reason + "; the Triton kernels cannot run in this interpreter")
        else:
            hit = sorted({str(d).replace("torch.", "") for d in dtypes if d in fix.dtypes})
            if hit:
                reasons.append(reason + f"; {', '.join(hit)} inputs cannot run in this interpreter")
    return reasons
