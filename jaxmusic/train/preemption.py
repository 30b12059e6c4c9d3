"""Preemption: has SLURM's notice (SIGTERM) arrived? Asked once per training step."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Has a SIGTERM (SLURM's preemption notice) arrived? Asked once per step.

    Single process: a Python SIGTERM handler sets a flag. Multi-process
    (`jax.distributed` initialised): JAX's preemption service catches the signal on any
    process and all processes agree on the same step to stop at
    (`multihost_utils.reached_preemption_sync_point`), so they save together.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
