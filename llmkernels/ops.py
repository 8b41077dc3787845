"""The PyTorch ops: torch.library registration (fake tensors, autograd) and the public functions.

Four ops live in the ``llmkernels`` namespace, each taking the canonical form of ``contract.py`` and the name of
a concrete backend (chosen beforehand by ``dispatch.py``, so ``torch.compile`` sees a constant):

  llmkernels::sdpa_forward            -> (out, lse)
  llmkernels::sdpa_backward           -> (dq, dk, dv, dmask)
  llmkernels::masked_softmax_forward  -> y
  llmkernels::masked_softmax_backward -> dx

The backward ops are ops too, so a compiled graph keeps them opaque and ``opcheck`` can test them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import contract, dispatch

# ----------------------------------------------------------------------------------------------------------------
# attention


def _rule(window_left: int, window_right: int, bottom_right: bool, softcap: float, alibi_slopes: Optional[Tensor],
          sinks: Optional[Tensor]) -> contract.ScoreRule:
    return contract.ScoreRule(window_left, window_right, bottom_right, softcap, alibi_slopes, sinks)


@torch.library.custom_op("llmkernels::sdpa_forward", mutates_args=())
def sdpa_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                 scale: float, rng_state: Optional[Tensor], window_left: int, window_right: int, bottom_right: bool,
                 softcap: float, alibi_slopes: Optional[Tensor], sinks: Optional[Tensor],
                 backend: str, deterministic: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """The score rule's fields (contract.ScoreRule) travel as plain arguments so that the schema, fake tensors and
    torch.compile see them; the backend receives them again as one ScoreRule. ``deterministic`` does nothing
    here: the forward keeps it (autograd's context) for the backward, see scaled_dot_product_attention."""
    rule = _rule(window_left, window_right, bottom_right, softcap, alibi_slopes, sinks)
    return dispatch.get_backend(backend).attention_forward(q, k, v, attn_mask, dropout_p, is_causal, scale,
                                                           rng_state, rule)


@sdpa_forward.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, rng_state, window_left, window_right, bottom_right, softcap,
      alibi_slopes, sinks, backend, deterministic=None):
    B, Hq, L, _ = q.shape
    out = q.new_empty(B, Hq, L, v.shape[-1])
    lse = q.new_empty(B, Hq, L, dtype=torch.float32)
    return out, lse


@torch.library.custom_op("llmkernels::sdpa_backward", mutates_args=())
def sdpa_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  grad_lse: Optional[Tensor], attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool,
                  scale: float, rng_state: Optional[Tensor], window_left: int, window_right: int, bottom_right: bool,
                  softcap: float, alibi_slopes: Optional[Tensor], sinks: Optional[Tensor], mask_needs_grad: bool,
                  backend: str, deterministic: Optional[bool] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dmask is the gradient of the (expanded) float mask when mask_needs_grad, else an empty tensor. The sinks'
    gradient is not computed here (see _sinks_grad): the backends need sinks only through the forward's lse."""
    rule = _rule(window_left, window_right, bottom_right, softcap, alibi_slopes, sinks)
    dq, dk, dv, dmask = dispatch.get_backend(backend).attention_backward(
        grad_out, q, k, v, out, lse, grad_lse, attn_mask, dropout_p, is_causal, scale, rng_state, mask_needs_grad,
        rule, deterministic)
    if mask_needs_grad:
        dmask = dmask.to(attn_mask.dtype)
    else:
        dmask = q.new_empty(0)
    return dq, dk, dv, dmask


