"""GPT with SSA: KV-cache decoding, parameter overhead, parameter groups, sparsity regulariser, statistics."""

from __future__ import annotations

import math

import pytest
import torch

from ssa_tune.attention import KVCache
from ssa_tune.config import SSAConfig
from ssa_tune.model import GPT, GPTConfig
from ssa_tune.optim import is_temperature, parameter_groups
from ssa_tune.stats import attention_stats, flat_stats

SMALL = GPTConfig(vocab_size=61, seq_len=24, n_layer=3, n_head=2, d_model=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_gpt(ssa: SSAConfig | None, position: str = "learned", seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL.to_dict(), "position": position, **kw}), ssa)
    with torch.no_grad():  # sharper attention than GPT-2's init, so positions and gates matter
        for a in model.attention_layers:
            a.qkv.weight.normal_(0, 0.5)
    return model.eval()


def randomise_temperatures(model: GPT, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_temperature(name):
                if name.endswith("beta"):
                    p.copy_(-1.0 + torch.rand(p.shape, generator=g))  # c ~ 0.07 .. 0.7 for log_expexp
                else:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g))


SSA_ON = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", key_gate="linear")


# ------------------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("position", ["learned", "rotary"])
@pytest.mark.parametrize("ssa", [None, SSA_ON, SSAConfig(query_position="log_sigmoid", query_gate="linear",
                                                         value_gate="linear", per_head=False, layers=[0, 2])],
                         ids=["plain", "ssa", "ssa-some-layers"])
@pytest.mark.parametrize("blocks", [[1] * 10, [4, 3, 3], [7, 1, 2]], ids=["tokens", "blocks", "prefix+mixed"])
def test_incremental_decoding_equals_full_forward(position, ssa, blocks):
    model = make_gpt(ssa, position)
    if ssa is not None:
        randomise_temperatures(model)
    idx = torch.randint(0, SMALL.vocab_size, (2, 10))
    full, _ = model(idx)
    cache, outs, start = KVCache(), [], 0
    for size in blocks:
        logits, _ = model(idx[:, start:start + size], cache=cache)
        outs.append(logits)
        start += size
    assert cache.length == 10 and len(cache.k) == SMALL.n_layer
    assert (torch.cat(outs, dim=1) - full).abs().max() <= 1e-4


def test_positions_matter():
    """Control for the cache tests: the same tokens at other positions give other logits."""
    for position in ("learned", "rotary"):
        model = make_gpt(SSA_ON, position)
        randomise_temperatures(model)
        idx = torch.randint(0, SMALL.vocab_size, (1, 6))
        cache = KVCache()
        model(idx[:, :3], cache=cache)
        shifted, _ = model(idx[:, 3:], cache=cache)
        fresh, _ = model(idx[:, 3:])
        assert (shifted - fresh).abs().max() > 1e-3, position


@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_greedy_generate_equals_uncached_argmax(position):
    model = make_gpt(SSA_ON, position)
    randomise_temperatures(model)
    prompt = torch.randint(0, SMALL.vocab_size, (2, 5))
    out = model.generate(prompt, max_new_tokens=6, temperature=0)
    seq = prompt
    for _ in range(6):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_generate_and_forward_respect_seq_len():
    model = make_gpt(SSA_ON)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 20, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, SMALL.seq_len + 1, dtype=torch.long))
    cache = KVCache()
    model(torch.zeros(1, 20, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_sampled_generate_is_reproducible_with_a_generator():
    model = make_gpt(SSA_ON)
    prompt = torch.randint(0, SMALL.vocab_size, (1, 3))
    a = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (1, 11) and torch.equal(a[:, :3], prompt)


# ------------------------------------------------------------------------------------------ loss, grads


def test_forward_loss_and_gradients_reach_temperatures():
    model = make_gpt(SSA_ON).train()
    idx = torch.randint(0, SMALL.vocab_size, (2, 12))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -100
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 12, SMALL.vocab_size)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(SMALL.vocab_size)) < 2.0
    loss.backward()
    temps = [(n, p) for n, p in model.named_parameters() if ".temps." in f".{n}"]
    assert len(temps) == SMALL.n_layer * 5  # per layer: beta, u_q, u_v, gate_proj.weight, gate_proj.bias
    for name, p in temps:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------ overhead


