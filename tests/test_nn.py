"""llmkernels.nn.SelfAttention is a drop-in for the seed document's einsum module, with the value product fixed.

Two copies of the seed class live here: ``LiteralSeedSelfAttention`` is the seed's code verbatim (its value
product is ``"nhqk,nvhd->nqhd"``), ``FixedSeedSelfAttention`` is the same code with the contraction fixed to
``"nhqk,nkhd->nqhd"``. Our module must match the fixed copy (outputs and every gradient, by the tolerance rule
against the fixed copy in float64) and must differ from the literal one.
"""

import pytest
import torch
import torch.nn as nn

import llmkernels
from llmkernels import ops
from llmkernels.nn import SelfAttention
from tolerance import FLOOR, assert_by_rule


class LiteralSeedSelfAttention(nn.Module):
    # Verbatim from shared/guide/seed/self_attention.md (the bug included: "nvhd" in the value product).
    def __init__(self, embed_size: int, heads: int):
        super().__init__()
        self.embed_size = embed_size
        self.heads = heads
        self.head_dim = embed_size // heads
        
        self.queries = nn.Linear(embed_size, embed_size)
        self.keys = nn.Linear(embed_size, embed_size)
        self.values = nn.Linear(embed_size, embed_size)
        self.fc_out = nn.Linear(embed_size, embed_size)
        
    def forward(self, query, key, value, mask=None):
        N = query.shape[0]
        q_len, k_len, v_len = query.shape[1], key.shape[1], value.shape[1]
        
        # Linear projections
        Q = self.queries(query)
        K = self.keys(key)
        V = self.values(value)
        
        # Reshape for multi-head attention
        Q = Q.reshape(N, q_len, self.heads, self.head_dim)
        K = K.reshape(N, k_len, self.heads, self.head_dim)
        V = V.reshape(N, v_len, self.heads, self.head_dim)
        
        # Scaled dot-product attention
        energy = torch.einsum("nqhd,nkhd->nhqk", [Q, K])
        
        if mask is not None:
            energy = energy.masked_fill(mask == 0, float("-inf"))
        
        attention = torch.softmax(energy / (self.head_dim ** 0.5), dim=3)
        
        out = torch.einsum("nhqk,nvhd->nqhd", [attention, V])
        out = out.reshape(N, q_len, self.embed_size)
        
        return self.fc_out(out)


class FixedSeedSelfAttention(LiteralSeedSelfAttention):
    """The seed's code with the one change: the value product contracts the key index ("nkhd")."""

    def forward(self, query, key, value, mask=None):
        N = query.shape[0]
        q_len, k_len, v_len = query.shape[1], key.shape[1], value.shape[1]
        Q = self.queries(query).reshape(N, q_len, self.heads, self.head_dim)
        K = self.keys(key).reshape(N, k_len, self.heads, self.head_dim)
        V = self.values(value).reshape(N, v_len, self.heads, self.head_dim)
        energy = torch.einsum("nqhd,nkhd->nhqk", [Q, K])
        if mask is not None:
            energy = energy.masked_fill(mask == 0, float("-inf"))
        attention = torch.softmax(energy / (self.head_dim ** 0.5), dim=3)
        out = torch.einsum("nhqk,nkhd->nqhd", [attention, V])
        out = out.reshape(N, q_len, self.embed_size)
        return self.fc_out(out)


pytestmark = pytest.mark.usefixtures("auto_dispatch")


def _modules(embed, heads, dtype, device, seed=0):
    torch.manual_seed(seed)
    literal = LiteralSeedSelfAttention(embed, heads)
    fixed = FixedSeedSelfAttention(embed, heads)
    ours = SelfAttention(embed, heads)
    # Every parameter drawn fresh (Linear's default init would do too; biases non-zero so fc_out(0) != 0).
    for p in literal.parameters():
        nn.init.normal_(p, std=0.3)
    sd = literal.state_dict()
    fixed.load_state_dict(sd)
    ours.load_state_dict(sd)  # strict: same keys, same shapes
    return literal.to(device, dtype), fixed.to(device, dtype), ours.to(device, dtype)


