"""The attention correctness check shared by the backend tests (tests/test_attention.py: "triton",
tests/test_cuda_backend.py: "cuda", on a GPU or through the CPU emulation).

``check_attention`` runs ``llmkernels.scaled_dot_product_attention(..., backend=backend)`` and the float64 einsum
reference on the same leaves, and asserts the tolerance rule of tests/tolerance.py (at most twice the error of
the same reference computed naively in the input dtype) on the output, the lse and every input gradient (q, k, v
and a float mask's); the gradient also flows in through lse. With dropout, the rng_state the op draws is captured
(by wrapping ``ops._new_rng_state``) and the backend's ``keep_mask`` regenerates the keep pattern the kernels
used, which the reference is then given.

The variant tests (tests/test_variants_triton.py, tests/test_variants_cuda.py, tests/test_variants_reference.py)
use the same check for their backend: ``hidden_keys`` fills keys the score rule hides with NaN in our op's K and
V only, so a kernel that reads them fails the rule while the references see the clean values.
"""

import torch

import llmkernels
from llmkernels import ops, reference
from llmkernels.triton_kernels import attention as triton_attention
from tolerance import assert_by_rule


def triton_keep_mask(rng_state, shape, dropout_p, device):
    """The Triton kernels' dropout keep pattern of the (B, Hq, L, S) scores for an rng_state: check_attention's
    ``keep_mask`` for backend "triton"."""
    return triton_attention.dropout_keep_mask(rng_state, *shape, dropout_p, device)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _grads(out, lse, inputs, grad_out, grad_lse):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = torch.autograd.grad([out, lse], wanted, [grad_out.to(out.dtype), grad_lse.to(lse.dtype)])
    return list(grads)


def check_attention(backend, keep_mask, q, k, v, mask=None, *, is_causal=False, scale=None, enable_gqa=False,
                    dropout_p=0.0, grad_out=None, mask_grad=True, lse_grad=True, seed=0, sinks=None, hidden_keys=None,
                    deterministic=None, **variant):
    """Run ours (``backend``) and the references on the same leaves; assert the tolerance rule on everything.

    q, k, v in the test dtype; ``mask`` a broadcastable bool/float mask (a float mask gets a gradient when
    ``mask_grad``). ``keep_mask(rng_state, shape, dropout_p, device)`` returns the backend's dropout keep pattern
    (True = keep) of the (B, Hq, L, S) scores for the rng_state our op drew; it is called only with dropout.
    ``grad_out`` is the output's gradient (random when None); ``lse_grad=False`` makes lse's gradient 0 (for
    rows at finfo.min, where the references' own lse gradient is off: torch.logsumexp's backward takes
    exp(x - lse), and lse = m + log(l) rounds to m there, even in float64). Returns (out, lse, [dq, dk, dv(, dmask)
    (, dsinks)]); the tensors our op was called with are left in ``check_attention.last_inputs`` (for the no-copy
    tests). The variants (``window_size``, ``causal_alignment``, ``softcap``, ``alibi_slopes`` float32, ``sinks``,
    a leaf whose gradient is checked too) go to both sides; the float64 reference takes float64 slopes.
    ``hidden_keys``: a slice of key positions set to NaN in the K and V our op gets (keys the rule hides from every
    query, which the kernels must skip; the references get the clean values, which do not change the result).
    ``deterministic`` goes to our op only (which backward the Triton backend runs).
    """
    dtype, device = q.dtype, q.device
    gen = torch.Generator().manual_seed(seed + 1)
    float_mask = mask is not None and mask.dtype != torch.bool
    mask_leaf = mask_grad and float_mask

    ours_k, ours_v = k, v
    if hidden_keys is not None:
        ours_k, ours_v = k.clone(), v.clone()
        ours_k[..., hidden_keys, :] = float("nan")
        ours_v[..., hidden_keys, :] = float("nan")
    ours_in = [leaf(q), leaf(ours_k), leaf(ours_v), leaf(mask) if mask_leaf else mask,
               leaf(sinks) if sinks is not None else None]
    drawn = {}
    original = ops._new_rng_state

    def capture(dev):
        drawn["state"] = original(dev)
        return drawn["state"]

    ops._new_rng_state = capture
    try:
        out, lse = llmkernels.scaled_dot_product_attention(*ours_in[:4], dropout_p=dropout_p, is_causal=is_causal,
                                                           scale=scale, enable_gqa=enable_gqa, return_lse=True,
                                                           backend=backend, sinks=ours_in[4],
                                                           deterministic=deterministic, **variant)
    finally:
        ops._new_rng_state = original
    dropout_mask = None
    if dropout_p > 0.0:
        B, Hq, L = out.shape[:3]
        dropout_mask = keep_mask(drawn["state"], (B, Hq, L, k.shape[-2]), dropout_p, device)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=gen).to(device)
    grad_lse = torch.randn(lse.shape, generator=gen).to(device)
    if not lse_grad:
        grad_lse = torch.zeros_like(grad_lse)
    ours_grads = _grads(out, lse, ours_in, grad_out, grad_lse)

    def run_reference(cast, compute_dtype):
        ins = [leaf(t.to(cast)) for t in (q, k, v)] + [
            (leaf(mask.to(torch.float64 if cast == torch.float64 else mask.dtype)) if mask_leaf else mask)]
        ins.append(leaf(sinks.to(cast)) if sinks is not None else None)
        ref_variant = dict(variant)
        if variant.get("alibi_slopes") is not None and cast == torch.float64:
            ref_variant["alibi_slopes"] = variant["alibi_slopes"].to(torch.float64)
        o, l = reference.scaled_dot_product_attention(*ins[:4], dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                                      enable_gqa=enable_gqa, return_lse=True, sinks=ins[4],
                                                      dropout_mask=dropout_mask, compute_dtype=compute_dtype,
                                                      **ref_variant)
        # Rows whose lse is -inf give -inf * grad_lse terms in no loss here: gradients are taken directly.
        return o, l, _grads(o, l, ins, grad_out, grad_lse)

    ref_out, ref_lse, ref_grads = run_reference(torch.float64, torch.float64)
    naive_out, naive_lse, naive_grads = run_reference(dtype, None)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_by_rule("out", out, ref_out, naive_out, dtype)
    assert_by_rule("lse", lse, ref_lse, naive_lse, dtype)
    names = ["dq", "dk", "dv"] + (["dmask"] if mask_leaf else []) + (["dsinks"] if sinks is not None else [])
    assert len(ours_grads) == len(names) == len(ref_grads)
    for name, ours_g, ref_g, naive_g in zip(names, ours_grads, ref_grads, naive_grads):
        assert ours_g.dtype == {"dmask": mask.dtype if mask_leaf else None,
                                "dsinks": sinks.dtype if sinks is not None else None}.get(name, dtype), name
        assert_by_rule(name, ours_g, ref_g, naive_g, dtype)
    check_attention.last_inputs = ours_in
    return out, lse, ours_grads


def random_mask(kind, B, L, S, g, device, keep_fraction=0.85):
    """A random (B, 1, L, S) mask of ``kind`` from generator ``g``, broadcast over heads: None; "bool" (True on
    about ``keep_fraction`` of the keys); "float" (normal noise on those keys, -inf on the others)."""
    if kind is None:
        return None
    keep = torch.rand(B, 1, L, S, generator=g) < keep_fraction
    if kind == "bool":
        return keep.to(device)
    return torch.randn(B, 1, L, S, generator=g).masked_fill(~keep, float("-inf")).to(device)
