"""`jaxmusic train CONFIG --workdir DIR [key=value ...]`: run a stage or a schedule.

Workdir layout: one folder per stage, `DIR/STAGE/` with `checkpoints/STEP/`,
`config.yaml` (resolved), `metrics.jsonl`, `tensorboard/`, `data_report.json` (manifest
data) and, once the stage has finished, `model/` (the result as a jaxmusic checkpoint for
`jaxmusic ask/score/eval` and `convert/jax_to_hf.py`; `jaxmusic.train.model_folder`) and
`DONE`. Rerunning the same command resumes: finished stages are skipped and the current
one continues from its newest readable checkpoint (an unreadable one is set aside,
`jaxmusic.checkpoints.training`), data order included. A resumed run logs again the steps
it repeats. A rerun may change only the settings that do not change what a stage trains
(`jaxmusic.train.rerun`); `--extend` continues a stage with more steps. One run at a time
per workdir (`jaxmusic.train.lock`).

Exit codes: 0 done (also when SIGTERM/SIGINT arrives after the last step); 1 a failure
that is not the configuration's, e.g. a checkpoint could not be written (the newest
complete one is intact); 2 configuration/user error (also: the workdir is in use, a
changed setting, no readable checkpoint); 3 stopped on a non-finite loss or gradient
(`nan_policy: stop`; the newest checkpoint is intact); 75 stopped by SIGTERM (preemption)
or SIGINT (Ctrl-C) at any point before the end: the current step was saved if it was new,
rerun the same command to resume; 130 a second Ctrl-C (stopped at once).

Multi-process runs call `jax.distributed.initialize()` before `run`; everything here
already works on global arrays (`jax.process_index/count` only decide who writes logs
and which rows each process loads).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import jax
import optax
import yaml
from flax import nnx
from tqdm import tqdm

from jaxmusic import distributed, sharding
from jaxmusic.audio import CHUNK_SECONDS
from jaxmusic.checkpoints import restore_params
from jaxmusic.checkpoints.training import Checkpoints, SaveError
from jaxmusic.errors import (EXIT_FAILURE, EXIT_OK, EXIT_USER_ERROR,  # noqa: F401 (EXIT_USER_ERROR re-exported)
                             UserError, run_command)
from jaxmusic.losses import LOSSES
from jaxmusic.train import config as config_lib
from jaxmusic.train import metrics as metrics_lib
from jaxmusic.train import optim, rerun
from jaxmusic.train.grpo import GRPO
from jaxmusic.train.batches import make_source, next_batch, restore_data_state, total_steps
from jaxmusic.train.config import ConfigError, StageConfig
from jaxmusic.train.lock import workdir_lock
from jaxmusic.train.model_folder import write_model_folder
from jaxmusic.train.preemption import Preemption
from jaxmusic.train.state import (ModelSpec, init_params, resolve_model, standardize_encoder_output,
                                  with_shardings)
from jaxmusic.train.step import make_train_step

log = logging.getLogger(__name__)

EXIT_DIVERGED, EXIT_PREEMPTED = 3, 75
DONE_FILE = "DONE"


class Diverged(RuntimeError):
    """A non-finite loss or gradient norm under `nan_policy: stop`."""


def _primary() -> bool:
    return jax.process_index() == 0


def _say(text: str) -> None:
    if _primary():
        tqdm.write(text, file=sys.stderr)


# ---------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class Setup:
    """Everything a stage's loop needs besides the state itself."""

    stage: StageConfig  # resolved: model configs filled in, steps counted
    spec: ModelSpec
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract: dict          # ShapeDtypeStructs of the params
    param_shardings: dict
    trainable: frozenset
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_opt: object
    opt_shardings: object

    @property
    def micro_rows(self) -> int:
        return self.stage.batch.microbatch or self.stage.batch.global_batch

    def init_params(self):
        """The stage's initial parameters, born sharded."""
        return init_params(self.spec, self.stage, self.param_shardings, self.abstract,
                           restore_stage=_restore_stage_params)

    def init_state(self):
        """Fresh `(params, opt_state)`, both born sharded."""
        params = self.init_params()
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(optim.split(params, self.trainable)[0])
        return params, opt_state

    def compile_step(self, params, opt_state, batch, loss_fn=None, compiler_options=None):
        """The jitted train step, compiled for `batch`'s shapes; also returns compile seconds.

        The arguments may be abstract (`jax.ShapeDtypeStruct`s with shardings): `jaxmusic plan`
        compiles for devices that are not there, with the launcher's XLA flags as `compiler_options`.
        """
        step = make_train_step(
            self.graphdef, self.trainable, self.tx, loss_fn or LOSSES[self.stage.loss],
            param_shardings=self.param_shardings, opt_shardings=self.opt_shardings,
            batch_shardings={k: sharding.batch_sharding(self.mesh, v.ndim) for k, v in batch.items()},
            metric_sharding=sharding.replicated(self.mesh))
        t0 = time.perf_counter()
        lowered = step.lower(params, opt_state, batch)
        return lowered.compile(compiler_options), time.perf_counter() - t0

    def step_flops(self, batch) -> float:
        chunk_rows = next(batch[k].shape[1] for k in ("chunk_mask", "mel", "wave") if k in batch)
        rows, length = batch["input_ids"].shape[1:3]
        completions = batch["completion"].shape[1:3] if "completion" in batch else None
        forward = metrics_lib.forward_flops(self.spec.whisper, self.spec.llm, self.spec.mufun,
                                            chunk_rows=chunk_rows, rows=rows, length=length, completions=completions)
        return metrics_lib.step_flops(forward, {p[0] for p in self.trainable}, self.stage.accumulation)