def _make_mask(kind, N, heads, q_len, k_len, device, g):
    """Masks in the conventions the seed code accepts: anything broadcastable to (N, heads, q_len, k_len)
    compared with 0. Every query keeps key 0 here, so no row is fully masked (the seed gives NaN there)."""
    if kind is None:
        return None
    if kind == "padding_bool":  # (N, 1, 1, k_len): key padding, True = keep
        m = torch.rand(N, 1, 1, k_len, generator=g) > 0.3
        m[..., 0] = True
    elif kind == "causal_int":  # (q_len, k_len) of 0/1 ints, a tril pattern
        m = torch.ones(q_len, k_len, dtype=torch.int64).tril()
    elif kind == "per_head_float":  # (N, heads, q_len, k_len) of 0.0 / 1.0 / 2.5 floats
        m = (torch.rand(N, heads, q_len, k_len, generator=g) > 0.4).float() * 2.5
        m[..., 0] = 1.0
    else:
        raise AssertionError(kind)
    return m.to(device)


def test_state_dict_keys_and_parameters_are_the_seed_modules():
    literal = LiteralSeedSelfAttention(24, 3)
    ours = SelfAttention(24, 3)
    assert list(ours.state_dict().keys()) == list(literal.state_dict().keys())
    for (n1, p1), (n2, p2) in zip(literal.named_parameters(), ours.named_parameters()):
        assert n1 == n2 and p1.shape == p2.shape
    assert (ours.embed_size, ours.heads, ours.head_dim) == (24, 3, 8)
    # and back: a state_dict of ours loads into the seed class
    LiteralSeedSelfAttention(24, 3).load_state_dict(ours.state_dict())


@pytest.mark.parametrize("N,q_len,k_len,embed,heads", [(2, 7, 7, 24, 3), (3, 5, 13, 20, 4), (1, 17, 9, 12, 1)])
@pytest.mark.parametrize("mask_kind", [None, "padding_bool", "causal_int", "per_head_float"])
def test_matches_the_fixed_seed_outputs_and_gradients(N, q_len, k_len, embed, heads, mask_kind, device):
    dtype = torch.float32
    g = torch.Generator().manual_seed(1)
    _, fixed, ours = _modules(embed, heads, dtype, device)
    fixed64 = FixedSeedSelfAttention(embed, heads).to(device, torch.float64)
    fixed64.load_state_dict(fixed.state_dict())
    query = torch.randn(N, q_len, embed, generator=g).to(device)
    key = torch.randn(N, k_len, embed, generator=g).to(device)
    value = torch.randn(N, k_len, embed, generator=g).to(device)
    mask = _make_mask(mask_kind, N, heads, q_len, k_len, device, g)
    grad_out = torch.randn(N, q_len, embed, generator=g).to(device)

    def run(module, dt):
        xs = [t.detach().to(dt, copy=True).requires_grad_() for t in (query, key, value)]
        projected = []  # the projected keys (the keys Linear's output), to read their gradient
        hook = module.keys.register_forward_hook(lambda m, i, o: projected.append(o) or o.retain_grad())
        out = module(*xs, mask=mask)
        hook.remove()
        out.backward(grad_out.to(dt))
        grads = [x.grad for x in xs] + [p.grad for p in module.parameters()]
        return out, grads, projected[0].grad

    out, grads, _ = run(ours, dtype)
    ref_out, ref_grads, d_keys_proj = run(fixed64, torch.float64)
    naive_out, naive_grads, _ = run(fixed, dtype)
    names = ["out", "d_query", "d_key", "d_value"] + [f"d_{n}" for n, _ in ours.named_parameters()]
    for name, a, r, n in zip(names, [out] + grads, [ref_out] + ref_grads, [naive_out] + naive_grads):
        if name == "d_keys.bias":
            # Softmax ignores a shift shared by a query's scores, so the key bias gets gradient exactly 0: it is
            # the sum over all N * k_len positions of the projected keys' gradient, which cancels. Its rounding
            # error scales with the terms that cancel, not with the result (0), so the absolute floor of the
            # rule is taken relative to the sum of their magnitudes (per channel) instead of max(1, |ref|).
            assert r.abs().max() < 1e-12
            terms = d_keys_proj.abs().sum(dim=(0, 1)).max().item()
            bound = 2 * (n - r).abs().max().item() + FLOOR[dtype] * terms
            assert (a - r).abs().max().item() <= bound, f"d_keys.bias error exceeds {bound:.3g}"
            continue
        assert_by_rule(name, a, r, n, dtype)


def test_self_attention_with_one_input_tensor_bf16(device):
    # The usual call, module(x, x, x, mask), in bf16 (the tolerance rule against the fixed copy in bf16).
    dtype = torch.bfloat16
    _, fixed, ours = _modules(32, 4, dtype, device, seed=3)
    fixed64 = FixedSeedSelfAttention(32, 4).to(device, torch.float64)
    fixed64.load_state_dict(fixed.state_dict())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 11, 32, generator=g).to(device)
    mask = torch.ones(11, 11, device=device).tril()  # a float 0/1 causal mask, compared with 0
    outs = {}
    for name, mod, dt in (("ours", ours, dtype), ("ref", fixed64, torch.float64), ("naive", fixed, dtype)):
        xi = x.to(dt, copy=True).requires_grad_()
        o = mod(xi, xi, xi, mask)
        o.float().square().sum().backward()
        outs[name] = (o, xi.grad)
    assert_by_rule("out", outs["ours"][0], outs["ref"][0], outs["naive"][0], dtype)
    assert_by_rule("d_x", outs["ours"][1], outs["ref"][1], outs["naive"][1], dtype)


