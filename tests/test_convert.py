"""convert(): converting a model keeps its outputs at init, converts only the selected layers, and the
adapter registry rejects models it does not know."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from ssa_tune.attention import SelectiveSelfAttention
from ssa_tune.config import LayerPlacement, SSAConfig
from ssa_tune.convert import Adapter, adapter_for, convert, register_adapter
from ssa_tune.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=53, seq_len=32, n_layer=4, n_head=2, d_model=16)
GATES = [("none", "none", "none"), ("shared", "shared", "none"), ("linear", "linear", "linear"),
         ("shared", "linear", "shared"), ("linear", "shared", "linear")]


pytestmark = pytest.mark.usefixtures("one_thread")


def trained_like_gpt(position: str = "learned", seed: int = 0) -> GPT:
    """A baseline GPT whose attention is far from uniform (as a trained one), in eval mode."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG.to_dict(), "position": position}))
    with torch.no_grad():
        for a in model.attention_layers:
            a.qkv.weight.normal_(0, 0.5)
            a.qkv.bias.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("position_kind, init", [("none", None), ("log_linear", 0.0)])
@pytest.mark.parametrize("gates", GATES, ids=["-".join(g) for g in GATES])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("position", ["learned", "rotary"])
def test_convert_keeps_outputs_at_init(position_kind, init, gates, per_head, position):
    base = trained_like_gpt(position)
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    before, _ = base(idx)
    cfg = SSAConfig(query_position=position_kind, position_init=init, per_head=per_head,
                    query_gate=gates[0], value_gate=gates[1], key_gate=gates[2])
    converted = convert(copy.deepcopy(base), cfg)
    assert converted.ssa == cfg and all(a.temps is not None for a in converted.attention_layers)
    after, _ = converted(idx)
    assert (after - before).abs().max() <= 1e-5


def test_default_position_term_changes_outputs():
    """Control: the default log_expexp (c ~= 0.011) is a small but real change."""
    base = trained_like_gpt()
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    before, _ = base(idx)
    after, _ = convert(copy.deepcopy(base), SSAConfig())(idx)
    assert 1e-5 < (after - before).abs().max() < 1.0


def test_convert_keeps_every_existing_weight():
    base = trained_like_gpt()
    converted = convert(copy.deepcopy(base), SSAConfig(query_gate="shared", value_gate="linear"))
    old = base.state_dict()
    new = converted.state_dict()
    assert set(old) < set(new)
    for name, t in old.items():
        assert torch.equal(new[name], t), name
    assert all(".temps." in f".{n}" for n in set(new) - set(old))


@pytest.mark.parametrize("layers, expected", [
    ("all", (0, 1, 2, 3)),
    ([1, 3], (1, 3)),
    ([-1], (3,)),
    ([], ()),
    (LayerPlacement(2, "bottom"), (0, 1)),
    ({"count": 1, "placement": "top"}, (3,)),
    ({"count": 2, "placement": "middle"}, (1, 2)),
    ({"count": 2, "placement": "interleave"}, (1, 3)),
])
def test_convert_only_the_selected_layers(layers, expected):
    base = trained_like_gpt()
    model = convert(copy.deepcopy(base), SSAConfig(query_gate="shared", value_gate="shared", layers=layers))
    converted = tuple(i for i, a in enumerate(model.attention_layers) if a.temps is not None)
    assert converted == expected
    for i, a in enumerate(model.attention_layers):
        assert (a.ssa is not None) == (i in expected)
    # the parameters added are exactly those of the converted layers
    extra = {n for n, _ in model.named_parameters()} - {n for n, _ in base.named_parameters()}
    assert {int(n.split(".")[1]) for n in extra} == set(expected)


def test_gpt_constructor_converts_like_convert():
    cfg = SSAConfig(query_gate="shared", value_gate="linear", layers=[0, 2])
    torch.manual_seed(5)
    a = GPT(CFG, cfg)
    torch.manual_seed(5)
    b = convert(GPT(CFG), cfg)
    assert a.ssa == b.ssa == cfg
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    b2 = GPT(CFG, cfg)
    b2.load_state_dict(sa)  # a converted checkpoint loads into a model built with the same SSAConfig


def test_convert_rejects_unsupported_models():
    with pytest.raises(TypeError, match=r"no SSA adapter for Linear \(supported: .*GPT"):
        convert(nn.Linear(4, 4), SSAConfig())
    with pytest.raises(TypeError, match="Sequential"):
        convert(nn.Sequential(SelectiveSelfAttention(8, 2)), SSAConfig())


def test_convert_rejects_a_config_that_is_not_an_ssaconfig():
    with pytest.raises(TypeError, match="cfg must be an SSAConfig, got dict"):
        convert(trained_like_gpt(), {"query_gate": "shared"})


def test_convert_rejects_out_of_range_layers():
    with pytest.raises(ValueError, match=r"^layers: indices \[4\]"):
        convert(trained_like_gpt(), SSAConfig(layers=[0, 4]))
    with pytest.raises(ValueError, match="^layers.count:"):
        convert(trained_like_gpt(), SSAConfig(layers={"count": 5}))


class TwoLayer(nn.Module):
    """A model family the registry does not know until an adapter is registered."""

    def __init__(self):
        super().__init__()
        self.a = SelectiveSelfAttention(8, 2)
        self.b = SelectiveSelfAttention(8, 2)

    def forward(self, x):
        return self.b(self.a(x))


class TwoLayerSubclass(TwoLayer):
    pass


def test_register_adapter_and_subclass_lookup():
    register_adapter(TwoLayer, Adapter(layers=lambda m: [m.a, m.b],
                                       convert=lambda m, i, cfg: [m.a, m.b][i].set_ssa(cfg)))
    model = convert(TwoLayerSubclass(), SSAConfig(query_gate="linear", layers=[1]))
    assert adapter_for(model) is adapter_for(TwoLayer())
    assert model.a.temps is None and model.b.temps is not None
    assert model(torch.randn(1, 4, 8)).shape == (1, 4, 8)
