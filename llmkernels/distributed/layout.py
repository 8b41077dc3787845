"""Sequence layouts over the ranks of a process group, and ``shard`` / ``unshard``.

The sequence of length L is cut into equal chunks. ``"contiguous"``: W chunks, rank r holds chunk r.
``"zigzag"``: 2W chunks, rank r holds chunks r and 2W-1-r, in that order, so that under a causal mask every rank
has the same amount of work (an early chunk with little to attend to, paired with a late one with much). A rank's
chunks are always in increasing global order, which the context-parallel plans (``plan.py``) rely on.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def group_info(group) -> tuple:
    """(world size, this process's rank in ``group``), with a clear error when there is no usable group."""
    if not dist.is_available():
        raise RuntimeError("group: torch.distributed is not available in this build of PyTorch")
    if not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialised; call torch.distributed."
                           "init_process_group(...) first (gloo on CPU, nccl on GPUs)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return dist.get_world_size(group), rank


def chunk_count(world: int, layout: str) -> int:
    """How many equal chunks the whole sequence is cut into."""
    return 2 * world if layout == "zigzag" else world


def rank_chunks(rank: int, world: int, layout: str) -> tuple:
    """The global chunk indices rank ``rank`` holds, in the order it holds them (increasing)."""
    return (rank, 2 * world - 1 - rank) if layout == "zigzag" else (rank,)


def check_divisible(name: str, length: int, world: int, layout: str) -> int:
    """The chunk length; raises naming ``name`` when the layout cannot cut ``length`` evenly."""
    n = chunk_count(world, layout)
    if length % n != 0:
        what = f"2 * world size = {n}" if layout == "zigzag" else f"the world size {n}"
        raise ValueError(f"{name} has sequence length {length}, which the {layout!r} layout cannot split over "
                         f"{world} rank(s): it must be divisible by {what}")
    return length // n


def _check_dim(name: str, x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}, "
                         f"got {dim!r}")
    return dim % x.dim()


def _local_part(x: torch.Tensor, dim: int, rank: int, world: int, layout: str, name: str) -> torch.Tensor:
    c = check_divisible(name, x.shape[dim], world, layout)
    parts = [x.narrow(dim, i * c, c) for i in rank_chunks(rank, world, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def shard(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part, along ``dim``, of a tensor that every rank of ``group`` holds whole.

    ``"zigzag"``: chunks r and 2W-1-r of 2W (a new tensor); ``"contiguous"``: chunk r of W (a view). No
    communication. Differentiable: the gradient flows back into this rank's chunks of ``x``."""
    layout = check_layout(layout)
    dim = _check_dim("x", x, dim)
    world, rank = group_info(group)
    return _local_part(x, dim, rank, world, layout, "x")


class _Unshard(torch.autograd.Function):
    """All-gather plus reorder; the backward takes this rank's part of the gradient of the whole (every rank is
    assumed to compute the same loss from the whole sequence, as after an all-gather: a replicated result)."""

    @staticmethod
    def forward(ctx, x, dim, group, layout, world, rank):
        ctx.args = (dim, layout, world, rank)
        moved = x.movedim(dim, 0).contiguous()
        gathered = moved.new_empty((world * moved.shape[0], *moved.shape[1:]))
        dist.all_gather_into_tensor(gathered, moved, group=group)
        per_rank = len(rank_chunks(0, world, layout))
        c = moved.shape[0] // per_rank
        pieces = {}
        for s in range(world):
            for j, idx in enumerate(rank_chunks(s, world, layout)):
                start = (s * per_rank + j) * c
                pieces[idx] = gathered[start:start + c]
        whole = torch.cat([pieces[i] for i in range(len(pieces))], dim=0)
        return whole.movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        dim, layout, world, rank = ctx.args
        return _local_part(grad, dim, rank, world, layout, "grad"), None, None, None, None, None


def unshard(x: torch.Tensor, dim: int, *, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The exact inverse of ``shard``: the whole tensor along ``dim``, on every rank of ``group`` (one
    all-gather, then the chunks are put back in sequence order). Every rank's ``x`` must have the same shape."""
    layout = check_layout(layout)
    dim = _check_dim("x", x, dim)
    world, rank = group_info(group)
    check_divisible("x", x.shape[dim] * world, world, layout)  # each rank's part has len(rank_chunks) chunks
    if world == 1:
        return x
    return _Unshard.apply(x, dim, group, layout, world, rank)
