"""ssa_tune.hf: Hugging Face GPT-2, Llama-family (grouped-query) and GPT-NeoX models converted to SSA keep their
logits at init, equal a materialised reference of the SSA formulas, decode with their own KV cache and with
left padding as the full forward does, train every new parameter, run under eager and sdpa alike, and save
as a Hugging Face folder that loads back in a fresh process (design §3a). Tiny random models, no downloads."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import runpy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers  # CI installs the `hf` extra: without transformers this module fails, it does not skip
from transformers import AutoModelForCausalLM, DynamicCache

import ssa_tune.hf as hf
from ssa_tune.attention import position_coefficient
from ssa_tune.config import SSAConfig
from ssa_tune.convert import convert
from ssa_tune.optim import parameter_groups

from .conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, PAD = 64, 0
TOKENS = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
LLAMA_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, **TOKENS)  # head size 8, 2 KV heads
MODELS = {  # family -> (model class, tiny config)
    "gpt2": ("GPT2LMHeadModel", lambda **kw: transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=64,
                                                                     **TOKENS, **kw)),
    "llama": ("LlamaForCausalLM", lambda **kw: transformers.LlamaConfig(**LLAMA_SIZES, **kw)),
    "mistral": ("MistralForCausalLM", lambda **kw: transformers.MistralConfig(**LLAMA_SIZES, sliding_window=None,
                                                                              **kw)),
    "qwen2": ("Qwen2ForCausalLM", lambda **kw: transformers.Qwen2Config(**LLAMA_SIZES, use_sliding_window=False,
                                                                        **kw)),
    "neox": ("GPTNeoXForCausalLM", lambda **kw: transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rotary_pct=0.25, **TOKENS, **kw)),  # rotary on 2 of the 8 dims of a head
}
FAMILIES = ("gpt2", "llama", "neox")  # one of each adapter; Mistral and Qwen2 share Llama's
ALL = tuple(MODELS)

# every option on: position term, gates of every kind on q, k and v
FULL = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", key_gate="linear")
FULL_LINEAR = SSAConfig(query_position="log_sigmoid", query_gate="linear", value_gate="linear", key_gate="shared",
                        per_head=False)


def tiny(family: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """A random tiny model whose attention is far from uniform (as a trained one), in eval mode."""
    torch.manual_seed(seed)
    class_name, make_config = MODELS[family]
    model = getattr(transformers, class_name)(make_config(attn_implementation=attn))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("attn" in name or "attention" in name) and p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def randomise_temperatures(model: nn.Module, seed: int = 1) -> None:
    """Move every SSA parameter off its identity init, so that the tests see non-trivial temperatures."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".temps." not in name:
                continue
            if name.endswith(".beta"):  # c = exp(-exp(beta)) or sigmoid(beta) between about 0.07 and 0.6
                p.copy_(-1.0 + 1.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def converted(family: str, cfg: SSAConfig = FULL, attn: str = "sdpa") -> nn.Module:
    model = convert(tiny(family, attn), cfg)
    randomise_temperatures(model)
    return model


def ids(B: int = 2, T: int = 12, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def temperature_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".temps." in n]


# ------------------------------------------------------------------------------------------ identity


GATES = [  # query gate, value gate, key gate, per_head
    ("shared", "shared", "none", True), ("linear", "linear", "shared", False), ("shared", "linear", "linear", True)]


@pytest.mark.parametrize("gates", GATES, ids=["-".join(map(str, g)) for g in GATES])
@pytest.mark.parametrize("family", ALL)
def test_zero_initialised_gates_keep_the_logits(family, gates):
    base = tiny(family)
    x = ids()
    before = base(x).logits
    q, v, k, per_head = gates
    cfg = SSAConfig(query_position="none", query_gate=q, value_gate=v, key_gate=k, per_head=per_head)
    model = convert(copy.deepcopy(base), cfg)
    assert model.ssa == cfg and temperature_names(model)
    assert (model(x).logits - before).abs().max() <= 1e-5
    randomise_temperatures(model)  # control: the gates are wired in, moving them moves the logits
    assert (model(x).logits - before).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_at_init_only_the_position_term_changes_the_logits(family):
    base = tiny(family)
    x = ids()
    position_only = convert(copy.deepcopy(base), SSAConfig(position_init=-0.5))
    with_gates = convert(copy.deepcopy(base), FULL.replace(position_init=-0.5))
    assert (position_only(x).logits - base(x).logits).abs().max() > 1e-3
    assert (with_gates(x).logits - position_only(x).logits).abs().max() <= 1e-5


# -------------------------------------------------------------------------- materialised reference


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first cos.shape[-1] dims of t (B, h, T, hd), halves rotated (as GPT-NeoX/Llama)."""
    r = cos.shape[-1]
    t_rot, t_pass = t[..., :r], t[..., r:]
    half = torch.cat((-t_rot[..., r // 2:], t_rot[..., :r // 2]), dim=-1)
    return torch.cat((t_rot * cos[:, None] + half * sin[:, None], t_pass), dim=-1)


def reference_tau(temps, name: str, x: torch.Tensor, own: torch.Tensor, base) -> torch.Tensor:
    """base + a tanh(f) as (B, h, T): f from the linear gate on x (B, T, C) or the shared one on own (B, h, T, hd)."""
    kind = getattr(temps.cfg, {"q": "query_gate", "k": "key_gate", "v": "value_gate"}[name])
    if kind == "linear":
        gate = getattr(temps, f"gate_{name}")
        f = (x @ gate.weight.T + gate.bias).transpose(1, 2)  # (B, g, T)
    elif kind == "shared":
        f = (own * getattr(temps, f"u_{name}")[None, :, None, :]).sum(-1)  # u (g, hd): (B, h, T)
    else:
        return base + torch.zeros_like(own[..., 0])
    return base + temps.cfg.token_scale * torch.tanh(f)


def reference_attention(family: str, attn: nn.Module, x: torch.Tensor, position_ids: torch.Tensor,
                        rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One converted attention layer the materialised way, from its weights: logits of row i multiplied by
    tau_q(i) = 1 + c log(position + 1) + a tanh(f_q), keys by tau_k, values by tau_v, a T x T softmax."""
    B, T, C = x.shape
    temps = attn.temps
    H = attn.config.num_attention_heads
    KV = getattr(attn.config, "num_key_value_heads", H)
    if family == "gpt2":  # Conv1D: x @ W + b, outputs q | k | v
        q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
        out = attn.c_proj
    elif family == "neox":  # per head: q | k | v
        qkv = F.linear(x, attn.query_key_value.weight, attn.query_key_value.bias)
        q, k, v = qkv.view(B, T, H, -1).transpose(1, 2).chunk(3, dim=-1)
        out = attn.dense
    else:
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, H, -1).transpose(1, 2)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, KV, -1).transpose(1, 2)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, KV, -1).transpose(1, 2)
        out = attn.o_proj
    hd = q.shape[-1]
    c = position_coefficient(temps.beta, temps.cfg.query_position)[None, :, None]  # (1, g, 1)
    tau_pos = 1.0 + c * torch.log(position_ids.float() + 1.0)[:, None, :]  # (B, g, T)
    tau_q = reference_tau(temps, "q", x, q, tau_pos)  # gates read q, k, v before rotary
    tau_k = reference_tau(temps, "k", x, k, 1.0)
    tau_v = reference_tau(temps, "v", x, v, 1.0)
    if rope is not None:
        q, k = rotate(q, *rope), rotate(k, *rope)
    k = (k * tau_k[..., None]).repeat_interleave(H // KV, dim=1)  # (B, H, T, hd): each KV head serves H/KV
    v = (v * tau_v[..., None]).repeat_interleave(H // KV, dim=1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(hd) * tau_q[..., None]  # (B, H, T, T)
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd)
    return out(y)


@pytest.mark.parametrize("cfg", [FULL, FULL_LINEAR], ids=["shared-per-head", "linear-shared-heads"])
@pytest.mark.parametrize("family", ALL)
def test_converted_attention_equals_the_materialised_reference(family, cfg):
    model = converted(family, cfg)
    layers = hf.FAMILIES[type(model).__name__].layers(model)
    attn = layers[1]
    seen = {}

    def capture(module, args, kwargs, output):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["position_ids"] = kwargs["position_ids"]
        seen["rope"] = kwargs.get("position_embeddings")
        seen["y"] = output[0]

    handle = attn.register_forward_hook(capture, with_kwargs=True)
    x = ids(T=10)
    position_ids = torch.arange(5, 15)[None].expand(2, -1)  # absolute positions, as after a 5-token prefix
    with torch.no_grad():
        model(x, position_ids=position_ids)
        expected = reference_attention(family, attn, seen["x"], seen["position_ids"], seen["rope"])
    handle.remove()
    assert (family == "gpt2") == (seen["rope"] is None)
    assert torch.allclose(seen["y"], expected, atol=1e-5, rtol=1e-4), (seen["y"] - expected).abs().max()


# ----------------------------------------------------------------------------- cache and padding


def cache_kwarg(model: nn.Module) -> str:
    """transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name still works, with a warning)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@pytest.mark.parametrize("family", ALL)
def test_decoding_with_the_models_cache_equals_the_full_forward(family):
    model = converted(family)
    x = ids(T=12)
    with torch.no_grad():
        full = model(x).logits
        cache = {cache_kwarg(model): DynamicCache(config=model.config), "use_cache": True}
        steps = [model(x[:, :5], **cache).logits,  # prefill
                 model(x[:, 5:8], **cache).logits]  # a block of new tokens after a prefix
        steps += [model(x[:, t:t + 1], **cache).logits for t in range(8, 12)]  # token by token
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5), (torch.cat(steps, dim=1) - full).abs().max()


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids of a left-padded batch, positions as `generate` computes them."""
    T = max(len(r) for r in rows)
    input_ids = torch.stack([F.pad(r, (T - len(r), 0), value=PAD) for r in rows])
    mask = torch.stack([F.pad(torch.ones_like(r), (T - len(r), 0)) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return input_ids, mask, position_ids


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_its_unpadded_rows(family):
    model = converted(family)
    rows = [ids(1, 9, seed=4)[0], ids(1, 5, seed=5)[0], ids(1, 2, seed=6)[0]]
    input_ids, mask, position_ids = left_pad(rows)
    with torch.no_grad():
        padded = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        for b, row in enumerate(rows):
            alone = model(row[None]).logits[0]
            got = padded[b, -len(row):]
            assert torch.allclose(got, alone, atol=1e-5), (b, (got - alone).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_a_left_padded_batch_equals_each_row_alone(family):
    model = converted(family)
    rows = [ids(1, 8, seed=7)[0], ids(1, 5, seed=8)[0]]
    input_ids, mask, _ = left_pad(rows)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                   return_dict_in_generate=True, pad_token_id=PAD)
    batch = model.generate(input_ids, attention_mask=mask, **options)
    for b, row in enumerate(rows):
        alone = model.generate(row[None], attention_mask=torch.ones_like(row[None]), **options)
        assert torch.equal(batch.sequences[b, -4:], alone.sequences[0, -4:])
        for step, (got, want) in enumerate(zip(batch.logits, alone.logits)):
            assert torch.allclose(got[b], want[0], atol=1e-4), (b, step, (got[b] - want[0]).abs().max())


# ------------------------------------------------------------------------------ kernels, gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_give_the_same_converted_logits(family):
    sdpa, eager = converted(family, attn="sdpa"), converted(family, attn="eager")
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    input_ids, mask, position_ids = left_pad([ids(1, 9)[0], ids(1, 6)[0]])
    with torch.no_grad():
        a = sdpa(input_ids, attention_mask=mask, position_ids=position_ids).logits
        b = eager(input_ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5), (a[real] - b[real]).abs().max()


@pytest.mark.parametrize("cfg", [FULL, FULL_LINEAR], ids=["shared-per-head", "linear-shared-heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_new_parameter(family, cfg):
    model = convert(tiny(family), cfg).train()  # at init: the zero gates must get a gradient too
    x = ids()
    out = model(x, labels=x)
    out.loss.backward()
    names = temperature_names(model)
    per_layer = 1 + sum(2 if kind == "linear" else 1 for kind in (cfg.query_gate, cfg.key_gate, cfg.value_gate))
    assert len(names) == 2 * per_layer  # beta; u (shared) or weight and bias (linear) of each gate; two layers
    params = dict(model.named_parameters())
    for name in names:
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    groups = {g["name"]: g["params"] for g in parameter_groups(model, lr=1e-3)}
    assert {id(p) for p in groups["temperature"]} == {id(params[n]) for n in names}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_checkpointing_gives_the_same_gradients(family):
    """Fine-tuning often recomputes each layer in the backward pass: the hooks then run twice per step."""
    model = converted(family).train()
    x = ids()
    torch.manual_seed(0)  # the same dropout masks in both runs (GPT-2 has dropout)
    model(x, labels=x).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if ".temps." in n}
    model.zero_grad(set_to_none=True)
    # 5.24 renamed gradient_checkpointing_enable (the old name warns there); 5.17 has only the old one
    enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
    enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    torch.manual_seed(0)
    model(x, labels=x).loss.backward()
    for name, p in model.named_parameters():
        if name in want:
            assert torch.allclose(p.grad, want[name], atol=1e-6, rtol=1e-4), name


# ------------------------------------------------------------------------- conversion bookkeeping


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_selected_layers_are_converted(family):
    base = tiny(family)
    model = convert(copy.deepcopy(base), FULL.replace(layers=[-1]))
    randomise_temperatures(model)
    layers = {"base": hf.FAMILIES[type(base).__name__].layers(base),
              "converted": hf.FAMILIES[type(model).__name__].layers(model)}
    assert [hasattr(a, "temps") for a in layers["converted"]] == [False, True]
    assert {n.split(".temps.")[0] for n in temperature_names(model)} == {
        n for n, m in model.named_modules() if m is layers["converted"][1]}
    outputs = {}
    for name, m in (("base", base), ("converted", model)):  # layer 0 sees the same input in both models
        handle = layers[name][0].register_forward_hook(lambda mod, args, out, name=name: outputs.update({name: out[0]}))
        m(ids())
        handle.remove()
    assert torch.equal(outputs["base"], outputs["converted"])
    assert (model(ids()).logits - base(ids()).logits).abs().max() > 1e-2


def test_converting_again_replaces_the_first_conversion_and_copies_stay_independent():
    base = tiny("llama")
    x = ids()
    once = convert(copy.deepcopy(base), FULL)
    twice = convert(convert(copy.deepcopy(base), SSAConfig(query_gate="linear")), FULL)
    randomise_temperatures(once)
    randomise_temperatures(twice)
    assert torch.allclose(twice(x).logits, once(x).logits, atol=1e-6)  # no hook of the first conversion left
    clone = copy.deepcopy(once)  # the copy's hooks use the copy's parameters
    assert torch.equal(clone(x).logits, once(x).logits)
    with torch.no_grad():
        clone.model.layers[0].self_attn.temps.u_q.mul_(-3.0)
    assert not torch.allclose(clone(x).logits, once(x).logits, atol=1e-3)
    assert torch.equal(twice(x).logits, once(x).logits)


def test_what_evaluation_keeps_between_calls_follows_in_place_changes():
    """Without autograd, c = f(beta) is kept per layer and log(position + 1) per forward: an optimiser step on
    beta, or position_ids changed in place, must still show in the next call."""
    model = converted("llama", SSAConfig())
    x = ids()
    position_ids = torch.arange(12)[None]
    with torch.no_grad():
        before = model(x, position_ids=position_ids).logits
        for name, p in model.named_parameters():
            if name.endswith(".beta"):
                p.sub_(1.0)  # larger c
        after = model(x, position_ids=position_ids).logits
        position_ids.add_(7)
        shifted = model(x, position_ids=position_ids).logits
        assert torch.equal(shifted, model(x, position_ids=position_ids.clone()).logits)
    assert (after - before).abs().max() > 1e-2 and (shifted - after).abs().max() > 1e-2
    assert torch.equal(model(x, position_ids=position_ids).logits, shifted)  # with autograd: computed afresh


def test_an_attention_call_without_position_ids_is_an_error():
    model = convert(tiny("llama"), SSAConfig())
    attn = model.model.layers[0].self_attn
    h = torch.randn(1, 4, 32)
    rope = model.model.rotary_emb(h, torch.arange(4)[None])
    with pytest.raises(RuntimeError, match="without position_ids"):
        attn(h, position_embeddings=rope, attention_mask=None)


def test_an_unsupported_model_names_its_class_and_the_supported_ones():
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(TypeError, match=r"no SSA adapter for BertModel \(supported: ") as e:
        convert(bert, SSAConfig())
    for name, _ in MODELS.values():
        assert str(e.value).count(name) == 1, name
    with pytest.raises(TypeError, match=r"no SSA adapter for Linear \(supported: .*LlamaForCausalLM"):
        convert(nn.Linear(4, 4), SSAConfig())


# ---------------------------------------------------------------------------------- save and load

LOAD_IN_A_FRESH_PROCESS = """
import sys, torch
import ssa_tune.hf
assert not {"optuna", "ray", "mlflow"} & set(sys.modules), "loading needs transformers and the core only"
x = torch.load(sys.argv[1])
for folder, out in zip(sys.argv[2::2], sys.argv[3::2]):
    torch.save(ssa_tune.hf.from_pretrained(folder).eval()(x).logits, out)
"""


def test_save_and_load_in_a_fresh_process(tmp_path):
    x = ids()
    torch.save(x, tmp_path / "ids.pt")
    args, expected, bases = [], {}, {}
    for family in FAMILIES:
        base = tiny(family)
        model = converted(family)
        folder = hf.save_pretrained(model, tmp_path / family)
        assert {"config.json", "model.safetensors", hf.SSA_CONFIG, hf.SSA_WEIGHTS} <= {p.name for p in folder.iterdir()}
        with torch.no_grad():
            expected[family], bases[family] = model(x).logits, base(x).logits
        args += [str(folder), str(tmp_path / f"{family}.pt")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "ids.pt"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for family in FAMILIES:
        assert torch.equal(torch.load(tmp_path / f"{family}.pt"), expected[family]), family
        # the Hugging Face files hold the base model alone: plain transformers loads it cleanly
        plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / family, output_loading_info=True)
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert not temperature_names(plain)
        with torch.no_grad():
            assert torch.equal(plain.eval()(x).logits, bases[family]), family


def test_from_pretrained_rejects_a_plain_hugging_face_folder(tmp_path):
    tiny("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"ssa_config.yaml: missing"):
        hf.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not converted"):
        hf.save_pretrained(tiny("gpt2"), tmp_path / "x")


def test_the_conversion_benchmark_runs_in_quick_mode(tmp_path):
    bench = runpy.run_path(str(ROOT / "benchmarks" / "hf_convert.py"))
    result = bench["main"](["--quick", "--rounds", "1", "--out", str(tmp_path / "hf_convert.json")])
    assert json.loads((tmp_path / "hf_convert.json").read_text()) == result
    assert [r["model"] for r in result["rows"]][:2] == ["gpt2-tiny", "llama-tiny"]
    for row in result["rows"]:
        for key in ("ratio_fwd_bwd", "ratio_decode", "cpu_ratio_decode"):
            assert set(row[key]) == {"ssa_shared", "position_only"} and all(v > 0 for v in row[key].values())


# ----------------------------------------------------------------------------------- fine-tuning: freeze

TOP_LAYER_AND_ABOVE = {  # family -> what `freeze: below` trains when the top layer (of 2) is the converted one
    "gpt2": ("transformer.h.1.", "transformer.ln_f."),
    "llama": ("model.layers.1.", "model.norm.", "lm_head."),
    "neox": ("gpt_neox.layers.1.", "gpt_neox.final_layer_norm.", "lm_head."),
}


@pytest.mark.parametrize("arm", ["ssa", "baseline"])
@pytest.mark.parametrize("mode", ["none", "base", "below"])
@pytest.mark.parametrize("family", FAMILIES)
def test_freeze_decides_what_trains_in_a_hugging_face_model(family, mode, arm):
    """freeze none | base | below on a converted model and on its baseline (the same layers selected by the
    spec's ssa.layers): gradients, the optimizer's parameters, and what one step moves. An output head tied
    to the input embeddings (GPT-2) stays frozen with them under `below`; an untied one is above the layers."""
    from ssa_tune.hf import CausalLM
    from ssa_tune.optim import freeze

    model = tiny(family).train()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    cfg = FULL.replace(layers=[-1])
    if arm == "ssa":
        convert(model, cfg)
    if mode == "base" and arm == "baseline":
        with pytest.raises(ValueError, match="^freeze: base trains only the SSA parameters"):
            freeze(model, mode, cfg.layers)
        return
    freeze(model, mode, cfg.layers)
    names = [n for n, _ in model.named_parameters()]
    temps = {n for n in names if ".temps." in n}
    expected = {"none": set(names), "base": temps,
                "below": {n for n in names if n.startswith(TOP_LAYER_AND_ABOVE[family])} | temps}[mode]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert (arm == "ssa") == bool(temps) and temps <= expected
    wrapped = CausalLM(model)
    groups = parameter_groups(wrapped, lr=1e-2)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for n, p in model.named_parameters() if n in expected}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(T=12)
    _, loss = wrapped(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.optim.AdamW(groups, lr=1e-2).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected
    assert moved <= expected and len(moved) >= 0.8 * len(expected)


def test_the_wrapped_model_scores_and_decodes_as_the_model_itself():
    """`CausalLM`: the loss of shifted targets is the model's own `labels=` loss; decoding with its cache
    equals the full forward."""
    from ssa_tune.hf import CausalLM

    model = converted("llama")
    wrapped = CausalLM(model).eval()
    x = ids(T=12)
    with torch.no_grad():
        logits, loss = wrapped(x[:, :-1], x[:, 1:])
        assert torch.allclose(loss, model(x, labels=x).loss, atol=1e-6)
        cache = wrapped.new_cache()
        steps = [wrapped(x[:, :6], cache=cache)[0]] + [wrapped(x[:, t:t + 1], cache=cache)[0] for t in range(6, 11)]
    assert torch.allclose(torch.cat(steps, dim=1), logits, atol=1e-5)
    assert wrapped.ssa == model.ssa and wrapped.max_len == 64 and wrapped.aux_loss() is None


def test_the_torch_free_list_of_model_types_matches_the_adapters():
    """Validation checks config.json's model_type against config.HF_MODEL_TYPES without importing
    transformers; each must name a class that `ssa_tune.hf` converts, and every adapter must be listed."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from ssa_tune.config import HF_MODEL_TYPES

    assert set(HF_MODEL_TYPES.values()) == set(hf.FAMILIES)
    for model_type, class_name in HF_MODEL_TYPES.items():  # what AutoModelForCausalLM makes of that model_type
        assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] == class_name
