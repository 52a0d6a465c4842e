"""`qlora inspect`: what an adapter learned, read from its factors (rank analysis).

    report = inspect_adapters("runs/r8", "runs/r64", base="models/llama-7b")

The math and its definitions live in rank_analysis.py; this module reads the adapters and
the base weights, assembles the report and writes the heat-maps. Per layer (the `--json` keys):

* `singular_values`: σ₁ ≥ σ₂ ≥ ... of ΔW = scaling·B·A, min(r, out, in) of them;
* `effective_rank`: the entropy effective rank; `rank_above_1pct`: how many σᵢ > 1% of σ₁;
* `delta_norm`: ‖ΔW‖_F = sqrt(Σσ²);
* `relative_norm` (with a base model): ‖ΔW‖_F / ‖W‖_F, W the weight as training saw it
  (re-quantized exactly as training quantized it: export's "dequantized" base) or the original
  checkpoint weight; the base is streamed one tensor at a time;
* `similarity` (two adapters): φ(A₁, A₂, i, j) as rows i = 1..r₁ of columns j = 1..r₂;
* `other` (two adapters): OTHER's singular values, ranks and norms for the same module.
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from .atomic import write_atomically
from .checkpoint import latest_checkpoint
from .errors import QloraError
from .adapter import Delta
from .base_checkpoint import BaseCheckpoint
from .export import _check_out, open_base, quantized_weight_names, read_adapter_deltas
from .resolve import ModelSource, locate_adapter, resolve
from .rank_analysis import (delta_singular_values, effective_rank, frobenius_norm,
                            subspace_similarity, threshold_rank)

BASE_WEIGHTS = ("dequantized", "original")


# --------------------------------------------------------------------------- the inputs


def find_adapter(path: str | Path) -> Path:
    """The adapter folder that `path` names: an adapter or checkpoint folder itself, or a run
    directory's final adapter (RUN/adapter), found as export, generate and eval find it
    (`resolve.locate_adapter`). A run that did not finish is an error naming its latest
    checkpoint: what an unfinished run learned is the user's pick."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise QloraError(f"{path}: no such folder")
    if (p / "recipe.yaml").is_file() and not (p / CONFIG_NAME).is_file() \
            and not (p / "adapter" / CONFIG_NAME).is_file():
        ckpt = latest_checkpoint(p)
        hint = f"; inspect a checkpoint instead, e.g. {ckpt}" if ckpt else ""
        raise QloraError(f"{path}: run has no final adapter (adapter/{CONFIG_NAME} missing){hint}")
    found = locate_adapter(p)
    if found is None:
        raise QloraError(f"{path}: not a run, checkpoint or adapter directory "
                         f"(no recipe.yaml or {CONFIG_NAME})")
    return found.adapter


@dataclass
class Adapter:
    """One adapter as inspect reads it."""
    arg: str
    """The path as the user gave it (run, checkpoint or adapter folder)."""
    folder: Path
    """The adapter folder itself (holds adapter_config.json)."""
    r: int
    """LoRA rank from adapter_config.json."""
    alpha: float
    """lora_alpha from adapter_config.json."""
    scaling: float
    """ΔW = scaling·B·A (LoraConfig.scaling: alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    deltas: dict[str, Delta]
    """{PEFT module name: its factors}."""

    @property
    def home(self) -> Path:
        """The folder the user thinks of: the adapter folder, or its run for RUN/adapter."""
        f = self.folder.resolve()
        return f.parent if f.name == "adapter" else f

    @property
    def label(self) -> str:
        """A short name for titles and file names."""
        return self.home.name


def read_adapter(path: str | Path) -> Adapter:
    folder = find_adapter(path)
    settings, _ = read_adapter_config(folder)
    deltas, scaling = read_adapter_deltas(folder)
    if not deltas:
        raise QloraError(f"{folder}: the adapter holds no LoRA factors")
    modules = {m: deltas[m + ".weight"] for m in module_order(n.removesuffix(".weight") for n in deltas)}
    for module, d in modules.items():
        if d.A.dim() != 2 or d.B.dim() != 2 or d.A.shape[0] != d.B.shape[1]:
            raise QloraError(f"{folder / WEIGHTS_NAME}: {module} has factors A {tuple(d.A.shape)} and "
                             f"B {tuple(d.B.shape)}; expected A (r, in) and B (out, r)")
    return Adapter(str(path), folder, settings.r, settings.alpha, scaling, modules)


def module_order(modules) -> list[str]:
    """Sorted with layer numbers as numbers: layers.2 before layers.10."""
    return sorted(modules, key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m)])


def select_modules(modules: list[str], layers: list[str] | None, where: Path) -> dict[str, list[str]]:
    """{selector: the modules it picks}. A selector is a layer type (`q_proj`), a longer
    suffix (`self_attn.q_proj`) or one module's full name; none given: one group per type."""
    if not layers:
        layers = sorted({m.rsplit(".", 1)[-1] for m in modules})
    groups = {}
    for sel in layers:
        picked = [m for m in modules if _matches(m, sel)]
        if not picked:
            types = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules}))
            raise QloraError(f"--layers {sel}: matches no adapted module of {where} "
                             f"(layer types: {types})")
        groups[sel] = picked
    return groups


