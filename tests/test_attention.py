"""SelectiveSelfAttention: identity when off, fused path == materialised reference, faithfulness to the
authors' code, KV-cache decoding, gradients, sampled-row regulariser (design §3)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ssa_tune.attention import (
    KVCache,
    SelectiveSelfAttention,
    authors_position_attention,
    position_coefficient,
    reference_attention,
    rope_cache,
)
from ssa_tune.config import SSAConfig

D, H = 32, 4  # d_model, heads: head size 8
POSITIONS = ("none", "log_expexp", "log_sigmoid", "log_linear")
GATE_FIELDS = ("query_gate", "value_gate", "key_gate")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_layer(ssa: SSAConfig | None, causal: bool = True, bias: bool = True, seed: int = 0) -> SelectiveSelfAttention:
    torch.manual_seed(seed)
    layer = SelectiveSelfAttention(D, H, ssa, bias=bias, causal=causal)
    with torch.no_grad():  # larger weights than the default init, so attention is far from uniform
        layer.qkv.weight.normal_(0, 0.4)
        if bias:
            layer.qkv.bias.normal_(0, 0.1)
    return layer.eval()


def randomise_temperatures(layer: SelectiveSelfAttention, seed: int = 1) -> None:
    """Move every SSA parameter away from its (identity) init, so the test sees non-trivial gates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.temps.named_parameters():
            if name == "beta":
                if layer.ssa.query_position == "log_linear":
                    p.copy_(0.05 + 0.4 * torch.rand(p.shape, generator=g))
                else:  # c spans roughly 0.05 .. 0.7 for log_expexp and log_sigmoid
                    p.copy_(-1.0 + 1.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    for name, p in layer.temps.named_parameters():
        assert p.abs().min() > 0, name


def plain_attention(layer: SelectiveSelfAttention, x: torch.Tensor, materialise: bool) -> torch.Tensor:
    """Vanilla multi-head attention written out with the layer's qkv/out weights."""
    B, T, C = x.shape
    qkv = x @ layer.qkv.weight.T + (0 if layer.qkv.bias is None else layer.qkv.bias)
    q, k, v = (t.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for t in qkv.chunk(3, dim=-1))
    if materialise:
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        if layer.causal:
            att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = att.softmax(-1) @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=layer.causal)
    y = y.permute(0, 2, 1, 3).reshape(B, T, C)
    return y @ layer.out.weight.T + (0 if layer.out.bias is None else layer.out.bias)


# ------------------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("materialise", [True, False])
def test_ssa_off_is_plain_attention(causal, bias, materialise):
    layer = make_layer(None, causal=causal, bias=bias)
    x = torch.randn(3, 11, D)
    torch.testing.assert_close(layer(x), plain_attention(layer, x, materialise), atol=1e-5, rtol=0)
    torch.testing.assert_close(reference_attention(layer, x), plain_attention(layer, x, True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gates", [("none", "none", "none"), ("linear", "shared", "linear"),
                                   ("shared", "linear", "shared"), ("shared", "shared", "none")])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_zero_initialised_gates_are_identity(gates, per_head, causal):
    cfg = SSAConfig(query_position="none", per_head=per_head, **dict(zip(GATE_FIELDS, gates)))
    plain = make_layer(None, causal=causal)
    ssa = copy.deepcopy(plain).set_ssa(cfg)
    assert ssa.temps is not None
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(ssa(x), plain(x), atol=1e-6, rtol=0)


def test_log_linear_with_zero_coefficient_is_identity():
    cfg = SSAConfig(query_position="log_linear", position_init=0.0, query_gate="shared", value_gate="linear")
    plain = make_layer(None)
    ssa = copy.deepcopy(plain).set_ssa(cfg)
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(ssa(x), plain(x), atol=1e-6, rtol=0)


def test_default_position_changes_outputs():
    """The control for the identity tests: the default log_expexp position term is not a no-op."""
    plain = make_layer(None)
    ssa = copy.deepcopy(plain).set_ssa(SSAConfig())
    x = torch.randn(2, 16, D)
    assert (ssa(x) - plain(x)).abs().max() > 1e-4