def resolve(stage: StageConfig, previous: Path | None = None) -> StageConfig:
    """The stage with its init source, model configs and step count filled in."""
    if stage.init.source == "previous":
        stage = dataclasses.replace(stage, init=dataclasses.replace(stage.init, path=str(previous)))
    prev_config = (_previous_config(Path(stage.init.path))
                   if stage.init.source in ("stage", "previous") else None)
    stage = resolve_model(stage, prev_config)
    return dataclasses.replace(stage, steps=total_steps(stage), epochs=None)


def setup(stage: StageConfig, previous: Path | None = None, *, devices=None,
          devices_per_node: int | None = None) -> Setup:
    """Resolve a stage against its init source and build the mesh, shardings and optimizer."""
    stage = resolve(stage, previous)
    if stage.loss not in LOSSES:
        raise ConfigError(f"loss {stage.loss!r} is not one of {sorted(LOSSES)}")
    spec = ModelSpec.from_stage(stage)
    last = spec.whisper.n_layers
    if stage.init.standardize_encoder_output and last not in spec.mufun.fusion_layers:
        raise ConfigError(f"init.standardize_encoder_output sets the encoder's last hidden state, which "
                          f"fusion_layers {list(spec.mufun.fusion_layers)} leave out (add {last})")
    mesh = sharding.make_mesh(stage.mesh.shape(), devices, devices_per_node=devices_per_node)
    groups = sharding.data_parallel_size(mesh)
    micro_rows = stage.batch.microbatch or stage.batch.global_batch
    if micro_rows % groups:
        raise ConfigError(f"batch.microbatch {micro_rows} must divide into the {groups} data-parallel "
                          f"shards of mesh {dict(mesh.shape)}")

    # the layer scans pin the residual stream to the batch sharding (ModelOptions.carry_sharding);
    # `attention: auto` decides for the mesh's devices, not for the machine that compiles
    spec = dataclasses.replace(spec, opts=dataclasses.replace(
        spec.opts, carry_sharding=sharding.activation_sharding(mesh), platform=mesh.devices.flat[0].platform))
    graphdef, abstract_state = spec.abstract()
    abstract = nnx.to_pure_dict(abstract_state)
    param_sh = sharding.state_shardings(abstract_state, mesh)
    trainable = optim.trainable_paths(abstract_state, stage.trainable)
    schedule = optim.learning_rate(stage.optimizer, stage.steps)
    tx = optim.adamw(stage.optimizer, schedule, optim.lr_factors(stage.optimizer, trainable))
    abstract_opt = jax.eval_shape(tx.init, optim.split(abstract, trainable)[0])
    # optimizer moments mirror their parameters' shardings; scalars (step counts) are replicated
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, optim.split(param_sh, trainable)[0],
                                   transform_non_params=lambda _: sharding.replicated(mesh))
    return Setup(stage, spec, mesh, graphdef, abstract, param_sh, trainable, tx, schedule, abstract_opt, opt_sh)


def _previous_config(path: Path) -> dict:
    ckpts = Checkpoints(path / "checkpoints", read_only=True)
    step = ckpts.latest_step()
    if step is None:
        raise ConfigError(f"init: {path} has no complete checkpoint")
    config = ckpts.restore_config(step)
    ckpts.close()
    return config


def _restore_stage_params(path: Path, abstract: dict) -> dict:
    ckpts = Checkpoints(path / "checkpoints", read_only=True)
    step = ckpts.latest_step()
    if step is None:
        raise ConfigError(f"init: {path} has no complete checkpoint")
    params = restore_params(ckpts.params_dir(step), abstract)
    ckpts.close()
    _say(f"  initialised from {path} step {step}")
    return params


