"""Context-parallel attention on torch.distributed: ring, all-gather and Ulysses (see README, "Context
parallelism").

    from llmkernels import distributed as lkd
    q_local = lkd.shard(q, dim=2, group=group)            # zigzag by default
    out_local = lkd.context_parallel_attention(q_local, k_local, v_local, group=group, method="ring",
                                               is_causal=True)
    out = lkd.unshard(out_local, dim=2, group=group)

Modules: ``layout`` (shard / unshard, chunk indices), ``plan`` (local calls per step), ``merge`` (lse merge),
``local`` (fp32-partial kernel calls), ``comm`` (packing, ring exchange), ``ring`` / ``allgather`` / ``ulysses``
(the methods), ``api`` (the public function).
"""

from .api import METHODS, context_parallel_attention
from .layout import LAYOUTS, shard, unshard
from .merge import merge_partials

__all__ = ["context_parallel_attention", "shard", "unshard", "merge_partials", "METHODS", "LAYOUTS"]
