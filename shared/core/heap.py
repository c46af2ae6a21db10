"""The garbage collector and a long-lived process."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Called once a process has built what it serves with (its app, or its consumer's handlers): what exists then
    (modules, mappers, the app) lives as long as the process, so the garbage collector stops walking it. Otherwise
    each full collection walks all of it, with the interpreter lock held while every other thread of the process
    waits (README, "Performance", has the figures). Garbage is collected first, so none of it is kept for good.
    `gc.get_objects()` no longer lists what is frozen."""
    gc.collect()
    gc.freeze()