@sdpa_backward.register_fake
def _(grad_out, q, k, v, out, lse, grad_lse, attn_mask, dropout_p, is_causal, scale, rng_state, window_left,
      window_right, bottom_right, softcap, alibi_slopes, sinks, mask_needs_grad, backend, deterministic=None):
    dmask = attn_mask.new_empty(attn_mask.shape) if mask_needs_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _sinks_grad(sinks: Tensor, out: Tensor, lse: Tensor, grad_out: Optional[Tensor],
                grad_lse: Optional[Tensor]) -> Tensor:
    """d sink[h] = -sum_{b,i} exp(sink[h] - lse[b,h,i]) * (rowsum(dO * O)[b,h,i] - grad_lse[b,h,i]).

    Each key weight is P = exp(s - lse) with lse the log of the whole denominator, so dP/dsink = -P exp(sink - lse),
    hence dO/dsink = -exp(sink - lse) O (dropout included, as O is the dropped output) and dlse/dsink =
    exp(sink - lse). Rows that see no key have O = 0 and lse = sink: only their grad_lse counts. In float32
    (float64 for float64 sinks), returned in sinks' dtype."""
    wdt = torch.float64 if sinks.dtype == torch.float64 else torch.float32
    B, Hq, L = lse.shape
    term = torch.zeros(B, Hq, L, dtype=wdt, device=lse.device)
    if grad_out is not None:
        term = term + (grad_out.to(wdt) * out.to(wdt)).sum(dim=-1)
    if grad_lse is not None:
        term = term - grad_lse.to(wdt)
    weight = torch.exp(sinks.to(wdt).view(1, Hq, 1) - lse.to(wdt))
    return (-(weight * term).sum(dim=(0, 2))).to(sinks.dtype)


def _sdpa_setup_context(ctx, inputs, output):
    (q, k, v, attn_mask, dropout_p, is_causal, scale, rng_state, window_left, window_right, bottom_right, softcap,
     alibi_slopes, sinks, backend, *rest) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng_state, alibi_slopes, sinks)
    ctx.args = (dropout_p, is_causal, scale, window_left, window_right, bottom_right, softcap, backend)
    ctx.deterministic = rest[0] if rest else None


def _sdpa_backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, rng_state, alibi_slopes, sinks = ctx.saved_tensors
    dropout_p, is_causal, scale, window_left, window_right, bottom_right, softcap, backend = ctx.args
    mask_needs_grad = attn_mask is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dmask = sdpa_backward(grad_out, q, k, v, out, lse, grad_lse, attn_mask, dropout_p, is_causal, scale,
                                      rng_state, window_left, window_right, bottom_right, softcap, alibi_slopes,
                                      sinks, mask_needs_grad, backend, ctx.deterministic)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[13]:
        dsinks = _sinks_grad(sinks, out, lse, grad_out, grad_lse)
    grads = (dq, dk, dv, (dmask if mask_needs_grad else None), None, None, None, None, None, None, None, None, None,
             dsinks, None)
    # One gradient per forward input: the op's inputs include ``deterministic`` (filled with its default).
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


sdpa_forward.register_autograd(_sdpa_backward_rule, setup_context=_sdpa_setup_context)


