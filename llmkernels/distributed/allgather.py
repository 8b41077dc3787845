"""All-gather context parallelism (Llama 3's): gather K/V once, then one local call per query chunk.

Forward: one ``all_gather_into_tensor`` of this rank's packed K/V; the gathered blocks are put back in sequence
order; under causality query chunk a attends to the key prefix up to its own end with the bottom-right alignment
(the last query of the chunk sees the last key of the prefix), so nothing in its future is computed. Backward:
dK/dV of the whole sequence accumulate in fp32 and one ``reduce_scatter_tensor`` sums them over the ranks and
hands each rank its own chunks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import local
from .comm import pack, unpack
from .layout import chunk_count, rank_chunks
from .plan import plan_calls


def _gather_kv(k, v, group, world, layout):
    """K and V of the whole sequence, in sequence order."""
    B, Hkv, Lk, E = k.shape
    Ev = v.shape[3]
    mine = pack((k, v))
    gathered = mine.new_empty(world * mine.numel())
    dist.all_gather_into_tensor(gathered, mine, group=group)
    per_rank = len(rank_chunks(0, world, layout))
    c = Lk // per_rank
    pieces_k, pieces_v = {}, {}
    for s, flat in enumerate(gathered.view(world, -1)):
        ks, vs = unpack(flat, ((B, Hkv, Lk, E), (B, Hkv, Lk, Ev)))
        for j, idx in enumerate(rank_chunks(s, world, layout)):
            pieces_k[idx], pieces_v[idx] = ks[:, :, j * c:(j + 1) * c], vs[:, :, j * c:(j + 1) * c]
    n = chunk_count(world, layout)
    return (torch.cat([pieces_k[i] for i in range(n)], dim=2), torch.cat([pieces_v[i] for i in range(n)], dim=2))


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, rank, world, layout, is_causal, scale, softcap, backend):
        B, H, Lq, _ = q.shape
        Ev = v.shape[3]
        cq = Lq // len(rank_chunks(rank, world, layout))
        k_all, v_all = _gather_kv(k, v, group, world, layout)
        out = torch.zeros(B, H, Lq, Ev, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
        calls = plan_calls(rank_chunks(rank, world, layout), tuple(range(chunk_count(world, layout))), is_causal)
        for call in calls:  # each query chunk is in exactly one call: no merge needed
            rows = slice(call.q_chunks[0] * cq, call.q_chunks[1] * cq)
            cols = slice(0, call.kv_chunks[1] * cq)
            o, s = local.forward(backend, q[:, :, rows], k_all[:, :, cols], v_all[:, :, cols], call.causal,
                                 call.bottom_right, scale, softcap)
            out[:, :, rows], lse[:, :, rows] = o, s
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k_all, v_all, result, lse)
        ctx.args = (group, rank, world, layout, calls, k.dtype, v.dtype, scale, softcap, backend)
        return result, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k_all, v_all, out, lse = ctx.saved_tensors
        group, rank, world, layout, calls, k_dtype, v_dtype, scale, softcap, backend = ctx.args
        B, H, Lq, E = q.shape
        Hkv, L, Ev = k_all.shape[1], k_all.shape[2], v_all.shape[3]
        per_rank = len(rank_chunks(rank, world, layout))
        cq = Lq // per_rank
        grad_out = grad_out.contiguous()
        dq = torch.zeros(B, H, Lq, E, dtype=torch.float32, device=q.device)
        dk_all = torch.zeros(B, Hkv, L, E, dtype=torch.float32, device=q.device)
        dv_all = torch.zeros(B, Hkv, L, Ev, dtype=torch.float32, device=q.device)
        for call in calls:
            rows = slice(call.q_chunks[0] * cq, call.q_chunks[1] * cq)
            cols = slice(0, call.kv_chunks[1] * cq)
            gl = None if grad_lse is None else grad_lse[:, :, rows]
            dq_p, dk_p, dv_p = local.backward(backend, grad_out[:, :, rows], q[:, :, rows], k_all[:, :, cols],
                                              v_all[:, :, cols], out[:, :, rows], lse[:, :, rows], gl,
                                              call.causal, call.bottom_right, scale, softcap)
            dq[:, :, rows] = dq_p
            dk_all[:, :, cols] += dk_p
            dv_all[:, :, cols] += dv_p
        # Rank s's slot of the reduce-scatter input holds the gradient of its own chunks, in its layout's order.
        slots = []
        for s in range(world):
            idx = rank_chunks(s, world, layout)
            slots.append(pack([t[:, :, i * cq:(i + 1) * cq] for t in (dk_all, dv_all) for i in idx]))
        summed = slots[0].new_empty(slots[0].numel())
        dist.reduce_scatter_tensor(summed, torch.cat(slots), group=group)
        pieces = unpack(summed, [(B, Hkv, cq, E)] * per_rank + [(B, Hkv, cq, Ev)] * per_rank)
        dk = torch.cat(pieces[:per_rank], dim=2) if per_rank > 1 else pieces[0]
        dv = torch.cat(pieces[per_rank:], dim=2) if per_rank > 1 else pieces[per_rank]
        return (dq.to(q.dtype), dk.to(k_dtype), dv.to(v_dtype)) + (None,) * 8
