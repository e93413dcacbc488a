"""Cost of converting a Hugging Face model to SSA: forward+backward time and decode ms/token vs the unconverted model.

Two shapes, random weights built from a config (no download):

  gpt2-small    GPT2LMHeadModel: 12 layers, 12 heads, d 768, vocab 50257
  smollm2-135m  LlamaForCausalLM: 30 layers, hidden 576, 9 heads, 3 KV heads, MLP 1536, vocab 49152 (tied)

and three variants of each, sharing the same weight tensors:

  base           the model as loaded (its own sdpa attention)
  ssa_shared     ssa_tune.convert with log_expexp position, shared query and value gates, every layer
  position_only  ssa_tune.convert with the log_expexp position term alone

fwd_bwd: one forward + backward of the language-model loss on (batch, seq) tokens, eval mode (no dropout).
decode: greedy decoding with the model's own KV cache after a prompt, ms per new token, batch 1.
Rounds are interleaved (every variant once per round, rotating the order) so that machine load hits all
alike. Reported: the medians over rounds and their ratio to `base` (targets: fwd_bwd <= 1.05, decode <= 1.10,
design §8); the same ratio of process CPU times (with the default --threads 1 it counts this run's work only,
so it holds up on a shared, busy machine where the wall clock does not); the ratio of the minima; the median of
per-round wall ratios.
Prints ONE JSON object (also to --out). CPU always; CUDA too when a GPU is present.

    python benchmarks/hf_convert.py [--quick] [--out FILE] [--rounds N] [--threads N] [--models smollm2-135m ...]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import ssa_tune.hf  # noqa: E402,F401  (registers the Hugging Face adapters)
from ssa_tune.config import SSAConfig  # noqa: E402
from ssa_tune.convert import convert  # noqa: E402

VARIANTS = {
    "ssa_shared": SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared"),
    "position_only": SSAConfig(query_position="log_expexp"),
}
TARGETS = {"fwd_bwd": 1.05, "decode": 1.10}


def shapes(quick: bool) -> dict[str, tuple[type, object]]:
    tokens = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if quick:  # tiny: only checks that the script runs end to end
        return {
            "gpt2-tiny": (GPT2LMHeadModel, GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=128, n_positions=128,
                                                      **tokens)),
            "llama-tiny": (LlamaForCausalLM, LlamaConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, **tokens)),
        }
    return {
        "gpt2-small": (GPT2LMHeadModel, GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257,
                                                   n_positions=1024, **tokens)),
        "smollm2-135m": (LlamaForCausalLM, LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
            rope_theta=100000.0, **tokens)),
    }


def build(model_class: type, config, device: torch.device) -> dict[str, torch.nn.Module]:
    """The base model and its converted copies, SSA parameters moved off their zero init.

    The copies share the base model's weight tensors (deepcopy with those tensors in its memo): decoding a
    small model on a CPU is bound by reading the weights, and separate copies would each land differently
    in memory (caches, huge pages), a difference of a few percent that has nothing to do with SSA."""
    torch.manual_seed(0)
    base = model_class(config).to(device).eval()
    models = {"base": base}
    for name, cfg in VARIANTS.items():
        same_weights = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
        model = convert(copy.deepcopy(base, memo=same_weights), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".temps." in n and not n.endswith(".beta"):
                    p.normal_(0, 0.02)
        models[name] = model
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds. With one thread the CPU time counts this run's work only, so it holds up
    when other processes take the cores; the wall clock does not (and is what a user waits for)."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float], per: int = 1) -> tuple[float, float]:
    wall, cpu = clock()
    return (wall - start[0]) / per, (cpu - start[1]) / per


def fwd_bwd_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device):
    """One forward + backward of the LM loss on `ids`; returns its (wall, cpu) seconds."""
    def step() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        sync(device)
        start = clock()
        model(ids, labels=ids).loss.backward()
        sync(device)
        return since(start)

    return step


def decode_step(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device):
    """Greedy decoding of `new_tokens` after `prompt`; returns (wall, cpu) seconds per new token (prefill not
    counted)."""
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.24 rename

    @torch.no_grad()
    def step() -> tuple[float, float]:
        cache = {kw: DynamicCache(config=model.config), "use_cache": True}
        token = model(prompt, **cache).logits[:, -1:].argmax(-1)
        sync(device)
        start = clock()
        for _ in range(new_tokens):
            token = model(token, **cache).logits[:, -1:].argmax(-1)
        sync(device)
        return since(start, new_tokens)

    return step


def interleaved(run: dict, rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, cpu) seconds of every variant per round; round r runs them back to back in a rotated order."""
    names = list(run)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = run[n]()
            if r >= warmup:
                times[n].append(t)
    return times


