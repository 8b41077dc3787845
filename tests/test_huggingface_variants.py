"""Hugging Face models with attention variants under attn_implementation="llmkernels": sliding window (Mistral,
Qwen2, Gemma 2/3, GPT-OSS), softcap (Gemma 2) and attention sinks (GPT-OSS's s_aux), with left and right padding.

Tiny random configs (hidden 32, 2 layers, window 8 at sequence 24 so the window hides keys). Reference: the model
in float64 under transformers' own implementation ("sdpa", or "eager" where sdpa lacks the feature: softcap,
sinks); naive baseline: the same in float32; ours in float32; compared under the tolerance rule.

transformers' float64 eager mask uses finfo(float64).min, which overflows to -inf once a negative score is added,
so rows that see no key (left padding) become NaN there and the NaN reaches every gradient through the padded
positions' hidden states. The eager reference therefore gets a mask of -1e30 instead (the same function for any
row that sees a key: exp(-1e30 - max) is exactly 0 in float64); padded query positions, whose output no kept
position or label reads, are compared only for the kept positions.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import masking_utils  # noqa: E402

from llmkernels import ops, varlen  # noqa: E402
from llmkernels.integrations import hf_varlen  # noqa: E402
from llmkernels.integrations import huggingface as lk_hf  # noqa: E402
from test_huggingface import _run  # noqa: E402  (logits, loss and gradients of one training step)
from tolerance import assert_by_rule  # noqa: E402

VOCAB, SEQ, WINDOW = 64, 24, 8


def _common():
    return dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=0.0)


def _config(kind):
    c = _common()
    if kind == "mistral":
        return transformers.MistralConfig(sliding_window=WINDOW, **c)
    if kind == "qwen2":
        return transformers.Qwen2Config(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=0, **c)
    if kind == "gemma2":
        return transformers.Gemma2Config(sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8,
                                         attn_logit_softcapping=2.0, final_logit_softcapping=None, **c)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8,
                                             layer_types=["sliding_attention", "full_attention"], **c)
    if kind == "gpt_oss":
        c["max_position_embeddings"] = 4096  # YaRN's original context: keeps its scaling-factor warning quiet
        return transformers.GptOssConfig(sliding_window=WINDOW, head_dim=8, num_local_experts=2,
                                         num_experts_per_tok=1, layer_types=["sliding_attention", "full_attention"],
                                         **c)
    raise AssertionError(kind)


# transformers' implementation that computes the feature: sdpa refuses softcap and ignores sinks
REFERENCE_IMPL = {"mistral": "sdpa", "qwen2": "sdpa", "gemma3": "sdpa", "gemma2": "eager", "gpt_oss": "eager"}
KINDS = list(REFERENCE_IMPL)


pytestmark = pytest.mark.usefixtures("auto_dispatch")


@pytest.fixture(autouse=True)
def finite_eager_mask(monkeypatch):
    def eager_mask(*args, dtype=torch.float32, **kwargs):
        kwargs.pop("allow_is_causal_skip", None)
        mask = masking_utils.sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
        if mask is None:
            return None
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                           torch.full((), -1e30, dtype=dtype, device=mask.device))

    monkeypatch.setitem(masking_utils.AttentionMaskInterface._global_mapping, "eager", eager_mask)


@pytest.fixture
def kernel_calls(monkeypatch):
    """What the attention function passes to llmkernels, per call: (q shape, mask shape or None, is_causal,
    window_size, causal_alignment, softcap, sinks given); and it must reach our op each time. Unpadded batches
    (varlen_attention) show "varlen" for the mask shape, bottom-right causal with the window as (W - 1, 0)."""
    calls, op_calls = [], []
    original, original_op = lk_hf.scaled_dot_product_attention, ops.sdpa_forward
    original_varlen_call, original_varlen_op = hf_varlen.varlen_call, varlen.varlen_forward

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        calls.append((tuple(q.shape), None if attn_mask is None else tuple(attn_mask.shape), is_causal,
                      tuple(kw["window_size"]), kw["causal_alignment"], kw["softcap"], kw["sinks"] is not None))
        return original(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, **kw)

    def varlen_spy(q, k, v, *args, window, softcap, **kw):
        calls.append((tuple(q.shape), "varlen", True, (-1, -1) if window is None else (window - 1, 0),
                      "bottom_right", softcap, False))
        return original_varlen_call(q, k, v, *args, window=window, softcap=softcap, **kw)

    def op_spy(*args):
        op_calls.append(1)
        return original_op(*args)

    def varlen_op_spy(*args):
        op_calls.append(1)
        return original_varlen_op(*args)

    monkeypatch.setattr(lk_hf, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(ops, "sdpa_forward", op_spy)
    monkeypatch.setattr(hf_varlen, "varlen_call", varlen_spy)
    monkeypatch.setattr(varlen, "varlen_forward", varlen_op_spy)
    yield calls
    assert len(op_calls) == len(calls)


def _models(kind, device, keys=("ours", "ref", "naive")):
    cfg = _config(kind)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
    # The default init (std 0.02) makes attention nearly uniform; wider weights make a wrong window, mask or
    # sink visible in the logits.
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    state = base.state_dict()
    spec = {"ours": ("llmkernels", torch.float32), "ref": (REFERENCE_IMPL[kind], torch.float64),
            "naive": (REFERENCE_IMPL[kind], torch.float32)}
    models = {}
    for key in keys:
        impl, dtype = spec[key]
        # grouped_mm has no float64: the MoE experts of GPT-OSS run their eager loop
        m = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl,
                                                          experts_implementation="eager")
        m.load_state_dict(state)
        models[key] = m.to(device, dtype).train()
    return models


def _batch(padding, device, batch=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    if padding == "left":
        mask[1, :5] = 0
        mask[2, :11] = 0
    elif padding == "right":
        mask[0, 19:] = 0
        mask[2, 9:] = 0
    # A label is scored from the logits one position earlier: with left padding the first kept token's would
    # come from a padded position, whose row sees no key (0 in SDPA and here, the mean of the values in eager),
    # so it is not scored either.
    before = torch.cat([torch.zeros(batch, 1, dtype=mask.dtype), mask[:, :-1]], dim=1)
    labels = ids.masked_fill((mask == 0) | (before == 0), -100)
    return ids.to(device), mask.to(device), labels.to(device)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_loss_and_gradients_match_transformers(kind, padding, device, kernel_calls):
    models = _models(kind, device)
    ids, mask, labels = _batch(padding, device)
    results = {key: _run(m, ids, mask, labels) for key, m in models.items()}
    assert len(kernel_calls) == 2, "every layer's attention must run on llmkernels"
    # the compact form, causal bottom-right, the window as (W - 1, 0): the valid tokens unpadded into
    # varlen_attention (left and right padding keep each row's tokens contiguous, so the window is exact there);
    # with sinks, which varlen has not, a (B, 1, 1, S) key-padding mask on the dense op
    sliding = [c for c in kernel_calls if c[3] != (-1, -1)]
    assert sliding and all(c[3] == (WINDOW - 1, 0) for c in sliding), kernel_calls
    form = (3, 1, 1, SEQ) if kind == "gpt_oss" else "varlen"
    assert all(c[1] == form and c[2] is True and c[4] == "bottom_right" for c in kernel_calls), kernel_calls
    assert all(c[5] == (2.0 if kind == "gemma2" else 0.0) for c in kernel_calls)
    assert all(c[6] == (kind == "gpt_oss") for c in kernel_calls)

    (lo, lso, go), (lr, lsr, gr), (ln, lsn, gn) = results["ours"], results["ref"], results["naive"]
    keep = mask.bool()
    assert_by_rule("logits[kept]", lo[keep], lr[keep], ln[keep], torch.float32)
    assert_by_rule("loss", lso, lsr, lsn, torch.float32)
    assert set(go) == set(gr) and "model.layers.0.self_attn.q_proj.weight" in go
    if kind == "gpt_oss":
        assert go["model.layers.0.self_attn.sinks"].abs().max() > 0  # the sinks learn
    for name in gr:
        assert_by_rule(f"grad {name}", go[name], gr[name], gn[name], torch.float32)


@pytest.mark.parametrize("kind", ["mistral", "gemma2", "gpt_oss"])
def test_variants_change_the_result(kind, device):
    """Guards against a window, softcap or sink that is silently dropped: without it, the logits move."""
    models = _models(kind, device, keys=("ours",))
    ids, mask, _ = _batch("none", device)
    m = models["ours"]
    with torch.no_grad():
        base = m(input_ids=ids).logits
        if kind == "gpt_oss":
            for layer in m.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
        elif kind == "gemma2":
            for layer in m.model.layers:
                layer.self_attn.attn_logit_softcapping = None
        else:
            m.config.sliding_window = None
            for layer in m.model.layers:
                layer.self_attn.config.sliding_window = None
        changed = m(input_ids=ids).logits
    assert (base - changed).abs().max() > 1e-2


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("kind", ["mistral", "gemma3", "gpt_oss"])
def test_greedy_generate_matches_transformers(kind, padding, device, kernel_calls, monkeypatch):
    """Greedy decoding with a cache past the window: the same tokens as transformers' implementation. The
    decoding steps (L = 1) take the compact form too: the queries are the last keys of a dynamic cache. Those
    the split-K route takes (hf_decode.py: no mask, or left padding at S >= 16) reach attention_with_kvcache
    instead of the dense kernel."""
    from llmkernels.integrations import hf_decode
    decode_calls = []
    original = hf_decode.attention_with_kvcache
    monkeypatch.setattr(hf_decode, "attention_with_kvcache",
                        lambda query, *a, **kw: decode_calls.append(query.shape[1]) or original(query, *a, **kw))
    models = _models(kind, device, keys=("ours", "naive"))
    ids, mask, _ = _batch(padding, device)
    ids, mask = ids[1:, :12], mask[1:, :12]  # with left padding: 5 and 11 pads of 12
    tokens = {}
    for key, m in models.items():
        m.eval()
        with torch.no_grad():
            tokens[key] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                     pad_token_id=0)
    assert torch.equal(tokens["ours"], tokens["naive"])
    steps = [c for c in kernel_calls if c[0][2] == 1]
    assert len(steps) + len(decode_calls) == 2 * 9 and all(L == 1 for L in decode_calls)
    assert all(c[2] is True and c[4] == "bottom_right" for c in steps)
    if kind == "gpt_oss":
        assert not decode_calls  # sinks: the dense kernel
    if padding == "none":
        assert all(c[1] is None for c in kernel_calls)  # no mask at all: the kernel needs none


def test_static_cache_gets_the_full_mask(device, kernel_calls):
    """A static cache's S is its capacity, not the queries' end: only transformers' complete mask is exact, and
    the attention call then adds no causal rule or window of its own."""
    models = _models("mistral", device, keys=("ours", "naive"))
    ids, mask, _ = _batch("left", device)
    ids, mask = ids[1:, :12], mask[1:, :12]
    tokens = {}
    for key, m in models.items():
        m.eval()
        with torch.no_grad():
            tokens[key] = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                     pad_token_id=0, cache_implementation="static")
    assert torch.equal(tokens["ours"], tokens["naive"])
    steps = [c for c in kernel_calls if c[0][2] == 1]
    assert steps and all(len(c[1]) == 4 and c[1][2] == 1 and c[2] is False and c[3] == (-1, -1) for c in steps)


def _mask_args(**kw):
    base = dict(batch_size=2, q_length=4, kv_length=10, q_offset=6, kv_offset=0,
                mask_function=masking_utils.causal_mask_function, attention_mask=None, device="cpu")
    base.update(kw)
    return base


def test_mask_builder_forms():
    pad = torch.ones(2, 10, dtype=torch.bool)
    assert lk_hf.mask_builder(**_mask_args()) is None                     # queries at the end: compact
    pad[1, :3] = False
    got = lk_hf.mask_builder(**_mask_args(attention_mask=pad))
    assert got.shape == (2, 10) and torch.equal(got, pad)
    sw = masking_utils.sliding_window_causal_mask_function(3)
    # a sliding cache: keys from absolute position 5 on (kv_offset), queries the last 4 of 5 keys
    assert lk_hf.mask_builder(**_mask_args(kv_length=5, kv_offset=5, q_offset=6, q_length=4, mask_function=sw,
                                           attention_mask=pad)) is None  # padding only before the keys seen
    pad2 = pad.clone()
    pad2[0, 7] = False
    got = lk_hf.mask_builder(**_mask_args(kv_length=5, kv_offset=5, q_offset=6, q_length=4, mask_function=sw,
                                          attention_mask=pad2))
    assert torch.equal(got, pad2[:, 5:10])
    # a static cache (S = capacity > end of queries) and an unknown function: transformers' complete mask
    full = lk_hf.mask_builder(**_mask_args(kv_length=16))
    assert full.shape == (2, 1, 4, 16) and torch.equal(full[0, 0], masking_utils.sdpa_mask(
        **_mask_args(kv_length=16), allow_is_causal_skip=False)[0, 0])
    lookalike = lambda b, h, q, kv: kv <= q  # noqa: E731 - the same pattern, but not transformers' function
    assert lk_hf.mask_builder(**_mask_args(mask_function=lookalike)).shape == (2, 1, 4, 10)
    assert lk_hf.mask_builder(**_mask_args(allow_is_causal_skip=False)).shape == (2, 1, 4, 10)
    # L = 1: a complete mask is (B, 1, 1, S), never 2-D, so the two forms stay apart
    assert lk_hf.mask_builder(**_mask_args(q_length=1, q_offset=3, kv_length=16)).shape == (2, 1, 1, 16)
    bidir = lk_hf.mask_builder(**_mask_args(mask_function=masking_utils.bidirectional_mask_function,
                                            attention_mask=pad, allow_is_bidirectional_skip=True))
    assert bidir.shape == (2, 1, 1, 10) and torch.equal(bidir[:, 0, 0], pad)
    # asked for a materialised mask (to concatenate it): transformers' full one
    bidir = lk_hf.mask_builder(**_mask_args(mask_function=masking_utils.bidirectional_mask_function,
                                            attention_mask=pad, allow_is_bidirectional_skip=False))
    assert bidir.shape == (2, 1, 4, 10) and torch.equal(bidir[:, 0], pad[:, None, :].expand(2, 4, 10))


class _Module(torch.nn.Module):
    is_causal = True


def test_attention_forward_honours_or_refuses_keywords():
    q = torch.randn(2, 4, 5, 8)
    k = v = torch.randn(2, 2, 5, 8)
    mod = _Module()
    with pytest.raises(ValueError, match="indices"):
        lk_hf.attention_forward(mod, q, k, v, None, indices=torch.zeros(1))
    with pytest.raises(ValueError, match="not know: frobnicate"):
        lk_hf.attention_forward(mod, q, k, v, None, frobnicate=1)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        lk_hf.attention_forward(mod, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="both s_aux and sinks"):
        lk_hf.attention_forward(mod, q, k, v, None, s_aux=torch.zeros(4), sinks=torch.zeros(4))
    with pytest.raises(ValueError, match="sliding_window"):
        lk_hf.attention_forward(mod, q, k, v, None, sliding_window=0)
    with pytest.raises(ValueError, match="not causal"):
        lk_hf.attention_forward(mod, q, k, v, torch.ones(2, 5, dtype=torch.bool), is_causal=False)
    # harmless keywords pass; sinks reach the op and change the output
    plain, _ = lk_hf.attention_forward(mod, q, k, v, None, output_attentions=False, position_ids=torch.arange(5))
    sunk, _ = lk_hf.attention_forward(mod, q, k, v, None, s_aux=torch.full((4,), 2.0))
    assert plain.shape == (2, 5, 4, 8) and (plain - sunk).abs().max() > 1e-3