def _matches(module: str, selector: str) -> bool:
    return module == selector or module.endswith("." + selector)


def base_norms(adapters: list[tuple[Adapter, list[str]]], base: str,
               base_weights: str) -> list[dict[str, float]]:
    """For each (adapter, modules): {module: ‖W‖_F}, the base read one tensor at a time.

    "dequantized": W as training saw it: decoder linears re-quantized with that adapter's
    training settings (its run's recipe, else nf4 + double quant + bf16, as export assumes),
    other adapted layers cast to the compute dtype. "original": the checkpoint tensor as stored.
    Adapters that see the base the same way share one pass over it.
    """
    srcs = [resolve(a.folder, base=base) for a, _ in adapters]

    def view(src: ModelSource) -> tuple:
        q = src.quant
        settings = (q.quantization, q.double_quant, q.compute_dtype)
        return (src.model.resolve(), *(settings if base_weights == "dequantized" else ()))

    bases = [open_base(src, base_weights) for src in srcs]
    for (a, modules), b in zip(adapters, bases):  # every mismatch before reading any weight
        check_base_shapes(a, modules, b)
    done: dict[tuple, dict[str, float]] = {}
    for src, b in zip(srcs, bases):
        if view(src) not in done:
            need = {m for (_, ms), s in zip(adapters, srcs) if view(s) == view(src) for m in ms}
            done[view(src)] = weight_norms(src, b, need, base_weights)
    return [{m: done[view(src)][m] for m in modules} for (_, modules), src in zip(adapters, srcs)]


def check_base_shapes(adapter: Adapter, modules: list[str], base: BaseCheckpoint) -> None:
    """Every module has a weight of shape (out, in) in `base` (headers only)."""
    shapes = {t.name: t for t in base.entries}
    for module in modules:
        name = module + ".weight"
        if name not in shapes:
            raise QloraError(f"{adapter.folder}: module {module} has no weight {name} in {base.folder}")
        d, t = adapter.deltas[module], shapes[name]
        if list(t.shape) != [d.B.shape[0], d.A.shape[1]]:
            raise QloraError(f"{t.file}: {name} has shape {tuple(t.shape)}; {adapter.folder}'s {module} "
                             f"is {d.B.shape[0]}x{d.A.shape[1]} (another base model?)")


def weight_norms(src: ModelSource, base: BaseCheckpoint, modules: set[str], base_weights: str) -> dict[str, float]:
    from . import quant
    q = src.quant
    dequantized = base_weights == "dequantized"
    quantized = set() if base.prequantized or not dequantized else \
        quantized_weight_names(src.model, q.quantization)
    order = {t.name: i for i, t in enumerate(base.entries)}
    norms = {}
    for name in sorted((m + ".weight" for m in modules), key=order.__getitem__):  # on-disk order
        w = base(name)  # (out, in); a pre-quantized base's linears come dequantized
        if name in quantized:
            w = quant.nf4_roundtrip(w, q.quantization, q.double_quant, q.compute_dtype)
        elif dequantized:
            w = w.to(q.compute_dtype)
        norms[name.removesuffix(".weight")] = frobenius_norm(w)
        del w  # one weight at a time
    return norms


# --------------------------------------------------------------------------- the report


@dataclass
class Group:
    """The similarity of one --layers selector, averaged over its layers."""
    modules: list[str]
    """Modules of the selector present in both adapters (the average's terms)."""
    mean: torch.Tensor
    """(r₁, r₂) mean φ(i, j) over `modules`."""


@dataclass
class Report:
    adapter: Adapter
    """The first adapter (ADAPTER)."""
    other: Adapter | None
    """The second adapter (OTHER), when given."""
    layers: dict[str, dict]
    """{module: stats}: the `--json` output's "layers" (see the module docstring for the keys)."""
    groups: dict[str, list[str]]
    """{--layers selector: its modules of ADAPTER}."""
    similarity: dict[str, Group] = field(default_factory=dict)
    """{selector: mean φ} (two adapters)."""
    skipped: list[str] = field(default_factory=list)
    """Modules in only one of the two adapters: no φ for them."""
    base_weights: str | None = None
    """"dequantized" or "original" when relative norms were taken, else None."""
    out: Path | None = None
    """Folder holding the heat-maps and tables (two adapters)."""
    files: list[str] = field(default_factory=list)
    """File names written into `out`."""


