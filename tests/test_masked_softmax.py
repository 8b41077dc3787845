"""The Triton masked softmax (``llmkernels.masked_softmax(..., backend="triton")``), forward and gradients.

Every case is compared with the float64 reference under the tolerance rule (``tests/tolerance.py``): at most twice
the error of the same reference computed naively in the input dtype, plus a small floor. Outputs and gradients
start as NaN (autouse poison fixture), so an element a kernel forgets to write fails the comparison.

Without a GPU the kernels run in Triton's interpreter. Its on-chip limit is ``INTERPRET_ON_CHIP_MAX_N`` (2048):
rows up to 1000 take the on-chip kernel, a 70,000-column row the online one; the ``online_path`` fixture lowers
the limits so that short, odd rows also go through the online kernel, in one launch and in column chunks.
"""

import math

import pytest
import torch

import llmkernels
from llmkernels import reference
from llmkernels.triton_kernels import softmax as sm
from tolerance import FLOOR, assert_by_rule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")


def _randn(shape, gen, device, dtype=torch.float32, std=1.0):
    return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)


def _float_mask(shape, gen, device, dtype, with_inf=False, p_inf=0.3):
    m = _randn(shape, gen, device, dtype)
    if with_inf:
        hide = torch.rand(shape, generator=gen).to(device) < p_inf
        m = m.masked_fill(hide, -math.inf)
    return m


def _bool_mask(shape, gen, device, p_keep=0.7):
    return (torch.rand(shape, generator=gen) < p_keep).to(device)


