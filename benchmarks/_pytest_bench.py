"""What the two pytest-benchmark files share: prepare a provider or skip with its reason, check its output
against the float64 reference, and time it with pytest-benchmark."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from benchmarks.providers import Unavailable
from benchmarks.run import classify_failure

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prepare_or_skip(provider, inp):
    if DEVICE == "cpu" and provider.cpu_skip:
        pytest.skip(f"skipped on CPU: {provider.cpu_skip}")
    try:
        return provider.prepare(inp)
    except Unavailable as exc:
        pytest.skip(f"unavailable: {exc}")


def first_call_or_skip(prepared):
    """The first call; a provider that declines the inputs at run time (PyTorch's SDPA backends say so in
    warnings) is skipped with its reason, any other exception fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return prepared.forward()
        except RuntimeError as exc:
            status = classify_failure(exc, caught)
            if status.startswith("unavailable"):
                pytest.skip(status)
            raise


def time_it(benchmark, provider, prepared, group: str) -> None:
    def call():
        out = prepared.forward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = group
    # Fixed, small round counts: these run in every plain `pytest` too, so they must stay cheap; Triton's
    # interpreter is slow (it simulates every program instance), so it gets fewer rounds.
    rounds = 2 if (provider.name.startswith("llmk-triton") and INTERPRETING) else 5
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