def test_set_ssa_none_turns_it_off():
    layer = make_layer(SSAConfig(query_gate="shared"))
    randomise_temperatures(layer)
    layer.set_ssa(None)
    x = torch.randn(2, 9, D)
    assert layer.temps is None and not any(".temps." in f".{n}" for n, _ in layer.named_parameters())
    torch.testing.assert_close(layer(x), plain_attention(layer, x, True), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------- fused == materialised


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("gate", ["linear", "shared"])
@pytest.mark.parametrize("which", ["query_gate", "value_gate", "key_gate", "all"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("per_head", [True, False])
def test_fused_equals_reference(position, gate, which, causal, per_head):
    gates = {f: gate for f in GATE_FIELDS} if which == "all" else {which: gate}
    cfg = SSAConfig(query_position=position, per_head=per_head, token_scale=0.35, **gates)
    layer = make_layer(cfg, causal=causal)
    randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    assert (layer(x) - reference_attention(layer, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("causal", [True, False])
def test_fused_equals_reference_position_only(position, causal):
    layer = make_layer(SSAConfig(query_position=position), causal=causal)
    if position != "none":
        randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    assert (layer(x) - reference_attention(layer, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("gates", [("shared", "shared", "none"), ("linear", "linear", "linear"),
                                   ("linear", "shared", "shared")])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position", POSITIONS)
def test_fused_equals_reference_with_rotary(gates, per_head, causal, position):
    cfg = SSAConfig(query_position=position, per_head=per_head, **dict(zip(GATE_FIELDS, gates)))
    layer = make_layer(cfg, causal=causal)
    randomise_temperatures(layer)
    rope = rope_cache(32, D // H)  # longer than T: the layer must slice the tables
    x = torch.randn(2, 13, D)
    out = layer(x, rope=rope)
    assert (out - reference_attention(layer, x, rope=rope)).abs().max() <= 1e-5
    assert (out - layer(x)).abs().max() > 1e-4  # the rotation did something


def test_fused_equals_reference_without_bias():
    cfg = SSAConfig(query_gate="shared", value_gate="linear", key_gate="shared")
    layer = make_layer(cfg, bias=False)
    randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    assert (layer(x) - reference_attention(layer, x)).abs().max() <= 1e-5


def test_fused_gradients_equal_reference_gradients():
    cfg = SSAConfig(query_position="log_sigmoid", query_gate="shared", value_gate="linear", key_gate="shared")
    layer = make_layer(cfg).train()
    randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    w = torch.randn(2, 13, D)
    grads = []
    for fn in (layer, lambda x: reference_attention(layer, x)):
        layer.zero_grad()
        (fn(x) * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-4, msg=name)


def _manual_ssa(layer: SelectiveSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """Design §3 written from scratch for shared q/v gates (independent of SSATemperatures' methods):
    tau_q(i) = 1 + c log(n_i) + a tanh(u_q . q_i), tau_v(j) = 1 + a tanh(u_v . v_j), logits_i *= tau_q(i)."""
    cfg, t = layer.ssa, layer.temps
    B, T, C = x.shape
    hd = C // H
    q, k, v = (x @ layer.qkv.weight.T + layer.qkv.bias).chunk(3, dim=-1)
    q, k, v = (z.reshape(B, T, H, hd).permute(0, 2, 1, 3) for z in (q, k, v))
    beta = t.beta.view(-1, 1, 1)
    c = {"log_expexp": torch.exp(-torch.exp(beta)), "log_sigmoid": 1 / (1 + torch.exp(-beta)),
         "log_linear": beta}[cfg.query_position]
    n = torch.arange(1, T + 1, dtype=torch.float32).view(1, T, 1) if layer.causal else torch.full((1, T, 1), float(T))
    uq, uv = t.u_q.view(1, -1, 1, hd), t.u_v.view(1, -1, 1, hd)  # (1, H or 1, 1, hd)
    tq = 1 + c * torch.log(n) + cfg.token_scale * torch.tanh((q * uq).sum(-1, keepdim=True))
    tv = 1 + cfg.token_scale * torch.tanh((v * uv).sum(-1, keepdim=True))
    logits = tq * (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if layer.causal:
        logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    y = (logits.softmax(-1) @ (tv * v)).permute(0, 2, 1, 3).reshape(B, T, C)
    return layer.out(y)


@pytest.mark.parametrize("position", ["log_expexp", "log_sigmoid", "log_linear"])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_layer_matches_the_formulas(position, per_head, causal):
    cfg = SSAConfig(query_position=position, query_gate="shared", value_gate="shared", per_head=per_head,
                    token_scale=0.3)
    layer = make_layer(cfg, causal=causal)
    randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    assert (layer(x) - _manual_ssa(layer, x)).abs().max() <= 1e-5


def test_linear_gate_reads_x_through_its_own_projection():
    """A linear query gate: tau_q = tau_pos + a tanh(W_g x + b_g), one value per head (per_head)."""
    layer = make_layer(SSAConfig(query_position="none", query_gate="linear", token_scale=0.7))
    randomise_temperatures(layer)
    x = torch.randn(2, 13, D)
    B, T, C = x.shape
    q, k, v = layer.qkv(x).chunk(3, dim=-1)
    q, k, v = (z.reshape(B, T, H, C // H).permute(0, 2, 1, 3) for z in (q, k, v))
    f = layer.temps.gate_proj(x).permute(0, 2, 1).unsqueeze(-1)  # (B, H, T, 1)
    y = F.scaled_dot_product_attention(q * (1 + 0.7 * torch.tanh(f)), k, v, is_causal=True)
    expected = layer.out(y.permute(0, 2, 1, 3).reshape(B, T, C))
    assert (layer(x) - expected).abs().max() <= 1e-5


def test_position_coefficients():
    beta = torch.tensor([-2.0, 0.0, 1.5])
    torch.testing.assert_close(position_coefficient(beta, "log_expexp"), torch.exp(-torch.exp(beta)))
    torch.testing.assert_close(position_coefficient(beta, "log_sigmoid"), torch.sigmoid(beta))
    torch.testing.assert_close(position_coefficient(beta, "log_linear"), torch.tensor([0.0, 0.0, 1.5]))
    with pytest.raises(ValueError, match="query_position"):
        position_coefficient(beta, "none")
    # every parameterisation starts at the authors' c = exp(-exp(1.5))
    for kind in ("log_expexp", "log_sigmoid", "log_linear"):
        c = position_coefficient(torch.tensor(SSAConfig(query_position=kind).beta_init), kind)
        assert abs(c.item() - math.exp(-math.exp(1.5))) < 1e-6, kind


# ------------------------------------------------------------------------------ the authors' code


@pytest.mark.parametrize("beta", [1.5, 0.0, -1.0])
def test_matches_authors_position_attention(beta):
    layer = make_layer(SSAConfig(query_position="log_expexp", per_head=False))
    with torch.no_grad():
        layer.temps.beta.fill_(beta)
    x = torch.randn(2, 17, D)
    ours = layer(x)
    assert (ours - authors_position_attention(layer, x, layer.temps.beta)).abs().max() <= 1e-5
    assert (ours - plain_attention(layer, x, True)).abs().max() > 1e-4  # the position term is active


def test_authors_position_attention_with_per_head_layer_of_equal_betas():
    layer = make_layer(SSAConfig(query_position="log_expexp", per_head=True, position_init=0.3))
    assert layer.temps.beta.shape == (H,)
    x = torch.randn(2, 17, D)
    assert (layer(x) - authors_position_attention(layer, x, torch.tensor(0.3))).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------ KV cache


def _decode(layer, x, rope=None, blocks=None):
    """Run x through the layer with a KV cache, in blocks of the given sizes (default: one token each)."""
    cache = KVCache()
    blocks = blocks or [1] * x.shape[1]
    outs, start = [], 0
    for size in blocks:
        outs.append(layer(x[:, start:start + size], rope=rope, cache=cache.layer(0)))
        start += size
    assert start == x.shape[1] and cache.length == x.shape[1]
    return torch.cat(outs, dim=1), cache


CACHE_CONFIGS = [
    SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared"),
    SSAConfig(query_position="log_sigmoid", query_gate="linear", value_gate="linear", key_gate="shared",
              per_head=False),
    SSAConfig(query_position="log_linear", query_gate="shared", value_gate="linear", key_gate="linear"),
]


@pytest.mark.parametrize("cfg", CACHE_CONFIGS, ids=["shared", "linear-shared-across-heads", "mixed"])
@pytest.mark.parametrize("rotary", [False, True])
@pytest.mark.parametrize("blocks", [None, [5, 4], [6, 1, 1, 1]], ids=["token", "prefix+block", "prefix+tokens"])
def test_kv_cache_decoding_equals_full_forward(cfg, rotary, blocks):
    layer = make_layer(cfg)
    randomise_temperatures(layer)
    rope = rope_cache(16, D // H) if rotary else None
    x = torch.randn(2, 9, D)
    full = layer(x, rope=rope)
    inc, _ = _decode(layer, x, rope=rope, blocks=blocks)
    assert (inc - full).abs().max() <= 1e-5


def test_kv_cache_holds_scaled_values():
    layer = make_layer(SSAConfig(query_gate="shared", value_gate="shared", key_gate="linear"))
    randomise_temperatures(layer)
    x = torch.randn(1, 6, D)
    _, cache = _decode(layer, x)
    q, k, v, (tq, tk, tv) = layer.project(x, None, 0, None)
    torch.testing.assert_close(cache.k[0], k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache.v[0], v, atol=1e-5, rtol=1e-5)
    assert (tv - 1).abs().max() > 1e-3 and (tk - 1).abs().max() > 1e-3  # the cached values are scaled


def test_kv_cache_needs_causal_attention():
    layer = make_layer(SSAConfig(), causal=False)
    with pytest.raises(ValueError, match="causal"):
        layer(torch.randn(1, 3, D), cache=KVCache().layer(0))


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("cfg", [
    SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", key_gate="linear"),
    SSAConfig(query_position="log_sigmoid", query_gate="linear", value_gate="linear", key_gate="shared",
              per_head=False),
    SSAConfig(query_position="log_linear", query_gate="linear", value_gate="shared"),
], ids=["shared", "linear", "mixed"])
@pytest.mark.parametrize("randomised", [False, True], ids=["at-init", "randomised"])
def test_gradients_reach_every_temperature_parameter(cfg, randomised):
    layer = make_layer(cfg).train()
    if randomised:
        randomise_temperatures(layer)
    x = torch.randn(2, 11, D)
    (layer(x) * torch.randn(2, 11, D)).sum().backward()
    temps = [(n, p) for n, p in layer.named_parameters() if ".temps." in f".{n}"]
    assert len(temps) >= 3
    for name, p in temps:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().min() > 0, name  # every entry (each head's beta, each gate weight) learns


# ----------------------------------------------------------------------------- sampled-row regulariser


def test_sampled_rows_regulariser_and_stats():
    cfg = SSAConfig(query_gate="shared", value_gate="shared", sparsity_target=0.3, sparsity_weight=0.5,
                    sample_rows=4)
    layer = make_layer(cfg).train()
    randomise_temperatures(layer)
    x = torch.randn(2, 12, D)
    layer(x)
    aux = layer.aux_loss
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux) and aux > 0
    aux.backward()
    assert layer.qkv.weight.grad.abs().sum() > 0 and layer.temps.u_q.grad.abs().sum() > 0
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
    layer.collect_stats = True
    layer(x)
    s = layer.stats
    assert s["entropy"].numel() == 2 * H * 4  # B x H x sampled rows
    assert ((s["entropy"] >= 0) & (s["entropy"] <= 1)).all()
    assert ((s["topk_mass"] > 0) & (s["topk_mass"] <= 1 + 1e-6)).all()
    assert (s["tau_q"] > 0).all() and (s["tau_v"] > 0).all()


def test_no_regulariser_without_target():
    layer = make_layer(SSAConfig(query_gate="shared", sparsity_weight=1.0)).train()
    layer(torch.randn(2, 12, D))
    assert layer.aux_loss is None


@pytest.mark.parametrize("causal", [True, False])
def test_sampled_rows_equal_the_materialised_rows(causal):
    """With sample_rows >= T every row is sampled: entropy, top-k mass and the regulariser equal those of
    the reference attention matrix (rows in random order, so compare sorted values)."""
    cfg = SSAConfig(query_gate="shared", value_gate="linear", sparsity_target=0.4, sparsity_weight=0.7,
                    sample_rows=64)
    layer = make_layer(cfg, causal=causal).train()
    randomise_temperatures(layer)
    B, T = 2, 10
    x = torch.randn(B, T, D)
    layer.collect_stats = True
    layer(x)
    # the materialised attention of the same layer, through the reference's own arithmetic
    q, k, v = layer.qkv(x).split(D, dim=2)
    q, k, v = (z.view(B, T, H, D // H).transpose(1, 2) for z in (q, k, v))
    tq, tk, tv = layer.temps.scales(x, q, k, v, 0, None if causal else T)
    logits = tq * (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
    if causal:
        logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    p = logits.softmax(-1)
    rows = slice(1, T) if causal else slice(0, T)  # causal row 0 sees one key: no entropy to normalise
    n = (torch.arange(T) + 1.0 if causal else torch.full((T,), float(T)))[rows]
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1)[:, :, rows] / n.log()
    top = p.topk(4, dim=-1).values.sum(-1)[:, :, rows]
    got = layer.stats
    torch.testing.assert_close(got["entropy"].sort().values, ent.flatten().clamp(0, 1).sort().values,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(got["topk_mass"].sort().values, top.flatten().sort().values, atol=1e-5, rtol=0)
    expected_aux = 0.7 * (ent - 0.4).pow(2).mean()
    torch.testing.assert_close(layer.aux_loss, expected_aux, atol=1e-6, rtol=1e-5)


def test_no_grad_fused_weights_follow_parameter_updates():
    """Under no_grad the layer reuses its fused q/k/v/gate weight; any change to a weight must rebuild it."""
    layer = make_layer(SSAConfig(query_gate="shared", value_gate="linear", key_gate="shared"))
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        first = layer(x)
        for change in (lambda: layer.temps.u_q.normal_(0, 0.5), lambda: layer.temps.gate_proj.bias.fill_(0.3),
                       lambda: layer.qkv.weight.mul_(1.1), lambda: layer.qkv.bias.add_(0.05)):
            change()
            out = layer(x)
            assert (out - first).abs().max() > 1e-5
            assert (out - reference_attention(layer, x)).abs().max() <= 1e-5
            first = out
    layer.load_state_dict({k: v + 0.01 for k, v in layer.state_dict().items()})
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        assert (layer(x) - reference_attention(layer, x)).abs().max() <= 1e-5


@pytest.mark.parametrize("gates", [("shared", "shared", "none"), ("linear", "linear", "none")])
def test_bfloat16_autocast(gates):
    """Training on GPU runs under bf16 autocast: the fused path must run there, keep q/k/v in the autocast
    dtype (no silent fp32 upcast of q by a float32 temperature) and stay close to the float32 result."""
    layer = make_layer(SSAConfig(query_position="log_expexp", **dict(zip(GATE_FIELDS, gates)))).train()
    randomise_temperatures(layer)
    x = torch.randn(2, 16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v, (tq, _, tv) = layer.project(x, None, 0, None)
        out = layer(x)
    assert q.dtype == k.dtype == v.dtype == torch.bfloat16
    out.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    ref = layer(x)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("which", ["qkv.weight", "temps.u_q", "temps.gate_proj.weight"])
def test_evaluation_sees_weights_changed_in_place_through_data(which):
    """Weights edited through `.data` (EMA updates, hand-made surgery) do not bump the version counter a cache
    could key on; an evaluation forward after such an edit must use the new weights."""
    layer = make_layer(SSAConfig(query_gate="shared", value_gate="linear"))
    randomise_temperatures(layer)
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        layer(x)  # an evaluation forward first (anything it cached must not survive the edit)
        param = layer.get_parameter(which)
        param.data.mul_(1.7).add_(0.05)
        after = layer(x)
    torch.testing.assert_close(after, reference_attention(layer, x), atol=1e-5, rtol=1e-5)
