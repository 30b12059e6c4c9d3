"""Planning a training stage: the real train step compiled for a GPU cluster, and what it needs.

`plan_stage` builds the stage exactly as `jaxmusic train` does (`trainer.setup`: mesh,
shardings, trainable set, optimizer; `Setup.compile_step`: the jitted step with its
microbatching, dtype and remat) over the devices of `gpus.cluster_devices`, with abstract
parameters and a batch of the shapes the data pipeline produces. Nothing is allocated and
no checkpoint or manifest is read: a stage initialised from a checkpoint or a previous stage
is planned from its shapes (the model sizes it names, `model.whisper: whisper-large-v3`),
and a stage given in epochs is planned with a step count (the learning-rate schedule's
length; the compiled program is the same).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmusic import sharding
from jaxmusic.audio import CHUNK_SECONDS
from jaxmusic.data.packing import audio_key, chunk_shape
from jaxmusic.errors import UserError
from jaxmusic.plan import hlo
from jaxmusic.plan.gpus import Gpu, cluster_devices
from jaxmusic.train import grpo, optim
from jaxmusic.train.config import ConfigError, InitSection, StageConfig
from jaxmusic.train.state import resolve_model, with_shardings
from jaxmusic.train.trainer import setup

GIB = 2 ** 30


def planning_stages(stages, steps: int) -> list[StageConfig]:
    """The stages of a schedule as the plan compiles them: model sizes resolved (named models,
    an existing init checkpoint, or the previous stage's), random init, a step count."""
    out: list[StageConfig] = []
    for stage in stages:
        model, init = stage.model, stage.init
        if (model.whisper is None or model.llm is None) and init.source == "previous" and out:
            model = dataclasses.replace(model, whisper=model.whisper or out[-1].model.whisper,
                                        llm=model.llm or out[-1].model.llm)
        elif (model.whisper is None or model.llm is None) and init.source == "checkpoint" \
                and Path(init.path).is_dir():
            model = resolve_model(stage, None).model
        if model.whisper is None or model.llm is None:
            raise ConfigError(f"stage {stage.name}: the plan needs the model's sizes without its init "
                              f"({init.source} {init.path or ''}); name them, e.g. "
                              f"stages.{stage.name}.model.whisper=whisper-large-v3 "
                              f"stages.{stage.name}.model.llm=qwen3-8b")
        stage = dataclasses.replace(stage, model=model, init=InitSection(source="random", seed=init.seed),
                                    steps=stage.steps or steps, epochs=None)
        out.append(resolve_model(stage, None))
    return out


def abstract_batch(stage: StageConfig, spec, micro_rows: int) -> dict:
    """ShapeDtypeStructs of one step's batch, as `jaxmusic.train.batches.next_batch` makes it."""
    d, a = stage.data, stage.accumulation
    rows = (a, micro_rows, d.seq_len)
    batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32) for k in ("input_ids", "labels", "positions", "audio_index")}
    batch.update({k: jax.ShapeDtypeStruct(rows, jnp.bool_) for k in ("is_audio", "attention_mask")})
    if d.packing:  # without packing the loader drops segment ids (no mask: cuDNN stays usable)
        batch["segment_ids"] = jax.ShapeDtypeStruct(rows, jnp.int32)
    if d.source == "synthetic":
        key, per_chunk = "mel", (spec.whisper.num_mel_bins, 2 * spec.whisper.max_source_positions)
    else:
        key, per_chunk = audio_key(d.features), chunk_shape(d.features, spec.whisper.num_mel_bins)
    slots = micro_rows * d.chunks_per_row
    batch[key] = jax.ShapeDtypeStruct((a, slots, *per_chunk), jnp.float32)
    batch["chunk_mask"] = jax.ShapeDtypeStruct((a, slots), jnp.bool_)
    return batch