def summary(times: dict[str, list[tuple[float, float]]]) -> dict:
    """Medians in ms and ratios to base: of the wall medians, of the CPU-time medians, of the wall minima
    (other load only ever adds time), and the median of the per-round wall ratios (paired: robust to load
    that drifts between rounds)."""
    wall = {n: [w for w, _ in v] for n, v in times.items()}
    cpu = {n: [c for _, c in v] for n, v in times.items()}
    med = {n: statistics.median(v) for n, v in wall.items()}
    cpu_med = {n: statistics.median(v) for n, v in cpu.items()}
    variants = [n for n in times if n != "base"]
    return {
        "ms": {n: round(v * 1e3, 3) for n, v in med.items()},
        "ratio": {n: round(med[n] / med["base"], 4) for n in variants},
        "cpu_ratio": {n: round(cpu_med[n] / cpu_med["base"], 4) for n in variants},
        "min_ratio": {n: round(min(wall[n]) / min(wall["base"]), 4) for n in variants},
        "paired_ratio": {n: round(statistics.median(a / b for a, b in zip(wall[n], wall["base"])), 4)
                         for n in variants},
    }


def bench(name: str, model_class: type, config, device: torch.device, args) -> dict:
    models = build(model_class, config, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), generator=g).to(device)
    train = {n: fwd_bwd_step(m, ids, device) for n, m in models.items()}
    decode = {n: decode_step(m, prompt, args.new_tokens, device) for n, m in models.items()}
    fb = summary(interleaved(train, args.rounds, 1))
    dec = summary(interleaved(decode, args.rounds, 1))
    row = {
        "model": name, "device": device.type,
        "params_base": sum(p.numel() for p in models["base"].parameters()),
        "params_added": {n: sum(p.numel() for k, p in m.named_parameters() if ".temps." in k)
                         for n, m in models.items() if n != "base"},
        "fwd_bwd_ms": fb["ms"], "decode_ms_per_token": dec["ms"],
        "ratio_fwd_bwd": fb["ratio"], "ratio_decode": dec["ratio"],
        "cpu_ratio_fwd_bwd": fb["cpu_ratio"], "cpu_ratio_decode": dec["cpu_ratio"],
        "min_ratio_fwd_bwd": fb["min_ratio"], "min_ratio_decode": dec["min_ratio"],
        "paired_ratio_fwd_bwd": fb["paired_ratio"], "paired_ratio_decode": dec["paired_ratio"],
        "met": {n: {"fwd_bwd": fb["ratio"][n] <= TARGETS["fwd_bwd"], "decode": dec["ratio"][n] <= TARGETS["decode"]}
                for n in VARIANTS},
    }
    print(f"[{device.type}] {name}: fwd+bwd {fb['ratio']} (cpu {fb['cpu_ratio']}), decode {dec['ratio']} "
          f"(cpu {dec['cpu_ratio']})", file=sys.stderr, flush=True)
    return row


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews the timings."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds: checks the script runs")
    ap.add_argument("--out", type=Path, help="also write the JSON object to this file")
    ap.add_argument("--rounds", type=int, help="timed rounds after one warm-up round (default 7, quick 2)")
    ap.add_argument("--batch", type=int, default=1, help="fwd_bwd batch size (default 1)")
    ap.add_argument("--seq", type=int, help="fwd_bwd sequence length (default 256, quick 32)")
    ap.add_argument("--prompt", type=int, default=64, help="decode prompt length (default 64)")
    ap.add_argument("--new-tokens", type=int, help="decoded tokens per round (default 32, quick 4)")
    ap.add_argument("--models", nargs="+", help="a subset of the shapes (default: both; quick: both tiny ones)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: polite on a shared machine, and less noisy)")
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 7)
    args.seq = args.seq or (32 if args.quick else 256)
    args.new_tokens = args.new_tokens or (4 if args.quick else 32)
    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    result = {
        "benchmark": "hf_convert",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "torch_threads": args.threads, "quick": args.quick,
        "fwd_bwd": f"forward + backward of the LM loss, batch {args.batch} x seq {args.seq}, float32, eval mode",
        "decode": f"greedy, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens with the model's DynamicCache",
        "rounds": args.rounds,
        "variants": {"base": "unconverted (sdpa)", **{n: cfg.to_dict() for n, cfg in VARIANTS.items()}},
        "targets": TARGETS,
        "loadavg_before": _loadavg(),
        "rows": [],
    }
    chosen = shapes(args.quick)
    unknown = sorted(set(args.models or ()) - set(chosen))
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (known: {', '.join(chosen)})")
    for device in devices:
        for name, (model_class, config) in chosen.items():
            if not args.models or name in args.models:
                result["rows"].append(bench(name, model_class, config, device, args))
    result["loadavg_after"] = _loadavg()
    text = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
