"""Decode benchmark: one new query per sequence against a long KV cache (``python -m benchmarks.run decode``).

Rows: B in {1, 8, 64} x S in {1k, 8k, 32k, 128k}, Hq 32 / Hkv 8, head dim 128, bf16, with the cache contiguous
(B, S, Hkv, E) or paged in pages of 16 or 256 positions (pages in random order). The metric is the bandwidth of
the K/V bytes the call must read (B * S * Hkv * (E + Ev) * 2), against the device-to-device copy ceiling measured
at the start of the same run (timing.measure_ceilings: bytes read + written per second).

Providers:
  ours           llmkernels.attention_with_kvcache (split-K, num_splits=0: the heuristic)
  ours-nosplit   the same with num_splits=1 (the batch-invariant mode)
  llmk-fa-fwd    our FlashAttention forward kernel on the contiguous cache (the non-split path the dense op
                 took for decode before the split-K hook)
  sdpa-flash, sdpa-efficient, sdpa-cudnn
                 torch.nn.functional.scaled_dot_product_attention(enable_gqa=True) on the contiguous cache,
                 that backend forced (no paged cache: unavailable on paged rows)
  flex           flex_attention under torch.compile on the contiguous cache (enable_gqa; unavailable on paged rows)
The CUDA-only providers are skipped on CPU with the reason. On CPU (``--sweep tiny`` is implied) the rows are
tiny, the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 is set when it is unset): a check
that the path runs, not a speed. Each row's output is checked against the float32 reference where that is small.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks import environment, metrics, report, timing

LAYOUTS = ("contiguous", "paged16", "paged256")
PROVIDER_NAMES = ("ours", "ours-nosplit", "llmk-fa-fwd", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex")
CUDA_ONLY = {"sdpa-flash": "SDPA's flash backend runs on CUDA only",
             "sdpa-efficient": "SDPA's memory-efficient backend runs on CUDA only",
             "sdpa-cudnn": "SDPA's cuDNN backend runs on CUDA only",
             "flex": "FlexAttention is timed compiled on CUDA only"}
CHECK_MAX_KEYS = 2**16  # B * S up to this: check the output against the float32 reference


@dataclass(frozen=True)
class DecodeWorkload:
    B: int
    S: int
    layout: str
    Hq: int = 32
    Hkv: int = 8
    E: int = 128
    dtype: str = "bf16"

    @property
    def page_size(self):
        return {"contiguous": None, "paged16": 16, "paged256": 256}[self.layout]

    @property
    def label(self) -> str:
        return f"decode B={self.B} S={self.S} Hq={self.Hq}/Hkv={self.Hkv} d{self.E} {self.dtype} {self.layout}"

    @property
    def kv_bytes(self) -> int:
        return self.B * self.S * self.Hkv * 2 * self.E * 2  # K and V, 2-byte elements


def decode_workloads(device: str) -> list:
    if device == "cuda":
        return [DecodeWorkload(B, S, layout) for B in (1, 8, 64) for S in (1024, 8192, 32768, 131072)
                for layout in LAYOUTS]
    # CPU: the interpreter runs every program in Python; one tiny shape per layout shows the paths run.
    return [DecodeWorkload(1, 256, layout, Hq=8, Hkv=2, E=64) for layout in LAYOUTS]


def make_inputs(w: DecodeWorkload, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16
    q = torch.randn(w.B, 1, w.Hq, w.E, generator=g, device=device, dtype=dtype)
    k_dense = torch.randn(w.B, w.S, w.Hkv, w.E, generator=g, device=device, dtype=dtype)
    v_dense = torch.randn(w.B, w.S, w.Hkv, w.E, generator=g, device=device, dtype=dtype)
    inp = dict(q=q, k_dense=k_dense, v_dense=v_dense, seqlens=torch.full((w.B,), w.S, dtype=torch.int32,
                                                                           device=device))
    if w.page_size is None:
        inp.update(k_cache=k_dense, v_cache=v_dense, block_table=None)
        return inp
    per_seq = w.S // w.page_size
    pages = torch.randperm(w.B * per_seq, generator=g, device=device)
    table = pages.view(w.B, per_seq).to(torch.int32)
    k_cache = torch.empty(w.B * per_seq, w.page_size, w.Hkv, w.E, device=device, dtype=dtype)
    v_cache = torch.empty_like(k_cache)
    k_cache[pages] = k_dense.reshape(w.B * per_seq, w.page_size, w.Hkv, w.E)
    v_cache[pages] = v_dense.reshape(w.B * per_seq, w.page_size, w.Hkv, w.E)
    inp.update(k_cache=k_cache, v_cache=v_cache, block_table=table)
    return inp


class Unavailable(Exception):
    pass


def prepare(name: str, w: DecodeWorkload, inp: dict, device: str):
    """A zero-argument call returning (B, 1, Hq, E), or raises Unavailable with the reason."""
    import llmkernels

    q, kc, vc, table, seqlens = inp["q"], inp["k_cache"], inp["v_cache"], inp["block_table"], inp["seqlens"]
    if name in ("ours", "ours-nosplit"):
        splits = 0 if name == "ours" else 1
        return lambda: llmkernels.attention_with_kvcache(q, kc, vc, seqlens, block_table=table, num_splits=splits,
                                                         backend="triton")
    if w.page_size is not None:
        raise Unavailable("takes no paged KV cache")
    qt, kt, vt = q.transpose(1, 2), inp["k_dense"].transpose(1, 2), inp["v_dense"].transpose(1, 2)
    if name == "llmk-fa-fwd":
        from llmkernels.triton_kernels import attention

        scale = w.E ** -0.5
        return lambda: attention.attention_forward(qt, kt, vt, None, 0.0, False, scale, None, None,
                                                   decode_path=False)[0].transpose(1, 2)
    if device != "cuda":
        raise Unavailable(CUDA_ONLY[name])
    if name == "flex":
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        # FlexAttention wants contiguous (B, H, S, E) keys: copied once here, outside the timed call.
        kc, vc = kt.contiguous(), vt.contiguous()
        return lambda: compiled(qt, kc, vc, enable_gqa=True).transpose(1, 2)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
               "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}[name]

    def call():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True).transpose(1, 2)
    return call


def check(out: torch.Tensor, w: DecodeWorkload, inp: dict):
    """(max error vs the float32 reference, bound = 2 x the bf16 reference's error + 1e-3), or None when big."""
    if w.B * w.S > CHECK_MAX_KEYS:
        return None
    from llmkernels import reference

    up = (lambda t: t.float())
    args = (inp["q"], inp["k_dense"], inp["v_dense"], inp["seqlens"])
    ref = reference.attention_with_kvcache(*(up(t) for t in args[:3]), args[3])
    naive = reference.attention_with_kvcache(*args)
    err = (out.float() - ref).abs().max().item()
    bound = 2 * (naive.float() - ref).abs().max().item() + 1e-3
    return err, bound


def main(args) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            os.environ["TRITON_INTERPRET"] = "1"  # before the decode kernels are first imported
        print("CPU RUN: no CUDA GPU is visible. Tiny decode rows in Triton's interpreter (not speeds).", flush=True)
    env = environment.collect()
    print(environment.describe(env), flush=True)
    ceilings = timing.measure_ceilings(device)
    copy = ceilings["copy_gbps"]
    print(f"copy ceiling: {copy:.0f} GB/s ({ceilings['copy_desc']})", flush=True)
    providers = [p for p in PROVIDER_NAMES if args.providers is None or p in args.providers]
    work = decode_workloads(device)
    if args.seqlens:
        work = [w for w in work if w.S in args.seqlens]
    rows, started = [], time.time()
    for w in work:
        inp = make_inputs(w, device)
        for name in providers:
            row = {"op": "decode", "provider": name, "label": w.label, "workload": asdict(w), "status": "pending"}
            try:
                if device == "cpu" and name in CUDA_ONLY:
                    raise Unavailable(f"skipped on CPU: {CUDA_ONLY[name]}")
                if args.time_budget and time.time() - started > args.time_budget:
                    raise Unavailable(f"skipped: the time budget (--time-budget {args.time_budget:g} s) is used up")
                fn = prepare(name, w, inp, device)
                out = fn()
                checked = check(out, w, inp)
                if checked is not None:
                    row["max_err"], row["err_bound"] = checked
                    row["check"] = "ok" if checked[0] <= checked[1] else "FAIL"
                ms = timing.median_ms(fn, device)
                row.update(status="ok", ms=ms, gbps=metrics.gbps(w.kv_bytes, ms))
                row["fraction_of_copy"] = row["gbps"] / copy
            except Unavailable as exc:
                row["status"] = f"unavailable: {exc}" if not str(exc).startswith("skipped") else str(exc)
            except Exception as exc:  # reported per row; the sweep goes on
                row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            rows.append(row)
            text = (f"{row['ms']:.4g} ms, {row['gbps']:.3g} GB/s of K/V ({100 * row['fraction_of_copy']:.0f}% of "
                    f"copy){', check ' + row['check'] if 'check' in row else ''}" if row["status"] == "ok"
                    else row["status"])
            print(f"{w.label} | {name}: {text}", flush=True)
        del inp
        if device == "cuda":
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "decode_results.json")
    report.write_json(path, {"env": env, "ceilings": ceilings, "rows": rows,
                             "notes": "gbps: K/V bytes read per second; fraction_of_copy: against copy_gbps "
                                      "(read + write) measured in the same run"})
    print(f"wrote {path} ({time.time() - started:.0f} s)")
    failed = [r for r in rows if r.get("check") == "FAIL" or r["status"].startswith("error")]
    return 1 if failed else 0
