"""Tuning an existing Hugging Face checkpoint: `model: {kind: hf, path: DIR}` in a job spec.

A tiny random Llama (grouped-query attention) saved with a tokenizer trained here, with the `tokenizers`
package, on the repository's README: validation of the checkpoint and tokenizer (one line, exit 2), and a
whole study through the real CLI (Ray, Optuna, MLflow), exported and applied to a fresh copy of the
checkpoint in another Python process. No network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ssa_tune.cli import app

from .conftest import ROOT, run_here

runner = CliRunner()

VOCAB = 320


def make_tokenizer(text: str):
    """A byte-level BPE tokenizer trained on `text`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_checkpoint(folder: Path, text: str, layers: int = 2) -> Path:
    """A random tiny Llama (4 query heads, 2 KV heads) and its tokenizer, saved as a Hugging Face folder."""
    import torch
    import transformers

    tokenizer = make_tokenizer(text)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    f.write_text((ROOT / "README.md").read_text())
    return f


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama", corpus.read_text())


def hf_spec(corpus: Path, checkpoint: Path, **changes) -> dict:
    spec = {
        "name": "hfstudy",
        "dataset": {"kind": "text", "path": str(corpus), "seq_len": 32, "eval_sequences": 8},
        "model": {"kind": "hf", "path": str(checkpoint)},
        "train": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "lr": 1.0e-3, "warmup_steps": 2,
                  "freeze": "below", "latency_tokens": 4},
        "ssa": {"query_position": "log_expexp", "query_gate": "shared", "value_gate": "shared",
                "layers": {"count": 1, "placement": "top"}, "temperature_lr_mult": 10.0},
        "search": {"train.lr": {"type": "float", "low": 3.0e-4, "high": 3.0e-3, "log": True},
                   "ssa.query_gate": {"type": "categorical", "choices": ["none", "shared"]}},
        "budget": {"n_trials": 4},
        "scheduler": {"kind": "none"},
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
        "sampler": {"kind": "tpe", "seed": 0},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            spec[section] = {**spec[section], field: value}
            if value is None:
                del spec[section][field]
        else:
            spec[section] = value
    return spec


def write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False))
    return p


# -------------------------------------------------------------------------------------------- validation


def test_a_good_hf_spec_validates_and_gets_the_checkpoints_tokenizer(tmp_path, corpus, checkpoint):
    spec = write(tmp_path, hf_spec(corpus, checkpoint))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output
    from ssa_tune.config import HFModelConfig
    from ssa_tune.spec import load_spec

    s = load_spec(spec)
    assert s.checkpoint.n_layer == 2 and s.checkpoint.model_type == "llama"
    dataset, model, _, ssa = s.trial_config({})
    assert dataset["tokenizer"] == str(checkpoint)  # the checkpoint's own tokenizer encodes the text
    assert "tokenizer" not in s.dataset and set(s.local_paths()) == {"dataset.path", "model.path"}  # shipped once
    assert model == HFModelConfig(path=str(checkpoint)) and ssa.resolve_layers(s.n_layer()) == (1,)


def test_a_relative_checkpoint_path_is_relative_to_where_the_user_stands(tmp_path, corpus, checkpoint, monkeypatch):
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    spec = write(tmp_path, hf_spec(corpus, Path("ckpt")))
    monkeypatch.chdir(tmp_path)
    from ssa_tune.spec import load_spec

    s = load_spec(spec)
    assert s.model["path"] == str(tmp_path / "ckpt") == s.raw["model"]["path"]
    assert s.local_paths()["model.path"] == str(tmp_path / "ckpt")


def _bert_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def _copy_without(checkpoint: Path, folder: Path, *names: str) -> Path:
    shutil.copytree(checkpoint, folder)
    for n in names:
        (folder / n).unlink()
    return folder


