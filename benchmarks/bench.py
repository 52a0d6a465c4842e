"""QLoRA training benchmark: qlora (OURS) vs transformers + peft + bitsandbytes (REFERENCE).

    python benchmarks/bench.py --shapes stories260K,170m,1.3b --seq 512 --batch 1 --rank 16 \
        --steps 3 --warmup 1

For every shape, OURS and the REFERENCE each run in a fresh child process (this script with
`--worker`), so that their RSS figures do not mix, on the same checkpoint, sequence length,
batch, LoRA rank (alpha = 2r, dropout 0.05, all decoder linears), the same random token
batches and the same optimizer (bitsandbytes PagedAdamW8bit, lr 1e-4: ours through
qlora.optim, whose CPU step runs in chunks with bitwise the same result, qlora/cpu_adam.py).
`--steps` counts the timed steps; `--warmup` untimed steps run before them. OURS runs with
torch's huge-page allocations, which `import qlora` turns on (qlora/memory.py), the REFERENCE
without, as its users run it; `--stacks ours,ours-nothp,reference` adds OURS without them, and
THP_MEM_ALLOC_ENABLE=1 in this environment gives every stack huge pages (stack_env).

Figures per run:
  load s         the model-loading call alone (load_model / from_pretrained)
  load peak      VmHWM right after that call (the high-water mark is reset just before it)
  tok/s          median over the timed steps of batch*seq / (forward+backward+optimizer step)
  run peak       VmHWM at the end: load + adapter setup + all training steps
  tok/s (best)   the same with the fastest timed step (the machine may be shared)
  page faults    minor page faults per timed step (median): memory the step touched afresh
  roofline       6 * params * tok/s over the bf16 matmul peak of the run: the best 2048^3
                 torch.matmul seen in a loop run at the start (own child process) and in the
                 short probe every worker runs before loading (also reported per worker: it
                 says how much of the CPU that worker had)

`--rounds N` runs every stack N times per shape, alternating their order (ours, reference;
reference, ours; ...), for a machine whose speed drifts between processes: tok/s is then the
median over the rounds, the peaks their maximum, and ours/ref the median of the ratios of one
round's pair (with their range), so a slow minute hurts one pair, not the comparison.

Random-weight checkpoints for the synthetic shapes are written once to /tmp/qlora-bench/<shape>
(override with QLORA_BENCH_CACHE) shard by shard; see _shapes.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULT = "@@RESULT@@ "  # prefix of the one stdout line a worker reports on
LR = 1e-4
DROPOUT = 0.05


# ---------------------------------------------------------------- memory probes

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_gb() -> float:
    """Peak RSS since the last reset, in GB (1e9 bytes). Falls back to ru_maxrss."""
    try:
        kb = _status_kb("VmHWM")
    except (OSError, RuntimeError):
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * 1024 / 1e9


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / 1e9


# ---------------------------------------------------------------- workers

def _imports():
    """Import both stacks in both workers, so that their RSS baselines are the same."""
    import torch  # noqa: F401
    import qlora.quant  # noqa: F401  (quiets bitsandbytes' CPU import warning)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import warnings
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # deprecation notices and bitsandbytes' "paged optimizers are not supported on CPU"
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported")


def setup_ours(path, rank, keep_gb=0.0, tokens=0, device="cpu"):
    import torch
    from qlora.config import LoraConfig
    from qlora.lora import add_lora
    from qlora.memory import release_memory_per_layer
    from qlora.checkpointing import enable_gradient_checkpointing, matmul_layers_within
    from qlora.model import decoder_layers, load_model
    from qlora.optim import build_optimizer

    on_cpu = device == "cpu"
    t0 = time.perf_counter()
    model = load_model(path, quantization="nf4", double_quant=True, compute_dtype="bfloat16",
                       device=device)
    load_s = time.perf_counter() - t0
    load_peak = hwm_gb()
    add_lora(model, LoraConfig(r=rank, alpha=2 * rank, dropout=DROPOUT, targets="all-linear",
                               dtype="bfloat16"))
    # the same rule as `train.keep_matmuls_gb` in a recipe
    enable_gradient_checkpointing(model, keep_matmul_layers=matmul_layers_within(model, keep_gb, tokens))
    if on_cpu:
        release_memory_per_layer(decoder_layers(model))  # as qlora.train.setup does on CPU
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, "paged_adamw_8bit", LR, 0.0)

    from qlora.loss import lm_loss_sum
    from qlora.memory import release_if_grown

    def step(x):  # what qlora.train.train_step does, minus data and bookkeeping
        x = x.to(device)
        s, n = lm_loss_sum(model, {"input_ids": x, "labels": x})
        loss = s / n
        if on_cpu:
            release_if_grown()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if on_cpu:
            release_if_grown()
        return loss.item()

    return model, params, step, load_s, load_peak


def setup_reference(path, rank, device="cpu"):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, **({} if device == "cpu" else {"device_map": {"": device}}))
    load_s = time.perf_counter() - t0
    load_peak = hwm_gb()
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=DROPOUT, target_modules="all-linear",
        task_type="CAUSAL_LM"))
    # from_pretrained returns eval mode; like Trainer, train mode is what activates gradient
    # checkpointing and dropout (and keeps bitsandbytes off its eval-only CPU repack path).
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=LR)

    def step(x):
        x = x.to(device)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    return model, params, step, load_s, load_peak


def worker(args) -> dict:
    _imports()
    import torch
    from qlora.safetensors_io import checkpoint_files  # noqa: F401
    import _shapes

    path = _shapes.model_path(args.shape)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    # how much of the CPU this worker gets right now (the machine is shared)
    probe_best, probe_median = matmul_probe(args.probe_seconds)
    torch.manual_seed(0)
    import gc
    gc.collect()
    base_rss = rss_gb()
    hwm_reset = reset_hwm()
    if args.worker == "reference":
        model, params, step, load_s, load_peak = setup_reference(path, args.rank)
    else:  # ours-keep: selective checkpointing within --keep-matmuls-gb
        keep_gb = args.keep_matmuls_gb if args.worker == "ours-keep" else 0.0
        model, params, step, load_s, load_peak = setup_ours(path, args.rank, keep_gb,
                                                            args.batch * args.seq)
    setup_rss = rss_gb()
    trainable = sum(p.numel() for p in params)

    g = torch.Generator().manual_seed(1234)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=g)
               for _ in range(args.warmup + args.steps)]
    times, losses, faults = [], [], []
    for i, x in enumerate(batches):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        losses.append(step(x))
        dt = time.perf_counter() - t0
        df = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        if i >= args.warmup:
            times.append(dt)
            faults.append(df)
        print(f"  [{args.worker} {args.shape}] step {i} {'warmup' if i < args.warmup else 'timed'}"
              f" {dt:.2f}s loss {losses[-1]:.4f} rss {rss_gb():.2f} GB page faults {df}",
              file=sys.stderr, flush=True)
    tokens = args.batch * args.seq
    run_peak = hwm_gb()  # before the profiled step: its bookkeeping is not the stack's memory
    parts = None
    if args.breakdown:
        import _breakdown
        parts = _breakdown.profile_step(step, batches[-1])
    return {
        "stack": args.worker, "shape": args.shape, "params": _shapes.count_params(path),
        "trainable": trainable, "load_s": load_s, "load_peak_gb": load_peak,
        "run_peak_gb": run_peak, "base_rss_gb": base_rss, "breakdown": parts, "setup_rss_gb": setup_rss,
        "hwm_reset": hwm_reset, "step_s": times, "losses": losses, "page_faults": faults,
        "tok_s": tokens / statistics.median(times), "tok_s_best": tokens / min(times),
        "threads": torch.get_num_threads(), "thp": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "probe_bf16_flops": probe_best, "probe_bf16_median_flops": probe_median,
    }


def matmul_probe(seconds: float, dtype_name: str = "bf16") -> tuple[float, float]:
    """(best, median) FLOP/s of a 2048^3 torch.matmul loop run for about `seconds`."""
    import torch
    n = 2048
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    for _ in range(2):
        torch.matmul(a, b)
    ts = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(ts) < 5:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / min(ts), 2 * n**3 / statistics.median(ts)


def matmul_worker(args) -> dict:
    """bf16 (and fp32, for context) matmul throughput of this machine right now."""
    import torch
    out = {"threads": torch.get_num_threads()}
    for name in ("bf16", "fp32"):
        # the best iterations are the machine's peak; the median says how busy it is
        out[f"{name}_peak_flops"], out[f"{name}_median_flops"] = matmul_probe(args.matmul_seconds, name)
    return out


# ---------------------------------------------------------------- parent

def run_child(argv: list[str], script: Path = Path(__file__).resolve(), env: dict | None = None) -> dict:
    """Run `script` (this one by default) with `argv` (and `env` over this environment); its
    RESULT line, parsed."""
    cmd = [sys.executable, str(script), *argv]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return json.loads(lines[-1][len(RESULT):])


STACKS = ("ours", "ours-keep", "ours-nothp", "reference")  # the reference last


def stack_env(stack: str) -> dict:
    """Environment a stack's worker runs with. `import qlora` turns on torch's huge-page
    allocations (THP_MEM_ALLOC_ENABLE, qlora/memory.py), and every worker imports it; the
    reference runs as its users run it, without, unless this environment sets the variable
    (THP_MEM_ALLOC_ENABLE=1 for a reference with huge pages); ours-nothp never has them."""
    if stack == "ours-nothp" or (stack == "reference" and "THP_MEM_ALLOC_ENABLE" not in os.environ):
        return {"THP_MEM_ALLOC_ENABLE": "0"}
    return {}


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def merge_rounds(runs: list[dict]) -> dict:
    """One stack's runs of a shape (one per round) as one result: medians of speed, maxima of
    memory, every timed step and fault count listed."""
    if len(runs) == 1:
        return runs[0]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    return runs[0] | {
        "tok_s": med("tok_s"), "tok_s_best": max(r["tok_s_best"] for r in runs),
        "load_s": med("load_s"), "probe_bf16_flops": med("probe_bf16_flops"),
        "load_peak_gb": max(r["load_peak_gb"] for r in runs), "run_peak_gb": max(r["run_peak_gb"] for r in runs),
        "step_s": [t for r in runs for t in r["step_s"]], "page_faults": [f for r in runs for f in r["page_faults"]],
    }


def pair_ratios(ours: list[dict], ref: list[dict]) -> list[float]:
    """tok/s of ours over the reference's in the same round, for every round both ran."""
    ref_by_round = {f["round"]: f for f in ref}
    return [o["tok_s"] / ref_by_round[o["round"]]["tok_s"] for o in ours if o["round"] in ref_by_round]


