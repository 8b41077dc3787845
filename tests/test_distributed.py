"""Context-parallel attention (llmkernels.distributed) on gloo process groups spawned on the CPU.

Each spawned group runs a list of checks in every rank (spawning costs seconds, so there are two groups: 2 and
4 ranks); each rank reports which checks failed, with the traceback, and the test asserts none did on any rank.
Every rank compares its output, lse and dq/dk/dv shards with the float64 reference over the whole sequence
(tolerance rule of tests/tolerance.py: at most twice the error of the same reference computed naively in the
input dtype), for every method, causal and not, GQA, an odd head dim and chunk length, fp32 and fp16, and the
kernels in Triton's interpreter (the reference backend in one case). Kernel outputs are poisoned with NaN.
"""

import datetime
import json
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmkernels import _alloc, dispatch, ops, reference
from llmkernels import distributed as lkd
from tolerance import assert_by_rule

_COUNTED = ("batch_isend_irecv", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")


class _CountCollectives:
    """Counts the torch.distributed calls the package makes inside the block (it looks them up at call time)."""

    def __enter__(self):
        self.counts = dict.fromkeys(_COUNTED, 0)
        self._saved = {name: getattr(dist, name) for name in _COUNTED}
        for name, fn in self._saved.items():
            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.counts[_name] += 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)

    def nonzero(self):
        return {k: v for k, v in self.counts.items() if v}


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _case(rank, world, *, method, layout, causal, dtype, Hq=4, Hkv=2, L=None, E=19, Ev=19, B=1, softcap=0.0,
          backend="triton", seed=0, window=(-1, -1), expected_calls=None):
    """One context-parallel call and its backward against the whole-sequence references."""
    gqa = Hq != Hkv
    L = 6 * world if L is None else L  # zigzag chunks of 3 positions: odd, and not a power of two
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, L, e, generator=gen).to(dtype) for h, e in ((Hq, E), (Hkv, E), (Hkv, Ev)))
    grad_out, grad_lse = torch.randn(B, Hq, L, Ev, generator=gen), torch.randn(B, Hq, L, generator=gen)

    def whole(cast, compute):
        ins = [_leaf(t.to(cast)) for t in (q, k, v)]
        o, lse = reference.scaled_dot_product_attention(*ins, is_causal=causal, enable_gqa=gqa, return_lse=True,
                                                        softcap=softcap, window_size=window,
                                                        compute_dtype=compute)
        grads = torch.autograd.grad([o, lse], ins, [grad_out.to(o.dtype), grad_lse.to(lse.dtype)])
        return [o, lse, *grads]

    ref64, naive = whole(torch.float64, torch.float64), whole(dtype, None)

    def part(t):
        return lkd.shard(t, 2, layout=layout)

    ours_in = [_leaf(part(t)) for t in (q, k, v)]
    with _CountCollectives() as fwd:
        out, lse = lkd.context_parallel_attention(*ours_in, method=method, is_causal=causal, enable_gqa=gqa,
                                                  return_lse=True, backend=backend, layout=layout,
                                                  softcap=softcap, window_size=window)
    with _CountCollectives() as bwd:
        grads = torch.autograd.grad([out, lse], ours_in, [part(grad_out).to(dtype), part(grad_lse)])
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    for name, ours, r, n in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), ref64, naive):
        assert_by_rule(f"rank {rank} {name}", ours, part(r), part(n), dtype)
    # The whole output again, through unshard, on every rank.
    assert_by_rule("unshard(out)", lkd.unshard(out.detach(), 2, layout=layout), ref64[0], naive[0], dtype)
    if expected_calls is not None:
        want_fwd, want_bwd = expected_calls(world)
        assert fwd.nonzero() == want_fwd, f"forward collectives {fwd.nonzero()} != design {want_fwd}"
        assert bwd.nonzero() == want_bwd, f"backward collectives {bwd.nonzero()} != design {want_bwd}"


# The design's collectives per call (see the method modules): the forward's all_gather_into_tensor includes the
# one small cross-rank shape check.
def _ring_calls(w):
    return {"all_gather_into_tensor": 1, "batch_isend_irecv": w - 1}, {"batch_isend_irecv": 2 * w - 1}


def _allgather_calls(w):
    return {"all_gather_into_tensor": 2}, {"reduce_scatter_tensor": 1}


