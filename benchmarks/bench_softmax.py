"""pytest-benchmark: every masked-softmax provider on tiny odd shapes (see bench_attention.py)."""

import pytest

import llmkernels
from benchmarks import workloads
from benchmarks._pytest_bench import DEVICE, first_call_or_skip, prepare_or_skip, time_it
from benchmarks.providers import providers_for

WORKLOADS = workloads.softmax_workloads("tiny")


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: f"{w.kind}-{w.M}x{w.N}")
@pytest.mark.parametrize("provider", providers_for("softmax"), ids=lambda p: p.name)
def test_masked_softmax_forward(benchmark, provider, w):
    inp = w.make_inputs(DEVICE)
    prepared = prepare_or_skip(provider, inp)
    with prepared.context():
        y = first_call_or_skip(prepared)
        mask = None if inp.mask is None else inp.mask.double()
        ref = llmkernels.reference.masked_softmax(inp.x.double(), mask, scale=w.scale, is_causal=w.causal)
        err = (y.double() - ref).abs().max().item()
        assert err < 1e-5, f"{provider.name}: max error {err:.2e} vs the float64 reference"
        time_it(benchmark, provider, prepared, f"softmax {w.label}")
