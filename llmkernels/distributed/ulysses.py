"""Ulysses context parallelism (DeepSpeed's): all-to-all from sequence shards to head shards and back.

Each rank sends head group g of its sequence part to rank g (one ``all_to_all_single`` for q, k and v packed
together), so rank g holds heads g*H/W ... of the whole sequence; it runs ordinary attention over the whole
sequence (any llmkernels backend, the op's own autograd), and a second all-to-all brings the output back to
sequence shards (a third, for the fp32 lse, when it is returned). The all-to-alls are permutations, so each one's
backward is the opposite all-to-all of the gradients: backward 1 for the output (+1 for the lse) and 1 for
dq/dk/dv. Needs the query heads and the key/value heads divisible by W; grouped-query attention keeps working
because query head h and its key/value head h // (Hq / Hkv) land on the same rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import ops
from .comm import pack, unpack
from .layout import chunk_count, rank_chunks


def _seq_to_heads(tensors, group, world, layout):
    """(B, H_t, L_local, E_t) sequence shards -> (B, H_t / W, L, E_t) head shards of the whole sequence."""
    slots = [pack([t.unflatten(1, (world, -1))[:, g] for t in tensors]) for g in range(world)]
    send = torch.cat(slots)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    per_rank = len(rank_chunks(0, world, layout))
    shapes = [(t.shape[0], t.shape[1] // world, t.shape[2], t.shape[3]) for t in tensors]
    result = []
    parts = [unpack(flat, shapes) for flat in recv.view(world, -1)]  # parts[s]: rank s's sequence part
    for i, shape in enumerate(shapes):
        c = shape[2] // per_rank
        pieces = {}
        for s in range(world):
            for j, idx in enumerate(rank_chunks(s, world, layout)):
                pieces[idx] = parts[s][i][:, :, j * c:(j + 1) * c]
        result.append(torch.cat([pieces[n] for n in range(chunk_count(world, layout))], dim=2))
    return result


def _heads_to_seq(tensors, group, rank, world, layout):
    """The inverse of _seq_to_heads: (B, H_t / W, L, E_t) -> (B, H_t, L_local, E_t) in this rank's layout."""
    per_rank = len(rank_chunks(0, world, layout))
    chunk = [t.shape[2] // chunk_count(world, layout) for t in tensors]
    slots = []
    for s in range(world):
        idx = rank_chunks(s, world, layout)
        slots.append(pack([torch.cat([t[:, :, i * c:(i + 1) * c] for i in idx], dim=2)
                           for t, c in zip(tensors, chunk)]))
    send = torch.cat(slots)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    shapes = [(t.shape[0], t.shape[1], c * per_rank, t.shape[3]) for t, c in zip(tensors, chunk)]
    parts = [unpack(flat, shapes) for flat in recv.view(world, -1)]  # parts[g]: head group g
    return [torch.cat([parts[g][i] for g in range(world)], dim=1) for i in range(len(tensors))]


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, rank, world, layout, *tensors):
        ctx.args = (group, rank, world, layout)
        return tuple(_seq_to_heads([t.contiguous() for t in tensors], group, world, layout))

    @staticmethod
    def backward(ctx, *grads):
        group, rank, world, layout = ctx.args
        return (None,) * 4 + tuple(_heads_to_seq([g.contiguous() for g in grads], group, rank, world, layout))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, rank, world, layout, *tensors):
        ctx.args = (group, rank, world, layout)
        return tuple(_heads_to_seq([t.contiguous() for t in tensors], group, rank, world, layout))

    @staticmethod
    def backward(ctx, *grads):
        group, rank, world, layout = ctx.args
        return (None,) * 4 + tuple(_seq_to_heads([g.contiguous() for g in grads], group, world, layout))


def ulysses_attention(q, k, v, group, rank, world, layout, is_causal, scale, enable_gqa, return_lse, softcap,
                      window_size, backend):
    """q (B, Hq, L_local, E), k / v (B, Hkv, L_local, E / Ev) with Hq, Hkv divisible by W (checked by the
    caller). Returns this rank's output shard (and lse shard)."""
    qh, kh, vh = _SeqToHeads.apply(group, rank, world, layout, q, k, v)  # one all-to-all for all three
    out, lse = ops.scaled_dot_product_attention(qh, kh, vh, is_causal=is_causal, scale=scale,
                                                enable_gqa=enable_gqa, return_lse=True, softcap=softcap,
                                                window_size=window_size, backend=backend)
    (out_local,) = _HeadsToSeq.apply(group, rank, world, layout, out)
    if not return_lse:
        return out_local
    (lse_local,) = _HeadsToSeq.apply(group, rank, world, layout, lse.unsqueeze(-1))
    return out_local, lse_local.squeeze(-1)