BAD = [
    # (id, how to break the spec, expected "field: reason" start)
    ("missing-dir", lambda tmp, ckpt: {"model__path": str(tmp / "nowhere")}, "model.path: {tmp}/nowhere: no such directory"),
    ("not-a-dir", lambda tmp, ckpt: {"model__path": str(ckpt / "config.json")},
     "model.path: {ckpt}/config.json: not a directory"),
    ("no-config", lambda tmp, ckpt: {"model__path": str(_copy_without(ckpt, tmp / "c", "config.json"))},
     "model.path: {tmp}/c: no config.json there"),
    ("bad-json", lambda tmp, ckpt: {"model__path": str(_broken_json(_copy_without(ckpt, tmp / "c")))},
     "model.path: {tmp}/c: config.json is not valid JSON"),
    ("unsupported", lambda tmp, ckpt: {"model__path": str(_bert_folder(tmp / "bert"))},
     "model.path: {tmp}/bert: model_type 'bert' is not supported (supported: gpt2, gpt_neox, llama, mistral, qwen2)"),
    ("no-weights", lambda tmp, ckpt: {"model__path": str(_copy_without(ckpt, tmp / "c", "model.safetensors"))},
     "model.path: {tmp}/c: no model weights there"),
    ("no-tokenizer", lambda tmp, ckpt: {"model__path": str(_copy_without(ckpt, tmp / "c", "tokenizer.json",
                                                                          "tokenizer_config.json"))},
     "model.path: {tmp}/c: no tokenizer there"),
    ("missing-given-tokenizer", lambda tmp, ckpt: {"dataset__tokenizer": str(tmp / "tok")},
     "dataset.tokenizer: {tmp}/tok: no such file or directory"),
    ("no-path", lambda tmp, ckpt: {"model": {"kind": "hf"}}, "model.path: required for kind hf"),
    ("unknown-model-kind", lambda tmp, ckpt: {"model": {"kind": "onnx"}}, "model.kind: must be one of gpt, hf"),
    ("gpt-field-on-hf", lambda tmp, ckpt: {"model__n_layer": 4}, "model.n_layer: unknown model field"),
    ("seq-len", lambda tmp, ckpt: {"dataset__seq_len": 512}, "dataset.seq_len: 512 exceeds the 128 positions"),
    ("layers", lambda tmp, ckpt: {"ssa__layers": {"count": 3}}, "ssa.layers.count: 3 exceeds the model's 2 layers"),
    ("searched-layers", lambda tmp, ckpt: {"search": {"ssa.layers.count": {"type": "int", "low": 1, "high": 4}}},
     "search.ssa.layers.count: value 4 is invalid: ssa.layers.count: 4 exceeds"),
    ("sparsity", lambda tmp, ckpt: {"ssa__sparsity_target": 0.5, "ssa__sparsity_weight": 0.1},
     "ssa.sparsity_weight: the sparsity regulariser needs the built-in model"),
    ("searched-sparsity", lambda tmp, ckpt: {"ssa__sparsity_target": 0.5,
                                             "search": {"ssa.sparsity_weight": {"type": "float", "low": 0.0, "high": 0.1}}},
     "search.ssa.sparsity_weight: value 0.1 is invalid: ssa.sparsity_weight: the sparsity regulariser"),
    ("searched-checkpoint", lambda tmp, ckpt: {"search": {"model.path": {"type": "categorical",
                                                                         "choices": [str(ckpt), str(tmp)]}}},
     "search.model.path: the model is not searched"),
    ("freeze-base-with-baseline", lambda tmp, ckpt: {"train__freeze": "base"},
     "train.freeze: base trains only the SSA parameters and the baseline arm has none"),
    ("searched-freeze-base", lambda tmp, ckpt: {"search": {"train.freeze": {"type": "categorical",
                                                                           "choices": ["below", "base"]}}},
     "search.train.freeze: base trains only the SSA parameters"),
]


def _broken_json(folder: Path) -> Path:
    (folder / "config.json").write_text("{not json")
    return folder


