"""Publish folders atomically: write everything into a temporary sibling, then rename.

A crash (even SIGKILL) mid-write leaves at most a hidden `.NAME.tmp-*` folder, never a
half-written NAME; readers that skip dot-folders never see partial output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomically(out_dir: Path, write) -> None:
    """Run `write(tmp_dir)` then rename tmp_dir to out_dir, so readers never see half a folder.

    An existing out_dir is replaced only after the new one is complete.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a published folder gets the usual mode
    try:
        write(tmp)
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_files_atomically(outputs: dict[Path, object]) -> None:
    """Publish several files together: run each `write(tmp_path)` into a temporary sibling of
    its path, then rename them all into place (replacing existing files only then).

    If any write raises, every temporary file is removed and nothing is published; a crash
    leaves at most hidden `.NAME.tmp-*` files, never a half-written NAME.
    """
    tmps: dict[Path, Path] = {}
    try:
        for path, write in outputs.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
            os.close(fd)
            tmps[path] = Path(name)
            os.chmod(name, 0o666 & ~_umask())  # mkstemp makes 0600; published files get the usual mode
            write(tmps[path])
            with open(tmps[path], "rb") as fh:  # durable before the rename publishes it
                os.fsync(fh.fileno())
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
