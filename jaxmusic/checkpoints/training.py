"""A training stage's checkpoints (Orbax's CheckpointManager): policy, save, restore.

`WORKDIR/STAGE/checkpoints/STEP/` holds five items:

    params     the full parameter tree {whisper, connector, llm}, float32 (Orbax standard
               format: the same tree and layout as a converted checkpoint's `params/`)
    opt_state  the optimizer state of the trainable parameters only
    data       the data iterator's state, one JSON file per process
    meta       {"step", "skipped", "stage", "process_count", "mesh"}
    config     the resolved stage configuration

Orbax writes each step into a temporary folder and renames it when every item is
complete, so a process killed mid-save leaves only an unfinished temporary folder that
the next run ignores and removes: the newest *complete* step is what resumes.
Restoring takes target shardings, so a checkpoint written on one mesh (or process count)
loads onto another.

Storage faults: resuming (`Checkpoints.restore_newest`) reads the newest complete step; if
any of its files cannot be read (a damaged disk, a partial copy), it logs the step and the
cause, moves the step aside to `checkpoints/STEP.corrupt` (never deletes it) and tries the
next older one. All processes of a multi-process run agree on the step they resume from.
With no readable step left it stops with `CheckpointError` (exit 2) and does not start the
stage over while set-aside steps remain. A save that fails (disk full, permission denied)
raises `SaveError`, naming the step, the cause and the newest complete step, which is intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxmusic.errors import UserError

log = logging.getLogger(__name__)
CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(UserError):
    """No checkpoint of the stage can be restored."""


class SaveError(RuntimeError):
    """A checkpoint could not be written; the newest complete one is intact."""


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    """When a stage saves and what it keeps (the `checkpoint:` section of a stage config)."""

    every_steps: int | None = 500
    every_minutes: float | None = None
    keep_last: int = 2
    keep_every: int | None = None    # also keep every M-th step forever
    async_save: bool = True


# ---------------------------------------------------------------- data iterator state item

class DataStateHandler(ocp.CheckpointHandler):
    """Each process writes its iterator state to `process_I-of-N.json`; restore returns all."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> dict:
        files = sorted(directory.glob("process_*-of-*.json"))
        if not files:
            raise FileNotFoundError(f"{directory}: no data iterator state")
        count = int(files[0].name.split("-of-")[1].split(".")[0])
        states = {int(f.name.split("_")[1].split("-")[0]): json.loads(f.read_text()) for f in files}
        return {"process_count": count, "states": [states[i] for i in sorted(states)]}


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any  # JSON-serialisable


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ------------------------------------------------------------------------------ the manager

def _options(section: CheckpointSection) -> ocp.CheckpointManagerOptions:
    save = []
    if section.every_steps:
        save.append(policies.FixedIntervalPolicy(int(section.every_steps)))
    if section.every_minutes:
        # saves when the interval has passed since the last save and none is in flight
        save.append(policies.ContinuousCheckpointingPolicy(
            minimum_interval_secs=max(1, int(section.every_minutes * 60))))
    keep = [policies.LatestN(section.keep_last)]
    if section.keep_every:
        keep.append(policies.EveryNSteps(int(section.keep_every)))
    return ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save) if save else policies.SpecificStepsPolicy([]),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=section.async_save,
        cleanup_tmp_directories=True,  # unfinished saves of a killed run
        create=True)


def _cause(e: BaseException) -> str:
    """The innermost cause of an I/O failure, on one line (TensorStore nests the useful part)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _unreadable(e: Exception) -> bool:
    """Did reading fail because of the files? Running out of memory is not the checkpoint's fault."""
    return not isinstance(e, MemoryError) and "RESOURCE_EXHAUSTED" not in str(e)


def _all_processes(ok: bool) -> bool:
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def _from_process_0(step: int | None) -> int | None:
    if jax.process_count() > 1:
        step = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if step is None else step)))
    return None if step == -1 else step


_quieted = False


def _quiet_aborted_io() -> None:
    """Keep one failed read or write from printing dozens of tracebacks.

    Orbax runs each operation on its own asyncio loop. When one part fails the loop closes
    while TensorStore is still finishing the other parts: their completion callbacks raise
    "Event loop is closed", and Orbax's coroutines for them are dropped with their own
    errors unread (unraisable exceptions, or asyncio's "Task exception was never retrieved":
    one traceback each). Orbax also logs every failed part of a background save with its
    traceback. The failure itself is reported once, with its cause, by `restore_newest` and
    `SaveError`.
    """
    global _quieted
    if _quieted:
        return
    _quieted = True
    previous = sys.unraisablehook

    def hook(unraisable):
        closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
        orbax_coroutine = "orbax" in getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "")
        if not (closed or orbax_coroutine):
            previous(unraisable)

    sys.unraisablehook = hook

    def one_line(record: logging.LogRecord) -> bool:
        if "orbax" in record.pathname:
            record.exc_info, record.exc_text = None, None
        return True

    logging.getLogger("absl").addFilter(one_line)

    def not_an_orbax_task(record: logging.LogRecord) -> bool:
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if "orbax" in tb.tb_frame.f_code.co_filename:
                return False
            tb = tb.tb_next
        return True

    logging.getLogger("asyncio").addFilter(not_an_orbax_task)