@pytest.mark.parametrize("case,change,expected", BAD, ids=[c[0] for c in BAD])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_bad_checkpoint_or_combination_is_one_line_exit_2(tmp_path, corpus, checkpoint, case, change, expected,
                                                            command):
    spec = write(tmp_path, hf_spec(corpus, checkpoint, **change(tmp_path, checkpoint)))
    workdir = tmp_path / "wd"
    args = [command, str(spec)] + (["--workdir", str(workdir)] if command == "run" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    want = f"error: {spec}: " + expected.format(tmp=tmp_path, ckpt=checkpoint)
    assert lines[0].startswith(want), (lines[0], want)
    assert not workdir.exists()


def test_freeze_base_is_fine_in_a_study_without_a_baseline_arm(tmp_path, corpus, checkpoint):
    spec = write(tmp_path, hf_spec(corpus, checkpoint, train__freeze="base", baseline=False))
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 0, result.output


def test_validating_an_hf_spec_imports_no_torch(tmp_path, corpus, checkpoint):
    spec = write(tmp_path, hf_spec(corpus, checkpoint))
    code = (f"from ssa_tune.cli import app\nfrom typer.testing import CliRunner\n"
            f"r = CliRunner().invoke(app, ['validate', {str(spec)!r}])\nassert r.exit_code == 0, r.output\n"
            f"import sys, json\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "transformers", "optuna", "ray", "mlflow"}


# ------------------------------------------------------------------------------------------- one trial


def test_one_hf_trial_reports_the_metrics_of_a_fine_tuning_run(tmp_path, corpus, checkpoint, one_thread):
    """`ssa-tune train` path in process: the checkpoint fine-tuned, below-frozen, with SSA on the top layer."""
    import torch
    from safetensors.torch import load_file

    from ssa_tune.spec import load_spec
    from ssa_tune.trial import execute

    before = load_file(str(checkpoint / "model.safetensors"))
    s = load_spec(write(tmp_path, hf_spec(corpus, checkpoint)))
    seen = []
    result = execute(s, {}, 1, 0, seen.append)
    m = result.metrics
    for key in ("val_loss", "val_ppl", "test_loss", "test_ppl", "val_loss_at_start", "val_ppl_at_start",
                "tokens_per_s", "peak_mem_mb", "latency_ms_per_token", "n_params", "ssa_params", "trainable_params",
                "progress"):
        assert key in m, key
    assert m["progress"] == 1.0 and [h["step"] for h in seen] == [4, 8]
    assert all(h["val_loss_at_start"] == m["val_loss_at_start"] for h in seen)
    assert m["val_loss"] < m["val_loss_at_start"]  # a random model learns something in 8 steps
    assert 0 < m["ssa_params"] < m["trainable_params"] < m["n_params"]
    assert m["latency_ms_per_token"] > 0 and m["tokens_per_s"] > 0
    assert not any(k.startswith("ssa.") for k in m)  # no attention statistics: the built-in layer's only
    after = load_file(str(checkpoint / "model.safetensors"))  # trained in memory, never on disk
    assert all(torch.equal(before[k], after[k]) for k in before)

    baseline = execute(s, {"ssa.enabled": False}, 1, 0, lambda _: None)
    assert baseline.ssa_params == 0 and baseline.metrics["val_loss_at_start"] == pytest.approx(m["val_loss_at_start"])
    # the same base parameters train in both arms: the SSA arm adds only its own
    assert baseline.trainable_params == m["trainable_params"] - m["ssa_params"]


def test_a_bfloat16_checkpoint_fine_tunes_as_the_fp32_one(tmp_path, corpus, checkpoint, one_thread):
    """`model: {dtype: bfloat16}`: the weights load in bf16, the trained ones update through fp32 masters, so
    the held-out loss after fine-tuning follows the fp32 run's (to bf16's precision), not the start's."""
    from ssa_tune.spec import load_spec
    from ssa_tune.trial import execute

    results = {}
    for dtype in ("float32", "bfloat16"):
        spec = hf_spec(corpus, checkpoint, model={"kind": "hf", "path": str(checkpoint), "dtype": dtype},
                       train__lr=5e-5, train__max_steps=16, train__eval_every=16)
        results[dtype] = execute(load_spec(write(tmp_path, spec)), {"ssa.enabled": False}, 1, 0, lambda _: None).metrics
    fp32, bf16 = results["float32"], results["bfloat16"]
    gained = fp32["val_loss_at_start"] - fp32["val_loss"]
    assert gained > 0.002
    # measured: 0.00296 (bf16) vs 0.00293 (fp32); updated in place, bf16 gained 0.00149
    assert abs((bf16["val_loss_at_start"] - bf16["val_loss"]) - gained) < 0.15 * gained


# --------------------------------------------------------------------------------- a study, end to end


EXPORTED_ON_A_FRESH_COPY = """
import json, sys, torch, ssa_tune
from transformers import AutoModelForCausalLM
assert "ray" not in sys.modules and "optuna" not in sys.modules
cfg = ssa_tune.load_config(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
x = torch.randint(3, 300, (2, 16))
before = model(x).logits
ssa_tune.convert(model, cfg)
after = model(x).logits
converted = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.self_attn, "temps")]
print(json.dumps({"query_position": cfg.query_position, "converted": converted, "shape": list(after.shape),
                  "change": float((after - before).abs().max())}))
"""


@pytest.mark.slow
def test_an_hf_study_end_to_end_then_export_and_convert_a_fresh_copy(tmp_path, corpus, checkpoint):
    import optuna
    from mlflow.tracking import MlflowClient

    digest = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    spec = write(tmp_path, hf_spec(corpus, checkpoint))
    wd = tmp_path / "wd"
    summary = json.loads(run_here("run", spec, "--workdir", wd, "--json").stdout)
    assert summary["trials"]["complete"] == 4 and summary["trials"]["failed"] == 0, summary

    study = optuna.load_study(study_name="hfstudy", storage=f"sqlite:///{wd / 'optuna.db'}")
    arms = {t.user_attrs["ssa_tune.arm"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert arms == {"baseline", "ssa"}

    client = MlflowClient(f"sqlite:///{wd / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hfstudy")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ssa_tune.role") == "trial"]
    assert len(runs) == 4
    for run in runs:
        assert run.data.params["model.kind"] == "hf" and run.data.params["model.path"] == str(checkpoint)
        assert run.data.params["dataset.tokenizer"] == str(checkpoint)
        assert run.data.params["train.freeze"] == "below"
        assert {"val_loss_at_start", "val_ppl_at_start", "latency_ms_per_token", "trainable_params"} <= set(
            run.data.metrics)

    best = tmp_path / "best.yaml"
    run_here("export", "hfstudy", "-o", best, "--workdir", wd)
    exported = yaml.safe_load(best.read_text())
    assert exported["model"] == {"kind": "hf", "path": str(checkpoint), "dtype": "float32",
                                 "attn_implementation": "sdpa"}
    assert exported["dataset"]["tokenizer"] == str(checkpoint)

    fresh = shutil.copytree(checkpoint, tmp_path / "fresh-copy")
    proc = subprocess.run([sys.executable, "-c", EXPORTED_ON_A_FRESH_COPY, str(best), str(fresh)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["query_position"] == exported["ssa"]["query_position"] and out["shape"] == [2, 16, VOCAB]
    if exported["source"]["winner"] == "ssa":  # the top layer, as the spec says
        assert out["converted"] == [1]
    else:  # the baseline won: the identity config, whose conversion changes nothing
        assert out["query_position"] == "none" and out["change"] == 0.0
    # the study never wrote to the checkpoint it fine-tuned
    assert hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest() == digest
