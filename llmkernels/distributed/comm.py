"""The few communication helpers the methods share: packing tensors into one buffer (one message instead of
several) and the asynchronous ring exchange. Every call goes through ``torch.distributed`` looked up at call time
(``dist.batch_isend_irecv``, ...), so a test can count them."""

from __future__ import annotations

import torch
import torch.distributed as dist


def pack(tensors) -> torch.Tensor:
    """One flat contiguous buffer holding the tensors (of one dtype) one after the other."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(flat: torch.Tensor, shapes) -> list:
    """Views of ``flat`` with the given shapes (the inverse of ``pack``)."""
    out, start = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        out.append(flat[start:start + n].view(shape))
        start += n
    return out


def ring_exchange(send: torch.Tensor, group, rank: int, world: int) -> tuple:
    """Start sending ``send`` to the next rank and receiving the previous rank's into a new buffer: one
    ``batch_isend_irecv`` (two P2P ops). Returns (receive buffer, requests); wait on the requests before use."""
    recv = torch.empty_like(send)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    ops = [dist.P2POp(dist.isend, send, nxt, group), dist.P2POp(dist.irecv, recv, prv, group)]
    return recv, dist.batch_isend_irecv(ops)


def wait_all(requests) -> None:
    for req in requests:
        req.wait()