def _ulysses_calls(w):  # q/k/v in, out back, lse back; the backward mirrors them
    return {"all_gather_into_tensor": 1, "all_to_all_single": 3}, {"all_to_all_single": 3}


def _check_round_trip(rank, world):
    x = torch.randn(2, 3, 4 * world * 3, 5, generator=torch.Generator().manual_seed(11))  # the same on every rank
    for layout in lkd.LAYOUTS:
        for dim in (2, -2, 0 if layout == "contiguous" else 2):
            y = x if dim != 0 else x.repeat(world, 1, 1, 1)
            part = lkd.shard(y, dim, layout=layout)
            assert part.shape[dim] == y.shape[dim] // world
            assert torch.equal(lkd.unshard(part, dim, layout=layout), y), (layout, dim)
    # zigzag: rank r holds chunks r and 2W-1-r, in that order
    seq = torch.arange(2 * world * 2)
    assert lkd.shard(seq, 0).tolist() == [2 * rank, 2 * rank + 1, 2 * (2 * world - 1 - rank),
                                         2 * (2 * world - 1 - rank) + 1]


def _check_size_one_group(rank, world):
    groups = [dist.new_group([r]) for r in range(world)]  # every rank takes part in creating every group
    mine = groups[rank]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    assert torch.equal(lkd.unshard(lkd.shard(q, 2, group=mine), 2, group=mine), q)
    plain = ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    for method in lkd.METHODS:
        with _CountCollectives() as counted:
            out = lkd.context_parallel_attention(q, k, v, group=mine, method=method, is_causal=True,
                                                 backend="triton")
        assert torch.equal(out, plain), method
        assert counted.nonzero() == {}, counted.counts


def _expect_error(exc_type, text, fn):
    try:
        fn()
    except exc_type as exc:
        assert text in str(exc), f"error message {str(exc)!r} lacks {text!r}"
        return
    raise AssertionError(f"expected {exc_type.__name__} containing {text!r}")


def _check_errors(rank, world):
    cp = lkd.context_parallel_attention
    odd = torch.randn(1, 2, 2 * world + 1, 8)
    _expect_error(ValueError, f"divisible by 2 * world size = {2 * world}", lambda: lkd.shard(odd, 2))
    _expect_error(ValueError, f"divisible by the world size {world}",
                  lambda: lkd.shard(odd, 2, layout="contiguous"))
    _expect_error(ValueError, "layout must be one of", lambda: lkd.shard(odd, 2, layout="striped"))
    _expect_error(ValueError, "dim must be an int", lambda: lkd.shard(odd, 4))
    x = torch.randn(1, 2 * world + 1, 4, 8)  # heads not divisible by W
    _expect_error(ValueError, f"query has {2 * world + 1} heads", lambda: cp(x, x, x, method="ulysses"))
    y = torch.randn(1, 2, 4, 8)
    _expect_error(ValueError, "method must be one of", lambda: cp(y, y, y, method="tree"))
    _expect_error(ValueError, "supported by method='ulysses' only",
                  lambda: cp(y, y, y, method="ring", window_size=(2, 0)))
    _expect_error(dispatch.NotSupportedError, "fp32 partial", lambda: cp(y, y, y, backend="cuda"))
    _expect_error(ValueError, "query must be (B, H, L_local, E)", lambda: cp(y[0], y[0], y[0]))
    # Shards that differ between ranks: every rank raises (after one small collective), none hangs.
    mismatched = torch.randn(1, 2, 4 + 2 * rank, 8)
    _expect_error(ValueError, "differ between ranks", lambda: cp(mismatched, mismatched, mismatched))
    # and the group still works afterwards
    _check_round_trip(rank, world)


def _check_merge_in_group(rank, world):
    # The merge helper is exercised by every ring case; a ring call whose zigzag steps skip work entirely
    # (contiguous layout, causal: rank 0 sees nothing of later ranks' keys) runs through all-hidden steps.
    _case(rank, world, method="ring", layout="contiguous", causal=True, dtype=torch.float32, backend="reference",
          L=2 * world, E=8, Ev=8, seed=7, expected_calls=_ring_calls)