def test_the_literal_seed_formula_is_not_attention(device):
    """The seed's "nhqk,nvhd->nqhd" sums the weights over k (to 1) and V over v: every query of a sequence gets
    fc_out(sum of V), whatever the scores. Our module (and the fixed copy) differ from that."""
    literal, fixed, ours = _modules(16, 2, torch.float32, device)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 16, generator=g).to(device)
    with torch.no_grad():
        lit, fix, our = literal(x, x, x), fixed(x, x, x), ours(x, x, x)
        # The literal output is the same for every query position ...
        assert torch.allclose(lit, lit[:, :1].expand_as(lit), atol=1e-4)
        # ... namely fc_out of the sum of the projected values over all positions.
        V_sum = literal.values(x).sum(dim=1, keepdim=True)
        torch.testing.assert_close(lit[:, :1], literal.fc_out(V_sum), rtol=1e-4, atol=1e-4)
        # Ours is the fixed formula, and far from the literal one.
        torch.testing.assert_close(our, fix, rtol=1e-5, atol=1e-5)
        assert (our - lit).abs().max() > 0.5


def test_fully_masked_query_gives_zero_attention_not_nan(device):
    _, fixed, ours = _modules(12, 3, torch.float32, device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 6, 12, generator=g).to(device).requires_grad_()
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool, device=device)
    mask[..., 2, :] = False  # query 2 sees nothing
    out = ours(x, x, x, mask)
    with torch.no_grad():
        seed_out = fixed(x, x, x, mask)
    assert torch.isnan(seed_out[0, 2]).all(), "the seed code gives NaN for a fully masked query"
    assert not torch.isnan(seed_out[0, [0, 1, 3, 4, 5]]).any()
    # attention output 0 for that query, so the module gives fc_out(0) = fc_out.bias there
    torch.testing.assert_close(out[0, 2], ours.fc_out.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out[0, [0, 1, 3, 4, 5]], seed_out[0, [0, 1, 3, 4, 5]], rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_projections_reach_the_kernel_as_transposed_views_without_copy(monkeypatch, device):
    """The (N, len, H, D) projections reach llmkernels::sdpa_forward as .transpose(1, 2) views of the Linear
    outputs: same storage, strides (len*E, D, E, 1)."""
    mod = SelfAttention(24, 3).to(device)
    produced, received = {}, {}
    for name in ("queries", "keys", "values"):
        getattr(mod, name).register_forward_hook(lambda m, i, o, name=name: produced.__setitem__(name, o))
    original = ops.sdpa_forward

    def spy(q, k, v, *rest):
        received.update(q=q, k=k, v=v)
        return original(q, k, v, *rest)

    monkeypatch.setattr(ops, "sdpa_forward", spy)
    g = torch.Generator().manual_seed(0)
    q_in = torch.randn(2, 5, 24, generator=g).to(device)
    kv_in = torch.randn(2, 7, 24, generator=g).to(device)
    out = mod(q_in, kv_in, kv_in)
    assert out.shape == (2, 5, 24)
    for proj, got, L in (("queries", "q", 5), ("keys", "k", 7), ("values", "v", 7)):
        t = received[got]
        assert t.data_ptr() == produced[proj].data_ptr(), f"{got} was copied"
        assert t.shape == (2, 3, L, 8)
        assert t.stride() == (L * 24, 8, 24, 1), f"{got} strides {t.stride()}"


def test_backend_is_a_constructor_option_not_state(device):
    mod = SelfAttention(16, 2, backend="reference").to(device)
    assert mod.backend == "reference"
    assert list(mod.state_dict()) == list(LiteralSeedSelfAttention(16, 2).state_dict())
    x = torch.randn(1, 4, 16, device=device)
    with llmkernels.use_backend("cuda"):  # the module's own choice wins over the block
        assert mod(x, x, x).shape == (1, 4, 16)
    if device == "cpu":
        with pytest.raises(llmkernels.NotSupportedError, match="backend 'cuda' does not support"):
            SelfAttention(16, 2, backend="cuda")(x, x, x)
