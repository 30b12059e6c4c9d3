"""Planning every stage of a config, several compilations at once, and `--autofit`.

Each stage compiles in a process of its own (XLA's GPU compiler works mostly on one core), so
a schedule of five full-size stages takes about as long as its two slowest on two cores.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os

from jaxmusic import sharding
from jaxmusic.plan import gpus as gpus_lib
from jaxmusic.plan.train import StagePlan, plan_stage_safely, planning_stages
from jaxmusic.train import config as config_lib
from jaxmusic.train.config import StageConfig


def compile_all(stages: list[StageConfig], gpu, nodes: int, gpus_per_node: int, jobs: int | None) -> list[StagePlan]:
    """`plan_stage` of every stage, in `jobs` worker processes; the first user error is raised."""
    options = gpus_lib.compiler_options()
    work = [(stage, gpu, nodes, gpus_per_node, options) for stage in stages]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        results = [plan_stage_safely(w) for w in work]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(plan_stage_safely, work))
    for r in results:
        if isinstance(r, str):
            raise gpus_lib.PlanError(r)
    return results


def candidates(stage: StageConfig, gpus_per_node: int) -> list[dict[str, object]]:
    """Settings to try for a stage that does not fit, cheapest in speed first: full remat,
    smaller microbatches (more accumulation, same global batch), then tensor parallelism inside
    a node (fsdp x tensor keeps the node's size; the data axis stays across nodes)."""
    out: list[dict[str, object]] = []
    remat = {} if stage.model.remat == "full" else {"model.remat": "full"}
    if remat:
        out.append(remat)
    micro = stage.batch.microbatch or stage.batch.global_batch
    groups = stage.mesh.data * max(stage.mesh.fsdp, 1)
    while micro % 2 == 0 and (micro // 2) % groups == 0:
        micro //= 2
        out.append({**remat, "batch.microbatch": micro})
    inner = gpus_per_node if stage.mesh.fsdp == -1 else stage.mesh.fsdp * stage.mesh.tensor
    for tensor in (2, 4, 8):
        if inner % tensor == 0 and tensor > stage.mesh.tensor:
            out.append({**remat, "mesh.fsdp": inner // tensor, "mesh.tensor": tensor})
    return out


def apply(stage: StageConfig, overrides: dict[str, object]) -> StageConfig:
    """`stage` with dotted `overrides` (validated as a config file's would be)."""
    d = stage.to_dict()
    for key, value in overrides.items():
        config_lib.apply_override(d, key.split("."), value)
    return config_lib.stage_from_dict(d)


def fit_stage(stage: StageConfig, gpu, nodes: int, gpus_per_node: int, jobs: int | None) -> dict | None:
    """The first candidate setting (`candidates`) under which `stage` fits, or None."""
    tries = []
    for change in candidates(stage, gpus_per_node):
        try:
            changed = apply(stage, change)
            sharding.resolve_mesh_shape(changed.mesh.shape(), nodes * gpus_per_node)
        except (config_lib.ConfigError, sharding.ShardingError):
            continue
        tries.append((change, changed))
    width = max(1, jobs or os.cpu_count() or 1)  # compiled a round at a time; the first that fits wins
    for start in range(0, len(tries), width):
        batch = tries[start:start + width]
        for (change, _), plan in zip(batch, compile_all([t for _, t in batch], gpu, nodes, gpus_per_node, jobs)):
            if plan.fits:
                return {"overrides": {f"stages.{stage.name}.{k}": v for k, v in change.items()},
                        "plan": plan}
    return None


def plan_config(config: str, overrides: list[str], gpu, nodes: int, gpus_per_node: int, *, steps: int,
                jobs: int | None = None, autofit: bool = False):
    """`(plans of every stage, {stage: autofit result or None})` of a stage or schedule file."""
    stages = planning_stages(config_lib.load(config, overrides).stages, steps)
    plans = compile_all(stages, gpu, nodes, gpus_per_node, jobs)
    fixes = {}
    if autofit:
        for stage, plan in zip(stages, plans):
            if not plan.fits:
                fixes[stage.name] = fit_stage(stage, gpu, nodes, gpus_per_node, jobs)
    return plans, fixes
