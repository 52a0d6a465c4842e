"""Layer streaming (`model.offload`): the frozen 4-bit weights of decoder layers live in a
*home* store and are brought to the compute device just before the layer runs.

Why it works: the base is frozen and a training step uses the decoder layers in a fixed
order (forward 0..L-1, then recompute + backward L-1..0), so while one layer computes the
next can be read in, and two layer-sized buffers are enough whatever the depth. Homes:

* `MemoryHome`: host memory, pinned on a GPU machine (copies run on a side stream);
* `DiskHome`: a file, read per layer with `os.preadv` (a model larger than RAM trains). A
  pre-quantized checkpoint's own files are such a file: its layers are read in place.

Only the packed 4-bit codes and their (double-quantized) block scales move: LoRA factors,
norms, embeddings, head and the tiny second-level quantization state stay resident. The bytes
are the same, so an offloaded model computes bitwise what a resident one does.

One layer's payload is a flat uint8 buffer of 64-byte aligned slots:

    for each 4-bit linear, in module order:  codes (n*k/2 B) | absmax (n*k/64 B, or x4 fp32)
"""

from __future__ import annotations

import atexit
import concurrent.futures
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import quant
from .errors import QloraError

ALIGN = 64
HOMES = ("none", "cpu", "disk")
# resident_layers "auto" leaves this share of the device (at least RESERVE_MIN) for
# activations, optimizer state and the runtime.
RESERVE_FRACTION = 0.2
RESERVE_MIN = 1.5 * 2**30


@dataclass
class Slot:
    """Where one tensor of a 4-bit linear sits in its layer's payload buffer."""
    linear: nn.Module  # the QuantLinear
    what: str  # "codes" (weight.data) or "absmax" (weight.quant_state.absmax)
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf[self.offset:self.offset + self.nbytes].view(self.dtype).view(self.shape)

    def current(self) -> torch.Tensor:
        w = self.linear.weight
        return w.data if self.what == "codes" else w.quant_state.absmax

    def bind(self, t: torch.Tensor) -> None:
        w = self.linear.weight
        if self.what == "codes":
            w.data = t
        else:
            w.quant_state.absmax = t


