"""pytest-benchmark: every attention provider on tiny odd shapes (so CI exercises the suite's code).

``pytest benchmarks/ --benchmark-only`` runs and times them; a plain ``pytest`` runs them too, quickly. Real
numbers come from ``python -m benchmarks.run`` on a GPU. Each benchmark first checks the provider's output
against the float64 einsum reference; providers that cannot run here are skipped with their reason.
"""

import pytest

import llmkernels
from benchmarks import workloads
from benchmarks._pytest_bench import DEVICE, first_call_or_skip, prepare_or_skip, time_it
from benchmarks.providers import providers_for

WORKLOADS = workloads.attention_workloads("tiny")


@pytest.mark.parametrize("w", WORKLOADS, ids=lambda w: ("causal" if w.causal else "full") + f"-L{w.L}")
@pytest.mark.parametrize("provider", providers_for("attention"), ids=lambda p: p.name)
def test_attention_forward(benchmark, provider, w):
    inp = w.make_inputs(DEVICE)
    prepared = prepare_or_skip(provider, inp)
    with prepared.context():
        out = first_call_or_skip(prepared)
        ref = llmkernels.reference.scaled_dot_product_attention(
            inp.q.double(), inp.k.double(), inp.v.double(), is_causal=w.causal)
        # fp32 inputs: any fp32 implementation lands within ~1e-6 of the float64 result at these sizes
        err = (out.double() - ref).abs().max().item()
        assert err < 1e-4, f"{provider.name}: max error {err:.2e} vs the float64 reference"
        time_it(benchmark, provider, prepared, f"attention {w.label}")
