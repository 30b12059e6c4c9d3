"""`jaxmusic plan`: will a stage fit the GPUs, and how fast can it run? Answered without a GPU.

    jaxmusic plan CONFIG [--gpu NAME | --gpu-spec FILE] [--nodes N --gpus-per-node G] [KEY=VALUE ...]
                  [--autofit] [--json]
    jaxmusic plan --ask CKPT-or-CONFIG [--gpu NAME] [--batch B --audio-seconds S --max-new-tokens N]
    jaxmusic plan --xla-flags          # the GPU runs' XLA flags, one line (launch/slurm.sbatch uses it)

CONFIG is a stage or a schedule, with `jaxmusic train`'s KEY=VALUE overrides. For every stage
the real train step (`jaxmusic.train.trainer.setup` and `Setup.compile_step`: mesh,
shardings, batch shapes, microbatching, dtype, remat, trainable set) is compiled by XLA's GPU
compiler for `nodes x gpus_per_node` GPUs (JAX's CUDA plugin, no GPU needed; `pip install -e
'.[plan]'`) with the launcher's XLA flags (`jaxmusic/configs/xla_gpu.yaml`), and the plan
prints per GPU: memory (parameters, optimizer state, batch, temporaries, the compiled peak
against XLA's pool), FLOPs as compiled against model FLOPs (the remat overhead), the
collectives inside and across nodes, and a roofline step time with what it means in audio
hours per day. Exit 0 when every stage fits, 1 when one does not (one line per such stage),
2 on a user error.

`--ask` compiles MuFun's prefill (encoder, connector, LLM over the prompt) and one decode
step in bfloat16 on one GPU, for B requests about S seconds of audio, and says whether they fit.

Not counted anywhere (the compiler does not see them): cuDNN workspaces (sized 0 without a
GPU), the CUDA context and NCCL's buffers, which live outside XLA's pool (hence the pool
fraction below 1), and GEMM autotuning, which does not change the memory plan.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxmusic.errors import EXIT_FAILURE, EXIT_OK, run_command
from jaxmusic.plan import gpus as gpus_lib

DEFAULT_GPU = "a100-40gb"
STEPS_IF_EPOCHS = 1000  # the schedule's length for a stage given in epochs (same compiled step)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxmusic plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="a stage or schedule YAML (configs/stages, configs/schedules)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for jaxmusic train")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--gpu", help=f"a GPU of jaxmusic/configs/gpus.yaml (default {DEFAULT_GPU})")
    which.add_argument("--gpu-spec", metavar="FILE", help="a YAML file describing one GPU (gpus.yaml's format)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: the GPU's)")
    p.add_argument("--nvlink-gbps", type=float, help="NVLink GB/s per GPU, one direction (default: the GPU's)")
    p.add_argument("--network-gbps", type=float, help="network GB/s per GPU, one direction (default: the GPU's)")
    p.add_argument("--steps", type=int, default=STEPS_IF_EPOCHS,
                   help="steps of a stage given in epochs (only the schedule's length; default %(default)s)")
    p.add_argument("--autofit", action="store_true",
                   help="for a stage that does not fit, compile candidate settings and print the first that fits")
    p.add_argument("--jobs", type=int, help="stages compiled at once (processes; default: CPU cores)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verbose", action="store_true", help="also print XLA's warnings from each compilation")
    p.add_argument("--ask", metavar="CKPT_OR_CONFIG",
                   help="plan inference instead: a jaxmusic checkpoint, or a stage/schedule naming the model")
    p.add_argument("--batch", type=int, default=1, help="--ask: requests answered together")
    p.add_argument("--audio-seconds", type=float, default=300.0, help="--ask: audio per request")
    p.add_argument("--max-new-tokens", type=int, default=256, help="--ask: answer length")
    p.add_argument("--xla-flags", action="store_true", help="print the GPU runs' XLA flags and exit")
    return p


def _compile_on_cpu() -> None:
    """The plan compiles for GPUs that are not there: JAX itself runs on the CPU, also on a GPU
    node (the launcher's pre-flight check must not take the GPUs' memory)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_platforms", "cpu")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    if args.xla_flags:
        print(" ".join(gpus_lib.xla_flags()))
        return EXIT_OK
    return run_command(lambda: _plan(args))


def _plan(args) -> int:
    if not args.ask and not args.config:
        raise gpus_lib.PlanError("give a stage or schedule CONFIG (or --ask CKPT)")
    if min(args.nodes, args.gpus_per_node, args.batch, args.max_new_tokens) < 1 or args.audio_seconds <= 0:
        raise gpus_lib.PlanError("--nodes, --gpus-per-node, --batch, --max-new-tokens and --audio-seconds "
                                 "must be positive")
    gpu = gpus_lib.load_gpu(args.gpu or (None if args.gpu_spec else DEFAULT_GPU), args.gpu_spec).with_overrides(
        peak_tflops=args.peak_tflops, nvlink_gbps=args.nvlink_gbps, network_gbps=args.network_gbps)
    _compile_on_cpu()
    from jaxmusic.plan import report

    if args.ask:
        from jaxmusic.plan.ask import plan_ask

        result = plan_ask(args.ask, gpu, batch=args.batch, audio_seconds=args.audio_seconds,
                          max_new_tokens=args.max_new_tokens, options=gpus_lib.compiler_options())
        print(json.dumps(result.to_dict(), indent=1) if args.json else report.ask_text(result, gpu))
        return EXIT_OK if result.fits else EXIT_FAILURE
    from jaxmusic.plan import run

    plans, fixes = run.plan_config(args.config, args.overrides, gpu, args.nodes, args.gpus_per_node,
                                   steps=args.steps, jobs=args.jobs, autofit=args.autofit)
    if args.json:
        print(json.dumps(report.as_json(args.config, gpu, args.nodes, args.gpus_per_node, plans, fixes), indent=1))
    else:
        print(report.text(args.config, gpu, args.nodes, args.gpus_per_node, plans, fixes, verbose=args.verbose))
    failing = [p for p in plans if not p.fits]
    for p in failing:
        print(f"error: {report.not_fitting(p, gpu, args.nodes, args.gpus_per_node)}", file=sys.stderr)
    return EXIT_FAILURE if failing else EXIT_OK
