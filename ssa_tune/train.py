"""One trial: build the dataset and the model, train with AdamW (warm-up + cosine), evaluate every k steps.

The model is the built-in GPT (`GPTConfig`) or a local Hugging Face checkpoint (`HFModelConfig`, loaded
fresh in every trial and converted with `ssa_tune.hf`); `TrainConfig.freeze` picks what trains
(`ssa_tune.optim.freeze`). Both report the same metrics: val/test loss and perplexity, the validation loss
before the first step (`val_loss_at_start`, `val_ppl_at_start`: the model as it came, so a fine-tuning
study shows what fine-tuning moved), tokens/s, peak memory, decode ms per generated token (the model's own
KV cache), parameter counts and `progress`. What only the built-in layer has: the SSA attention statistics
(`ssa.entropy_mean`, ...) and the sparsity regulariser read its sampled attention rows, so a Hugging Face
trial reports no `ssa.*` statistics (and the spec refuses the regulariser for it).

Metrics reach the outside world only through `on_eval(metrics)` — the tuner hooks Ray Tune and MLflow onto
it — so this module imports torch and the core alone (and transformers for a Hugging Face model).
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from .config import GPTConfig, HFModelConfig, LayerSpec, ModelConfig, SSAConfig, TrainConfig
from .errors import TrialFailed
from .attention import KVCache
from .model import GPT
from .optim import freeze, parameter_groups
from .stats import attention_stats, flat_stats


@dataclass
class TrialResult:
    metrics: dict[str, float]  # the last evaluation, plus the end-of-trial measurements
    history: list[dict[str, float]]
    steps: int
    seconds: float
    n_params: int
    ssa_params: int
    trainable_params: int | None = None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr at the last step."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_frac
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def precision_for(device: torch.device, bf16_supported: bool | None = None) -> str:
    """The training precision on `device`: "bf16" autocast on a GPU that supports bfloat16, "fp16" autocast
    with a gradient scaler on one that does not (fp16's range needs loss scaling), "fp32" on the CPU."""
    if device.type != "cuda":
        return "fp32"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrialFailed(f"device: {name} requested but CUDA is not available")
    return torch.device(name)


class PeakMemory:
    """The peak memory of one trial, in MiB, as `peak_mem_mb` reports it.

    CUDA: `max_memory_allocated` since the trial started (the counter is reset then), minus what was allocated
    at that moment. CPU: the highest resident size the process reached since the trial started (Linux's
    VmHWM, reset through /proc/self/clear_refs) minus the resident size then, after returning freed heap
    memory to the system: what this trial added at its peak (weights, optimizer state, activations), not the
    worker process's lifetime peak (a Ray worker runs many trials). Where the kernel cannot reset the
    high-water mark, the process's lifetime peak is reported and `scope` says so.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.scope = "trial"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the system first
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident size
            self.base = self._status("VmRSS")
        except OSError:
            self.scope, self.base = "process", 0.0

    @staticmethod
    def _status(field: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) / 1024.0  # kB -> MiB
        raise OSError(field)

    def mb(self) -> float:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        if self.scope == "trial":
            try:
                return max(0.0, self._status("VmHWM") - self.base)
            except OSError:
                pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux: the process's peak


@torch.no_grad()
def evaluate(model: nn.Module, dataset, split: str, batch_size: int, device: torch.device, amp) -> dict[str, float]:
    model.eval()
    loss_sum, count, acc_sum, acc_n = 0.0, 0, 0.0, 0
    for x, y in dataset.eval_batches(split, batch_size):
        x, y = x.to(device), y.to(device)
        with amp():
            logits, _ = model(x)
        logits = logits.float()
        mask = y != -100
        loss_sum += torch.nn.functional.cross_entropy(logits[mask], y[mask], reduction="sum").item()
        count += int(mask.sum())
        acc = dataset.accuracy(logits, y)
        if acc is not None:
            acc_sum += acc.float().sum().item()
            acc_n += acc.numel()
    out = {f"{split}_loss": loss_sum / max(count, 1)}
    out[f"{split}_ppl"] = math.exp(min(out[f"{split}_loss"], 50.0))
    if acc_n:
        out[f"{split}_acc"] = acc_sum / acc_n
    if dataset.optimal_loss is not None:
        out[f"{split}_gap"] = out[f"{split}_loss"] - dataset.optimal_loss
    model.train()
    return out


@torch.no_grad()
def probe_accuracy(model: nn.Module, dataset, device: torch.device, amp) -> dict[str, float]:
    probes = dataset.probes()
    if not probes:
        return {}
    model.eval()
    out = {}
    for name, (x, y) in probes.items():
        with amp():
            logits, _ = model(x.to(device))
        out[f"probe.{name}"] = dataset.accuracy(logits.float(), y.to(device)).float().mean().item()
    model.train()
    out["passkey_acc"] = sum(out.values()) / len(out)
    return out


def _max_len(model: nn.Module) -> int:
    """Tokens the model can attend over: the built-in GPT's seq_len, a Hugging Face model's positions."""
    n = getattr(model, "max_len", None)
    return int(n) if n else int(model.config.seq_len)


@torch.no_grad()
def decode_latency_ms(model: nn.Module, dataset, device: torch.device, n_tokens: int) -> float:
    """Milliseconds per generated token with the KV cache (the model's own: `model.new_cache()` for a
    Hugging Face model): the mean time of `n_tokens` single-token forward passes (greedy) after a prompt of
    half a validation sequence. The prompt's own forward (the prefill) and one warm-up step are not timed."""
    if n_tokens == 0:
        return float("nan")
    x, _ = dataset.eval_batches("val", 1)[0]
    prompt_len = max(1, min(x.shape[1] // 2, _max_len(model) - n_tokens - 1))
    prompt = x[:1, :prompt_len].to(device)
    model.eval()
    cache = model.new_cache() if hasattr(model, "new_cache") else KVCache()
    logits, _ = model(prompt, cache=cache)  # prefill: not a generated token
    times = []
    for i in range(n_tokens + 1):
        nxt = logits[:, -1:].argmax(-1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits, _ = model(nxt, cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first step warms the single-token path up
            times.append(time.perf_counter() - t0)
    model.train()
    return 1000.0 * sum(times) / len(times)


def train(dataset, model_cfg: ModelConfig, cfg: TrainConfig, ssa: SSAConfig | None = None,
          on_eval: Callable[[dict[str, float]], None] | None = None, freeze_layers: LayerSpec = "all") -> TrialResult:
    """Train one model on `dataset` (an `ssa_tune.data.Dataset`); call `on_eval(metrics)` at each evaluation.

    `model_cfg` is a `GPTConfig` (built-in model, random init) or an `HFModelConfig` (a local checkpoint,
    fine-tuned). `freeze_layers` is the layer selection `cfg.freeze == "below"` trains from when `ssa` is
    None (the baseline arm: the spec's `ssa.layers`, see `ssa_tune.optim.freeze`).
    Raises TrialFailed on a NaN/inf loss or when the device (GPU or host) runs out of memory.
    """
    try:
        return _train(dataset, model_cfg, cfg, ssa, on_eval, freeze_layers)
    except torch.OutOfMemoryError as e:
        raise TrialFailed(f"out of memory: {_first_line(e)}") from None
    except RuntimeError as e:  # the CPU allocator's failure is a plain RuntimeError
        if "can't allocate memory" in str(e) or "not enough memory" in str(e):
            raise TrialFailed(f"out of memory: {_first_line(e)}") from None
        raise


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def accumulate(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, amp,
               step: int = 0, scaler=None) -> float:
    """Backward over micro-batches so the gradient equals one big batch's: every scored token weighs the
    same (micro-batch losses are token sums over the step's total count, not means of means)."""
    total = sum(int((y != -100).sum()) for _, y in batches)
    loss_sum = 0.0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = int((y != -100).sum())
        with amp():
            _, loss = model(x, y)
            aux = model.aux_loss()
        if not torch.isfinite(loss) or (aux is not None and not torch.isfinite(aux)):
            bad = loss if not torch.isfinite(loss) else aux
            raise TrialFailed(f"diverged: loss is {bad.item()} at step {step}", step)
        objective = loss * (n / max(total, 1))
        if aux is not None:
            objective = objective + aux / len(batches)
        (objective if scaler is None else scaler.scale(objective)).backward()
        loss_sum += loss.item() * n
    return loss_sum / max(total, 1)


class MasterWeights:
    """fp32 master copies of the trained parameters a checkpoint loaded in bfloat16 or float16 holds
    (`model: {dtype: ...}`): the optimizer updates the fp32 copies, the model's low-precision weights take their
    rounded values after each step. Updated in place, a bf16 weight drops every change smaller than half its
    last bit (about 0.4 % of its value), so small learning-rate updates would vanish. fp32 parameters are
    optimized as they are (no copy)."""

    def __init__(self, groups: list[dict]):
        self.pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
        self.groups = []
        for g in groups:
            params = []
            for p in g["params"]:
                if p.dtype in (torch.bfloat16, torch.float16):
                    master = nn.Parameter(p.detach().float())
                    self.pairs.append((p, master))
                    params.append(master)
                else:
                    params.append(p)
            self.groups.append({**g, "params": params})

    def grads_in(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.detach().float()

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, master in self.pairs:
            p.copy_(master)


def build_model(dataset, model_cfg: ModelConfig, ssa: SSAConfig | None) -> tuple[nn.Module, nn.Module]:
    """(the model the loop trains, the module `freeze` and `convert` act on) on the CPU: a new built-in GPT
    (vocabulary widened to the dataset's), or the checkpoint wrapped in `ssa_tune.hf.CausalLM` and converted."""
    if isinstance(model_cfg, HFModelConfig):
        from .convert import convert
        from .hf import load_checkpoint

        model = load_checkpoint(model_cfg)
        if dataset.vocab_size > model.vocab_size:
            raise ValueError(f"dataset: its vocabulary ({dataset.vocab_size} tokens) is larger than the checkpoint's "
                             f"({model.vocab_size}); tokenise it with the checkpoint's tokenizer")
        if model.max_len is not None and dataset.seq_len > model.max_len:
            raise ValueError(f"dataset.seq_len: {dataset.seq_len} exceeds the checkpoint's {model.max_len} positions")
        if ssa is not None:
            convert(model.hf, ssa)
        return model, model.hf
    if model_cfg.seq_len < dataset.seq_len:
        raise ValueError(f"seq_len: the model's seq_len {model_cfg.seq_len} is shorter than the dataset's {dataset.seq_len}")
    if model_cfg.vocab_size < dataset.vocab_size:
        model_cfg = GPTConfig.from_dict({**model_cfg.to_dict(), "vocab_size": dataset.vocab_size})
    model = GPT(model_cfg, ssa)
    return model, model


def _train(dataset, model_cfg, cfg, ssa, on_eval, freeze_layers) -> TrialResult:
    t_setup = time.perf_counter()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    memory = PeakMemory(device)  # before the model exists: its weights and optimizer state count too
    model, core = build_model(dataset, model_cfg, ssa)
    model = model.to(device)
    counts = freeze(core, cfg.freeze, freeze_layers)
    n_params = model.num_params()
    ssa_params = sum(p.numel() for n, p in model.named_parameters() if ".temps." in n)
    masters = MasterWeights(parameter_groups(model, cfg.lr, cfg.weight_decay))
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(masters.groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)
    trained = [p for g in opt.param_groups for p in g["params"]]
    precision = precision_for(device)
    if precision == "fp32":
        import contextlib

        amp = contextlib.nullcontext
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        amp = lambda: torch.autocast("cuda", dtype=dtype)  # noqa: E731
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    gen = torch.Generator().manual_seed(cfg.seed)
    total = cfg.steps_for(dataset.seq_len)
    history: list[dict[str, float]] = []
    train_time, tokens, t_start = 0.0, 0, time.perf_counter()
    setup_seconds = t_start - t_setup  # threads, device, model (or checkpoint) built and moved, optimizer
    last_loss = float("nan")
    metrics: dict[str, float] = {}
    # the model as it starts (a checkpoint as it came, or the random init): what fine-tuning moved
    start = evaluate(model, dataset, "val", cfg.batch_size, device, amp)
    at_start = {"val_loss_at_start": start["val_loss"], "val_ppl_at_start": start["val_ppl"]}
    model.train()
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        lr = lr_at(step - 1, cfg, total)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        batches = [dataset.train_batch(cfg.batch_size, gen) for _ in range(cfg.grad_accum)]
        last_loss = accumulate(model, batches, device, amp, step, scaler)
        tokens += sum(x.numel() for x, _ in batches)
        masters.grads_in()
        if scaler is not None:  # gradients back to their true scale before clipping
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        masters.weights_out()
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        if step % cfg.eval_every == 0 or step == total:
            # progress 1.0 marks the trial's own end (steps or tokens): the driver tells COMPLETE from PRUNED by it
            metrics = {"step": step, "progress": step / total, "train_loss": last_loss, "lr": lr, "tokens": tokens,
                       "tokens_per_s": tokens / max(train_time, 1e-9), "train_seconds": train_time, **at_start}
            metrics.update(evaluate(model, dataset, "val", cfg.batch_size, device, amp))
            if not math.isfinite(metrics["val_loss"]):
                raise TrialFailed(f"diverged: val_loss is {metrics['val_loss']} at step {step}", step)
            metrics.update(probe_accuracy(model, dataset, device, amp))
            if isinstance(model, GPT) and model.ssa is not None:  # the built-in layer's sampled rows
                x, _ = dataset.eval_batches("val", cfg.batch_size)[0]
                metrics.update(flat_stats(attention_stats(model, x.to(device))))
            if step == total:  # end-of-trial measurements: held-out test split, decode latency
                metrics.update(evaluate(model, dataset, "test", cfg.batch_size, device, amp))
                metrics["latency_ms_per_token"] = decode_latency_ms(model, dataset, device, cfg.latency_tokens)
                metrics["n_params"], metrics["ssa_params"] = n_params, ssa_params
                metrics["trainable_params"] = counts["trainable"]
            metrics["peak_mem_mb"] = memory.mb()
            metrics["seconds"] = time.perf_counter() - t_start
            metrics["setup_seconds"] = setup_seconds
            metrics["precision"] = precision  # a label, not a number: the driver makes it a tag of the trial
            history.append(metrics)
            if on_eval is not None:
                on_eval(dict(metrics))
    return TrialResult(metrics=metrics, history=history, steps=total, seconds=time.perf_counter() - t_start,
                       n_params=n_params, ssa_params=ssa_params, trainable_params=counts["trainable"])
