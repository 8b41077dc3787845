"""Context-parallel attention (llmkernels.distributed): time per call of each method against single-device
attention on 1/N of the work.

    torchrun --nproc_per_node 8 -m benchmarks.bench_context_parallel                 # NCCL, one GPU per rank
    torchrun --nproc_per_node 8 -m benchmarks.bench_context_parallel --seqlens 32768 131072 --methods ring
    python -m benchmarks.bench_context_parallel --smoke       # CPU: spawns 2 gloo ranks, tiny shapes
    python -m benchmarks.run context-parallel                 # the same smoke run from the suite's entry

Each row: method, layout, causal, pass (fwd or fwd+bwd), the time per call (median over the repeats of the
slowest rank's time: a collective call ends when its last rank does), and ``ideal_ms``: single-device attention
over the whole sequence, timed on every rank and divided by N, i.e. perfect scaling; ``efficiency`` =
ideal_ms / ms. Rank 0 prints the rows and writes them as JSON with ``--out``. On the CPU (gloo, every rank on
the same cores, the Triton interpreter or the reference backend) the numbers only show that the entry runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_collective(fn, device, warmup: int, reps: int) -> float:
    """Median over ``reps`` of the slowest rank's time of one call, in ms. Every rank runs the same number of
    calls (an adaptive repeat count, as triton's do_bench, could differ between ranks and deadlock)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item() * 1e3)
    return statistics.median(times)


def run_rows(args, device) -> list:
    """Measure every (seqlen, method, causal, pass) of ``args`` in this rank; the same list on every rank."""
    from llmkernels import distributed as lkd
    from llmkernels import ops

    world = dist.get_world_size()
    dtype = DTYPES[args.dtype]
    rows = []
    for L in args.seqlens:
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(args.batch, h, L, args.head_dim, generator=gen, device=device, dtype=dtype)
                   for h in (args.heads, args.kv_heads, args.kv_heads))
        gqa = args.heads != args.kv_heads
        for causal in args.causal:
            for mode in args.modes:
                def single():
                    leaves = [t.detach().requires_grad_(mode != "fwd") for t in (q, k, v)]
                    out = ops.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=gqa,
                                                           backend=args.backend)
                    if mode != "fwd":
                        out.backward(torch.ones_like(out))

                ideal = time_collective(single, device, args.warmup, args.reps) / world
                for method in args.methods:
                    shards = [lkd.shard(t, 2, layout=args.layout).detach() for t in (q, k, v)]

                    def parallel():
                        leaves = [t.requires_grad_(mode != "fwd") for t in shards]
                        out = lkd.context_parallel_attention(*leaves, method=method, is_causal=causal,
                                                             enable_gqa=gqa, backend=args.backend,
                                                             layout=args.layout)
                        if mode != "fwd":
                            out.backward(torch.ones_like(out))

                    try:
                        ms = time_collective(parallel, device, args.warmup, args.reps)
                        row = dict(status="ok", ms=ms, efficiency=ideal / ms)
                    except (ValueError, RuntimeError) as exc:  # e.g. heads not divisible for ulysses
                        row = dict(status="error: " + str(exc).splitlines()[0], ms=None, efficiency=None)
                    rows.append(dict(method=method, layout=args.layout, world=world, L=L, B=args.batch,
                                     Hq=args.heads, Hkv=args.kv_heads, E=args.head_dim, dtype=args.dtype,
                                     causal=causal, mode=mode, ideal_ms=ideal, device=device.type,
                                     backend=args.backend or "auto", **row))
    return rows


def _print_rows(rows) -> None:
    for r in rows:
        ms = f"{r['ms']:.3f} ms, efficiency {r['efficiency']:.2f}" if r["ms"] is not None else r["status"]
        print(f"{r['method']:>9} {r['layout']} W={r['world']} L={r['L']} {r['dtype']} "
              f"{'causal' if r['causal'] else 'full'} {r['mode']}: {ms} (ideal {r['ideal_ms']:.3f} ms)")


def _rank_main(args) -> list:
    """One rank: join the group (torchrun's environment, or the smoke spawner's), measure, report."""
    if torch.cuda.is_available() and not args.smoke:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    try:
        rows = run_rows(args, device)
        if dist.get_rank() == 0:
            _print_rows(rows)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
        return rows
    finally:
        dist.destroy_process_group()


def _smoke_worker(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    _rank_main(args)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMOKE = dict(seqlens=[16], batch=1, heads=2, kv_heads=2, head_dim=16, dtype="fp32", causal=[True],
             modes=["fwd+bwd"], warmup=1, reps=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_context_parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["ring", "allgather", "ulysses"])
    p.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    p.add_argument("--seqlens", nargs="+", type=int, default=[16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--causal", nargs="+", type=lambda s: s.lower() in ("1", "true", "causal"),
                   default=[True, False], metavar="BOOL")
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--backend", default=None, help="llmkernels backend (default: auto)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="write the rows as JSON (rank 0)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU: spawn 2 gloo ranks and run tiny shapes (the other size options are ignored)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke and "RANK" not in os.environ:
        import torch.multiprocessing as mp

        if not torch.cuda.is_available():
            # The Triton kernels run on CPU tensors only in Triton's interpreter; without it "auto" takes the
            # reference backend. Set before the spawned ranks import the kernels.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        mp.spawn(_smoke_worker, args=(2, _free_port(), args), nprocs=2, join=True)
        return 0
    _rank_main(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