def layer_stats(d: Delta, scaling: float, base_norm: float | None) -> dict:
    sv = delta_singular_values(d.A, d.B, scaling)
    stats = {"singular_values": sv.tolist(), "effective_rank": effective_rank(sv),
             "rank_above_1pct": threshold_rank(sv),
             "delta_norm": math.sqrt(sv.square().sum().item())}
    if base_norm is not None:
        stats["relative_norm"] = stats["delta_norm"] / base_norm if base_norm > 0 else math.inf
    return stats


def inspect_adapters(adapter: str | Path, other: str | Path | None = None, *,
                     base: str | Path | None = None, base_weights: str = "dequantized",
                     layers: list[str] | None = None, out: str | Path | None = None,
                     force: bool = False) -> Report:
    """Rank analysis of `adapter` (and its similarity to `other`); see the module docstring.

    `base`: base model for ‖ΔW‖/‖W‖, `base_weights` which W ("dequantized" or "original").
    `layers`: selectors (layer types such as q_proj, or full module names); default every type.
    `out`: folder for the heat-maps and tables (two adapters only; default
    `inspect-<label1>-vs-<label2>` beside the first adapter's folder, or beside its run for a
    run's final adapter: runs/r8 runs/r64 -> runs/inspect-r8-vs-r64), published atomically;
    an existing non-empty folder is replaced only with `force`.
    """
    if base_weights not in BASE_WEIGHTS:
        raise QloraError(f"base_weights: expected dequantized or original, got {base_weights!r}")
    first = read_adapter(adapter)
    second = read_adapter(other) if other is not None else None
    if second is None and (out is not None or force):
        raise QloraError("--out/--force: nothing to write with one adapter (the similarity "
                         "heat-maps need OTHER)")
    if second is not None:
        out = Path(out).expanduser() if out is not None else \
            first.home.parent / f"inspect-{first.label}-vs-{second.label}"
        _check_out(out, force)  # before the work, not after
        for a in (first, second):
            if out.resolve() == a.folder.resolve() or out.resolve() in a.folder.resolve().parents:
                raise QloraError(f"{out}: output folder would replace the adapter {a.folder}")

    groups = select_modules(list(first.deltas), layers, first.folder)
    modules = module_order({m for picked in groups.values() for m in picked})
    common = [m for m in modules if second is not None and m in second.deltas]
    if second is not None and not common:
        raise QloraError(f"{second.folder}: no adapted module in common with {first.folder}"
                         + (" among --layers " + " ".join(layers) if layers else ""))
    for m in common:  # before any work on the base
        in1, in2 = first.deltas[m].A.shape[1], second.deltas[m].A.shape[1]
        if in1 != in2:
            raise QloraError(f"{second.folder}: {m} has {in2} inputs, {first.folder} has {in1}: "
                             "the adapters are not for the same base model")
    norms1 = norms2 = None
    if base is not None:
        wanted = [(first, modules)] + ([(second, common)] if second is not None else [])
        norms = base_norms(wanted, str(base), base_weights)
        norms1, norms2 = norms[0], (norms[1] if second is not None else None)

    report = Report(first, second, {}, groups, base_weights=base_weights if base else None)
    for m in modules:
        report.layers[m] = layer_stats(first.deltas[m], first.scaling, norms1[m] if norms1 else None)
    if second is None:
        return report

    picked_other = {m for m in second.deltas if any(_matches(m, sel) for sel in groups)}
    report.skipped = module_order(set(modules) ^ picked_other)
    for m in common:
        report.layers[m]["similarity"] = subspace_similarity(first.deltas[m].A, second.deltas[m].A).tolist()
        report.layers[m]["other"] = layer_stats(second.deltas[m], second.scaling, norms2[m] if norms2 else None)
    for sel, picked in groups.items():
        both = [m for m in picked if m in second.deltas]
        if both:
            mean = torch.tensor([report.layers[m]["similarity"] for m in both], dtype=torch.float64).mean(0)
            report.similarity[sel] = Group(both, mean)
    report.out = out
    write_atomically(out, lambda tmp: report.files.extend(write_similarity(tmp, report)))
    return report


# --------------------------------------------------------------------------- the files


