"""Training checkpoints: adapter + optimizer + scheduler + RNG + position, all or nothing.

    RUN_DIR/checkpoint-000040/
        adapter_config.json, adapter_model.safetensors   # PEFT format, loadable on its own
        optimizer.safetensors + optimizer.json            # tensors / everything else
        rng.safetensors                                   # torch RNG of every process
        trainer_state.json                                # step, epoch, scheduler, eval loss

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


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (keyed `param/key/subkey`) for safetensors; everything else for JSON.

    Per-parameter state can nest (bitsandbytes keeps `__bnb_optimizer_quant_state__`), so
    dicts are walked recursively."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value, key):
        if torch.is_tensor(value):
            tensors[key] = value.detach().cpu().contiguous()
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
    return {"state": {int(i): v for i, v in state.items()}, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: Path, model, optimizer, scheduler, state: dict,
                    rng_states: list[torch.Tensor]) -> Path:
    """Write checkpoint-<step> atomically. `state` must hold at least "step"."""
    out = checkpoint_dir(run_dir, state["step"])
    opt_tensors, opt_rest = _split_optimizer_state(optimizer.state_dict())

    def write(tmp: Path):
        write_adapter_files(model, tmp)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_rest))
        save_file({f"rank{i}": s for i, s in enumerate(rng_states)}, str(tmp / "rng.safetensors"))
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
    optimizer.load_state_dict(_join_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), rest))
    scheduler.load_state_dict(state.pop("scheduler"))
    torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))[f"rank{rank}"])
    return state


def rotate_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and the best by eval loss."""
    ckpts = list_checkpoints(run_dir)
    best = best_checkpoint(run_dir)
    for old in ckpts[:-keep_last]:
        if old != best:
            shutil.rmtree(old)


def best_checkpoint(run_dir: Path) -> Path | None:
    scored = []
    for c in list_checkpoints(run_dir):
        loss = json.loads((c / STATE_NAME).read_text()).get("eval_loss")
        if loss is not None:
            scored.append((loss, c))
    return min(scored)[1] if scored else None
