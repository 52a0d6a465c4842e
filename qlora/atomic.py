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
