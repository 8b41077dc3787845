"""The benchmark suite's command line.

    python -m benchmarks.run                 quick sweep on a GPU; on a CPU-only machine: small CPU sweep + the
                                             static kernel report (representative configs)
    python -m benchmarks.run --full          every workload (GPU), every Triton config in the static report
    python -m benchmarks.run static [--full] only the static kernel report (sm_90 and sm_80, no GPU needed)
    python -m benchmarks.run ceilings        only the copy and matmul ceilings
    python -m benchmarks.run decode          KV-cache decode rows (benchmarks/decode.py): GB/s of K/V read vs the
                                             copy ceiling; tiny rows in the interpreter on CPU
    python -m benchmarks.run env             only the environment
    python -m benchmarks.run context-parallel  the context-parallel entry's CPU smoke run (2 gloo ranks); on a
                                             multi-GPU node run benchmarks/bench_context_parallel.py with torchrun
    python -m benchmarks.run --dry-run       list the workloads and providers a sweep would run

Results go to --out (default benchmarks/out/): results.json (environment, ceilings, one row per workload and
provider), plots/*.png and static_report.json. ``python -m benchmarks.run -h`` lists the filters.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

if __package__ in (None, ""):  # run as a script (python benchmarks/run.py): make the package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import environment, metrics, report, timing, workloads  # noqa: E402
from benchmarks.providers import PROVIDERS, Unavailable, provider_names  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
OPS = ("attention", "softmax")

# The correctness check computes a float32 (float64 for fp32 inputs) reference materialising the full score
# matrix; above these sizes it is left out (it would take more memory than the workload itself).
CHECK_MAX_ELEMENTS = {"cuda": 2**30, "cpu": 2**24}


# ----------------------------------------------------------------------------------------------------------------
# correctness check of each provider's forward output (forward workloads only)


def _high(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def reference_outputs(inp, device: str):
    """(reference in high precision, error of the naive low-precision reference), or None when too large.

    The rule is FlashAttention's: a kernel may be off the precise reference by at most twice what the naive
    computation in the input dtype is off by (plus a small absolute floor)."""
    from llmkernels import reference

    w = inp.workload
    if w.mode != "fwd":
        return None
    hi = _high(w.torch_dtype)
    up = (lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(hi)))
    if getattr(w, "varlen", False):
        if sum(n * n for n in w.lengths) * w.H > CHECK_MAX_ELEMENTS[device]:
            return None
        cu, n = inp.cu_seqlens, inp.max_seqlen
        ref = reference.varlen_attention(up(inp.q), up(inp.k), up(inp.v), cu, cu, n, n, is_causal=w.causal)
        naive = reference.varlen_attention(inp.q, inp.k, inp.v, cu, cu, n, n, is_causal=w.causal)
    elif hasattr(inp, "q"):
        if w.B * w.Hq * w.L * w.S > CHECK_MAX_ELEMENTS[device]:
            return None
        kw = dict(is_causal=w.causal, enable_gqa=inp.enable_gqa, **inp.variant_kwargs())
        ref = reference.scaled_dot_product_attention(up(inp.q), up(inp.k), up(inp.v), up(inp.mask), **kw)
        naive = reference.scaled_dot_product_attention(inp.q, inp.k, inp.v, inp.mask, **kw)
    else:
        if w.numel > CHECK_MAX_ELEMENTS[device] // 4:
            return None
        ref = reference.masked_softmax(up(inp.x), up(inp.mask), scale=w.scale, is_causal=w.causal)
        naive = reference.masked_softmax(inp.x, inp.mask, scale=w.scale, is_causal=w.causal)
    naive_err = (naive.to(hi) - ref).abs().max().item()
    return ref, naive_err


def check_output(out: torch.Tensor, refs) -> dict:
    ref, naive_err = refs
    err = (out.detach().to(ref.dtype) - ref).abs().max().item()
    bound = 2 * naive_err + 1e-5
    return {"max_err": err, "err_bound": bound, "check": "ok" if err <= bound else "FAIL"}  # NaN -> FAIL


# ----------------------------------------------------------------------------------------------------------------
# one measurement


def _first_line(text: str) -> str:
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def classify_failure(exc: BaseException, caught: list) -> str:
    """Status text for a provider that raised: "unavailable" when the implementation declines the inputs
    (PyTorch explains why in warnings), "error" otherwise."""
    msg = _first_line(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"error: out of memory ({msg[:120]})"
    text = str(exc)
    if "No available kernel" in text or "No viable backend" in text:
        why = [" ".join(str(w.message).split()) for w in caught]
        return "unavailable: " + ("; ".join(dict.fromkeys(why)) or msg)
    if type(exc).__name__ == "NotSupportedError" or isinstance(exc, NotImplementedError):
        return "unavailable: " + " ".join(text.split())
    return f"error: {type(exc).__name__}: {msg}"


def _timed_call(prepared, out, mode: str, leaves: list):
    """The callable to time for ``mode`` and the tensors whose gradients reset between calls."""
    if mode == "fwd":
        return prepared.forward, None
    dout = torch.randn_like(out)
    if mode == "bwd":  # the graph of one forward, differentiated again and again
        return (lambda: out.backward(dout, retain_graph=True)), leaves
    return (lambda: prepared.forward().backward(dout)), leaves


def base_row(op: str, w, provider: str) -> dict:
    from dataclasses import asdict

    return {"op": op, "provider": provider, "label": w.label, "group": w.group, "x": w.x_value,
            "workload": asdict(w), "status": "pending"}


def measure(provider, inp, device: str, refs, ceilings: dict) -> dict:
    w = inp.workload
    row = base_row(provider.op, w, provider.name)
    out = fn = prepared = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            prepared = provider.prepare(inp)
            with prepared.context():
                out = prepared.forward()
                timing._sync(device)
                if refs is not None:
                    row.update(check_output(out, refs))
                fn, grad_to_none = _timed_call(prepared, out, w.mode, inp.leaves)
                if w.mode != "fwd":
                    fn()  # the first backward (compiles it, for compiled providers)
                    timing._sync(device)
                row["ms"] = timing.median_ms(fn, device, grad_to_none)
                peak = timing.peak_extra_bytes(fn, device, grad_to_none)
            row["peak_extra_mib"] = None if peak is None else peak / 2**20
            row["status"] = "ok"
        except Unavailable as exc:
            row["status"] = f"unavailable: {exc}"
        except Exception as exc:  # reported per row; the sweep goes on
            row["status"] = classify_failure(exc, caught)
        finally:
            for t in inp.leaves:
                t.grad = None
            del out, fn, prepared
    if row["status"] == "ok":
        ms = row["ms"]
        if provider.op == "attention":
            row["tflops"] = metrics.tflops(w.flops(), ms)
            row["fraction_of_matmul"] = row["tflops"] / ceilings["matmul_tflops"]
            if w.mode == "fwd":
                row["gbps"] = metrics.gbps(inp.forward_bytes(), ms)
                row["fraction_of_copy"] = row["gbps"] / ceilings["copy_gbps"]
        else:
            row["gbps"] = metrics.gbps(inp.nbytes(), ms)
            row["fraction_of_copy"] = row["gbps"] / ceilings["copy_gbps"]
    return row


def _progress_text(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"][:160]
    rate = (f"{row['tflops']:.3g} TFLOP/s" if row["op"] == "attention" else f"{row['gbps']:.3g} GB/s")
    check = f", check {row['check']}" if "check" in row else ""
    return f"{row['ms']:.3f} ms, {rate}{check}"


# ----------------------------------------------------------------------------------------------------------------
# the sweep


def plan(args, device: str) -> list:
    """[(op, workload, [providers])] for the chosen sweep and filters."""
    sweep_name = args.sweep or ("cpu" if device == "cpu" else ("full" if args.full else "quick"))
    kinds = args.kinds
    out = []
    for op in args.ops:
        if op == "attention":  # the dense rows and the packed variable-length rows (their own providers)
            table = workloads.attention_workloads(sweep_name) + workloads.varlen_workloads(sweep_name)
        else:
            table = workloads.softmax_workloads(sweep_name)
        ws = workloads.select(table, args.dtypes, args.modes, args.seqlens, kinds)
        provs = [p for p in PROVIDERS if p.op == op and (args.providers is None or p.name in args.providers)]
        out += [(op, w, [p for p in provs if p.varlen == getattr(w, "varlen", False)]) for w in ws]
    out.sort(key=lambda item: workloads.priority(item[1]))  # stable: keeps the order within a priority
    return out, sweep_name


def sweep(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = environment.collect()
    if device == "cpu":
        print("CPU RUN: no CUDA GPU is visible. Timing the CPU paths at small sizes (these are not GPU numbers);"
              + (" then the static kernel report." if args.static is not False else ""), flush=True)
    print(environment.describe(env), flush=True)
    work, sweep_name = plan(args, device)
    total = sum(len(p) for _, _, p in work)
    print(f"sweep {sweep_name!r}: {len({id(w) for _, w, _ in work})} workloads, {total} measurements", flush=True)
    if args.dry_run:
        for op, w, provs in work:
            print(f"  {op:<9} {w.label}  [{', '.join(p.name for p in provs)}]")
        return 0
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    ceilings = timing.measure_ceilings(device)
    print(f"ceilings: {ceilings['copy_gbps']:.0f} GB/s ({ceilings['copy_desc']}); "
          f"{ceilings['matmul_tflops']:.1f} TFLOP/s ({ceilings['matmul_desc']})", flush=True)
    payload = {"env": env, "sweep": sweep_name, "command": " ".join(sys.argv), "ceilings": ceilings, "rows": [],
               "notes": "ms: median; tflops: FlashAttention's FLOP convention; gbps: least bytes moved; "
                        "peak_extra_mib: max_memory_allocated during one call minus memory allocated before it; "
                        "see benchmarks/README.md"}
    started = time.time()
    i = 0
    for op, w, provs in work:
        try:
            inp = w.make_inputs(device)
            refs = None if args.no_check else reference_outputs(inp, device)
        except Exception as exc:  # e.g. out of memory building the inputs: every provider's row says so
            inp, refs, setup_error = None, None, f"error: setting up the workload: {type(exc).__name__}: " \
                                                 f"{_first_line(exc)}"
        for p in provs:
            i += 1
            if inp is None:
                row = {**base_row(op, w, p.name), "status": setup_error}
            elif args.time_budget and time.time() - started > args.time_budget:
                row = {**base_row(op, w, p.name),
                       "status": f"skipped: the time budget (--time-budget {args.time_budget:g} s) is used up"}
            elif device == "cpu" and p.cpu_skip and (args.providers is None or p.name not in args.providers):
                row = {**base_row(op, w, p.name), "status": f"skipped on CPU: {p.cpu_skip}"}
            else:
                row = measure(p, inp, device, refs, ceilings)
            payload["rows"].append(row)
            print(f"[{i:>3}/{total}] {w.label} | {p.name}: {_progress_text(row)}", flush=True)
        del inp, refs
        if device == "cuda":
            torch.cuda.empty_cache()
        payload["elapsed_s"] = round(time.time() - started, 1)
        report.write_json(json_path, payload)  # after every workload: a killed run keeps what it measured
    print(report.table(payload["rows"], ceilings))
    where = env["gpu"] or "CPU"
    plots = report.plot(payload["rows"], os.path.join(args.out, "plots"),
                        f"{where}, torch {env['torch']}, triton {env['triton']}, {env['date_utc'][:10]}")
    payload["plots"] = [os.path.relpath(p, args.out) for p in plots]
    report.write_json(json_path, payload)
    print(f"\nwrote {json_path} and {len(plots)} plots in {os.path.join(args.out, 'plots')} "
          f"({time.time() - started:.0f} s)", flush=True)
    rc = 0
    if args.static or (args.static is None and device == "cpu"):
        rc = static(args)
    failed = [r for r in payload["rows"] if r.get("check") == "FAIL" or r["status"].startswith("error")]
    if failed:
        print(f"{len(failed)} rows failed the output check or raised an error (see the table)")
    return rc or (1 if failed else 0)


def static(args) -> int:
    """The static kernel report, in a fresh process without Triton's interpreter (it compiles real kernels)."""
    os.makedirs(args.out, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks.static_report", "--json", os.path.join(args.out, "static_report.json")]
    if args.full:
        cmd.append("--full")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = environment.REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    print("", flush=True)
    try:
        return subprocess.run(cmd, env=env, cwd=environment.REPO_ROOT, timeout=args.static_timeout).returncode
    except subprocess.TimeoutExpired:
        print(f"static report: stopped after --static-timeout {args.static_timeout} s")
        return 1


def ceilings_only(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("CPU RUN: no CUDA GPU is visible; these are the CPU's copy and matmul rates.")
    c = timing.measure_ceilings(device)
    print(f"copy:   {c['copy_gbps']:.0f} GB/s   ({c['copy_desc']})")
    print(f"matmul: {c['matmul_tflops']:.1f} TFLOP/s   ({c['matmul_desc']})")
    os.makedirs(args.out, exist_ok=True)
    report.write_json(os.path.join(args.out, "ceilings.json"), {"env": environment.collect(), "ceilings": c})
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", nargs="?", default="sweep", choices=["sweep", "static", "ceilings", "env",
                                                                                 "context-parallel", "decode"])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        help=f"only these providers: {', '.join(provider_names())}")
    parser.add_argument("--dtypes", nargs="+", choices=list(workloads.DTYPES), help="only these dtypes")
    parser.add_argument("--modes", nargs="+", choices=list(metrics.MODES), help="only these passes")
    parser.add_argument("--seqlens", nargs="+", type=int, metavar="N",
                        help="only these lengths (attention: L, decode: S; softmax: row length)")
    parser.add_argument("--kinds", nargs="+", metavar="KIND",
                        help="only these workload kinds: standard padding bias gqa decode window softcap alibi "
                             "varlen (attention), plain masked causal (softmax)")
    parser.add_argument("--full", action="store_true",
                        help="every workload (bf16 and fp16, both head configs, 512..16k, all passes) on a GPU; "
                             "every Triton config in the static report")
    parser.add_argument("--sweep", choices=["quick", "full", "cpu", "tiny"],
                        help="force a sweep (default: quick or --full on a GPU, cpu without one)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: benchmarks/out)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="stop measuring after this long; the rest is listed as skipped")
    parser.add_argument("--no-check", action="store_true", help="skip the output check against the reference")
    parser.add_argument("--static", dest="static", action="store_true", default=None,
                        help="add the static kernel report (default: yes on a CPU-only machine, no on a GPU)")
    parser.add_argument("--no-static", dest="static", action="store_false")
    parser.add_argument("--static-timeout", type=float, default=1800, metavar="SECONDS")
    parser.add_argument("--dry-run", action="store_true", help="list what the sweep would measure")
    args = parser.parse_args(argv)
    if args.providers:
        unknown = sorted(set(args.providers) - set(provider_names()))
        if unknown:
            parser.error(f"unknown providers {unknown}; known: {provider_names()}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "static":
        return static(args)
    if args.command == "ceilings":
        return ceilings_only(args)
    if args.command == "decode":
        from benchmarks import decode
        return decode.main(args)
    if args.command == "env":
        print(environment.describe(environment.collect()))
        return 0
    if args.command == "context-parallel":
        from benchmarks import bench_context_parallel
        return bench_context_parallel.main(["--smoke"])
    return sweep(args)


if __name__ == "__main__":
    raise SystemExit(main())
