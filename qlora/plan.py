"""Will a recipe fit? Every memory term of a qlora training run, predicted from config.json.

The terms are those of this implementation, not of QLoRA in general (M = batch_size x
max_seq_len tokens, C hidden, F intermediate, V vocabulary, L layers, r LoRA rank):

  runtime            Python + torch on CPU; the CUDA context on a GPU
  weights_4bit       NF4 codes (half a byte per weight) + one scale per 64 weights (8-bit with
                     double quantization, plus fp32 scales of those per 256) of every decoder linear
  embeddings, lm_head, norms   16-bit (compute dtype), never fp32
  lora_factors       A (r x in) and B (out x r) of every adapted linear, in lora.dtype
  lora_grads         as many bytes again; they appear layer by layer during backward
  optimizer_state    Adam's two moments: fp32 (32-bit), or 8-bit with an fp32 scale per 256
                     (bitsandbytes keeps tensors under 4096 elements in fp32); paged optimizers on
                     CUDA put tensors of >= 1e5 elements in unified memory (optimizer_state_paged)
  optimizer_step     temporaries of the update (CPU: fp32 copies of the largest factor or chunk)
  checkpoint_inputs  each decoder layer's input (M x C), kept by gradient checkpointing
  kept_matmuls       outputs of the 4-bit matmuls (and on CPU of attention) of the layers
                     `train.keep_matmuls_gb` buys
  layer_activations  one layer's tensors saved for backward, rebuilt by the recompute (every
                     layer's without checkpointing), and the tensors in flight at its peak
  attention          SDPA's saved q/k/v/output, rotary tables, and masks when batches are padded
                     or packed (then grouped-query K/V are also repeated to every head)
  loss               final norm, the labelled positions' hidden states, one 256-token chunk of
                     logits in fp32 and in the compute dtype (qlora/loss.py)
  matmul_temporaries the 4-bit matmul's dequantized weight: 1024-row/column tiles on CPU
                     (qlora/quant.py) plus the GEMM's packed copies; the whole weight on CUDA
  allocator          CPU: freed heap glibc has not handed back (qlora/memory.py trims it once it
                     grows LAYER_TRIM_BUDGET); CUDA: the caching allocator's unused reserve
  loading            while loading: the checkpoint tensor being read, cast and quantized
  weights_offloaded, offload_ring   model.offload (below)

The peak is the largest of five moments: loading, a layer's forward, the loss, a layer's
backward (under checkpointing it starts by recomputing the layer) and the optimizer step.
Evaluation (no gradients, nothing saved) and sample generation need less than a training step.
Every sequence is taken to be max_seq_len long (packing makes it so; padding to the longest in
a batch can only be shorter).
`Plan.terms` holds what each term contributes at the peak, so they add up to `peak_bytes`.

With model.offload (qlora/offload.py) only the first `resident_layers` layers keep their 4-bit
codes and block scales on the device (weights_4bit); the others' live in the home, host memory
or a file (Plan.offloaded_bytes, on the device only when it is the CPU's own memory:
weights_offloaded), and two of them at a time are on the device while training runs
(offload_ring).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from .config import Recipe
from .errors import QloraError
from .memory import LAYER_TRIM_BUDGET
from .model_shapes import ModelShape, read_shape
from .plan_terms import (Workload, kept_layers, layer_terms, load_terms, offload_home_bytes,
                         optimizer_step_bytes, persistent_terms, resident_layers)

GiB = 2**30
# CUDA: max_memory_reserved over max_memory_allocated, from blocks the caching allocator keeps
# split or cached between steps; an estimate (no GPU measured), applied to what a step
# allocates and frees.
CUDA_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class Device:
    """Where the run would happen and how much memory it has."""

    kind: str
    """'cuda' or 'cpu'."""
    bytes: int
    """Memory the device holds (GPU total, or RAM available)."""
    label: str
    """How to show it, e.g. 'cuda:24GB' or 'cpu (21.3 GiB available)'."""


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(t|tb|tib|g|gb|gib|m|mb|mib)$", re.IGNORECASE)


def parse_device(spec: str | None) -> Device:
    """`cuda:24GB`, `cuda` (this machine's GPU 0), `cpu:24GB` or `cpu` (RAM available now);
    None means where `qlora train` would run. Sizes are binary, the way GPUs and RAM are
    labelled: 24GB = 24 GiB."""
    if spec is None:
        import torch
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, size = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in ("cuda", "cpu"):
        raise QloraError(f"--device: expected cuda, cuda:SIZE, cpu or cpu:SIZE (e.g. cuda:24GB), got {spec!r}")
    if size:
        m = _SIZE.match(size.strip())
        if not m:
            raise QloraError(f"--device: cannot read the size {size!r} (write e.g. 24GB, 80GiB, 512MB)")
        unit = {"t": 2**40, "g": GiB, "m": 2**20}[m.group(2)[0].lower()]
        return Device(kind, int(float(m.group(1)) * unit), f"{kind}:{size.strip()}")
    if kind == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise QloraError("--device cuda: no CUDA device here; give its size, e.g. --device cuda:24GB")
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return Device("cuda", props.total_memory, f"{props.name} ({props.total_memory / GiB:.1f} GiB)")
    available = _available_ram()
    return Device("cpu", available, f"cpu ({available / GiB:.1f} GiB available)")


def _available_ram() -> int:
    """MemAvailable, capped by a cgroup memory limit (containers); total RAM elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


@dataclass
class Plan:
    """A predicted peak, what it is made of, and whether it fits."""

    shape: ModelShape
    workload: Workload
    device: Device
    terms: dict[str, int]
    """Bytes of each term live at the predicted peak; they add up to peak_bytes."""
    phase_bytes: dict[str, int]
    """Predicted peak of each moment: load, forward, loss, backward, optimizer."""
    peak_phase: str
    """The moment of the peak."""
    kept_layers: int
    """Layers whose 4-bit matmul outputs train.keep_matmuls_gb keeps."""
    resident_layers: int
    """Decoder layers whose 4-bit weights stay on the device (all of them without model.offload)."""
    offloaded_bytes: int
    """4-bit codes and scales of the other layers, in model.offload's home (host memory or a file)."""
    advice: list = field(default_factory=list)
    """qlora.plan_advice.Change list when it does not fit (cheapest first)."""

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes[self.peak_phase]

    @property
    def device_bytes(self) -> int:
        return self.device.bytes

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device.bytes


# ----------------------------------------------------------------------------- the peak

def estimate(shape: ModelShape, w: Workload, device: Device) -> Plan:
    """Every term at each moment of a run; the peak is the largest moment."""
    dev, layers = device.kind, shape.layers
    resident = resident_layers(shape, w, dev, device.bytes)
    p = persistent_terms(shape, w, dev, resident)
    s = layer_terms(shape, w, dev)
    k = kept_layers(shape, w, dev)
    frozen = {n: p[n] for n in ("runtime", "weights_4bit", "weights_offloaded", "embeddings", "lm_head", "norms",
                                "lora_factors", "offload_ring")}
    # The optimizer state exists from the first optimizer step on, so every later step's
    # moments carry it.
    state = {"optimizer_state": p["optimizer_state"], "optimizer_state_paged": p["optimizer_state_paged"]}
    recompute = s["layer_saved"] + s["layer_recompute_peak"]
    backward = s["layer_saved"] + s["layer_backward_peak"]
    # The layer's worst moment: the recompute's peak, or its input gradients with the
    # matmul's temporaries.
    at_backward = backward + s["matmul_temporaries"] > recompute

    def moment(**terms: int) -> dict[str, int]:
        return {**frozen, **state, **terms}

    if w.checkpointing:
        forward = moment(checkpoint_inputs=layers * s["checkpoint_input"], kept_matmuls=k * s["kept_matmuls_layer"],
                         layer_activations=s["layer_recompute_peak"], attention=s["attention_step"])
        loss = moment(checkpoint_inputs=layers * s["checkpoint_input"], kept_matmuls=k * s["kept_matmuls_layer"],
                      attention=s["attention_step"], loss=s["loss"])
        worst = max(range(layers), key=lambda i: (i + 1) * s["checkpoint_input"]
                    + min(i + 1, k) * s["kept_matmuls_layer"] + (layers - i) * s["lora_grads_layer"])
        bwd = moment(checkpoint_inputs=(worst + 1) * s["checkpoint_input"],
                     kept_matmuls=min(worst + 1, k) * s["kept_matmuls_layer"],
                     lora_grads=(layers - worst) * s["lora_grads_layer"],
                     layer_activations=backward if at_backward else recompute,
                     attention=s["attention_step"] + s["attention_layer"],
                     matmul_temporaries=s["matmul_temporaries"] if at_backward else 0)
    else:  # every layer's activations stay from its forward to its backward
        forward = moment(layer_activations=(layers - 1) * s["layer_saved"] + s["layer_recompute_peak"],
                         attention=s["attention_step"] + layers * s["attention_layer"])
        loss = moment(layer_activations=layers * s["layer_saved"],
                      attention=s["attention_step"] + layers * s["attention_layer"], loss=s["loss"])
        bwd = moment(layer_activations=(layers - 1) * s["layer_saved"] + backward,
                     lora_grads=s["lora_grads_layer"], attention=s["attention_step"] + layers * s["attention_layer"],
                     matmul_temporaries=s["matmul_temporaries"])
    optimizer = moment(lora_grads=layers * s["lora_grads_layer"],
                       optimizer_step=optimizer_step_bytes(shape, w, dev))
    phases = {"forward": forward, "loss": loss, "backward": bwd, "optimizer": optimizer}
    churn = layers * (s["layer_saved"] + s["layer_recompute_peak"] + s["attention_layer"])
    for terms in phases.values():
        terms["allocator"] = allocator_bytes(terms, dev, churn)
    phases = {"load": load_terms(shape, w, dev, p), **phases}
    totals = {name: sum(t.values()) for name, t in phases.items()}
    peak_phase = max(totals, key=totals.get)
    order = list(TERM_NOTES)
    terms = dict(sorted(phases[peak_phase].items(), key=lambda kv: order.index(kv[0])))
    return Plan(shape=shape, workload=w, device=device, terms=terms, phase_bytes=totals,
                peak_phase=peak_phase, kept_layers=k, resident_layers=resident,
                offloaded_bytes=offload_home_bytes(shape, w, resident))


# Terms that a training step allocates and frees (the rest live the whole run).
STEP_TERMS = ("lora_grads", "optimizer_step", "checkpoint_inputs", "kept_matmuls", "layer_activations",
              "attention", "loss", "matmul_temporaries")
# CPU: glibc keeps what a step frees as holes in its heaps, in each arena that served it (the
# main thread's and the OpenMP workers'), and qlora/memory.py hands them back only once
# resident memory grew LAYER_TRIM_BUDGET past its last trim. The holes come from the layers'
# temporaries, so a step's slack grows with what one pass through the layers churns (layers x
# one layer's saved and in-flight tensors) until the trims cap it. Measured at the peak, above
# the plan's live tensors (benchmarks/plan_vs_measured.py, its "heap slack" column;
# benchmarks/README.md, "qlora plan vs measured"): 0.16-0.29 GB wherever a pass churns >= 0.9
# GB (170M at 1024 tokens, 1.3B, 7B), so the plan takes CPU_HEAP_FILL of the budget (0.20 GB);
# 0.08-0.17 GB (median 0.14) at 170M/256 tokens, which churns 0.22 GB a pass; ~0 at stories260K
# (0.006-0.03 GB a pass). CPU_HEAP_CHURN is the median ratio at 170M/256 (0.14 / 0.22): the
# plan takes the smaller of CPU_HEAP_CHURN x a pass's churn and CPU_HEAP_FILL x the budget.
CPU_HEAP_CHURN = 0.6
CPU_HEAP_FILL = 0.75


def allocator_bytes(terms: dict[str, int], device: str, churn: int) -> int:
    """Memory the allocator holds beyond the live tensors at a step's moment; `churn` is what
    one pass through the decoder layers allocates and frees (CPU only)."""
    if device == "cuda":
        transient = sum(v for n, v in terms.items() if n in STEP_TERMS)
        return int(CUDA_RESERVE_FRACTION * transient)
    return int(min(CPU_HEAP_CHURN * churn, CPU_HEAP_FILL * LAYER_TRIM_BUDGET))


def plan_recipe(recipe: Recipe, device: str | Device | None = None, advise: bool = True) -> Plan:
    """The plan of `recipe` on `device` (a --device string, a Device, or None for where
    `qlora train` would run); with `advise`, the cheapest changes when it does not fit."""
    dev = device if isinstance(device, Device) else parse_device(device)
    shape = read_shape(recipe.model.name_or_path)
    plan = estimate(shape, Workload.from_recipe(recipe), dev)
    if advise and not plan.fits:
        from .plan_advice import advise as _advise
        plan.advice = _advise(plan, recipe)
    return plan


# ----------------------------------------------------------------------------- output

TERM_NOTES = {
    "runtime": {"cpu": "Python, torch and the libraries `qlora train` imports, and the kernels a step maps in",
                "cuda": "CUDA context and cuBLAS workspace (estimate)"},
    "weights_4bit": "frozen decoder linears: 4-bit codes and their quantization constants (resident layers)",
    "weights_offloaded": "offloaded layers' 4-bit codes and scales in host memory (model.offload cpu)",
    "embeddings": "input embeddings (compute dtype)",
    "lm_head": "output head (compute dtype; 0 when tied to the embeddings)",
    "norms": "RMSNorm weights (and q/k/v biases where the model has them)",
    "lora_factors": "LoRA A and B of every adapted linear",
    "lora_grads": "their gradients, present from the layers already through backward",
    "optimizer_state": "Adam moments",
    "optimizer_state_paged": "Adam moments in paged (unified) memory, which the driver may move to RAM",
    "optimizer_step": "temporaries of the optimizer update",
    "checkpoint_inputs": "layer inputs kept by gradient checkpointing",
    "kept_matmuls": "4-bit matmul outputs (on CPU also attention outputs) kept by train.keep_matmuls_gb",
    "layer_activations": "one layer's saved activations and the tensors in flight at its peak",
    "attention": "attention's saved q/k/v/output, rotary tables, masks",
    "loss": "final norm, labelled hidden states and their gradient, one chunk of logits (fp32 + compute dtype)",
    "matmul_temporaries": "the 4-bit matmul's dequantized weight (tiles on CPU) and GEMM copies",
    "offload_ring": "model.offload: the streamed layer in use and the next one, prefetched",
    "allocator": {"cpu": "freed heap not yet returned to the OS (qlora/memory.py trims it past a budget)",
                  "cuda": "caching allocator's reserve beyond live tensors (estimate)"},
    "loading": "largest checkpoint tensor being read and quantized",
}
"""What each term is, in the order the breakdown lists them."""


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def render(plan: Plan, name: str) -> str:
    """The plan as a table for people."""
    s, w, dev = plan.shape, plan.workload, plan.device
    params = s.layers * sum(o * i for o, i in s.linears().values()) + s.vocab * s.hidden * (1 if s.tied_embeddings else 2)
    lines = [f"qlora plan: {name} on {dev.label}",
             f"model: {s.source}: {s.layers} layers, hidden {s.hidden}, FFN {s.intermediate}, "
             f"{s.heads} heads ({s.kv_heads} kv), vocab {s.vocab}, {params / 1e9:.2f}B parameters",
             f"run: batch {w.batch_size} x {w.max_seq_len} tokens, LoRA r {w.r} on {len(w.targets)} linears "
             f"per layer, {w.optimizer}, checkpointing {'on' if w.checkpointing else 'off'}"
             + (f", matmul outputs kept in {plan.kept_layers} layers" if plan.kept_layers else ""),
             *_offload_lines(plan), "", f"{'term':24s} {'GiB':>7s}  at the peak ({plan.peak_phase})"]
    for term, size in plan.terms.items():
        if size == 0:
            continue
        note = TERM_NOTES.get(term, "")
        note = note.get(dev.kind, "") if isinstance(note, dict) else note
        lines.append(f"{term:24s} {_gib(size):>7s}  {note}")
    verdict = (f"fits ({_gib(plan.device_bytes - plan.peak_bytes)} GiB to spare)" if plan.fits
               else f"does NOT fit ({_gib(plan.peak_bytes - plan.device_bytes)} GiB short)")
    lines += [f"{'peak':24s} {_gib(plan.peak_bytes):>7s}  of {_gib(plan.device_bytes)} GiB: {verdict}",
              "moments: " + ", ".join(f"{k} {_gib(v)}" for k, v in plan.phase_bytes.items()) + " GiB"]
    if not plan.fits:
        if plan.advice:
            lines += ["", "cheapest changes that fit:"]
            for change in plan.advice:
                lines.append(f"  {change.overrides}  -> peak {_gib(change.peak_bytes)} GiB; {change.cost}")
        else:
            lines += ["", "no change of batch size, kept matmuls, checkpointing, optimizer, offload, rank "
                          "or sequence length makes it fit; use a larger device"]
    return "\n".join(lines)


def _offload_lines(plan: Plan) -> list[str]:
    w, layers = plan.workload, plan.shape.layers
    if w.offload == "none":
        return []
    home = {"cpu": "host memory", "disk": "a file (model.offload_dir)"}[w.offload]
    streamed = layers - plan.resident_layers
    if not streamed:
        return [f"offload: {w.offload}, but all {layers} layers stay resident (model.resident_layers "
                f"{w.resident_layers})"]
    return [f"offload: layers {plan.resident_layers}-{layers - 1} ({streamed} of {layers}) stream their 4-bit "
            f"weights from {home}, which holds {_gib(plan.offloaded_bytes)} GiB of them"]


def to_json(plan: Plan) -> dict:
    """The plan for tools: peak_bytes, device_bytes, fits and terms (name -> bytes) first."""
    return {"peak_bytes": plan.peak_bytes, "device_bytes": plan.device_bytes, "fits": plan.fits,
            "terms": plan.terms, "peak_phase": plan.peak_phase, "phases": plan.phase_bytes,
            "device": {"kind": plan.device.kind, "label": plan.device.label},
            "model": dataclasses.asdict(plan.shape), "workload": dataclasses.asdict(plan.workload),
            "kept_layers": plan.kept_layers, "resident_layers": plan.resident_layers,
            "offloaded_bytes": plan.offloaded_bytes,
            "advice": [{"set": c.settings, "peak_bytes": c.peak_bytes, "cost": c.cost} for c in plan.advice]}


def verdict(plan: Plan, name: str) -> str:
    """One line for `qlora train` when the recipe cannot fit."""
    line = (f"{name} needs ~{_gib(plan.peak_bytes)} GiB at its {plan.peak_phase} peak but {plan.device.label} "
            f"holds {_gib(plan.device_bytes)} GiB (qlora plan)")
    if plan.advice:
        best = plan.advice[0]
        line += f"; e.g. {best.overrides} ({_gib(best.peak_bytes)} GiB)"
    return line + f"; `qlora plan {name}` lists the terms and changes; --force trains anyway"


def check_fits(recipe: Recipe, device, processes: int = 1) -> None:
    """Stop `qlora train` before loading when the plan says `recipe` cannot fit `device` (a
    torch.device). Processes on one CPU share its RAM; each GPU process has its own device.
    A model the plan cannot read (not Llama-style, config unreachable) trains unchecked, with
    a note saying so."""
    import sys
    if device.type == "cuda":
        import torch
        props = torch.cuda.get_device_properties(device.index if device.index is not None
                                                 else torch.cuda.current_device())
        dev = Device("cuda", props.total_memory, f"{props.name} ({props.total_memory / GiB:.1f} GiB)")
    else:
        available = _available_ram() // processes
        dev = Device("cpu", available, f"this machine's RAM ({available / GiB:.1f} GiB available"
                     + (f" to each of {processes} processes)" if processes > 1 else ")"))
    name = recipe.source or "the recipe"
    try:
        plan = plan_recipe(recipe, dev)
    except QloraError as e:
        print(f"qlora: memory not checked before loading ({e})", file=sys.stderr)
        return
    if not plan.fits:
        raise QloraError(verdict(plan, name))
