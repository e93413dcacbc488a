"""Cost of SSA on one attention layer: forward + backward time and activation memory.

Compares, at each sequence length T (batch 4, d_model 256, 4 heads, float32):

  plain       SelectiveSelfAttention(ssa=None): F.scaled_dot_product_attention on q, k, v
  ssa_shared  every option on: log_expexp position term, shared query and value gates, per head
  ssa_linear  the same with linear query and value gates
  reference   reference_attention on the ssa_shared layer (the materialised T x T form)
  authors     authors_position_attention (the authors' released code: position term, materialised)

and prints ONE JSON object (also written to --out). Variants are interleaved in every repeat (rotating
their order) so that machine drift and other load hit them alike; times are the median (and the minimum)
of the repeats after a warmup.

Memory: on CPU the bytes of the tensors autograd saves for the backward pass (hooked with
torch.autograd.graph.saved_tensors_hooks, each storage counted once, parameters excluded). That is what a
training step keeps alive per layer, and shows O(T) for the fused path against O(T^2) for a materialised one.
On CUDA also the peak allocated memory of the forward + backward (torch.cuda.max_memory_allocated).

    python benchmarks/attention.py [--quick] [--out FILE] [--repeats N] [--seq 256 1024 2048] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssa_tune.attention import (  # noqa: E402
    SelectiveSelfAttention,
    authors_position_attention,
    reference_attention,
)
from ssa_tune.config import SSAConfig  # noqa: E402

BATCH, D_MODEL, HEADS = 4, 256, 4
SSA_SHARED = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", per_head=True)
SSA_LINEAR = SSAConfig(query_position="log_expexp", query_gate="linear", value_gate="linear", per_head=True)
FUSED = ("plain", "ssa_shared", "ssa_linear")
MATERIALISED = ("reference", "authors")


def build_layers(device: torch.device) -> dict[str, SelectiveSelfAttention]:
    """Three layers with the same qkv/out weights; SSA parameters moved off their identity init."""
    torch.manual_seed(0)
    plain = SelectiveSelfAttention(D_MODEL, HEADS).to(device)
    layers = {"plain": plain}
    for name, cfg in (("ssa_shared", SSA_SHARED), ("ssa_linear", SSA_LINEAR)):
        layer = SelectiveSelfAttention(D_MODEL, HEADS, cfg).to(device)
        layer.load_state_dict(plain.state_dict(), strict=False)
        with torch.no_grad():
            for p in layer.temps.parameters():
                p.normal_(0, 0.1)
        layers[name] = layer
    return layers


def make_step(name: str, layers: dict, x: torch.Tensor, grad: torch.Tensor):
    """One forward + backward of a variant, as a training step would run it."""
    ssa = layers["ssa_shared"]
    if name in FUSED:
        layer = layers[name]
        fwd = lambda: layer(x)  # noqa: E731
    elif name == "reference":
        layer = ssa
        fwd = lambda: reference_attention(ssa, x)  # noqa: E731
    else:
        layer = ssa
        fwd = lambda: authors_position_attention(ssa, x, ssa.temps.beta[0])  # noqa: E731
    params = list(layer.parameters())

    def step():
        for p in params:
            p.grad = None
        x.grad = None
        fwd().backward(grad)

    return step, fwd, params


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(steps: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, dict[str, list]]:
    """Wall-clock and process CPU seconds of each variant's step, per repeat (repeat r of every variant ran
    back to back, so per-repeat ratios compare runs that saw the same machine load)."""
    names = list(steps)
    times = {n: {"wall": [], "cpu": []} for n in names}
    for r in range(warmup + repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no variant always runs first
        for n in order:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            steps[n]()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if r >= warmup:
                times[n]["wall"].append(t1 - t0)
                times[n]["cpu"].append(c1 - c0)
    return times


def ratios(times: dict, num: str, den: str) -> dict[str, float]:
    wall_n, wall_d = times[num]["wall"], times[den]["wall"]
    return {
        "median": round(statistics.median(wall_n) / statistics.median(wall_d), 4),
        "min": round(min(wall_n) / min(wall_d), 4),
        "paired_median": round(statistics.median(a / b for a, b in zip(wall_n, wall_d)), 4),
        "cpu_median": round(statistics.median(times[num]["cpu"]) / statistics.median(times[den]["cpu"]), 4),
    }


def saved_activation_bytes(fwd, params) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd()
    del out
    return sum(storages.values())


def cuda_peak_bytes(step, device: torch.device) -> int:
    sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def bench_device(device: torch.device, seqs: list[int], warmup: int, repeats: int) -> list[dict]:
    layers = build_layers(device)
    rows = []
    for T in seqs:
        torch.manual_seed(T)
        x = torch.randn(BATCH, T, D_MODEL, device=device, requires_grad=True)
        grad = torch.randn(BATCH, T, D_MODEL, device=device)
        made = {n: make_step(n, layers, x, grad) for n in FUSED + MATERIALISED}
        steps = {n: m[0] for n, m in made.items()}
        # the materialised variants are far slower: fewer of their repeats are enough for a median
        fused = time_variants({n: steps[n] for n in FUSED}, device, warmup, repeats)
        mat = time_variants({n: steps[n] for n in ("ssa_shared",) + MATERIALISED}, device, 1,
                            max(3, repeats // 3))
        med = {n: statistics.median(v["wall"]) for n, v in {**fused, **mat}.items()}
        low = {n: min(v["wall"]) for n, v in {**fused, **mat}.items()}
        med["ssa_shared"], low["ssa_shared"] = (statistics.median(fused["ssa_shared"]["wall"]),
                                                min(fused["ssa_shared"]["wall"]))
        saved = {n: saved_activation_bytes(m[1], m[2]) for n, m in made.items()}
        shared, linear = ratios(fused, "ssa_shared", "plain"), ratios(fused, "ssa_linear", "plain")
        row = {
            "T": T,
            "ms_median": {n: round(v * 1e3, 3) for n, v in med.items()},
            "ms_min": {n: round(v * 1e3, 3) for n, v in low.items()},
            "ratio_ssa_shared_vs_plain": shared["median"],
            "ratio_ssa_linear_vs_plain": linear["median"],
            "ratio_detail": {"ssa_shared": shared, "ssa_linear": linear},
            # the materialised variants ran in their own group with ssa_shared: speedups are within that group
            "speedup_vs_reference": ratios(mat, "reference", "ssa_shared")["median"],
            "speedup_vs_authors": ratios(mat, "authors", "ssa_shared")["median"],
            "saved_bytes": saved,
            "saved_ratio_ssa_shared_vs_plain": round(saved["ssa_shared"] / saved["plain"], 2),
            "saved_ratio_reference_vs_ssa_shared": round(saved["reference"] / saved["ssa_shared"], 2),
            "saved_ratio_authors_vs_ssa_shared": round(saved["authors"] / saved["ssa_shared"], 2),
        }
        if device.type == "cuda":
            row["cuda_peak_bytes"] = {n: cuda_peak_bytes(s, device) for n, s in steps.items()}
        rows.append(row)
        print(f"[{device.type}] T={T}: ssa_shared/plain {row['ratio_ssa_shared_vs_plain']}, ssa_linear/plain "
              f"{row['ratio_ssa_linear_vs_plain']}, reference/ssa {row['speedup_vs_reference']}x, "
              f"authors/ssa {row['speedup_vs_authors']}x", file=sys.stderr, flush=True)
        del made, steps, x, grad
    return rows


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews the timings (not the memory)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, T up to 1024")
    ap.add_argument("--out", type=Path, help="also write the JSON object to this file")
    ap.add_argument("--repeats", type=int, help="timed repeats per variant (default 15, quick 5)")
    ap.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default 256 1024 2048)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: every core this process may "
                    "use); on a busy machine --threads 1 makes the cpu_median ratios count this run's work only")
    args = ap.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    torch.set_num_threads(threads)
    seqs = args.seq or ([256, 1024] if args.quick else [256, 1024, 2048])
    repeats = args.repeats or (5 if args.quick else 15)
    warmup = 2 if args.quick else 3
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    result = {
        "benchmark": "attention",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_cores": cores,
        "torch_threads": threads,
        "shape": {"batch": BATCH, "d_model": D_MODEL, "heads": HEADS, "dtype": "float32", "seq": seqs},
        "variants": {
            "plain": "SelectiveSelfAttention(ssa=None): F.scaled_dot_product_attention",
            "ssa_shared": "fused SSA: log_expexp position, shared query/value gates, per_head",
            "ssa_linear": "fused SSA: log_expexp position, linear query/value gates, per_head",
            "reference": "reference_attention: materialised T x T, same SSA layer",
            "authors": "authors_position_attention: the authors' materialised position scaling",
        },
        "timing": f"forward + backward (input requires grad), wall clock, {repeats} interleaved repeats after "
                  f"{warmup} warmup for the fused variants, max(3, repeats // 3) for the materialised ones (timed "
                  "in a group with ssa_shared, which speedup_vs_* divide by). ratio_* = median / median; "
                  "ratio_detail adds min / min, the median of per-repeat ratios (paired: robust to load drift) "
                  "and the ratio of median process CPU times (robust to other processes taking the cores)",
        "memory": "saved_bytes: bytes of the distinct storages autograd saves for backward "
                  "(torch.autograd.graph.saved_tensors_hooks), parameters excluded; cuda_peak_bytes: "
                  "torch.cuda.max_memory_allocated over forward + backward, above the memory held before",
        "targets": {"ratio_ssa_vs_plain_max": 1.05, "speedup_vs_materialised_at_2048": "several times"},
        "quick": args.quick,
        "loadavg_before": _loadavg(),
        "devices": {},
    }
    for device in devices:
        result["devices"][device.type] = bench_device(device, seqs, warmup, repeats)
    result["loadavg_after"] = _loadavg()
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