def _layout(weights: list[int], double_quant: bool, blocksize: int):
    """(linear index, what, dtype, shape, offset, nbytes) of every tensor in a layer payload
    whose 4-bit linears hold `weights` weights each, in module order."""
    offset = 0
    for i, n in enumerate(weights):
        for what, dtype, shape in (
                ("codes", torch.uint8, ((n + 1) // 2, 1)),
                ("absmax", torch.uint8 if double_quant else torch.float32, (math.ceil(n / blocksize),))):
            nbytes = math.prod(shape) * dtype.itemsize
            yield i, what, dtype, shape, offset, nbytes
            offset += -(-nbytes // ALIGN) * ALIGN


def layer_slots(layer: nn.Module, double_quant: bool, blocksize: int) -> list[Slot]:
    """The payload layout of one decoder layer, from shapes only (works on meta modules)."""
    from .quant import QuantLinear
    linears = [m for m in layer.modules() if isinstance(m, QuantLinear)]
    return [Slot(linears[i], what, dtype, shape, offset, nbytes) for i, what, dtype, shape, offset, nbytes
            in _layout([m.out_features * m.in_features for m in linears], double_quant, blocksize)]


def payload_bytes(slots: list[Slot]) -> int:
    return max((s.offset + s.nbytes for s in slots), default=0)


def layer_payload_bytes(weights: list[int], double_quant: bool, blocksize: int) -> int:
    """`payload_bytes` of a layer whose 4-bit linears hold `weights` weights each (no
    modules needed: `qlora plan` sizes the home and the prefetch ring with it)."""
    return max((offset + nbytes for *_, offset, nbytes in _layout(weights, double_quant, blocksize)), default=0)


# ----------------------------------------------------------------------------- homes


class MemoryHome:
    """Payloads in host memory: one buffer per layer, pinned when the device is CUDA so
    host-to-device copies are asynchronous DMA."""

    def __init__(self, sizes: dict[int, int], pin: bool):
        self.buffers = {i: torch.empty(n, dtype=torch.uint8, pin_memory=pin) for i, n in sizes.items()}

    def write(self, layer: int, offset: int, t: torch.Tensor) -> None:
        src = t.detach().reshape(-1).view(torch.uint8)
        self.buffers[layer][offset:offset + src.numel()].copy_(src)

    def host(self, layer: int, staging: torch.Tensor | None = None) -> torch.Tensor:
        return self.buffers[layer]

    def read_into(self, layer: int, out: torch.Tensor) -> None:
        out[:self.buffers[layer].numel()].copy_(self.buffers[layer])

    def close(self) -> None:
        self.buffers.clear()


class DiskHome:
    """Payloads in files: our own scratch file (`layers-<pid>.bin` in `folder`, removed at
    exit; stale ones of dead processes are removed when the next one starts) and/or the
    files of a pre-quantized checkpoint, referenced in place."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QloraError(f"model.offload_dir: cannot create {folder} ({e.strerror})") from None
        _remove_stale_files(folder)
        self.path = folder / f"layers-{os.getpid()}.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.end = 0
        self.fds: dict[str, int] = {str(self.path): self.fd}
        self.segments: dict[int, list[tuple[int, int, int, int]]] = {}  # (fd, file_off, buf_off, n)
        atexit.register(self.close)

    def write(self, layer: int, offset: int, t: torch.Tensor) -> None:
        # on a GPU the codes were quantized there: one copy to host memory on the way to disk
        data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        os.pwrite(self.fd, memoryview(data), self.end)
        self._add(layer, self.fd, self.end, offset, data.nbytes)
        self.end += -(-data.nbytes // ALIGN) * ALIGN

    def reference(self, layer: int, offset: int, path: Path, file_offset: int, nbytes: int) -> None:
        """A payload slot that already sits in another file (a pre-quantized checkpoint)."""
        fd = self.fds.get(str(path))
        if fd is None:
            fd = self.fds[str(path)] = os.open(path, os.O_RDONLY)
        self._add(layer, fd, file_offset, offset, nbytes)

    def _add(self, layer, fd, file_off, buf_off, n) -> None:
        segs = self.segments.setdefault(layer, [])
        last = segs[-1] if segs else None
        if last and last[0] == fd and last[1] + last[3] == file_off and last[2] + last[3] == buf_off:
            segs[-1] = (fd, last[1], last[2], last[3] + n)  # contiguous: one read
        else:
            segs.append((fd, file_off, buf_off, n))

    def read_into(self, layer: int, out: torch.Tensor) -> None:
        view = memoryview(out.numpy())
        for fd, file_off, buf_off, n in self.segments[layer]:
            done = 0
            while done < n:  # preadv may return short reads
                got = os.preadv(fd, [view[buf_off + done:buf_off + n]], file_off + done)
                if got <= 0:
                    raise QloraError(f"offload home: truncated read at offset {file_off + done}")
                done += got

    def host(self, layer: int, staging: torch.Tensor) -> torch.Tensor:
        self.read_into(layer, staging)
        return staging

    def close(self) -> None:
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        try:
            self.path.unlink()
        except OSError:
            pass


def _remove_stale_files(folder: Path) -> None:
    """Scratch files of processes that died (SIGKILL skips atexit) would fill the disk."""
    for f in folder.glob("layers-*.bin"):
        try:
            pid = int(f.stem.split("-", 1)[1])
            os.kill(pid, 0)  # alive: leave it alone
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            pass


# ----------------------------------------------------------------------------- the streamer


@dataclass
class StreamStats:
    fetches: int = 0
    bytes: int = 0
    io_seconds: float = 0.0  # worker time reading/copying payloads
    wait_seconds: float = 0.0  # compute thread blocked waiting for a layer


@dataclass
class LayerStreamer:
    """Keeps the 4-bit payloads of the `streamed` decoder layers in `home` and attaches
    each one just before it is used: `use(i, step)` attaches layer i, drops the others and
    prefetches layer i + step (step +1 in forward passes, -1 in backward)."""
    layers: nn.ModuleList
    streamed: list[int]
    home: MemoryHome | DiskHome
    device: torch.device
    slots: dict[int, list[Slot]]
    stats: StreamStats = field(default_factory=StreamStats)

    def __post_init__(self):
        self.size = max((payload_bytes(s) for s in self.slots.values()), default=0)
        self.attached: dict[int, torch.Tensor] = {}  # layer -> the buffer its views point into
        self.pending: tuple[int, concurrent.futures.Future] | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qlora-offload")
        self.cuda = self.device.type == "cuda"
        self.free: list[torch.Tensor] = []  # CPU: a ring of two payload buffers
        self.staging: list[torch.Tensor] = []  # CUDA + disk: pinned host buffers
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self._placeholders = {}

    # -- loading

    def adopt(self, layer: int, linear: nn.Module) -> None:
        """Move a freshly quantized linear's payload into the home and detach it."""
        for s in self.slots[layer]:
            if s.linear is linear:
                self.home.write(layer, s.offset, s.current())
                self._detach_slot(s)
        linear.weight._qlora_stream = (self, layer)

    def reference(self, layer: int, linear: nn.Module, what: str, path: Path, file_offset: int,
                  nbytes: int) -> None:
        """A pre-quantized checkpoint's tensor that the disk home reads in place."""
        for s in self.slots[layer]:
            if s.linear is linear and s.what == what:
                if nbytes != s.nbytes:
                    raise QloraError(f"{path}: {what} of a layer-{layer} linear has {nbytes} bytes, "
                                     f"{s.nbytes} expected (a block size other than 64 cannot be "
                                     "streamed from disk)")
                self.home.reference(layer, s.offset, path, file_offset, nbytes)
                self._detach_slot(s)
        linear.weight._qlora_stream = (self, layer)

    # -- running

    def use(self, i: int, step: int) -> None:
        if i in self.slots and i not in self.attached:
            buf = self._take(i)
            self._detach_all()
            self._attach(i, buf)
        elif i not in self.slots:
            self._detach_all()  # past the streamed layers: their work is done
        nxt = self._next(i, step)
        if nxt is not None and nxt not in self.attached and not (self.pending and self.pending[0] == nxt):
            self._settle_pending()
            self.pending = (nxt, self.pool.submit(self._fetch, nxt, self._buffer()))

    def ensure(self, i: int) -> None:
        """Attach layer i now if it is not (a backward pass without checkpointing)."""
        if i not in self.attached:
            self.use(i, -1)

    def _next(self, i: int, step: int) -> int | None:
        j = i + step
        if j >= len(self.layers) and not torch.is_grad_enabled():
            j = 0  # generation and evaluation loop over the layers again
        return j if j in self.slots and 0 <= j < len(self.layers) else None

    def _take(self, i: int) -> torch.Tensor:
        t0 = time.perf_counter()
        if self.pending and self.pending[0] == i:
            buf = self.pending[1].result()
            self.pending = None
        else:
            self._settle_pending()
            buf = self._fetch(i, self._buffer())
        self.stats.wait_seconds += time.perf_counter() - t0
        return buf

    def _settle_pending(self) -> None:
        """Wait for a prefetch that will not be used and return its buffer."""
        if self.pending:
            buf = self.pending[1].result()
            self.pending = None
            if not self.cuda:
                self.free.append(buf)

    def _buffer(self) -> torch.Tensor | None:
        if self.cuda:
            return None  # each fetch allocates on the device (caching allocator)
        if self.free:
            return self.free.pop()
        return torch.empty(self.size, dtype=torch.uint8)

    def _fetch(self, i: int, buf: torch.Tensor | None) -> torch.Tensor:
        """Read layer i's payload (on the worker thread for prefetches)."""
        t0 = time.perf_counter()
        if not self.cuda:
            self.home.read_into(i, buf)
        else:
            staging = self._staging() if isinstance(self.home, DiskHome) else None
            host = self.home.host(i, staging)
            with torch.cuda.stream(self.side):
                buf = torch.empty(self.size, dtype=torch.uint8, device=self.device)
                buf[:host.numel()].copy_(host, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.side)
            done.synchronize()  # this thread only; the staging buffer is free again
            if staging is not None:
                self.staging.append(staging)
            buf.qlora_ready = done
        self.stats.fetches += 1
        self.stats.bytes += payload_bytes(self.slots[i])
        self.stats.io_seconds += time.perf_counter() - t0
        return buf

    def _staging(self) -> torch.Tensor:
        return self.staging.pop() if self.staging else \
            torch.empty(self.size, dtype=torch.uint8, pin_memory=True)

    def _attach(self, i: int, buf: torch.Tensor) -> None:
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(buf.qlora_ready)
            buf.record_stream(stream)  # freed only after this stream's kernels ran
        for s in self.slots[i]:
            s.bind(s.view(buf))
        self.attached[i] = buf

    def _detach_all(self) -> None:
        for i in list(self.attached):
            for s in self.slots[i]:
                self._detach_slot(s)
            buf = self.attached.pop(i)
            if not self.cuda:
                self.free.append(buf)

    def _detach_slot(self, s: Slot) -> None:
        key = (s.dtype, s.current().device)
        if key not in self._placeholders:
            self._placeholders[key] = torch.empty(0, dtype=s.dtype, device=s.current().device)
        s.bind(self._placeholders[key])

    def release(self) -> None:
        """Drop every attached payload (between a training step and an evaluation, say)."""
        self._settle_pending()
        self._detach_all()

    def close(self) -> None:
        self.release()
        self.pool.shutdown(wait=True)
        self.home.close()


# ----------------------------------------------------------------------------- setup


def resident_count(resident_layers: int | str, n_layers: int, layer_bytes: int,
                   device: torch.device, other_bytes: int = 0) -> int:
    """How many decoder layers stay resident: `resident_layers` as given, or with "auto" as
    many as fit the device's free memory after `other_bytes` and a reserve for activations,
    optimizer state and the runtime (20% of the device, at least 1.5 GiB)."""
    if resident_layers != "auto":
        return max(0, min(n_layers, int(resident_layers)))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        free, total = _host_available(), _host_total()
    return resident_within(free, total, n_layers, layer_bytes, other_bytes)


def resident_within(free: int, total: int, n_layers: int, layer_bytes: int, other_bytes: int) -> int:
    """resident_layers 'auto': the layers that fit `free` bytes after `other_bytes` and the
    reserve (RESERVE_FRACTION of `total`, at least RESERVE_MIN)."""
    budget = free - other_bytes - max(RESERVE_MIN, RESERVE_FRACTION * total)
    return max(0, min(n_layers, int(budget // max(layer_bytes, 1))))


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _host_total() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def make_streamer(layers: nn.ModuleList, *, home: str, folder: Path | None, resident: int,
                  double_quant: bool, blocksize: int, device: torch.device) -> LayerStreamer | None:
    """A streamer for the layers after the first `resident` ones (None if there are none)."""
    if home not in HOMES:
        raise QloraError(f"model.offload: expected one of {', '.join(HOMES)}, got {home!r}")
    streamed = list(range(resident, len(layers)))
    if home == "none" or not streamed:
        return None
    slots = {i: layer_slots(layers[i], double_quant, blocksize) for i in streamed}
    if home == "disk":
        if folder is None:
            raise QloraError("model.offload: disk needs model.offload_dir")
        store = DiskHome(folder)
    else:
        store = MemoryHome({i: payload_bytes(s) for i, s in slots.items()}, pin=device.type == "cuda")
    return LayerStreamer(layers, streamed, store, device, slots)


def attach_hooks(streamer: LayerStreamer) -> list:
    """Before each decoder layer's forward: attach it and prefetch the next one. (In the
    checkpoint's recompute `recompute_context` does it; see `quant.recomputing`.)"""
    return [layer.register_forward_pre_hook(_pre_hook(streamer, i))
            for i, layer in enumerate(streamer.layers)]


def _pre_hook(streamer: LayerStreamer, i: int):
    def hook(module, args):
        # In a recompute, `recompute_context` attached the layer and prefetches i-1; a +1
        # here would fetch i+1 again, in place of that prefetch.
        if not quant.recomputing():
            streamer.use(i, +1)
    return hook


class recompute_context:
    """Entered when checkpointing recomputes layer i in backward: attach it, prefetch i-1."""

    def __init__(self, streamer: LayerStreamer, i: int):
        self.streamer, self.i = streamer, i

    def __enter__(self):
        self.streamer.use(self.i, -1)

    def __exit__(self, *exc):
        return False
