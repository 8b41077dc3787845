"""The benchmark suite's FLOP and byte counts, its workload definitions, its output check and its runner.

The counts are checked against brute force (counting the multiply-adds and the visible causal pairs on
small odd shapes, and the bytes of real tensors), so a wrong convention cannot hide behind a formula that
merely matches itself.
"""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: `benchmarks`

from benchmarks import metrics, workloads  # noqa: E402
from benchmarks.providers import PROVIDERS, provider_names  # noqa: E402
from llmkernels.triton_kernels.compile_report import KERNEL_MODULES  # noqa: E402


def _brute_causal_pairs(L, S):
    return int(torch.ones(L, S, dtype=torch.bool).tril().sum())  # top-left: key j visible to query i iff j <= i


@pytest.mark.parametrize("L,S", [(1, 1), (1, 7), (7, 1), (5, 5), (17, 33), (33, 17), (129, 128), (3, 1000)])
def test_causal_visible_pairs_match_brute_force(L, S):
    assert metrics.causal_visible_pairs(L, S) == _brute_causal_pairs(L, S)


def test_attention_forward_flops_count_both_matmuls():
    B, H, L, S, E, Ev = 3, 5, 17, 33, 24, 40
    q, k, v = torch.randn(B, H, L, E), torch.randn(B, H, S, E), torch.randn(B, H, S, Ev)
    # multiply-adds of QK^T and PV, counted from the einsum operands' sizes
    macs = (q.shape[0] * q.shape[1] * L * S * E) + (B * H * L * S * v.shape[-1])
    assert metrics.attention_flops(B, H, L, S, E, Ev) == 2 * macs
    assert metrics.attention_flops(B, H, L, S, E) == 4 * B * H * L * S * E  # FlashAttention's 4*B*H*L*S*E


def test_causal_flops_halve_when_square_and_count_visible_pairs_otherwise():
    B, H, E = 2, 3, 16
    full = metrics.attention_flops(B, H, 64, 64, E)
    assert metrics.attention_flops(B, H, 64, 64, E, causal=True) == full / 2  # the convention, not 65/128
    for L, S in [(17, 33), (33, 17), (1, 100)]:
        causal = metrics.attention_flops(B, H, L, S, E, causal=True)
        assert causal == pytest.approx(4 * B * H * E * _brute_causal_pairs(L, S))


def test_backward_counts_2_5_and_forward_backward_3_5_times_the_forward():
    args = (2, 16, 1024, 1024, 128)
    fwd = metrics.attention_flops(*args, causal=True)
    assert metrics.attention_flops(*args, causal=True, mode="bwd") == 2.5 * fwd
    assert metrics.attention_flops(*args, causal=True, mode="fwd+bwd") == 3.5 * fwd
    with pytest.raises(ValueError, match="mode"):
        metrics.attention_flops(*args, mode="backward")


def test_flashattention_anchor_value():
    # FlashAttention's benchmark: 16k tokens at seqlen 8k, hidden 2048 = 16 heads of 128, forward, non-causal
    assert metrics.attention_flops(2, 16, 8192, 8192, 128) == 4 * 2 * 16 * 8192**2 * 128 == 1_099_511_627_776
    # 1 TFLOP in 1 s is 1 TFLOP/s; 1 GB in 1 ms is 1000 GB/s
    assert metrics.tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert metrics.gbps(1e9, 1.0) == pytest.approx(1000.0)


def test_softmax_bytes_from_real_tensors():
    w = workloads.SoftmaxWorkload("masked", 3, 5, 7, 129, "float", False, "fwd", "bf16")
    inp = w.make_inputs("cpu")
    x, mask = inp.x, inp.mask
    assert mask.shape == (3, 1, 7, 129)  # stored at its broadcast size: read once, not once per head
    y = torch.softmax(x.float(), -1).to(x.dtype)
    fwd = x.numel() * x.element_size() + y.numel() * y.element_size() + mask.numel() * mask.element_size()
    assert inp.nbytes() == fwd
    dy = torch.randn_like(y)
    bwd = 3 * dy.numel() * dy.element_size()  # y and dy read, dx written
    assert metrics.softmax_bytes(x.numel(), 2, mode="bwd") == bwd
    assert metrics.softmax_bytes(x.numel(), 2, mask.numel() * 2, mode="fwd+bwd") == fwd + bwd


