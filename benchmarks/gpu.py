"""The GPU check (`make bench-gpu`): one script, a few minutes on one GPU, one JSON object.

  attention   one SSA layer (log_expexp position term, shared query and value gates) vs plain fused
              attention, forward + backward in bf16 autocast, batch 1, d_model 1024, 16 heads, at
              T = 1024, 4096, 8192; and the materialised form of the authors' code where it fits in memory.
              Median of interleaved rounds after warm-up; peak allocated memory of each.
  training    a GPT-2-small-shaped model (12 layers, 12 heads, d_model 768, T 1024, batch 8, bf16) with and
              without SSA on every layer: training tokens/s (AdamW steps, synthetic batches) and the ratio.
  decode      the same two models: ms per generated token with the KV cache after a 512-token prompt.
  study       a real ssa-tune study (Ray Tune, Optuna, MLflow on SQLite) of 4 trials at 0.25 GPU each on
              the one GPU, 4 at a time, with GPU utilisation and memory sampled every 0.5 s (nvidia-smi).

Without a CUDA device it prints one line saying so and exits 0. `--quick` runs the same code paths at toy
sizes on whatever device there is (the CPU here) so the test suite checks the script and its JSON.

    python benchmarks/gpu.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssa_tune import GPT, GPTConfig, SSAConfig  # noqa: E402
from ssa_tune.attention import KVCache, SelectiveSelfAttention, authors_position_attention  # noqa: E402
from ssa_tune.optim import parameter_groups  # noqa: E402

SSA = SSAConfig(query_position="log_expexp", query_gate="shared", value_gate="shared", per_head=True)
FULL = {"attn": {"d": 1024, "heads": 16, "batch": 1, "seq": [1024, 4096, 8192], "rounds": 7},
        "gpt": {"n_layer": 12, "n_head": 12, "d_model": 768, "seq": 1024, "batch": 8, "steps": 10, "prompt": 512,
                "decode": 64},
        "study": {"trials": 4, "gpu": 0.25, "steps": 300}}
QUICK = {"attn": {"d": 64, "heads": 4, "batch": 1, "seq": [64, 128], "rounds": 3},
         "gpt": {"n_layer": 2, "n_head": 2, "d_model": 64, "seq": 64, "batch": 2, "steps": 3, "prompt": 16,
                 "decode": 4},
         "study": {"trials": 2, "gpu": 0.0, "steps": 20}}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _amp(device):
    return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def attention(device, cfg) -> dict:
    torch.manual_seed(0)
    plain = SelectiveSelfAttention(cfg["d"], cfg["heads"]).to(device)
    ssa = SelectiveSelfAttention(cfg["d"], cfg["heads"], SSA).to(device)
    ssa.load_state_dict(plain.state_dict(), strict=False)
    amp = _amp(device)
    out = {}
    for T in cfg["seq"]:
        x = torch.randn(cfg["batch"], T, cfg["d"], device=device, requires_grad=True)
        steps = {"plain": lambda: plain(x), "ssa": lambda: ssa(x),
                 "authors": lambda: authors_position_attention(ssa, x, ssa.temps.beta[0])}
        times: dict[str, list[float]] = {k: [] for k in steps}
        peaks: dict[str, float | None] = {}
        for r in range(cfg["rounds"] + 1):  # round 0 warms up
            for name, fwd in steps.items():
                if name in peaks and peaks[name] == "oom":
                    continue
                try:
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    _sync(device)
                    t0 = time.perf_counter()
                    with amp():
                        y = fwd()
                    y.float().sum().backward()
                    _sync(device)
                    if r:
                        times[name].append(time.perf_counter() - t0)
                    peaks[name] = _peak(device)
                except torch.OutOfMemoryError:
                    peaks[name] = "oom"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                x.grad = None
        row = {k: {"ms": 1000 * statistics.median(v), "peak_mb": peaks.get(k)} if v else {"ms": None,
               "peak_mb": peaks.get(k)} for k, v in times.items()}
        row["ratio_ssa_plain"] = row["ssa"]["ms"] / row["plain"]["ms"]
        row["authors_over_ssa"] = (row["authors"]["ms"] / row["ssa"]["ms"]) if row["authors"]["ms"] else None
        out[str(T)] = row
    return out


def _gpt(cfg, ssa, device):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=50304, seq_len=cfg["seq"] + cfg["decode"], n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], d_model=cfg["d_model"], position="learned"), ssa).to(device)


def training_and_decode(device, cfg) -> dict:
    amp = _amp(device)
    out = {}
    for name, ssa in (("plain", None), ("ssa", SSA)):
        model = _gpt(cfg, ssa, device)
        opt = torch.optim.AdamW(parameter_groups(model, 3e-4), lr=3e-4, fused=device.type == "cuda")
        x = torch.randint(0, 50304, (cfg["batch"], cfg["seq"]), device=device)
        times = []
        for i in range(cfg["steps"] + 2):
            _sync(device)
            t0 = time.perf_counter()
            with amp():
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        tokens_per_s = cfg["batch"] * cfg["seq"] / statistics.median(times)
        model.eval()
        with torch.no_grad(), amp():
            cache = KVCache()
            logits, _ = model(x[:1, :cfg["prompt"]], cache=cache)
            steps = []
            for i in range(cfg["decode"] + 1):
                nxt = logits[:, -1:].argmax(-1)
                _sync(device)
                t0 = time.perf_counter()
                logits, _ = model(nxt, cache=cache)
                _sync(device)
                if i:
                    steps.append(time.perf_counter() - t0)
        out[name] = {"tokens_per_s": tokens_per_s, "decode_ms_per_token": 1000 * statistics.fmean(steps),
                     "peak_mb": _peak(device)}
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    out["tokens_per_s_ratio"] = out["ssa"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["decode_ratio"] = out["ssa"]["decode_ms_per_token"] / out["plain"]["decode_ms_per_token"]
    return out


class _GpuSampler:
    """nvidia-smi every 0.5 s: utilisation % and memory used, while the study runs."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                       "--format=csv,noheader,nounits", "-i", "0"], capture_output=True, text=True,
                                      timeout=5).stdout.strip().splitlines()[0]
                util, mem = (float(v) for v in line.split(","))
                self.samples.append((util, mem))
            except Exception:  # noqa: BLE001 - no nvidia-smi (the CPU quick mode): no samples
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        if not self.samples:
            return {"samples": 0}
        util = [u for u, _ in self.samples]
        return {"samples": len(self.samples), "util_mean_pct": statistics.fmean(util), "util_max_pct": max(util),
                "mem_max_mb": max(m for _, m in self.samples)}