def _gpt2_small(ssa):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return GPT(GPTConfig(vocab_size=50257, seq_len=1024, n_layer=12, n_head=12, d_model=768), ssa)


def test_parameter_overhead_below_half_a_percent_on_gpt2_small():
    base = _gpt2_small(None).num_params()
    assert 123_000_000 < base < 125_000_000  # GPT-2 small with tied embeddings: 124.4M
    ssa = _gpt2_small(SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared",
                                per_head=True, layers="all")).num_params()
    extra = ssa - base
    assert extra == 12 * (12 + 2 * 768)  # per layer: one beta per head, u_q and u_v of d_model each
    assert extra / base < 0.005


def test_linear_gates_cost_more_than_shared_ones():
    base = _gpt2_small(None).num_params()
    lin = _gpt2_small(SSAConfig(query_gate="linear", value_gate="linear")).num_params() - base
    assert lin == 12 * (12 + 768 * 24 + 24)  # beta + one fused Linear(768, 2 * 12)
    assert lin / base < 0.005


# ------------------------------------------------------------------------------------------ optimiser


def test_parameter_groups():
    cfg = SSA_ON.replace(temperature_lr_mult=10.0)
    model = make_gpt(cfg)
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "temperature"}
    temp = by_name["temperature"]
    assert temp["lr"] == pytest.approx(1e-2) and temp["lr_mult"] == 10.0 and temp["weight_decay"] == 0.0
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"]["lr"] == by_name["no_decay"]["lr"] == 1e-3

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # every parameter in exactly one group
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert sum(1 for i in ids if i == id(model.wte.weight)) == 1  # tied with head.weight: once
    assert model.head.weight is model.wte.weight
    temps = {id(p) for n, p in model.named_parameters() if ".temps." in f".{n}"}
    assert {id(p) for p in temp["params"]} == temps
    # 2-D temperature parameters (u_q, gate_proj.weight) are not decayed either
    assert any(p.dim() == 2 for p in temp["params"])
    assert all(p.dim() >= 2 for p in by_name["decay"]["params"])
    torch.optim.AdamW(groups)  # the groups are valid optimiser input


def test_parameter_groups_override_and_frozen_params():
    model = make_gpt(SSA_ON)
    model.wpe.weight.requires_grad_(False)
    groups = parameter_groups(model, lr=2.0, temperature_lr_mult=0.5)
    assert {g["name"]: g["lr"] for g in groups}["temperature"] == 1.0
    assert all(p is not model.wpe.weight for g in groups for p in g["params"])
    plain = parameter_groups(make_gpt(None), lr=1.0)
    assert [g["name"] for g in plain] == ["decay", "no_decay"]


# ------------------------------------------------------------------------------------------ sparsity


def test_sparsity_regulariser():
    cfg = SSA_ON.replace(sparsity_target=0.2, sparsity_weight=0.5, sample_rows=5)
    model = make_gpt(cfg).train()
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    model(idx)
    aux = model.aux_loss()
    assert aux is not None and aux.dim() == 0 and torch.isfinite(aux) and aux.item() > 0
    aux.backward()
    for a in model.attention_layers:
        assert a.qkv.weight.grad is not None and a.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("temps.beta"))

    model.eval()
    model(idx)
    assert model.aux_loss() is None  # eval mode: no regulariser


