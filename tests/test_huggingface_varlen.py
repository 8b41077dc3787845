"""Hugging Face attn_implementation="llmkernels" on varlen_attention (llmkernels/integrations/hf_varlen.py):
padding-free packed documents (DataCollatorWithFlattening's position ids, or its cu_seq_lens_* kwargs) and padded
batches unpadded inside the attention function, against transformers' "sdpa" under the tolerance rule (float64
sdpa the reference, float32 sdpa the naive baseline), on the tiny random Llama (GQA) of test_huggingface.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DataCollatorWithFlattening, masking_utils  # noqa: E402

from llmkernels.integrations import hf_varlen  # noqa: E402
from llmkernels.integrations import huggingface as lk_hf  # noqa: E402
from test_huggingface import _models, _run, kernel_calls  # noqa: E402,F401  (fixtures)
from tolerance import assert_by_rule  # noqa: E402

pytestmark = pytest.mark.usefixtures("auto_dispatch")

DOCS = (5, 9, 1, 4)  # odd lengths, one of a single token


def _documents(device):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in DOCS]


def _packed(device, flash_kwargs):
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)([{"input_ids": d}
                                                                              for d in _documents(device)])
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _padded(device):
    """The same documents as a right-padded batch (labels -100 on padding and on each first token, as packed)."""
    docs, S = _documents(device), max(DOCS)
    ids = torch.zeros(len(docs), S, dtype=torch.long)
    mask = torch.zeros(len(docs), S, dtype=torch.long)
    for b, d in enumerate(docs):
        ids[b, :len(d)] = torch.tensor(d)
        mask[b, :len(d)] = 1
    return ids.to(device), mask.to(device), ids.masked_fill(mask == 0, -100).to(device)


def test_packed_documents_match_sdpa_and_the_padded_batch(device, kernel_calls, monkeypatch):
    """One packed row (position ids restarting per document): logits, loss and every parameter gradient against
    transformers' sdpa on the same row (its packed 4-D mask); the documents' cu_seqlens are found once per
    forward, not per layer; and the logits equal ours on the same documents padded into a batch."""
    found = []
    original = hf_varlen.packed_marker
    monkeypatch.setattr(hf_varlen, "packed_marker", lambda *a: found.append(1) or original(*a))
    models = _models(2, device)
    batch = _packed(device, flash_kwargs=False)
    T = sum(DOCS)

    def run(model):
        model.zero_grad(set_to_none=True)
        # use_cache=False, as in training: transformers' mask builder looks for packing only without a cache
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=False)
        out.loss.backward()
        return out.logits, out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    results = {key: run(m) for key, m in models.items()}
    assert found == [1]
    assert kernel_calls == [((T, 4, 16), (T, 2, 16), "varlen", True)] * 2  # GQA: 2 key heads, read in place
    (lo, lso, go), (lr, lsr, gr), (ln, lsn, gn) = results["ours"], results["ref"], results["naive"]
    assert_by_rule("logits", lo, lr, ln, torch.float32)
    assert_by_rule("loss", lso, lsr, lsn, torch.float32)
    assert set(go) == set(gr) and len(go) == len(list(models["ours"].parameters()))
    for name in gr:
        assert_by_rule(f"grad {name}", go[name], gr[name], gn[name], torch.float32)

    ids, mask, labels = _padded(device)
    padded_logits, padded_loss, _ = _run(models["ours"], ids, mask, labels)
    torch.testing.assert_close(padded_logits[mask.bool()], lo[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_loss, lso, rtol=1e-5, atol=1e-6)

    # With a cache object (use_cache=True) transformers builds a plain causal mask; our function still finds
    # the documents in the position ids (as transformers' FlashAttention path): the same logits.
    kernel_calls.clear()
    with torch.no_grad():
        cached = models["ours"].eval()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                       use_cache=True).logits
    assert [c[2] for c in kernel_calls] == ["varlen"] * 2
    torch.testing.assert_close(cached, lo, rtol=1e-5, atol=1e-5)


def test_cu_seq_lens_kwargs_alone_separate_the_documents(device, kernel_calls):
    """Only the cu_seq_lens_* / max_length_* kwargs (no position ids: RoPE positions run on across the row, as
    for FlashAttention): the documents are still separate, as sdpa with the block-diagonal causal mask."""
    models = _models(2, device)
    batch = _packed(device, flash_kwargs=True)
    kwargs = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    T = sum(DOCS)
    doc = torch.repeat_interleave(torch.arange(len(DOCS)), torch.tensor(DOCS)).to(device)
    block = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    logits = {}
    with torch.no_grad():
        for key, m in models.items():
            if key == "ours":
                logits[key] = m(input_ids=batch["input_ids"], **kwargs).logits
            else:
                logits[key] = m(input_ids=batch["input_ids"], attention_mask=block[None, None]).logits
    assert [c[2] for c in kernel_calls] == ["varlen"] * 2
    assert_by_rule("logits", logits["ours"], logits["ref"], logits["naive"], torch.float32)
    # and they matter: without them the row is one causal sequence
    with torch.no_grad():
        joined = models["ours"](input_ids=batch["input_ids"]).logits
    assert (joined[0, DOCS[0]:] - logits["ours"][0, DOCS[0]:]).abs().max() > 1e-2


class _Module(torch.nn.Module):
    is_causal = True


def _transformers_mask(pad, window=None):
    """transformers' meaning of a causal key-padding mask (queries = all S positions): kv <= q, kv valid, and
    q - kv < window."""
    S = pad.shape[1]
    i = torch.arange(S)
    allowed = (i[None, :] <= i[:, None]) & pad[:, None, :]
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    return allowed[:, None]


@pytest.mark.parametrize("window, holes, path", [(None, True, "varlen"), (3, False, "varlen"), (3, True, "dense")])
def test_padding_patterns_unpad_where_exact(window, holes, path, kernel_calls):
    """Causal attention with a 2-D key-padding mask: unpadded into varlen for any padding pattern without a
    window and for contiguous rows with one; a window over rows with holes takes the masked dense path. Padded
    tokens hold NaN in q, k and v on the unpadded path, which must never read them (the dense path multiplies
    the hidden values by a weight of 0, so there they stay finite, as in a real model). Valid rows against the
    float64 reference."""
    g = torch.Generator().manual_seed(4)
    B, Hq, Hkv, S, D = 3, 4, 2, 11, 8
    q64, k64, v64 = (torch.randn(B, h, S, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv))
    pad = torch.ones(B, S, dtype=torch.bool)
    pad[0, 8:] = False  # right padding
    pad[1, :3] = False  # left padding
    if holes:
        pad[2, 4:6] = False
    hidden = ~pad[:, None, :, None] if path == "varlen" else torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    poison = lambda t: t.float().masked_fill(hidden, float("nan"))  # noqa: E731
    out, _ = lk_hf.attention_forward(_Module(), poison(q64), poison(k64), poison(v64), pad, sliding_window=window)
    assert [c[2] for c in kernel_calls] == (["varlen"] if path == "varlen" else [torch.bool])
    rep = Hq // Hkv
    allowed = _transformers_mask(pad, window)

    def expect(dtype):
        q, k, v = (t.to(dtype) for t in (q64, k64.repeat_interleave(rep, 1), v64.repeat_interleave(rep, 1)))
        s = (q @ k.transpose(-1, -2)) / D ** 0.5
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        return (p @ v).transpose(1, 2)

    valid = pad
    assert_by_rule("out[valid]", out[valid], expect(torch.float64)[valid], expect(torch.float32)[valid],
                   torch.float32)
    if path == "varlen":
        assert (out[~valid] == 0).all()  # padded rows are not computed


def test_mask_builder_packed_marker_and_its_dense_form():
    """The builder's packed form: transformers' packed-sequence mask function becomes the documents' int32
    cu_seqlens over the flattened rows, whose dense form is transformers' own mask; anything the marker cannot
    mean (padding, a query offset) keeps transformers' complete mask."""
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    doc_ids = masking_utils.find_packed_sequence_indices(position_ids)
    for inner in (masking_utils.causal_mask_function, masking_utils.sliding_window_causal_mask_function(2)):
        fn = masking_utils.and_masks(masking_utils.remap_positions_for_packed_sequence(inner, position_ids),
                                     masking_utils.packed_sequence_mask_function(doc_ids))
        args = dict(batch_size=2, q_length=9, kv_length=9, mask_function=fn, allow_is_causal_skip=False,
                    device="cpu")
        marker = lk_hf.mask_builder(**args)
        assert marker.dtype == torch.int32 and marker.tolist() == [0, 3, 5, 9, 15, 18]
        assert hf_varlen.max_seqlen_of(marker) == 6
        if inner is masking_utils.causal_mask_function:
            full = masking_utils.sdpa_mask(**{**args, "allow_is_causal_skip": False})
            assert torch.equal(hf_varlen.dense_mask_of(marker, 2, 9), full)
        padded = torch.ones(2, 9, dtype=torch.bool)
        padded[0, 0] = False
        assert lk_hf.mask_builder(**{**args, "attention_mask": padded}).shape == (2, 1, 9, 9)
    # the window in position ids equals the window in the tokens of each document
    fn = masking_utils.and_masks(
        masking_utils.remap_positions_for_packed_sequence(masking_utils.sliding_window_causal_mask_function(2),
                                                          position_ids),
        masking_utils.packed_sequence_mask_function(doc_ids))
    assert hf_varlen.packed_sequence_pattern(fn) is not None
    lookalike = masking_utils.and_masks(masking_utils.causal_mask_function,
                                        masking_utils.packed_sequence_mask_function(doc_ids))
    assert hf_varlen.packed_sequence_pattern(lookalike) is None


def test_packed_marker_with_sinks_runs_the_dense_mask():
    """Sinks (which varlen has not) with packed documents: the marker's dense mask on the dense op, equal to
    the documents run one by one."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=g)
    marker = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    out, _ = lk_hf.attention_forward(_Module(), q, k, v, marker, s_aux=sinks)
    for lo, hi in ((0, 3), (3, 5), (5, 9)):
        one, _ = lk_hf.attention_forward(_Module(), q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], None,
                                         s_aux=sinks)
        torch.testing.assert_close(out[:, lo:hi], one, rtol=1e-5, atol=1e-6)
