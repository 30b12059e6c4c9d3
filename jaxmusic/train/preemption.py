"""Preemption: has a stop been asked for (SIGTERM, SLURM's notice; SIGINT, Ctrl-C)?"""

from __future__ import annotations

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
    """Has SIGTERM (SLURM's preemption notice) or SIGINT (Ctrl-C) arrived? Asked after every step.

    Both signals mean "save and stop": the run finishes its step, saves it and exits 75;
    a second Ctrl-C stops at once (KeyboardInterrupt). Single process: Python handlers set
    a flag. Multi-process (`jax.distributed` initialised): JAX's preemption service catches
    SIGTERM on any process and all processes agree on the same step to stop at
    (`multihost_utils.reached_preemption_sync_point`); SIGINT is passed to it as SIGTERM.
    Once `reached()` has answered True it keeps answering True, on every process, so a
    schedule does not start its next stage after a notice.

    Handlers are installed from the main thread only; `close()` (or leaving a `with` block)
    puts the previous ones back.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._stop = False
        self._calls = 0
        self._multi = jax.process_count() > 1
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            if not self._multi:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def _interrupt(self, *_) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which syncs the processes
        else:
            self._flag.set()

    def reached(self) -> bool:
        """Stop here? Call at the same points on every process (before the first step, after each).

        The preemption service counts these calls, not training steps: a resumed stage and the
        next stage of a schedule keep counting up, as its sync protocol needs. This is its only
        caller: the checkpoint manager is kept from asking it too (`jaxmusic.checkpoints.training`).
        """
        self._calls += 1
        if not self._stop:
            self._stop = (multihost_utils.reached_preemption_sync_point(self._calls) if self._multi
                          else self._flag.is_set())
        return self._stop

    def stopping(self) -> bool:
        """Has a stop been decided (or, single process, asked for)? Same answer on every process."""
        return self._stop or self._flag.is_set()

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "Preemption":
        return self

    def __exit__(self, *_) -> None:
        self.close()
