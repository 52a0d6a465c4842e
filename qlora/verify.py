"""Check an export against the adapter on its 4-bit base, one decoder layer at a time.

    report = verify_export(src, exported=TensorReader(files), out_dtype=torch.float16)

A fixed batch of token ids goes through four streams, layer by layer:

    reference  the 4-bit base plus LoRA, exactly the weights training optimized
    base       the same 4-bit layers without LoRA (what the adapter changes is reference - base)
    exported   the exported weights, as transformers runs them
    fp16       the exported weights computed in float16 (only for --dtype fp16)

The first three compute in fp32 (4-bit weights dequantize to fp32, every other weight is
upcast exactly), so the only difference left between reference and exported is the export's
own: one rounding of each merged weight to fp16/bf16. bf16 *activations*, as training runs
them, would move a small model's logits by 1-2% of their scale and hide a wrong merge.

Each layer is built from the checkpoints when its turn comes (the 4-bit one quantized from
the base checkpoint as `load_model` does, the exported one read from `exported`, a function
`tensor name -> tensor`, so any format that can be read back tensor by tensor plugs in) and
freed after, so peak memory is about one layer plus activations whatever the depth. Layer
k's exported copy runs on the *reference* input of layer k (its error, relative to what the
adapter changes in that layer, is reported and enforced: a delta missing in one layer of 80
barely moves the logits) and on its own stream (the end-to-end logits). The decoder layers
are the model's own modules, called with the arguments the model itself computes for them
(masks, rotary embeddings), captured by running its forward with stand-ins for the layers.

Tolerances are relative to what the adapter changes, |logits(adapter) - logits(base)| and
its counterpart at every layer, not to the logits' scale: a trained adapter can move logits
by less than 1% of their scale, so a scale-relative tolerance lets "forgot the delta" pass.
Two numbers per comparison must stay within VERIFY_RTOL (see _Check): the RMS error as a
fraction of the RMS change, and the error's projection on the change (-1: delta missing,
+0.1: delta scaled by 1.1), which rounding noise averages out of.

In the fp16 stream every module's output is checked: an activation beyond float16's range
(65504) fails, naming the module, with the advice to export bf16 (bf16 has fp32's range).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import quant
from .adapter import AdapterFactors, factor_dtype, read_adapter_config
from .base_checkpoint import BaseCheckpoint
from .dtypes import dtype_name
from .errors import QloraError
from .lora import LoRALinear, add_lora, lora_layers
from .memory import release_freed_memory
from .model import _set_tensor, build_skeleton, decoder_layers, place_tensor, resolve_device
from .safetensors_io import TensorReader, checkpoint_files

VERIFY_PROMPTS = 3  # sequences of random token ids ...
VERIFY_TOKENS = 32  # ... of this length
# Tolerance of both checks, at the logits and at every layer's output. With the adapter that
# tests/test_verify.py trains (8 steps on stories260K), the correct fp16 export's errors are
# under 0.8% of what the adapter changes and its projections within 0.1% (bf16: errors under
# 6.2% but under the bf16 rounding floor, projections within 1%); one module's delta left out
# carries 82% of its layer's change, a delta scaled by 1.1 carries 108-110%, a missing one 0%.
VERIFY_RTOL = 0.05
FP16_MAX = 65504.0


@dataclasses.dataclass
class _Streams:
    """Hidden states (B, T, C) of each stream at the current layer boundary."""
    reference: torch.Tensor
    base: torch.Tensor
    exported: torch.Tensor
    fp16: torch.Tensor | None


def verify_export(src, exported: Callable[[str], torch.Tensor], out_dtype: torch.dtype, *,
                  device=None, rtol: float | None = VERIFY_RTOL) -> dict:
    """Compare `exported` (checkpoint tensor name -> the exported tensor, in `out_dtype`) with
    `src`'s adapter on its base, on `device` (default: CUDA when available).

    `src` is a `resolve.ModelSource` with an adapter. `rtol` None reports without enforcing
    (exports merged into the original weights are expected to differ). Raises QloraError
    naming the failure; returns the report dict otherwise.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    q = src.quant
    base = BaseCheckpoint(src.model, q.compute_dtype)
    factors = AdapterFactors(src.adapter)
    settings, _ = read_adapter_config(src.adapter)
    # Reference: the 4-bit skeleton plus LoRA as the adapter describes it. Exported: the same
    # architecture with plain linears in the output dtype. Both hold no weights yet.
    ref, quantized = build_skeleton(src.model, q.quantization, q.double_quant, q.compute_dtype)
    add_lora(ref, dataclasses.replace(settings, dtype=factor_dtype(factors.dtype)))
    exp, _ = build_skeleton(src.model, "none", compute_dtype=out_dtype)
    for model in (ref, exp):
        model.eval()  # LoRA dropout off
        _buffers_to(model, device)
    ref_layers, exp_layers = decoder_layers(ref), decoder_layers(exp)
    prefix = _name_of(ref, ref_layers)
    fp16 = out_dtype == torch.float16
    eps = torch.finfo(out_dtype).eps  # the export's own rounding: see _Check

    def ref_name(name):  # checkpoint name -> the reference's (adapted weights sit in `base_layer`)
        owner, _, leaf = name.rpartition(".")
        return f"{owner}.base_layer.{leaf}" if isinstance(ref.get_submodule(owner), LoRALinear) else name

    quantized = {ref_name(n) for n in quantized}

    def place_ref(names):
        for name in names:
            if name in base.packed:  # a pre-quantized base: its own codes, as training loaded them
                module = ref.get_submodule(ref_name(name).removesuffix(".weight"))
                quant.set_packed_weight(module, *base.packed_weight(name, device))
            else:
                place_tensor(ref, ref_name(name), base(name), quantized, q.compute_dtype, device)
        _upcast_reference(ref)

    def place_exp(names):
        for name in names:
            _set_tensor(exp, name, exported(name).to(device))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (VERIFY_PROMPTS, VERIFY_TOKENS), generator=g).to(device)
    emb = _name_of(ref, ref.get_input_embeddings()) + ".weight"
    with torch.no_grad():
        place_ref([emb])
        h_ref, kw_ref = _capture(ref, ids)
        _free(ref, [emb])
        place_exp([emb])
        with _computing_in_fp32(exp.get_input_embeddings()):
            h_exp, kw_exp = _capture(exp, ids)
        h16, kw16 = _capture(exp, ids) if fp16 else (None, None)
        _free(exp, [emb])
        streams = _Streams(h_ref, h_ref, h_exp, h16)

        layers, fp16_peak = [], 0.0
        for k in range(len(ref_layers)):
            names = _param_names(exp_layers[k], f"{prefix}.{k}.")  # checkpoint names
            place_ref(names)
            _place_lora(ref_layers[k], factors, f"{prefix}.{k}.", device)
            want = _run(ref_layers[k], streams.reference, kw_ref[k])
            with _without_lora(ref_layers[k]):
                streams.base = _run(ref_layers[k], streams.base, kw_ref[k])
                unadapted = _run(ref_layers[k], streams.reference, kw_ref[k])
            _drop(ref_layers, k)

            place_exp(names)
            with _computing_in_fp32(exp_layers[k]):
                got = _run(exp_layers[k], streams.reference, kw_exp[k])
                streams.exported = _run(exp_layers[k], streams.exported, kw_exp[k])
            if fp16:
                streams.fp16, peak = _run_checked(exp_layers[k], streams.fp16, kw16[k], f"{prefix}.{k}")
                fp16_peak = max(fp16_peak, peak)
            _drop(exp_layers, k)
            layers.append(_Check(f"{prefix}.{k}", got, want, unadapted, eps))
            streams.reference = want

        tail = [n for n in _param_names(exp, "") if not n.startswith(prefix + ".") and n != emb]
        place_ref(tail + ([emb] if _tied(ref) else []))
        _tie(ref)
        logits_ref = _logits(ref, ref_layers, streams.reference)
        logits_base = _logits(ref, ref_layers, streams.base)
        _free(ref, tail + [emb])
        place_exp(tail + ([emb] if _tied(exp) else []))
        _tie(exp)
        with _computing_in_fp32(exp):
            logits_exp = _logits(exp, exp_layers, streams.exported)
        if fp16:
            logits16 = _logits(exp, exp_layers, streams.fp16)
            if not torch.isfinite(logits16).all():
                raise _overflow(_name_of(exp, exp.get_output_embeddings()), float("inf"))
            fp16_peak = max(fp16_peak, logits16.abs().max().item())
        _free(exp, tail + [emb])

    checks = [_Check("logits", logits_exp, logits_ref, logits_base, eps), *layers]
    worst = max(layers, key=lambda c: c.error)
    report = {
        "verified": rtol is not None, "relative_error": checks[0].error,
        "scale_error": checks[0].scale_error, "tolerance": rtol,
        "layer_errors": [c.error for c in layers], "layer_scale_errors": [c.scale_error for c in layers],
        "worst_layer": worst.stage,
        "max_logit_diff": (logits_exp - logits_ref).abs().max().item(),
        "adapter_logit_change": (logits_ref - logits_base).abs().max().item(),
        "max_abs_logit": logits_ref.abs().max().item(),
        "argmax_agreement": (logits_exp.argmax(-1) == logits_ref.argmax(-1)).float().mean().item(),
        "fp16_max_activation": fp16_peak if fp16 else None,
        "verify_seconds": round(time.perf_counter() - t0, 3),
    }
    failed = [c for c in (*layers, checks[0]) if not c.passes(rtol)] if rtol is not None else []
    if failed:
        c = failed[0]  # the first layer that went wrong, else the logits
        hint = ""
        if -1 + rtol < c.scale_error < -rtol and c.diff <= c.floor:  # partly lost, within rounding
            hint = (f" (the {dtype_name(out_dtype)} weights round away updates this small next to the "
                    "weights" + ("; export with --dtype fp16" if out_dtype == torch.bfloat16 else "") + ")")
        raise QloraError(
            f"{src.adapter}: verification failed at {c.stage}: the export differs from the adapter "
            f"on its {q.quantization} base by {c.error:.1%} of what the adapter changes there, "
            f"and carries {1 + c.scale_error:.1%} of that change (tolerance {rtol:.0%}){hint}; "
            "nothing was written")
    return report


