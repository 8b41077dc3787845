"""Hugging Face generation with attn_implementation="llmkernels": greedy generate() gives the tokens of "sdpa"
with the dynamic and the static cache, on tiny random Llama (GQA) and Mistral (sliding window) models with a
left-padded batch; the decode steps without a mask take the split-K kernels (attention_with_kvcache), checked
against the float64 reference directly.

Tiny configs (hidden 32, 2 layers, 4 query heads on 2 kv heads), weights drawn wider than Llama's init so that
attention is far from uniform and a wrong key set changes the tokens. Both models run in float32.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from llmkernels.integrations import huggingface as lk_hf  # noqa: E402
from runnable import default_dispatch  # noqa: E402
from tolerance import assert_by_rule  # noqa: E402

VOCAB, PROMPT, NEW, WINDOW = 64, 11, 5, 6


@pytest.fixture(autouse=True)
def auto_dispatch():
    with default_dispatch() as name:
        yield name


@pytest.fixture
def decode_calls(monkeypatch):
    """Each attention_forward call that took the split-K route: (L, S)."""
    calls = []
    original = lk_hf.attention_with_kvcache

    def spy(query, k_cache, *args, **kwargs):
        calls.append((query.shape[1], k_cache.shape[1]))
        return original(query, k_cache, *args, **kwargs)

    monkeypatch.setattr(lk_hf, "attention_with_kvcache", spy)
    return calls


def _config(kind):
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if kind == "mistral":  # the window (6 keys) is shorter than prompt + new tokens, so it hides keys
        return transformers.MistralConfig(sliding_window=WINDOW, **common)
    return transformers.LlamaConfig(**common)


def _models(kind):
    cfg = _config(kind)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa")
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.25)
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="llmkernels")
    ours.load_state_dict(base.state_dict())
    assert ours.config._attn_implementation == "llmkernels"
    return base.eval(), ours.eval()


def _prompts(padded):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, VOCAB, (3, PROMPT), generator=g)
    mask = torch.ones(3, PROMPT, dtype=torch.long)
    if padded:  # left padding of different lengths, as a tokenizer with padding_side="left" gives
        mask[1, :3] = 0
        mask[2, :7] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _generate(model, ids, mask, cache):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, **extra)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_left_padded_same_tokens_as_sdpa(kind, cache):
    base, ours = _models(kind)
    ids, mask = _prompts(padded=True)
    expected = _generate(base, ids, mask, cache)
    got = _generate(ours, ids, mask, cache)
    assert got.shape == (3, PROMPT + NEW)
    assert torch.equal(got, expected), f"{kind}/{cache}: tokens\n{got[:, PROMPT:]}\n!= sdpa's\n{expected[:, PROMPT:]}"


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_decode_steps_take_split_k(kind, decode_calls):
    """Without padding the dynamic cache's decode steps reach us with no mask: every one of them (NEW - 1 steps
    in each layer, L = 1 against the cache) runs attention_with_kvcache, and the tokens are sdpa's."""
    base, ours = _models(kind)
    ids, mask = _prompts(padded=False)
    expected = _generate(base, ids, mask, "dynamic")
    got = _generate(ours, ids, mask, "dynamic")
    assert torch.equal(got, expected), f"{kind}: tokens\n{got[:, PROMPT:]}\n!= sdpa's\n{expected[:, PROMPT:]}"
    layers = ours.config.num_hidden_layers
    assert len(decode_calls) == layers * (NEW - 1), decode_calls
    assert all(L == 1 for L, _ in decode_calls)
    # Mistral's sliding-window cache keeps WINDOW - 1 past keys: S stops growing there
    longest = max(S for _, S in decode_calls)
    assert longest == (WINDOW if kind == "mistral" else PROMPT + NEW - 1), decode_calls


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, L, S, window, softcap, scale):
    """Float64 (or float32, the naive baseline) attention with the bottom-right causal rule and window."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qi = torch.arange(L)[:, None] + (S - L)
    kj = torch.arange(S)[None, :]
    keep = kj <= qi
    if window is not None:
        keep &= kj > qi - window
    s = s.masked_fill(~keep, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("L, Hkv, window, softcap", [(1, 2, None, 0.0), (5, 1, 9, 3.0)],
                         ids=["L1-gqa4", "L5-mqa-window-softcap"])
def test_attention_forward_decode_route(L, Hkv, window, softcap, decode_calls):
    """attention_forward's split-K route against the float64 reference (an odd S of 37 keys, head dim 24), and
    the calls that must stay dense: a key-padding mask, a gradient."""
    B, Hq, S, D = 2, 8, 37, 24
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g) * 2.0
    v = torch.randn(B, Hkv, S, D, generator=g)
    scale = D ** -0.5
    out, weights = lk_hf.attention_forward(_Module(), q, k, v, None, scaling=scale, sliding_window=window,
                                           softcap=softcap or None)
    assert weights is None and decode_calls == [(L, S)]
    assert out.shape == (B, L, Hq, D) and out.is_contiguous()
    ref = _reference(q.double(), k.double(), v.double(), L, S, window, softcap, scale)
    naive = _reference(q, k, v, L, S, window, softcap, scale)
    assert_by_rule("decode out", out, ref, naive, torch.float32)

    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :4] = False
    lk_hf.attention_forward(_Module(), q, k, v, pad, scaling=scale, sliding_window=window, softcap=softcap or None)
    lk_hf.attention_forward(_Module(), q.requires_grad_(), k, v, None, scaling=scale, sliding_window=window,
                            softcap=softcap or None)
    assert decode_calls == [(L, S)], "a padding mask or a gradient must keep the dense path"