def _outcome(fn):
    """What a call did: ("ok", local values) or ("error", exception type, first line of the message)."""
    try:
        out = fn()
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    return ("ok", getattr(out, "to_local", lambda: out)().tolist())


def _check_sdpa_routing_under_torch_context_parallel(rank, world):
    """PyTorch's context_parallel() and DTensor calls must reach PyTorch's function under routing, in whichever
    order the blocks were entered, and be counted with their reason. (On CPU PyTorch's context parallel has no
    CPU flash kernel rule and raises; the routed call must raise the same, not return a shard-local result.)"""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor.experimental import context_parallel

    import llmkernels
    from llmkernels.integrations import sdpa_routing

    mesh = init_device_mesh("cpu", (world,))

    def inputs():
        gen = torch.Generator().manual_seed(5)
        return [torch.randn(1, 2, 4 * world, 16, generator=gen) for _ in range(3)]

    def in_cp(route_outside: bool, route_inside: bool):
        q, k, v = inputs()
        outer = llmkernels.route_sdpa() if route_outside else _Nothing()
        with outer:
            with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
                with (llmkernels.route_sdpa() if route_inside else _Nothing()):
                    return _outcome(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))

    plain = in_cp(False, False)
    for outside, inside in ((True, False), (False, True)):
        llmkernels.reset_routing_stats()
        assert in_cp(outside, inside) == plain, (outside, inside)
        stats = llmkernels.routing_stats()
        assert sum(stats.routed.values()) == 0, str(stats)
        assert stats.fallback[sdpa_routing.REASON_CONTEXT_PARALLEL] == 1, str(stats)
        assert ("DTensor inputs" if outside else "context_parallel()") in stats.recent[-1].detail
    # A DTensor call outside any context parallel: PyTorch's function too.
    q, k, v = (distribute_tensor(t, mesh, [Replicate()]) for t in inputs())
    plain = _outcome(lambda: F.scaled_dot_product_attention(q, k, v))
    llmkernels.reset_routing_stats()
    with llmkernels.route_sdpa():
        assert _outcome(lambda: F.scaled_dot_product_attention(q, k, v)) == plain
    assert llmkernels.routing_stats().fallback[sdpa_routing.REASON_CONTEXT_PARALLEL] == 1
    # and once the block is gone, plain calls route to llmkernels again
    with llmkernels.route_sdpa():
        F.scaled_dot_product_attention(*inputs())
    assert sum(llmkernels.routing_stats().routed.values()) == 1, str(llmkernels.routing_stats())


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _check_benchmark_entry(rank, world):
    """benchmarks/bench_context_parallel.py's rows, in this group (what its torchrun entry runs per rank)."""
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root
    from benchmarks import bench_context_parallel as bench

    args = bench.parse_args(["--smoke", "--backend", "triton"])
    args.warmup = 0
    rows = bench.run_rows(args, torch.device("cpu"))
    assert [r["method"] for r in rows] == ["ring", "allgather", "ulysses"], rows
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["ideal_ms"] > 0 and r["world"] == world for r in rows)


FP16 = torch.float16

