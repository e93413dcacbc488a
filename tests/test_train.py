"""The trial runner: learning, determinism, failure reasons, schedules, metrics, `ssa-tune train`."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from ssa_tune import GPTConfig, SSAConfig
from ssa_tune.data import build_dataset
from ssa_tune.errors import TrialFailed
from ssa_tune.train import TrainConfig, lr_at, train

from .conftest import ROOT, run_cli

TINY_MODEL = dict(n_layer=1, n_head=2, d_model=32)


def _train(kind, steps=40, seed=0, ssa=None, model=None, data=None, **train_kw):
    ds = build_dataset({"kind": kind, **(data or {})}, seed=seed)
    cfg = GPTConfig(vocab_size=ds.vocab_size, seq_len=ds.seq_len, **(model or TINY_MODEL))
    tc = TrainConfig(**{"max_steps": steps, "eval_every": max(1, steps // 2), "batch_size": 8, "seed": seed,
                        "threads": 1, "warmup_steps": 5, **train_kw})
    seen = []
    result = train(ds, cfg, tc, ssa, on_eval=seen.append)
    return ds, result, seen


@pytest.mark.parametrize("kind,steps,lr", [("markov", 150, 3e-3), ("passkey", 200, 3e-3), ("noisy", 150, 3e-3)])
def test_loss_falls_clearly_on_each_synthetic_task(kind, steps, lr):
    ds, result, seen = _train(kind, steps=steps, lr=lr, ssa=SSAConfig(query_gate="shared", value_gate="shared"),
                              model=dict(n_layer=2, n_head=2, d_model=32))
    uniform = math.log(ds.vocab_size)
    first_eval = seen[0]["val_loss"]
    last = result.metrics["val_loss"]
    assert last < 0.8 * uniform, (kind, last, uniform)
    assert last < first_eval, (kind, first_eval, last)
    assert [m["step"] for m in seen] == [steps // 2, steps]


def test_same_seed_same_losses_other_seed_not():
    _, a, _ = _train("markov", steps=20, seed=1)
    _, b, _ = _train("markov", steps=20, seed=1)
    _, c, _ = _train("markov", steps=20, seed=2)
    la = [m["val_loss"] for m in a.history]
    assert la == [m["val_loss"] for m in b.history]
    assert la != [m["val_loss"] for m in c.history]
    assert a.metrics["train_loss"] == b.metrics["train_loss"]


def test_divergence_ends_the_trial_with_its_reason():
    with pytest.raises(TrialFailed) as e:
        _train("markov", steps=30, lr=1e12)
    assert e.value.reason.startswith("diverged: loss is ") and "at step" in e.value.reason
    assert e.value.step is not None and e.value.step <= 30


def test_out_of_memory_ends_the_trial_with_its_reason():
    with pytest.raises(TrialFailed) as e:
        _train("markov", steps=5, model=dict(n_layer=1, n_head=2, d_model=32, mlp_ratio=10**9))
    assert e.value.reason.startswith("out of memory:")


def test_metrics_reported_at_each_evaluation():
    ds, result, seen = _train("passkey", steps=20, ssa=SSAConfig(query_gate="linear"))
    last = seen[-1]
    for key in ("val_loss", "val_ppl", "val_acc", "passkey_acc", "tokens_per_s", "peak_mem_mb",
                "latency_ms_per_token", "test_loss", "ssa.entropy_mean", "ssa.tau_q_mean", "train_loss"):
        assert key in last, key
    assert last["val_ppl"] == pytest.approx(math.exp(last["val_loss"]))
    assert 0.0 <= last["passkey_acc"] <= 1.0 and last["tokens_per_s"] > 0
    assert any(k.startswith("probe.len") for k in last)
    assert "test_loss" not in seen[0]  # end-of-trial measurements come once, at the end
    assert result.ssa_params > 0


def test_markov_reports_the_gap_to_the_true_entropy():
    ds, result, _ = _train("markov", steps=10)
    assert result.metrics["val_gap"] == pytest.approx(result.metrics["val_loss"] - ds.optimal_loss)


def test_token_budget_sets_the_number_of_steps():
    ds, result, _ = _train("noisy", steps=1000, max_tokens=8 * 64 * 7)
    assert result.steps == math.ceil(8 * 64 * 7 / (8 * ds.seq_len))


def test_gradient_accumulation_matches_one_large_batch():
    """Micro-batches with different numbers of scored tokens accumulate to the full batch's gradient."""
    import contextlib

    from ssa_tune import GPT
    from ssa_tune.train import accumulate

    ds = build_dataset({"kind": "passkey"}, seed=0)
    cfg = GPTConfig(vocab_size=ds.vocab_size, seq_len=ds.seq_len, **TINY_MODEL)
    x, y = ds.train_batch(8, torch.Generator().manual_seed(0))
    y = y.clone()
    y[:3, :] = -100  # the first micro-batch scores fewer tokens than the second
    y[:3, -3] = x[:3, -2]
    torch.manual_seed(0)
    m1, m2 = GPT(cfg), GPT(cfg)
    m2.load_state_dict(m1.state_dict())
    cpu = torch.device("cpu")
    full = accumulate(m1, [(x, y)], cpu, contextlib.nullcontext)
    halves = accumulate(m2, [(x[:4], y[:4]), (x[4:], y[4:])], cpu, contextlib.nullcontext)
    assert halves == pytest.approx(full, rel=1e-5)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100, lr=1e-3, warmup_steps=10, min_lr_frac=0.1)
    assert lr_at(0, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 100) == pytest.approx(1e-3)
    assert lr_at(99, cfg, 100) == pytest.approx(1e-4, rel=1e-2)
    assert all(lr_at(s, cfg, 100) >= lr_at(s + 1, cfg, 100) for s in range(10, 99))