def table(results: list[dict], peak: float) -> str:
    head = ("| shape | params | stack | load s | load peak RSS GB | tok/s (median) | tok/s (best) | "
            "run peak RSS GB | bf16 roofline | bf16 probe GFLOP/s | step s | page faults/step | loss step 0 |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    by_shape: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        by_shape.setdefault(r["shape"], {}).setdefault(r["stack"], []).append(r)
    for shape, runs in by_shape.items():
        d = {stack: merge_rounds(rs) for stack, rs in runs.items()}
        for stack in STACKS:
            r = d.get(stack)
            if r is None:
                continue
            roof = 6 * r["params"] * r["tok_s"] / peak
            rows.append(f"| {shape} | {fmt_params(r['params'])} | {stack} | {r['load_s']:.2f} | "
                        f"{r['load_peak_gb']:.2f} | {r['tok_s']:.1f} | {r['tok_s_best']:.1f} | "
                        f"{r['run_peak_gb']:.2f} | {100 * roof:.2f}% | {r['probe_bf16_flops'] / 1e9:.0f} | "
                        f"{' '.join(f'{t:.1f}' for t in r['step_s'])} | "
                        f"{statistics.median(r['page_faults']) / 1e3:.0f}K | {r['losses'][0]:.4f} |")
        for ours in STACKS[:-1]:
            if ours not in d or "reference" not in d:
                continue
            o, f = d[ours], d["reference"]
            ratios = pair_ratios(runs[ours], runs["reference"])
            speed = f"{statistics.median(ratios):.2f}x"
            if len(ratios) > 1:
                speed += f" ({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} pairs)"
            rows.append(f"| {shape} | | **{ours}/ref** | {o['load_s'] / f['load_s']:.2f}x | "
                        f"{o['load_peak_gb'] / f['load_peak_gb']:.2f}x | "
                        f"{speed} | {o['tok_s_best'] / f['tok_s_best']:.2f}x | "
                        f"{o['run_peak_gb'] / f['run_peak_gb']:.2f}x | | | | | |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="stories260K,170m,1.3b",
                    help="comma list of: stories260K, smollm2 (the real SmolLM2-135M), 170m, 1.3b, 7b")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--stacks", default="ours,reference",
                    help="which stacks to run: ours, ours-keep (ours with --keep-matmuls-gb), ours-nothp "
                         "(ours without huge pages), reference")
    ap.add_argument("--keep-matmuls-gb", type=float, default=1.0,
                    help="ours-keep: memory for kept 4-bit matmul outputs (train.keep_matmuls_gb)")
    ap.add_argument("--matmul-seconds", type=float, default=5.0,
                    help="length of the bf16/fp32 matmul peak measurement at the start")
    ap.add_argument("--probe-seconds", type=float, default=1.5,
                    help="length of the bf16 matmul probe each worker runs before loading")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip the profiled step that splits each stack's time into GEMM (against its "
                         "floor), dequantization, dropout, attention, optimizer and other")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every stack this many times per shape, alternating their order; "
                         "speeds are medians over the rounds, ours/ref the median of the rounds' ratios")
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--worker", choices=(*STACKS, "matmul"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = matmul_worker(args) if args.worker == "matmul" else worker(args)
        print(RESULT + json.dumps(res), flush=True)
        return

    import _shapes
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in _shapes.REAL and s not in _shapes.SHAPES:
            raise SystemExit(f"unknown shape {s!r}")
    common = ["--seq", str(args.seq), "--batch", str(args.batch), "--rank", str(args.rank),
              "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--probe-seconds", str(args.probe_seconds), "--keep-matmuls-gb", str(args.keep_matmuls_gb)]
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    mm = run_child(["--worker", "matmul", "--matmul-seconds", str(args.matmul_seconds)])
    peak = mm["bf16_peak_flops"]
    print(f"bf16 matmul 2048^3: peak {peak / 1e9:.0f} GFLOP/s (median {mm['bf16_median_flops'] / 1e9:.0f}); "
          f"fp32 peak {mm['fp32_peak_flops'] / 1e9:.0f} GFLOP/s; torch threads {mm['threads']}", flush=True)
    results = []
    for shape in shapes:
        if shape == "stories260K" and not _shapes.STORIES.is_dir():
            print(f"skip stories260K: {_shapes.STORIES} absent", flush=True)
            continue
        if shape == "smollm2" and not _shapes.SMOLLM2.is_dir():
            print(f"skip smollm2: {_shapes.SMOLLM2} absent", flush=True)
            continue
        _shapes.model_path(shape)  # generate once, outside the timed workers
        stacks = args.stacks.split(",")
        for rnd in range(args.rounds):
            # the profiled step runs in the first round only: its table is one row per stack
            extra = [] if args.breakdown and rnd == 0 else ["--no-breakdown"]
            for stack in stacks if rnd % 2 == 0 else stacks[::-1]:
                print(f"== {shape} / {stack}" + (f" (round {rnd + 1})" if args.rounds > 1 else ""),
                      file=sys.stderr, flush=True)
                r = run_child(["--worker", stack, "--shape", shape, *common, *extra], env=stack_env(stack))
                results.append(r | {"round": rnd})
                print(f"{shape:12s} {stack:9s} load {r['load_s']:7.2f}s  load-peak {r['load_peak_gb']:6.2f} GB  "
                      f"{r['tok_s']:8.1f} tok/s  run-peak {r['run_peak_gb']:6.2f} GB  "
                      f"trainable {r['trainable']}", flush=True)
    # The machine is shared: the best matmul rate seen anywhere in this run is its peak.
    peak = max([peak] + [r["probe_bf16_flops"] for r in results])
    print()
    print(f"seq {args.seq}, batch {args.batch}, r {args.rank} (alpha {2 * args.rank}), dropout {DROPOUT}, "
          f"PagedAdamW8bit lr {LR}, {args.warmup} warm-up + {args.steps} timed steps, {args.rounds} round(s); "
          f"bf16 peak (best 2048^3 matmul of the run) {peak / 1e9:.0f} GFLOP/s")
    print(table(results, peak))
    if args.breakdown:
        import _breakdown
        print("\nOne more step of each, profiled (benchmarks/_breakdown.py):")
        print(_breakdown.table(results, peak))
    if args.json:
        args.json.write_text(json.dumps({"matmul": mm, "bf16_peak_flops": peak, "args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