def check(x, mask=None, *, scale=1.0, is_causal=False, dim=-1, seed=0):
    """Run the Triton op forward and backward and assert y, dx (and a float mask's gradient) by the rule.

    Returns (y, dx, dmask) from the Triton backend for extra, case-specific assertions.
    """
    dtype = x.dtype
    gen = torch.Generator().manual_seed(seed + 1)
    mask_grad = mask is not None and mask.dtype != torch.bool

    def run(xi, mi, compute_dtype=None, backend=None):
        # detach() keeps the storage and strides (clone() would make expanded or sliced views contiguous)
        xi = xi.detach().requires_grad_()
        if mask_grad:
            mi = mi.detach().requires_grad_()
        if backend:
            y = llmkernels.masked_softmax(xi, mi, scale=scale, is_causal=is_causal, dim=dim, backend=backend)
        else:
            y = reference.masked_softmax(xi, mi, scale=scale, is_causal=is_causal, dim=dim,
                                         compute_dtype=compute_dtype)
        return y, xi, mi

    y, xt, mt = run(x, mask, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    g = _randn(y.shape, gen, x.device, dtype)
    inputs = [xt] + ([mt] if mask_grad else [])
    grads = torch.autograd.grad(y, inputs, g)

    m64 = mask.double() if mask_grad else mask
    y64, x64, mm64 = run(x.double(), m64, compute_dtype=torch.float64)
    grads64 = torch.autograd.grad(y64, [x64] + ([mm64] if mask_grad else []), g.double())
    yn, xn, mn = run(x, mask)  # the naive computation: the same reference in the input dtype
    gradsn = torch.autograd.grad(yn, [xn] + ([mn] if mask_grad else []), g)

    assert_by_rule("y", y, y64, yn, dtype)
    assert_by_rule("dx", grads[0], grads64[0], gradsn[0], dtype)
    dmask = None
    if mask_grad:
        dmask = grads[1]
        assert dmask.shape == mask.shape and dmask.dtype == mask.dtype
        assert_by_rule("dmask", dmask, grads64[1], gradsn[1], mask.dtype)
    return y.detach(), grads[0], dmask


@pytest.fixture
def online_path(monkeypatch):
    """Send every row longer than 64 columns through the online kernel, 32 columns per block, so that short odd
    rows cover it; with the interpreter's 2 pretend SMs, fewer than 8 rows are cut into column chunks."""
    for name in ("INTERPRET_ON_CHIP_MAX_N", "ON_CHIP_MAX_N"):
        monkeypatch.setattr(sm, name, 64)
    for name in ("INTERPRET_LONG_BLOCK_N", "LONG_BLOCK_N"):
        monkeypatch.setattr(sm, name, 32)


# ----------------------------------------------------------------------------------------------------------------
# row lengths and dtypes (on chip)


@pytest.mark.parametrize("n", [1, 3, 16, 127, 129, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_row_lengths(device, dtype, n):
    gen = torch.Generator().manual_seed(n)
    x = _randn((2, 3, 5, n), gen, device, dtype, std=2.0)
    mask = _float_mask((5, n), gen, device, dtype)
    assert sm.plan_rows(n, 30, x.device).on_chip
    check(x, mask, scale=0.7, seed=n)


def test_many_short_rows_share_programs(device):
    # 1000 rows of 5 columns: several rows per program, the last program partly out of range.
    gen = torch.Generator().manual_seed(5)
    x = _randn((1, 1, 1001, 5), gen, device, torch.float16, std=3.0)
    plan = sm.plan_rows(5, 1001, x.device)
    assert plan.rows_per_program > 1 and 1001 % plan.rows_per_program != 0
    check(x, _bool_mask((1001, 5), gen, device))


# ----------------------------------------------------------------------------------------------------------------
# masks: kinds and broadcast shapes (read through their own strides)

MASK_SHAPES = [(2, 3, 7, 129), (7, 129), (1, 129), (129,), (2, 1, 7, 129), (1, 3, 1, 129), (3, 7, 1)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["bool", "float", "float_inf"])
def test_mask_kinds_and_broadcasts(device, kind, shape):
    i = MASK_SHAPES.index(shape)
    dtype = DTYPES[(i + len(kind)) % 3]
    gen = torch.Generator().manual_seed(100 + i)
    x = _randn((2, 3, 7, 129), gen, device, dtype, std=2.0)
    if kind == "bool":
        mask = _bool_mask(shape, gen, device)
    else:
        mask = _float_mask(shape, gen, device, dtype, with_inf=kind == "float_inf")
    check(x, mask, scale=0.5, is_causal=i % 2 == 1, seed=i)


def test_float_mask_in_another_dtype(device):
    gen = torch.Generator().manual_seed(7)
    x = _randn((2, 4, 9, 200), gen, device, torch.bfloat16)
    mask = _float_mask((4, 1, 200), gen, device, torch.float32, with_inf=True)
    check(x, mask, scale=1.3)


def test_kernel_reads_views_without_copies(device, monkeypatch):
    # The launcher must hand the user's storage and the mask's stride-0 view straight to the kernel.
    seen = {}
    real = sm._fwd_on_chip_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(y, x, mask_f, mask_b, *args, **kwargs):
                seen.update(x=x, mask=mask_b)
                return real[grid](y, x, mask_f, mask_b, *args, **kwargs)
            return launch

    monkeypatch.setattr(sm, "_fwd_on_chip_kernel", Spy())
    gen = torch.Generator().manual_seed(3)
    base = _randn((2, 3, 40, 33), gen, device)
    x = base.transpose(-1, -2)  # (2, 3, 33, 40), last-dim stride 33
    mask = _bool_mask((1, 40), gen, device)
    check(x, mask)  # (check passes views through unchanged)
    assert seen["x"].data_ptr() == base.data_ptr() and seen["x"].stride() == x.stride()
    assert seen["mask"].data_ptr() == mask.data_ptr() and seen["mask"].stride()[:3] == (0, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# causal


@pytest.mark.parametrize("m,n", [(33, 33), (17, 70), (70, 17), (1, 5), (9, 1)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_causal(device, dtype, m, n):
    gen = torch.Generator().manual_seed(m * 100 + n)
    x = _randn((2, 2, m, n), gen, device, dtype, std=2.0)
    mask = None if (m + n) % 2 else _bool_mask((m, n), gen, device, p_keep=0.8)
    y, _, _ = check(x, mask, scale=0.9, is_causal=True, seed=m)
    hidden = torch.ones(m, n, dtype=torch.bool, device=device).triu(1)
    assert (y[..., hidden] == 0).all(), "causally hidden columns must be exactly 0"


# ----------------------------------------------------------------------------------------------------------------
# fully masked rows, NaN, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fully_masked_rows_give_zero_and_zero_grad(device, dtype):
    gen = torch.Generator().manual_seed(11)
    x = _randn((2, 3, 6, 45), gen, device, dtype)
    keep = _bool_mask((2, 3, 6, 45), gen, device)
    keep[0, 1, 2] = False
    keep[1, :, 4] = False
    y, dx, _ = check(x, keep, scale=1.1)
    for rows in (y[0, 1, 2], y[1, :, 4], dx[0, 1, 2], dx[1, :, 4]):
        assert (rows == 0).all()
    # float mask: a row of -inf, and causal + bool mask hiding the only visible column of row 0
    add = _float_mask((6, 45), gen, device, dtype, with_inf=True)
    add[3] = -math.inf
    y, dx, dmask = check(x, add)
    assert (y[..., 3, :] == 0).all() and (dx[..., 3, :] == 0).all() and (dmask[3] == 0).all()
    keep2 = _bool_mask((6, 45), gen, device)
    keep2[0, 0] = False
    y, dx, _ = check(x, keep2, is_causal=True)
    assert (y[..., 0, :] == 0).all() and (dx[..., 0, :] == 0).all()
    assert not torch.isnan(y).any() and not torch.isnan(dx).any()


def test_nan_in_input_propagates_to_its_row(device):
    gen = torch.Generator().manual_seed(12)
    x = _randn((1, 2, 4, 77), gen, device)
    x[0, 1, 2, 30] = math.nan
    x[0, 0, 1, 5] = math.nan  # hidden by the bool mask: masked_fill replaces it, the row stays finite
    keep = torch.ones(1, 2, 4, 77, dtype=torch.bool, device=device)
    keep[0, 0, 1, 5] = False
    y, _, _ = check(x, keep)
    assert torch.isnan(y[0, 1, 2]).all()
    assert not torch.isnan(y[0, 0]).any() and not torch.isnan(y[0, 1, :2]).any()


@pytest.mark.parametrize("scale", [0.0, -1.3, 8.0])
def test_scale_values(device, scale):
    gen = torch.Generator().manual_seed(13)
    x = _randn((3, 5, 131), gen, device, torch.float16, std=2.0)
    check(x, _float_mask((5, 131), gen, device, torch.float16, with_inf=True), scale=scale)


# ----------------------------------------------------------------------------------------------------------------
# layouts: non-last dim, transposed, sliced, broadcast input, 1-d and 5-d


@pytest.mark.parametrize("dim", [0, 1, -2])
def test_non_last_dim(device, dim):
    gen = torch.Generator().manual_seed(20 + dim)
    x = _randn((6, 9, 11), gen, device, torch.float32, std=2.0)
    mask = _bool_mask((9, 11), gen, device) if dim != 0 else _float_mask((1, 11), gen, device, torch.float32)
    check(x, mask, dim=dim, is_causal=dim == -2, scale=0.8)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "broadcast", "1d", "5d"])
def test_non_contiguous_and_other_ranks(device, layout):
    gen = torch.Generator().manual_seed(30)
    dtype = torch.bfloat16 if layout in ("sliced", "1d") else torch.float16
    mask = None
    if layout == "transposed":
        x = _randn((2, 3, 130, 21), gen, device, dtype).transpose(-1, -2)
        mask = _bool_mask((2, 1, 21, 130), gen, device)
    elif layout == "sliced":
        x = _randn((3, 4, 40, 300), gen, device, dtype)[:, ::2, 1::3, 5::2]
        mask = _float_mask((1, 13, 148), gen, device, dtype, with_inf=True)
    elif layout == "broadcast":
        x = _randn((1, 1, 9, 65), gen, device, dtype).expand(2, 3, 9, 65)
        mask = _float_mask((2, 3, 9, 65), gen, device, dtype)
    elif layout == "1d":
        x = _randn((257,), gen, device, dtype)
    else:
        x = _randn((2, 2, 3, 4, 37), gen, device, dtype)
        mask = _bool_mask((3, 1, 37), gen, device)
    check(x, mask, scale=1.5, is_causal=layout in ("transposed", "5d"))


def test_backward_reads_strided_grad_and_y(device):
    # The backend's backward with a transposed grad_y and a y with broadcast dims, against the formula in fp64.
    gen = torch.Generator().manual_seed(40)
    y = torch.softmax(_randn((1, 3, 1, 100), gen, device), -1).expand(2, 3, 7, 100)
    dy = _randn((2, 3, 100, 7), gen, device).transpose(-1, -2)
    dx = sm.masked_softmax_backward(dy, y, 0.6)
    y64, dy64 = y.double(), dy.double()
    ref = 0.6 * y64 * (dy64 - (dy64 * y64).sum(-1, keepdim=True))
    assert dx.is_contiguous() and dx.dtype == torch.float32
    torch.testing.assert_close(dx.double(), ref, rtol=0, atol=FLOOR[torch.float32])


# ----------------------------------------------------------------------------------------------------------------
# long rows: the online path


@pytest.mark.parametrize("rows,dtype", [((1, 1, 3), torch.bfloat16), ((1, 2, 5), torch.float32)],
                         ids=["3rows-chunked-bf16", "10rows-onelaunch-fp32"])
def test_long_rows_online(device, rows, dtype):
    n = 70_000
    gen = torch.Generator().manual_seed(50)
    x = _randn((*rows, n), gen, device, dtype, std=3.0)
    r = math.prod(rows)
    plan = sm.plan_rows(n, r, x.device)
    assert not plan.on_chip
    if device == "cpu":  # with the interpreter's 2 pretend SMs: fewer than 8 rows are chunked
        assert (plan.n_chunks > 1) == (r < 8)
    mask = _float_mask((1, n), gen, device, dtype, with_inf=True) if r < 8 else _bool_mask((rows[-1], n), gen, device)
    check(x, mask, scale=0.6)


@pytest.mark.parametrize("n", [65, 129, 333])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_online_path_small_blocks(device, online_path, dtype, n):
    gen = torch.Generator().manual_seed(60 + n)
    few, many = (1, 1, 3, n), (2, 3, 5, n)  # chunked over columns / one launch
    for shape, kind in ((few, "float_inf"), (many, "bool")):
        x = _randn(shape, gen, device, dtype, std=2.0)
        plan = sm.plan_rows(n, math.prod(shape[:-1]), x.device)
        assert not plan.on_chip
        mask = (_float_mask(shape[-2:], gen, device, dtype, with_inf=True) if kind == "float_inf"
                else _bool_mask((shape[1], 1, n), gen, device))
        check(x, mask, scale=0.8, seed=n)


@pytest.mark.parametrize("m,n", [(70, 70), (40, 150), (100, 70)])
def test_online_path_causal_and_fully_masked(device, online_path, m, n):
    gen = torch.Generator().manual_seed(m + n)
    x = _randn((1, 1, m, n), gen, device, torch.float16, std=2.0)
    keep = _bool_mask((m, n), gen, device)
    keep[m // 2] = False  # a fully masked row
    y, dx, _ = check(x, keep, is_causal=True)
    hidden = torch.ones(m, n, dtype=torch.bool, device=device).triu(1)
    assert (y[..., hidden] == 0).all() and (y[..., m // 2, :] == 0).all() and (dx[..., m // 2, :] == 0).all()
    add = _float_mask((m, n), gen, device, torch.float16, with_inf=True)
    add[m // 3] = -math.inf
    y, dx, dmask = check(x, add, is_causal=True, scale=1.2)
    assert (y[..., m // 3, :] == 0).all() and (dmask[m // 3] == 0).all()


def test_online_path_nan_propagates(device, online_path):
    gen = torch.Generator().manual_seed(70)
    x = _randn((1, 1, 2, 300), gen, device)
    x[0, 0, 1, 250] = math.nan  # in the last chunk of row 1
    y, _, _ = check(x)
    assert torch.isnan(y[0, 0, 1]).all() and not torch.isnan(y[0, 0, 0]).any()


# ----------------------------------------------------------------------------------------------------------------
# launch plans and compile specs (no kernel runs)


def test_plan_chunks_cover_each_row(monkeypatch):
    monkeypatch.setattr(sm, "triton_interpreting", lambda: False)
    monkeypatch.setattr(sm, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    for n in (16385, 70_000, 1_000_000, 3_000_001):
        for r in (1, 7, 64, 528, 10_000):
            p = sm.plan_rows(n, r, cpu)
            assert not p.on_chip and p.block_n == sm.LONG_BLOCK_N and p.chunk_cols % p.block_n == 0
            assert 1 <= p.n_chunks <= sm.MAX_CHUNKS
            assert (p.n_chunks - 1) * p.chunk_cols < n <= p.n_chunks * p.chunk_cols
            if r >= 4 * 132:
                assert p.n_chunks == 1  # enough rows: one launch, the second read from L2
    assert sm.plan_rows(1_000_000, 1, cpu).n_chunks >= 64  # one huge row still spreads over the GPU
    for n in (1, 15, 16, 17, 1000, 1024, 1025, 16384):
        p = sm.plan_rows(n, 100, cpu)
        assert p.on_chip and p.block_n >= n and p.block_n in sm.ON_CHIP_TABLES[90]


@pytest.mark.parametrize("arch", [80, 90])
def test_compile_specs_list_every_plan(arch):
    specs = sm.compile_specs(arch)
    names = {s.name for s in specs}
    assert len(names) == len(specs), "spec names must be unique"
    for dt in ("float16", "bfloat16", "float32"):
        for block_n, (rows, warps, _) in sm.ON_CHIP_TABLES[arch].items():
            for direction in ("fwd", "bwd"):
                assert f"softmax_{direction}_onchip_{dt}_n{block_n}_r{rows}_w{warps}" in names
        for direction in ("fwd", "bwd"):
            assert f"softmax_{direction}_long_{dt}_n{sm.LONG_BLOCK_N}_w{sm.LONG_NUM_WARPS}" in names
    for s in specs:  # every kernel parameter is typed, as the compiler needs
        assert list(s.signature) == [name for name, _ in sm._params(s.fn)], s.name
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs), s.name


# ----------------------------------------------------------------------------------------------------------------
# float masks at finfo(dtype).min (transformers' additive masks): added as they are, so a row whose every entry
# carries finfo.min is uniform (as in PyTorch), not "fully masked"; no overflow warning from the interpreter.


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("path", ["on_chip", "online", "online_chunked"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_float_mask_at_finfo_min(device, request, dtype, path):
    if path != "on_chip":
        request.getfixturevalue("online_path")  # blocks of 32 columns; fewer than 8 rows are cut into chunks
    M, N = 7, (130 if path == "online_chunked" else 70)
    gen = torch.Generator().manual_seed(41)
    x = _randn((1, 1 if path == "online_chunked" else 3, M, N), gen, device, dtype, std=2.0)
    low = torch.finfo(dtype).min
    mask = torch.zeros(M, N, dtype=dtype)
    mask[3] = low  # every entry
    mask[5, ::2] = low  # some entries
    mask = mask.to(device)
    plan = sm.plan_rows(N, x.numel() // N, x.device)
    assert plan.on_chip == (path == "on_chip") and (plan.n_chunks > 1) == (path == "online_chunked")
    y, _, _ = check(x, mask, scale=0.7, seed=3)
    assert torch.isfinite(y).all()
    if dtype == torch.float32:
        expected = torch.softmax(0.7 * x + mask, dim=-1)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[..., 3, :], torch.full_like(y[..., 3, :], 1.0 / N))


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_float_mask_at_finfo_min_causal(device):
    gen = torch.Generator().manual_seed(43)
    x = _randn((2, 2, 9, 13), gen, device, torch.bfloat16)
    mask = torch.zeros(9, 13, dtype=torch.bfloat16)
    mask[:, :5] = torch.finfo(torch.bfloat16).min  # rows 0-4 see only finfo.min entries (causal)
    check(x, mask.to(device), is_causal=True, seed=5)