class _Check:
    """One comparison (a layer's output, or the logits) of the export with the adapter.

    error: RMS(got - want) / RMS(what the adapter changes, want - unadapted);
    scale_error: the projection of (got - want) on that change: -1 when the delta is
      missing, +0.1 when it is scaled by 1.1. Rounding noise is uncorrelated with the
      change, so it averages out of this one: it tests the delta's presence and scale far
      more sharply than `error` can when the adapter's effect is small.
    floor: the output dtype's epsilon times RMS(want): rounding every weight to that
      precision moves the output by less (measured: ~5x less), so `error` passes under it
      even when the adapter's change is tiny (B = 0 changes nothing at all). The projection
      is always checked: an export that rounds away part of the adapter's updates (bf16 does
      with a weakly trained adapter: measured -0.10 to -0.27) does not carry the adapter.
    """
    stage: str
    error: float
    scale_error: float
    change: float
    floor: float
    diff: float

    def __init__(self, stage, got, want, unadapted, eps):
        err, change = (got - want).double(), (want - unadapted).double()
        self.stage, self.diff, self.change = stage, _rms(err), _rms(change)
        self.floor = eps * _rms(want)
        norm = (change * change).sum().item()
        self.scale_error = (err * change).sum().item() / norm if norm > 0 else 0.0
        self.error = self.diff / self.change if self.change > 0 else (0.0 if self.diff == 0 else float("inf"))

    def passes(self, rtol: float) -> bool:
        return self.diff <= max(rtol * self.change, self.floor) and abs(self.scale_error) <= rtol


