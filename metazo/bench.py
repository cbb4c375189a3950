"""Step time and peak memory of a ZO step, side by side with MeZO's step and the inference floor.

Three arms run in one process on the same model and the same synthetic batch (random token ids,
``seq_len`` real tokens per example, two label words):

- ``reference``: MeZO's step as MeZO's code does it (arXiv 2305.17333, ``zo_perturb_parameters`` /
  ``zo_update``): ``torch.manual_seed(seed)`` then ``torch.normal`` per tensor in the weights' dtype
  for each of four passes over the weights (+eps, -2eps, +eps, update), each loss from
  ``model(...).logits`` (full-vocabulary logits at every position) with the cross-entropy of the label
  words at the last position, and the projected gradient read back to the host. It is the
  yardstick; the perturbation adds in place (MeZO's code allocates ``param + s*z*eps``), which only
  makes the yardstick faster.
- ``metazo``: :meth:`metazo.engine.ZeroOrderOptimizer.step` with :meth:`metazo.scoring.Scorer.loss`, or with
  ``paired``, both signs in one forward over [batch || batch] (:meth:`metazo.scoring.Scorer.paired_loss`).
- ``floor``: two scoring forwards (``Scorer.loss``, no perturbation, no update): the work a two-point
  step cannot avoid.

Time: median over ``repeats`` timed steps after ``warmup`` untimed ones (CUDA synchronised).
Memory: CUDA max allocated bytes, or on CPU the process's peak resident set (VmHWM, reset before each
arm; the arms run floor, metazo, reference so a later arm's larger peak is not hidden by an earlier
one's, but freed heap an earlier arm kept can raise a later arm's figure: on CPU compare with care).

Named shapes build a real architecture from its config with random weights (no download); any other
name goes through :func:`metazo.models.load_model`.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, Qwen2Config

from metazo.engine import ZeroOrderOptimizer
from metazo.errors import MetazoError
from metazo.models import load_model, resolve_device, resolve_dtype
from metazo.runtime.memory import read_peak_memory, reset_peak_memory
from metazo.samplers import Sampler, make_sampler
from metazo.scoring import Batch, Scorer

ARMS = ("reference", "metazo", "floor")


def _llama(**shape) -> Callable[[], PretrainedConfig]:
    return lambda: LlamaConfig(**shape)


SHAPES: dict[str, tuple[str, Callable[[], PretrainedConfig]]] = {
    "llama-3.2-1b": ("Llama-3.2-1B shape (1.24B params, tied head)", _llama(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072, head_dim=64)),
    "qwen2.5-1.5b": ("Qwen2.5-1.5B shape (1.54B params, tied head, qkv biases)", lambda: Qwen2Config(
        hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
        max_position_embeddings=32768)),
    "opt-1.3b": ("OPT-1.3B shape (1.32B params, tied head)", lambda: OPTConfig(
        hidden_size=2048, word_embed_proj_dim=2048, num_hidden_layers=24, num_attention_heads=32,
        ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048)),
    "smollm2-135m": ("SmolLM2-135M shape (134.5M params, tied head)", _llama(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
        max_position_embeddings=8192)),
    "tiny": ("random 2-layer Llama (hidden 64, vocab 1024), for smoke tests", _llama(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=4096)),
}

# The scorer needs a pad id only to encode text; the benchmark builds its batches directly.
_NO_TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=0)


@dataclass
class BenchConfig:
    model: str = "tiny"
    dtype: str = "float32"
    batch_size: int = 16
    seq_len: int = 256
    sampler: str = "gaussian"
    sampler_options: dict = field(default_factory=dict)
    device: str = "auto"
    repeats: int = 10
    warmup: int = 2
    lr: float = 1e-7
    eps: float = 1e-3
    seed: int = 0
    paired: bool = False  # metazo scores both signs in one forward over [batch || batch]
    arms: tuple[str, ...] = ARMS


def build_model(name: str, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """A named shape with random weights (seeded, built on ``device``), or any model ``load_model`` takes."""
    if name not in SHAPES:
        return load_model(name, dtype=dtype, device=device)[0]
    config = SHAPES[name][1]()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(True)
    return model


def synthetic_batch(vocab_size: int, batch_size: int, seq_len: int, device: torch.device, seed: int = 0) -> tuple[Batch, list[int]]:
    """Random token ids, every position real, two label words; and the label words' token ids."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    batch = Batch(input_ids.to(device), torch.ones_like(input_ids).to(device), labels.to(device),
                  torch.ones((batch_size, 2), dtype=torch.bool, device=device))
    return batch, [vocab_size // 3, 2 * vocab_size // 3]


class MezoReference:
    """MeZO's step written as in its code: four passes over the weights, full-vocabulary logits."""

    def __init__(self, model: nn.Module, batch: Batch, label_ids: list[int], lr: float, eps: float, seed: int = 0):
        self.model, self.batch, self.lr, self.eps = model, batch, lr, eps
        self.label_ids = torch.tensor(label_ids, device=batch.labels.device)
        # MeZO trains every parameter with requires_grad, tied ones once (named_parameters dedups).
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.seed, self.step_count = seed, 0

    def loss(self) -> torch.Tensor:
        logits = self.model(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask).logits
        last = logits[:, -1, :].float()[:, self.label_ids]
        return F.cross_entropy(last, self.batch.labels)

    def perturb(self, seed: int, scale: float) -> None:
        torch.manual_seed(seed)
        for _, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.shape, device=param.device, dtype=param.dtype)
            param.data.add_(z, alpha=scale * self.eps)

    @torch.no_grad()
    def step(self) -> float:
        seed = self.seed * 1_000_003 + self.step_count  # MeZO draws a fresh seed per step
        self.step_count += 1
        self.perturb(seed, 1)
        loss_plus = self.loss()
        self.perturb(seed, -2)
        loss_minus = self.loss()
        self.perturb(seed, 1)
        projected_grad = float((loss_plus - loss_minus) / (2 * self.eps))  # MeZO's .item(): a host sync
        torch.manual_seed(seed)
        for name, param in self.params:
            z = torch.normal(mean=0, std=1, size=param.shape, device=param.device, dtype=param.dtype)
            param.data.sub_(z, alpha=self.lr * projected_grad)  # weight decay 0
        return projected_grad


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_arm(work: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> dict:
    """Median and all times (ms) of ``work`` after ``warmup`` untimed calls, and the peak memory of the timed calls."""
    for _ in range(warmup):
        work()
    _synchronize(device)
    reset_peak_memory(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        work()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": statistics.median(times), "times_ms": times, "peak_memory_bytes": read_peak_memory(device)}


def run_bench(config: BenchConfig) -> dict:
    """Time the arms on one model and batch; a dict with each arm's figures and the ratios."""
    if config.batch_size < 1 or config.seq_len < 1 or config.repeats < 1 or config.warmup < 0:
        raise MetazoError("batch, seq-len and repeats must be >= 1 and warmup >= 0")
    unknown = [arm for arm in config.arms if arm not in ARMS]
    if unknown or not config.arms:
        raise MetazoError(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    model = build_model(config.model, dtype, device)
    vocab = model.get_input_embeddings().weight.shape[0]
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and config.seq_len > positions:
        raise MetazoError(f"seq-len {config.seq_len} is longer than the model's {positions} positions")
    batch, label_ids = synthetic_batch(vocab, config.batch_size, config.seq_len, device, config.seed)
    scorer = Scorer(model, _NO_TOKENIZER, label_ids)
    sampler = make_sampler(config.sampler, run_seed=config.seed, **config.sampler_options)
    if sampler.requires_mode == "lora" or type(sampler).prepare_model is not Sampler.prepare_model:
        raise MetazoError(f"bench times full-parameter samplers on the model as built; sampler '{config.sampler}' "
                          "reparametrises the model or needs LoRA: use gaussian, rademacher, lowrank, agzo or learned")
    optimizer = ZeroOrderOptimizer(model, sampler, lr=config.lr, eps=config.eps, seed=config.seed)
    reference = MezoReference(model, batch, label_ids, config.lr, config.eps, config.seed)

    def floor() -> float:
        with torch.inference_mode():
            return float(scorer.loss(batch) + scorer.loss(batch))

    paired = (lambda: scorer.paired_loss(batch)) if config.paired else None
    work = {"floor": floor, "metazo": lambda: optimizer.step(lambda: scorer.loss(batch), paired_closure=paired),
            "reference": reference.step}
    arms = {}
    for name in ("floor", "metazo", "reference"):  # smallest expected peak first (see the module docstring)
        if name in config.arms:
            arms[name] = time_arm(work[name], device, config.repeats, config.warmup)
    tokens = config.batch_size * config.seq_len
    for figures in arms.values():
        figures["tokens_per_s"] = tokens / (figures["median_ms"] / 1000)
    return {
        "config": {**asdict(config), "arms": list(config.arms)},
        "device": device_name(device),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "arms": arms,
        "ratios": ratios(arms),
    }


def ratios(arms: dict) -> dict:
    out = {}
    if "reference" in arms and "metazo" in arms:
        out["speedup_vs_reference"] = arms["reference"]["median_ms"] / arms["metazo"]["median_ms"]
    if "metazo" in arms and "floor" in arms:
        out["metazo_over_floor_time"] = arms["metazo"]["median_ms"] / arms["floor"]["median_ms"]
        out["metazo_over_floor_memory"] = arms["metazo"]["peak_memory_bytes"] / arms["floor"]["peak_memory_bytes"]
    if "reference" in arms and "floor" in arms:
        out["reference_over_floor_time"] = arms["reference"]["median_ms"] / arms["floor"]["median_ms"]
        out["reference_over_floor_memory"] = arms["reference"]["peak_memory_bytes"] / arms["floor"]["peak_memory_bytes"]
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def format_report(result: dict) -> str:
    c = result["config"]
    lines = [
        f"model {c['model']} ({result['parameters'] / 1e6:.1f}M params), {c['dtype']}, batch {c['batch_size']} x seq "
        f"{c['seq_len']}, sampler {c['sampler']}{' (paired)' if c.get('paired') else ''}, {result['device']}, median of {c['repeats']} after {c['warmup']} warmup",
        f"{'arm':<34} {'median ms':>10} {'tokens/s':>10} {'peak MiB':>10}",
    ]
    labels = {"reference": "MeZO reference step", "metazo": "metazo step", "floor": "floor (two scoring forwards)"}
    for name in ARMS:
        if name in result["arms"]:
            a = result["arms"][name]
            lines.append(f"{labels[name]:<34} {a['median_ms']:>10.1f} {a['tokens_per_s']:>10.0f} "
                         f"{a['peak_memory_bytes'] / 2**20:>10.0f}")
    r = result["ratios"]
    parts = []
    if "speedup_vs_reference" in r:
        parts.append(f"speed-up vs MeZO reference {r['speedup_vs_reference']:.2f}x")
    if "metazo_over_floor_time" in r:
        parts.append(f"metazo / floor: time {r['metazo_over_floor_time']:.2f}x, memory {r['metazo_over_floor_memory']:.2f}x")
    if "reference_over_floor_time" in r:
        parts.append(f"reference / floor: time {r['reference_over_floor_time']:.2f}x, memory {r['reference_over_floor_memory']:.2f}x")
    if parts:
        lines.append("; ".join(parts))
    return "\n".join(lines)