# ---------------------------------------------------------------------------- a stage

def run_stage(stage: StageConfig, stage_dir: Path, previous: Path | None = None, *,
              preemption: Preemption | None = None, devices=None, devices_per_node: int | None = None,
              on_step=None, extend: bool = False) -> int:
    """Train one stage in `stage_dir`, resuming from its newest readable checkpoint. Returns an exit code.

    `preemption` says when to stop (default: SIGTERM/SIGINT handlers for this stage alone);
    `on_step(step)`, if given, is called after every finished step (e.g. a hang watchdog's
    beat); `extend` lets a saved run continue with more steps (`jaxmusic.train.rerun`).
    """
    if preemption is None:
        with Preemption() as own:
            return run_stage(stage, stage_dir, previous, preemption=own, devices=devices,
                             devices_per_node=devices_per_node, on_step=on_step, extend=extend)
    s = setup(stage, previous, devices=devices, devices_per_node=devices_per_node)
    stage = s.stage
    stage_dir.mkdir(parents=True, exist_ok=True)
    source = make_source(stage, s.spec, s.mesh, s.micro_rows, stage_dir)
    ckpts = Checkpoints(stage_dir / "checkpoints", stage.checkpoint)
    flat = optim.flatten(s.abstract)
    n_train = sum(math.prod(a.shape) for p, a in flat.items() if p in s.trainable)
    _say(f"stage {stage.name}: {stage.steps} steps of {stage.batch.global_batch} rows "
         f"({stage.accumulation} x {s.micro_rows}), mesh {dict(s.mesh.shape)}, "
         f"trainable {n_train:,} of {sum(math.prod(a.shape) for a in flat.values()):,} parameters")
    try:
        try:
            code = _resume_and_train(s, stage_dir, source, ckpts, preemption, on_step, extend)
        finally:
            _close_quietly(source)
            ckpts.close()  # waits for the save in flight: DONE only once the final step is on disk
    except Diverged as e:
        _say(f"error: {e}")
        return EXIT_DIVERGED
    except SaveError as e:
        _say(f"error: {e}")
        return EXIT_FAILURE
    if code == EXIT_OK and _primary():
        write_model_folder(stage_dir, stage, stage.steps)
        (stage_dir / DONE_FILE).write_text(f"{stage.steps}\n")
    return code


