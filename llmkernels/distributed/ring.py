"""Ring context parallelism: K/V blocks travel round the ring while each rank computes on the block it holds.

Forward, W steps: at step i rank r holds the K/V of rank r - i; it starts passing that block on (one
asynchronous ``batch_isend_irecv``, steps 0..W-2), runs the local calls ``plan.py`` gives for its queries against
that block (none for an all-hidden causal block), merges their fp32 partials into its fp32 accumulator by the lse,
then waits for the next block. The output is rounded to the input dtype once, at the end.

Backward, W steps: the K/V blocks go round again (W-1 exchanges) and each block's dK/dV accumulator (fp32)
travels with it: at step i a rank adds its contribution to the accumulator it received for the block it holds and
sends it on (W exchanges; the last one brings every accumulator home). The next K/V block is in flight during
the local backward, and the accumulator a rank needs is waited for only after its own contribution is computed.
Forward: W-1 ``batch_isend_irecv``; backward: 2W-1.
"""

from __future__ import annotations

import torch

from . import local
from .comm import pack, ring_exchange, unpack, wait_all
from .layout import rank_chunks
from .merge import merge_partials
from .plan import plan_calls


def _rows(call, c):
    return slice(call.q_chunks[0] * c, call.q_chunks[1] * c), slice(call.kv_chunks[0] * c, call.kv_chunks[1] * c)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, rank, world, layout, is_causal, scale, softcap, backend):
        B, H, Lq, _ = q.shape
        Hkv, Lk, E, Ev = k.shape[1], k.shape[2], k.shape[3], v.shape[3]
        cq = Lq // len(rank_chunks(rank, world, layout))
        shapes = ((B, Hkv, Lk, E), (B, Hkv, Lk, Ev))
        out = torch.zeros(B, H, Lq, Ev, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float32, device=q.device)
        held = pack((k, v))
        q_chunks = rank_chunks(rank, world, layout)
        for step in range(world):
            requests = ()
            if step < world - 1:
                incoming, requests = ring_exchange(held, group, rank, world)
            kb, vb = unpack(held, shapes)
            source = (rank - step) % world
            for call in plan_calls(q_chunks, rank_chunks(source, world, layout), is_causal):
                rows, cols = _rows(call, cq)
                o, s = local.forward(backend, q[:, :, rows], kb[:, :, cols], vb[:, :, cols], call.causal,
                                     call.bottom_right, scale, softcap)
                out[:, :, rows], lse[:, :, rows] = merge_partials(out[:, :, rows], lse[:, :, rows], o, s)
            wait_all(requests)
            if step < world - 1:
                held = incoming
        result = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.args = (group, rank, world, layout, is_causal, scale, softcap, backend)
        return result, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        group, rank, world, layout, is_causal, scale, softcap, backend = ctx.args
        B, H, Lq, E = q.shape
        Hkv, Lk, Ev = k.shape[1], k.shape[2], v.shape[3]
        cq = Lq // len(rank_chunks(rank, world, layout))
        shapes = ((B, Hkv, Lk, E), (B, Hkv, Lk, Ev))
        q_chunks = rank_chunks(rank, world, layout)
        grad_out = grad_out.contiguous()
        dq = torch.zeros(B, H, Lq, E, dtype=torch.float32, device=q.device)
        held = pack((k, v))
        acc_requests, acc_incoming = (), None
        for step in range(world):
            kv_requests = ()
            if step < world - 1:
                kv_incoming, kv_requests = ring_exchange(held, group, rank, world)
            kb, vb = unpack(held, shapes)
            contribution = torch.zeros(sum(s[0] * s[1] * s[2] * s[3] for s in shapes), dtype=torch.float32,
                                       device=q.device)
            dk, dv = unpack(contribution, shapes)
            source = (rank - step) % world
            for call in plan_calls(q_chunks, rank_chunks(source, world, layout), is_causal):
                rows, cols = _rows(call, cq)
                gl = None if grad_lse is None else grad_lse[:, :, rows]
                dq_p, dk_p, dv_p = local.backward(backend, grad_out[:, :, rows], q[:, :, rows], kb[:, :, cols],
                                                  vb[:, :, cols], out[:, :, rows], lse[:, :, rows], gl,
                                                  call.causal, call.bottom_right, scale, softcap)
                dq[:, :, rows] += dq_p
                dk[:, :, cols] += dk_p
                dv[:, :, cols] += dv_p
            if step > 0:
                wait_all(acc_requests)  # the accumulator of the block held now, from the previous rank
                contribution += acc_incoming
            acc_incoming, acc_requests = ring_exchange(contribution, group, rank, world)
            wait_all(kv_requests)
            if step < world - 1:
                held = kv_incoming
        wait_all(acc_requests)  # this rank's own block, home after visiting every rank
        dk, dv = unpack(acc_incoming, shapes)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)) + (None,) * 8