def study(cfg, quick: bool) -> dict:
    """4 trials sharing the GPU (0.25 each): a real `ssa-tune run` in a temporary work dir."""
    import yaml

    spec = {"name": "gpu-check", "dataset": {"kind": "builtin", "seq_len": 256},
            "model": {"n_layer": 4, "n_head": 8, "d_model": 512, "seq_len": 256, "position": "rotary"}
            if not quick else {"n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 64},
            "train": {"max_steps": cfg["steps"], "batch_size": 16, "eval_every": max(1, cfg["steps"] // 3),
                      "lr": 1e-3, "warmup_steps": 5},
            "ssa": {"query_position": "log_expexp", "query_gate": "shared", "value_gate": "shared"},
            "search": {"train.lr": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True}},
            "budget": {"n_trials": cfg["trials"]}, "scheduler": {"kind": "none"},
            "resources": {"cpus_per_trial": 1 if quick else 2, "gpus_per_trial": cfg["gpu"],
                          "max_concurrent": cfg["trials"]}}
    if quick:
        spec["dataset"] = {"kind": "markov"}
        spec["model"]["seq_len"] = 128
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gpu.yaml"
        path.write_text(yaml.safe_dump(spec))
        with _GpuSampler() as sampler:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "ssa_tune", "run", str(path), "--workdir", f"{tmp}/wd",
                                   "--json"], capture_output=True, text=True, timeout=1200, cwd=ROOT)
            wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"ok": False, "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
        summary = json.loads(proc.stdout)
    return {"ok": True, "trials": summary["trials"], "gpus_per_trial": cfg["gpu"], "wall_s": wall,
            "gpu": sampler.summary()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes on whatever device there is (a smoke test)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.quick:
        print("no GPU: torch sees no CUDA device on this machine; the GPU check needs one (run it where one is)")
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    result = {"benchmark": "gpu", "quick": args.quick, "device": torch.cuda.get_device_name(0)
              if device.type == "cuda" else "cpu", "torch": torch.__version__, "platform": platform.platform(),
              "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
              "attention": attention(device, cfg["attn"]),
              "gpt2_small": training_and_decode(device, cfg["gpt"]),
              "study": study(cfg["study"], args.quick)}
    result["seconds"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