def _resume_and_train(s: Setup, stage_dir: Path, source, ckpts: Checkpoints, preemption, on_step,
                      extend: bool) -> int:
    stage = s.stage
    resolved = stage.to_dict()
    newest = ckpts.restore_newest(
        with_shardings(s.abstract, s.param_shardings), with_shardings(s.abstract_opt, s.opt_shardings),
        check=lambda step, saved: rerun.check(
            saved, stage, f"stage {stage.name} (checkpoint step {step} in {ckpts.directory})", extend=extend))
    if _primary():  # only now: a refused rerun leaves the saved run's files as they were
        (stage_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        (stage_dir / DONE_FILE).unlink(missing_ok=True)  # an extended stage is unfinished until it ends again
    step, skipped = 0, 0
    if newest:
        step, restored = newest
        params, opt_state = restored["params"], restored["opt_state"]
        restore_data_state(source, restored["data"])
        skipped = int(restored["meta"]["skipped"])
        _say(f"  resumed from {ckpts.directory} step {step}")
        if restored["config"].get("steps", stage.steps) != stage.steps:
            _say(f"  --extend: {restored['config']['steps']} -> {stage.steps} steps; the {stage.optimizer.schedule} "
                 f"learning-rate schedule now spans {stage.steps} steps, and steps {step + 1}-{stage.steps} continue "
                 f"from step {step}'s state at lr {float(s.schedule(step - skipped)):.3g}")
    else:
        params, opt_state = s.init_state()
        if stage.init.standardize_encoder_output:
            params = _standardize_encoder_output(s, source, params)

    writers = _Writers(stage_dir, stage) if _primary() else None
    rl = None
    try:
        # a GRPO stage makes its batches from rollouts of the parameters being trained
        rl = GRPO(s, stage_dir, source, s.init_params, primary=_primary()) if stage.loss == "grpo" else None
        return _loop(s, ckpts, source, params, opt_state, step, skipped, resolved, preemption, writers, on_step, rl)
    finally:
        if writers:
            writers.close()
        if rl:
            rl.close()


def _standardize_encoder_output(s: Setup, source, params: dict) -> dict:
    """A random encoder's output standardised over the stage's first batches
    (`init.standardize_encoder_output`; they are not trained on)."""
    n = s.stage.init.standardize_encoder_output
    batches = (next_batch(source, s.stage.accumulation, s.mesh, s.micro_rows, 0, s.stage.data.packing)
               for _ in range(n))
    params = standardize_encoder_output(s.graphdef, params, batches, s.spec.mufun, s.param_shardings["whisper"])
    _say(f"  standardised the encoder's output over {n} batches")
    return params


def _close_quietly(source) -> None:
    """Stop the data workers; a failure here (e.g. workers already killed by the same
    SIGTERM) must not hide the stage's outcome."""
    try:
        close = getattr(source, "close", None)
        if close:
            close()
    except Exception as e:  # noqa: BLE001
        log.warning("closing the data source failed: %s", e)


class _Writers:
    def __init__(self, stage_dir: Path, stage: StageConfig):
        self.jsonl = metrics_lib.JsonlWriter(stage_dir / "metrics.jsonl")
        self.tb = metrics_lib.TensorBoardWriter(stage_dir / "tensorboard") if stage.log.tensorboard else None

    def write(self, record: dict) -> None:
        self.jsonl.write(record)
        if self.tb:
            self.tb.scalars(record["step"], {f"train/{k}": v for k, v in record.items()
                                             if k not in ("step", "time") and v is not None})

    def close(self) -> None:
        self.jsonl.close()
        if self.tb:
            self.tb.close()


def audio_chunks(m: dict, spec: ModelSpec) -> float:
    """30 s chunks holding audio in a step (from chunk masks, else from the spliced tokens)."""
    if m["audio_chunks"] >= 0:
        return float(m["audio_chunks"])
    return float(m["audio_tokens"]) / spec.tokens_per_chunk


def _loop(s: Setup, ckpts, source, params, opt_state, step, skipped, resolved, preemption, writers,
          on_step, rl: GRPO | None = None) -> int:
    stage, steps = s.stage, s.stage.steps
    bar = tqdm(total=steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True,
               disable=not (stage.log.progress and _primary()), file=sys.stderr)
    if step >= steps:
        bar.close()
        return EXIT_OK
    if preemption.reached():  # a notice during set-up: stop before starting the data workers or compiling
        bar.close()
        _say(f"preempted before step {step + 1}: nothing new to save; rerun the same command to resume")
        return EXIT_PREEMPTED
    load = rl.batch if rl else (lambda done, _: next_batch(source, stage.accumulation, s.mesh,  # noqa: E731
                                                                s.micro_rows, done, stage.data.packing))
    batch = load(step, params)
    compiled, seconds = s.compile_step(params, opt_state, batch, rl.loss_fn if rl else None)
    _say(f"  compiled the train step in {seconds:.1f} s")
    flops = s.step_flops(batch)
    peak = metrics_lib.peak_flops(s.mesh.devices.flat[0].device_kind, stage.log.peak_tflops)
    last = time.perf_counter()
    while step < steps:
        lr = float(s.schedule(step - skipped))  # the rate this update uses
        params, opt_state, metrics = compiled(params, opt_state, batch)
        step += 1
        data_state = source.get_state()  # positioned after this step's batches
        # asked before loading more data: a preemption notice may have killed the data workers too.
        # After the last step the stage finishes anyway; a schedule then stops before its next stage.
        preempted = preemption.reached() and step < steps
        saving, preempted = rl.boundary(step, preempted) if rl else (True, preempted)
        batch = load(step, params) if step < steps and not preempted else None  # overlaps the device's work
        m = jax.device_get(metrics)
        now = time.perf_counter()
        elapsed, last = now - last, now
        if not m["finite"]:
            message = (f"non-finite loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} at step {step}; "
                       "parameters and optimizer state were not updated")
            if stage.nan_policy == "stop":
                raise Diverged(message + f"; the newest checkpoint (step {ckpts.latest_step()}) is intact. "
                               "Set nan_policy=skip to skip such steps.")
            skipped += 1
            _say(f"warning: {message}; skipped ({skipped} so far)")
        record = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": lr,
                  "step_time": elapsed, "tokens_per_s": float(m["tokens"]) / elapsed,
                  "audio_s_per_s": audio_chunks(m, s.spec) * CHUNK_SECONDS / elapsed,
                  "loss_tokens": int(m["loss_tokens"]),
                  "mfu": flops / (elapsed * s.mesh.size * peak) if peak else None,
                  "skipped": skipped, "time": time.time(), **(rl.record(step, m) if rl else {})}
        if writers and (step % stage.log.every_steps == 0 or step == steps):
            writers.write(record)
        bar.update()
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
        if on_step:
            on_step(step)

        meta = {"step": step, "skipped": skipped, "stage": stage.name,
                "process_count": jax.process_count(), "mesh": dict(s.mesh.shape)}
        if saving or step == steps:
            ckpts.save(step, params, opt_state, data_state, meta, resolved, force=preempted or step == steps)
        if preempted:
            ckpts.wait()
            bar.close()
            _say(f"preempted: saved step {step} to {ckpts.directory}; rerun the same command to resume")
            return EXIT_PREEMPTED
    bar.close()
    return EXIT_OK


