"""The GPU autotuner's config lists (triton_kernels/attention/configs.py), checked without a GPU: every list the
prune can hand out is drawn from the configs the autotuner is built with (a config missing there would leave a
call with nothing to launch on a GPU), and packed variable-length calls get their own lists where the VARLEN
mode spills (configs._VARLEN_CONFIGS)."""

import itertools

import pytest
import torch

from llmkernels.triton_kernels.attention import configs

KERNELS = ("fwd", "dkdv", "dq")
CASES = list(itertools.product((80, 90), KERNELS, ("half", "fp32"), (64, 128, 256), ("base", "dropout"),
                               (False, True)))


def _keys(config_list):
    return {configs._config_key(c) for c in config_list or []}


def _prune_args(precision, bucket, variant, rule, varlen):
    dtype = torch.float16 if precision == "half" else torch.float32
    args = dict(Q=torch.empty(1, dtype=dtype), BLOCK_D=bucket, BLOCK_DV=bucket, HAS_DROPOUT=variant == "dropout",
                VARLEN=varlen)
    args.update({name: rule for name in configs._RULE_FLAG_NAMES})
    return args


@pytest.mark.parametrize("arch", (80, 90))
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_offered_config_is_an_autotune_candidate(arch, kernel):
    candidates = _keys(configs._all_configs(arch, kernel))
    missing = []
    for a, k, precision, bucket, variant, rule in CASES:
        if (a, k) != (arch, kernel):
            continue
        for choose in (configs._configs_for, configs._varlen_configs_for):
            offered = _keys(choose(arch, kernel, precision, bucket, variant, rule))
            if offered - candidates:
                missing.append((choose.__name__, precision, bucket, variant, rule, sorted(offered - candidates)))
    assert not missing, missing


@pytest.mark.parametrize("varlen", (False, True))
def test_prune_offers_the_list_of_the_call(varlen):
    """The prune returns exactly the dense or the varlen list of the call's precision, head-dim bucket, variant and
    rule flags, and never an empty list where a list exists."""
    for arch, kernel, precision, bucket, variant, rule in CASES:
        choose = configs._varlen_configs_for if varlen else configs._configs_for
        want = _keys(choose(arch, kernel, precision, bucket, variant, rule))
        if not want:
            continue  # None: that backward runs densely, the kernel is never launched
        prune = configs._make_prune(arch, kernel)
        got = prune(configs._all_configs(arch, kernel), _prune_args(precision, bucket, variant, rule, varlen))
        assert _keys(got) == want, (arch, kernel, precision, bucket, variant, rule, varlen)


def test_varlen_lists_replace_the_spilling_configs():
    """Where _VARLEN_CONFIGS has an entry the varlen call gets it, differing from the dense list (an entry equal to
    the dense list would be dead), and every other varlen call gets the dense list."""
    for arch, kernel, precision, bucket, variant, rule in CASES:
        dense = _keys(configs._configs_for(arch, kernel, precision, bucket, variant, rule))
        varlen = _keys(configs._varlen_configs_for(arch, kernel, precision, bucket, variant, rule))
        key = (configs._arch_family(arch), precision, kernel, bucket, variant, rule)
        if key in configs._VARLEN_CONFIGS:
            assert varlen == _keys(configs._VARLEN_CONFIGS[key]) and varlen != dense and varlen, key
        else:
            assert varlen == dense, key
    # The entry found by the triton 3.6 report: M16 N64 w4 s2 spills in the VARLEN dK/dV kernel on sm_80.
    assert _keys(configs._varlen_configs_for(80, "dkdv", "half", 64, "dropout")) == {(16, 64, 4, 1)}
