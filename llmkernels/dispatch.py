"""Backend selection: which implementation runs a call.

Each backend declares what it supports through ``attention_reasons`` / ``softmax_reasons`` (an empty list means
"supported"; otherwise one human-readable reason per limitation, after xformers' ``not_supported_reasons``).
The backend for a call is, in order of precedence: the ``backend=`` argument, the innermost
``llmkernels.use_backend(...)`` block of the calling thread or asyncio task, the ``LLMKERNELS_BACKEND``
environment variable, then ``"auto"``.
``"auto"`` takes the first backend of ``AUTO_ORDER`` (fastest first) that supports the inputs; an explicitly
chosen backend that cannot take the inputs raises with its reasons, and so does ``"auto"`` when none can,
listing every backend's reasons.

The backends work on the canonical form of ``contract.py``; their kernels live in ``triton_kernels/`` (Triton),
``cuda_ext.py`` + ``csrc/`` (in the package) (CUDA C++) and ``reference.py`` (PyTorch).
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Optional

import torch

from .contract import BACKEND_NAMES, AttentionArgs, SoftmaxArgs, check_backend_name
from .triton_kernels.interpreter import interpreting as triton_interpreting

ENV_VAR = "LLMKERNELS_BACKEND"
AUTO_ORDER = ("triton", "cuda", "reference")

# The innermost use_backend() block's choice. A ContextVar, not a module global: each thread starts with its own
# (empty) context and each asyncio task runs in a copy of its creator's, so one thread's or task's block never
# changes the backend of calls made in another.
_block_backend: contextvars.ContextVar = contextvars.ContextVar("llmkernels_block_backend", default=None)


class NotSupportedError(ValueError):
    """No backend (or not the requested one) can run these inputs; the message lists the reasons."""


@contextlib.contextmanager
def use_backend(name: str):
    """Run the llmkernels calls inside the block on backend ``name`` ("auto", "triton", "cuda", "reference").

    The choice holds for the current thread and asyncio task only (and for tasks they create inside the block,
    which copy the context): other threads and tasks keep their own choice."""
    name = check_backend_name(name)
    token = _block_backend.set(name)
    try:
        yield
    finally:
        _block_backend.reset(token)


def requested_backend(backend: Optional[str]) -> str:
    """The backend name in force for a call: argument, then use_backend block, then environment, then auto."""
    if backend is not None:
        return check_backend_name(backend)
    block = _block_backend.get()
    if block is not None:
        return block
    env = os.environ.get(ENV_VAR)
    if env:
        if env not in BACKEND_NAMES:
            raise ValueError(f"environment variable {ENV_VAR}={env!r} is not one of {BACKEND_NAMES}")
        return env
    return "auto"


def _find_triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(exc).__name__}: {exc})"
    return None


# Decided once at import (importing triton does not fix the interpreter mode; decorating kernels does).
_TRITON_IMPORT_ERROR = _find_triton_import_error()


def _cuda_capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


class _KernelCalls:
    """The kernel calls every backend makes the same way: forward to its modules' functions of the same names
    (``attention_forward``, ``attention_backward``, ``masked_softmax_forward``, ``masked_softmax_backward``).
    The modules are imported on the first call, not with dispatch: importing them decorates Triton kernels or
    loads the CUDA extension, which a call that picks another backend must not pay for (or fail on). The function
    is looked up at each call, so a test that replaces a module's function reaches it."""

    ATTENTION_MODULE = ""  # relative to the package, set by each backend
    SOFTMAX_MODULE = ""

    def _module(self, name: str):
        return importlib.import_module(name, __package__)

    def attention_forward(self, q, k, v, mask, dropout_p, is_causal, scale, rng_state, rule, **fp32_outputs):
        # fp32_outputs: out_dtype= (triton, reference), for llmkernels.distributed's fp32 partials.
        return self._module(self.ATTENTION_MODULE).attention_forward(q, k, v, mask, dropout_p, is_causal, scale,
                                                                     rng_state, rule, **fp32_outputs)

    def attention_backward(self, grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                           mask_needs_grad, rule, deterministic=None):
        # ``deterministic`` (ops.scaled_dot_product_attention) chooses between backwards only in TritonBackend
        # (which overrides this). The reference backward is deterministic; the CUDA one adds dQ with fp32 atomics
        # and has no deterministic variant (README: Deterministic and fused backward).
        return self._module(self.ATTENTION_MODULE).attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask,
                                                                      dropout_p, is_causal, scale, rng_state,
                                                                      mask_needs_grad, rule)

    def softmax_forward(self, *args):
        return self._module(self.SOFTMAX_MODULE).masked_softmax_forward(*args)

    VARLEN_MODULE = ""  # the module with varlen_forward / varlen_backward (packed variable-length attention)

    def varlen_forward(self, *args):
        return self._module(self.VARLEN_MODULE).varlen_forward(*args)

    def varlen_backward(self, *args):
        return self._module(self.VARLEN_MODULE).varlen_backward(*args)

    def softmax_backward(self, *args):
        return self._module(self.SOFTMAX_MODULE).masked_softmax_backward(*args)

    KVCACHE_MODULE = ""  # attention_with_kvcache's kernels: kvcache_attention_forward, kvcache_append

    def kvcache_forward(self, *args):
        return self._module(self.KVCACHE_MODULE).kvcache_attention_forward(*args)

    def kvcache_append(self, *args):
        return self._module(self.KVCACHE_MODULE).kvcache_append(*args)