@pytest.mark.parametrize("field,value", [("max_steps", 0), ("lr", -1.0), ("batch_size", 1.5), ("device", "tpu"),
                                         ("min_lr_frac", 2.0), ("max_tokens", 0)])
def test_train_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        TrainConfig(**{field: value})


def test_ssa_tune_train_json(write_spec):
    spec = write_spec({"train": {"max_steps": 30, "eval_every": 15}})
    proc = run_cli("train", spec, "--json", "--set", "train.seed=3", timeout=300)
    out = json.loads(proc.stdout)
    assert {"val_loss", "steps", "tokens_per_s", "seconds"} <= set(out)
    assert out["steps"] == 30
    assert "step     15" in proc.stderr  # progress goes to stderr with --json


def test_peak_memory_is_the_trials_own_not_the_worker_processs():
    """A Ray worker trains many trials; each must report its own peak, not the largest any trial before it
    reached in the same process."""
    _, big, _ = _train("markov", steps=1, model=dict(n_layer=1, n_head=4, d_model=256, mlp_ratio=8),
                       batch_size=32, latency_tokens=0)
    _, small, _ = _train("markov", steps=2, latency_tokens=0)
    assert big.metrics["peak_mem_mb"] > 50  # its activations alone are far above that
    assert small.metrics["peak_mem_mb"] < 0.5 * big.metrics["peak_mem_mb"], (small.metrics, big.metrics)