def test_attention_forward_bytes_of_decode_are_the_kv_cache_read():
    w = workloads.AttentionWorkload("decode", 3, 8, 2, 1, 1001, 64, False, "none", "fwd", "fp16")
    inp = w.make_inputs("cpu")
    tensors = [inp.q, inp.k, inp.v, torch.empty(3, 8, 1, 64, dtype=torch.float16)]  # + the output written
    assert inp.forward_bytes() == sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("sweep", ["quick", "full"])
def test_gpu_sweeps_follow_flashattention_convention(sweep):
    ws = workloads.attention_workloads(sweep)
    standard = [w for w in ws if w.kind == "standard"]
    assert standard
    for w in standard:
        assert w.B * w.L == 16384 and w.L == w.S, w.label  # 16k tokens
        assert w.Hq * w.E == 2048, w.label  # hidden 2048
    kinds = {w.kind for w in ws}
    assert kinds == {"standard", "padding", "bias", "gqa", "decode", "window", "softcap", "alibi"}
    gqa = [w for w in ws if w.kind == "gqa"]
    assert all(w.Hq == 32 and w.Hkv == 8 for w in gqa)
    assert all(w.L == 1 and w.S >= 8192 for w in ws if w.kind == "decode")
    if sweep == "full":
        assert {w.L for w in standard} == {512, 1024, 2048, 4096, 8192, 16384}
        assert {(w.Hq, w.E) for w in standard} == {(16, 128), (32, 64)}
        assert {w.mode for w in standard} == set(metrics.MODES)
        assert {w.dtype for w in standard} == {"bf16", "fp16"}
        assert {w.causal for w in standard} == {False, True}
        cols = {w.N for w in workloads.softmax_workloads("full")}
        assert min(cols) == 128 and max(cols) == 131072


def test_softmax_gpu_workloads_fill_more_than_the_l2():
    for w in workloads.softmax_workloads("quick") + workloads.softmax_workloads("full"):
        assert w.numel * 2 >= 4 * 60 * 2**20, w.label  # at least four times the 60 MB L2 in 16-bit dtypes
        if w.causal:
            assert w.M == w.N


def test_inputs_match_the_workload_and_masks_keep_every_row():
    w = workloads.AttentionWorkload("padding", 5, 4, 4, 33, 33, 16, False, "padding", "bwd", "fp32")
    inp = w.make_inputs("cpu")
    assert inp.q.shape == (5, 4, 33, 16) and inp.q.requires_grad
    assert inp.mask.dtype == torch.bool and inp.mask.shape == (5, 1, 1, 33)
    assert inp.mask.any(-1).all()  # no fully masked rows: every sequence keeps a key
    assert torch.equal(inp.mask.view(5, 33).sum(-1), inp.lengths)  # the bool mask and flex's lengths agree
    s = workloads.SoftmaxWorkload("masked", 2, 3, 5, 77, "float", False, "fwd", "fp32").make_inputs("cpu")
    assert (s.mask > float("-inf")).any(-1).all()


