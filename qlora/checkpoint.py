"""Training checkpoints: adapter + optimizer + scheduler + RNG + position, all or nothing.

    RUN_DIR/checkpoint-000040/
        adapter_config.json, adapter_model.safetensors   # PEFT format, loadable on its own
        optimizer.safetensors + optimizer.json            # tensors / everything else
        rng.safetensors                                   # CPU + CUDA RNG of every process
        trainer_state.json                                # step, scheduler, last eval, ...

Everything is safetensors or JSON (no pickle). A checkpoint folder is published by rename
(see atomic.py), so a folder named `checkpoint-N` is always complete.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import WEIGHTS_NAME, load_adapter_weights, write_adapter_files
from .atomic import write_atomically
from .errors import QloraError
from .optim import host_copy, load_optimizer_state
from .safetensors_io import check_intact

STATE_NAME = "trainer_state.json"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.checkpoint-*` folders are skipped)."""
    found = [p for p in Path(run_dir).glob("checkpoint-*")
             if PATTERN.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (a file missing, unreadable or cut short: a disk
    that filled up, a copy that was killed), or None. Reads headers only."""
    try:
        for name in (WEIGHTS_NAME, "optimizer.safetensors", "rng.safetensors"):
            check_intact(ckpt / name)
        for name in (STATE_NAME, "optimizer.json", "adapter_config.json"):
            json.loads((ckpt / name).read_text())
    except QloraError as e:
        return str(e)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{ckpt / name}: unreadable ({e.__class__.__name__})"
    return None


def resumable_checkpoint(run_dir: Path, warn=print) -> Path | None:
    """The newest checkpoint that is intact; each newer damaged one is reported via `warn`."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        warn(f"{ckpt.name} is damaged ({problem}); falling back to an older checkpoint")
    return None


ALIAS = "__same_tensor_as__"  # JSON stand-in for a tensor already saved under another key


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (keyed `param/key/subkey`) for safetensors; everything else for JSON.

    Per-parameter state can nest (bitsandbytes keeps `__bnb_optimizer_quant_state__`), so
    dicts are walked recursively. A tensor that shares memory with one already taken is saved
    once and referenced (`{ALIAS: key}`): bitsandbytes' 8-bit optimizers give every parameter
    the same quantization maps (`qmap1`, `qmap2`), and safetensors refuses shared tensors.
    Paged state is copied without pulling its pages through host memory (`optim.host_copy`).
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}

    def walk(value, key):
        if torch.is_tensor(value):
            ident = (value.device.type, value.untyped_storage().data_ptr(), value.storage_offset(),
                     tuple(value.shape), tuple(value.stride()), value.dtype)
            if value.numel() and ident in seen:
                return {ALIAS: seen[ident]}
            seen[ident] = key
            tensors[key] = host_copy(value)
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{key}/{k}") for k, v in value.items()}
        return value
    state = {str(idx): walk(entries, str(idx)) for idx, entries in sd["state"].items()}
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state = rest["state"]
    for key, v in tensors.items():
        *parents, leaf = key.split("/")
        node = state
        for p in parents:
            node = node[p]
        node[leaf] = v

    def resolve(node):  # aliases become the very same tensor object, shared as it was
        for k, v in node.items():
            if isinstance(v, dict) and set(v) == {ALIAS}:
                node[k] = tensors[v[ALIAS]]
            elif isinstance(v, dict):
                resolve(v)
    resolve(state)
    return {"state": {int(i): v for i, v in state.items()}, "param_groups": rest["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random generators: the CPU one and, on CUDA, every device's (LoRA
    dropout draws from the CUDA generator there)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[f"cuda{i}"] for i in range(len(states)) if f"cuda{i}" in states]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict,
                    rng_states: list[dict[str, torch.Tensor]]) -> Path:
    """Write checkpoint-<step> atomically. `state` must hold at least "step";
    `rng_states` holds every process's `rng_state()`, in rank order."""
    out = checkpoint_dir(run_dir, state["step"])
    opt_tensors, opt_rest = _split_optimizer_state(optimizer.state_dict())
    rng = {f"rank{i}.{k}": v for i, states in enumerate(rng_states) for k, v in states.items()}

    def write(tmp: Path):
        write_adapter_files(model, tmp)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
        save_file(rng, str(tmp / "rng.safetensors"))
        full = dict(state, scheduler=scheduler.state_dict(), world_size=len(rng_states))
        (tmp / STATE_NAME).write_text(json.dumps(full, indent=2))

    write_atomically(out, write)
    return out


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, rank: int, world_size: int) -> dict:
    """Restore everything saved by save_checkpoint; returns the trainer state dict."""
    state = json.loads((ckpt / STATE_NAME).read_text())
    if state.get("world_size", 1) != world_size:
        raise QloraError(f"{ckpt}: saved with {state['world_size']} processes, resuming with "
                         f"{world_size}; resume with the same number of processes")
    load_adapter_weights(model, load_file(str(ckpt / WEIGHTS_NAME)), source=str(ckpt))
    rest = json.loads((ckpt / "optimizer.json").read_text())
    load_optimizer_state(optimizer, _join_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), rest))
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(str(ckpt / "rng.safetensors"))
    prefix = f"rank{rank}."
    mine = {k[len(prefix):]: v for k, v in rng.items() if k.startswith(prefix)}
    set_rng_state(mine or {"cpu": rng[f"rank{rank}"]})  # older checkpoints: CPU state only
    return state


def rotate_checkpoints(run_dir: Path, limit: int) -> None:
    """Delete old checkpoints so that at most `limit` remain: the newest ones, and the best
    evaluated one when it is older (it then takes one of the `limit` places; with limit 1
    only the newest stays, since resuming needs it)."""
    ckpts = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    keep = set(ckpts[-limit:])
    if best is not None and best not in keep and limit > 1:
        keep = set(ckpts[-(limit - 1):]) | {best}
    for old in ckpts:
        if old not in keep:
            shutil.rmtree(old)


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint with the lowest eval loss among those evaluated at their own step.

    A checkpoint saved after an evaluation at an earlier step holds other weights than
    the ones that loss was measured on, so it is no candidate."""
    scored = []
    for c in list_checkpoints(run_dir):
        ev = json.loads((c / STATE_NAME).read_text()).get("eval") or {}
        if ev.get("step") == int(PATTERN.match(c.name).group(1)):
            scored.append((ev["loss"], c))
    return min(scored)[1] if scored else None
