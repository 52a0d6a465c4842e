"""`qlora` command line: train, plan, export, generate, eval, demo.

User errors (QloraError) print one line and exit 2, without a traceback; an interrupted
run exits 130 after saving a checkpoint. Heavy imports happen inside the subcommands so that
`qlora --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import QloraError, TrainingInterrupted
from .hub import looks_like_hub_id

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _train(args) -> None:
    from .config import load_recipe
    from .train import train
    if args.resume:
        if args.recipe:
            raise QloraError("give either RECIPE or --resume RUN_DIR, not both")
        recipe_path = Path(args.resume) / "recipe.yaml"
        if not recipe_path.is_file():
            raise QloraError(f"{args.resume}: not a run directory (no recipe.yaml)")
        recipe = load_recipe(recipe_path, args.set or ())
        recipe.train.output_dir = str(args.resume)  # the run lives where it is now
    elif args.recipe:
        recipe = load_recipe(args.recipe, args.set or ())
    else:
        raise QloraError("train needs a RECIPE file or --resume RUN_DIR")
    _check_paths(recipe)
    summary = train(recipe, resume=bool(args.resume), overwrite=args.overwrite, force=args.force)
    line = f"done: {summary['steps']} steps; adapter in {Path(summary['run_dir']) / 'adapter'}"
    if "eval_loss" in summary:
        line += f"; eval loss {summary['eval_loss']:.4f} (ppl {summary['eval_ppl']:.2f})"
    if summary["is_main_process"]:  # under `accelerate launch` every process gets here
        print(line)


def _check_paths(recipe) -> None:
    """Fail before loading anything when a local path in the recipe does not exist."""
    src = recipe.source or "recipe"
    for key, value in (("model.name_or_path", recipe.model.name_or_path), ("data.path", recipe.data.path),
                       ("data.eval_path", recipe.data.eval_path), ("model.tokenizer", recipe.model.tokenizer)):
        if value and not Path(value).exists() and not looks_like_hub_id(value):
            raise QloraError(f"{src}: {key}: path not found: {value}")


def _plan(args) -> None:
    import json
    from .config import load_recipe
    from .plan import plan_recipe, render, to_json
    recipe = load_recipe(args.recipe, args.set or ())
    plan = plan_recipe(recipe, args.device)
    print(json.dumps(to_json(plan), indent=1) if args.json else render(plan, args.recipe))


def _export(args) -> None:
    if args.format != "safetensors":
        return _export_gguf(args)
    from .export import export
    if args.dtype == "q8_0" or args.base_only:
        raise QloraError(f"{'--dtype q8_0' if args.dtype == 'q8_0' else '--base-only'} is for --format gguf")
    report = export(args.source, args.out, dtype={"f16": "fp16"}.get(args.dtype, args.dtype),
                    merge_into=args.merge_into, max_shard_size=args.max_shard_size or "5GB",
                    force=args.force, verify=not args.no_verify, base=args.base, device=args.device)
    line = (f"exported {report['tensors_merged']} merged tensors to {report['out']} "
            f"({report['dtype']}, {report['shards']} shard(s))")
    if report.get("verified"):
        line += (f"; verified layer by layer: logits within {report['relative_error']:.2%} of what "
                 f"the adapter changes (tolerance {report['tolerance']:.0%})")
    elif report.get("relative_error") is not None:
        line += f"; logits differ from the adapter on its 4-bit base by {report['relative_error']:.2%} of its effect (not enforced)"
    print(line)


def _export_gguf(args) -> None:
    from .gguf_export import export_gguf, export_gguf_lora
    if args.max_shard_size is not None:
        raise QloraError("--max-shard-size is for --format safetensors (a GGUF is one file)")
    if args.format == "gguf-lora":
        if args.merge_into != "dequantized" or args.base_only:
            raise QloraError(f"{'--base-only' if args.base_only else '--merge-into'} does not apply to "
                             "--format gguf-lora (the adapter alone, merged into nothing)")
        r = export_gguf_lora(args.source, args.out, dtype=args.dtype, force=args.force,
                             verify=not args.no_verify, base=args.base)
        print(f"exported {r['modules']} LoRA pairs (r {r['rank']}, alpha {r['lora_alpha']:g}) to {r['out']}\n"
              f"run it on a base GGUF (e.g. qlora export {args.source} --format gguf --base-only): "
              f"llama-cli -m BASE.gguf --lora {r['out']}")
        return
    r = export_gguf(args.source, args.out, dtype=args.dtype, merge_into=args.merge_into,
                    base_only=args.base_only, force=args.force, verify=not args.no_verify, base=args.base,
                    device=args.device)
    from .ollama import ollama_name
    name = ollama_name(Path(r["out"]).stem)
    what = "the base alone" if r["base_only"] else f"{r['tensors_merged']} merged tensors"
    print(f"exported {what} to {r['out']} ({r['architecture']}, {r['dtype']}, tokenizer {r['tokenizer']}"
          + (f", all {r['verified_tensors']} tensors verified" if r["verified"] else "") + f") and {r['modelfile']}\n"
          f"run it: llama-cli -m {r['out']}   |   ollama create {name} -f {r['modelfile']} && ollama run {name}")


def _resolved(args):
    """The model source of `args.model`, loaded on `args.device`; says when a run without
    its final adapter falls back to its latest checkpoint."""
    if args.model is None:
        raise QloraError(f"{args.command} needs MODEL (a run, checkpoint, adapter or model folder) "
                         "or --adapter NAME=PATH")
    from .generate import load_resolved
    from .model import resolve_device
    from .resolve import resolve
    device = resolve_device(args.device)  # before anything is read or downloaded
    src = resolve(args.model, base=args.base)
    if not src.final:
        print(f"qlora: {src.path} has no final adapter (the run did not finish); using its latest "
              f"checkpoint {src.adapter}", file=sys.stderr)
    model, tokenizer = load_resolved(src, device)
    return src, model, tokenizer


def _check_numbers(args, rules: dict[str, tuple]) -> None:
    """Numeric flags, before anything is loaded: {flag: (test, what it must be)}."""
    for flag, (ok, must) in rules.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if not ok(value):
            raise QloraError(f"{flag}: must be {must}, got {value}")


def _generate(args) -> None:
    from .generate import generate, prompt_style
    _check_numbers(args, {"--max-new-tokens": (lambda v: v >= 1, "at least 1"),
                          "--temperature": (lambda v: v >= 0, ">= 0 (0 is greedy)"),
                          "--top-p": (lambda v: 0 < v <= 1, "in (0, 1]")})
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)

    def style_of(src, tokenizer):
        return "raw" if args.raw else "chat" if args.chat else prompt_style(src.data_format, tokenizer)

    if args.adapter:  # one base, each prompt answered by every adapter in turn
        adapters = _adapter_set(args)
        answer = lambda prompt: [_answer_with(adapters, name, prompt, style_of, kw)  # noqa: E731
                                 for name in adapters.sources]
        what = f"{len(adapters.sources)} adapters on one base"
    else:
        src, model, tokenizer = _resolved(args)
        style = style_of(src, tokenizer)
        answer = lambda prompt: (generate(model, tokenizer, prompt, stream=True, style=style, **kw),  # noqa: E731
                                 print())
        what = f"{style} rendering"
    if args.prompt is not None:
        answer(args.prompt)
        return
    print(f"one prompt per line ({what}); empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        answer(line.strip())


def _adapter_set(args):
    """--adapter NAME=PATH ...: the set, on the base MODEL names (when given, it must be theirs)."""
    from .adapter_set import AdapterSet, parse_adapter_flags
    from .model import resolve_device
    from .resolve import resolve
    resolve_device(args.device)
    named = parse_adapter_flags(args.adapter)
    if args.model is not None:
        src = resolve(args.model, base=args.base)
        if src.adapter is not None:
            raise QloraError(f"{args.model}: with --adapter, MODEL is the base model the adapters "
                             "share (or leave it out); give this adapter as --adapter NAME=PATH")
        expect = src.model
    else:
        expect = None
    return AdapterSet.load(named, base=args.base, expect_base=expect, device=args.device)


def _answer_with(adapters, name, prompt, style_of, kw) -> None:
    from .generate import generate
    model = adapters.use(name)
    print(f"[{name}] ", end="", flush=True)
    generate(model, adapters.tokenizer, prompt, stream=True,
             style=style_of(adapters.sources[name], adapters.tokenizer), **kw)
    print()


def _eval(args) -> None:
    from .evaluate import evaluate_model
    _check_numbers(args, {"--max-seq-len": (lambda v: v >= 2, "at least 2"),
                          "--batch-size": (lambda v: v >= 1, "at least 1")})
    from .model import resolve_device
    resolve_device(args.device)  # the flags first, then the files
    if not Path(args.data).exists() and not looks_like_hub_id(args.data):
        raise QloraError(f"--data: path not found: {args.data}")
    kw = dict(format=args.format, max_seq_len=args.max_seq_len, batch_size=args.batch_size)
    if args.adapter:
        adapters = _adapter_set(args)
        for name in adapters.sources:
            r = evaluate_model(adapters.use(name), adapters.tokenizer, args.data, **kw)
            print(f"{name}: {_eval_line(args.data, r)}")
        return
    _, model, tokenizer = _resolved(args)
    print(_eval_line(args.data, evaluate_model(model, tokenizer, args.data, **kw)))


def _eval_line(data, r) -> str:
    return (f"{data}: loss {r['loss']:.4f}, perplexity {r['ppl']:.3f} over {r['tokens']} tokens "
            f"in {r['examples']} examples")


def _inspect(args) -> None:
    import json
    from .inspect_adapter import format_report, inspect_adapters
    if args.base_weights is not None and args.base is None:
        raise QloraError("--base-weights needs --base MODEL")
    report = inspect_adapters(args.adapter, args.other, base=args.base,
                              base_weights=args.base_weights or "dequantized", layers=args.layers,
                              out=args.out, force=args.force)
    wrote = f"wrote {', '.join(report.files)} to {report.out}" if report.out else None
    if args.json:
        print(json.dumps({"layers": report.layers}))
        for note in ([wrote] if wrote else []) + ([f"no similarity for module(s) in only one adapter: "
                                                   f"{', '.join(report.skipped)}"] if report.skipped else []):
            print(f"qlora: {note}", file=sys.stderr)
        return
    print(format_report(report))
    if wrote:
        print(wrote)


def _demo(args) -> None:
    from .demo import run_demo
    run_demo(Path(args.out), steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora", description=(
        "QLoRA fine-tuning: a frozen 4-bit NF4 base (bitsandbytes) with LoRA factors, "
        "PEFT-compatible adapters, resumable runs and streaming fp16/bf16 export."))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune from a recipe, or resume a run",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Fine-tune a model from a YAML recipe.", epilog=_recipe_help())
    t.add_argument("recipe", nargs="?", help="recipe YAML file (see recipes/)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue RUN_DIR from its newest intact checkpoint (a run that stopped before "
                        "its first checkpoint starts over)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in train.output_dir instead of refusing to touch it")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set train.max_steps=100")
    t.add_argument("--force", action="store_true",
                   help="train even when `qlora plan` predicts that the recipe does not fit the device")
    t.set_defaults(func=_train)

    pl = sub.add_parser("plan", help="will a recipe fit on a GPU (or CPU)? every memory term, and what makes it fit",
                        description="Predict the peak memory of `qlora train RECIPE` from the model's config.json "
                                    "alone (no weights): every term of qlora's implementation, the moment of the "
                                    "peak, and when it does not fit, the cheapest changes that do, each with its "
                                    "peak and cost. Sizes are binary (24GB = 24 GiB).")
    pl.add_argument("recipe", help="recipe YAML file (see recipes/)")
    pl.add_argument("--device", metavar="DEVICE",
                    help="cuda:SIZE (e.g. cuda:24GB), cuda (this machine's GPU), cpu:SIZE or cpu (RAM "
                         "available now); default: where `qlora train` would run")
    pl.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                    help="override a recipe value (repeatable), e.g. --set train.batch_size=2")
    pl.add_argument("--json", action="store_true",
                    help="print one JSON object (peak_bytes, device_bytes, fits, terms, phases, advice)")
    pl.set_defaults(func=_plan)

    device_help = "cpu, cuda or cuda:N (default: cuda when a GPU is available, else cpu)"
    e = sub.add_parser("export", help="merge an adapter into a full fp16/bf16 Hugging Face checkpoint, or GGUF",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPORT_EPILOG,
                       description="Dequantize the NF4 base, add (alpha/r)*B*A, write sharded safetensors "
                                   "that plain transformers loads and verify them against the adapter on its "
                                   "4-bit base one decoder layer at a time, or write one GGUF file for "
                                   "llama.cpp / Ollama (--format gguf, with an Ollama Modelfile beside it), or "
                                   "the adapter alone as a GGUF LoRA (--format gguf-lora). Streams tensor by "
                                   "tensor and layer by layer: memory grows with the largest weight matrix "
                                   "(about 7x it while re-quantizing), not the model.")
    e.add_argument("source", help="run directory, checkpoint directory or adapter directory")
    e.add_argument("--out", required=True, help="output folder (safetensors: must be empty or absent unless "
                                                "--force), or the .gguf file (must not exist unless --force)")
    e.add_argument("--format", choices=["safetensors", "gguf", "gguf-lora"], default="safetensors",
                   help="safetensors (default): a Hugging Face folder; gguf: one llama.cpp file plus an Ollama "
                        "Modelfile; gguf-lora: the adapter alone, for llama.cpp --lora")
    e.add_argument("--dtype", choices=["fp16", "f16", "bf16", "q8_0"], default="fp16",
                   help="weight type (default fp16, which GGUF calls f16); q8_0: GGUF only, 8-bit blocks of "
                        "32 (every row width must be a multiple of 32)")
    e.add_argument("--base-only", action="store_true",
                   help="--format gguf: write the base alone (as training saw it), the base for gguf-lora adapters")
    e.add_argument("--merge-into", choices=["dequantized", "original"], default="dequantized",
                   help="merge into the dequantized NF4 weights training saw (default), or into the "
                        "original 16-bit base weights")
    e.add_argument("--max-shard-size", help="largest shard file (default 5GB; safetensors only)")
    e.add_argument("--base", help="base model path when the adapter does not name one")
    e.add_argument("--device", help=f"where to merge and verify: {device_help}")
    e.add_argument("--force", action="store_true",
                   help="replace an existing output (folder, or .gguf and its Modelfile) once the new one is complete")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the check before publishing (safetensors: the export against the adapter on its "
                        "4-bit base, layer by layer; gguf: re-read every tensor and compare it with the merge)")
    e.set_defaults(func=_export)

    g = sub.add_parser("generate", help="generate text from a run, checkpoint, adapter or model folder",
                       description="Prompts are rendered as the run's training data was: the Alpaca template "
                                   "for Alpaca runs, the chat template for chat runs, as-is for text; a model "
                                   "of unknown training gets the chat template when its tokenizer has one.")
    g.add_argument("model", nargs="?", help="run, checkpoint, adapter or model folder (a run without its "
                                            "final adapter uses its latest checkpoint); with --adapter, "
                                            "the base they share (optional)")
    g.add_argument("--prompt", help="prompt text; without it, prompts are read from stdin, one per line")
    style = g.add_mutually_exclusive_group()
    style.add_argument("--chat", action="store_true", help="render prompts through the chat template")
    style.add_argument("--raw", action="store_true", help="feed prompts as they are, no template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--base", help="base model path when the adapter does not name one")
    g.add_argument("--device", help=device_help)
    g.add_argument("--adapter", action="append", metavar="NAME=PATH", help=ADAPTER_HELP)
    g.set_defaults(func=_generate)

    v = sub.add_parser("eval", help="loss and perplexity of a model on a data file")
    v.add_argument("model", nargs="?", help="run, checkpoint, adapter or model folder; with --adapter, "
                                            "the base they share (optional)")
    v.add_argument("--data", required=True, help="JSON/JSONL/CSV/Parquet file in any supported format")
    v.add_argument("--format", default="auto", help="data format (default: detect from columns)")
    v.add_argument("--max-seq-len", type=int, default=512)
    v.add_argument("--batch-size", type=int, default=4)
    v.add_argument("--base", help="base model path when the adapter does not name one")
    v.add_argument("--device", help=device_help)
    v.add_argument("--adapter", action="append", metavar="NAME=PATH", help=ADAPTER_HELP + "; one line each")
    v.set_defaults(func=_eval)

    i = sub.add_parser("inspect", help="rank analysis of an adapter; subspace similarity of two",
                       description="Per adapted layer: the singular values of scaling*B*A (through the "
                                   "r x r core, never the full matrix), entropy effective rank, how many exceed "
                                   "1% of the largest, and with --base ||dW||/||W||. With OTHER: the LoRA paper's "
                                   "subspace similarity phi(A1, A2, i, j) as a table and one heat-map PNG per "
                                   "layer type.")
    i.add_argument("adapter", metavar="ADAPTER", help="run directory, checkpoint directory or adapter directory")
    i.add_argument("other", metavar="OTHER", nargs="?", help="a second adapter to compare with (same base model)")
    i.add_argument("--base", metavar="MODEL", help="base model: also report ||dW||_F / ||W||_F (streamed tensor by tensor)")
    i.add_argument("--base-weights", choices=["dequantized", "original"], default=None,
                   help="W as training saw it, re-quantized with the run's settings (default), or the "
                        "original checkpoint weight")
    i.add_argument("--layers", nargs="+", metavar="TYPE",
                   help="layer types (q_proj ...) or full module names to analyse, one heat-map each "
                        "(default: every type)")
    i.add_argument("--json", action="store_true",
                   help='print {"layers": {MODULE: {"singular_values": [...], "similarity": [[...]]...}}}')
    i.add_argument("--out", metavar="DIR", help="folder for the heat-maps and tables (two adapters; default: "
                                 "inspect-NAME1-vs-NAME2 beside the first adapter's folder)")
    i.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    i.set_defaults(func=_inspect)

    d = sub.add_parser("demo", help="the whole pipeline on a built-in tiny model and task (no downloads)",
                       description="Builds a small Llama-style model and tokenizer locally, makes a task "
                                   "dataset, then quantizes, trains LoRA, checkpoints, exports, reloads with "
                                   "plain transformers and generates; prints a report.")
    d.add_argument("--out", default="runs/demo-builtin", help="working folder (replaced if it exists)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    d.set_defaults(func=_demo)
    return p


ADAPTER_HELP = ("an adapter (run, checkpoint or adapter folder) under a name; repeatable: the base is "
                "loaded once and the adapters take turns on it")

EXPORT_EPILOG = """\
run a GGUF export:
  qlora export runs/demo --format gguf --out demo.gguf            # also writes demo.Modelfile
  llama-cli -m demo.gguf                                          # llama.cpp chat (the chat template is embedded)
  llama-server -m demo.gguf                                       # OpenAI-compatible server on :8080
  ollama create demo -f demo.Modelfile && ollama run demo         # the Modelfile's header has the exact command

