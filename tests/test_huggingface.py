"""Hugging Face transformers with attn_implementation="llmkernels": a small randomly initialised Llama-style model
(no downloads) gives the logits, loss and gradients of attn_implementation="sdpa", with padding and with GQA.

The comparison uses the tolerance rule: the "sdpa" model in float64 is the reference, the "sdpa" model in
float32 the naive baseline, and the llmkernels model runs in float32.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmkernels  # noqa: E402
from llmkernels import ops, varlen  # noqa: E402
from llmkernels.integrations import huggingface as lk_hf  # noqa: E402
from tolerance import assert_by_rule  # noqa: E402

VOCAB, LAYERS = 128, 2


def _config(kv_heads):
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                                    max_position_embeddings=64, attention_dropout=0.0)


pytestmark = pytest.mark.usefixtures("auto_dispatch")


@pytest.fixture
def kernel_calls(monkeypatch):
    """(q shape, k shape, mask dtype or None, is_causal) per dense op call; (q shape, k shape, "varlen",
    is_causal) per varlen op call (packed and unpadded batches)."""
    calls = []
    original, original_varlen = ops.sdpa_forward, varlen.varlen_forward

    def spy(q, k, v, mask, *rest):
        calls.append((tuple(q.shape), tuple(k.shape), None if mask is None else mask.dtype, rest[1]))
        return original(q, k, v, mask, *rest)

    def varlen_spy(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, *rest):
        calls.append((tuple(q.shape), tuple(k.shape), "varlen", is_causal))
        return original_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, *rest)

    monkeypatch.setattr(ops, "sdpa_forward", spy)
    monkeypatch.setattr(varlen, "varlen_forward", varlen_spy)
    return calls


def _models(kv_heads, device):
    cfg = _config(kv_heads)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    # Llama's init draws small weights (std 0.02) that make attention nearly uniform; wider ones make the
    # attention pattern, and so a wrong mask or head mapping, visible in the logits.
    with torch.no_grad():
        for name, p in base.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    state = base.state_dict()
    models = {}
    for key, impl, dtype in (("ours", "llmkernels", torch.float32), ("ref", "sdpa", torch.float64),
                             ("naive", "sdpa", torch.float32)):
        # a config of its own: from_config records the implementation on the config object it is given
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl)
        m.load_state_dict(state)
        models[key] = m.to(device, dtype).train()  # train(): gradients as in fine-tuning (dropout is 0)
    assert models["ours"].config._attn_implementation == "llmkernels"
    return models


def _batch(padding, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    if padding == "left":
        mask[1, :4] = 0
        mask[2, :9] = 0
    elif padding == "right":
        mask[0, 10:] = 0
        mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device)


def _run(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out.logits, out.loss, grads


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_loss_and_gradients_match_sdpa(kv_heads, padding, device, kernel_calls):
    models = _models(kv_heads, device)
    ids, mask, labels = _batch(padding, device)
    results = {key: _run(m, ids, mask, labels) for key, m in models.items()}
    assert len(kernel_calls) == LAYERS, "every layer's attention must run on llmkernels"
    q_shape, k_shape, mask_dtype, causal = kernel_calls[0]
    assert causal is True  # the causal rule is our flag
    if padding == "none":  # no mask: the dense op, causal
        assert q_shape == (3, 4, 13, 16) and k_shape == (3, kv_heads, 13, 16)  # GQA read in place, not repeated
        assert mask_dtype is None
    else:  # the key-padding mask: the valid tokens unpadded into varlen_attention
        tokens = int(mask.sum())
        assert mask_dtype == "varlen" and q_shape == (tokens, 4, 16) and k_shape == (tokens, kv_heads, 16)

    (lo, lso, go), (lr, lsr, gr), (ln, lsn, gn) = results["ours"], results["ref"], results["naive"]
    keep = mask.bool()
    # Logits of padded positions: transformers' left-padded query rows see no key (all masked -> 0 in both
    # PyTorch's SDPA and ours), so every position is compared. Right-padded query rows are not computed by the
    # unpadded path (0, as in transformers' flash-attention path; SDPA averages the row's values there): no
    # kept position or label reads them, so only the kept positions are compared.
    if padding != "right":
        assert_by_rule("logits", lo, lr, ln, torch.float32)
    assert_by_rule("logits[kept]", lo[keep], lr[keep], ln[keep], torch.float32)
    assert_by_rule("loss", lso, lsr, lsn, torch.float32)
    assert set(go) == set(gr) and len(go) == len(list(models["ours"].parameters()))
    for name in gr:
        assert_by_rule(f"grad {name}", go[name], gr[name], gn[name], torch.float32)


def test_padding_changes_the_result(device):
    # Guard against a mask that is silently dropped: with left padding, the logits of a kept position differ
    # from those of the same tokens without the padding mask.
    models = _models(2, device)
    ids, mask, _ = _batch("left", device)
    with torch.no_grad():
        padded = models["ours"](input_ids=ids, attention_mask=mask).logits
        unpadded = models["ours"](input_ids=ids).logits
    assert (padded[1, 4:] - unpadded[1, 4:]).abs().max() > 1e-2


def test_cached_decoding_step_matches_sdpa(device, kernel_calls):
    """Prefill with a cache, then one decoding step (a single query against the cache, no causal flag)."""
    models = _models(2, device)
    ids, mask, _ = _batch("left", device)
    nxt = torch.tensor([[5], [17], [99]], device=device)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype, device=device)], dim=1)
    logits = {}
    with torch.no_grad():
        for key, m in models.items():
            m.eval()
            pre = m(input_ids=ids, attention_mask=mask, use_cache=True)
            # transformers 5.x names the argument "cache" (past_key_values is deprecated), 4.x past_key_values
            cache_kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
            step = m(input_ids=nxt, attention_mask=step_mask, use_cache=True, **{cache_kw: pre.past_key_values})
            logits[key] = step.logits
    assert len(kernel_calls) == 2 * LAYERS
    # the prefill (no cache offset) unpadded into varlen; the step reads the cache in place with the mask
    assert [c[2] for c in kernel_calls] == ["varlen"] * LAYERS + [torch.bool] * LAYERS
    assert kernel_calls[-1][0] == (3, 4, 1, 16) and kernel_calls[-1][1] == (3, 2, 14, 16)
    assert_by_rule("decode logits", logits["ours"], logits["ref"], logits["naive"], torch.float32)


def test_set_attn_implementation_on_a_built_model(device, kernel_calls):
    model = transformers.AutoModelForCausalLM.from_config(_config(2)).to(device)
    model.set_attn_implementation("llmkernels")
    ids, mask, _ = _batch("right", device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert len(kernel_calls) == LAYERS


def test_sdpa_models_can_be_routed_instead(device, kernel_calls):
    """The other way in: an unmodified attn_implementation="sdpa" model under llmkernels.route_sdpa()."""
    models = _models(2, device)
    ids, mask, labels = _batch("left", device)
    with llmkernels.route_sdpa():
        logits, loss, _ = _run(models["naive"], ids, mask, labels)
    assert len(kernel_calls) == LAYERS
    assert llmkernels.routing_stats().routed.total() >= LAYERS
    ours_logits, _, _ = _run(models["ours"], ids, mask, labels)
    torch.testing.assert_close(logits, ours_logits, rtol=1e-5, atol=1e-5)


def test_register_is_idempotent_and_names_are_registered():
    lk_hf.register()
    lk_hf.register("llmkernels_again")
    assert transformers.AttentionInterface._global_mapping["llmkernels"] is lk_hf.attention_forward
    assert transformers.AttentionInterface._global_mapping["llmkernels_again"] is lk_hf.attention_forward
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionMaskInterface._global_mapping["llmkernels"] is lk_hf.mask_builder


def test_top_level_register_helper(device, kernel_calls):
    llmkernels.register_huggingface("llmkernels_top")
    model = transformers.AutoModelForCausalLM.from_config(_config(2), attn_implementation="llmkernels_top").to(device)
    with torch.no_grad():
        model(input_ids=_batch("none", device)[0])
    assert len(kernel_calls) == LAYERS