# --------------------------------------------------------------------------- running layers


class _StandIn(nn.Module):
    """Takes a decoder layer's place in the model's forward; attributes the model's loop reads
    from a layer (e.g. `attention_type`) come from the layer it stands in for."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_layer", layer)  # not a submodule

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)


class _Stop(Exception):
    pass


class _Capture(_StandIn):
    """Records the arguments the model passes to layer `index`; the last one stops the forward."""

    def __init__(self, layer, index: int, calls: list, last: bool):
        super().__init__(layer)
        object.__setattr__(self, "_record", (index, calls, last))

    def forward(self, *args, **kwargs):
        index, calls, last = object.__getattribute__(self, "_record")
        calls.append((index, args, kwargs))
        if last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


class _Emit(_StandIn):
    """Returns fixed hidden states whatever it is given: the model then applies only its
    final norm and head (and whatever else follows the layers) to them."""

    def __init__(self, layer, hidden):
        super().__init__(layer)
        object.__setattr__(self, "_hidden", hidden)

    def forward(self, *args, **kwargs):
        return object.__getattribute__(self, "_hidden")


def _capture(model, ids) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """(hidden states entering layer 0, the (args, kwargs) the model gives each layer)."""
    layers = decoder_layers(model)
    real, calls = list(layers), []
    for i, layer in enumerate(real):
        layers[i] = _Capture(layer, i, calls, last=i == len(real) - 1)
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(real):
            layers[i] = layer
    calls.sort(key=lambda c: c[0])
    _, args, kwargs = calls[0]
    return (args[0] if args else kwargs["hidden_states"]), [(args, kwargs) for _, args, kwargs in calls]


def _run(layer, hidden, call) -> torch.Tensor:
    """`layer` called as the model calls it, with `hidden` as its input hidden states."""
    args, kwargs = call
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out  # older layers return (hidden, ...)


def _logits(model, layers, hidden) -> torch.Tensor:
    """The model's output (B, T, V) for final hidden states (B, T, C), in fp32."""
    saved = list(layers)
    for i, layer in enumerate(saved):
        layers[i] = _Emit(layer, hidden)
    try:
        return model(inputs_embeds=torch.zeros_like(hidden), use_cache=False).logits.float()
    finally:
        for i, layer in enumerate(saved):
            layers[i] = layer


