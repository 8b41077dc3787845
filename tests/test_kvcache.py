"""attention_with_kvcache (issue 11): the split-K decode kernels against the float64 gather-and-dense reference
under the tolerance rule (tests/tolerance.py), in Triton's interpreter on CPU (BLOCK_N = 16 there, so the small
caches below cross several key blocks and pages); the in-place append; num_splits; batch invariance; the
reference backend; the op layer (opcheck, torch.compile); the dense op's decode path; and every bad-input error.

Our op gets caches whose every slot at or past a sequence's length, and every page its block table does not list,
holds NaN; block-table entries past a sequence's last page are -1 or garbage. The references read only the
listed positions, so a kernel that reads anything else fails the rule.
"""

import pytest
import torch

import llmkernels
from llmkernels import dispatch, kvcache, reference
from llmkernels.kvcache_contract import check_kvcache
from llmkernels.triton_kernels import decode
from tolerance import assert_by_rule

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAN = float("nan")


def make_cache(B, Hkv, E, Ev, lengths, capacity, page_size, dtype, g, garbage_tail="-1", new=0):
    """(k_cache, v_cache, block_table, clean_k, clean_v): NaN beyond each length and in unlisted pages; a paged
    cache (page_size given) has its pages in random order, table entries past the last page used (by the
    lengths plus ``new`` appended tokens) -1 or garbage (out-of-range page numbers). clean_* are the same caches
    without NaN (what the reference reads)."""
    if page_size is None:
        k = torch.randn(B, capacity, Hkv, E, generator=g)
        v = torch.randn(B, capacity, Hkv, Ev, generator=g)
        kp, vp = k.clone(), v.clone()
        for b, n in enumerate(lengths):
            kp[b, n:] = NAN
            vp[b, n:] = NAN
        return kp.to(dtype), vp.to(dtype), None, k.to(dtype), v.to(dtype)
    max_pages = -(-capacity // page_size)
    num_pages = B * max_pages + 3  # a few pages nobody lists
    k = torch.randn(num_pages, page_size, Hkv, E, generator=g)
    v = torch.randn(num_pages, page_size, Hkv, Ev, generator=g)
    kp, vp = torch.full_like(k, NAN), torch.full_like(v, NAN)
    order = torch.randperm(num_pages, generator=g)
    table = torch.empty(B, max_pages, dtype=torch.int32)
    for b, n in enumerate(lengths):
        used = -(-(n + new) // page_size)
        table[b] = order[b * max_pages:(b + 1) * max_pages].int()
        tail = torch.full((max_pages - used,), -1) if garbage_tail == "-1" else torch.randint(
            num_pages, 2**30, (max_pages - used,), generator=g)
        table[b, used:] = tail.int()
        for p in range(used):
            page = int(table[b, p])
            rows = max(0, min(page_size, n - p * page_size))  # pages only the appended tokens use: none
            kp[page, :rows] = k[page, :rows]
            vp[page, :rows] = v[page, :rows]
    return kp.to(dtype), vp.to(dtype), table, k.to(dtype), v.to(dtype)


def _poison_left_of_window(kc, vc, table, lengths, new, Lq, window_left):
    """NaN in our op's cache at the positions left of every row's window (bottom-right: row 0 of sequence b sits at
    position lengths[b] + new - Lq and sees keys from window_left before it), which the kernels must never read;
    the references keep the clean cache."""
    if window_left < 0:
        return
    for b, n in enumerate(lengths):
        for j in range(max(0, n + new - Lq - window_left)):
            if table is None:
                kc[b, j], vc[b, j] = NAN, NAN
            else:
                page, slot = int(table[b, j // kc.shape[1]]), j % kc.shape[1]
                kc[page, slot], vc[page, slot] = NAN, NAN


def run_case(dt, B, Lq, Hq, Hkv, E, Ev, lengths, capacity, page_size, append, seed, num_splits=0, int_lengths=False,
             garbage_tail="-1", **variant):
    """Ours (triton) against the float64 and the naive references; returns (out, lse, k_cache, inputs)."""
    dtype = DTYPES[dt]
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, Hq, E, generator=g).to(dtype)
    kc, vc, table, kc_clean, vc_clean = make_cache(B, Hkv, E, Ev, lengths, capacity, page_size, dtype, g,
                                                   garbage_tail, new=Lq if append else 0)
    knew = vnew = None
    if append:
        knew = torch.randn(B, Lq, Hkv, E, generator=g).to(dtype)
        vnew = torch.randn(B, Lq, Hkv, Ev, generator=g).to(dtype)
    _poison_left_of_window(kc, vc, table, lengths, Lq if append else 0, Lq, variant.get("window_size", (-1, -1))[0])
    if variant.pop("alibi", False):
        variant["alibi_slopes"] = torch.rand(B, Hq, generator=g) * 0.5
    seqlens = lengths[0] if int_lengths else torch.tensor(lengths, dtype=torch.int32)
    out, lse = llmkernels.attention_with_kvcache(q, kc, vc, seqlens, k=knew, v=vnew, block_table=table,
                                                 num_splits=num_splits, return_lse=True, backend="triton", **variant)

    def ref(cast, compute):
        kw = dict(variant)
        if kw.get("alibi_slopes") is not None and cast == torch.float64:
            kw["alibi_slopes"] = kw["alibi_slopes"].double()
        c = (lambda t: None if t is None else t.to(cast))
        return reference.attention_with_kvcache(c(q), c(kc_clean), c(vc_clean), seqlens, k=c(knew), v=c(vnew),
                                                block_table=table, return_lse=True, compute_dtype=compute, **kw)

    ref_out, ref_lse = ref(torch.float64, torch.float64)
    naive_out, naive_lse = ref(dtype, None)
    assert out.shape == (B, Lq, Hq, Ev) and out.dtype == dtype
    assert lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert_by_rule("out", out, ref_out, naive_out, dtype)
    assert_by_rule("lse", lse, ref_lse, naive_lse, dtype)
    return out, lse, (q, kc, vc, table, knew, vnew, seqlens)


# name: dtype, B, Lq, Hq, Hkv, E, Ev, cache_seqlens, capacity, page_size (None: contiguous), append, variant
CASES = {
    # lengths 0 and different per sequence; GQA 4; Ev != E
    "contiguous_gqa4_lengths_0_37_70_fp16": ("fp16", 3, 1, 8, 2, 32, 24, [0, 37, 70], 80, None, False, {}),
    # page 16, lengths on and across page edges, pages permuted, garbage past the last page; Lq 3 causal
    "paged16_permuted_causal_Lq3_bf16": ("bf16", 3, 3, 4, 2, 32, 32, [15, 16, 49], 64, 16, False,
                                         dict(is_causal=True, garbage_tail="garbage")),
    # MQA with append: rows see cache_seqlens[b] + t keys; an empty cache plus new tokens
    "paged32_mqa_append_causal_Lq4_fp32": ("fp32", 3, 4, 4, 1, 16, 16, [0, 31, 45], 64, 32, True,
                                           dict(is_causal=True)),
    # GQA 8 with window, softcap and ALiBi (bottom-right distances), paged 48, with append
    "paged48_gqa8_window_softcap_alibi_append_fp16": ("fp16", 2, 2, 16, 2, 16, 16, [40, 95], 144, 48, True,
                                                      dict(is_causal=True, window_size=(30, 0), softcap=4.0,
                                                           alibi=True)),
    # GQA 1, Lq 8 (speculative decoding) causal without new keys: sequence 0 has 5 keys, so rows 0..2 see none
    "contiguous_gqa1_Lq8_causal_short_fp32": ("fp32", 2, 8, 2, 2, 16, 16, [5, 40], 48, None, False,
                                              dict(is_causal=True)),
    # an int cache_seqlens, two-sided window without causality
    "int_lengths_two_sided_window_bf16": ("bf16", 2, 2, 4, 2, 16, 16, [50, 50], 64, 16, True,
                                          dict(int_lengths=True, window_size=(9, 1))),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    dt, B, Lq, Hq, Hkv, E, Ev, lengths, cap, page, append, variant = CASES[name]
    out, lse, _ = run_case(dt, B, Lq, Hq, Hkv, E, Ev, lengths, cap, page, append, seed=len(name), **variant)
    if name == "contiguous_gqa1_Lq8_causal_short_fp32":
        assert (out[0, :3] == 0).all() and torch.isneginf(lse[0, :, :3]).all()
    if name == "contiguous_gqa4_lengths_0_37_70_fp16":
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_num_splits_agree():
    """1, 2, 3 and the heuristic (0) each pass the rule on a paged GQA cache where some splits see no key
    (sequence 0 is short); the heuristic picks 2 here (2 programs, 4 interpreter 'SMs', 544 keys)."""
    args = ("fp16", 2, 2, 4, 1, 16, 16, [3, 530], 544, 16, False)
    outs = {n: run_case(*args, seed=7, num_splits=n, is_causal=True)[0] for n in (1, 2, 3, 0)}
    assert kvcache.choose_num_splits(2, 1, 8, 544, kvcache.INTERPRETER_SM_COUNT) == 2
    assert torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[1], outs[2])  # the split path really ran (it rounds differently)


def test_num_splits_1_is_batch_invariant():
    """num_splits=1: a sequence's output and lse are bitwise the same alone and inside a larger batch."""
    g = torch.Generator().manual_seed(3)
    B, Lq, Hq, Hkv, E, S = 4, 2, 4, 2, 16, 70
    q = torch.randn(B, Lq, Hq, E, generator=g).half()
    kc = torch.randn(B, S, Hkv, E, generator=g).half()
    vc = torch.randn(B, S, Hkv, E, generator=g).half()
    lengths = torch.tensor([61, 17, 70, 33], dtype=torch.int32)
    kw = dict(num_splits=1, return_lse=True, is_causal=True, backend="triton")
    out, lse = llmkernels.attention_with_kvcache(q, kc, vc, lengths, **kw)
    alone, alone_lse = llmkernels.attention_with_kvcache(q[:1], kc[:1], vc[:1], lengths[:1], **kw)
    assert torch.equal(out[:1], alone) and torch.equal(lse[:1], alone_lse)


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("paged", [False, True])
def test_append_writes_new_rows_and_nothing_else(paged):
    """The new tokens land at cache_seqlens[b] + t (through the table), bitwise; every other element of both
    caches is bitwise unchanged (NaN included), on both backends; cache_seqlens is not changed."""
    g = torch.Generator().manual_seed(11)
    B, Lq, Hkv, E, Ev, page = 2, 3, 2, 16, 8, 16
    lengths = [14, 30]
    kc, vc, table, _, _ = make_cache(B, Hkv, E, Ev, lengths, 48, page if paged else None, torch.bfloat16, g,
                                     new=Lq)
    knew = torch.randn(B, Lq, Hkv, E, generator=g).bfloat16()
    vnew = torch.randn(B, Lq, Hkv, Ev, generator=g).bfloat16()
    q = torch.randn(B, Lq, 4, E, generator=g).bfloat16()
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    results = []
    for backend in ("triton", "reference"):
        k_cache, v_cache = kc.clone(), vc.clone()
        llmkernels.attention_with_kvcache(q, k_cache, v_cache, seqlens, k=knew, v=vnew, block_table=table,
                                          backend=backend)
        expect_k, expect_v = kc.clone(), vc.clone()
        for b, n in enumerate(lengths):
            for t in range(Lq):
                pos = n + t
                where = (int(table[b, pos // page]), pos % page) if paged else (b, pos)
                expect_k[where] = knew[b, t]
                expect_v[where] = vnew[b, t]
        assert torch.equal(_bits(k_cache), _bits(expect_k)) and torch.equal(_bits(v_cache), _bits(expect_v))
        results.append(k_cache)
    assert seqlens.tolist() == lengths


def test_append_beyond_capacity_writes_nothing_outside():
    """With values the checks do not see (a CUDA tensor without validate=True; simulated here by calling the
    append kernel directly), positions past the capacity and unknown pages are skipped."""
    B, Lq, Hkv, E = 2, 3, 1, 16
    kc = torch.zeros(3, 16, Hkv, E)
    vc = torch.zeros(3, 16, Hkv, E)
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    knew, vnew = torch.ones(B, Lq, Hkv, E), torch.ones(B, Lq, Hkv, E)
    # sequence 0 at 30: positions 30, 31 fit, 32 is past the capacity; sequence 1 at 15: 15 fits, 16, 17 would
    # be in the page -1.
    decode.kvcache_append(kc, vc, knew, vnew, torch.tensor([30, 15], dtype=torch.int32), table)
    written = kc[..., 0] != 0
    assert written.sum() == 3 and written[1, 14:].all() and written[2, 15]


def test_reference_backend_matches_triton_and_auto_picks_triton():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = torch.randn(2, 40, 2, 16, generator=g), torch.randn(2, 40, 2, 16, generator=g)
    lengths = torch.tensor([7, 40], dtype=torch.int32)
    a = check_kvcache(q, kc, vc, lengths)
    reasons = dispatch.kvcache_not_supported_reasons(a)
    assert reasons["triton"] == [] and reasons["reference"] == [] and "no KV-cache" in reasons["cuda"][0]
    assert dispatch.choose_kvcache_backend(a, "auto") == "triton"
    ref64 = reference.attention_with_kvcache(q.double(), kc.double(), vc.double(), lengths,
                                             compute_dtype=torch.float64)
    naive = reference.attention_with_kvcache(q, kc, vc, lengths)
    kc[0, 7:], vc[0, 7:] = float("nan"), float("nan")  # past sequence 0's length: neither backend reads it
    for backend in ("triton", "reference"):
        out = llmkernels.attention_with_kvcache(q, kc, vc, lengths, backend=backend)
        assert_by_rule(f"{backend} out", out, ref64, naive, torch.float32)
    with pytest.raises(llmkernels.NotSupportedError, match="no KV-cache"):
        llmkernels.attention_with_kvcache(q, kc, vc, lengths, backend="cuda")


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 4, 16, generator=g)
    kc, vc = torch.randn(4, 16, 2, 16, generator=g), torch.randn(4, 16, 2, 16, generator=g)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    seqlens = torch.tensor([9, 20], dtype=torch.int32)
    for splits in (1, 2):
        torch.library.opcheck(kvcache.kvcache_attention, (q, kc, vc, seqlens, table, True, 0.25, -1, -1, 0.0, None,
                                                          splits, "triton"))
    knew, vnew = torch.randn(2, 2, 2, 16, generator=g), torch.randn(2, 2, 2, 16, generator=g)
    torch.library.opcheck(kvcache.kvcache_append, (kc, vc, knew, vnew, seqlens, table, "triton"))


@pytest.mark.parametrize("append", [False, True])
def test_compile_fullgraph_decode_step(append):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = torch.randn(4, 16, 2, 16, generator=g), torch.randn(4, 16, 2, 16, generator=g)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    seqlens = torch.tensor([9, 20], dtype=torch.int32)
    knew, vnew = torch.randn(2, 1, 2, 16, generator=g), torch.randn(2, 1, 2, 16, generator=g)

    def step(q, kc, vc, seqlens, knew, vnew):
        return llmkernels.attention_with_kvcache(q, kc, vc, seqlens, k=knew if append else None,
                                                 v=vnew if append else None, block_table=table, is_causal=True,
                                                 backend="triton")

    eager_kc, eager_vc = kc.clone(), vc.clone()
    expect = step(q, eager_kc, eager_vc, seqlens, knew, vnew)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, kc, vc, seqlens, knew, vnew)
    assert torch.equal(got, expect)
    assert torch.equal(kc, eager_kc) and torch.equal(vc, eager_vc)  # the append happened in place under compile


@pytest.fixture
def dense_decode_calls(monkeypatch):
    """A list that gets one entry per run of the dense op's decode path (decode.dense_decode_forward)."""
    calls = []
    original = decode.dense_decode_forward

    def spy(*args):
        calls.append(True)
        return original(*args)

    monkeypatch.setattr(decode, "dense_decode_forward", spy)
    return calls


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dense_op_takes_decode_path_with_same_meaning(dense_decode_calls):
    """scaled_dot_product_attention with L = 1 against 130 keys runs the decode kernels (spied) and matches the
    reference forward and backward; top-left causal with L = 3 < S keeps the regular path."""
    from attention_check import check_attention

    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 130, 16, generator=g), torch.randn(1, 2, 130, 16, generator=g)
    check_attention("triton", None, q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right")
    assert len(dense_decode_calls) == 1
    # top-left causal, L = 3 < S: query 0 sees key 0 only, which the decode kernel does not express
    q3 = torch.randn(1, 4, 3, 16, generator=g)
    out = llmkernels.scaled_dot_product_attention(q3, k, v, enable_gqa=True, is_causal=True, backend="triton")
    assert len(dense_decode_calls) == 1
    ref = reference.scaled_dot_product_attention(q3.double(), k.double(), v.double(), enable_gqa=True,
                                                 is_causal=True)
    naive = reference.scaled_dot_product_attention(q3, k, v, enable_gqa=True, is_causal=True)
    assert_by_rule("out", out, ref, naive, torch.float32)


# ------------------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, before any kernel


def _good():
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(3, 16, 2, 16), torch.randn(3, 16, 2, 16)
    table = torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    return dict(query=q, k_cache=kc, v_cache=vc, cache_seqlens=torch.tensor([20, 5], dtype=torch.int32),
                block_table=table)


BAD = {
    "block_table float": (dict(block_table=torch.zeros(2, 2)), TypeError, "block_table has dtype"),
    "block_table shape": (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "block_table must"),
    "page size 24": (dict(k_cache=torch.randn(3, 24, 2, 16), v_cache=torch.randn(3, 24, 2, 16)), ValueError,
                     "page_size 24"),
    "query heads": (dict(query=torch.randn(2, 1, 3, 16)), ValueError, "multiple of the cache's heads"),
    "head dim": (dict(query=torch.randn(2, 1, 4, 8)), ValueError, "k_cache has head dim 16 but query has 8"),
    "v_cache heads": (dict(v_cache=torch.randn(3, 16, 1, 16)), ValueError, "k_cache .* and v_cache"),
    "k new heads": (dict(k=torch.randn(2, 1, 1, 16), v=torch.randn(2, 1, 1, 16)), ValueError, "k must have shape"),
    "k without v": (dict(k=torch.randn(2, 1, 2, 16)), ValueError, "k and v must be given together"),
    "seqlens dtype": (dict(cache_seqlens=torch.tensor([1.0, 2.0])), TypeError, "cache_seqlens has dtype"),
    "seqlens shape": (dict(cache_seqlens=torch.tensor([1, 2, 3])), ValueError, r"cache_seqlens must have shape"),
    "seqlens type": (dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int"),
    "over capacity": (dict(cache_seqlens=torch.tensor([32, 5], dtype=torch.int32), k=torch.randn(2, 1, 2, 16),
                           v=torch.randn(2, 1, 2, 16)), ValueError, "exceed the cache capacity 32"),
    "int over capacity": (dict(cache_seqlens=33, block_table=None, k_cache=torch.randn(2, 32, 2, 16),
                               v_cache=torch.randn(2, 32, 2, 16)), ValueError, "does not fit the cache capacity"),
    "negative length": (dict(cache_seqlens=torch.tensor([-1, 5], dtype=torch.int32)), ValueError, "negative"),
    "unlisted page used": (dict(cache_seqlens=torch.tensor([20, 17], dtype=torch.int32)), ValueError,
                           r"block_table\[1, 1\] = -1"),
    "dtype mismatch": (dict(k_cache=torch.randn(3, 16, 2, 16).half()), TypeError, "k_cache has dtype"),
    "contiguous batch": (dict(block_table=None), ValueError, "k_cache has batch 3 but query has 2"),
    "num_splits": (dict(num_splits=-1), ValueError, "num_splits must be"),
    "causal and right window": (dict(is_causal=True, window_size=(4, 2)), ValueError, "window_size right side"),
    "alibi shape": (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes of shape"),
    "append into an expanded cache": (dict(k_cache=torch.randn(1, 16, 2, 16).expand(3, 16, 2, 16),
                                           k=torch.randn(2, 1, 2, 16), v=torch.randn(2, 1, 2, 16)), ValueError,
                                      "k_cache has overlapping memory"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_errors(name, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the error")

    monkeypatch.setattr(decode, "kvcache_attention_forward", no_kernel)
    monkeypatch.setattr(decode, "kvcache_append", no_kernel)
    change, error, match = BAD[name]
    kw = _good()
    kw.update(change)
    with pytest.raises(error, match=match):
        llmkernels.attention_with_kvcache(kw.pop("query"), kw.pop("k_cache"), kw.pop("v_cache"),
                                          kw.pop("cache_seqlens"), backend="triton", **kw)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_dense_op_decode_path_variants_bf16_strided(dense_decode_calls):
    """The decode path of the dense op with bf16, padded head dims (40, Ev 24), MQA, the (B, L, H, E) layout as
    transposed views, bottom-right causal window, softcap and ALiBi: forward and backward pass the rule."""
    from attention_check import check_attention

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 6, 40, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(1, 130, 1, 40, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(1, 130, 1, 24, generator=g).bfloat16().transpose(1, 2)
    # Row 0 sits at key 124 (bottom-right, L = 6, S = 130) and sees from key 54: the whole 16-key blocks before it
    # (keys 0..47) are NaN for our op (the regular backward reads the partly visible block 48..63 as a tile).
    check_attention("triton", None, q, k, v, enable_gqa=True, is_causal=True, causal_alignment="bottom_right",
                    alibi_slopes=torch.rand(6, generator=g) * 0.3, window_size=(70, 0), softcap=5.0,
                    hidden_keys=slice(0, 48))
    assert dense_decode_calls


def test_reference_refuses_pages_outside_the_cache():
    """Without validation (CUDA tensors, validate=False) a bad block-table entry reaches the reference backend's
    gather: a -1 would index the last page and give wrong numbers, so it is refused there, naming the entry."""
    cache = torch.randn(3, 16, 1, 8)
    table = torch.tensor([[2, -1], [0, 1]], dtype=torch.int32)
    assert torch.equal(reference.gather_kvcache(cache, 1, 20, table), torch.cat([cache[0], cache[1]])[:20])
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = -1"):
        reference.gather_kvcache(cache, 0, 20, table)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = 3"):
        reference.gather_kvcache(cache, 1, 5, torch.tensor([[0, 0], [3, 0]], dtype=torch.int32))
    assert reference.gather_kvcache(cache, 0, 16, table).shape == (16, 1, 8)  # the -1 entry is not used
