"""The size of every memory term of a qlora training run, from a model's shape and a recipe.

qlora/plan.py puts them together into the peak (its docstring lists the terms); each function
here is one term, written from the code that allocates it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Recipe
from .cpu_adam import CHUNK as ADAM_CHUNK
from .errors import QloraError
from .loss import CHUNK_TOKENS
from .model_shapes import LAYER_LINEARS, ModelShape
from .offload import layer_payload_bytes, resident_within
from .optim import PAGED_MIN_NUMEL
from .attention import attention_output_bytes, repeats_kv
from .cpu_matmul import _tile_height
from .quant import BLOCKSIZE

ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}

# CPU: resident memory of a process that has imported what `qlora train` imports (0.49 GB),
# and what training a model of negligible size adds to it (stories260K, whole runs of
# 0.54-0.57 GB): the kernels and thread pools the first step maps in. Measured by
# benchmarks/plan_vs_measured.py (benchmarks/README.md, "qlora plan vs measured").
CPU_IMPORTS = 490 * 10**6
CPU_TRAINING_RUNTIME = 55 * 10**6
# CUDA: the context (kernels of torch, cuBLAS, bitsandbytes) and cuBLAS workspaces take device
# memory outside torch's allocator; ~0.5 GiB on recent GPUs with lazy module loading. Not
# measured here (no GPU): an estimate.
CUDA_CONTEXT = 2**29
TILE = _tile_height(BLOCKSIZE)  # rows quantized at once while loading on CPU (qlora/cpu_matmul.py)
BITSANDBYTES_MIN_8BIT = 4096  # bitsandbytes keeps smaller tensors' state in fp32 (min_8bit_size)
# qlora.offload.LayerStreamer holds two payload buffers on the device once training runs: the
# layer in use and the next one, being prefetched (on CPU a free list of two, reused).
RING_BUFFERS = 2


@dataclass(frozen=True)
class Workload:
    """What of a recipe its memory depends on (see qlora.config for each key's meaning)."""

    batch_size: int
    """train.batch_size: sequences per forward/backward pass."""
    grad_accum: int
    """train.grad_accum (only the advice uses it: it keeps batch_size x grad_accum)."""
    max_seq_len: int
    """data.max_seq_len: the plan assumes every sequence is this long (packing makes it so)."""
    masked: bool
    """Attention gets a mask: padded batches (batch_size > 1) or packed documents."""
    r: int
    """lora.r."""
    targets: tuple[str, ...]
    """Adapted leaf names of one decoder layer (lora.targets resolved)."""
    dropout: bool
    """lora.dropout > 0: the adapters save a mask and a dropped copy of their input."""
    shared_inputs: bool
    """lora.fuse_shared_inputs: q/k/v and gate/up adapters save one dropped input per group."""
    lora_itemsize: int
    """Bytes per LoRA parameter (lora.dtype)."""
    compute_itemsize: int
    """Bytes per activation and 16-bit weight (model.compute_dtype)."""
    quantization: str
    """model.quantization: nf4, fp4 or none (16-bit base linears)."""
    double_quant: bool
    """model.double_quant."""
    optimizer: str
    """train.optimizer."""
    checkpointing: bool
    """train.gradient_checkpointing."""
    keep_matmuls_gb: float
    """train.keep_matmuls_gb."""
    offload: str = "none"
    """model.offload: none, cpu or disk (where offloaded layers' 4-bit codes live)."""
    resident_layers: int | str = "auto"
    """model.resident_layers: the first N layers stay on the device; 'auto' as the loader picks."""

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> Workload:
        m, lo, d, t = recipe.model, recipe.lora, recipe.data, recipe.train
        targets = LAYER_LINEARS if lo.targets == "all-linear" else tuple(
            n for n in LAYER_LINEARS if n in lo.targets)
        unknown = [n for n in ([] if lo.targets == "all-linear" else lo.targets) if n not in LAYER_LINEARS]
        if unknown:
            raise QloraError(f"lora.targets: '{unknown[0]}' is not a linear of a Llama-style layer "
                             f"({', '.join(LAYER_LINEARS)})")
        return cls(batch_size=t.batch_size, grad_accum=t.grad_accum, max_seq_len=d.max_seq_len,
                   masked=t.batch_size > 1 or d.packing, r=lo.r, targets=targets, dropout=lo.dropout > 0,
                   shared_inputs=lo.fuse_shared_inputs,
                   lora_itemsize=ITEMSIZE[lo.resolved_dtype()],
                   compute_itemsize=ITEMSIZE[m.compute_dtype],
                   quantization=m.quantization, double_quant=m.double_quant, optimizer=t.optimizer,
                   checkpointing=t.gradient_checkpointing, keep_matmuls_gb=t.keep_matmuls_gb,
                   offload=m.offload if m.quantization != "none" else "none",
                   resident_layers=m.resident_layers)

    @property
    def tokens(self) -> int:
        return self.batch_size * self.max_seq_len


def quantized_linear_parts(out_features: int, in_features: int, double_quant: bool) -> tuple[int, int]:
    """Bytes of one 4-bit linear as bitsandbytes stores it (blocksize 64), in two parts:
    the packed codes (two per byte) and one scale per block (fp32, or uint8 with double
    quantization), which model.offload moves off the device; and the rest of its QuantState,
    which stays: the 16-entry fp32 code table and, with double quantization, per 256 blocks
    an fp32 scale, a 0-dim fp32 offset and a copy of the 256-entry fp32 map (bitsandbytes
    copies it into every QuantState)."""
    n = out_features * in_features
    blocks = -(-n // BLOCKSIZE)
    streamed = n // 2 + (blocks if double_quant else 4 * blocks)
    kept = 16 * 4 + (4 * -(-blocks // 256) + 4 + 256 * 4 if double_quant else 0)
    return streamed, kept


def quantized_linear_bytes(out_features: int, in_features: int, double_quant: bool) -> int:
    """All bytes of one 4-bit linear (`quantized_linear_parts`)."""
    return sum(quantized_linear_parts(out_features, in_features, double_quant))


def layer_payload(shape: ModelShape, w: Workload) -> int:
    """Bytes of one decoder layer's offload payload (qlora.offload's layout: its linears'
    codes and block scales in 64-byte aligned slots): the unit of the home and the ring."""
    return layer_payload_bytes([o * i for o, i in shape.linears().values()], w.double_quant, BLOCKSIZE)


def resident_layers(shape: ModelShape, w: Workload, device: str, device_bytes: int) -> int:
    """Decoder layers whose 4-bit weights stay on the device: all without model.offload;
    else model.resident_layers, or for 'auto' the loader's rule (qlora.offload.resident_within)
    on what the device has free once the runtime is up, after the 16-bit embeddings and head."""
    if w.offload == "none":
        return shape.layers
    if w.resident_layers != "auto":
        return max(0, min(shape.layers, int(w.resident_layers)))
    runtime = CPU_IMPORTS if device == "cpu" else CUDA_CONTEXT
    other = (shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2) + shape.hidden) * w.compute_itemsize
    return resident_within(device_bytes - runtime, device_bytes, shape.layers, layer_payload(shape, w), other)


def offload_home_bytes(shape: ModelShape, w: Workload, resident: int) -> int:
    """Bytes the offloaded layers' payloads take in their home (host memory or a file)."""
    return (shape.layers - resident) * layer_payload(shape, w)


def optimizer_state_bytes(numel: int, optimizer: str, lora_itemsize: int) -> int:
    """Adam state of one parameter tensor for a recipe's train.optimizer."""
    if optimizer == "adamw_torch":
        return 2 * numel * lora_itemsize + 4  # exp_avg, exp_avg_sq in the parameter's dtype; step
    if optimizer.endswith("8bit") and numel >= BITSANDBYTES_MIN_8BIT:
        return 2 * numel + 2 * 4 * -(-numel // 256)  # uint8 moments, an fp32 absmax per 256
    return 2 * 4 * numel  # fp32 moments


def lora_tensors(shape: ModelShape, w: Workload) -> list[int]:
    """Element counts of every LoRA factor (A and B of every adapted linear, all layers)."""
    per_layer = []
    for name in w.targets:
        out_f, in_f = shape.linears()[name]
        per_layer += [w.r * in_f, out_f * w.r]
    return per_layer * shape.layers


def kept_output_bytes(shape: ModelShape, w: Workload, device: str) -> int:
    """Bytes one kept layer costs (qlora.checkpointing.kept_output_bytes): its 4-bit matmul
    outputs, and on CPU its attention output (counted also when a mask sends attention to
    transformers' sdpa, which keeps nothing: the budget buys the same layers either way)."""
    if w.quantization == "none":
        return 0
    lin = shape.linears()
    kept = w.tokens * sum(o for o, _ in lin.values()) * w.compute_itemsize
    if device == "cpu":
        kept += attention_output_bytes(w.tokens, lin["q_proj"][0], shape.heads, w.compute_itemsize)
    return kept


def kept_layers(shape: ModelShape, w: Workload, device: str) -> int:
    """Layers train.keep_matmuls_gb buys, by the trainer's own rule."""
    from .checkpointing import layers_within_budget
    if not w.checkpointing:
        return 0
    return layers_within_budget(kept_output_bytes(shape, w, device), shape.layers, w.keep_matmuls_gb)


def persistent_terms(shape: ModelShape, w: Workload, device: str, resident: int | None = None) -> dict[str, int]:
    """Terms that live from loading (or from the first optimizer step) to the end; with
    model.offload, the first `resident` layers' weights stay on the device."""
    a, c, lin = w.compute_itemsize, shape.hidden, shape.linears()
    resident = shape.layers if resident is None else resident
    if w.quantization == "none":
        weights = sum(o * i * a for o, i in lin.values()) * shape.layers
    else:
        parts = [quantized_linear_parts(o, i, w.double_quant) for o, i in lin.values()]
        weights = sum(map(sum, parts)) * resident + sum(k for _, k in parts) * (shape.layers - resident)
    streamed = resident < shape.layers
    # The home counts against this device only when it is this device's memory (offload cpu
    # on a CPU run).
    home = offload_home_bytes(shape, w, resident) if device == "cpu" and w.offload == "cpu" else 0
    norms = (2 * c + (2 * shape.head_dim if shape.qk_norm else 0)) * shape.layers + c
    biases = (lin["q_proj"][0] + 2 * lin["k_proj"][0]) if shape.qkv_bias else 0
    factors = lora_tensors(shape, w)
    paged = w.optimizer.startswith("paged") and device == "cuda"
    state = [optimizer_state_bytes(n, w.optimizer, w.lora_itemsize) for n in factors]
    paged_state = sum(s for n, s in zip(factors, state) if paged and n >= PAGED_MIN_NUMEL)
    return {
        "runtime": CPU_IMPORTS + CPU_TRAINING_RUNTIME if device == "cpu" else CUDA_CONTEXT,
        "weights_4bit": weights,
        "weights_offloaded": home,
        "offload_ring": RING_BUFFERS * layer_payload(shape, w) if streamed else 0,
        "embeddings": shape.vocab * c * a,
        "lm_head": 0 if shape.tied_embeddings else shape.vocab * c * a,
        "norms": (norms + biases * shape.layers) * a,
        "lora_factors": sum(factors) * w.lora_itemsize,
        "optimizer_state": sum(state) - paged_state,
        "optimizer_state_paged": paged_state,
    }


def layer_terms(shape: ModelShape, w: Workload, device: str) -> dict[str, int]:
    """Per-layer and per-step sizes of the training step (see the module docstring)."""
    a, la, m, r = w.compute_itemsize, w.lora_itemsize, w.tokens, w.r
    c, f, lin = shape.hidden, shape.intermediate, shape.linears()
    q, kv = lin["q_proj"][0], lin["k_proj"][0]
    # The adapters' saved inputs: with dropout the mask (in the LoRA dtype:
    # qlora.lora.drop_unscaled) and the dropped copy; without, the input
    # itself, shared by adapters reading the same tensor. Each adapter saves its own, except
    # that with lora.fuse_shared_inputs a q/k/v or gate/up group saves one (lora.SharedInput).
    groups = {("q_proj", "k_proj", "v_proj"): c, ("o_proj",): q, ("gate_proj", "up_proj"): c,
              ("down_proj",): f}
    adapter_saved = {}
    for names, width in groups.items():
        mine = [n for n in names if n in w.targets]
        copies = 1 if (w.shared_inputs and len(mine) > 1) else len(mine)
        if w.dropout and mine:
            per = m * width * 2 * la
            adapter_saved.update({n: per if i < copies else 0 for i, n in enumerate(mine)})
        elif mine:  # one shared tensor when it already has the LoRA dtype, else a cast per copy
            adapter_saved[mine[0]] = m * width * (a if la == a else la * copies)
        if mine and copies == 1 and len(mine) > 1:  # the group's stacked A factors, (n*r, in)
            adapter_saved[mine[0]] += len(mine) * r * width * la
    if not w.dropout and la == a and "o_proj" in w.targets:
        adapter_saved["o_proj"] = 0  # o_proj's input is attention's output, saved below already
    lora_mid = len(w.targets) * m * r * la  # A(x) * scaling, saved by B
    norms = 2 * m * (c * 4 + 4) + (m * (q + kv) * 4 if shape.qk_norm else 0)  # RMSNorm: fp32 copy, 1/rms
    mlp = 3 * m * f * a  # gate output (SiLU's input), SiLU output, up output (the product's inputs)
    saved = norms + sum(adapter_saved.values()) + lora_mid + mlp

    # SDPA's saved tensors: q, k, v (k and v repeated to every head when a mask rules out
    # grouped-query SDPA, or on CPU where qlora.attention repeats them), output, fp32
    # logsumexp; with a mask, its per-layer 16-bit copy.
    repeated = w.masked or (device == "cpu" and repeats_kv(w.batch_size, shape.heads, shape.kv_heads))
    kv_saved = q if (repeated and kv < q) else kv
    attention_layer = m * (2 * q + 2 * kv_saved) * a + w.batch_size * shape.heads * w.max_seq_len * 4
    if w.masked:
        attention_layer += w.batch_size * w.max_seq_len ** 2 * a
    # Once per step: the rotary cos/sin every layer reads, and the boolean mask.
    attention_step = 2 * m * shape.head_dim * a + (w.batch_size * w.max_seq_len ** 2 if w.masked else 0)

    # In flight at the recompute's peak (down_proj's dropout draw): the random bits (on CPU
    # numpy's uint64 words, 16 bits per element), the product it is drawn for, the residual,
    # the normed MLP input, and the gradient arriving from the layer above. down's output
    # comes after the draw: the adapter's input side runs before the 4-bit matmul it joins.
    in_flight = m * c * a * 3
    if w.dropout:
        in_flight += (2 * m * f if device == "cpu" else 0) + m * f * a
    elif "gate_proj" not in w.targets and "up_proj" not in w.targets:
        in_flight += m * c * a
    # At down_proj's input gradient instead: down's saved input is released, the base and
    # LoRA input gradients exist, plus the matmul's temporaries.
    down_saved = adapter_saved.get("down_proj", 0)
    grads_in_flight = m * c * a + m * f * (a + la) - down_saved
    return {
        "layer_saved": saved,
        "layer_recompute_peak": in_flight,
        "layer_backward_peak": grads_in_flight,
        "attention_layer": attention_layer,
        "attention_step": attention_step,
        "checkpoint_input": m * c * a,
        "kept_matmuls_layer": kept_output_bytes(shape, w, device),
        "lora_grads_layer": sum(lora_tensors(shape, w)) // shape.layers * la,
        "matmul_temporaries": matmul_temporaries(shape, w, device),
        "loss": loss_bytes(shape, w),
    }


def matmul_temporaries(shape: ModelShape, w: Workload, device: str) -> int:
    """The largest 4-bit matmul's temporaries in backward (its input gradient).

    CPU (qlora/cpu_matmul.py): an n-row column tile of the dequantized weight, the tile's codes
    and scales gathered, the weight's fp32 scales, plus the GEMM's packed copies of the tile
    and of the incoming gradient (oneDNN repacks bf16 operands). CUDA: the whole weight
    dequantized to the compute dtype, and its fp32 scales.
    """
    if w.quantization == "none":
        return 0
    a, worst = w.compute_itemsize, 0
    for n, k in shape.linears().values():
        scales = n * k // 64 * 4
        if device == "cpu":
            cols = min(k, _tile_height(BLOCKSIZE, n))  # this CPU's column tile
            size = 2 * n * cols * a + n * cols // 2 + n * cols // 64 * 4 + scales + w.tokens * n * a
        else:
            size = n * k * a + scales
        worst = max(worst, size)
    return worst


def loss_bytes(shape: ModelShape, w: Workload) -> int:
    """qlora/loss.py at its peak, one chunk of the head in forward (its gradient is taken
    there): the final norm's saved fp32 input and its output, the labelled positions' hidden
    states gathered (and their gradient), the gather's int64 indices, and the chunk's fp32
    logits beside their compute-dtype copy (the head's output, then the softmax's cast)."""
    m, c, a = w.tokens, shape.hidden, w.compute_itemsize
    labelled = w.batch_size * (w.max_seq_len - 1)
    chunk = min(CHUNK_TOKENS, labelled)
    return m * (c * 4 + 4) + m * c * a + 2 * labelled * c * a + 16 * labelled + chunk * shape.vocab * (4 + a)


def optimizer_step_bytes(shape: ModelShape, w: Workload, device: str) -> int:
    """Temporaries of one optimizer step. torch's AdamW (foreach) holds one extra copy of all
    state-sized tensors; bitsandbytes on CPU works one tensor at a time in fp32 (gradient,
    parameter, both moments dequantized, update: 5 copies), and its 8-bit AdamW through
    qlora.cpu_adam one chunk at a time: consecutive small factors packed up to ADAM_CHUNK
    elements (the same 5 fp32 copies; the chunk gathered, 2 + 2 bytes of gradient and
    parameter and 1 + 1 of codes; the requantized codes, 1 + 1; and the block scales, 6 fp32
    per 256 elements as measured); its CUDA kernels need none."""
    factors = lora_tensors(shape, w)
    if w.optimizer == "adamw_torch":
        return sum(factors) * w.lora_itemsize
    if device != "cpu":
        return 0
    if w.optimizer.endswith("8bit"):
        n = min(sum(factors), ADAM_CHUNK)
        return (5 * 4 + 8) * n + 6 * 4 * -(-n // 256)
    return 5 * 4 * max(factors)


def load_terms(shape: ModelShape, w: Workload, device: str, persistent: dict[str, int]) -> dict[str, int]:
    """The loading moment: every frozen weight in place (on CPU before any training step: the
    bare runtime), plus `loading`, what qlora.model's streaming loader holds on top.

    CPU: the largest checkpoint tensor as read (stored dtype) and cast (compute dtype), or
    the tiled quantizer's temporaries (~7x a TILE-row bf16 tile of the widest weight,
    qlora.quant.quantize_4bit) on top of the largest linear. CUDA: tensors are read into host
    memory; the device holds the largest linear in the compute dtype while it is quantized,
    and its 4-bit tiles twice (the tiles, then their concatenation).
    """
    a, stored = w.compute_itemsize, ITEMSIZE.get(shape.checkpoint_dtype, 2)
    linears = shape.linears().values()
    largest_linear = max(o * i for o, i in linears)
    if device == "cpu":
        cast = a if stored != a else 0
        quantizer = 7 * TILE * max(i for _, i in linears) * 2 if w.quantization != "none" else 0
        loading = max(shape.vocab * shape.hidden * (stored + cast), largest_linear * (stored + cast) + quantizer)
    else:
        loading = largest_linear * a + (largest_linear if w.quantization != "none" else 0)
    terms = {n: persistent[n] for n in ("runtime", "weights_4bit", "weights_offloaded", "embeddings", "lm_head",
                                        "norms")}
    if device == "cpu":
        terms["runtime"] = CPU_IMPORTS
    terms["loading"] = loading
    return terms