CHECKS = {
    "ring causal zigzag fp32 GQA": lambda r, w: _case(r, w, method="ring", layout="zigzag", causal=True,
                                                      dtype=torch.float32, expected_calls=_ring_calls),
    "ring full contiguous fp16 softcap": lambda r, w: _case(r, w, method="ring", layout="contiguous",
                                                            causal=False, dtype=FP16, softcap=3.0, seed=1),
    "ring causal zigzag fp16": lambda r, w: _case(r, w, method="ring", layout="zigzag", causal=True, dtype=FP16,
                                                  Hkv=4, E=16, Ev=24, seed=2),
    "allgather causal zigzag fp16 GQA": lambda r, w: _case(r, w, method="allgather", layout="zigzag",
                                                           causal=True, dtype=FP16, seed=3,
                                                           expected_calls=_allgather_calls),
    "allgather full contiguous fp32": lambda r, w: _case(r, w, method="allgather", layout="contiguous",
                                                         causal=False, dtype=torch.float32, seed=4),
    "ulysses causal zigzag fp32 GQA": lambda r, w: _case(r, w, method="ulysses", layout="zigzag", causal=True,
                                                         dtype=torch.float32, seed=5, Hkv=w,
                                                         expected_calls=_ulysses_calls),
    "ulysses full contiguous fp16 window": lambda r, w: _case(r, w, method="ulysses", layout="contiguous",
                                                              causal=False, dtype=FP16, seed=6, Hq=w, Hkv=w,
                                                              window=(3, 2)),
    "ring causal contiguous reference": _check_merge_in_group,
    # The world-size-dependent part (steps, chunk indices, accumulators round the ring) does not depend on the
    # local kernel, so the 4-rank group runs ring and all-gather on the reference backend (interpreted kernels on
    # 4 processes sharing the CPU are slow); they run in the interpreter in the 2-rank group.
    "ring causal zigzag fp32 GQA on reference": lambda r, w: _case(r, w, method="ring", layout="zigzag",
                                                                   causal=True, dtype=torch.float32,
                                                                   backend="reference", seed=8,
                                                                   expected_calls=_ring_calls),
    "allgather causal zigzag fp16 GQA on reference": lambda r, w: _case(r, w, method="allgather",
                                                                        layout="zigzag", causal=True, dtype=FP16,
                                                                        backend="reference", seed=9,
                                                                        expected_calls=_allgather_calls),
    "round trip": _check_round_trip,
    "group of size 1": _check_size_one_group,
    "errors": _check_errors,
    "sdpa routing under torch context_parallel": _check_sdpa_routing_under_torch_context_parallel,
    "benchmark entry": _check_benchmark_entry,
}

SUITES = {
    2: [name for name in CHECKS if not name.endswith("on reference")],
    4: ["ring causal zigzag fp32 GQA on reference", "allgather causal zigzag fp16 GQA on reference",
        "ulysses causal zigzag fp32 GQA", "ring causal contiguous reference", "round trip", "errors"],
}


