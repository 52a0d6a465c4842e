"""The training loop: setup -> fit (-> evaluate, save) on accelerate, CPU or CUDA.

Data parallelism is explicit rather than DDP-wrapped: every process holds the 4-bit model,
computes the summed loss of its share of the step's examples, and the LoRA gradients are
all-reduced. Each micro-batch's loss is divided by the number of trained tokens in the whole
optimizer step (all micro-batches, all processes), so N processes x batch b is the same
optimization as 1 process x batch N*b, and padding never changes a token's weight.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .adapter import save_adapter
from .config import Recipe, save_resolved
from .data import Collator, GroupByLengthSampler, build_datasets, ensure_pad_token
from .errors import QloraError, TrainingInterrupted
from .generate import generate, prompt_style
from .lora import add_lora, trainable_report
from .loss import lm_loss_sum
from .metrics import MetricsLog, device_used_gb, peak_memory_gb, plot_loss, reset_peak_memory
from .checkpointing import enable_gradient_checkpointing, matmul_layers_within
from .model import decoder_layers, load_model, load_tokenizer, model_config
from .memory import release_if_grown, release_memory_per_layer
from .optim import LossScaler, build_optimizer, build_scheduler
from .processes import main_first
from .run_dir import plan_run_dir
from .run_dir import prepare as prepare_run_dir
from .plan import check_fits


@dataclass
class Run:
    """Everything setup() builds and fit() uses."""
    recipe: Recipe
    acc: Accelerator
    model: torch.nn.Module
    tokenizer: object
    train_ds: object
    eval_ds: object
    collator: Collator
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    steps_per_epoch: int
    run_dir: Path
    log: MetricsLog | None = None
    scaler: LossScaler | None = None  # fp16 compute only
    state: dict = field(default_factory=lambda: {"step": 0, "skipped_steps": 0})
    stop_signal: list = field(default_factory=list)
    last_eval: dict | None = None

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- setup

def setup(recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False) -> Run:
    r, t = recipe, recipe.train
    run_dir = Path(t.output_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    plan = plan_run_dir(run_dir, resume, overwrite)  # every process reads the same folder ...
    config = model_config(r.model.name_or_path)  # a bad model path fails before the tokenizer
    _check_against_model(r, config)
    if not force:  # before anything is loaded or written: a recipe that cannot fit stops here
        check_fits(recipe, acc.device, acc.num_processes)
    tokenizer = load_tokenizer(r.model.tokenizer or r.model.name_or_path)
    ensure_pad_token(tokenizer)
    _check_tokenizer(r, tokenizer, config)
    t0 = time.perf_counter()
    # The main process tokenizes into the datasets cache first; the others then read it
    # instead of all writing the same cache files at once.
    # A bad row stops every process with the same line (processes.py).
    train_ds, eval_ds, stats = main_first(acc, lambda: build_datasets(
        r.data.path, tokenizer, format=r.data.format, eval_path=r.data.eval_path,
        eval_ratio=r.data.eval_ratio, max_seq_len=r.data.max_seq_len,
        train_on_inputs=r.data.train_on_inputs, packing=r.data.packing,
        skip_malformed=r.data.skip_malformed, seed=t.seed, split=r.data.split,
        config_name=r.data.config_name))
    if len(train_ds) == 0:
        raise QloraError(f"{r.data.path}: no training example left after tokenization")
    # The run records the format 'auto' found, so that prompts are later rendered like its data.
    r = dataclasses.replace(r, data=dataclasses.replace(r.data, format=stats.format))
    acc.wait_for_everyone()
    if acc.is_main_process:  # ... before the main one changes it, once the inputs passed
        for note in plan.notes:
            tqdm.write(f"qlora: {note}")
        prepare_run_dir(plan)
    acc.wait_for_everyone()
    resume = plan.action == "resume"

    torch.manual_seed(t.seed)  # identical LoRA init on every process
    model = load_model(r.model.name_or_path, quantization=r.model.quantization,
                       double_quant=r.model.double_quant, compute_dtype=r.model.compute_dtype,
                       device=acc.device, offload=r.model.offload,
                       offload_dir=r.model.offload_dir or run_dir / "offload",
                       resident_layers=r.model.resident_layers, cache_dir=r.model.cache_dir)
    add_lora(model, r.lora)
    keep = 0
    if t.gradient_checkpointing:
        keep = matmul_layers_within(model, t.keep_matmuls_gb, t.batch_size * r.data.max_seq_len)
        enable_gradient_checkpointing(model, keep_matmul_layers=keep)
    if acc.device.type == "cpu":
        release_memory_per_layer(decoder_layers(model))
    torch.manual_seed(t.seed + acc.process_index)  # dropout differs per process, as in DDP

    step_examples = t.batch_size * t.grad_accum * acc.num_processes
    steps_per_epoch = math.ceil(len(train_ds) / step_examples)
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * steps_per_epoch)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad],
                                t.optimizer, t.lr, t.weight_decay)
    scheduler = build_scheduler(optimizer, total, t.warmup_ratio, t.schedule)
    run = Run(r, acc, model, tokenizer, train_ds, eval_ds, Collator(tokenizer.pad_token_id),
              optimizer, scheduler, total, steps_per_epoch, run_dir,
              scaler=LossScaler() if r.model.compute_dtype == "float16" else None,
              state={"step": 0, "skipped_steps": 0, "data": vars(stats)})
    resume_step = None
    if resume:
        path = _resume(run, plan.checkpoint)
        resume_step = run.state["step"]
    if acc.is_main_process:
        # on resume too: `--resume --set train.max_steps=70` must be what the next resume reads
        run_dir.mkdir(parents=True, exist_ok=True)
        save_resolved(r, run_dir / "recipe.yaml")
    run.log = MetricsLog(run_dir, acc.is_main_process, resume_step=resume_step)
    load = {"step": run.state["step"], "load_seconds": round(time.perf_counter() - t0, 2),
            "load_peak_mem_gb": peak_memory_gb(acc.device)}
    run.log.log(load)
    reset_peak_memory(acc.device)  # from here on, peak memory is the training peak
    if acc.is_main_process:
        if resume:
            tqdm.write(f"qlora: resuming from {path} (step {run.state['step']})")
        counts = trainable_report(model)
        tqdm.write(f"qlora: {len(train_ds)} train / {len(eval_ds) if eval_ds else 0} eval examples "
                   f"({stats.dropped_no_target} dropped with no target, {stats.truncated} truncated); "
                   f"trainable {counts['trainable']:,} of {counts['total']:,} parameters "
                   f"({100 * counts['trainable'] / counts['total']:.2f}%); {total} steps; "
                   f"loaded in {load['load_seconds']:.0f} s, peak {load['load_peak_mem_gb']:.2f} GiB")
        for line in stats.report(r.data.path):
            tqdm.write(f"qlora: {line}")
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and r.data.max_seq_len > positions:
            tqdm.write(f"qlora: warning: data.max_seq_len {r.data.max_seq_len} exceeds the model's "
                       f"max_position_embeddings {positions}: positions beyond it were never trained")
        if keep:
            tqdm.write(f"qlora: checkpointing keeps the 4-bit matmul outputs of "
                       f"{keep} of {len(decoder_layers(model))} layers")
    return run


def _check_against_model(r: Recipe, config) -> None:
    """What the model's config.json rules out in the recipe, before anything is read."""
    positions = getattr(config, "max_position_embeddings", None)
    if r.data.packing and positions and r.data.max_seq_len > positions:
        raise QloraError(f"data.max_seq_len: {r.data.max_seq_len} with data.packing packs rows that long "
                         f"(attention memory grows with its square); at most the model's "
                         f"max_position_embeddings, {positions}")