class _Manager(ocp.CheckpointManager):
    """Orbax's manager without its own preemption check.

    JAX's preemption sync point answers True to the call whose id equals the agreed step, the
    ids being whatever its callers pass. The trainer asks it once per step with its own count
    (`jaxmusic.train.preemption`) and saves with `force=True` when told to stop; Orbax's
    `should_save`/`save` would also ask, with the training step. The two sequences interleave,
    and when Orbax's id is the one that meets the agreed point the trainer never hears of the
    notice and trains to the end of the stage instead of exiting 75.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class Checkpoints:
    """Save and restore a stage's training state."""

    def __init__(self, directory: str | Path, section: CheckpointSection = CheckpointSection(),
                 *, read_only: bool = False):
        options = _options(section)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        self.directory = Path(directory).absolute()
        self._handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                          "data": DataStateHandler(), "meta": ocp.JsonCheckpointHandler(),
                          "config": ocp.JsonCheckpointHandler()}
        self.manager = _Manager(self.directory, options=options, item_handlers=self._handlers)
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._failed = False
        _quiet_aborted_io()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state, meta: dict, config: dict, *,
             force: bool = False) -> bool:
        """Save if the policy (or `force`) says so; asynchronous after the device->host copy.

        Raises `SaveError` when this save, or the one still in flight, fails.
        """
        if not (force or self.manager.should_save(step)):
            return False
        self.wait()  # a failure of the previous save is reported as that step's
        try:
            # Orbax makes the step's folder in a background thread while its writers wait up to
            # 5 minutes for it: find out at once if that folder cannot be made (permissions,
            # a read-only file system) instead of after the wait, with the real cause.
            Path(tempfile.mkdtemp(prefix=f".{step}.probe-", dir=self.directory)).rmdir()
            saved = self.manager.save(step, force=force, args=ocp.args.Composite(
                params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta),
                config=ocp.args.JsonSave(config)))
        except Exception as e:
            raise self._save_error(step, e) from e
        self._in_flight = step if saved else None
        return saved

    def wait(self) -> None:
        """Block until the save in flight is complete; `SaveError` if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e

    def _save_error(self, step: int | None, e: Exception) -> SaveError:
        self._failed = True
        self.manager.reload()  # the failed step's temporary folder is not a checkpoint
        latest = self.manager.latest_step()
        kept = f"the newest complete checkpoint (step {latest}) is intact" if latest is not None else \
            "there is no complete checkpoint yet"
        return SaveError(f"saving checkpoint step {step} to {self.directory} failed ({_cause(e)}); {kept}")

    def restore_newest(self, abstract_params, abstract_opt_state,
                       check: Callable[[int, dict], None] | None = None) -> tuple[int, dict] | None:
        """`(step, items)` of the newest readable step, or None when the stage has no checkpoint.

        `check(step, config)` sees each candidate's saved configuration before its arrays are
        read and may refuse it by raising a `UserError` (passed on). A step that cannot be read
        is moved aside (see the module docs) and the next older one is tried; `CheckpointError`
        when none is left. Every process reads its own shards: if any fails, all move on.
        """
        tried: list[int] = []
        while True:
            remaining = sorted(set(self.manager.all_steps()) - set(tried))
            step = _from_process_0(remaining[-1] if remaining else None)
            if step is None:
                break
            cause = None
            try:
                items = self._read(step, abstract_params, abstract_opt_state, check)
            except UserError:
                raise
            except Exception as e:
                if not _unreadable(e):
                    raise
                cause = _cause(e)
            if _all_processes(cause is None):
                if tried:
                    self._reload_everywhere()
                return step, items
            tried.append(step)
            self._set_aside(step, cause)
        if tried:
            self._reload_everywhere()
        aside = sorted(p.name for p in self.directory.glob(f"*{CORRUPT_SUFFIX}*"))
        if aside:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be restored (set aside as unreadable: {', '.join(aside)}); "
                "move one back to its step name if a passing fault damaged it, or delete them to start the "
                "stage over")
        return None

    def _read(self, step: int, abstract_params, abstract_opt_state, check) -> dict:
        """A step's items, read with the item handlers themselves: unlike the manager's restore
        they hold no barrier, so a process that fails cannot leave the others waiting."""
        folder = epath.Path(self.directory / str(step))
        config = self._handlers["config"].restore(folder / "config", args=ocp.args.JsonRestore())
        if check:
            check(step, config)
        args = {"params": ocp.args.StandardRestore(abstract_params),
                "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                "data": DataStateRestore(), "meta": ocp.args.JsonRestore()}
        items = {name: self._handlers[name].restore(folder / name, args=a) for name, a in args.items()}
        return dict(items, config=config)

    def _set_aside(self, step: int, cause: str | None) -> None:
        """Process 0 renames the step's folder; every process that failed says why."""
        where = "" if jax.process_count() == 1 else f"process {jax.process_index()}: "
        if jax.process_index() != 0:
            if cause:
                log.warning("%scheckpoint step %d cannot be read (%s)", where, step, cause)
            return
        folder = self.directory / str(step)
        target, n = self.directory / f"{step}{CORRUPT_SUFFIX}", 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{CORRUPT_SUFFIX}.{n}"
        folder.rename(target)
        log.warning("%scheckpoint step %d cannot be read (%s); moved it to %s and trying an older step",
                    where, step, cause or "another process could not read it", target)

    def _reload_everywhere(self) -> None:
        """Forget the steps set aside, on every process once process 0 has moved them."""
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxmusic checkpoints set aside")
        self.manager.reload()

    def params_dir(self, step: int) -> Path:
        """The step's `params` item, an Orbax folder `format.restore_params` reads."""
        return self.directory / str(step) / "params"

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def close(self) -> None:
        """Wait for the save in flight, then release Orbax's threads; `SaveError` if it failed
        (unless that failure was reported already)."""
        reported = self._failed
        try:
            self.wait()
        except SaveError:
            if not reported:
                raise
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 (Orbax raises a failed save again on closing)
                if not self._failed:
                    raise
