"""Where a training step's time goes: one profiled step, split into what the levers act on.

    b = profile_step(step, x)   # {"seconds": {category: s}, "gemm_flops": ..., "profiled_step_s": ...}
    row(shape, stack, b, peak_flops)   # a markdown row; the GEMM floor at the run's bf16 peak

Everything an optimizer's `step` calls is optimizer (bitsandbytes' 8-bit state is
(de)quantized there by ops named like the 4-bit weight's). Every other operator the profiler
records is charged to one category by its own name, else by the nearest enclosing range that
names one (so the ops inside a 4-bit matmul's autograd function are dequantization unless
they are the GEMM itself). Self times are summed, so nothing counts twice:

    gemm            aten::mm / addmm / addmm_ / bmm / baddbmm; their FLOPs from the recorded shapes
                    give the GEMM floor: FLOPs / the bf16 matmul peak measured in the same run
    dequantization  inside qlora's _Matmul4bit or bitsandbytes' MatMul4Bit, and bitsandbytes ops
                    outside the optimizer
    dropout         qlora's `qlora::dropout` range; aten::dropout / native_dropout / bernoulli_
    attention       scaled-dot-product attention kernels
    optimizer       `Optimizer.step` ranges and everything in them
    other           the rest: elementwise tails, norms, copies, the loss, autograd bookkeeping

The profiled step is slower than an unprofiled one (shape recording): read the shares, and
the GEMM time against its floor; tok/s comes from the unprofiled steps.
"""

from __future__ import annotations

CATEGORIES = ("gemm", "dequantization", "dropout", "attention", "optimizer", "other")
_GEMM = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def _category(name: str) -> str | None:
    if name in _GEMM:
        return "gemm"
    if "Matmul4bit" in name or "MatMul4Bit" in name or name.startswith("bitsandbytes::"):
        return "dequantization"
    if name in ("qlora::dropout", "aten::dropout", "aten::native_dropout", "aten::bernoulli_"):
        return "dropout"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name.startswith("Optimizer.step"):
        return "optimizer"
    return None


def _flops(name: str, shapes) -> float:
    """2·m·k·n (times the batch) from an aten GEMM's recorded input shapes."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name in ("aten::addmm", "aten::addmm_"):
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError, ValueError):
        pass
    return 0.0


def breakdown(events) -> dict:
    """Seconds per category and GEMM FLOPs from a profiler's `events()` (FunctionEvents)."""
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    flops = 0.0
    for e in events:
        node, cat = e, None
        while node is not None:  # the nearest category, unless an optimizer step encloses it
            found = _category(node.name)
            if found == "optimizer":
                cat = found
                break
            cat = cat or found
            node = node.cpu_parent
        seconds[cat or "other"] += e.self_cpu_time_total / 1e6
        if e.name in _GEMM:
            flops += _flops(e.name, e.input_shapes)
    return {"seconds": seconds, "gemm_flops": flops}


def profile_step(step, x) -> dict:
    """Run `step(x)` once under the profiler and break its time down."""
    import time
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        step(x)
        wall = time.perf_counter() - t0
    b = breakdown(prof.events())
    b["profiled_step_s"] = wall
    return b


def row(shape: str, stack: str, b: dict, peak_flops: float) -> str:
    """`peak_flops`: the bf16 matmul peak of the whole run (the GEMM floor's denominator)."""
    s, total = b["seconds"], sum(b["seconds"].values()) or 1.0
    floor = b["gemm_flops"] / peak_flops
    gemm = f"{s['gemm']:.2f} s vs floor {floor:.2f} s ({floor / s['gemm']:.0%} of peak)" if s["gemm"] else "—"
    cells = [f"{s[c]:.2f} s ({s[c] / total:.0%})" for c in CATEGORIES[1:]]
    return f"| {shape} | {stack} | {b['profiled_step_s']:.2f} | {gemm} | " + " | ".join(cells) + " |"


def table(results: list[dict], peak_flops: float) -> str:
    head = ("| shape | stack | profiled step s | GEMM (floor at the run's bf16 peak) | dequantization | "
            "dropout | attention | optimizer | other |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    rows += [row(r["shape"], r["stack"], r["breakdown"], peak_flops) for r in results if r.get("breakdown")]
    return "\n".join(rows)