def _check_tokenizer(r: Recipe, tokenizer, config) -> None:
    """Token ids past the model's embeddings would crash at step 1: say so before loading."""
    vocab = getattr(config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise QloraError(f"model.tokenizer: {r.model.tokenizer or r.model.name_or_path} has {len(tokenizer)} "
                         f"tokens, more than the model's vocab_size {vocab} (ids past it have no embedding); "
                         "use the model's own tokenizer")


def _resume(run: Run, path: Path) -> Path:
    state = ckpt.load_checkpoint(path, run.model, run.optimizer, run.scheduler,
                                 run.acc.process_index, run.acc.num_processes)
    run.state.update(state)
    if run.scaler is not None and "loss_scaler" in state:
        run.scaler.load_state_dict(state["loss_scaler"])
    return path


# ----------------------------------------------------------------------------- data order

def step_examples(run: Run, step: int) -> list[list[int]]:
    """This process's micro-batches (lists of dataset indices) for optimizer step `step`.

    The order of an epoch is a pure function of (seed, epoch), so resuming at any step
    replays exactly the batches an uninterrupted run would have seen.
    """
    t = run.recipe.train
    epoch, k = divmod(step, run.steps_per_epoch)
    order = epoch_order(run, epoch)
    per_step = t.batch_size * t.grad_accum * run.acc.num_processes
    chunk = order[k * per_step:(k + 1) * per_step]
    per_proc = t.batch_size * t.grad_accum
    mine = chunk[run.acc.process_index * per_proc:(run.acc.process_index + 1) * per_proc]
    return [mine[i:i + t.batch_size] for i in range(0, len(mine), t.batch_size)]


def epoch_order(run: Run, epoch: int) -> list[int]:
    t, d = run.recipe.train, run.recipe.data
    if d.group_by_length and not d.packing:
        # Group by the examples processed side by side (all processes), so that N processes
        # x batch b see the same order as 1 process x batch N*b.
        sampler = GroupByLengthSampler(run.train_ds["length"], t.batch_size * run.acc.num_processes,
                                       seed=t.seed, epoch=epoch)
        return list(sampler)
    g = torch.Generator().manual_seed(t.seed * 1000003 + epoch)
    return torch.randperm(len(run.train_ds), generator=g).tolist()


# ----------------------------------------------------------------------------- fit

@dataclass
class StepResult:
    loss: float  # mean token loss over the whole step (all micro-batches, all processes)
    tokens: int  # trained tokens in the step
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    status: str  # "ok", "overflow" (fp16 loss scaling), "nonfinite_loss", "nonfinite_grad"


def fit(run: Run) -> dict:
    t, acc = run.recipe.train, run.acc
    run.model.train()
    bar = tqdm(total=run.total_steps, initial=run.state["step"], disable=not acc.is_main_process,
               desc="train", dynamic_ncols=True,
               # redraw ~10×/s on a terminal; in a log file a line every 30 s is plenty
               mininterval=0.1 if sys.stderr.isatty() else 30)
    old_handlers = _catch_signals(run)
    try:
        while run.state["step"] < run.total_steps:
            t0 = time.perf_counter()
            res = train_step(run)
            step = run.state["step"] = run.state["step"] + 1
            _apply_nan_policy(run, res, step)
            tok_s = res.tokens / (time.perf_counter() - t0)
            if step % t.logging_steps == 0 or step == run.total_steps or step == 1 or res.status != "ok":
                _log_step(run, res, step, tok_s)
            bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{res.lr:.2e}", tok_s=f"{tok_s:.0f}",
                            mem=f"{peak_memory_gb(acc.device):.2f}G", refresh=False)
            bar.update(1)
            last = step == run.total_steps
            if run.eval_ds is not None and (step % t.eval_steps == 0 or last):
                evaluate(run)  # the final step is always evaluated, before its checkpoint
            saved = save(run) if step % t.save_steps == 0 or last else None
            # A signal during the last step changes nothing: the run completes normally.
            if not last and _stop_requested(run):
                raise TrainingInterrupted(step, saved or save(run))
    except BaseException:
        run.log.close()
        raise
    finally:
        bar.close()
        _restore_signals(old_handlers)
    return finish(run)


