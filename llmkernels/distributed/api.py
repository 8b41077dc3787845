"""``context_parallel_attention``: validation, the one cross-rank shape check, and the choice of method."""

from __future__ import annotations

import struct

import torch
import torch.distributed as dist

from .. import contract, ops
from . import local
from .allgather import AllGatherAttention
from .layout import LAYOUTS, check_divisible, check_layout, group_info
from .ring import RingAttention
from .ulysses import ulysses_attention

METHODS = ("ring", "allgather", "ulysses")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FIELDS = 16  # int64 entries of one rank's call description


def _describe(query, key, value, method, layout, is_causal, scale, enable_gqa, return_lse, softcap) -> list:
    """This rank's call as integers (shapes, dtypes, arguments), the same on every rank when the call agrees."""
    row = []
    for t in (query, key, value):
        ok = isinstance(t, torch.Tensor) and t.dim() == 4
        row += list(t.shape) if ok else [-1] * 4
    dtypes = [_DTYPES.index(t.dtype) if isinstance(t, torch.Tensor) and t.dtype in _DTYPES else -1
              for t in (query, key, value)]
    row.append(dtypes[0] * 16 + dtypes[1] * 4 + dtypes[2] if min(dtypes) >= 0 else -1)
    flags = (METHODS.index(method) if method in METHODS else 3) * 64 + \
        (LAYOUTS.index(layout) if layout in LAYOUTS else 3) * 16 + \
        int(is_causal is True) * 4 + int(enable_gqa is True) * 2 + int(return_lse is True)
    row.append(flags)

    def bits(x) -> int:
        try:
            return struct.unpack("<q", struct.pack("<d", float(x)))[0]
        except (TypeError, ValueError):
            return -1
    row.append(bits(scale) if scale is not None else 0)
    row.append(bits(softcap))
    return row


def _check_same_on_every_rank(row: list, group, world: int, device) -> None:
    """One all-gather of each rank's call description; every rank raises the same error if they differ."""
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    every = mine.new_empty(world * mine.numel())
    dist.all_gather_into_tensor(every, mine, group=group)
    every = every.view(world, -1).tolist()
    names = ("query shape", "key shape", "value shape")
    for s in range(1, world):
        if every[s] == every[0]:
            continue
        for i, name in enumerate(names):
            a, b = every[0][4 * i:4 * i + 4], every[s][4 * i:4 * i + 4]
            if a != b:
                raise ValueError(f"{name.split()[0]}: the shards' shapes differ between ranks: rank 0 has "
                                 f"{tuple(a)}, rank {s} has {tuple(b)} (every rank must pass its part of the same "
                                 f"call, laid out by shard(..., layout=...))")
        raise ValueError(f"the ranks disagree on the dtypes or on method / layout / is_causal / enable_gqa / "
                         f"return_lse / scale / softcap: rank 0 passed {every[0][12:]}, rank {s} {every[s][12:]}")


def context_parallel_attention(query, key, value, group=None, method="ring", is_causal=False, scale=None,
                               enable_gqa=False, return_lse=False, backend=None, *, layout="zigzag",
                               softcap=0.0, window_size=(-1, -1)):
    """Attention over a sequence sharded across the ranks of ``group``.

    query (B, Hq, L_local, E), key / value (B, Hkv, L_local, E / Ev): this rank's shards, as ``shard(x, dim=2,
    group=group, layout=layout)`` cuts them (any strides). Returns this rank's shard of the output (and of the
    float32 lse, (B, Hq, L_local), when ``return_lse``): what ``llmkernels.scaled_dot_product_attention`` gives on
    the whole sequence, sharded the same way. ``is_causal`` is causal over the whole sequence. Differentiable in
    query, key and value (and through the lse).

    method: ``"ring"`` (K/V blocks go round the ring, overlapped with the local kernel), ``"allgather"`` (K/V
        gathered once; dK/dV reduce-scattered), ``"ulysses"`` (all-to-all to head shards; needs Hq and Hkv
        divisible by the world size).
    softcap: every method. window_size: ``"ulysses"`` only (the other methods would need the window per
        block). A group of size 1 is plain attention (any method, any variant).
    backend: as llmkernels.scaled_dot_product_attention; ring and allgather need a backend that writes fp32
        partials (triton, reference; see ``local.py``), ulysses takes any.
    """
    world, rank = group_info(group)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_layout(layout)
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    if world > 1:
        # Before anything that could raise on one rank only (and leave the others waiting in a collective).
        if dist.get_backend(group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        _check_same_on_every_rank(_describe(query, key, value, method, layout, is_causal, scale, enable_gqa,
                                            return_lse, softcap), group, world, device)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, L_local, E), got shape {tuple(t.shape)}")
    if world == 1:
        return ops.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                                enable_gqa=enable_gqa, return_lse=return_lse, softcap=softcap,
                                                window_size=window_size, backend=backend)
    for name, t in (("query", query), ("key", key)):
        check_divisible(name, t.shape[2] * world, world, layout)
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query and key shards must have the same length (self-attention over one sharded "
                         f"sequence), got {query.shape[2]} and {key.shape[2]}")
    window = contract._check_window_size(window_size)
    if window != (-1, -1) and method != "ulysses":
        raise ValueError(f"window_size={window_size!r} is supported by method='ulysses' only, not {method!r}")

    if method == "ulysses":
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.shape[1] % world != 0:
                raise ValueError(f"{name} has {t.shape[1]} heads, which method='ulysses' cannot split over "
                                 f"{world} ranks: the heads must be divisible by the world size")
        contract.check_attention(query, key, value, None, 0.0, is_causal, scale, enable_gqa,
                                 window_size=window_size, softcap=softcap)
        return ulysses_attention(query, key, value, group, rank, world, layout, is_causal, scale, enable_gqa,
                                 return_lse, softcap, window_size, backend)

    a = contract.check_attention(query, key, value, None, 0.0, is_causal, scale, enable_gqa, softcap=softcap)
    name = local.choose_backend(a, backend)
    function = RingAttention if method == "ring" else AllGatherAttention
    out, lse = function.apply(a.q, a.k, a.v, group, rank, world, layout, a.is_causal, a.scale, a.rule.softcap,
                              name)
    out = out.reshape(a.out_shape)
    return (out, lse.reshape(a.out_shape[:-1])) if return_lse else out