def _run_checked(layer, hidden, call, name: str) -> tuple[torch.Tensor, float]:
    """Run `layer` (in float16) and check every module's output is within fp16's range.
    Returns (its output, the largest |activation| seen)."""
    peak = [0.0]

    def check(module_name):
        def hook(module, inputs, output):
            for t in (output if isinstance(output, tuple) else (output,)):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                    top = t.abs().max().item()
                    if not top <= FP16_MAX:  # inf or nan: it overflowed
                        raise _overflow(module_name, top)
                    peak[0] = max(peak[0], top)
        return hook

    handles = [m.register_forward_hook(check(f"{name}.{n}" if n else name)) for n, m in layer.named_modules()]
    try:
        return _run(layer, hidden, call), peak[0]
    finally:
        for h in handles:
            h.remove()


def _overflow(name: str, value: float) -> QloraError:
    return QloraError(f"{name}: activations overflow float16 in the exported model ({value:.4g}, "
                      f"float16 holds up to {FP16_MAX:g}), so it would produce inf/NaN when run in "
                      "fp16; export with --dtype bf16 instead; nothing was written")


# --------------------------------------------------------------------------- placing weights


class _Upcast(nn.Module):
    def forward(self, w):
        return w.float()


class _computing_in_fp32:
    """Within the block, every floating parameter of `module` reads as an fp32 copy made
    when it is used (torch parametrization): the module computes in fp32 while its weights
    stay stored in fp16/bf16, so no fp32 copy of a whole layer ever exists."""

    def __init__(self, module: nn.Module):
        self.params = [(m, n) for m in module.modules() for n, p in m.named_parameters(recurse=False)
                       if p.is_floating_point() and not p.is_meta and p.dtype != torch.float32]

    def __enter__(self):
        for m, n in self.params:
            parametrize.register_parametrization(m, n, _Upcast(), unsafe=True)

    def __exit__(self, *exc):
        for m, n in self.params:
            parametrize.remove_parametrizations(m, n, leave_parametrized=False)