def _apply_nan_policy(run: Run, res: StepResult, step: int) -> None:
    """A step whose loss or gradient is not finite was not applied: stop, or count it."""
    if res.status not in ("nonfinite_loss", "nonfinite_grad"):
        return
    what, value = (("loss", res.loss) if res.status == "nonfinite_loss"
                   else ("gradient norm", res.grad_norm))
    if run.recipe.train.nan_policy == "stop":
        last = ckpt.latest_checkpoint(run.run_dir)
        raise QloraError(f"non-finite {what} ({value}) at step {step}; stopped. Last good "
                         f"checkpoint: {last or 'none'} (set train.nan_policy=skip "
                         "to skip such steps, or lower train.lr)")
    run.state["skipped_steps"] += 1
    if run.acc.is_main_process:
        tqdm.write(f"qlora: step {step} skipped: non-finite {what} ({value}); "
                   f"{run.state['skipped_steps']} skipped so far")


def _log_step(run: Run, res: StepResult, step: int, tok_s: float) -> None:
    record = {"step": step, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
              "tokens_per_s": tok_s, "peak_mem_gb": peak_memory_gb(run.acc.device)}
    used = device_used_gb(run.acc.device)
    if used is not None:
        record["device_used_gb"] = used
    if run.scaler is not None:
        record["loss_scale"] = run.scaler.scale
    if res.status != "ok":
        record["status"] = res.status
    run.log.log(record)


