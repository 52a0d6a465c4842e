"""Where training numbers go: metrics.jsonl (always), TensorBoard (when installed), and a
loss-curve PNG at the end (when matplotlib is installed). Only the main process logs."""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process since the last `reset_peak_memory`, in GiB.

    CUDA: the caching allocator's peak *reserved* bytes (what it took from the driver, not
    the smaller `max_memory_allocated`) plus paged optimizer state, which lives in managed
    memory the allocator never sees; the CUDA context (~0.3-0.6 GB) is not included
    (`device_used_gb` has it). CPU: the peak resident set size (VmHWM).
    """
    if device.type == "cuda":
        from .optim import paged_bytes
        return (torch.cuda.max_memory_reserved(device) + paged_bytes()) / 2**30
    return _vm_hwm_kib() / 2**20


def device_used_gb(device: torch.device) -> float | None:
    """What the GPU holds right now, for every process and the CUDA context (cudaMemGetInfo,
    as nvidia-smi reports it); None on CPU."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over (after loading, so the training peak is not the loading peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak keeps counting from the start of the process


def _vm_hwm_kib() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps run again.
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        # On resume, events after the checkpoint's step are purged: those steps run again.
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def plot_loss(run_dir: Path) -> Path | None:
    """loss.png: training loss per step and eval loss at each evaluation."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