def write_similarity(folder: Path, report: Report) -> list[str]:
    """similarity-<selector>.png (heat-map) and .csv (the full table) per selector."""
    names = []
    for sel, group in report.similarity.items():
        stem = file_stem(sel)
        (folder / f"{stem}.csv").write_text(similarity_csv(group.mean))
        heat_map(group, sel, report, folder / f"{stem}.png")
        names += [f"{stem}.csv", f"{stem}.png"]
    return names


def file_stem(selector: str) -> str:
    return "similarity-" + "".join(c if c.isalnum() or c in "._-" else "_" for c in selector)


def similarity_csv(phi: torch.Tensor) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["i\\j", *range(1, phi.shape[1] + 1)])
    for i, row in enumerate(phi.tolist(), 1):
        w.writerow([i, *(f"{v:.6f}" for v in row)])
    return buf.getvalue()


def heat_map(group: Group, sel: str, report: Report, path: Path) -> None:
    """φ(i, j) as an image, in the LoRA paper's layout (i down, j across, 0..1 colour scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg, no global backend switch
    from matplotlib.figure import Figure
    r1, r2 = group.mean.shape
    fig = Figure(figsize=(min(12, 3 + 0.12 * r2), min(10, 2.5 + 0.12 * r1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(group.mean.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                   interpolation="nearest", extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
    fig.colorbar(im, ax=ax, label="φ(i, j)")
    ax.set_xlabel(f"j  ({report.other.label}, r={r2})")
    ax.set_ylabel(f"i  ({report.adapter.label}, r={r1})")
    n = len(group.modules)
    ax.set_title(f"φ(A₁, A₂, i, j): subspace similarity, {sel}" + (f" (mean of {n} layers)" if n > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- the text


def _ticks(r: int) -> list[int]:
    """1, 2, 4, ... and r: the rows/columns of the printed φ table."""
    return sorted({*(2 ** k for k in range(r.bit_length()) if 2 ** k <= r), r})


def format_report(report: Report) -> str:
    a, b = report.adapter, report.other
    lines = [f"adapter {a.folder}: r {a.r}, alpha {a.alpha:g}, scaling {a.scaling:g}, "
             f"{len(a.deltas)} layers"]
    if b is not None:
        lines.append(f"other   {b.folder}: r {b.r}, alpha {b.alpha:g}, scaling {b.scaling:g}, "
                     f"{len(b.deltas)} layers")
    rel = report.base_weights is not None
    width = max(len(m) for m in report.layers)
    head = f"{'module':<{width}}  {'σ1':>9} {'σ2':>9} {'σ3':>9}  {'erank':>6} {'rank>1%':>7}  {'‖ΔW‖F':>9}"
    lines += ["", head + (f"  ‖ΔW‖/‖W‖ ({report.base_weights} base)" if rel else "")]
    for m, s in report.layers.items():
        sv = (s["singular_values"] + [0.0] * 3)[:3]
        line = (f"{m:<{width}}  {sv[0]:9.4g} {sv[1]:9.4g} {sv[2]:9.4g}  {s['effective_rank']:6.2f} "
                f"{s['rank_above_1pct']:7d}  {s['delta_norm']:9.4g}")
        lines.append(line + (f"  {s['relative_norm']:.4g}" if rel else ""))
    lines += ["", "mean over each selector's layers:"]
    for sel, picked in report.groups.items():
        stats = [report.layers[m] for m in picked]
        mean = lambda k: sum(s[k] for s in stats) / len(stats)  # noqa: E731
        lines.append(f"  {sel} ({len(picked)} layer{'s' * (len(picked) != 1)}): erank "
                     f"{mean('effective_rank'):.2f}, rank>1% {mean('rank_above_1pct'):.1f}"
                     + (f", ‖ΔW‖/‖W‖ {mean('relative_norm'):.4g}" if rel else ""))
    for sel, group in report.similarity.items():
        phi = group.mean
        rows, cols = _ticks(phi.shape[0]), _ticks(phi.shape[1])
        n = len(group.modules)
        lines += ["", f"φ(A₁, A₂, i, j), {sel}, mean of {n} layer{'s' * (n != 1)} "
                      f"(i: adapter, j: other; full table {report.out / (file_stem(sel) + '.csv')})",
                  "  i\\j " + "".join(f"{j:>7}" for j in cols)]
        lines += [f"  {i:>4} " + "".join(f"{phi[i - 1, j - 1].item():7.3f}" for j in cols) for i in rows]
    if report.skipped:
        lines += ["", f"no similarity for {len(report.skipped)} module(s) in only one adapter: "
                      + ", ".join(report.skipped[:5]) + (" ..." if len(report.skipped) > 5 else "")]
    return "\n".join(lines)