def train_step(run: Run) -> StepResult:
    """One optimizer step over this process's micro-batches; numbers are global."""
    t = run.recipe.train
    batches = [run.collator([run.train_ds[i] for i in idx]) for idx in step_examples(run, run.state["step"])]
    batches = [{k: v.to(run.acc.device) for k, v in b.items()} for b in batches]
    local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total_tokens = _all_reduce(torch.tensor(float(local_tokens)), run).item()
    scale = run.scaler.scale if run.scaler is not None else 1.0
    loss_sum = torch.zeros((), dtype=torch.float64)
    on_cpu = run.acc.device.type == "cpu"
    for b in batches:
        s, _ = lm_loss_sum(run.model, b)
        if on_cpu:  # the forward's freed temporaries, before backward needs memory
            release_if_grown()
        (s * (scale / max(total_tokens, 1))).backward()
        loss_sum += s.detach().double().cpu()
    for p in run.params:  # every process joins the all-reduce, even with no example this step
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_grads(run)
    if scale != 1.0:
        for p in run.params:
            p.grad.div_(scale)
    loss = _all_reduce(loss_sum, run).item() / max(total_tokens, 1)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, t.max_grad_norm if t.max_grad_norm > 0
                                               else float("inf")).item()
    lr = run.scheduler.get_last_lr()[0]
    if not math.isfinite(loss):
        status = "nonfinite_loss"
    elif not math.isfinite(grad_norm):
        # Under fp16 loss scaling an overflow is routine: halve the scale and redo nothing.
        scaling = run.scaler is not None and run.scaler.scale > LossScaler.MIN_SCALE
        status = "overflow" if scaling else "nonfinite_grad"
    else:
        status = "ok"
        run.optimizer.step()
    if run.scaler is not None:
        run.scaler.update(overflow=status != "ok")
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if on_cpu:
        release_if_grown()
    return StepResult(loss, int(total_tokens), grad_norm, lr, status)


