"""Run a benchmark step in a child process and read its peak memory (shared by the scripts).

A child's peak RSS also counts the memory of the parent it started from (fork before exec),
so the parent imports nothing heavy and every measured step runs in its own interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_child(argv: list[str]) -> tuple[str, int]:
    """Run a child to completion (working directory and PYTHONPATH: the repository); its
    stdout, and its own peak RSS in bytes (ru_maxrss from wait4). Exits with the child's
    stderr tail if it fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(argv[1:3])} failed ({proc.returncode}):\n{err.read()[-4000:]}")
        return out.read(), usage.ru_maxrss * 1024  # kB on Linux


def last_json(stdout: str) -> dict:
    """The JSON object a child printed on its last line."""
    import json
    return json.loads(stdout.strip().splitlines()[-1])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def mb(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
