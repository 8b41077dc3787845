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

from llmkernels.integrations import hf_decode  # noqa: E402
from llmkernels.integrations import huggingface as lk_hf  # noqa: E402
from tolerance import assert_by_rule  # noqa: E402

VOCAB, PROMPT, NEW, WINDOW = 64, 21, 5, 18


pytestmark = pytest.mark.usefixtures("auto_dispatch")


@pytest.fixture
def decode_calls(monkeypatch):
    """Each attention_with_kvcache call of the decode route: (L, S, paged); S is the page size when paged (the
    left-padded route)."""
    calls = []
    original = hf_decode.attention_with_kvcache

    def spy(query, k_cache, *args, **kwargs):
        calls.append((query.shape[1], k_cache.shape[1], kwargs.get("block_table") is not None))
        return original(query, k_cache, *args, **kwargs)

    monkeypatch.setattr(hf_decode, "attention_with_kvcache", spy)
    return calls


def _config(kind):
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=0.0,
                  pad_token_id=0, bos_token_id=1, eos_token_id=None)
    if kind == "mistral":  # the window (18 keys) is shorter than prompt + new tokens, so it hides keys
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
    if padded:  # left padding of different lengths, as a tokenizer with padding_side="left" gives: in the decode
        # steps (S = 22..25 keys) row 1 has a whole page and a few keys before it, row 2 fewer than a page
        mask[1, :3] = 0
        mask[2, :9] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _generate(model, ids, mask, cache):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, **extra)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_left_padded_same_tokens_as_sdpa(kind, cache, decode_calls):
    """The dynamic cache's decode steps take the left-padded split-K route (paged view of the cache); the static
    cache's complete 4-D masks keep the dense kernels."""
    base, ours = _models(kind)
    ids, mask = _prompts(padded=True)
    expected = _generate(base, ids, mask, cache)
    got = _generate(ours, ids, mask, cache)
    assert got.shape == (3, PROMPT + NEW)
    assert torch.equal(got, expected), f"{kind}/{cache}: tokens\n{got[:, PROMPT:]}\n!= sdpa's\n{expected[:, PROMPT:]}"
    steps = ours.config.num_hidden_layers * (NEW - 1) if cache == "dynamic" else 0
    assert decode_calls == [(1, hf_decode.PAGE, True)] * steps


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
    assert all(L == 1 and not paged for L, _, paged in decode_calls)
    # Mistral's sliding-window cache keeps WINDOW - 1 past keys: S stops growing there
    longest = max(S for _, S, _ in decode_calls)
    assert longest == (WINDOW if kind == "mistral" else PROMPT + NEW - 1), decode_calls


class _Module(torch.nn.Module):
    is_causal = True


def _reference(q, k, v, L, S, window, softcap, scale, start):
    """Float64 (or float32, the naive baseline) attention with the bottom-right causal rule and window over the
    keys [start[b], S) of each sequence; a row that sees no key gives 0 (as the dense op)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)  # the poison is hidden below; 0 * NaN would spread it
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qi = torch.arange(L)[:, None] + (S - L)
    kj = torch.arange(S)[None, :]
    keep = (kj <= qi) & (kj[None] >= start[:, None, None])  # (B, L, S)
    if window is not None:
        keep &= kj > qi - window
    keep = keep[:, None]
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.where(keep.any(-1, keepdim=True), s.softmax(-1).nan_to_num(0.0), 0.0)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("L, Hkv, window, softcap, padded", [(1, 2, None, 0.0, True), (5, 1, 9, 3.0, False),
                                                             (5, 1, 9, 3.0, True)],
                         ids=["L1-gqa4-left-padded", "L5-mqa-window-softcap", "L5-mqa-window-softcap-left-padded"])
def test_attention_forward_decode_route(L, Hkv, window, softcap, padded, decode_calls, monkeypatch):
    """attention_forward's split-K routes against the float64 reference (S = 37 keys, head dim 24). Left padding
    of 0, 5, 17, 30 and all 37 keys: whole pages with 5, 0 and 4 keys before them, 7 keys and no page, no key at
    all; the padding keys and the keys left of the window are NaN, so reading one shows. Calls that must stay dense: a key-padding mask not
    recorded as left padding by mask_builder, a gradient."""
    B, Hq, S, D = 5, 8, 37, 24
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g) * 2.0
    v = torch.randn(B, Hkv, S, D, generator=g)
    start = torch.tensor([0, 5, 17, 30, 37]) if padded else torch.zeros(B, dtype=torch.long)
    pad = torch.arange(S)[None, :] >= start[:, None]
    # NaN the padding keys and, with a window, the keys left of every row's window (row 0 sits at S - L and sees
    # keys > S - L - window): the kernels must read neither.
    hidden = ~pad if window is None else ~pad | (torch.arange(S)[None, :] <= S - L - window)
    k = k.masked_fill(hidden[:, None, :, None], float("nan"))
    v = v.masked_fill(hidden[:, None, :, None], float("nan"))
    mask = None
    if padded:
        mask = pad.clone()
        hf_decode.record_left_padded(mask)
    scale = D ** -0.5
    kw = dict(scaling=scale, sliding_window=window, softcap=softcap or None)
    out, weights = lk_hf.attention_forward(_Module(), q, k, v, mask, **kw)
    assert weights is None and decode_calls == [(L, hf_decode.PAGE if padded else S, padded)]
    assert out.shape == (B, L, Hq, D) and out.is_contiguous()
    ref = _reference(q.double(), k.double(), v.double(), L, S, window, softcap, scale, start)
    naive = _reference(q, k, v, L, S, window, softcap, scale, start)
    assert_by_rule("decode out", out, ref, naive, torch.float32)

    dense = []  # the dense op stands in for itself here: only the route is checked
    monkeypatch.setattr(lk_hf, "scaled_dot_product_attention",
                        lambda query, *a, **kw: dense.append(query.shape) or torch.zeros_like(query))
    lk_hf.attention_forward(_Module(), q, k, v, pad.clone(), **kw)
    lk_hf.attention_forward(_Module(), q.requires_grad_(), k, v, mask, **kw)
    assert len(decode_calls) == 1 and len(dense) == 2, "an unrecorded mask or a gradient must keep the dense path"


def test_mask_builder_records_left_padding_only():
    """Only a mask True on a suffix of each row is recorded for the left-padded route: right padding or a hole
    (keys the split-K view would read) keeps the dense path."""
    from transformers import masking_utils

    def build(pad):
        return lk_hf.mask_builder(batch_size=2, q_length=1, kv_length=6, q_offset=5, kv_offset=0,
                                  mask_function=masking_utils.causal_mask_function, attention_mask=pad)

    left = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    hole = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 1]])
    built = {name: build(pad) for name, pad in (("left", left), ("right", right), ("hole", hole))}
    assert all(m.shape == (2, 6) and m.dtype == torch.bool for m in built.values())
    assert hf_decode.is_recorded_left_padded(built["left"])
    assert not hf_decode.is_recorded_left_padded(built["right"])
    assert not hf_decode.is_recorded_left_padded(built["hole"])
    assert not hf_decode.is_recorded_left_padded(built["left"].clone())  # a copy is not the checked mask
    assert build(torch.ones(2, 6, dtype=torch.long)) is None
