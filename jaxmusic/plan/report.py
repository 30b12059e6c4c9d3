"""The plan as text (one block per stage and a summary table) or as JSON."""

from __future__ import annotations

from jaxmusic.plan.gpus import Gpu
from jaxmusic.plan.train import GIB, StagePlan


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def _secs(t: float) -> str:
    return f"{t:.1f} s" if t >= 0.1 else f"{t * 1e3:.2g} ms"


def cluster(gpu: Gpu, nodes: int, gpus_per_node: int) -> str:
    return f"{nodes} x {gpus_per_node} {gpu.name}"


def header(config: str, gpu: Gpu, nodes: int, gpus_per_node: int) -> str:
    return (f"plan for {config} on {cluster(gpu, nodes, gpus_per_node)} ({nodes} nodes of {gpus_per_node})\n"
            f"  per GPU: XLA's pool {_gib(gpu.pool_bytes)} GiB ({gpu.memory_fraction:.0%} of {_gib(gpu.memory_bytes)} "
            f"GiB); roofline with {gpu.peak_tflops:g} TFLOP/s dense bf16, NVLink {gpu.nvlink_gbps:g} GB/s, "
            f"network {gpu.network_gbps:g} GB/s, one direction (--peak-tflops, --nvlink-gbps, --network-gbps)")


def _traffic(plan: StagePlan, crosses: bool) -> str:
    parts = [f"{t.kind} {t.executions:,}x {t.sent_bytes / GIB:,.1f} GiB" for t in plan.traffic
             if t.crosses_nodes == crosses]
    return "; ".join(parts) or "none"


def _network(plan: StagePlan) -> float:
    return sum(t.sent_bytes for t in plan.traffic if t.crosses_nodes)


def stage_text(plan: StagePlan, verbose: bool = False) -> str:
    attention = ", ".join(f"{a.removeprefix('__cudnn$')} {n:,}x" for a, n in sorted(plan.attention.items())) \
        or "XLA attention (no cuDNN)"
    bound = max(("compute", plan.compute_s), ("NVLink", plan.nvlink_s), ("network", plan.network_s),
                key=lambda kv: kv[1])[0]
    lines = [
        f"stage {plan.name}: {'fits' if plan.fits else 'DOES NOT FIT'}; mesh "
        f"{' x '.join(f'{k} {v}' for k, v in plan.mesh.items())}; compiled in {plan.compile_s:.0f} s; "
        f"attention: {attention}",
        f"  memory/GPU   params {_gib(plan.params)} + optimizer {_gib(plan.optimizer)} + batch {_gib(plan.batch)} GiB, "
        f"temporaries (gradients, activations) {_gib(plan.temporaries)} GiB: peak {_gib(plan.peak)} of "
        f"{_gib(plan.pool)} GiB ({plan.peak / plan.pool:.0%}), "
        + (f"{_gib(plan.pool - plan.peak)} GiB headroom" if plan.fits else f"{_gib(plan.peak - plan.pool)} GiB short"),
        *([f"  rollouts     the sampler with the optimizer state beside it: {_gib(plan.rollout_peak)} GiB "
           f"({plan.rollout_peak / plan.pool:.0%}); the rest of this plan is the update's"]
          if plan.rollout_peak else []),
        f"  FLOPs/GPU    {plan.compiled_flops:.3g} per step as compiled (matmuls "
        + ", ".join(f"{dt} {f:.3g}" for dt, f in sorted(plan.matmul_flops.items(), key=lambda kv: -kv[1]))
        + f"; cuDNN attention {plan.attention_flops:.3g}) = {plan.compiled_flops / plan.model_flops:.2f} x model "
        f"FLOPs {plan.model_flops:.3g} (rematerialisation)",
        f"  collectives  inside nodes: {_traffic(plan, False)}",
        f"               across nodes: {_traffic(plan, True)}"
        + (f" ({_network(plan) / plan.gradients:.2f} x the trainable gradients, {_gib(plan.gradients)} GiB)"
           if _network(plan) else ""),
        f"  roofline     {_secs(plan.step_s)}/step ({bound}-bound; compute {_secs(plan.compute_s)}, NVLink "
        f"{_secs(plan.nvlink_s)}, network {_secs(plan.network_s)}, overlapped); {plan.audio_s_per_step / 3600:.1f} h "
        f"of audio slots per step: at most {plan.audio_hours_per_day:,.0f} audio hours/day",
    ]
    if verbose and plan.xla_log:
        lines += ["  XLA said:"] + [f"    {line}" for line in plan.xla_log]
    return "\n".join(lines)