one base GGUF, many adapters:
  qlora export runs/demo --format gguf --base-only --out base.gguf
  qlora export runs/demo --format gguf-lora --out demo-lora.gguf
  llama-cli -m base.gguf --lora demo-lora.gguf
  Ollama: a Modelfile with FROM <the base model> and ADAPTER ./demo-lora.gguf
"""


def _recipe_help() -> str:
    try:
        from .config import describe_fields
        return "recipe keys:\n" + describe_fields()
    except ImportError:
        return ""


def _quiet_libraries() -> None:
    """Our own lines say what each phase did; `datasets` would add a progress bar per file,
    split, filter and map on every run."""
    try:
        import datasets
        datasets.disable_progress_bars()
    except ImportError:
        pass


def _wait_for_the_other_processes(timeout_s: float = 10.0) -> None:
    """Under `accelerate launch` the launcher stops every process as soon as one exits, so a
    process that exits at once can kill another before it printed its line. A user error
    reaches all processes alike (processes.py): meet at a barrier first. It runs in a daemon
    thread, so a process whose peers are elsewhere still exits after `timeout_s`."""
    dist = sys.modules.get("torch.distributed")  # never imported: no process group to wait for
    if dist is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    import threading
    waiting = threading.Thread(target=dist.barrier, daemon=True)
    waiting.start()
    waiting.join(timeout_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except QloraError as e:
        # one write of the whole line: under `accelerate launch` the processes share stderr,
        # and print's separate write of the newline let two lines interleave into one
        sys.stderr.write(f"qlora: error: {e}\n")
        sys.stderr.flush()
        _wait_for_the_other_processes()
        return EXIT_USER_ERROR
    except TrainingInterrupted as e:
        print(f"qlora: {e}; continue with `qlora train --resume {e.path.parent}`", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("qlora: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
