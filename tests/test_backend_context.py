"""``use_backend`` holds per thread and per asyncio task (a ContextVar), not process-wide: a server whose threads
or tasks each open their own block gets each block's backend in each, at the same time."""

import asyncio
import threading

import pytest
import torch

import llmkernels
from llmkernels import dispatch, ops
from runnable import runnable_backends

# A second backend besides "reference" that runs here (Triton in its interpreter on CPU, or on a GPU).
OTHER = next((name for name in runnable_backends() if name != "reference"), None)
needs_other = pytest.mark.skipif(OTHER is None, reason="only the reference backend can run here")


@pytest.fixture
def kernel_calls(monkeypatch):
    """(thread name, backend) of every llmkernels::sdpa_forward call, i.e. which backend each call really ran on."""
    calls, lock = [], threading.Lock()
    original = ops.sdpa_forward

    def spy(*args):
        with lock:
            # the backend name: sdpa_forward(q, k, v, ..., sinks, backend, deterministic)
            calls.append((threading.current_thread().name, args[14]))
        return original(*args)

    monkeypatch.setattr(ops, "sdpa_forward", spy)
    return calls


def _attend():
    q = torch.randn(1, 2, 5, 8)
    return llmkernels.scaled_dot_product_attention(q, q, q)


@needs_other
def test_two_threads_each_see_their_own_block(kernel_calls, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    # Both threads are inside their blocks at once: every step is fenced by the barrier, so thread A reads and
    # calls after B has entered its block, and B after A, and neither block ends before both have looked.
    barrier = threading.Barrier(2, timeout=60)
    seen, errors = {}, []

    def worker(name):
        try:
            with llmkernels.use_backend(name):
                barrier.wait()  # both blocks open
                seen[name, "requested"] = dispatch.requested_backend(None)
                _attend()
                barrier.wait()  # both have read and called before either block closes
            seen[name, "after"] = dispatch.requested_backend(None)
        except Exception as exc:  # reported by the main thread (an assert in a thread would be lost)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(name,), name=name) for name in ("reference", OTHER)]
    with llmkernels.use_backend("reference"):  # the main thread's own block reaches neither worker
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert dispatch.requested_backend(None) == "reference"
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors
    for name in ("reference", OTHER):
        assert seen[name, "requested"] == name
        assert seen[name, "after"] == "auto"
    assert sorted(kernel_calls) == sorted([("reference", "reference"), (OTHER, OTHER)])
    assert dispatch.requested_backend(None) == "auto"


@needs_other
def test_asyncio_tasks_each_see_their_own_block(kernel_calls, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)

    async def main():
        a_entered, b_entered = asyncio.Event(), asyncio.Event()
        seen = {}

        async def task(name, mine, other):
            with llmkernels.use_backend(name):
                mine.set()
                await other.wait()  # the other task's block is open too, and it ran in between
                seen[name] = dispatch.requested_backend(None)
                _attend()
                await asyncio.sleep(0)  # let the other task run its call while this block is still open

        async def child_of_block():
            return dispatch.requested_backend(None)

        await asyncio.gather(task("reference", a_entered, b_entered), task(OTHER, b_entered, a_entered))
        with llmkernels.use_backend(OTHER):
            # A task created inside a block copies the context: it sees the block.
            inherited = await asyncio.create_task(child_of_block())
        outside = await asyncio.create_task(child_of_block())
        return seen, inherited, outside

    seen, inherited, outside = asyncio.run(main())
    assert seen == {"reference": "reference", OTHER: OTHER}
    assert inherited == OTHER and outside == "auto"
    assert sorted(b for _, b in kernel_calls) == sorted(["reference", OTHER])


@needs_other
def test_compiled_call_follows_the_block(monkeypatch):
    """torch.compile guards on the block's value: a graph traced under one block is not reused under another."""
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    graphs = []

    def record_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    q = torch.randn(1, 2, 5, 8)
    torch._dynamo.reset()
    try:
        fn = torch.compile(lambda x: llmkernels.scaled_dot_product_attention(x, x, x), backend=record_graph,
                           fullgraph=True)
        with llmkernels.use_backend("reference"):
            fn(q)
        with llmkernels.use_backend(OTHER):
            fn(q)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 2
    # The backend is the op's argument before the trailing ``deterministic`` (None by default).
    assert "'reference', None)" in graphs[0] and f"'{OTHER}', None)" in graphs[1], graphs
