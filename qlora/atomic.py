"""Publish folders (and groups of files) atomically: write into a temporary sibling, then rename.

    RUNS/merged                                   what readers see: complete or absent
    RUNS/.merged.tmp-HOST-PID-RANDOM              being written by process PID on HOST

A crash (even SIGKILL) mid-write leaves at most a hidden `.NAME.tmp-*` folder, never a
half-written NAME, and never touches an existing NAME. The next write of NAME removes the
temporaries that earlier, now dead, processes of this host left for it (a live process's
temporary is another write in progress and is left alone). The folder and its files get the
ordinary permissions (0777 / 0666 minus the umask), so a published model is readable by
whoever may read its parent, as with anything else the user makes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

_HOST = socket.gethostname()


def write_atomically(out_dir: Path, write) -> None:
    """Run `write(tmp_dir)` then publish tmp_dir as out_dir, so readers never see half a folder.

    An existing out_dir is replaced only after the new one is complete (the two folders
    are swapped in one step where the filesystem supports it).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out_dir)
    tmp = _temporary(out_dir)
    os.mkdir(tmp)  # not mkdtemp: its 0700 would make the published folder private
    try:
        write(tmp)
        file_mode = 0o666 & ~_umask()
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, file_mode)  # safetensors' save_file creates files 0600
                with open(f, "rb") as fh:  # make the bytes durable before the rename publishes them
                    os.fsync(fh.fileno())
        if out_dir.exists() and any(out_dir.iterdir()):
            _replace(tmp, out_dir)
        else:
            tmp.rename(out_dir)  # onto nothing, or onto an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files_atomically(outputs: dict[Path, object]) -> None:
    """Publish several files together: run each `write(tmp_path)` into a temporary sibling of
    its path (`.NAME.tmp-HOST-PID-RANDOM`, as for folders), then rename them all into place
    (replacing existing files only then).

    If any write raises, every temporary file is removed and nothing is published; a kill
    leaves at most hidden temporaries, never a half-written NAME, and the next write of NAME
    removes them.
    """
    tmps: dict[Path, Path] = {}
    try:
        for path, write in outputs.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_siblings(path)
            tmps[path] = _temporary(path)
            with open(tmps[path], "xb"):
                pass
            os.chmod(tmps[path], 0o666 & ~_umask())  # whatever `write` does, the usual mode
            write(tmps[path])
            with open(tmps[path], "rb") as fh:  # durable before the rename publishes it
                os.fsync(fh.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise


def _replace(tmp: Path, out_dir: Path) -> None:
    """Put tmp's content at out_dir and delete the previous out_dir."""
    if _exchange(tmp, out_dir):
        shutil.rmtree(tmp)  # now the old content; if we die here it is a stale temporary
        return
    # No atomic exchange here: move the old folder aside first. A kill between the two
    # renames leaves NAME absent and `.NAME.old-*` present; remove_stale_siblings puts it back.
    old = _temporary(out_dir, "old")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old)


def _temporary(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling this process writes `path` into (or moves it aside to, "old"):
    host and pid in the name tell the next writer whether its owner is still alive."""
    return path.with_name(f".{path.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_siblings(out_dir: Path) -> list[Path]:
    """Clean up after killed writers of `out_dir` (this host, process gone): delete their
    temporaries; restore a previous folder that was moved aside when NAME is missing.
    Returns what was removed or restored."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(tmp|old)-(.+)-(\d+)-[0-9a-f]{{8}}$")
    done = []
    for sibling in sorted(out_dir.parent.iterdir()):
        m = pattern.match(sibling.name)
        if not m or m.group(2) != _HOST or _alive(int(m.group(3))):
            continue
        if m.group(1) == "old" and not out_dir.exists():
            sibling.rename(out_dir)
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:  # a file of write_files_atomically
            sibling.unlink(missing_ok=True)
        done.append(sibling)
    return done


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):  # no /proc (or a kernel before 4.7)
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()
