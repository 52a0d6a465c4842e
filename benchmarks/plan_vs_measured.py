"""`qlora plan`'s CPU prediction against the measured whole-run peak RSS.

    python benchmarks/plan_vs_measured.py --shapes stories260K,170m,1.3b,7b \
        --seqs 256,1024 --ranks 16,64 --keeps 0,1.0 --steps 2 --json plan_vs_measured.json

Every configuration (shape x sequence length x LoRA rank x `train.keep_matmuls_gb`) runs in a
fresh child process: it imports what `qlora train` imports, loads and trains the model the way
bench.py's OURS stack does (= `qlora.train.setup` and `train_step` on CPU: NF4 + double quant,
LoRA alpha 2r dropout 0.05 on all linears, checkpointing, PagedAdamW8bit (non-paged on CPU),
batch 1 of random tokens) for `--steps` steps, and reports `ru_maxrss` at the end: the peak
resident memory of the whole run, loading included. The parent asks `qlora.plan` for the same
recipe on `--device cpu` and prints predicted vs measured. Two steps are enough: the optimizer
state exists from the second step on, and later steps repeat it.

`--configs SEQ:R:KEEP,...` runs those configurations instead of the full product (e.g. a half
fraction of it where every value still appears, for the 7B shape: each run takes minutes).
`--repeats N` measures every configuration N times: glibc's heap makes the same run's peak
differ by up to ~10% at 170M, so the table compares the prediction with the median of the
runs of a configuration and shows their range. `--from-json FILE...` prints the table again
from saved measurements (runs of one configuration in several files are pooled), with the
predictions of the current `qlora.plan` (the measurements do not depend on it).
Random-weight checkpoints come from _shapes.py (`/tmp/qlora-bench`, `QLORA_BENCH_CACHE`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULT = "@@RESULT@@ "
OPTIMIZER = "paged_adamw_8bit"  # bench.setup_ours' optimizer
DROPOUT = 0.05  # bench.DROPOUT


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args) -> dict:
    import warnings
    warnings.filterwarnings("ignore")  # bitsandbytes' "paged optimizers are not supported on CPU"
    import qlora.train  # noqa: F401  (the modules `qlora train` has imported before it loads)
    import torch
    import bench
    import _shapes
    after_imports = bench.rss_gb()
    path = _shapes.model_path(args.shape)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    _, _, step, load_s, load_peak = bench.setup_ours(path, args.rank, args.keep, args.seq)
    setup_rss = bench.rss_gb()
    g = torch.Generator().manual_seed(1234)
    step_peaks = []
    for _ in range(args.steps):
        step(torch.randint(0, vocab, (1, args.seq), generator=g))
        step_peaks.append(_maxrss_bytes() / 1e9)
    return {"shape": args.shape, "seq": args.seq, "rank": args.rank, "keep": args.keep,
            "steps": args.steps, "after_imports_gb": after_imports, "load_s": load_s,
            "load_peak_gb": load_peak, "setup_rss_gb": setup_rss, "peak_after_step_gb": step_peaks,
            "run_peak_gb": _maxrss_bytes() / 1e9, "wall_s": time.perf_counter() - t0}


def measure(shape: str, seq: int, rank: int, keep: float, steps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--shape", shape,
           "--seq", str(seq), "--rank", str(rank), "--keep", str(keep), "--steps", str(steps)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker failed (rc {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")
    return json.loads(lines[-1][len(RESULT):])


def predict(r: dict):
    """The plan of the recipe the worker ran, on `--device cpu`."""
    import _shapes
    from qlora.config import recipe_from_dict
    from qlora.plan import plan_recipe
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(_shapes.model_path(r["shape"]))},
        "lora": {"r": r["rank"], "alpha": 2 * r["rank"], "dropout": DROPOUT},
        "data": {"path": "unused.jsonl", "max_seq_len": r["seq"]},
        "train": {"output_dir": "unused", "batch_size": 1, "optimizer": OPTIMIZER,
                  "keep_matmuls_gb": r["keep"]}})
    return plan_recipe(recipe, device="cpu")


def table(results: list[dict]) -> str:
    """One row per configuration: the median of its runs against the prediction."""
    head = ("| shape | seq | r | keep_matmuls_gb | kept layers | runs | measured GB (median; range) | "
            "predicted GB | error | predicted peak in | heap slack GB | load peak measured / predicted GB |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    configs: dict[tuple, list[dict]] = {}
    for r in results:
        configs.setdefault((r["shape"], r["seq"], r["rank"], r["keep"]), []).append(r)
    for runs in configs.values():
        r, peaks = runs[0], [x["run_peak_gb"] for x in runs]
        measured = statistics.median(peaks)
        spread = f"; {min(peaks):.3f}-{max(peaks):.3f}" if len(runs) > 1 else ""
        plan = predict(r)
        peak = plan.peak_bytes / 1e9
        err = (peak - measured) / measured
        # what the heap held beyond the plan's live tensors at the peak (its allocator term's measure)
        slack = measured - (plan.peak_bytes - plan.terms["allocator"]) / 1e9
        rows.append(f"| {r['shape']} | {r['seq']} | {r['rank']} | {r['keep']:g} | {plan.kept_layers} | {len(runs)} | "
                    f"{measured:.3f}{spread} | {peak:.3f} | {100 * err:+.1f}% | {plan.peak_phase} | {slack:.3f} | "
                    f"{statistics.median(x['load_peak_gb'] for x in runs):.3f} / "
                    f"{plan.phase_bytes['load'] / 1e9:.3f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="stories260K,170m,1.3b,7b")
    ap.add_argument("--seqs", default="256,1024")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--keeps", default="0,1.0", help="train.keep_matmuls_gb values")
    ap.add_argument("--configs", help="SEQ:R:KEEP,... instead of the product of --seqs, --ranks, --keeps")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each configuration")
    ap.add_argument("--json", type=Path, help="write the measurements here (after each configuration)")
    ap.add_argument("--from-json", type=Path, nargs="+", help="print the table from saved measurements")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(RESULT + json.dumps(worker(args)), flush=True)
        return
    if args.from_json:
        print(table([r for f in args.from_json for r in json.loads(f.read_text())["results"]]))
        return

    import _shapes
    shapes = [s for s in args.shapes.split(",") if s]
    if "stories260K" in shapes and not _shapes.STORIES.is_dir():
        print(f"skip stories260K: {_shapes.STORIES} absent", flush=True)
        shapes.remove("stories260K")
    results = []
    if args.configs:
        runs = [(int(q), int(r), float(k)) for q, r, k in (c.split(":") for c in args.configs.split(","))]
    else:
        runs = list(itertools.product([int(s) for s in args.seqs.split(",")], [int(r) for r in args.ranks.split(",")],
                                      [float(k) for k in args.keeps.split(",")]))
    for shape, (seq, rank, keep), _ in itertools.product(shapes, runs, range(args.repeats)):
        _shapes.model_path(shape)  # written once, outside the measured process
        r = measure(shape, seq, rank, keep, args.steps)
        results.append(r)
        print(f"{shape:12s} seq {seq:5d} r {rank:3d} keep {keep:g}: run peak {r['run_peak_gb']:.3f} GB "
              f"(load peak {r['load_peak_gb']:.3f}, after imports {r['after_imports_gb']:.3f}, "
              f"{r['wall_s']:.0f} s)", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items()
                                                      if k in ("shapes", "seqs", "ranks", "keeps", "configs", "steps",
                                                                "repeats")},
                                             "results": results}, indent=1))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