def summary(plans: list[StagePlan]) -> str:
    rows = ["| stage | peak GiB/GPU | of pool | fits | compiled / model FLOPs | roofline s/step | audio h/day |",
            "|---|---|---|---|---|---|---|"]
    for p in plans:
        rows.append(f"| {p.name} | {_gib(p.peak)} | {p.peak / p.pool:.0%} | {'yes' if p.fits else 'NO'} | "
                    f"{p.compiled_flops / p.model_flops:.2f} | {p.step_s:.1f} | {p.audio_hours_per_day:,.0f} |")
    return "\n".join(rows)


def text(config: str, gpu: Gpu, nodes: int, gpus_per_node: int, plans: list[StagePlan], fixes: dict,
         verbose: bool = False) -> str:
    blocks = [header(config, gpu, nodes, gpus_per_node)] + [stage_text(p, verbose) for p in plans]
    for name, fix in fixes.items():
        blocks.append(f"autofit {name}: " + (" ".join(f"{k}={v}" for k, v in fix["overrides"].items())
                                             + f" (peak {_gib(fix['plan'].peak)} GiB)" if fix
                                             else "no candidate setting fits"))
    return "\n\n".join(blocks + [summary(plans)])


def not_fitting(plan: StagePlan, gpu: Gpu, nodes: int, gpus_per_node: int) -> str:
    return (f"stage {plan.name} does not fit {cluster(gpu, nodes, gpus_per_node)}: it needs {_gib(plan.peak)} GiB "
            f"per GPU, XLA's pool is {_gib(plan.pool)} GiB (try --autofit)")


def as_json(config: str, gpu: Gpu, nodes: int, gpus_per_node: int, plans: list[StagePlan], fixes: dict) -> dict:
    return {"config": config, "gpu": gpu.key, "gpu_name": gpu.name, "nodes": nodes, "gpus_per_node": gpus_per_node,
            "pool_bytes": gpu.pool_bytes, "peak_tflops": gpu.peak_tflops, "nvlink_gbps": gpu.nvlink_gbps,
            "network_gbps": gpu.network_gbps, "fits": all(p.fits for p in plans),
            "stages": [p.to_dict() for p in plans],
            "autofit": {k: v and {"overrides": v["overrides"], "peak": v["plan"].peak} for k, v in fixes.items()}}


def ask_text(result, gpu: Gpu) -> str:
    return (f"ask on 1 {gpu.name}: {result.batch} request(s) of {result.audio_seconds:g} s audio "
            f"({result.prompt_tokens} prompt tokens, {result.max_new_tokens} new), bf16: "
            f"{'fits' if result.fits else 'DOES NOT FIT'}\n"
            f"  memory/GPU   weights {_gib(result.weights)} GiB, KV cache {_gib(result.cache)} GiB; peak embed "
            f"{_gib(result.embed_peak)} GiB, prefill "
            f"{_gib(result.prefill_peak)} GiB, decode {_gib(result.decode_peak)} GiB, of {_gib(result.pool)} GiB "
            f"({max(result.prefill_peak, result.decode_peak) / result.pool:.0%})\n"
            f"  decode       a step reads {_gib(result.decode_bytes)} GiB: at most "
            f"{result.tokens_per_s_bound:,.0f} tokens/s per row at {gpu.hbm_bytes_per_s / 1e9:,.0f} GB/s HBM")
