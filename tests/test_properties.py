"""Property-based tests: random shapes, strides, masks, dtypes and flags, both ops against the float64 reference.

Through the default dispatch, so in CI (TRITON_INTERPRET=1 on CPU) they run the Triton kernels in the
interpreter, and on a GPU the compiled kernels. Bounded for time: small sizes (odd ones included), a fixed number
of examples, ``derandomize=True`` so a CI run draws the same examples every time, and ``print_blob=True`` so a
failure prints the blob that replays it (``@reproduce_failure``).
"""


import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmkernels
from llmkernels import reference
from runnable import default_dispatch
from tolerance import assert_by_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SETTINGS = dict(deadline=None, derandomize=True, print_blob=True,
                # The only function-scoped fixture is conftest's autouse NaN poisoning, which sets global state
                # that is the same for every example; sharing it across examples is intended.
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _layout(t: torch.Tensor, kind: str, g: torch.Generator) -> torch.Tensor:
    """The same values as t (B, H, N, D), laid out as ``kind``: a view with unusual strides, not a copy of t."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "blhd":  # (B, N, H, D) storage seen through .transpose(1, 2), as models produce it
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":  # a window of a bigger buffer: offset start, padded rows and head dims
        B, H, N, D = t.shape
        big = torch.randn(B, H + 1, N + 3, D + 5, generator=g).to(t.device, t.dtype)
        view = big[:, 1:, 2:N + 2, 3:D + 3]
        view.copy_(t)
        return view
    if kind == "every_other":  # a stride-2 view along the sequence
        B, H, N, D = t.shape
        big = torch.randn(B, H, 2 * N, D, generator=g).to(t.device, t.dtype)
        view = big[:, :, ::2]
        view.copy_(t)
        return view
    raise AssertionError(kind)


@st.composite
def attention_cases(draw):
    Hkv = draw(st.integers(1, 2))
    case = dict(
        B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.integers(1, 3)),
        L=draw(st.sampled_from([1, 2, 5, 16, 17, 31])), S=draw(st.sampled_from([1, 3, 16, 19, 33])),
        E=draw(st.sampled_from([1, 4, 8, 16, 24, 33])), dtype=draw(st.sampled_from(DTYPES)),
        causal=draw(st.booleans()), mask=draw(st.sampled_from([None, "bool", "float", "float_grad"])),
        mask_shape=draw(st.sampled_from(["LS", "B11S", "1HLS", "BHLS"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.5))),
        layouts=[draw(st.sampled_from(["contiguous", "blhd", "sliced", "every_other"])) for _ in range(3)],
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    case["Ev"] = draw(st.sampled_from([case["E"], 8, 5]))
    return case


def _mask(case, g):
    B, Hq, L, S = case["B"], case["Hq"], case["L"], case["S"]
    shape = {"LS": (L, S), "B11S": (B, 1, 1, S), "1HLS": (1, Hq, L, S), "BHLS": (B, Hq, L, S)}[case["mask_shape"]]
    if case["mask"] == "bool":
        return torch.rand(shape, generator=g) > 0.25  # some rows may end up fully masked: they must give 0
    m = torch.randn(shape, generator=g)
    m = m.masked_fill(torch.rand(shape, generator=g) < 0.2, float("-inf"))
    return m


@settings(max_examples=25, **SETTINGS)
@given(case=attention_cases())
def test_attention_matches_float64_reference(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    B, Hq, Hkv, L, S, E, Ev = (case[k] for k in ("B", "Hq", "Hkv", "L", "S", "E", "Ev"))
    base = [torch.randn(B, Hq, L, E, generator=g), torch.randn(B, Hkv, S, E, generator=g),
            torch.randn(B, Hkv, S, Ev, generator=g)]
    mask = _mask(case, g) if case["mask"] else None
    grad_out = torch.randn(B, Hq, L, Ev, generator=g)
    wants_mask_grad = case["mask"] == "float_grad"

    def run(compute, leaf_dtype, layouts, backend_call):
        # copy=True: every run gets leaves of its own (a no-op .to() would hand back, and mark, the shared base)
        # (laid out on the device: .to(device) of a strided view would give a dense copy)
        leaves = [_layout(t.to(device, leaf_dtype, copy=True), kind, g).requires_grad_()
                  for t, kind in zip(base, layouts)]
        m = None
        if mask is not None:
            m = mask.to(device) if mask.dtype == torch.bool else mask.to(device, torch.float32, copy=True)
            if wants_mask_grad and compute == torch.float64:
                # the float64 reference takes the mask expanded, to see the per-element terms of its gradient
                m = m.double().expand(B, Hq, L, S).clone()
            if wants_mask_grad:
                m.requires_grad_()
        kw = dict(attn_mask=m, is_causal=case["causal"], scale=case["scale"], enable_gqa=True)
        out = backend_call(*leaves, kw) if compute is None else \
            reference.scaled_dot_product_attention(*leaves, **kw, compute_dtype=compute)
        out.backward(grad_out.to(device, out.dtype))
        grads = [t.grad for t in leaves] + ([m.grad] if wants_mask_grad else [])
        return [out] + grads

    with default_dispatch():
        ours = run(None, dtype, case["layouts"],
                   lambda q, k, v, kw: llmkernels.scaled_dot_product_attention(q, k, v, **kw))
    ref = run(torch.float64, torch.float64, ["contiguous"] * 3, None)
    naive = run(dtype, dtype, ["contiguous"] * 3, None)
    terms = None
    if wants_mask_grad:  # the reference's full (B, Hq, L, S) mask gradient, summed to the mask's own shape
        terms = ref[-1].abs().sum_to_size(mask.shape)
        ref[-1] = ref[-1].sum_to_size(mask.shape)
    for name, a, r, n in zip(["out", "dq", "dk", "dv", "dmask"], ours, ref, naive):
        assert a.dtype == (dtype if name != "dmask" else torch.float32), f"{name} has dtype {a.dtype}"
        if name == "dmask":  # the kernels' dS is fp32
            assert_by_rule(name, a, r, n, torch.float32, terms=terms, term_dtype=torch.float32)
        else:
            assert_by_rule(name, a, r, n, dtype)


@st.composite
def softmax_cases(draw):
    ndim = draw(st.integers(1, 4))
    # Small leading dims, then rows and columns; a long row (257) exercises the kernels' chunked path. At most a
    # few thousand elements, since the interpreter runs every element in Python-driven numpy.
    lead = [draw(st.sampled_from([1, 2, 3])) for _ in range(max(0, ndim - 2))]
    rows = [draw(st.sampled_from([1, 3, 17]))] if ndim >= 2 else []
    shape = lead + rows + [draw(st.sampled_from([1, 5, 33, 70, 257]))]
    dim = draw(st.integers(-ndim, ndim - 1))
    causal = ndim >= 2 and draw(st.booleans())
    mask = draw(st.sampled_from([None, "bool", "float", "float_grad"]))
    # the mask broadcasts: each dim kept or set to 1
    mask_shape = [s if draw(st.booleans()) else 1 for s in shape]
    return dict(shape=shape, dim=dim, causal=causal, mask=mask, mask_shape=mask_shape,
                dtype=draw(st.sampled_from(DTYPES)), scale=draw(st.floats(0.1, 3.0)),
                transposed=ndim >= 2 and draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=30, **SETTINGS)
@given(case=softmax_cases())
def test_masked_softmax_matches_float64_reference(case, device):
    g = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    x = torch.randn(case["shape"], generator=g) * 2
    grad_y = torch.randn(case["shape"], generator=g)
    mask = None
    if case["mask"] == "bool":
        mask = torch.rand(case["mask_shape"], generator=g) > 0.3
    elif case["mask"]:
        mask = torch.randn(case["mask_shape"], generator=g).masked_fill(
            torch.rand(case["mask_shape"], generator=g) < 0.2, float("-inf"))
    wants_mask_grad = case["mask"] == "float_grad"

    def run(fn, leaf_dtype, transposed):
        xl = x.to(device, leaf_dtype, copy=True)
        if transposed:  # same values, stored with the last two dims swapped
            xl = xl.transpose(-1, -2).contiguous().transpose(-1, -2)
        xl = xl.requires_grad_()
        m = None if mask is None else mask.to(device)
        if wants_mask_grad:
            m = m.to(torch.float32, copy=True)
            if leaf_dtype == torch.float64:  # expanded, to see the per-element terms of the mask's gradient
                m = m.double().expand(case["shape"]).clone()
            m.requires_grad_()
        y = fn(xl, m)
        y.backward(grad_y.to(device, y.dtype))
        return [y, xl.grad] + ([m.grad] if wants_mask_grad else [])

    kw = dict(scale=case["scale"], is_causal=case["causal"], dim=case["dim"])
    with default_dispatch("softmax"):
        ours = run(lambda t, m: llmkernels.masked_softmax(t, m, **kw), dtype, case["transposed"])
    ref = run(lambda t, m: reference.masked_softmax(t, m, **kw, compute_dtype=torch.float64), torch.float64, False)
    naive = run(lambda t, m: reference.masked_softmax(t, m, **kw), dtype, False)
    terms = None
    if wants_mask_grad:
        terms = ref[-1].abs().sum_to_size(mask.shape)
        ref[-1] = ref[-1].sum_to_size(mask.shape)
    for name, a, r, n in zip(["y", "dx", "dmask"], ours, ref, naive):
        if name == "dmask":
            # The op computes the mask's per-element gradient with its softmax backward kernel, in the input's
            # dtype, then casts to the mask's dtype: terms carry the input dtype's rounding.
            assert_by_rule(name, a, r, n, torch.float32, terms=terms, term_dtype=dtype)
        else:
            assert_by_rule(name, a, r, n, dtype)
