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


def _run(stages: list[StageConfig], gpu, nodes: int, gpus_per_node: int, jobs: int | None) -> list:
    """`plan_stage` of every stage in `jobs` worker processes: a StagePlan, or a user error's line."""
    options = gpus_lib.compiler_options()
    work = [(stage, gpu, nodes, gpus_per_node, options) for stage in stages]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    if jobs == 1:
        return [plan_stage_safely(w) for w in work]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(plan_stage_safely, work))


def compile_all(stages: list[StageConfig], gpu, nodes: int, gpus_per_node: int, jobs: int | None) -> list[StagePlan]:
    """`plan_stage` of every stage; the first user error is raised."""
    results = _run(stages, gpu, nodes, gpus_per_node, jobs)
    for r in results:
        if isinstance(r, str):
            raise gpus_lib.PlanError(r)
    return results


def candidates(stage: StageConfig, devices: int) -> list[dict[str, object]]:
    """Settings to try for a stage that does not fit, cheapest in speed first: full remat,
    smaller microbatches (more accumulation, same global batch), then tensor parallelism
    (fsdp x tensor keeps its size: the data axis stays as it is, across nodes)."""
    data, fsdp, tensor = sharding.resolve_mesh_shape(stage.mesh.shape(), devices)
    out: list[dict[str, object]] = []
    remat = {} if stage.model.remat == "full" else {"model.remat": "full"}
    if remat:
        out.append(remat)
    micro = stage.batch.microbatch or stage.batch.global_batch
    while micro % 2 == 0 and (micro // 2) % (data * fsdp) == 0:
        micro //= 2
        out.append({**remat, "batch.microbatch": micro})
    for t in (2, 4, 8):
        if (fsdp * tensor) % t == 0 and t > tensor:
            out.append({**remat, "mesh.data": data, "mesh.fsdp": fsdp * tensor // t, "mesh.tensor": t})
    return out


def apply(stage: StageConfig, overrides: dict[str, object]) -> StageConfig:
    """`stage` with dotted `overrides` (validated as a config file's would be)."""
    d = stage.to_dict()
    for key, value in overrides.items():
        config_lib.apply_override(d, key.split("."), value)
    return config_lib.stage_from_dict(d)


def fit_stage(stage: StageConfig, gpu, nodes: int, gpus_per_node: int, jobs: int | None) -> dict | None:
    """The first candidate setting (`candidates`) under which `stage` fits, or None. Candidates
    compile a round of `jobs` at a time; one that cannot be built (e.g. a microbatch the new
    mesh cannot split) is passed over."""
    tries = []
    for change in candidates(stage, nodes * gpus_per_node):
        try:
            tries.append((change, apply(stage, change)))
        except config_lib.ConfigError:
            continue
    width = max(1, jobs or os.cpu_count() or 1)
    for start in range(0, len(tries), width):
        batch = tries[start:start + width]
        for (change, _), plan in zip(batch, _run([t for _, t in batch], gpu, nodes, gpus_per_node, jobs)):
            if isinstance(plan, StagePlan) and plan.fits:
                return {"overrides": {f"stages.{stage.name}.{k}": v for k, v in change.items()}, "plan": plan}
    return None


def plan_config(config: str, overrides: list[str], gpu, nodes: int, gpus_per_node: int, *, steps: int,
                jobs: int | None = None, autofit: bool = False):
    """`(plans of every stage, {stage: autofit result or None})` of a stage or schedule file."""
    stages = planning_stages(config_lib.load(config, overrides, alone=True).stages, steps)
    plans = compile_all(stages, gpu, nodes, gpus_per_node, jobs)
    fixes = {}
    if autofit:
        for stage, plan in zip(stages, plans):
            if not plan.fits:
                fixes[stage.name] = fit_stage(stage, gpu, nodes, gpus_per_node, jobs)
    return plans, fixes
