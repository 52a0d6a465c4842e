"""When a recipe does not fit: the cheapest changes that make it fit, and what each costs.

Levers, cheapest first (what a change costs, not how much memory it saves):
  train.batch_size (grad_accum grows to keep batch_size x grad_accum): same optimization,
      more and smaller passes
  train.keep_matmuls_gb: the recompute runs the 4-bit matmuls of more layers again
  train.gradient_checkpointing: every layer is recomputed
  train.optimizer: 8-bit Adam state instead of 32-bit
  model.offload with model.resident_layers: the last layers' 4-bit weights live in host memory
      (a GPU) or a file (a CPU run) and stream in per layer, overlapped with compute
  lora.r: a smaller adapter
  data.max_seq_len: longer examples are truncated
Each lever is tried alone at the least change that fits; when none fits alone, they are
combined in that order. Speed costs are compute per trained token from `step_flops` (dense
matmul counts), not timings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .plan import Plan, estimate
from .plan_terms import Workload, kept_layers, kept_output_bytes, layer_payload, lora_tensors


@dataclass
class Change:
    """One way to make a recipe fit."""

    settings: dict[str, object]
    """Recipe keys and their new values, e.g. {'train.batch_size': 1, 'train.grad_accum': 32}."""
    peak_bytes: int
    """Predicted peak with the change."""
    cost: str
    """What the change costs, in words, with its compute per trained token."""

    @property
    def overrides(self) -> str:
        """The change as `qlora train` arguments."""
        return " ".join(f"--set {k}={_yaml(v)}" for k, v in self.settings.items())


def _yaml(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def step_flops(plan: Plan, w: Workload) -> float:
    """Matmul FLOPs per trained token of a training step with workload `w` (a dense count).

    The frozen base linears (P weights per layer) run forward, for the input gradient, and
    again in the recompute of checkpointed layers whose outputs are not kept (R layers); the
    LoRA factors (Pl weights in all) forward, twice in backward and in the recompute; causal
    attention (half the T x T scores, q width Q) likewise; the output head forward, in the
    loss chunk's recompute and for its input gradient.
    """
    shape, layers = plan.shape, plan.shape.layers
    base = sum(o * i for o, i in shape.linears().values())
    recomputed = layers - kept_layers(shape, w, plan.device.kind) if w.checkpointing else 0
    lora = sum(lora_tensors(shape, w))
    attention = 2 * w.max_seq_len * shape.heads * shape.head_dim  # QK^T and AV, per layer and pass
    return (2 * base * (2 * layers + recomputed) + 2 * lora * (3 + recomputed / layers)
            + attention * (3 * layers + recomputed) + 6 * shape.vocab * shape.hidden)


def advise(plan: Plan, recipe) -> list[Change]:
    """Single changes that fit, cheapest first; when none does, one combination: levers in
    order, each at its least setting that fits together with the ones before, else at its
    extreme, skipping a lever that cannot close a tenth of the remaining gap (not worth its
    cost). [] when nothing fits."""
    found = [c for c in (lever(plan, recipe) for lever in LEVERS) if c is not None]
    if found:
        return found
    settings: dict[str, object] = {}
    peak = plan.peak_bytes
    for lever in LEVERS:
        hit = lever(plan, recipe, settings)
        if hit is not None:
            return [Change(hit.settings, hit.peak_bytes, "all of: " + "; ".join(_costs(plan, recipe, hit.settings)))]
        extreme = lever(plan, recipe, settings, extreme=True)
        if extreme is not None and peak - extreme.peak_bytes >= (peak - plan.device_bytes) / 10:
            settings, peak = extreme.settings, extreme.peak_bytes
    return []


def _apply(recipe, settings: dict[str, object]):
    sections = {}
    for key, value in settings.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(recipe, **{s: dataclasses.replace(getattr(recipe, s), **kw)
                                          for s, kw in sections.items()})


def _try(plan: Plan, recipe, settings: dict[str, object]) -> int:
    return estimate(plan.shape, Workload.from_recipe(_apply(recipe, settings)), plan.device).peak_bytes


def _first_fitting(plan, recipe, base, candidates, extreme):
    """The first candidate settings that fit (or the last one, with `extreme`)."""
    last = None
    for cand in candidates:
        settings = {**base, **cand}
        peak = _try(plan, recipe, settings)
        last = (settings, peak)
        if not extreme and peak <= plan.device_bytes:
            return settings, peak
    return last if extreme else None


def _work_ratio(plan: Plan, recipe, settings) -> float:
    return step_flops(plan, Workload.from_recipe(_apply(recipe, settings))) / step_flops(plan, plan.workload)


def _costs(plan, recipe, settings) -> list[str]:
    ratio = _work_ratio(plan, recipe, settings)
    return [f"{k}={_yaml(v)}" for k, v in settings.items()] + [f"{ratio - 1:+.0%} compute per token"]


def _lever(plan, recipe, settings, candidates, extreme, describe):
    hit = _first_fitting(plan, recipe, settings or {}, candidates, extreme)
    if hit is None:
        return None
    new, peak = hit
    return Change(new, peak, describe(new, _work_ratio(plan, recipe, new)))


def _batch(plan, recipe, settings=None, extreme=False):
    t = recipe.train
    if t.batch_size == 1:
        return None
    total = t.batch_size * t.grad_accum
    cands = [{"train.batch_size": b, "train.grad_accum": -(-total // b)} for b in range(t.batch_size - 1, 0, -1)]
    return _lever(plan, recipe, settings, cands, extreme, lambda s, r: (
        f"same examples per optimizer step in {s['train.grad_accum']} passes instead of {t.grad_accum} "
        f"({r - 1:+.0%} compute per token; smaller matmuls run less efficiently on a GPU)"))


def _keep(plan, recipe, settings=None, extreme=False):
    w = Workload.from_recipe(_apply(recipe, settings or {}))
    kept = kept_layers(plan.shape, w, plan.device.kind)
    if kept == 0:
        return None
    per_layer = kept_output_bytes(plan.shape, w, plan.device.kind) / 1e9
    # the least budget that still buys k layers, rounded up to 0.01 GB
    cands = [{"train.keep_matmuls_gb": math.ceil(k * per_layer * 100) / 100 if k else 0}
             for k in range(kept - 1, -1, -1)]
    return _lever(plan, recipe, settings, cands, extreme, lambda s, r: (
        f"the recompute runs more layers' 4-bit matmuls again ({r - 1:+.0%} compute per token)"))


def _checkpointing(plan, recipe, settings=None, extreme=False):
    if recipe.train.gradient_checkpointing:
        return None
    return _lever(plan, recipe, settings, [{"train.gradient_checkpointing": True}], extreme, lambda s, r: (
        f"every layer's forward runs again in backward ({r - 1:+.0%} compute per token)"))


def _optimizer(plan, recipe, settings=None, extreme=False):
    if recipe.train.optimizer.endswith("8bit"):
        return None
    return _lever(plan, recipe, settings, [{"train.optimizer": "paged_adamw_8bit"}], extreme, lambda s, r: (
        "8-bit Adam moments (bitsandbytes, block-wise quantized); same speed"))


def _offload(plan, recipe, settings=None, extreme=False):
    """Fewer resident layers, most first. On a GPU the home is host memory; a CPU run's own
    memory is the host's, so there only a file takes the weights out of it."""
    if recipe.model.quantization == "none":
        return None
    home = "cpu" if plan.device.kind == "cuda" else "disk"
    if recipe.model.offload == home:
        start = plan.resident_layers - 1  # already streaming: fewer resident layers
    elif recipe.model.offload == "none":
        start = plan.shape.layers - 1
    else:
        return None
    cands = [{"model.offload": home, "model.resident_layers": n} for n in range(start, -1, -1)]
    if not cands:
        return None
    payload = layer_payload(plan.shape, plan.workload)
    where = "host memory" if home == "cpu" else "a file"

    def describe(s, r):
        streamed = plan.shape.layers - s["model.resident_layers"]
        return (f"layers {s['model.resident_layers']}-{plan.shape.layers - 1} keep their 4-bit weights "
                f"({streamed * payload / 2**30:.2f} GiB) in {where}, copied in twice per forward/backward "
                f"pass while the previous layer computes ({r - 1:+.0%} compute per token)")
    return _lever(plan, recipe, settings, cands, extreme, describe)


def _rank(plan, recipe, settings=None, extreme=False):
    r = recipe.lora.r
    cands = [{"lora.r": r >> i} for i in range(1, r.bit_length()) if r >> i >= 1]
    if not cands:
        return None
    return _lever(plan, recipe, settings, cands, extreme, lambda s, ratio: (
        f"an adapter of rank {s['lora.r']} instead of {r}: fewer trainable parameters "
        f"({ratio - 1:+.0%} compute per token)"))


def _seq(plan, recipe, settings=None, extreme=False):
    n = recipe.data.max_seq_len
    cands = [{"data.max_seq_len": v} for v in sorted({max(64, n * k // 8 // 64 * 64) for k in range(1, 8)}, reverse=True)
             if v < n]
    if not cands:
        return None
    return _lever(plan, recipe, settings, cands, extreme, lambda s, r: (
        f"examples longer than {s['data.max_seq_len']} tokens are truncated (the answer is kept) "
        f"({r - 1:+.0%} compute per token)"))


LEVERS = (_batch, _keep, _checkpointing, _optimizer, _offload, _rank, _seq)
"""The levers, cheapest first (module docstring)."""