def test_decode_latency_times_the_generated_tokens_only(monkeypatch):
    """ms per generated token: the prompt's forward (prefill) and the warm-up step are not timed. The clock is
    the model's own: each forward advances a fake clock (prefill 1,000 s, warm-up 7 s, a generated token 2 ms),
    so the answer is exact and no load on the machine can move it."""
    import ssa_tune.train as train_mod
    from ssa_tune.model import GPT
    from ssa_tune.train import decode_latency_ms

    torch.manual_seed(0)
    ds = build_dataset({"kind": "markov"}, seed=0)
    model = GPT(GPTConfig(vocab_size=ds.vocab_size, seq_len=ds.seq_len, **TINY_MODEL))
    calls, clock = [], [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock[0]

    def advance(module, args):
        calls.append(args[0].shape[1])
        singles = calls.count(1)
        clock[0] += 1000.0 if args[0].shape[1] > 1 else (7.0 if singles == 1 else 0.002)

    monkeypatch.setattr(train_mod, "time", FakeTime)
    model.register_forward_pre_hook(advance)
    ms = decode_latency_ms(model, ds, torch.device("cpu"), n_tokens=4)
    assert ms == pytest.approx(2.0)  # the prefill or the warm-up counted would be >= 1,750 ms a token
    assert calls.count(1) == 5 and [c for c in calls if c > 1] == [calls[0]]  # one prefill, warm-up + 4 tokens


# ------------------------------------------------------------------------------------------------ freeze


def _step_and_compare(model, batch, lr=1e-2):
    """One AdamW step on the model's parameter groups: (names in the optimizer, names whose value moved,
    names that got a gradient)."""
    from ssa_tune.optim import parameter_groups

    groups = parameter_groups(model, lr, weight_decay=0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch
    _, loss = model(x, y)
    loss.backward()
    torch.optim.AdamW(groups, lr=lr).step()
    params = dict(model.named_parameters())
    return ({n for n, p in params.items() if id(p) in in_opt},
            {n for n, p in params.items() if not torch.equal(p.detach(), before[n])},
            {n for n, p in params.items() if p.grad is not None})


FREEZE_CASES = [  # (mode, arm) -> the parameter name prefixes that train; None: an error
    ("none", "ssa", ("wte", "wpe", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "ln_f")),
    ("none", "baseline", ("wte", "wpe", "blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.", "ln_f")),
    ("base", "ssa", ("blocks.2.attn.temps.", "blocks.3.attn.temps.")),
    ("base", "baseline", None),
    ("below", "ssa", ("blocks.2.", "blocks.3.", "ln_f")),  # the converted layers (top 2) and above
    ("below", "baseline", ("blocks.2.", "blocks.3.", "ln_f")),  # the same layers: the spec's ssa.layers
]


@pytest.mark.parametrize("mode,arm,trains", FREEZE_CASES, ids=[f"{m}-{a}" for m, a, _ in FREEZE_CASES])
def test_freeze_decides_what_trains_in_the_built_in_gpt(mode, arm, trains):
    """freeze: none | base | below for the built-in GPT, in both arms: what gets a gradient, what the
    optimizer holds, what moves in a step. The output head is tied to the (frozen) input embedding."""
    from ssa_tune import GPT, LayerPlacement
    from ssa_tune.optim import freeze

    layers = LayerPlacement(2, "top")
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, seq_len=16, n_layer=4, n_head=2, d_model=16)
    ssa = SSAConfig(query_gate="shared", value_gate="shared", layers=layers) if arm == "ssa" else None
    model = GPT(cfg, ssa)
    if trains is None:
        with pytest.raises(ValueError, match="^freeze: base trains only the SSA parameters"):
            freeze(model, mode, layers)
        return
    counts = freeze(model, mode, layers)
    names = {n for n, _ in model.named_parameters()}
    expected = {n for n in names if n.startswith(trains)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert counts["trainable"] + counts["frozen"] == model.num_params()
    x = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    in_opt, moved, with_grad = _step_and_compare(model, (x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    assert in_opt == expected and with_grad == expected
    assert moved <= expected and len(moved) >= len(expected) - 2  # (a zero-initialised gate may sit still once)
    if arm == "ssa" and mode != "none":
        assert not any(n.startswith(("wte", "blocks.0.", "blocks.1.")) for n in moved)


def test_a_frozen_trial_reports_what_it_trained():
    ssa = SSAConfig(query_gate="shared", layers={"count": 1, "placement": "top"})
    model = dict(n_layer=2, n_head=2, d_model=32)
    _, full, _ = _train("markov", steps=4, ssa=ssa, model=model, latency_tokens=0)
    _, below, _ = _train("markov", steps=4, ssa=ssa, model=model, latency_tokens=0, freeze="below")
    _, base, _ = _train("markov", steps=4, ssa=ssa, model=model, latency_tokens=0, freeze="base")
    assert full.trainable_params == full.n_params
    assert base.trainable_params == base.ssa_params < below.trainable_params < below.n_params
    assert below.metrics["trainable_params"] == below.trainable_params
    # every run starts from the same model: the same loss before the first step
    assert full.metrics["val_loss_at_start"] == below.metrics["val_loss_at_start"] == base.metrics["val_loss_at_start"]
    assert full.metrics["val_ppl_at_start"] == pytest.approx(math.exp(full.metrics["val_loss_at_start"]))


def test_a_long_context_probe_longer_than_the_models_sequences_trains(one_thread):
    """The README's guard line `long_context: {kind: passkey, seq_len: 256}` on a study of 128-token models:
    the probe trains a built-in model of its own, sized to its 256-token sequences (every probe once failed
    "the model's seq_len 128 is shorter than the dataset's 256", and the guard silently flagged nothing)."""
    from ssa_tune.robustness import variant_spec
    from ssa_tune.spec import load_spec
    from ssa_tune.trial import execute

    spec = load_spec(ROOT / "search_spaces" / "quickstart.yaml",
                     ["robustness.long_context={kind: passkey, seq_len: 256}", "train.max_steps=2",
                      "train.eval_every=2", "train.latency_tokens=2"])
    probe = variant_spec(spec, spec.robustness["long_context"])
    assert probe.model["seq_len"] == 256 and spec.model["seq_len"] < 256
    reports = []
    execute(probe, probe.default_params("ssa"), cpus=1, gpus=0, report=reports.append)
    assert reports and reports[-1]["progress"] == 1.0 and "passkey_acc" in reports[-1]


def test_precision_and_device_choice():
    """bf16 autocast only where the GPU supports it, else fp16 with a gradient scaler; fp32 on the CPU; and
    `ssa-tune train` asks for the machine's GPU when there is one (it once always passed gpus=0)."""
    from ssa_tune.spec import load_spec
    from ssa_tune.train import precision_for
    from ssa_tune.trial import configure, local_gpus

    assert precision_for(torch.device("cpu")) == "fp32"
    assert precision_for(torch.device("cuda"), bf16_supported=True) == "bf16"
    assert precision_for(torch.device("cuda"), bf16_supported=False) == "fp16"
    assert local_gpus() == (1.0 if torch.cuda.is_available() else 0.0)
    spec = load_spec(ROOT / "search_spaces" / "quickstart.yaml")
    assert configure(spec, {}, 1, 1.0)[2].device == "cuda" and configure(spec, {}, 1, 0.0)[2].device == "cpu"


def test_a_trial_says_which_precision_it_trained_in(one_thread):
    from ssa_tune.spec import load_spec
    from ssa_tune.trial import execute

    spec = load_spec(ROOT / "search_spaces" / "quickstart.yaml", ["train.max_steps=2", "train.eval_every=2",
                                                                   "train.latency_tokens=2"])
    reports = []
    execute(spec, spec.default_params("ssa"), cpus=1, gpus=0, report=reports.append)
    assert reports[-1]["precision"] == "fp32" and reports[-1]["setup_seconds"] >= 0


def test_low_precision_weights_train_through_fp32_masters():
    """A model loaded in bfloat16 (`model: {dtype: bfloat16}`) trains as the fp32 one does: 100 AdamW steps at
    lr 1e-5 (most steps smaller than half a bf16 step of the weights) move the fp32 weights by ~1e-3 on
    average; updated in place, the bf16 weights moved ~3e-5. Through `MasterWeights` they end where the fp32
    ones do, rounded to bf16."""
    from ssa_tune.optim import parameter_groups
    from ssa_tune.train import MasterWeights

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).bfloat16().float()  # same start
    x, y = torch.randn(32, 64), torch.randn(32, 8)

    def run(dtype, masters: bool):
        model = copy.deepcopy(base).to(dtype)
        groups = parameter_groups(model, 1e-5, 0.0, temperature_lr_mult=1.0)
        mw = MasterWeights(groups) if masters else None
        opt = torch.optim.AdamW(mw.groups if mw else groups, lr=1e-5)
        for _ in range(100):
            loss = ((model(x.to(dtype)) - y.to(dtype)) ** 2).mean()
            loss.backward()
            if mw:
                mw.grads_in()
            opt.step()
            if mw:
                mw.weights_out()
            opt.zero_grad(set_to_none=True)
            model.zero_grad(set_to_none=True)
        return model[0].weight.detach().float()

    start = base[0].weight.detach().clone()
    ref = run(torch.float32, masters=False)
    moved = (ref - start).abs().mean()
    assert moved > 5e-4
    in_place = run(torch.bfloat16, masters=False)
    assert (in_place - start).abs().mean() < 0.1 * moved  # the updates vanished
    mastered = run(torch.bfloat16, masters=True)
    assert (mastered - ref.bfloat16().float()).abs().mean() < 0.02 * moved  # fp32 training, rounded to bf16