def test_every_required_provider_is_registered():
    dense = {p.name for p in PROVIDERS if p.op == "attention" and not p.varlen}
    assert dense == {"llmk-triton", "llmk-triton-det", "llmk-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                     "sdpa-math", "flex", "reference"}
    # the packed variable-length rows (issue 10) have their own providers
    assert {p.name for p in PROVIDERS if p.varlen} == {"llmk-triton", "torch-varlen", "sdpa-flash-padded",
                                                       "flex-document", "reference"}
    assert set(provider_names("softmax")) == {"llmk-triton", "llmk-cuda", "eager", "compiled"}
    assert len({(p.name, p.op, p.varlen) for p in PROVIDERS}) == len(PROVIDERS)


def test_output_check_flags_wrong_and_nan_outputs():
    from benchmarks.run import check_output

    ref = torch.randn(4, 9, dtype=torch.float64)
    naive_err = 1e-3
    assert check_output(ref + 1e-3, (ref, naive_err))["check"] == "ok"
    assert check_output(ref + 1e-2, (ref, naive_err))["check"] == "FAIL"
    bad = ref.clone()
    bad[1, 2] = float("nan")
    assert check_output(bad, (ref, naive_err))["check"] == "FAIL"


def test_failures_are_classified_with_their_reason():
    import warnings

    from benchmarks.run import classify_failure

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("Flash attention does not support non-null attn_mask.")
    status = classify_failure(RuntimeError("No available kernel. Aborting execution."), caught)
    assert status == "unavailable: Flash attention does not support non-null attn_mask."
    assert classify_failure(ValueError("bad\nmore"), []) == "error: ValueError: bad"


def test_cpu_sweep_end_to_end(tmp_path):
    """The runner on the tiny sweep: rows for every provider, ok or with a reason; JSON and table written."""
    from benchmarks import run

    rc = run.main(["--sweep", "tiny", "--no-static", "--out", str(tmp_path),
                   "--providers", "sdpa-math", "reference", "sdpa-cudnn", "llmk-cuda", "eager"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["env"]["torch"] == torch.__version__ and data["env"]["llmkernels_commit"]
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    rows = {(r["op"], r["provider"], r["label"]): r for r in data["rows"]}
    assert len(rows) == 2 * 4 + 2 * 2  # tiny: 2 attention x 4 providers, 2 softmax x 2 providers
    for (op, provider, _), r in rows.items():
        if provider in ("sdpa-math", "reference", "eager"):
            assert r["status"] == "ok" and r["ms"] > 0 and r["check"] == "ok", r
            assert (r["tflops"] if op == "attention" else r["gbps"]) > 0
        elif not torch.cuda.is_available():
            assert r["status"].startswith("unavailable: ") and len(r["status"]) > len("unavailable: ") + 5
    # the exit status says whether any row raised or failed its check
    failed = any(r["status"].startswith("error") or r.get("check") == "FAIL" for r in rows.values())
    assert rc == (1 if failed else 0)


def test_static_report_picks_one_bf16_config_per_kernel_and_reports_missing_modules(monkeypatch):
    from types import SimpleNamespace

    from benchmarks import static_report

    def kernel_a():
        pass

    def kernel_b():
        pass

    def spec(fn, dtype):
        return SimpleNamespace(fn=fn, signature={"X": f"*{dtype}", "N": "i32", "BLOCK": "constexpr"})

    specs = [spec(kernel_a, "fp16"), spec(kernel_a, "bf16"), spec(kernel_a, "bf16"), spec(kernel_b, "fp32")]
    assert static_report._representative(specs) == [1, 3]  # kernel_a's first bf16 config, kernel_b's only one

    def missing(name):
        raise ModuleNotFoundError(f"No module named 'llmkernels.triton_kernels.{name}'")

    monkeypatch.setattr(static_report, "_module", missing)
    out = static_report.triton_report((90, 80), full=False, jobs=1)
    assert out["configs"] == []
    assert {(u["module"], u["arch"]) for u in out["unavailable"]} == {(m, a) for m in KERNEL_MODULES
                                                                      for a in (90, 80)}
    assert all("ModuleNotFoundError" in u["reason"] for u in out["unavailable"])


def test_plots_one_png_per_group_with_at_least_two_lengths(tmp_path):
    from benchmarks import report

    def row(group, provider, x, tflops, status="ok"):
        return {"op": "attention", "group": group, "provider": provider, "x": x, "tflops": tflops,
                "status": status}

    rows = [row("attention_a", "p1", 512, 1.0), row("attention_a", "p1", 1024, 2.0),
            row("attention_a", "p2", 512, 1.5), row("attention_a", "p2", 1024, None, "unavailable: no"),
            row("attention_single", "p1", 4096, 3.0)]
    (tmp_path / "stale.png").write_bytes(b"old")
    paths = report.plot(rows, str(tmp_path), "test")
    assert [os.path.basename(p) for p in paths] == ["attention_a.png"]
    assert sorted(os.listdir(tmp_path)) == ["attention_a.png"]  # the stale plot is gone
    assert (tmp_path / "attention_a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _brute_visible_pairs(L, S, causal, left, right, bottom_right):
    d = S - L if bottom_right else 0
    i = torch.arange(L)[:, None] + d
    j = torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if causal:
        keep &= j <= i
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return int(keep.sum())


@pytest.mark.parametrize("L,S", [(1, 1), (1, 9), (9, 1), (17, 17), (17, 40), (40, 17)])
@pytest.mark.parametrize("causal,left,right", [(False, -1, -1), (True, -1, -1), (True, 0, -1), (True, 4, -1),
                                               (False, 3, 2), (False, -1, 0), (False, 0, 0), (False, 50, 50)])
@pytest.mark.parametrize("bottom_right", [False, True])
def test_visible_pairs_match_brute_force(L, S, causal, left, right, bottom_right):
    assert (metrics.visible_pairs(L, S, causal, left, right, bottom_right)
            == _brute_visible_pairs(L, S, causal, left, right, bottom_right))


def test_window_flops_count_the_visible_pairs():
    # 16k causal with a window of 4096 keys: about a quarter of full causal's work (4096 - 1/2 keys per row past
    # the first 4095 rows), counted exactly
    L, W = 16384, 4096
    pairs = sum(min(i + 1, W) for i in range(L))  # row i sees keys max(0, i - W + 1) .. i
    got = metrics.attention_flops(1, 32, L, L, 128, causal=True, window=(W - 1, 0))
    assert got == 4.0 * 32 * pairs * 128
    ratio = got / metrics.attention_flops(1, 32, L, L, 128, causal=True)
    assert abs(ratio - pairs / (L * L / 2)) < 1e-12 and 0.43 < ratio < 0.44  # vs causal's L^2/2 convention


def test_variant_rows_in_the_quick_sweep():
    ws = workloads.attention_workloads("quick")
    window = [w for w in ws if w.kind == "window"]
    assert {w.mode for w in window} == {"fwd", "bwd"}
    for w in window:
        assert (w.L, w.S, w.Hq, w.Hkv, w.E, w.dtype, w.causal, w.window) == (16384, 16384, 32, 8, 128, "bf16",
                                                                             True, (4095, 0))
    assert {w.softcap for w in ws if w.kind == "softcap"} == {50.0}
    assert any(w.alibi and w.causal for w in ws if w.kind == "alibi")
    plain = {(w.B, w.Hq, w.L, w.E, w.causal, w.mode) for w in ws if w.kind == "standard"}
    for w in ws:  # softcap and ALiBi rows have a plain row of the same shape to compare their cost with
        if w.kind in ("softcap", "alibi") and w.mode == "fwd":
            assert (w.B, w.Hq, w.L, w.E, w.causal, w.mode) in plain


@pytest.mark.parametrize("kind", ["window", "alibi"])
def test_materialised_mask_computes_the_variant(kind):
    """SDPA's rows (the materialised mask / bias) compute what llmkernels' variant arguments do."""
    from llmkernels import reference

    w = workloads.AttentionWorkload(kind, 2, 4, 2, 37, 37, 16, True, "none", "fwd", "fp32",
                                    window=(5, 0) if kind == "window" else (-1, -1), alibi=kind == "alibi")
    inp = w.make_inputs("cpu")
    q, k, v = (t.double() for t in (inp.q, inp.k, inp.v))
    mask = inp.materialised_mask()
    if mask.dtype != torch.bool:
        mask = mask.double()
    via_mask = reference.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    via_args = reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                      **inp.variant_kwargs())
    torch.testing.assert_close(via_mask, via_args, rtol=1e-5, atol=1e-5)
    plain = reference.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (plain - via_args).abs().max() > 1e-3  # the variant matters at this size


def test_varlen_rows_count_the_real_pairs_and_match_the_issue():
    ws = workloads.varlen_workloads("quick")
    assert {w.mode for w in ws} == {"fwd", "bwd"}
    for w in ws:
        assert (len(w.lengths), w.tokens, w.H, w.E, w.dtype, w.causal) == (64, 65536, 16, 128, "bf16", True)
        assert 128 <= min(w.lengths) and max(w.lengths) <= 8192
    w = workloads.VarlenWorkload("varlen", (3, 1, 5), 2, 8, True, "fwd", "fp32")
    pairs = (9 + 1 + 25) / 2  # each document's causal L^2 / 2 (the dense rows' convention), nothing across them
    assert w.flops() == 4.0 * 2 * 8 * pairs
    inp = w.make_inputs("cpu")
    assert inp.q.shape == (9, 2, 8) and inp.cu_seqlens.tolist() == [0, 3, 4, 9] and inp.max_seqlen == 5