class _without_lora:
    """Within the block, the LoRA layers of `module` are replaced by their base layers."""

    def __init__(self, module: nn.Module):
        self.module, self.swapped = module, []

    def __enter__(self):
        for name, lora in lora_layers(self.module).items():
            parent, _, leaf = name.rpartition(".")
            owner = self.module.get_submodule(parent)
            setattr(owner, leaf, lora.base_layer)
            self.swapped.append((owner, leaf, lora))

    def __exit__(self, *exc):
        for owner, leaf, lora in self.swapped:
            setattr(owner, leaf, lora)


def _place_lora(layer: nn.Module, factors: AdapterFactors, prefix: str, device) -> None:
    """The adapter's factors for the LoRA layers of `layer`, in fp32 (exact: they are bf16/fp32)."""
    for name, lora in lora_layers(layer).items():
        key = f"{prefix}{name}.weight"
        if key not in factors:
            raise QloraError(f"{factors.read.label}: no factors for {prefix}{name}")
        d = factors[key]
        for linear, value in ((lora.lora_A, d.A), (lora.lora_B, d.B)):
            if tuple(value.shape) != tuple(linear.weight.shape):
                raise QloraError(f"{factors.read.label}: {prefix}{name} factors have shapes A "
                                 f"{tuple(d.A.shape)}, B {tuple(d.B.shape)}; the layer is "
                                 f"{lora.out_features}x{lora.in_features}")
            linear.weight = nn.Parameter(value.to(device=device, dtype=torch.float32), requires_grad=False)


class _Dequantized(nn.Module):
    """A 4-bit linear computing in fp32 with exactly the weight training multiplied by: the
    dequantized weight in the compute dtype (`quant.dequantize`), upcast. (Dequantizing
    straight to fp32 would skip that rounding and differ from training by ~2^-9 per weight.)"""

    def __init__(self, linear: quant.Linear4bit):
        super().__init__()
        self.linear = linear

    def forward(self, x):  # (..., in) -> (..., out)
        bias = None if self.linear.bias is None else self.linear.bias.float()
        return nn.functional.linear(x.float(), quant.dequantize(self.linear).float(), bias)


def _upcast_reference(model: nn.Module) -> None:
    """fp32 compute with the weight values training used: 4-bit layers through _Dequantized,
    other loaded weights (compute dtype) upcast exactly."""
    for name, m in list(model.named_modules()):
        if isinstance(m, quant.Linear4bit) and not m.weight.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, _Dequantized(m))
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            if not p.is_meta and not isinstance(p, quant.Params4bit) and p.dtype in (torch.bfloat16, torch.float16):
                m._parameters[n] = nn.Parameter(p.data.float(), requires_grad=False)


def _drop(layers: nn.ModuleList, k: int) -> None:
    """Free decoder layer k. The collection is needed: a 4-bit weight and its layer refer to
    each other (bitsandbytes' Params4bit.module), a cycle reference counting never frees, so
    every layer's 4-bit weights (0.5 byte per parameter) stayed until the end: the peak grew
    with depth (benchmarks/README.md, "Export at scale")."""
    layers[k] = nn.Module()
    gc.collect()
    release_freed_memory()


def _free(model: nn.Module, names: list[str]) -> None:
    """Put parameters back on the meta device (their memory is released)."""
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        p = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                requires_grad=False)
    _tie(model)
    release_freed_memory()


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False)) and model.get_output_embeddings() is not None


def _tie(model) -> None:
    if _tied(model):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight


def _param_names(module: nn.Module, prefix: str) -> list[str]:
    return [prefix + n for n, _ in module.named_parameters()]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _buffers_to(model: nn.Module, device) -> None:
    """Move the real buffers (rotary frequencies) of a meta skeleton to `device`."""
    for m in model.modules():
        for n, b in m.named_buffers(recurse=False):
            if b is not None and not b.is_meta:
                m._buffers[n] = b.to(device)


def _rms(t: torch.Tensor) -> float:
    return t.double().pow(2).mean().sqrt().item()


def verify_folder(src, folder, out_dtype: torch.dtype, **kw) -> dict:
    """`verify_export` of an exported Hugging Face folder (safetensors, sharded or not)."""
    return verify_export(src, TensorReader(checkpoint_files(folder)), out_dtype, **kw)
