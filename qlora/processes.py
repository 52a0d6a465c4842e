"""Several processes (`accelerate launch`): a user error stops every one of them with its line.

A process that exits on a QloraError while the others wait in a collective call (a barrier,
a gather) leaves them to die in the communication library, each with a page of traceback.
Work that can fail on bad input therefore runs through `main_first`: the outcome is shared,
and every process raises the same one-line QloraError.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from .errors import QloraError

T = TypeVar("T")


def main_first(acc, fn: Callable[[], T]) -> T:
    """`fn()` on the main process, then on the others (what `Accelerator.main_process_first`
    does: the main process fills the datasets cache, the others read it). A QloraError on any
    process is raised on all of them: the main process's before the others start, theirs
    after all finished."""
    if acc.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list, gather_object
    result, error = None, None
    if acc.is_main_process:
        result, error = _attempt(fn)
    shared = [error]
    broadcast_object_list(shared, from_process=0)
    if shared[0] is not None:
        raise QloraError(shared[0])
    if not acc.is_main_process:
        result, error = _attempt(fn)
    first = next((e for e in gather_object([error]) if e is not None), None)
    if first is not None:
        raise QloraError(first)
    return result


def _attempt(fn):
    try:
        return fn(), None
    except QloraError as e:
        return None, str(e)