def _worker(rank, world, port, out_dir, names):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    _alloc.set_poison(True)
    failed, seconds = {}, {}
    for name in names:
        start = time.perf_counter()
        try:
            CHECKS[name](rank, world)
        except Exception:
            failed[name] = traceback.format_exc()
        seconds[name] = round(time.perf_counter() - start, 2)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"ran": names, "failed": failed, "seconds": seconds}, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_group(world: int, worker, *args) -> list:
    """Run ``worker(rank, world, port, out_dir, *args)`` in ``world`` fresh processes; each rank's JSON report."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, _free_port(), out_dir, *args), nprocs=world, join=True)
        reports = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                reports.append(json.load(f))
    return reports


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_group(world):
    reports = spawn_group(world, _worker, SUITES[world])
    problems = [f"rank {r}, {name}:\n{tb}" for r, rep in enumerate(reports) for name, tb in rep["failed"].items()]
    assert all(rep["ran"] == SUITES[world] for rep in reports)
    assert not problems, "\n".join(problems)


def test_merge_partials_with_rows_that_saw_nothing():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 3, 5, 9, generator=gen, dtype=torch.float64)
    values = torch.randn(2, 3, 9, 4, generator=gen, dtype=torch.float64)
    hidden = torch.zeros(5, 9, dtype=torch.bool)
    hidden[1, :4] = True  # row 1 sees nothing in block A
    hidden[2, 4:] = True  # row 2 sees nothing in block B
    hidden[3, :] = True  # row 3 sees nothing at all
    scores = scores.masked_fill(hidden, float("-inf"))

    def partial(cols):
        s = scores[..., cols]
        lse = torch.logsumexp(s, -1)
        w = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
        return (w @ values[..., cols, :]).float(), lse.float()

    out_a, lse_a = partial(slice(0, 4))
    out_b, lse_b = partial(slice(4, 9))
    out_a[..., 1, :] = float("nan")  # a block's output on a row it did not see must not be read
    out, lse = lkd.merge_partials(out_a, lse_a, out_b, lse_b)
    whole_lse = torch.logsumexp(scores, -1)
    whole = (torch.exp(scores - whole_lse.unsqueeze(-1)).nan_to_num(0.0) @ values)
    assert out.dtype == lse.dtype == torch.float32
    assert torch.isneginf(lse[..., 3]).all() and (out[..., 3, :] == 0).all()
    assert torch.allclose(out.double(), whole, atol=2e-6, rtol=0)
    seen = ~hidden.all(-1)
    assert torch.allclose(lse[..., seen].double(), whole_lse[..., seen], atol=2e-6, rtol=0)
    # a NaN in a row that a block did see still shows
    out_b[0, 0, 0, 0] = float("nan")
    assert torch.isnan(lkd.merge_partials(out_a, lse_a, out_b, lse_b)[0][0, 0, 0, 0])


def test_not_initialised():
    if dist.is_initialized():
        pytest.skip("this process has a process group")
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialised"):
        lkd.shard(x, 2)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialised"):
        lkd.context_parallel_attention(x, x, x)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_local_block_partials_are_fp32_and_use_the_whole_rows_lse(backend):
    """One key block of a causal row set, as a ring step computes it: the forward's partial comes back in fp32,
    unrounded (fp16 inputs; almost no element is an fp16 value), within the tolerance rule, and the block's backward
    with the lse of the *whole* rows gives that block's share of the whole attention's gradients."""
    from llmkernels.distributed import local

    gen = torch.Generator().manual_seed(4)
    B, Hq, Hkv, L, S, E = 1, 4, 2, 5, 15, 19  # 5 queries, their keys: 10 earlier ones, then the causal diagonal
    q = torch.randn(B, Hq, L, E, generator=gen).half()
    k = torch.randn(B, Hkv, S, E, generator=gen).half()
    v = torch.randn(B, Hkv, S, E, generator=gen).half()
    block = slice(4, S)  # keys 4..14: a block that ends on the diagonal (bottom-right causal)
    scale = E ** -0.5
    out, lse = local.forward(backend, q, k[:, :, block], v[:, :, block], True, True, scale, 0.0)
    ref_out, ref_lse = reference.scaled_dot_product_attention(
        q.double(), k[:, :, block].double(), v[:, :, block].double(), is_causal=True, enable_gqa=True,
        causal_alignment="bottom_right", return_lse=True)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert (out != out.half().float()).float().mean().item() > 0.9, "the partial was rounded to fp16"
    naive_out, naive_lse = reference.scaled_dot_product_attention(
        q, k[:, :, block], v[:, :, block], is_causal=True, enable_gqa=True, causal_alignment="bottom_right",
        return_lse=True)
    assert_by_rule("partial out", out, ref_out, naive_out, torch.float16)
    assert_by_rule("partial lse", lse, ref_lse, naive_lse, torch.float16)

    # The whole rows (every key 0..14, bottom-right causal) and their gradients in float64.
    ins = [_leaf(t.double()) for t in (q, k, v)]
    whole_out, whole_lse = reference.scaled_dot_product_attention(*ins, is_causal=True, enable_gqa=True,
                                                                  causal_alignment="bottom_right",
                                                                  return_lse=True)
    grad_out = torch.randn(whole_out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(whole_lse.shape, generator=gen, dtype=torch.float64)
    # The block's share: gradients through the block's keys only (the other keys' weights held by the lse).
    dq_all, dk_all, dv_all = torch.autograd.grad([whole_out, whole_lse], ins, [grad_out, grad_lse])
    other = slice(0, 4)
    dq_p, dk_p, dv_p = local.backward(backend, grad_out.half(), q, k[:, :, block], v[:, :, block],
                                      whole_out.half(), whole_lse.float(), grad_lse.float(), True, True, scale, 0.0)
    assert dq_p.dtype == dk_p.dtype == dv_p.dtype == torch.float32
    # dK, dV of the block's keys are the whole gradient's rows for those keys. The absolute bound is for what this
    # test is about, the weights' normalisation (one over the block's own keys is off by O(1) here); the
    # gradients' precision is held to the tolerance rule in the spawned groups.
    assert torch.allclose(dk_p.double(), dk_all[:, :, block], atol=2e-2, rtol=0)
    assert torch.allclose(dv_p.double(), dv_all[:, :, block], atol=2e-2, rtol=0)
    # dQ of the block plus dQ of the other keys' block (top-left: fully visible) is the whole dQ.
    dq_o, _, _ = local.backward(backend, grad_out.half(), q, k[:, :, other], v[:, :, other], whole_out.half(),
                                whole_lse.float(), grad_lse.float(), False, False, scale, 0.0)
    assert torch.allclose((dq_p + dq_o).double(), dq_all, atol=2e-2, rtol=0)