def test_sparsity_regulariser_off():
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    for cfg in (SSA_ON, SSA_ON.replace(sparsity_target=0.2, sparsity_weight=0.0),
                SSA_ON.replace(sparsity_target=None, sparsity_weight=1.0)):
        model = make_gpt(cfg).train()
        model(idx)
        assert model.aux_loss() is None
    model = make_gpt(None).train()
    model(idx)
    assert model.aux_loss() is None


def test_regulariser_weight_scales_the_term():
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    vals = []
    for w in (0.5, 1.0):
        model = make_gpt(SSA_ON.replace(sparsity_target=0.2, sparsity_weight=w, sample_rows=64)).train()
        model(idx)  # sample_rows >= T: every row is used, so both runs see the same rows
        vals.append(model.aux_loss().item())
    assert vals[1] == pytest.approx(2 * vals[0], rel=1e-5)


# ------------------------------------------------------------------------------------------ statistics


def test_attention_stats():
    cfg = SSA_ON.replace(layers=[0, 2], sample_rows=6)
    model = make_gpt(cfg).train()
    randomise_temperatures(model)
    idx = torch.randint(0, SMALL.vocab_size, (2, 16))
    stats = attention_stats(model, idx, bins=7)
    assert model.training  # mode restored
    assert set(stats) == {"layer0", "layer2"}
    for entry in stats.values():
        assert set(entry) == {"entropy", "topk_mass", "tau_q", "tau_v"}
        e, m = entry["entropy"], entry["topk_mass"]
        assert 0 <= e["min"] <= e["mean"] <= e["max"] <= 1
        assert 0 < m["min"] <= m["mean"] <= m["max"] <= 1 + 1e-6
        assert entry["tau_q"]["min"] > 0 and entry["tau_v"]["min"] > 0
        assert entry["tau_q"]["std"] > 0  # randomised gates and the position term: tau_q varies
        assert len(entry["tau_q"]["hist"]) == 7 and sum(entry["entropy"]["hist"]) == 2 * 2 * 6
    for a in model.attention_layers:
        assert not a.collect_stats and a.stats == {}
    flat = flat_stats(stats)
    assert "layer0.entropy_mean" in flat and "ssa.tau_q_mean" in flat
    assert flat["ssa.entropy_mean"] == pytest.approx(
        (stats["layer0"]["entropy"]["mean"] + stats["layer2"]["entropy"]["mean"]) / 2)


def test_attention_stats_uniform_attention_entropy_is_one():
    """Zero q/k weights give uniform rows: normalised entropy 1 (not above it) and top-4 mass 4/n."""
    model = make_gpt(SSAConfig(query_position="none", query_gate="shared", sample_rows=64))
    with torch.no_grad():
        for a in model.attention_layers:
            a.qkv.weight[: 2 * SMALL.d_model].zero_()
            a.qkv.bias[: 2 * SMALL.d_model].zero_()
    stats = attention_stats(model, torch.randint(0, SMALL.vocab_size, (1, 20)))
    for entry in stats.values():
        assert entry["entropy"]["max"] <= 1.0 and entry["entropy"]["min"] == pytest.approx(1.0, abs=1e-5)
        assert entry["topk_mass"]["max"] == pytest.approx(1.0, abs=1e-6)  # row 1..3 see <= 4 keys
        assert entry["topk_mass"]["min"] == pytest.approx(4 / 20, abs=1e-5)


def test_gpt_config_validation():
    with pytest.raises(ValueError, match="^d_model:"):
        GPTConfig(d_model=10, n_head=3)
    with pytest.raises(ValueError, match="^position:"):
        GPTConfig(position="alibi")
    with pytest.raises(ValueError, match="^position: rotary"):
        GPTConfig(d_model=6, n_head=2, position="rotary")
    with pytest.raises(ValueError, match="^dropout:"):
        GPTConfig(dropout=1.0)
    with pytest.raises(ValueError, match="^n_layer:"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="^width: unknown model field"):
        GPTConfig.from_dict({"width": 3})
    assert GPTConfig.from_dict(SMALL.to_dict()) == SMALL