def per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds of a tree of arrays laid out on `shardings`."""
    return sum(math.prod(sh.shard_shape(a.shape)) * a.dtype.itemsize
               for a, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


@dataclasses.dataclass
class Traffic:
    kind: str
    crosses_nodes: bool
    executions: int
    sent_bytes: float   # per GPU per step


@dataclasses.dataclass
class StagePlan:
    name: str
    mesh: dict
    attention: dict[str, int]     # "cuDNN target layer" -> executions per step
    compile_s: float
    # per device, bytes
    params: int
    optimizer: int
    gradients: int                # the trainable gradients: what one reduction over the replicas moves
    batch: int
    temporaries: int
    peak: int
    pool: int
    rollout_peak: int | None      # a GRPO stage's sampler (it runs between updates, beside the optimizer state)
    # per device, per step
    compiled_flops: float
    matmul_flops: dict
    attention_flops: float
    model_flops: float
    traffic: list[Traffic]
    off_data_axis: list[dict]     # collectives that cross nodes along more than the data axis
    matmul_scopes: dict           # "dtype scope" -> matmul FLOPs (where float32 matmuls come from)
    # roofline, seconds per step
    compute_s: float
    nvlink_s: float
    network_s: float
    audio_s_per_step: float
    xla_log: list[str]

    @property
    def fits(self) -> bool:
        return self.peak <= self.pool

    @property
    def step_s(self) -> float:
        """Roofline: communication fully overlapped with compute (the launcher's XLA flags pipeline it)."""
        return max(self.compute_s, self.nvlink_s, self.network_s)

    @property
    def audio_hours_per_day(self) -> float:
        return self.audio_s_per_step / self.step_s * 24

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(fits=self.fits, step_s=self.step_s, audio_hours_per_day=self.audio_hours_per_day)
        return d


def off_data_axis(analysis: hlo.Analysis, gpus_per_node: int) -> list[dict]:
    """Cross-node collectives whose groups are not `data`-axis groups (one device per node, all
    at the same place in their node: the only groups that cross nodes when fsdp x tensor fills
    a node)."""
    out = []
    for c in analysis.collectives:
        nodes = [[d // gpus_per_node for d in g] for g in c.groups]
        crosses = any(len(set(n)) > 1 for n in nodes)
        along_data = all(len(set(n)) == len(g) and len({d % gpus_per_node for d in g}) == 1
                         for n, g in zip(nodes, c.groups))
        if crosses and not along_data:
            out.append({"kind": c.kind, "group_size": len(c.groups[0]), "scope": c.scope,
                        "executions": c.count, "sent_bytes": c.count * c.sent_bytes})
    return out


def traffic(analysis: hlo.Analysis, gpus_per_node: int) -> list[Traffic]:
    """Collectives by kind and by whether their device groups stay inside a node."""
    totals: dict[tuple[str, bool], Traffic] = {}
    for c in analysis.collectives:
        crosses = any(len({d // gpus_per_node for d in g}) > 1 for g in c.groups)
        t = totals.setdefault((c.kind, crosses), Traffic(c.kind, crosses, 0, 0.0))
        t.executions += c.count
        t.sent_bytes += c.count * c.sent_bytes
    return sorted(totals.values(), key=lambda t: (t.crosses_nodes, -t.sent_bytes))


@contextlib.contextmanager
def captured_stderr(lines: list[str]):
    """XLA's C++ warnings (sharding fallbacks, rematerialisation notes) go to `lines`, not the
    terminal: the plan's output stays one block per stage (`--verbose` shows them)."""
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(line.rstrip() for line in tmp if line.strip())


def plan_stage(stage: StageConfig, gpu: Gpu, nodes: int, gpus_per_node: int, options: dict) -> StagePlan:
    """Compile `stage`'s train step for `nodes x gpus_per_node` `gpu`s and measure it (a GRPO
    stage: its update on a batch of rollouts, and its sampler)."""
    devices = cluster_devices(gpu, nodes, gpus_per_node)
    s = setup(stage, devices=devices, devices_per_node=gpus_per_node)
    params, opt = with_shardings(s.abstract, s.param_shardings), with_shardings(s.abstract_opt, s.opt_shardings)
    log: list[str] = []
    t0 = time.perf_counter()
    with captured_stderr(log):
        if stage.loss == "grpo":
            batch, loss_fn, sampler = grpo_programs(s, params, options)
            rollout_peak = _peak(sampler.memory_analysis()) + per_device_bytes(s.abstract_opt, s.opt_shardings)
        else:
            batch, loss_fn, rollout_peak = abstract_batch(s.stage, s.spec, s.micro_rows), None, None
        compiled, _ = s.compile_step(params, opt, batch, loss_fn, compiler_options=options)
    seconds = time.perf_counter() - t0
    batch_sh = {k: sharding.batch_sharding(s.mesh, v.ndim) for k, v in batch.items()}
    memory = compiled.memory_analysis()
    analysis = hlo.analyse(compiled.as_text())
    flows = traffic(analysis, gpus_per_node)
    n = s.mesh.size
    return StagePlan(
        name=stage.name, mesh=dict(s.mesh.shape), attention=analysis.attention_calls, compile_s=seconds,
        params=per_device_bytes(s.abstract, s.param_shardings),
        optimizer=per_device_bytes(s.abstract_opt, s.opt_shardings),
        gradients=per_device_bytes(optim.split(s.abstract, s.trainable)[0],
                                   optim.split(s.param_shardings, s.trainable)[0]),
        batch=per_device_bytes(batch, batch_sh),
        temporaries=memory.temp_size_in_bytes,
        peak=max(_peak(memory), rollout_peak or 0), pool=gpu.pool_bytes, rollout_peak=rollout_peak,
        compiled_flops=analysis.flops, matmul_flops=analysis.matmul_flops, attention_flops=analysis.attention_flops,
        model_flops=s.step_flops(batch) / n, traffic=flows,
        off_data_axis=off_data_axis(analysis, gpus_per_node),
        matmul_scopes={f"{dt} {scope}": f for (dt, scope), f in analysis.matmul_by_scope.items()},
        compute_s=analysis.flops / (gpu.peak_tflops * 1e12),
        nvlink_s=sum(t.sent_bytes for t in flows if not t.crosses_nodes) / (gpu.nvlink_gbps * 1e9),
        network_s=sum(t.sent_bytes for t in flows if t.crosses_nodes) / (gpu.network_gbps * 1e9),
        # a GRPO stage's completions share their prompt's audio
        audio_s_per_step=float(stage.batch.global_batch // (stage.grpo.generations if stage.loss == "grpo" else 1)
                               * stage.data.chunks_per_row * CHUNK_SECONDS),
        xla_log=log)


def _peak(memory) -> int:
    """Bytes a compiled program holds at once on a device: its arguments, outputs and temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def grpo_programs(s, params, options):
    """A GRPO stage's update batch (the shapes its finisher makes from the sampler's output),
    its loss, and its sampler compiled for the cluster (`jaxmusic.train.grpo.programs`).

    The finisher is not compiled: beside elementwise work it runs forward passes only (the
    sampling policy's log-probs with `iterations` > 1, the reference's with `beta` > 0), which
    hold less than the update's forward and backward pass."""
    g = s.stage.grpo
    prompts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(s.mesh, v.ndim))
               for k, v in abstract_batch(s.stage, s.spec, s.micro_rows // g.generations).items()
               if k not in ("labels", "segment_ids")}
    sample, finish, loss_fn = grpo.programs(s, [r["weight"] for r in g.rewards], (0,), 0)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(s.mesh))
    sampled = jax.eval_shape(sample, params, prompts, key)
    rows = sampled[0].shape[0]
    rewards = jax.ShapeDtypeStruct((rows, len(g.rewards)), jnp.float32)
    reference = optim.split(params, s.trainable)[0] if g.beta else {}
    batch, _ = jax.eval_shape(finish, params, reference, prompts, *sampled, rewards)
    return batch, loss_fn, sample.lower(params, prompts, key).compile(options)


def plan_stage_safely(args) -> StagePlan | str:
    """`plan_stage` for a worker process: a user error comes back as its one line."""
    try:
        return plan_stage(*args)
    except UserError as e:
        return str(e)