def _new_rng_state(device: torch.device) -> Tensor:
    """[seed, offset] for the Philox dropout stream, drawn from PyTorch's generator (so torch.manual_seed
    reproduces it) on the tensors' device; the backward regenerates the mask from it."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _tie_zero_grad(out: Tensor, t: Optional[Tensor]) -> Tensor:
    """out + (sum of an empty slice of t): the same values, and t gets a zero gradient of its own shape."""
    if t is None or not t.requires_grad:
        return out
    empty = t.narrow(-1, 0, 0) if t.dim() > 0 else t.reshape(1).narrow(0, 0, 0)
    return out + empty.sum().to(out.dtype)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, return_lse=False, window_size=(-1, -1), causal_alignment=None,
                                 softcap=0.0, alibi_slopes=None, sinks=None, backend=None, deterministic=None):
    """Fused attention, a drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes: query ``(..., Hq, L, E)``, key ``(..., Hk, S, E)``, value ``(..., Hv, S, Ev)``; the output is
    ``(..., H, L, Ev)`` in the inputs' dtype (fp16, bf16 or fp32). As in PyTorch, every dim before ``(L, E)``
    broadcasts as in a matmul: the inputs may have different numbers of leading dims (query ``(4, 3, 8)`` with
    key/value ``(4, 4, 6, 8)``), and a head count of 1 broadcasts against the others' (``H`` is the common
    count). Broadcast dims are read as stride-0 views, never copied, and the gradients come back in each input's
    own shape. Any strides: the ``(B, L, H, E)`` layout passed as ``.transpose(1, 2)`` views runs without a copy.

    attn_mask: bool (True = attend) or float (added to the scaled scores, ``-inf`` allowed), broadcastable to
        ``(..., H, L, S)``; read through its strides, never expanded in memory. A float mask that requires
        grad gets its gradient (summed over broadcast dims). Or a ``torch.nn.attention.bias.CausalBias``
        (``causal_upper_left(L, S)`` / ``causal_lower_right(L, S)``): computed as ``is_causal=True`` with
        that alignment, never materialised; its L and S must match the inputs', ``is_causal=True`` must not
        be passed with it (as in PyTorch), and an explicit ``causal_alignment`` must agree with it.
    dropout_p: dropout on the attention weights whenever > 0 (as PyTorch: it does not look at ``training``),
        in ``[0, 1]``. ``dropout_p=1.0`` drops every weight, as PyTorch: the output is zeros (times the
        attention output, so a NaN there still shows), every input gets a zero gradient of its own shape, and
        the lse (dropout acts after the softmax) is still that of the scores, and differentiable.
    is_causal: query ``i`` attends to keys ``j <= i + d``, ``d`` the diagonal offset of ``causal_alignment``
        (0 by default: top-left, as PyTorch, also when ``L != S``).
    scale: defaults to ``1 / sqrt(E)``; a real number or a 0-d tensor (not one that requires grad: the scale
        is a constant here, with no gradient), finite.
    enable_gqa: grouped-query attention, PyTorch's rule: ``Hq`` must be a multiple of both ``Hk`` and ``Hv``;
        query head ``h`` uses key head ``h // (Hq // Hk)`` and value head ``h // (Hq // Hv)``.
    return_lse: also return the float32 natural-log log-sum-exp of the scaled, masked scores, shape
        ``(..., H, L)``, so partial attentions over key blocks can be merged exactly. Differentiable.
    backend: ``"triton"``, ``"cuda"``, ``"reference"`` or ``"auto"`` (the default: the fastest backend that
        supports the inputs). See ``llmkernels.use_backend`` and the ``LLMKERNELS_BACKEND`` variable.
    deterministic: which backward the Triton backend runs. ``None`` (the default) follows
        ``torch.are_deterministic_algorithms_enabled()`` when the backward runs on a GPU (in Triton's interpreter
        it takes the deterministic backward); ``True`` forces the
        deterministic separate-pass backward (dK/dV and dQ in their own kernels, every element summed in a fixed
        order; it recomputes Q K^T and dO V^T for dQ: 7 matrix products per tile pair); ``False`` allows the
        fused backward (5 products per tile pair), which adds each key block's part of dQ into an fp32
        workspace of ``B * Hq * L * E`` floats with atomic adds, so dQ's fp32 summation order, and with it
        dQ's last bits, change from run to run (dK, dV do not). Calls the fused kernel does not cover (a float
        mask that needs its gradient; on a GPU, fp32 and head dims above 128, which have no spill-free fused
        config) take the deterministic backward whatever the flag. The reference backend
        is deterministic; the CUDA backend ignores the flag and adds dQ with fp32 atomics (not bitwise
        repeatable).

    Attention variants (keyword-only, all off by default). They apply to the score of query ``i`` and key ``j``
    in this order: ``s = scale * q_i . k_j``; the softcap; ALiBi; the float mask is added; the bool mask,
    ``is_causal`` and the window hide keys; the softmax, with the sinks in its denominator.

    window_size: ``(left, right)``, a tuple or list of two ints >= -1; -1 leaves that side unbounded.
        Inclusive: query ``i`` may attend key ``j`` iff ``i + d - left <= j <= i + d + right``. ``(-1, 0)`` is
        causal, and ``is_causal=True`` is the same as ``right = 0`` (with it, or with a ``CausalBias``, a
        right side of -1 or 0 is fine and one > 0 is an error). ``(W, 0)`` covers ``W + 1`` keys: a window of
        ``W`` keys in transformers' sense (Mistral's ``sliding_window=W``) is ``(W - 1, 0)``.
    causal_alignment: ``None``, ``"top_left"`` (``d = 0``, PyTorch's ``is_causal``; what ``None`` means
        unless a ``CausalBias`` mask says otherwise) or ``"bottom_right"`` (``d = S - L``, FlashAttention's:
        the last query sees the last key). It applies to ``is_causal``, ``window_size`` and ALiBi alike.
    softcap: when > 0, each scaled score ``s`` becomes ``softcap * tanh(s / softcap)`` before any mask,
        window or bias: a float ``attn_mask`` and ALiBi are added to the capped score, and hidden keys stay
        hidden. A finite real >= 0; 0 is off.
    alibi_slopes: a float32 tensor of shape ``(H,)`` or the query's batch dims followed by ``H`` (``(B, H)``
        for 4-D inputs; size-1 dims broadcast), on the inputs' device, not requiring grad (the slopes are
        constants); adds ``-slope * |i + d - j|`` to the capped score. The returned lse is the true
        log-sum-exp of the biased scores (FlashAttention-2's ALiBi adds ``+slope * j`` under causal, which gives
        the same output but a per-row shifted lse; this one merges exactly across key blocks).
    sinks: attention sinks (GPT-OSS's ``s_aux``), a tensor of shape ``(H,)``, float32 or the inputs' dtype: one
        logit per head that joins every row's softmax denominator without a value, so the weights are
        ``exp(s_j) / (exp(sinks[h]) + sum_k exp(s_k))``. Differentiable: its gradient is summed over the batch
        and the rows. The returned lse includes the sink term (the log of the whole denominator).
    Rows that see no key (bottom-right with ``L > S``, a window that misses every key, with a mask) give output
    0, gradient 0 and lse ``-inf``; with sinks their denominator is the sink alone: output 0 and lse equal to
    the sink logit.

    Where this deliberately accepts more than PyTorch's function:
      * ``attn_mask`` together with ``is_causal=True``: both apply (the causal rule hides ``j > i``, the mask
        hides or shifts the rest); PyTorch raises for this combination.
      * a float ``attn_mask`` of any float dtype, whatever the query's (a float64 or bf16 mask with fp32
        inputs, an fp16 mask with bf16 inputs): it is added in fp32 without first rounding it to the query's
        dtype. PyTorch takes only a float32 mask or one of the query's dtype.
      * a mask broadcastable to the output's batch and head dims when only ``value`` has them (query and key
        with 1 head, value with 2); PyTorch's math path requires the mask to fit the weights of query and key.

    Rows with every key masked give output 0, gradient 0 and lse ``-inf``. With no keys at all (``S == 0``)
    every row is such a row: output 0, even where ``query`` holds NaN or inf (PyTorch's math path returns NaN in
    every row then, from any non-finite element of ``query``). Empty inputs (``L == 0``, batch 0) give empty
    outputs; every input gets a zero gradient of its own shape, as from PyTorch.

    NaN or inf in query, key or value propagate as in PyTorch's math path wherever they enter an unmasked score
    or a value with non-zero weight. Masked positions are not read: a NaN score there does not spread over the row
    (PyTorch's math path adds the mask to it and gets NaN; its fused kernels, like ours, do not).

    Nested tensors: query, key and value may be PyTorch nested tensors with the jagged layout, ``(B, H, j, E)``
    (a ``torch.nested.nested_tensor(..., layout=torch.jagged)`` of ``(j, H, E)`` sequences, transposed), as for
    PyTorch's SDPA: they run on ``varlen_attention`` over the packed values and offsets, and the output is a
    jagged nested tensor ``(B, H, j, Ev)`` (the lse ``(B, H, j)``), differentiable. No ``attn_mask`` and no
    ``sinks`` there; ``is_causal``, ``window_size`` and ALiBi need equal query and key lengths per sequence unless
    ``causal_alignment="bottom_right"``. See ``llmkernels/nested.py``.

    Determinism: to get bitwise-identical forward and backward results run to run, keep the inputs, backend and
    device fixed, call ``torch.manual_seed(...)`` before each run when ``dropout_p > 0`` (the dropout seed is
    drawn from PyTorch's generator), and set ``torch.use_deterministic_algorithms(True)`` (which also makes the
    surrounding PyTorch ops deterministic). The Triton backward sums every output element in one program in a
    fixed order, with no atomics, when ``deterministic`` is True or (the default None) the flag is set
    (``tests/test_determinism.py`` checks it). The GPU autotuner chooses tile sizes once per process and input bucket; results are identical
    within a process, and across processes when the same config is chosen.
    """
    if any(isinstance(t, Tensor) and t.is_nested for t in (query, key, value, attn_mask)):
        # Jagged nested tensors (B, H, j, E) run on varlen_attention (llmkernels/nested.py). Imported here:
        # nested -> varlen -> ops at module level.
        from .nested import nested_attention
        return nested_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                return_lse=return_lse, window_size=window_size, causal_alignment=causal_alignment,
                                softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, backend=backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be None or a bool, got {type(deterministic).__name__}")
    a = contract.check_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                 window_size=window_size, causal_alignment=causal_alignment, softcap=softcap,
                                 alibi_slopes=alibi_slopes, sinks=sinks)
    name = dispatch.choose_attention_backend(a, backend)
    rule = a.rule
    B, Hq, L, _ = a.q.shape
    S = a.k.shape[2]
    if B * Hq * L == 0 or S == 0:
        # Nothing to attend over (or nobody asking): every row is "fully masked" -> zeros, lse -inf (PyTorch's
        # math path gives the same zeros for finite q: an empty softmax times an empty V). No kernel runs. Each
        # input that requires grad is tied in through an empty slice (its sum is exactly 0, so a NaN in q does
        # not turn the zeros into NaN), and so gets a zero gradient of its own shape, as from PyTorch, not None.
        out = a.q.new_zeros(B, Hq, L, a.v.shape[-1])
        for t in (query, key, value, a.mask, rule.sinks):
            out = _tie_zero_grad(out, t)
        if rule.sinks is None:
            lse = a.q.new_full((B, Hq, L), float("-inf"), dtype=torch.float32)
        else:
            # The denominator is the sink alone: lse = sink, whose gradient (the sum of grad_lse over the batch
            # and the rows, as _sinks_grad gives where O = 0) autograd derives from this expression.
            lse = rule.sinks.to(torch.float32).view(1, Hq, 1).expand(B, Hq, L)
    else:
        # dropout_p = 1 drops every weight after the softmax: run without dropout (so the lse and its gradient
        # are the scores' own), then scale the output by 0. Like PyTorch's dropout (which multiplies the weights
        # by 0) this keeps NaN and inf visible instead of writing plain zeros over them, and the backward gets
        # a zero output gradient, so q, k and v receive zero gradients (plus the lse's, when it is used).
        drop_all = a.dropout_p == 1.0
        p = 0.0 if drop_all else a.dropout_p
        rng_state = _new_rng_state(a.q.device) if p > 0.0 else None
        out, lse = sdpa_forward(a.q, a.k, a.v, a.mask, p, a.is_causal, a.scale, rng_state, rule.window_left,
                                rule.window_right, rule.bottom_right, rule.softcap, rule.alibi_slopes, rule.sinks,
                                name, deterministic)
        if drop_all:
            out = out * 0
    out = out.reshape(a.out_shape)
    if return_lse:
        return out, lse.reshape(a.out_shape[:-1])
    return out


# ----------------------------------------------------------------------------------------------------------------
# masked softmax


@torch.library.custom_op("llmkernels::masked_softmax_forward", mutates_args=())
def masked_softmax_forward(x: Tensor, mask: Optional[Tensor], scale: float, is_causal: bool,
                           backend: str) -> Tensor:
    return dispatch.get_backend(backend).softmax_forward(x, mask, scale, is_causal)


@masked_softmax_forward.register_fake
def _(x, mask, scale, is_causal, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("llmkernels::masked_softmax_backward", mutates_args=())
def masked_softmax_backward(grad_y: Tensor, y: Tensor, scale: float, backend: str) -> Tensor:
    return dispatch.get_backend(backend).softmax_backward(grad_y, y, scale)


@masked_softmax_backward.register_fake
def _(grad_y, y, scale, backend):
    return y.new_empty(y.shape)


def _softmax_setup_context(ctx, inputs, output):
    x, mask, scale, is_causal, backend = inputs
    ctx.save_for_backward(output)
    ctx.scale, ctx.backend = scale, backend
    ctx.mask_dtype = None if mask is None else mask.dtype


def _softmax_backward_rule(ctx, grad_y):
    (y,) = ctx.saved_tensors
    dx = masked_softmax_backward(grad_y, y, ctx.scale, ctx.backend)
    dmask = None
    if ctx.needs_input_grad[1]:
        # d(softmax(scale * x + mask)) / d mask is the gradient of the logits: the same kernel with scale 1,
        # fed in fp32 so that a float32 mask's gradient (summed over its broadcast dims by autograd) is not
        # rounded to a half-precision input's dtype first.
        dmask = masked_softmax_backward(grad_y.float(), y.float(), 1.0, ctx.backend).to(ctx.mask_dtype)
    return dx, dmask, None, None, None


masked_softmax_forward.register_autograd(_softmax_backward_rule, setup_context=_softmax_setup_context)


def masked_softmax(input, mask=None, *, scale=1.0, is_causal=False, dim=-1, backend=None):
    """Fused ``softmax(scale * input + mask)`` along ``dim``, forward and backward.

    mask: bool (True = keep) or float (added, ``-inf`` allowed), broadcastable to ``input``; read through its
        strides, never expanded in memory. A float mask that requires grad gets its gradient.
    is_causal: hides column ``j > i`` of the last two dims ``(..., Sq, Sk)`` (top-left, as the attention op);
        combines with ``mask``.
    dim: any dim. A non-last dim is handled as a transposed view, which the kernels read through its strides
        (uncoalesced, so slower than a last-dim softmax); with ``is_causal`` it also materialises the causal
        pattern as a bool (Sq, Sk) mask.
    Rows with nothing left give 0 and gradient 0. fp16, bf16, fp32 input, fp32 arithmetic, output in the input
    dtype. Rows of any length (one pass on chip when the row fits, an online softmax beyond).
    """
    a = contract.check_masked_softmax(input, mask, scale, is_causal, dim)
    name = dispatch.choose_softmax_backend(a, backend)
    if a.x.numel() == 0:
        # Nothing to normalise: an empty result; input and a float mask that require grad get zero gradients.
        y = _tie_zero_grad(_tie_zero_grad(a.x.new_empty(a.x.shape), input), mask)
    else:
        y = masked_softmax_forward(a.x, a.mask, a.scale, a.is_causal, name)
    y = y.reshape(a.work_shape)
    if a.moved:
        y = y.movedim(-1, a.dim)
    return y.reshape(input.shape)
