"""The shapes the suite measures: every sweep (quick, full, CPU, and the tiny pytest-benchmark sizes) is here.

Attention follows FlashAttention's benchmark convention: batch x seqlen = 16k tokens, hidden size 2048 split
as 16 heads of 128 or 32 heads of 64, sequence lengths 512 to 16k, causal or not, forward / backward /
forward + backward, bf16 and fp16. Four extra cases cover what the convention leaves out: a bool padding mask,
a float bias (ALiBi-like, one per head), grouped-query attention (32 query heads over 8 key/value heads) and
decode (one query against a long cache). The attention variants (issue 14) get rows against the alternatives a
user has: a sliding window of 4096 keys at L = 16k (causal, GQA 32/8, head dim 128), against SDPA with the
materialised mask transformers builds and FlexAttention with a sliding-window block mask, its TFLOP/s counted
over the visible pairs; softcap 50 (Gemma 2) against Flex with a tanh score_mod; ALiBi against SDPA with a
materialised bias and Flex with a score_mod (both at the shape of the standard rows, to compare with them).

Masked softmax: rows of 128 to 128k columns, the element count fixed (2**27 on a GPU: 256 MiB in bf16, four
times the H200's L2) so every shape fills the machine; without mask, with a float mask broadcast over heads
(Megatron's (batch, 1, rows, cols) form), and causal (square score matrices).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import metrics

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


# ----------------------------------------------------------------------------------------------------------------
# attention


@dataclass(frozen=True)
class AttentionWorkload:
    """One attention call: q (B, Hq, L, E), k/v (B, Hkv, S, E); ``mask`` "none", "padding" (bool (B, 1, 1, S),
    keys past each sequence's length hidden) or "bias" (float (1, Hq, L, S), added to the scores); the
    variants, top-left aligned: ``window`` as ``window_size`` (``(4095, 0)`` is transformers' window of 4096
    keys), ``softcap``, ``alibi`` (slopes ``2^(-8(h+1)/Hq)``, shape (Hq,))."""

    kind: str  # "standard", "padding", "bias", "gqa", "decode", "window", "softcap", "alibi": table/plot groups
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    E: int
    causal: bool
    mask: str
    mode: str
    dtype: str
    window: tuple = (-1, -1)
    softcap: float = 0.0
    alibi: bool = False

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def variant_text(self) -> str:
        return ((f" window={self.window[0]},{self.window[1]}" if tuple(self.window) != (-1, -1) else "")
                + (f" softcap={self.softcap:g}" if self.softcap else "") + (" alibi" if self.alibi else ""))

    @property
    def label(self) -> str:
        heads = f"H={self.Hq}" if self.Hq == self.Hkv else f"Hq={self.Hq}/Hkv={self.Hkv}"
        extra = ((" causal" if self.causal else "") + ("" if self.mask == "none" else f" {self.mask}")
                 + self.variant_text)
        return f"{self.kind} {self.dtype} B={self.B} {heads} L={self.L} S={self.S} E={self.E}{extra} {self.mode}"

    @property
    def group(self) -> str:
        """Rows that differ only in sequence length share a group (one plot, one line per provider)."""
        heads = f"H{self.Hq}" if self.Hq == self.Hkv else f"Hq{self.Hq}-Hkv{self.Hkv}"
        return (f"attention_{self.kind}_{self.dtype}_{heads}_E{self.E}{'_causal' if self.causal else ''}"
                f"{'' if self.mask == 'none' else '_' + self.mask}{self.variant_text.replace(' ', '_')}"
                f"_{self.mode.replace('+', '')}")

    @property
    def x_value(self) -> int:
        return self.S if self.kind == "decode" else self.L

    def flops(self) -> float:
        return metrics.attention_flops(self.B, self.Hq, self.L, self.S, self.E, self.E, self.causal, self.mode,
                                       window=self.window)

    def make_inputs(self, device: str, seed: int = 0) -> "AttentionInputs":
        g = torch.Generator(device=device).manual_seed(seed)
        dt = self.torch_dtype
        grad = self.mode != "fwd"

        def rnd(*shape):  # random data, never zeros: timings and checks on realistic values
            return torch.randn(*shape, generator=g, device=device, dtype=dt).requires_grad_(grad)

        q = rnd(self.B, self.Hq, self.L, self.E)
        k = rnd(self.B, self.Hkv, self.S, self.E)
        v = rnd(self.B, self.Hkv, self.S, self.E)
        mask = lengths = None
        if self.mask == "padding":
            # each sequence keeps between half and all of its keys (at least one: no fully masked rows)
            lengths = torch.randint(max(1, self.S // 2), self.S + 1, (self.B,), generator=g, device=device)
            lengths[0] = self.S
            keys = torch.arange(self.S, device=device)
            mask = (keys[None, :] < lengths[:, None]).view(self.B, 1, 1, self.S)
        elif self.mask == "bias":
            # ALiBi-like: a per-head slope times the distance, plus noise so no two entries are alike
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / self.Hq) for h in range(self.Hq)], device=device)
            dist = (torch.arange(self.L, device=device)[:, None] - torch.arange(self.S, device=device)[None, :])
            bias = -slopes[:, None, None] * dist.abs().float()
            bias += 0.1 * torch.randn(self.Hq, self.L, self.S, generator=g, device=device)
            mask = bias.unsqueeze(0).to(dt)
        elif self.mask != "none":
            raise ValueError(f"unknown attention mask kind {self.mask!r}")
        slopes = None
        if self.alibi:
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / self.Hq) for h in range(self.Hq)], device=device)
        return AttentionInputs(self, q, k, v, mask, lengths, slopes)


@dataclass
class AttentionInputs:
    workload: AttentionWorkload
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: Optional[torch.Tensor]  # as passed to the call (unexpanded)
    lengths: Optional[torch.Tensor] = None  # the padding mask as per-sequence key counts (FlexAttention's form)
    alibi_slopes: Optional[torch.Tensor] = None  # (Hq,) float32

    @property
    def enable_gqa(self) -> bool:
        return self.workload.Hq != self.workload.Hkv

    def variant_kwargs(self) -> dict:
        """The variant arguments of llmkernels' call (and of the reference), only those that are set."""
        w = self.workload
        kw = {}
        if tuple(w.window) != (-1, -1):
            kw["window_size"] = tuple(w.window)
        if w.softcap:
            kw["softcap"] = w.softcap
        if self.alibi_slopes is not None:
            kw["alibi_slopes"] = self.alibi_slopes
        return kw

    def materialised_mask(self) -> Optional[torch.Tensor]:
        """What a caller without a kernel for the window or ALiBi passes to SDPA: the window (and the causal
        rule) as a bool (1, 1, L, S) mask, as transformers materialises it; ALiBi as a (1, Hq, L, S) bias in the
        input dtype (with the causal rule as -inf). Without either: the workload's own mask."""
        w = self.workload
        if tuple(w.window) == (-1, -1) and not w.alibi:
            return self.mask
        if self.mask is not None:
            raise ValueError("the suite materialises a window or ALiBi only for workloads without a mask")
        dev = self.q.device
        dist = torch.arange(w.L, device=dev)[:, None] - torch.arange(w.S, device=dev)[None, :]  # i - j
        keep = torch.ones(w.L, w.S, dtype=torch.bool, device=dev)
        if w.causal:
            keep &= dist >= 0
        if w.window[0] >= 0:
            keep &= dist <= w.window[0]
        if w.window[1] >= 0:
            keep &= -dist <= w.window[1]
        if not w.alibi:
            return keep.view(1, 1, w.L, w.S)
        bias = -self.alibi_slopes.view(-1, 1, 1) * dist.abs().float()
        return bias.masked_fill(~keep, float("-inf")).unsqueeze(0).to(self.q.dtype)

    def mask_bytes(self) -> int:
        return 0 if self.mask is None else metrics.tensor_bytes(self.mask)

    def forward_bytes(self) -> int:
        w = self.workload
        return metrics.attention_forward_bytes(w.B, w.Hq, w.Hkv, w.L, w.S, w.E, w.E, self.q.element_size(),
                                               self.mask_bytes())

    @property
    def leaves(self) -> list:
        return [self.q, self.k, self.v]


def _fa_convention(seqlens, head_configs, dtypes, modes, causals, tokens: int) -> list:
    out = []
    for dtype in dtypes:
        for H, E in head_configs:
            for causal in causals:
                for mode in modes:
                    for L in seqlens:
                        out.append(AttentionWorkload("standard", max(1, tokens // L), H, H, L, L, E, causal,
                                                     "none", mode, dtype))
    return out


def _attention_extras(dtypes, modes, L: int, tokens: int, decode_S: int, H: int, E: int) -> list:
    B = max(1, tokens // L)
    out = []
    for dtype in dtypes:
        for mode in modes:
            out += [
                AttentionWorkload("padding", B, H, H, L, L, E, False, "padding", mode, dtype),
                AttentionWorkload("bias", B, H, H, L, L, E, False, "bias", mode, dtype),
                AttentionWorkload("gqa", B, 2 * H, H // 2, L, L, E, True, "none", mode, dtype),
            ]
        # decode is a forward-only situation (one new token per step against the cache)
        out.append(AttentionWorkload("decode", max(1, tokens // decode_S) * 8, 2 * H, H // 2, 1, decode_S, E,
                                     False, "none", "fwd", dtype))
    return out


def _attention_variants(dtypes, modes, window_L: int, window: int, L: int, tokens: int, H: int, E: int) -> list:
    """The issue-14 rows: a sliding window of ``window`` keys at ``window_L`` (causal, GQA 2H/(H/2)), softcap
    50 and ALiBi at the standard rows' shape (H heads, L, causal and not for softcap, causal for ALiBi)."""
    out = []
    for dtype in dtypes:
        for mode in modes:
            out += [
                AttentionWorkload("window", max(1, tokens // window_L), 2 * H, H // 2, window_L, window_L, E, True,
                                  "none", mode, dtype, window=(window - 1, 0)),
                AttentionWorkload("softcap", max(1, tokens // L), H, H, L, L, E, False, "none", mode, dtype,
                                  softcap=50.0),
                AttentionWorkload("softcap", max(1, tokens // L), H, H, L, L, E, True, "none", mode, dtype,
                                  softcap=50.0),
                AttentionWorkload("alibi", max(1, tokens // L), H, H, L, L, E, True, "none", mode, dtype,
                                  alibi=True),
            ]
    return out


def attention_workloads(sweep: str) -> list:
    """``sweep``: "quick" (the default on a GPU), "full", "cpu" (small sizes for a machine without a GPU)."""
    if sweep == "quick":
        seqlens = [1024, 4096, 16384]
        return (_fa_convention(seqlens, [(16, 128)], ["bf16"], ["fwd"], [False, True], 16384)
                + _fa_convention(seqlens, [(16, 128)], ["bf16"], ["bwd"], [True], 16384)
                + _attention_extras(["bf16"], ["fwd"], 4096, 16384, 16384, 16, 128)
                + _attention_variants(["bf16"], ["fwd", "bwd"], 16384, 4096, 4096, 16384, 16, 128))
    if sweep == "full":
        seqlens = [512, 1024, 2048, 4096, 8192, 16384]
        return (_fa_convention(seqlens, [(16, 128), (32, 64)], ["bf16", "fp16"], list(metrics.MODES),
                               [False, True], 16384)
                + _attention_extras(["bf16", "fp16"], list(metrics.MODES), 4096, 16384, 16384, 16, 128)
                + _attention_variants(["bf16", "fp16"], list(metrics.MODES), 16384, 4096, 4096, 16384, 16, 128))
    if sweep == "cpu":
        # fp32: CPU half-precision matmuls are emulated and not what anyone runs; hidden 256 = 4 heads of 64
        return (_fa_convention([128, 256], [(4, 64)], ["fp32"], ["fwd", "fwd+bwd"], [False, True], 512)
                + _attention_extras(["fp32"], ["fwd"], 128, 512, 1024, 4, 64)
                + _attention_variants(["fp32"], ["fwd"], 256, 64, 128, 512, 4, 64))
    if sweep == "tiny":  # pytest-benchmark in CI: odd sizes, seconds in total even in Triton's interpreter
        return [AttentionWorkload("standard", 1, 2, 2, 33, 33, 16, causal, "none", "fwd", "fp32")
                for causal in (False, True)]
    raise ValueError(f"unknown sweep {sweep!r}")


# ----------------------------------------------------------------------------------------------------------------
# masked softmax


@dataclass(frozen=True)
class SoftmaxWorkload:
    """softmax(scale * x + mask) over N: x (A, H, M, N); ``mask`` "none" or "float" ((A, 1, M, N), broadcast
    over H); ``causal`` hides column j > i (then M == N)."""

    kind: str  # "plain", "masked", "causal"
    A: int
    H: int
    M: int
    N: int
    mask: str
    causal: bool
    mode: str
    dtype: str
    scale: float = 0.125

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return self.A * self.H * self.M * self.N

    @property
    def label(self) -> str:
        return f"{self.kind} {self.dtype} x=({self.A},{self.H},{self.M},{self.N}) {self.mode}"

    @property
    def group(self) -> str:
        return f"softmax_{self.kind}_{self.dtype}_{self.mode.replace('+', '')}"

    @property
    def x_value(self) -> int:
        return self.N

    def make_inputs(self, device: str, seed: int = 0) -> "SoftmaxInputs":
        g = torch.Generator(device=device).manual_seed(seed)
        dt = self.torch_dtype
        x = 4 * torch.randn(self.A, self.H, self.M, self.N, generator=g, device=device, dtype=dt)
        x.requires_grad_(self.mode != "fwd")
        mask = None
        if self.mask == "float":
            # additive mask: about one entry in eight hidden (-inf), the rest small offsets
            shape = (self.A, 1, self.M, self.N)
            m = 0.5 * torch.randn(*shape, generator=g, device=device)
            m = m.masked_fill(torch.rand(*shape, generator=g, device=device) < 0.125, float("-inf"))
            m[..., 0] = 0.0  # every row keeps column 0: no fully masked rows
            mask = m.to(dt)
        elif self.mask != "none":
            raise ValueError(f"unknown softmax mask kind {self.mask!r}")
        return SoftmaxInputs(self, x, mask)


@dataclass
class SoftmaxInputs:
    workload: SoftmaxWorkload
    x: torch.Tensor
    mask: Optional[torch.Tensor]

    def nbytes(self) -> int:
        w = self.workload
        mask_bytes = 0 if self.mask is None else metrics.tensor_bytes(self.mask)
        return metrics.softmax_bytes(w.numel, self.x.element_size(), mask_bytes, w.mode)

    @property
    def leaves(self) -> list:
        return [self.x]


def _softmax_set(dtypes, variants, total: int) -> list:
    """variants: (kind, mode, row lengths); the element count stays about ``total`` (causal score matrices are
    square, at least one of them)."""
    out = []
    for dtype in dtypes:
        for kind, mode, cols in variants:
            for N in cols:
                if kind == "causal":
                    out.append(SoftmaxWorkload(kind, max(1, total // (N * N)), 1, N, N, "none", True, mode, dtype))
                else:
                    rows = max(1, total // N)
                    A, H = (4, 8) if rows >= 32 else (1, 1)
                    out.append(SoftmaxWorkload(kind, A, H, rows // (A * H), N, "float" if kind == "masked"
                                               else "none", False, mode, dtype))
    return out


def softmax_workloads(sweep: str) -> list:
    if sweep == "quick":
        cols = [128, 2048, 32768, 131072]
        return _softmax_set(["bf16"], [("plain", "fwd", cols), ("masked", "fwd", cols),
                                       ("causal", "fwd", [1024, 4096]), ("plain", "bwd", [2048, 131072])], 2**27)
    if sweep == "full":
        cols = [2**i for i in range(7, 18)]  # 128 .. 128k
        causal_cols = [c for c in cols if c <= 16384]
        variants = [(kind, mode, causal_cols if kind == "causal" else cols)
                    for kind in ("plain", "masked", "causal") for mode in metrics.MODES]
        return _softmax_set(["bf16", "fp16"], variants, 2**27)
    if sweep == "cpu":
        cols = [128, 1024, 8192]
        return _softmax_set(["fp32"], [("plain", "fwd", cols), ("masked", "fwd", cols), ("causal", "fwd", [128, 512]),
                                       ("plain", "bwd", cols)], 2**18)
    if sweep == "tiny":
        return [SoftmaxWorkload("masked", 1, 2, 17, 129, "float", False, "fwd", "fp32"),
                SoftmaxWorkload("causal", 1, 1, 33, 33, "none", True, "fwd", "fp32")]
    raise ValueError(f"unknown sweep {sweep!r}")


def priority(w) -> tuple:
    """Sort key that runs the most telling rows first, so a time budget cuts the least telling ones:
    forward of the standard shapes, then the forward of the variants (masks, GQA, decode), then backward."""
    return (w.mode != "fwd", w.kind not in ("standard", "plain"))


def select(workloads: list, dtypes=None, modes=None, seqlens=None, kinds=None) -> list:
    """Filter by dtype names, modes, sequence/row lengths (the plot's x value) and kinds; None keeps all."""
    return [w for w in workloads
            if (dtypes is None or w.dtype in dtypes) and (modes is None or w.mode in modes)
            and (seqlens is None or w.x_value in seqlens) and (kinds is None or w.kind in kinds)]


# ----------------------------------------------------------------------------------------------------------------
# packed variable-length attention (issue 10)


def mixed_lengths(n: int, lo: int, hi: int, total: int, seed: int = 0) -> tuple:
    """``n`` document lengths in [lo, hi], log-uniform (many short, a few long, as packed training batches),
    scaled so they sum to ``total`` exactly (the rounding remainder spread over documents with room)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.empty(n).uniform_(float(torch.log(torch.tensor(float(lo)))),
                                            float(torch.log(torch.tensor(float(hi)))), generator=g))
    lengths = raw
    for _ in range(50):  # rescale, clamp, repeat: converges in a few rounds
        lengths = (lengths * (total / lengths.sum())).clamp(lo, hi)
    out = [int(x) for x in lengths.round()]
    i = 0
    while sum(out) != total:
        step = 1 if sum(out) < total else -1
        if lo <= out[i % n] + step <= hi:
            out[i % n] += step
        i += 1
    return tuple(out)


@dataclass(frozen=True)
class VarlenWorkload:
    """Packed documents of ``lengths`` tokens (self-attention: query and key lengths equal), q/k/v (T, H, E)
    with T = sum(lengths); ``varlen=True`` routes the row to the providers that take packed inputs. FLOPs count
    the real (query, key) pairs only: the sum over documents of the dense rows' count (causal: L^2 / 2 each, the
    convention), so the TFLOP/s compare with the dense kernel's at the same length."""

    kind: str  # "varlen"
    lengths: tuple
    H: int
    E: int
    causal: bool
    mode: str
    dtype: str
    varlen: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def mean_length(self) -> int:
        return self.tokens // max(1, len(self.lengths))

    @property
    def label(self) -> str:
        return (f"varlen {self.dtype} docs={len(self.lengths)} T={self.tokens} len={min(self.lengths)}.."
                f"{max(self.lengths)} H={self.H} E={self.E}{' causal' if self.causal else ''} {self.mode}")

    @property
    def group(self) -> str:
        return f"attention_varlen_{self.dtype}_H{self.H}_E{self.E}{'_causal' if self.causal else ''}_" \
               f"{self.mode.replace('+', '')}"

    @property
    def x_value(self) -> int:
        return self.tokens

    def flops(self) -> float:
        return sum(metrics.attention_flops(1, self.H, n, n, self.E, self.E, self.causal, self.mode)
                   for n in self.lengths if n > 0)

    def make_inputs(self, device: str, seed: int = 0) -> "VarlenInputs":
        g = torch.Generator(device=device).manual_seed(seed)
        grad = self.mode != "fwd"
        q, k, v = (torch.randn(self.tokens, self.H, self.E, generator=g, device=device, dtype=self.torch_dtype)
                   .requires_grad_(grad) for _ in range(3))
        cu = torch.tensor([0] + torch.tensor(self.lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        return VarlenInputs(self, q, k, v, cu)


@dataclass
class VarlenInputs:
    workload: VarlenWorkload
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return max(self.workload.lengths)

    def forward_bytes(self) -> int:
        return 4 * self.q.numel() * self.q.element_size()  # q, k, v read, out written

    @property
    def leaves(self) -> list:
        return [self.q, self.k, self.v]


def varlen_workloads(sweep: str) -> list:
    """The issue-10 row: 64 documents of 128..8k tokens, 64k tokens, 16 heads of 128, bf16, causal, forward and
    backward (GPU sweeps); a tiny packed batch with a length 1 and odd lengths on CPU."""
    if sweep in ("quick", "full"):
        lengths = mixed_lengths(64, 128, 8192, 65536)
        dtypes = ["bf16"] if sweep == "quick" else ["bf16", "fp16"]
        modes = ["fwd", "bwd"] if sweep == "quick" else list(metrics.MODES)
        return [VarlenWorkload("varlen", lengths, 16, 128, True, mode, dtype) for dtype in dtypes for mode in modes]
    if sweep == "cpu":
        return [VarlenWorkload("varlen", (37, 1, 90, 13, 64, 51), 4, 64, True, mode, "fp32")
                for mode in ("fwd", "bwd")]
    if sweep == "tiny":
        return []
    raise ValueError(f"unknown sweep {sweep!r}")
