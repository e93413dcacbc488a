"""Training throughput of the GPT with SSA (shared query and value gates, log_expexp position term, all
layers) relative to the same GPT without SSA. Prints one JSON object. Target: ratio >= 0.95.

    python benchmarks/training.py [--quick] [--out FILE] [--threads N]

Each size trains both models on the same synthetic batches with AdamW; the timed region is the optimiser
step loop (forward, backward, clip, step), after warm-up; variants are interleaved in rounds so machine
drift hits both alike, and the median round is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

from ssa_tune import GPT, GPTConfig, SSAConfig
from ssa_tune.optim import parameter_groups
from ssa_tune.train import accumulate

SSA = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", per_head=True)

SIZES = {
    "quickstart": dict(n_layer=2, n_head=2, d_model=64, seq_len=128, batch=16),
    "small": dict(n_layer=4, n_head=4, d_model=128, seq_len=256, batch=8),
    "medium": dict(n_layer=6, n_head=8, d_model=256, seq_len=512, batch=4),
}


def _step_time(model, opt, batches, device, steps):
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    t0 = time.perf_counter()
    for i in range(steps):
        accumulate(model, [batches[i % len(batches)]], device, amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def bench_size(name, size, device, rounds, steps):
    vocab = 256
    cfg = GPTConfig(vocab_size=vocab, seq_len=size["seq_len"], n_layer=size["n_layer"], n_head=size["n_head"],
                    d_model=size["d_model"])
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randint(0, vocab, (size["batch"], size["seq_len"]), generator=g)
        batches.append((x.to(device), torch.roll(x, -1, 1).to(device)))
    models = {}
    for variant, ssa in (("plain", None), ("ssa", SSA)):
        torch.manual_seed(0)
        m = GPT(cfg, ssa).to(device)
        opt = torch.optim.AdamW(parameter_groups(m, 1e-3), lr=1e-3)
        _step_time(m, opt, batches, device, 3)  # warm-up
        models[variant] = (m, opt)
    times = {"plain": [], "ssa": []}
    for r in range(rounds):
        order = ("plain", "ssa") if r % 2 == 0 else ("ssa", "plain")
        for variant in order:
            m, opt = models[variant]
            times[variant].append(_step_time(m, opt, batches, device, steps))
    tokens = size["batch"] * size["seq_len"]
    plain, ssa = statistics.median(times["plain"]), statistics.median(times["ssa"])
    return {
        "size": name, **size, "device": device.type,
        "params_plain": models["plain"][0].num_params(), "params_ssa": models["ssa"][0].num_params(),
        "tokens_per_s_plain": tokens / plain, "tokens_per_s_ssa": tokens / ssa,
        "ratio_ssa_over_plain": plain / ssa,  # throughput ratio: >= 0.95 is the target
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, the two smaller sizes")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    sizes = ["quickstart", "small"] if args.quick else list(SIZES)
    rounds, steps = (3, 5) if args.quick else (7, 10)
    rows = [bench_size(n, SIZES[n], d, rounds, steps) for d in devices for n in sizes]
    out = {
        "benchmark": "training_throughput",
        "what": "tokens/s of GPT+SSA (log_expexp, shared q and v gates, all layers) / plain GPT; median of "
                f"{rounds} interleaved rounds of {steps} AdamW steps after warm-up",
        "target": ">= 0.95",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "results": rows,
        "min_ratio": min(r["ratio_ssa_over_plain"] for r in rows),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