class TritonBackend(_KernelCalls):
    name = "triton"
    ATTENTION_MODULE = ".triton_kernels.attention"
    SOFTMAX_MODULE = ".triton_kernels.softmax"
    # Head dims the kernels take: every size up to this (padded to a power of two on chip).
    MAX_HEAD_DIM = 256

    def _device_reasons(self, t: torch.Tensor, dtypes: tuple) -> list:
        err = _TRITON_IMPORT_ERROR
        if err:
            return [err]
        if t.device.type == "cpu":
            if not triton_interpreting():
                return ["CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter) to run the Triton kernels"]
        elif t.device.type != "cuda":
            return [f"device type {t.device.type!r} is not supported (CUDA, or CPU with TRITON_INTERPRET=1)"]
        elif torch.version.hip is None and _cuda_capability(t.device) < (8, 0):
            return [f"needs compute capability 8.0 or newer, {t.device} has {_cuda_capability(t.device)}"]
        if triton_interpreting():
            # Interpreted kernels (CPU tensors, or CUDA tensors that the interpreter copies to the host) run
            # in Triton's numpy simulator, whose known bugs the package fixes on first use; where a fix does not
            # take, the dtypes it affects are declined rather than computed wrongly.
            from .triton_kernels import interpreter
            return interpreter.unsupported_reasons(dtypes)
        return []

    @staticmethod
    def _float_dtypes(x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple:
        # A float mask may have another dtype than the input (a bf16 mask on fp32 input), and its gradient is
        # written in that dtype, so it counts too.
        if mask is None or mask.dtype == torch.bool:
            return (x.dtype,)
        return (x.dtype, mask.dtype)

    def _head_and_slope_reasons(self, E: int, Ev: int, rule) -> list:
        """The limits every Triton attention kernel shares: head dims, and ALiBi slopes in float32."""
        reasons = []
        if E > self.MAX_HEAD_DIM or Ev > self.MAX_HEAD_DIM:
            reasons.append(f"head dims up to {self.MAX_HEAD_DIM}, got E={E}, Ev={Ev}")
        slopes = rule.alibi_slopes
        if slopes is not None and slopes.dtype != torch.float32:
            reasons.append(f"alibi_slopes must be float32, got {slopes.dtype}")
        return reasons

    def attention_reasons(self, a: AttentionArgs) -> list:
        reasons = self._device_reasons(a.q, self._float_dtypes(a.q, a.mask))
        E, Ev = a.q.shape[-1], a.v.shape[-1]
        return reasons + self._head_and_slope_reasons(E, Ev, a.rule)

    def softmax_reasons(self, a: SoftmaxArgs) -> list:
        return self._device_reasons(a.x, self._float_dtypes(a.x, a.mask))

    def attention_backward(self, grad_out, q, k, v, out, lse, grad_lse, mask, dropout_p, is_causal, scale, rng_state,
                           mask_needs_grad, rule, deterministic=None):
        # Passed positionally, so a test's stand-in taking (*args) still receives it.
        return self._module(self.ATTENTION_MODULE).attention_backward(grad_out, q, k, v, out, lse, grad_lse, mask,
                                                                      dropout_p, is_causal, scale, rng_state,
                                                                      mask_needs_grad, rule, deterministic)

    KVCACHE_MODULE = ".triton_kernels.decode"

    def kvcache_reasons(self, a) -> list:
        """attention_with_kvcache (a: kvcache_contract.KVCacheArgs): the split-K decode kernels."""
        reasons = self._device_reasons(a.q, (a.q.dtype,))
        E, Ev = a.q.shape[-1], a.v_cache.shape[-1]
        return reasons + self._head_and_slope_reasons(E, Ev, a.rule)

    VARLEN_MODULE = ".triton_kernels.attention.varlen_launch"

    def varlen_reasons(self, a) -> list:
        """For varlen_contract.VarlenArgs: the dense op's limits (device, interpreter dtypes, head dims, float32
        slopes); the same kernels run it."""
        reasons = self._device_reasons(a.q, (a.q.dtype,))
        if a.q.device.type == "cuda" and a.q.dtype == torch.float32:
            reasons.append("fp32 varlen runs on the reference backend on a GPU: the VARLEN kernels' fp32 configs "
                           "spill (static compile check, configs._VARLEN_EXCLUDED)")
        E, Ev = a.q.shape[-1], a.v.shape[-1]
        return reasons + self._head_and_slope_reasons(E, Ev, a.rule)


class CudaBackend(_KernelCalls):
    name = "cuda"
    ATTENTION_MODULE = SOFTMAX_MODULE = ".cuda_ext"

    def _device_reasons(self, t: torch.Tensor) -> list:
        if t.device.type != "cuda":
            return [f"runs on CUDA tensors only, got a {t.device.type} tensor"]
        from . import cuda_ext
        err = cuda_ext.unavailable_reason()
        return [err] if err else []

    def attention_reasons(self, a: AttentionArgs) -> list:
        reasons = self._device_reasons(a.q)
        if not reasons:
            from . import cuda_ext
            reasons += cuda_ext.attention_reasons(a)
        return reasons

    def softmax_reasons(self, a: SoftmaxArgs) -> list:
        return self._device_reasons(a.x)

    def kvcache_reasons(self, a) -> list:
        return ["the CUDA C++ backend has no KV-cache (decode) kernel; attention_with_kvcache runs on the triton "
                "or reference backend"]

    def varlen_reasons(self, a) -> list:
        # Not _device_reasons: that may build the extension (minutes) only to decline the call.
        return ["packed variable-length attention (varlen_attention) is not implemented in the CUDA C++ backend; "
                "the triton and reference backends run it"]


class ReferenceBackend(_KernelCalls):
    """PyTorch implementation of the contract: any device, float32 arithmetic for half-precision inputs."""

    name = "reference"
    ATTENTION_MODULE = SOFTMAX_MODULE = KVCACHE_MODULE = ".torch_backend"

    def attention_reasons(self, a: AttentionArgs) -> list:
        return []

    def kvcache_reasons(self, a) -> list:
        return []

    def softmax_reasons(self, a: SoftmaxArgs) -> list:
        return []

    VARLEN_MODULE = ".torch_backend"

    def varlen_reasons(self, a) -> list:
        return []


BACKENDS = {b.name: b for b in (TritonBackend(), CudaBackend(), ReferenceBackend())}


def get_backend(name: str):
    return BACKENDS[name]


def _choose(kind: str, args, backend: Optional[str]) -> str:
    requested = requested_backend(backend)
    reasons_of = {"attention": "attention_reasons", "KV-cache attention": "kvcache_reasons",
                  "varlen attention": "varlen_reasons"}.get(kind, "softmax_reasons")
    candidates = AUTO_ORDER if requested == "auto" else (requested,)
    why_not = {}
    for name in candidates:
        reasons = getattr(BACKENDS[name], reasons_of)(args)
        if not reasons:
            return name
        why_not[name] = reasons
    lines = "\n".join(f"  {name}: " + "; ".join(r) for name, r in why_not.items())
    what = "no backend supports" if requested == "auto" else f"backend {requested!r} does not support"
    raise NotSupportedError(f"{what} these {kind} inputs:\n{lines}")


def choose_attention_backend(args: AttentionArgs, backend: Optional[str] = None) -> str:
    """The name of the backend that will run this attention call (raises NotSupportedError if none)."""
    return _choose("attention", args, backend)


def choose_softmax_backend(args: SoftmaxArgs, backend: Optional[str] = None) -> str:
    """The name of the backend that will run this masked_softmax call (raises NotSupportedError if none)."""
    return _choose("masked_softmax", args, backend)


def choose_kvcache_backend(args, backend: Optional[str] = None) -> str:
    """The backend that will run this attention_with_kvcache call (args: kvcache_contract.KVCacheArgs)."""
    return _choose("KV-cache attention", args, backend)


def kvcache_not_supported_reasons(args) -> dict:
    """Each backend's reasons for not taking these attention_with_kvcache inputs (an empty list: supported)."""
    return {name: BACKENDS[name].kvcache_reasons(args) for name in AUTO_ORDER}

def choose_varlen_backend(args, backend: Optional[str] = None) -> str:
    """The name of the backend that will run this varlen_attention call (``args``: varlen_contract.VarlenArgs;
    raises NotSupportedError if none)."""
    return _choose("varlen attention", args, backend)


def varlen_not_supported_reasons(args) -> dict:
    """Each backend's reasons for not taking these varlen_attention inputs (an empty list: supported)."""
    return {name: BACKENDS[name].varlen_reasons(args) for name in AUTO_ORDER}


def attention_not_supported_reasons(args: AttentionArgs) -> dict:
    """Each backend's reasons for not taking these inputs (an empty list: supported)."""
    return {name: BACKENDS[name].attention_reasons(args) for name in AUTO_ORDER}