# ---------------------------------------------------------------------------- command line

def run(config: str | Path, workdir: str | Path, overrides: list[str] = (), *,
        devices_per_node: int | None = None, on_step=None, extend: bool = False,
        keep_signal_handlers: bool = False) -> int:
    """Run every unfinished stage of `config` (a stage or a schedule) under `workdir`.

    Multi-process: call `jax.distributed.initialize()` first; `devices_per_node` checks that
    FSDP/tensor groups stay inside a node; `on_step(step)` runs after every step; `extend`
    lets stages continue with more steps than they were run with (`jaxmusic.train.rerun`).
    The run holds `workdir`'s lock (`jaxmusic.train.lock`) and handles SIGTERM and SIGINT
    (`Preemption`); `keep_signal_handlers` leaves the handlers in place on return, for a
    process that exits next (`jaxmusic train`), so that a signal while it shuts down cannot
    kill a run that has finished.
    """
    schedule = config_lib.load(config, list(overrides))
    workdir = Path(workdir)
    preemption = Preemption()
    try:
        with workdir_lock(workdir):
            return _run_schedule(schedule.stages, workdir, preemption, devices_per_node, on_step, extend)
    finally:
        if not keep_signal_handlers:
            preemption.close()


def _run_schedule(stages, workdir: Path, preemption: Preemption, devices_per_node, on_step, extend) -> int:
    previous = None
    for i, stage in enumerate(stages):
        stage_dir = workdir / stage.name
        if preemption.stopping():
            _say(f"preempted before stage {stage.name}; rerun the same command to continue")
            return EXIT_PREEMPTED
        if (stage_dir / DONE_FILE).exists() and not _reopened(stage, stage_dir, previous, extend):
            _say(f"stage {stage.name}: already done ({stage_dir / DONE_FILE})")
        else:
            started = [later.name for later in stages[i + 1:] if (workdir / later.name).exists()]
            if (stage_dir / DONE_FILE).exists() and started:
                raise ConfigError(f"stage {stage.name} cannot be extended: stage(s) {', '.join(started)} already "
                                  f"started from its result; move {workdir / started[0]} away first")
            code = run_stage(stage, stage_dir, previous, preemption=preemption, devices_per_node=devices_per_node,
                             on_step=on_step, extend=extend)
            if code != EXIT_OK:
                return code
        previous = stage_dir
    return EXIT_OK


def _reopened(stage: StageConfig, stage_dir: Path, previous: Path | None, extend: bool) -> bool:
    """Does `--extend` continue this finished stage? A setting changed otherwise is refused."""
    saved = stage_dir / "config.yaml"
    if not saved.exists():  # finished before runs recorded their settings: nothing to compare
        return False
    try:
        resolved = resolve(stage, previous)
    except (UserError, OSError) as e:  # e.g. its init checkpoint was deleted since: it stays as it is
        _say(f"stage {stage.name}: its settings cannot be compared with the finished run's ({e})")
        return False
    where = f"stage {stage.name} (finished in {stage_dir})"
    return rerun.check(yaml.safe_load(saved.read_text()), resolved, where, extend=extend) is not None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="jaxmusic train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a stage or schedule YAML (configs/stages, configs/schedules)")
    parser.add_argument("--workdir", required=True, help="where checkpoints and logs go; resumes from it")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. steps=10 mesh.fsdp=8 stages.p1.steps=5")
    parser.add_argument("--extend", action="store_true",
                        help="continue a stage (finished or not) with more steps than it was run with, e.g. "
                             "steps=24 after 16; its learning-rate schedule is recomputed for the new count")
    distributed.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `jaxmusic train`; returns the exit code (see the module docstring)."""
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def train():
        layout = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        watchdog = distributed.StepWatchdog.from_env()
        return run(args.config, args.workdir, args.overrides,
                   devices_per_node=layout.devices_per_node() if layout else None,
                   on_step=watchdog.beat if watchdog else None, extend=args.extend, keep_signal_handlers=True)

    return run_command(train, tracebacks=True)