def _all_reduce(x: torch.Tensor, run: Run, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if run.acc.num_processes > 1:
        x = x.to(run.acc.device)
        dist.all_reduce(x, op=op)
    return x.cpu()


def _all_reduce_grads(run: Run) -> None:
    if run.acc.num_processes == 1:
        return
    grads = [p.grad for p in run.params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # one collective, not hundreds
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


# ----------------------------------------------------------------------------- evaluate

@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Eval loss (mean over trained tokens) and perplexity on the eval split; sample
    generations for `train.sample_prompts` go to metrics.jsonl."""
    t, acc = run.recipe.train, run.acc
    was_training = run.model.training
    run.model.eval()
    mine = list(range(acc.process_index, len(run.eval_ds), acc.num_processes))
    batches = [mine[i:i + t.batch_size] for i in range(0, len(mine), t.batch_size)]
    if t.eval_max_batches > 0:
        batches = batches[:t.eval_max_batches]
    sums = torch.zeros(2, dtype=torch.float64)  # (loss sum, tokens)
    for idx in batches:
        b = {k: v.to(acc.device) for k, v in run.collator([run.eval_ds[i] for i in idx]).items()}
        s, n = lm_loss_sum(run.model, b)
        sums += torch.tensor([s.item(), n], dtype=torch.float64)
    loss_sum, tokens = _all_reduce(sums, run).tolist()
    loss = loss_sum / max(tokens, 1)
    out = {"step": run.state["step"], "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}
    # Which weights this loss belongs to: only a checkpoint of this very step can be "best".
    run.state["eval"] = {"step": run.state["step"], "loss": loss}
    if t.sample_prompts and acc.is_main_process:
        style = prompt_style(run.recipe.data.format, run.tokenizer)  # rendered like the data
        out["samples"] = [{"prompt": p, "output": generate(
            run.model, run.tokenizer, p, max_new_tokens=t.sample_max_new_tokens, style=style)}
            for p in t.sample_prompts]
    run.log.log(out)
    if acc.is_main_process:
        tqdm.write(f"step {run.state['step']}: eval loss {loss:.4f}, ppl {out['eval_ppl']:.2f}")
    run.model.train(was_training)
    run.last_eval = out
    return out


# ----------------------------------------------------------------------------- save

def save(run: Run) -> Path:
    """Checkpoint (main process writes; every process contributes its RNG state)."""
    from accelerate.utils import gather_object
    rng = gather_object([ckpt.rng_state()])
    path = ckpt.checkpoint_dir(run.run_dir, run.state["step"])
    state = dict(run.state)
    if run.scaler is not None:
        state["loss_scaler"] = run.scaler.state_dict()
    if run.acc.is_main_process:
        ckpt.save_checkpoint(run.run_dir, run.model, run.optimizer, run.scheduler, state, rng)
        ckpt.rotate_checkpoints(run.run_dir, run.recipe.train.save_total_limit)
    run.acc.wait_for_everyone()
    return path


def finish(run: Run) -> dict:
    """Final adapter (PEFT format) in RUN_DIR/adapter, the loss plot, and a summary."""
    _check_replicas_agree(run)
    summary = {"steps": run.state["step"], "run_dir": str(run.run_dir),
               "is_main_process": run.acc.is_main_process,
               "skipped_steps": run.state["skipped_steps"]}
    if run.eval_ds is not None:
        ev = run.last_eval
        if ev is None or ev["step"] != run.state["step"]:  # e.g. resuming a finished run
            ev = evaluate(run)
        summary.update(ev)
    if run.acc.is_main_process:
        save_adapter(run.model, run.run_dir / "adapter")
        plot_loss(run.run_dir)
        run.log.close()
    streamer = getattr(run.model, "qlora_streamer", None)
    if streamer is not None:
        st = streamer.stats
        if run.acc.is_main_process:
            tqdm.write(f"qlora: streamed {st.fetches} layers ({st.bytes / 2**30:.1f} GiB): "
                       f"{st.io_seconds:.1f} s reading, {st.wait_seconds:.1f} s not hidden behind compute")
        streamer.close()
    run.acc.wait_for_everyone()
    return summary


def _check_replicas_agree(run: Run) -> None:
    """Every process must end with bitwise the same LoRA factors (same all-reduced gradients,
    same optimizer): compare a fingerprint of them across processes."""
    if run.acc.num_processes == 1:
        return
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in run.params])  # (P,)
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum(), (flat * weights).sum()])
    hi = _all_reduce(fingerprint.clone(), run, dist.ReduceOp.MAX)
    lo = _all_reduce(fingerprint.clone(), run, dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        raise RuntimeError(f"LoRA factors differ between the {run.acc.num_processes} processes "
                           f"at step {run.state['step']} (fingerprints {lo.tolist()} vs {hi.tolist()})")


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict:
    """Train from `recipe`; `resume` continues its output_dir from the newest intact
    checkpoint, `overwrite` replaces the run there (see run_dir.py for every case), `force`
    trains even when `qlora plan` predicts the recipe does not fit the device."""
    run = setup(recipe, resume=resume, overwrite=overwrite, force=force)
    return fit(run)


# ----------------------------------------------------------------------------- signals

def _catch_signals(run: Run):
    def handler(signum, frame):
        run.stop_signal.append(signum)  # acted on at the end of the current step
    try:
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread (e.g. inside some test runners): no handlers
        return {}


def _restore_signals(old) -> None:
    for s, h in old.items():
        signal.signal(s, h)


def _stop_requested(run: Run) -> bool:
    flag = torch.tensor(float(bool(run.stop_signal)))
    return _all_reduce(flag, run).item() > 0  # all processes stop at the same step
