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
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies



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


class Checkpoints:
    """Save and restore a stage's training state."""

    def __init__(self, directory: str | Path, section: CheckpointSection = CheckpointSection(),
                 *, read_only: bool = False):
        options = _options(section)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        self.manager = ocp.CheckpointManager(
            Path(directory).absolute(), options=options,
            item_handlers={"params": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "data": DataStateHandler(),
                           "meta": ocp.JsonCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state, meta: dict, config: dict, *,
             force: bool = False) -> bool:
        """Save if the policy (or `force`) says so; asynchronous after the device->host copy."""
        return self.manager.save(step, force=force, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config)))

    def restore(self, step: int, abstract_params, abstract_opt_state) -> dict:
        """Every item; array items onto the shardings carried by the abstract trees."""
        return dict(self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=DataStateRestore(), meta=ocp.args.JsonRestore(), config=ocp.args.JsonRestore())))

    def params_dir(self, step: int) -> Path:
        """The step's `params` item, an Orbax folder `format.restore_params` reads."""
        return Path(self.manager.directory) / str(step) / "params"

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
